"""Load a typed config from a YAML file plus dotted command-line overrides, with errors that name the key.

Shared by every entry point (`data_prep`, `pretrain`, `cluster`): a config is a pydantic model tree whose
models forbid unknown keys; files hold only what differs from the defaults. Overrides come as
`a.b=value` or `--a.b value`; values are parsed as YAML flow values, so `inputs=["x.jsonl","d/*.txt"]`,
`examples.nsp=false` and `seed=7` mean what they look like.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from data_prep.storage import local_form

COMMAND_LINE = "command line"
M = TypeVar("M", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# A directory, file or URL in a config: never empty (an unset `${VAR}` must not mean the working directory);
# `file://` URLs and `~` become the local paths they name, other URLs (s3://...) stay as they are.
Location = Annotated[str, Field(min_length=1), AfterValidator(local_form)]


class ConfigError(Exception):
    """A config that cannot be used; the message names the key, where it came from, and what is valid."""


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """`["a.b=1", "--c.d", "x", "--e=[1,2]"]` -> `[("a.b", 1), ("c.d", "x"), ("e", [1, 2])]`."""
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, text = body.split("=", 1)
            elif i + 1 < len(args):
                key, text = body, args[i + 1]
                i += 1
            else:
                raise ConfigError(f"override '{arg}' has no value: write '{body}=VALUE' or '--{body} VALUE'")
        elif "=" in arg:
            key, text = arg.split("=", 1)
        elif arg.endswith((".yaml", ".yml")):
            raise ConfigError(f"'{arg}' is a second config file: a command takes one (the arguments after it are "
                              "KEY=VALUE overrides); run it once for each file")
        else:
            raise ConfigError(f"cannot read '{arg}' as an override: write KEY=VALUE, e.g. 'seed=7'")
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{arg}' has an empty key")
        out.append((key, _parse_value(text, arg)))
        i += 1
    return out


def _parse_value(text: str, arg: str) -> Any:
    if text.strip() == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse the value of override '{arg}' as YAML: {e}") from None


def dotted(tree: Any, key: str, default: Any = None) -> Any:
    """The value at dotted `key` ("a.b.c") of nested dicts; `default` where it is absent."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def _set_dotted(tree: dict, key: str, value: Any, sources: dict[str, str], origin: str = COMMAND_LINE,
                prefix: str = "") -> None:
    """Set `key` (dotted, below `prefix`) in `tree` to `value`, recording where it came from."""
    if prefix:  # (a key inside a mapping value: one level, taken whole)
        parts = [key]
        key = prefix + key
    else:
        parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"override '{key}': '{where}' is a value, not a section")
        node = child
    if isinstance(value, dict) and value and isinstance(node.get(parts[-1]), dict):
        # a mapping given for a section sets the keys it names, as dotted keys would: the section's others stay
        for k, v in value.items():
            _set_dotted(node[parts[-1]], str(k), v, sources, origin, f"{key}.")
        return
    node[parts[-1]] = value
    sources[key] = origin


def _leaf_sources(tree: Any, origin: str, prefix: str = "") -> dict[str, str]:
    if not isinstance(tree, dict):
        return {prefix: origin} if prefix else {}
    out: dict[str, str] = {}
    for k, v in tree.items():
        out.update(_leaf_sources(v, origin, f"{prefix}.{k}" if prefix else str(k)))
    return out


def load_config(schema: type[M], path: str | Path | None, overrides: list[str] | None = None,
                overrides_from: str = COMMAND_LINE) -> M:
    """Read `path` (YAML mapping; may be None), apply overrides (errors say they came from `overrides_from`),
    validate the whole tree against `schema`."""
    tree: dict[str, Any] = {}
    origin = str(path) if path else "defaults"
    if path is not None:
        p = Path(path)
        if p.is_dir():
            inside = sorted(x.name for x in p.glob("*.y*ml"))
            raise ConfigError(f"config file '{path}' is a directory: give one file"
                              + (f" of it ({', '.join(inside[:5])}{', ...' if len(inside) > 5 else ''})"
                                 if inside else ""))
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:  # its marks name the text "<unicode string>": name the file instead
            where = str(e).replace('"<unicode string>"', f'"{path}"')
            raise ConfigError(f"config file '{path}' is not valid YAML:\n{where}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file '{path}' is not UTF-8 text") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of keys, not a {type(loaded).__name__}")
        tree = loaded
    sources = _leaf_sources(tree, origin)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value, sources, overrides_from)
    return validate_tree(schema, tree, sources, origin)


