"""A dataset directory: its state (fresh, resumable, complete), its report and manifest, and verification.

Layout: `train/*.tar`, `val/*.tar`, `tokenizer/spm.model`, `report.json`, and `manifest.json`, which is
written last and atomically: a dataset exists only if its manifest does. Work in progress lives in the
hidden `.work/` (the config being built, per-unit records, the sentence sample) and is removed at the end.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import Counter
from pathlib import Path

from data_prep.config import SPECIAL_PIECES, DataPrepConfig
from data_prep.configfile import config_changes, config_hash, dotted
from data_prep.shards import PARTIAL_SUFFIX, POSITION_DTYPE, SAMPLE_EXT, token_dtype
from data_prep.sources import Source
from data_prep.tokenizer import sha256_file
from data_prep.worker import SPLITS

MANIFEST = "manifest.json"
REPORT = "report.json"
WORK = ".work"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_MODEL = "spm.model"
FORMAT = {"name": "bert-pretraining-webdataset", "version": 1, "sample_extension": SAMPLE_EXT}
# How this code turns a corpus into examples: the tokenizer's sample, sentence splitting, pairing and masking. Raise
# it with every change that makes other bytes from the same config and inputs: an unfinished dataset is not resumed
# across that change (its shards would mix both kinds); a finished one stays as it is, with a note. Manifests and
# work configs without it were made at 1. 2: a Latin word right after a CJK character is a whole word of its own;
# the tokenizer's sample follows sentences. 3: a document over sources.MAX_DOCUMENT_CHARS is cut into documents, and
# a pool is also full at worker.MAX_POOL_CHARS. 4: whole words keep their combining marks and part at punctuation
# on both sides; with NSP a sentence longer than an example is cut into parts; a random next segment never comes
# from a document without tokens.
RECIPE_VERSION = 4
# What a dataset consists of: files at the top, and in its folders the files of these names only.
OWNED_FILES = (MANIFEST, REPORT)
OWNED_IN = {TOKENIZER_DIR: re.compile(r"spm\.(model|vocab)(\.partial)?"),
            # (6 and 5 digits at least: wider past a million units or 100,000 shards of one unit)
            **{split: re.compile(r"shard-\d{6,}-\d{5,}\.tar(\.partial)?") for split in SPLITS}}


class DatasetError(Exception):
    """The output directory cannot be used as asked; the message says what to do. `in_a_job`: the same advice for
    a cluster job, which has no --overwrite (None: the message fits as it is)."""

    def __init__(self, message: str, in_a_job: str | None = None):
        super().__init__(message)
        self.in_a_job = in_a_job

    def __reduce__(self):  # (whole across processes: Ray pickles a task's exception)
        return type(self), (str(self), self.in_a_job)


# What a cluster job can do where data prep's command line would pass --overwrite
DELETE_IT = "a job has no --overwrite: delete {output} to replace it, or give the data_prep config another output"
NOT_A_DATASET = "choose an empty or new output for the data_prep config (its files are not a dataset's)"
UNFINISHED = ("submit the job as it was when this dataset was started (the same config, inputs and data_prep "
              "version) to finish it, or delete {output} to start over (a job has no --overwrite)")


# What readers of a manifest rely on (pretraining, export, verify, inspect): checked once, where it is read.
MANIFEST_KEYS = (
    "format.name", "format.version", "dataset_id", "config_hash", "recipe_hash", "config.examples",
    "tokenizer.file", "tokenizer.sha256", "tokenizer.vocab_size", "tokenizer.model_type", "tokenizer.special_ids",
    "examples.max_seq_length", "examples.max_predictions_per_seq", "examples.nsp", "examples.whole_word_mask",
    "examples.token_dtype", "examples.position_dtype", "splits.train.examples", "splits.train.tokens",
    "splits.train.shards", "splits.val.examples", "splits.val.tokens", "splits.val.shards",
)
SHARD_KEYS = ("name", "examples", "sha256")


def manifest_problems(manifest: object) -> list[str]:
    """What a manifest lacks of the keys its readers rely on (empty when it has them all)."""
    if not isinstance(manifest, dict):
        return [f"it holds a JSON {type(manifest).__name__}, not an object"]
    if dotted(manifest, "format.name") != FORMAT["name"]:
        return [f"its format.name is not '{FORMAT['name']}': it is not a manifest data_prep wrote"]
    version = dotted(manifest, "format.version")
    if version is not None and version != FORMAT["version"]:  # (its examples would be misread)
        return [f"its format.version is {version!r}; this bertforge reads version {FORMAT['version']}: read it with "
                "the version that wrote it, or make the dataset again"]
    missing = [f"key {k} is missing" for k in MANIFEST_KEYS if dotted(manifest, k) is None]
    if missing:
        return missing
    # (names a reader joins onto a directory: only the dataset's own, never a path that leads elsewhere)
    if manifest["tokenizer"]["file"] != f"{TOKENIZER_DIR}/{TOKENIZER_MODEL}":
        return [f"tokenizer.file is {manifest['tokenizer']['file']!r}, not {TOKENIZER_DIR}/{TOKENIZER_MODEL}"]
    for split in SPLITS:
        shards = manifest["splits"][split]["shards"]
        if not isinstance(shards, list):
            return [f"splits.{split}.shards is not a list"]
        for i, shard in enumerate(shards):
            lacks = [k for k in SHARD_KEYS if not isinstance(shard, dict) or k not in shard]
            if lacks:
                return [f"splits.{split}.shards[{i}] lacks {', '.join(lacks)}"]
            folder, _, name = str(shard["name"]).partition("/")
            if folder != split or not OWNED_IN[split].fullmatch(name) or name.endswith(".partial"):
                return [f"splits.{split}.shards[{i}].name {shard['name']!r} is not a shard of {split}/"]
    return []


def parse_manifest(text: str, where: str) -> dict:
    """The manifest in `text` (read from `where`, which errors name), checked for the keys its readers use."""
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise DatasetError(f"'{where}' is not valid JSON ({e})") from None
    why = manifest_problems(manifest)
    if why:
        raise DatasetError(f"'{where}' is not a complete manifest: {'; '.join(why[:5])}")
    return manifest


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not Path(root).exists():
        raise DatasetError(f"'{root}' does not exist: give the directory `python -m data_prep run` wrote (its output)")
    if not path.is_file():
        raise DatasetError(f"'{root}' is not a finished dataset: {MANIFEST} is missing (run `python -m data_prep run`)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DatasetError(f"'{path}' is not UTF-8 text") from None
    return parse_manifest(text, str(path))


def recipe_hash(cfg: DataPrepConfig, sources: list[Source], tokenizer_sha: str | None) -> str:
    """Identity of what a run will produce: the content config, the exact input files (path and size) and,
    when one is given, the tokenizer's bytes. Resume (with the same RECIPE_VERSION, `work_recipe`) and "already
    complete" both require it to match."""
    return config_hash({
        "config": cfg.content(),
        "sources": [[s.url, s.size] for s in sources],
        "tokenizer": tokenizer_sha,
    })


