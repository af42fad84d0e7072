"""A small English corpus built on any machine from the Python standard library's own documentation, and a
classification task made from it.

Module, class and function docstrings (read from the stdlib sources with `ast`, nothing imported) become
`.jsonl` documents; the help topics in `pydoc_data` become a Google-format `.txt` (one sentence per line,
a blank line between documents). No download, nothing copied into the repository, and the same bytes
every time on the same Python.

The task (`write_demo_task`): is a sentence from a docstring or from a help topic of the language reference?
Balanced, disjoint train and test files of whole sentences, in the format `pretrain finetune` reads.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import sysconfig
from pathlib import Path
from typing import Iterator

from data_prep.segment import split_sentences

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}


def _docstrings(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                yield doc


def stdlib_documents(limit_bytes: int) -> Iterator[tuple[str, str]]:
    """(module path, text) for stdlib modules in sorted order, until about `limit_bytes` of text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            paragraphs = [p.strip() for d in _docstrings(tree) for p in d.split("\n\n") if p.strip()]
            text = "\n".join(" ".join(p.split()) for p in paragraphs)
            if text.count(".") < 2:
                continue
            yield str(path.relative_to(root)), text
            total += len(text)
            if total >= limit_bytes:
                return


def write_demo_corpus(out_dir: str | Path, max_mb: float = 4.0) -> list[Path]:
    """Write `stdlib_docstrings.jsonl` and `pydoc_topics.txt` under `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "stdlib_docstrings.jsonl"
    with open(jsonl.with_suffix(".partial"), "w", encoding="utf-8") as f:
        for module, text in stdlib_documents(int(max_mb * 1e6)):
            f.write(json.dumps({"id": module, "text": text}, ensure_ascii=False) + "\n")
    os.replace(jsonl.with_suffix(".partial"), jsonl)
    txt = out / "pydoc_topics.txt"
    from pydoc_data.topics import topics

    with open(txt.with_suffix(".partial"), "w", encoding="utf-8") as f:
        for key in sorted(topics):
            sentences = [s for p in topics[key].split("\n\n") for s in split_sentences(" ".join(p.split()))]
            if len(sentences) >= 2:
                f.write("\n".join(sentences) + "\n\n")
    os.replace(txt.with_suffix(".partial"), txt)
    return [jsonl, txt]


_LAYOUT = re.compile(r"[-=+*~^]{4,}|\|\s*\|")  # a table's borders or a heading's rule, flattened into a line


def demo_sentences(corpus: str | Path) -> dict[str, list[str]]:
    """The demo corpus's sentences by source ("docstring", "reference"), 40-240 characters, de-duplicated, none
    in both, none with the layout of a table or a heading (markup would tell the classes apart, not the words;
    6% of the reference sentences are such fragments)."""
    corpus = Path(corpus)
    doc, ref = set(), set()
    for line in (corpus / "stdlib_docstrings.jsonl").read_text(encoding="utf-8").splitlines():
        doc.update(split_sentences(" ".join(json.loads(line)["text"].split())))
    ref.update(line.strip() for line in (corpus / "pydoc_topics.txt").read_text(encoding="utf-8").splitlines())
    both = doc & ref
    return {label: sorted(s for s in texts - both if 40 <= len(s) <= 240 and not _LAYOUT.search(s))
            for label, texts in (("docstring", doc), ("reference", ref))}


def write_demo_task(corpus: str | Path, out_dir: str | Path, n_train: int = 2000, n_test: int = 1000,
                    seed: int = 0) -> list[Path]:
    """Write `train.jsonl` and `test.jsonl` ({"text", "label"} rows, half of each class) under `out_dir` from the
    demo corpus at `corpus`; returns their paths. ValueError when the corpus has too few sentences of a class."""
    rng = random.Random(seed)
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    for label, texts in demo_sentences(corpus).items():
        per_class = (n_train + n_test) // 2
        if len(texts) < per_class:
            raise ValueError(f"{corpus} has {len(texts)} {label} sentences; ask for at most {2 * len(texts)} rows "
                             "in all")
        picked = rng.sample(texts, per_class)
        rows["train"] += [{"text": t, "label": label} for t in picked[: n_train // 2]]
        rows["test"] += [{"text": t, "label": label} for t in picked[n_train // 2:]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, items in rows.items():
        rng.shuffle(items)
        path = out / f"{split}.jsonl"
        path.with_suffix(".partial").write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
        os.replace(path.with_suffix(".partial"), path)
        paths.append(path)
    return paths
