"""Labelled rows for fine-tuning: jsonl/csv/tsv files -> texts and label ids, the label map, the split, the metrics.

Pure Python, and torch only for the tensors (reading and checking a task, `read_splits`, does not load it): no
model, no I/O beyond reading the task files. Errors name the file, the line and the config key to change.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import random
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import fsspec

from data_prep.sources import zstd_reader
from pretrain.config import TaskConfig

if TYPE_CHECKING:
    import torch


class TaskError(Exception):
    """A task file that cannot be used; the message names the file and line and says what to do."""


@dataclass
class Rows:
    """One split: `texts[i]` (and `pairs[i]` for pair tasks) with raw label `labels[i]`; `where[i]` is FILE:LINE;
    `ids[i]` is the label's class id, once `read_splits` has checked the labels."""

    source: str
    texts: list[str] = field(default_factory=list)
    pairs: list[str] | None = None
    labels: list = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int], source: str) -> Rows:
        return Rows(source, [self.texts[i] for i in idx], [self.pairs[i] for i in idx] if self.pairs else None,
                    [self.labels[i] for i in idx], [self.where[i] for i in idx],
                    [self.ids[i] for i in idx] if self.ids is not None else None)


def _or_none(key: str) -> str:
    """How to do without the task file at config key `key` (the validation and test files are optional)."""
    return f", or {key}=null for none" if key != "task.train" else ""


def _records(path: str, key: str = "task.train"):
    """(FILE:LINE, dict) for each row of a jsonl, json (JSON lines, or one array of objects), csv or tsv file (by
    extension, after any .gz/.zst/...)."""
    name = path.lower()
    for ext in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(ext)
    raw = None  # (the compressed file under a .zst reader, which leaves closing it to its opener)
    try:  # utf-8-sig: also a file saved with a byte-order mark (Excel's "CSV UTF-8")
        if path.lower().endswith(".zst"):  # (data prep's reader: fsspec's choice of zstd library varies by version)
            raw = fsspec.open(path, "rb").open()
            f = io.TextIOWrapper(zstd_reader(raw), encoding="utf-8-sig")
        else:
            f = fsspec.open(path, "rt", encoding="utf-8-sig", compression="infer").open()
    except (OSError, ValueError) as e:
        raise TaskError(f"{key}: cannot open task file {path}: {e} (set {key} to the file{_or_none(key)})") from None
    n = 0
    try:
        with f, raw or contextlib.nullcontext():
            if name.endswith((".jsonl", ".json", ".ndjson")):
                rows = 0
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if not rows and line.lstrip().startswith("[") and name.endswith(".json"):
                        yield from _json_array(path, line + f.read())
                        return
                    rows += 1
                    try:
                        rec = json.loads(line)
                    except ValueError as e:
                        raise TaskError(f"{path}:{n}: not a JSON object ({e}); jsonl files hold one object per "
                                        "line (a .json file: that, or one array of objects)") from None
                    if not isinstance(rec, dict):
                        raise TaskError(f"{path}:{n}: a {type(rec).__name__}, not a JSON object")
                    yield f"{path}:{n}", rec
            elif name.endswith((".csv", ".tsv")):
                # tsv: no quoting (a quote is part of the text, as tab-separated files from most tools mean it);
                # csv: quoted fields may hold commas and line breaks
                tsv = name.endswith(".tsv")
                csv.field_size_limit(max(csv.field_size_limit(), 16 << 20))  # (128 KiB by default: long documents)
                reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
                header = next(reader, None)
                for fields in reader:
                    n = reader.line_num
                    if not any(fields):
                        continue
                    if len(fields) != len(header):
                        sep = "tabs" if tsv else "commas (quote a field that holds one)"
                        raise TaskError(f"{path}:{n}: {len(fields)} fields where the header has {len(header)} "
                                        f"({', '.join(header)}); check the row's {sep}")
                    yield f"{path}:{n}", dict(zip(header, fields))
            else:
                raise TaskError(f"{path}: unknown format; task files end in .jsonl, .json, .csv or .tsv "
                                "(optionally .gz, .bz2, .xz or .zst)")
    except csv.Error as e:  # (an unclosed quote runs to the end of the file, into a field past the size limit)
        raise TaskError(f"{path}, after line {n}: {e}: a quoted field runs on from there (its closing quote "
                        "missing?), or a field holds more than 16 MB") from None
    except UnicodeDecodeError as e:
        where = _first_bad_line(path) or (f"{path}, after line {n}" if n else path)
        raise TaskError(f"{where}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the file as UTF-8") \
            from None
    except (EOFError, OSError) as e:  # a truncated or damaged compressed file (gzip, bz2, lzma, zstd alike)
        if isinstance(e, OSError) and e.errno is not None:
            raise  # (the disk or the network, not the file's bytes)
        raise TaskError(f"{path}: cannot be read after line {n} ({type(e).__name__}: {e}); compress it again") \
            from None


def _first_bad_line(path: str) -> str | None:
    """FILE:LINE of the first byte that is not UTF-8 (text is decoded a block at a time, ahead of the lines read,
    so the reader's own count is too early); None where the file cannot be read again whole."""
    try:
        if path.lower().endswith(".zst"):
            with fsspec.open(path, "rb") as raw:
                data = zstd_reader(raw).read()
        else:
            with fsspec.open(path, "rb", compression="infer") as f:
                data = f.read()
        data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        return f"{path}:{line}"
    except Exception:  # noqa: BLE001 (only a hint: the error itself is reported anyway)
        return None
    return None


