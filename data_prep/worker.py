"""The work of one unit (a group of input files), as plain functions: sample sentences, or write its shards.

No Ray here: `pipeline.py` runs these as Ray tasks, tests call them directly. A unit's output depends
only on the config, the tokenizer and the unit's own files, so units can run anywhere, in any order,
any number of times.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from data_prep import storage
from data_prep.config import DataPrepConfig
from data_prep.examples import Example, ExampleParams, Pool, create_pairs, create_segments, doc_rng, unit_fraction
from data_prep.masking import mask_batch, noise_bytes
from data_prep.shards import POSITION_DTYPE, ShardWriter, encode_sample, token_dtype, write_whole
from data_prep.sources import MAX_DOCUMENT_CHARS, DocumentReader, FileReport, Source
from data_prep.tokenizer import cached as cached_tokenizer

SPLITS = ("train", "val")
HISTOGRAM_BINS = 16
# A pool is also full at this many characters of text (about 20 bytes each once encoded and made into examples; a
# worker holds two pools of each split): pools of a corpus of long documents stay bounded, not only in count.
MAX_POOL_CHARS = 16 * MAX_DOCUMENT_CHARS


@dataclass(frozen=True)
class Unit:
    """A group of consecutive input files: one Ray task, one series of shards."""

    index: int
    sources: tuple[Source, ...]
    group_bytes: int = 0  # stands in for a file whose size is unknown (size < 0)

    @property
    def bytes(self) -> int:
        return sum(s.size if s.size >= 0 else self.group_bytes for s in self.sources)


def plan_units(sources: list[Source], group_bytes: int) -> list[Unit]:
    """Consecutive files (in sorted order) grouped up to `group_bytes`; a bigger file, or one whose size is
    unknown, is a unit of its own."""
    units: list[Unit] = []
    group: list[Source] = []
    size = 0
    for s in sources:
        weight = s.size if s.size >= 0 else group_bytes
        if group and size + weight > group_bytes:
            units.append(Unit(len(units), tuple(group), group_bytes))
            group, size = [], 0
        group.append(s)
        size += weight
    if group:
        units.append(Unit(len(units), tuple(group), group_bytes))
    return units


def read_unit(unit: Unit, cfg: DataPrepConfig) -> tuple[Iterator[list[str]], list[FileReport]]:
    """All documents of a unit in order, and the per-file reports that fill up as they are read."""
    readers = [
        DocumentReader(s, cfg.text_field, cfg.read.split_sentences, cfg.read.max_line_bytes,
                       cfg.read.min_sentence_chars)
        for s in unit.sources
    ]
    return (doc for r in readers for doc in r), [r.report for r in readers]


def sample_unit(unit: Unit, cfg: DataPrepConfig, quotas: Mapping[int, int]) -> dict:
    """A reservoir sample of up to `quotas[unit.index]` of this unit's sentences (tokenizer training):
    {"sentences": [...], "seen": how many sentences the unit has, "empty": why each file that gave no sentence
    gave none}."""
    quota = quotas[unit.index]
    rng = doc_rng(cfg.seed, unit.index, -1, -1)
    reservoir: list[str] = []
    seen = 0
    docs, reports = read_unit(unit, cfg)
    for doc in docs:
        for sentence in doc:
            seen += 1
            if len(reservoir) < quota:
                reservoir.append(sentence)
            else:
                j = int(rng.random() * seen)
                if j < quota:
                    reservoir[j] = sentence
    return {"sentences": reservoir, "seen": seen, "empty": [why_empty(r) for r in reports if not r.sentences]}


def why_empty(report: FileReport) -> str:
    """`path: 542 lines missing_field (first at line 1: no 'text' (set text_field))`, or that it has no text."""
    if not report.issues:
        return f"{report.path}: no sentences (read.min_sentence_chars or shorter text?)"
    issue, n = report.issues.most_common(1)[0]
    first = next((s for s in report.samples if s["issue"] == issue), {})
    at = f"line {first['line']}: " if first.get("line") else ""
    return f"{report.path}: {n:,} x {issue}" + (f" (first at {at}{first['detail']})" if first.get("detail") or at
                                                else "")


class UnitStats:
    """Counts gathered while writing one unit; summed across units into report.json."""

    def __init__(self, max_seq_length: int):
        self.counts: Counter = Counter()
        self.bin_width = max(1, math.ceil(max_seq_length / HISTOGRAM_BINS))
        self.lengths = np.zeros(HISTOGRAM_BINS, np.int64)

    def window(self, split: str, examples: list[Example], lengths: np.ndarray) -> None:
        c = self.counts
        c[f"{split}_examples"] += len(examples)
        c[f"{split}_tokens"] += int(lengths.sum())
        c["truncated_examples"] += sum(e.truncated for e in examples)
        if examples and examples[0].is_random_next is not None:
            c["nsp_random_next"] += sum(e.is_random_next for e in examples)
            c["nsp_examples"] += len(examples)
        bins = np.minimum(HISTOGRAM_BINS - 1, (lengths - 1) // self.bin_width)
        self.lengths += np.bincount(bins, minlength=HISTOGRAM_BINS)


def write_unit(unit: Unit, cfg: DataPrepConfig, tokenizer_path: str, out_dir: str) -> dict:
    """Tokenize a unit, make its examples, write its shards; returns the unit's record (counts, files, shards)."""
    # The cyclic GC walks every live container each time it runs: with a pool's millions of token
    # lists alive that was ~10% of the task (dev machine). Nothing here makes reference cycles.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _write_unit(unit, cfg, tokenizer_path, out_dir)
    finally:
        if enabled:
            gc.enable()
        gc.collect()  # leave the worker process as clean as it came, for its next task