def what_changed(manifest: dict, cfg: DataPrepConfig, sources: list[Source]) -> str:
    """How this run's recipe differs from the finished dataset's `manifest`: changed config keys (old -> new) and
    input files added, removed or of another size; empty when it cannot tell (e.g. only a given tokenizer's bytes)."""
    said = config_changes(manifest.get("config") or {}, cfg.content())
    before = {s["path"]: s["bytes"] for s in manifest.get("sources") or []}
    now = {s.url: s.size for s in sources}
    added, gone = sorted(set(now) - set(before)), sorted(set(before) - set(now))
    resized = sorted(p for p in set(now) & set(before) if now[p] != before[p])
    for what, names in (("new input", added), ("input gone", gone), ("input of another size", resized)):
        if names:
            said.append(f"{what}: {', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}")
    return "; ".join(said[:6]) + ("; ..." if len(said) > 6 else "")


def work_recipe(work_config: object) -> str:
    """The recipe an unfinished dataset's work config (parsed) can be resumed as: its recipe hash when this code
    makes its kind of examples (RECIPE_VERSION), else one no run matches ('' when it is damaged)."""
    if not isinstance(work_config, dict):
        return ""
    recipe, version = str(work_config.get("recipe_hash") or ""), work_config.get("recipe_version", 1)
    return recipe if version == RECIPE_VERSION else f"{recipe} (recipe version {version})"


def older_recipe(manifest: dict) -> str | None:
    """A note for a finished dataset made by a data_prep whose examples differ from this one's (None: the same)."""
    version = manifest.get("recipe_version", 1)
    if version == RECIPE_VERSION:
        return None
    return (f"note: this dataset was made by a data_prep of recipe version {version}, this one makes "
            f"{RECIPE_VERSION}: from the same config and files its examples would differ a little. It is kept as it "
            "is; --overwrite (in a job: deleting it) makes it again")


def unfinished_other(output: str | Path) -> DatasetError:
    """The refusal of an output that holds another run's unfinished dataset, with shards written already."""
    return DatasetError(f"'{output}' holds an unfinished dataset made with a different config, different input "
                        "files or another version of data_prep, with shards already written. Pass --overwrite to "
                        "discard it, or rerun it as it was started.", UNFINISHED)