def validate_tree(schema: type[M], tree: dict, sources: dict[str, str] | None = None, origin: str = "config") -> M:
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err, schema, sources or {}, origin)) from None


def _explain(err: ValidationError, schema: type[BaseModel], sources: dict[str, str], origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = [str(part) for part in e["loc"]]
        key = ".".join(loc)
        where = sources.get(key) or _nearest_source(key, sources) or origin
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(schema, loc[:-1])
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.6)
            prefix = ".".join(loc[:-1])
            hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            lines.append(
                f"unknown key '{key}' (in {where}); {hint} Valid keys here: {', '.join(valid)}".replace(";  ", "; ")
            )
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):  # a check across a section's keys
            msg = e["msg"].removeprefix("Value error, ")
            named = [k for k in dict.fromkeys(re.findall(r"\b[a-z_]+(?:\.[a-z_0-9]+)+\b", msg))
                     if k.split(".")[-1] in _valid_keys(schema, k.split(".")[:-1])]
            if named:
                set_by = "; ".join(f"{k}: {sources.get(k, 'default')}" for k in named)
                lines.append(f"{msg} ({set_by})")
            else:
                lines.append(f"'{key}' (in {where}): {e['msg']}")
        elif e["type"] in ("model_type", "dict_type") and (keys := _valid_keys(schema, loc)):
            lines.append(f"'{key}' (in {where}) is a section, not a value (got {e.get('input')!r}): set its keys, "
                         f"e.g. {key}.{keys[0]}=VALUE (its keys: {', '.join(keys)})")
        else:
            got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
            lines.append(f"'{key}' (in {where}): {e['msg']}{got}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _nearest_source(key: str, sources: dict[str, str]) -> str | None:
    for k, v in sources.items():
        if k.startswith(key + ".") or key.startswith(k + "."):
            return v
    return None


def _valid_keys(schema: type[BaseModel], path: list[str]) -> list[str]:
    model: Any = schema
    for part in path:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        # a section that may be left out (`X | None`): its model's keys
        model = next((a for a in get_args(field.annotation) if hasattr(a, "model_fields")), field.annotation)
    return list(getattr(model, "model_fields", {}).keys())


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; accepts a model or a plain dict."""
    if isinstance(tree, BaseModel):
        tree = tree.model_dump(mode="json")
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


# `scheme://user:password@host`: the password of a URL (a database-backed MLflow store's, say)
_URL_PASSWORD = re.compile(r"(?<=://)([^/@:\s]*):[^/@\s]+@")


def redact_secrets(tree: Any) -> Any:
    """`tree` (a config as a dict, a list, a string) with the password of every URL in it replaced by `***`: what is
    published (MLflow params and artifacts, a model's training.json) must not carry credentials."""
    if isinstance(tree, BaseModel):
        tree = tree.model_dump(mode="json")
    if isinstance(tree, dict):
        return {k: redact_secrets(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact_secrets(v) for v in tree]
    return _URL_PASSWORD.sub(r"\1:***@", tree) if isinstance(tree, str) else tree


def config_changes(old: Any, new: Any) -> list[str]:
    """Each key whose value differs between two config trees, as "key: old -> new" (a key one lacks: None)."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def config_hash(tree: dict | BaseModel) -> str:
    """Stable sha256 of a config tree (canonical JSON), for "same config?" checks."""
    if isinstance(tree, BaseModel):
        tree = tree.model_dump(mode="json")
    return hashlib.sha256(json.dumps(tree, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