def _json_array(path: str, text: str):
    """(FILE[item N], dict) for each object of a .json file that holds one array."""
    try:
        items = json.loads(text)
    except ValueError as e:
        raise TaskError(f"{path}: not valid JSON ({e})") from None
    for i, rec in enumerate(items if isinstance(items, list) else [items], 1):
        if not isinstance(rec, dict):
            raise TaskError(f"{path}[item {i}]: a {type(rec).__name__}, not a JSON object")
        yield f"{path}[item {i}]", rec


def read_rows(path: str, cfg: TaskConfig, key: str = "task.train") -> Rows:
    """Every row of `path` (the config's `key`), checked: the text fields are non-empty strings and the label is a
    class name or an integer."""
    wanted = [cfg.text_field] + ([cfg.text_pair_field] if cfg.text_pair_field else [])
    rows = Rows(path, pairs=[] if cfg.text_pair_field else None)
    for where, rec in _records(path, key):
        for field, setting in ((cfg.text_field, "task.text_field"), (cfg.text_pair_field, "task.text_pair_field"),
                               (cfg.label_field, "task.label_field")):
            if field and field not in rec:
                fix = f"set {setting} to the right name"
                if setting == "task.label_field" and key != "task.train":  # (a file of unlabelled rows, likely)
                    fix = (f"{key}'s rows are scored against their labels: give each its label in a field "
                           f"'{field}' (task.label_field, as in the training file){_or_none(key)}")
                raise TaskError(f"{where}: no field '{field}' (the row has: {', '.join(map(str, rec)) or 'nothing'}); "
                                + fix)
        for field in wanted:
            if not isinstance(rec[field], str):
                raise TaskError(f"{where}: field '{field}' is {type(rec[field]).__name__}, not text")
            if not rec[field].strip():
                raise TaskError(f"{where}: field '{field}' is empty; remove the row or give it its text")
        label = rec[cfg.label_field]
        if label is None or label == "" or isinstance(label, (dict, list, float, bool)):
            raise TaskError(f"{where}: label {label!r} in field '{cfg.label_field}' is not a class name or integer")
        if isinstance(label, str) and label != label.strip():
            raise TaskError(f"{where}: label {label!r} in field '{cfg.label_field}' has spaces around it (another "
                            "class than without them); remove them")
        rows.texts.append(rec[cfg.text_field])
        if rows.pairs is not None:
            rows.pairs.append(rec[cfg.text_pair_field])
        rows.labels.append(label)
        rows.where.append(where)
    if not rows.texts:
        raise TaskError(f"{key}: task file {path} holds no rows (set {key} to a file with rows{_or_none(key)})")
    return rows


def _order(label) -> tuple:
    """Integers (and integer strings, as csv gives them) in numeric order, then names alphabetically."""
    text = str(label)
    return (0, int(text), "") if text.lstrip("-").isdecimal() else (1, 0, text)


def label_names(train: Rows) -> list:
    """The classes of the task in a stable order: id i <-> names[i] (saved with the model)."""
    seen = {str(v): v for v in train.labels}
    if len(seen) < 2:
        raise TaskError(f"{train.source} has a single label ({next(iter(seen))!r}); classification needs two or more")
    return [seen[k] for k in sorted(seen, key=_order)]


def label_index(rows: Rows, names: list, train_source: str) -> list[int]:
    """The class id of each row; a label the training file never shows is an error naming its row."""
    index = {str(v): i for i, v in enumerate(names)}
    out = []
    for label, where in zip(rows.labels, rows.where, strict=True):
        if str(label) not in index:
            raise TaskError(f"{where}: label {label!r} does not occur in {train_source} "
                            f"(its labels: {', '.join(map(str, names[:20]))})")
        out.append(index[str(label)])
    return out


def read_splits(task: TaskConfig) -> tuple[list, Rows, Rows | None, Rows | None]:
    """(class names, train, validation, test rows) from the task files, every label checked against the training
    file's and its class id set in `ids` (TaskError names the file and line). Torch-free: `cluster validate` asks
    it."""
    train = read_rows(task.train, task)
    names = label_names(train)
    val = read_rows(task.validation, task, "task.validation") if task.validation else None
    test = read_rows(task.test, task, "task.test") if task.test else None
    for rows in (train, val, test):
        if rows is not None:
            rows.ids = label_index(rows, names, task.train)
    return names, train, val, test


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): `fraction` of each class (at least one where it has two rows)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    keep, held = [], []
    for c in sorted(by_class):
        idx = by_class[c]
        rng.shuffle(idx)
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held += idx[:k]
        keep += idx[k:]
    return sorted(keep), sorted(held)


def scores(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 from a (K, K) confusion matrix (rows: true class, columns: predicted).

    Macro-F1 averages the per-class F1 over the classes that occur as truth or prediction (as
    scikit-learn's default labels do), so a class absent from a small split does not count as 0.
    """
    c = confusion.double()
    tp = c.diag()
    support, predicted = c.sum(1), c.sum(0)
    present = (support + predicted) > 0
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    total = float(c.sum())
    return {"accuracy": float(tp.sum()) / total if total else 0.0,
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0}