def prepare_output(root: Path, recipe: str, overwrite: bool, changed=None) -> str:
    """Decide what to do with `root`: 'complete' (nothing to do), 'resume' or 'fresh'. `changed(manifest)` says how
    this run differs from a finished dataset found there (for the refusal)."""
    if root.exists() and not root.is_dir():
        raise DatasetError(f"output '{root}' is a file; give a directory (new or empty) for the dataset")
    work_cfg = root / WORK / "config.json"
    if (root / MANIFEST).is_file() and not overwrite:
        try:
            manifest = read_manifest(root)
        except DatasetError as e:
            raise DatasetError(f"{e}; pass --overwrite to replace the dataset there", DELETE_IT) from None
        if manifest.get("recipe_hash") == recipe:
            shutil.rmtree(root / WORK, ignore_errors=True)  # left over if a finished run was killed while tidying
            return "complete"
        diff = (changed(manifest) if changed else "") or "its config or its input files differ from this run's"
        raise DatasetError(f"'{root}' already holds a different dataset ({diff}). Choose another output, or pass "
                           "--overwrite to replace it.", DELETE_IT)
    elif work_cfg.is_file():
        try:
            same = work_recipe(json.loads(work_cfg.read_text(encoding="utf-8"))) == recipe
        except ValueError:  # damaged: as good as another run's
            same = False
        if same and not overwrite:
            return "resume"
        if not overwrite and any((root / WORK / "units").glob("*.json")):
            raise unfinished_other(root)
        clear(root)  # nothing finished yet (e.g. the tokenizer step failed): start over, stray shards too
        return "fresh"
    elif root.exists() and any(root.iterdir()) and not overwrite:
        strangers = sorted(p.name for p in root.iterdir())[:5]
        raise DatasetError(
            f"'{root}' is not empty and is not a dataset directory (holds {', '.join(strangers)}). "
            "Choose an empty or new output directory, or pass --overwrite.", NOT_A_DATASET)
    if overwrite:
        clear(root)
    return "fresh"


def foreign(names: list[str]) -> list[str]:
    """Of the files in an output (paths relative to it, `/`-separated), those inside the dataset's folders
    (train/, val/, tokenizer/) that a dataset does not consist of: --overwrite would mix them into the new one."""
    out = []
    for name in names:
        folder, _, rest = name.partition("/")
        if folder in OWNED_IN and not OWNED_IN[folder].fullmatch(rest):
            out.append(name)
    return out


def _files_in_folders(root: Path) -> list[str]:
    """The files in (or named as) the dataset's folders under `root`, relative to it."""
    found = []
    for folder in OWNED_IN:
        p = root / folder
        found += ([q.relative_to(root).as_posix() for q in sorted(p.rglob("*")) if not q.is_dir()] if p.is_dir()
                  else [folder] if p.exists() else [])
    return found


def refuse_foreign(where: str, names: list[str]) -> None:
    strangers = foreign(names)
    if strangers:
        more = f" and {len(strangers) - 5} more" if len(strangers) > 5 else ""
        raise DatasetError(
            f"'{where}' holds files a dataset does not consist of ({', '.join(strangers[:5])}{more}); nothing was "
            f"removed. Move them out of {', '.join(f'{f}/' for f in OWNED_IN)}, or choose another output."
        )


def clear(root: Path) -> None:
    """Remove what a dataset consists of (manifest first, so it stops existing at once) and the work in progress;
    other files stay. Refused, before anything is removed, where the dataset's folders hold files of their own:
    they would be mixed into the new dataset."""
    if root.is_dir():
        refuse_foreign(str(root), _files_in_folders(root))
    for name in OWNED_FILES:
        (root / name).unlink(missing_ok=True)
    shutil.rmtree(root / WORK, ignore_errors=True)
    for folder in OWNED_IN:
        if (root / folder).is_dir():
            shutil.rmtree(root / folder)  # (past the check: the dataset's own files, and empty folders)