def _write_unit(unit: Unit, cfg: DataPrepConfig, tokenizer_path: str, out_dir: str) -> dict:
    """`out_dir` (and `tokenizer_path`) may be object-store URLs: shards are then written to a temporary
    directory on this worker's machine and uploaded whole, one object each, before the record returns."""
    t0 = time.perf_counter()
    if storage.is_remote(tokenizer_path):
        tokenizer_path = storage.local_copy(tokenizer_path)
    # (loaded once per worker process)
    sp, table = cached_tokenizer(tokenizer_path, "tokenizer.path" if cfg.tokenizer.path else
                                 "the tokenizer trained for this dataset (delete it to train it again)")
    params = ExampleParams.from_config(cfg.examples, sp.GetPieceSize())
    word_start = table if cfg.examples.whole_word_mask else None
    remote = out_dir if storage.is_remote(out_dir) else None
    with storage.scratch(f"unit-{unit.index:06d}-") if remote else contextlib.nullcontext(Path(out_dir)) as root:
        writers = {s: ShardWriter(root, s, unit.index, cfg.shards.examples_per_shard) for s in SPLITS}
        try:
            record = _fill(unit, cfg, sp, params, word_start, writers, t0)
            if remote:
                for shard in record["shards"]:
                    storage.upload(root / shard["name"], storage.join(remote, shard["name"]))
            return record
        except BaseException:
            for w in writers.values():  # a retry may run in this same process: leave no writer behind
                w.abort()
            raise