def build_report(records: list[dict]) -> dict:
    counts: Counter = Counter()
    hist = None
    issues: Counter = Counter()
    files = []
    for r in records:
        counts.update(r["counts"])
        h = r["length_histogram"]
        hist = h["counts"] if hist is None else [a + b for a, b in zip(hist, h["counts"])]
        for f in r["files"]:
            issues.update(f["issues"])
            files.append(f)
    examples = counts["train_examples"] + counts["val_examples"]
    width = records[0]["length_histogram"]["bin_width"] if records else 1
    return {
        "documents": counts["documents"],
        "sentences": counts["sentences"],
        "tokens": counts["document_tokens"],
        "examples": {s: counts[f"{s}_examples"] for s in SPLITS},
        "example_tokens": {s: counts[f"{s}_tokens"] for s in SPLITS},
        "nsp": {
            "examples": counts["nsp_examples"],
            "random_next_fraction": round(counts["nsp_random_next"] / counts["nsp_examples"], 4)
            if counts["nsp_examples"] else None,
            # pools of a single document (a unit's split that holds one): their random next segments are its own
            "single_document_pools": counts["single_document_pools"],
            # sentences longer than an example, cut into parts that pair with each other
            "long_sentences_cut": counts["long_sentences_cut"],
        },
        "truncation_rate": round(counts["truncated_examples"] / examples, 4) if examples else 0.0,
        "length_histogram": {
            "bin_width": width,
            "counts": {f"{i * width + 1}-{(i + 1) * width}": c for i, c in enumerate(hist or [])},
        },
        "bad_input": dict(sorted(issues.items())),
        "files": files,
    }


def build_manifest(cfg: DataPrepConfig, sources: list[Source], tokenizer_sha: str, vocab_size: int,
                   records: list[dict], recipe: str, tokenizer_type: str | None = None) -> dict:
    """The manifest; `tokenizer_type` is the model file's own (a given tokenizer.path's may differ from the
    config's tokenizer.model_type)."""
    shards = sorted((s for r in records for s in r["shards"]), key=lambda s: s["name"])
    splits = {}
    for split in SPLITS:
        mine = [s for s in shards if s["name"].startswith(split + "/")]
        splits[split] = {
            "examples": sum(s["examples"] for s in mine),
            "tokens": sum(s["tokens"] for s in mine),
            "shards": mine,
        }
    # The id names the bytes (the tokenizer and every shard), not how the config spelt its inputs: the same data
    # built from `corpus/` and from `/abs/path/corpus/` is one dataset, to resume and compare checkpoints on.
    identity = hashlib.sha256(json.dumps([tokenizer_sha, [s["name"] + ":" + s["sha256"] for s in shards]])
                              .encode()).hexdigest()
    return {
        "format": FORMAT,
        "dataset_id": identity[:16],
        "config_hash": cfg.content_hash(),
        "recipe_hash": recipe,
        "recipe_version": RECIPE_VERSION,
        # Every key that shapes the bytes; `output` and `ray.*` are not part of a dataset's identity.
        "config": cfg.content(),
        "sources": [{"path": s.url, "bytes": s.size} for s in sources],
        "tokenizer": {
            "file": f"{TOKENIZER_DIR}/{TOKENIZER_MODEL}",
            "sha256": tokenizer_sha,
            "vocab_size": vocab_size,
            "model_type": tokenizer_type or cfg.tokenizer.model_type,
            "special_ids": {p: i for i, p in enumerate(SPECIAL_PIECES)},
        },
        "examples": {
            "max_seq_length": cfg.examples.max_seq_length,
            "max_predictions_per_seq": cfg.examples.max_predictions_per_seq,
            "nsp": cfg.examples.nsp,
            "whole_word_mask": cfg.examples.whole_word_mask,
            "token_dtype": token_dtype(vocab_size).str,
            "position_dtype": POSITION_DTYPE.str,
        },
        "splits": splits,
    }


def verify(root: str | Path) -> list[str]:
    """Re-hash every shard and the tokenizer against the manifest; returns the problems found (empty = good)."""
    root = Path(root)
    manifest = read_manifest(root)
    problems = []
    listed = set()
    entries = [(s["name"], s["sha256"], s.get("bytes")) for sp in manifest["splits"].values() for s in sp["shards"]]
    tok = manifest["tokenizer"]
    entries.append((tok["file"], tok["sha256"], None))
    for name, sha, size in entries:
        listed.add(name)
        p = root / name
        if not p.is_file():
            problems.append(f"{name}: missing")
            continue
        if size is not None and p.stat().st_size != size:
            problems.append(f"{name}: {p.stat().st_size} bytes, manifest says {size}")
            continue
        if sha256_file(p) != sha:
            problems.append(f"{name}: sha256 differs from the manifest")
    for split in SPLITS:
        for p in sorted((root / split).glob("*")) if (root / split).is_dir() else []:
            rel = f"{split}/{p.name}"
            if rel not in listed:
                what = "an unfinished shard" if p.name.endswith(PARTIAL_SUFFIX) else "not in the manifest"
                problems.append(f"{rel}: {what}")
    return problems