def _fill(unit: Unit, cfg: DataPrepConfig, sp, params: ExampleParams, word_start: bytes | None,
          writers: dict[str, ShardWriter], t0: float) -> dict:
    stats = UnitStats(cfg.examples.max_seq_length)
    docs, reports = read_unit(unit, cfg)
    pools: dict[str, list] = {s: [] for s in SPLITS}
    chars = dict.fromkeys(SPLITS, 0)  # in each split's pool
    held: dict[str, list] = {s: [] for s in SPLITS}  # each split's last full pool, written once the next one is
    window = 0

    def write(split: str, pool: list) -> None:
        nonlocal window
        if pool:
            # One batched encode per pool: ~2x the per-document call rate of sentencepiece.
            encoded = sp.Encode([s for _, d in pool for s in d], num_threads=1)
            tokens = Pool(encoded, [len(d) for _, d in pool], params.max_seq_length - 3 if params.nsp else None)
            stats.counts["document_tokens"] += len(tokens.flat)
            stats.counts["long_sentences_cut"] += tokens.cut
            if len(pool) == 1 and params.nsp:  # its random next segments can only come from itself
                stats.counts["single_document_pools"] += 1
            _write_window(tokens, [i for i, _ in pool], window, unit, cfg, params, word_start, writers[split],
                          stats, split)
            window += 1

    for doc_index, doc in enumerate(docs):
        stats.counts["documents"] += 1
        stats.counts["sentences"] += len(doc)
        split = "val" if unit_fraction(cfg.seed, "split", unit.index, doc_index) < cfg.val_fraction else "train"
        pools[split].append((doc_index, doc))
        chars[split] += sum(map(len, doc))
        if len(pools[split]) >= cfg.examples.pool_documents or chars[split] >= MAX_POOL_CHARS:
            write(split, held[split])
            held[split], pools[split], chars[split] = pools[split], [], 0
    for split in SPLITS:
        # A last pool of one document joins the full one before it: its "random next" segments need other
        # documents to come from (Google draws them from the whole corpus)
        rest = pools[split]
        if len(rest) < 2 and held[split]:
            write(split, held[split] + rest)
        else:
            write(split, held[split])
            write(split, rest)
    shards = [asdict(info) for s in SPLITS for info in writers[s].close()]
    return {
        "unit": unit.index,
        "sources": [s.url for s in unit.sources],
        "counts": dict(stats.counts),
        "length_histogram": {"bin_width": stats.bin_width, "counts": stats.lengths.tolist()},
        "files": [r.to_json() for r in reports],
        "shards": shards,
        "seconds": round(time.perf_counter() - t0, 3),  # task time, for the job summary (not in report.json)
    }


def _write_window(tokens: Pool, doc_ids: list[int], window: int, unit: Unit, cfg: DataPrepConfig,
                  params: ExampleParams, word_start: bytes | None, writer: ShardWriter, stats: UnitStats,
                  split: str) -> None:
    """Examples of one pool of documents (all copies), masked together, shuffled within the pool, written."""
    make = create_pairs if params.nsp else create_segments
    examples: list[Example] = []
    noise: list[bytes] = []
    for copy in range(cfg.examples.dupe_factor):
        for pos, doc_index in enumerate(doc_ids):
            rng = doc_rng(cfg.seed, unit.index, doc_index, copy)
            made = make(tokens, pos, params, rng)
            examples += made
            noise.append(rng.randbytes(noise_bytes(len(made), params)))  # this document's masking randomness
    if not examples:
        return
    token_matrix, lengths, b_start = tokens.gather(examples, params.max_seq_length)
    batch = mask_batch(token_matrix, lengths, b_start, b"".join(noise), params, word_start)
    shuffle_keys = doc_rng(cfg.seed, unit.index, -2, window).randbytes(4 * len(examples))
    order = np.argsort(np.frombuffer(shuffle_keys, "<u4"), kind="stable").tolist()
    dt = token_dtype(params.vocab_size)
    w, pw = dt.itemsize, POSITION_DTYPE.itemsize
    L, P = params.max_seq_length, params.max_predictions_per_seq
    # Whole matrices to bytes once; each example is then a few slices of them.
    ids = batch.input_ids.astype(dt).tobytes()
    labels = batch.labels.astype(dt).tobytes()
    positions = batch.positions.astype(POSITION_DTYPE).tobytes()
    ns, cs, bs = lengths.tolist(), batch.counts.tolist(), b_start.tolist()
    nsp = [None if e.is_random_next is None else int(e.is_random_next) for e in examples]
    payloads = [
        encode_sample(ids[e * L * w:(e * L + ns[e]) * w], bs[e], positions[e * P * pw:(e * P + cs[e]) * pw],
                      labels[e * P * w:(e * P + cs[e]) * w], nsp[e])
        for e in order
    ]
    writer.add_many(payloads, [ns[e] for e in order])
    stats.window(split, examples, batch.lengths)


def write_json_atomic(path: Path, obj: object) -> None:
    write_whole(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))
