"""The work of one unit (a group of input files), as plain functions: sample sentences, or write its shards.

No Ray here: `pipeline.py` runs these as Ray tasks, tests call them directly. A unit's output depends
only on the config, the tokenizer and the unit's own files, so units can run anywhere, in any order,
any number of times.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from data_prep.config import DataPrepConfig
from data_prep.examples import (
    ExampleParams, create_pairs, create_segments, doc_rng, mask_example, unit_fraction,
)
from data_prep.shards import ShardWriter, encode_sample
from data_prep.sources import DocumentReader, FileReport, Source
from data_prep.tokenizer import load as load_tokenizer
from data_prep.tokenizer import word_start_table

SPLITS = ("train", "val")
HISTOGRAM_BINS = 16


@dataclass(frozen=True)
class Unit:
    index: int
    sources: tuple[Source, ...]

    @property
    def bytes(self) -> int:
        return sum(s.size for s in self.sources)


def plan_units(sources: list[Source], group_bytes: int) -> list[Unit]:
    """Consecutive files (in sorted order) grouped up to `group_bytes`; a bigger file is a unit of its own."""
    units: list[Unit] = []
    group: list[Source] = []
    size = 0
    for s in sources:
        if group and size + s.size > group_bytes:
            units.append(Unit(len(units), tuple(group)))
            group, size = [], 0
        group.append(s)
        size += s.size
    if group:
        units.append(Unit(len(units), tuple(group)))
    return units


def read_unit(unit: Unit, cfg: DataPrepConfig) -> tuple[Iterator[list[str]], list[FileReport]]:
    """All documents of a unit in order, and the per-file reports that fill up as they are read."""
    readers = [
        DocumentReader(s, cfg.text_field, cfg.read.split_sentences, cfg.read.max_line_bytes,
                       cfg.read.min_sentence_chars)
        for s in unit.sources
    ]
    return (doc for r in readers for doc in r), [r.report for r in readers]


def sample_unit(unit: Unit, cfg: DataPrepConfig, total_bytes: int) -> list[str]:
    """A reservoir sample of this unit's sentences, sized by its share of the corpus bytes (tokenizer training)."""
    quota = max(1, math.ceil(cfg.tokenizer.sample_sentences * unit.bytes / max(1, total_bytes)))
    rng = doc_rng(cfg.seed, unit.index, -1, -1)
    reservoir: list[str] = []
    seen = 0
    docs, _ = read_unit(unit, cfg)
    for doc in docs:
        for sentence in doc:
            seen += 1
            if len(reservoir) < quota:
                reservoir.append(sentence)
            else:
                j = rng.randrange(seen)
                if j < quota:
                    reservoir[j] = sentence
    return reservoir


class UnitStats:
    """Counts gathered while writing one unit; summed across units into report.json."""

    def __init__(self, max_seq_length: int):
        self.counts: Counter = Counter()
        self.bin_width = max(1, math.ceil(max_seq_length / HISTOGRAM_BINS))
        self.lengths = [0] * HISTOGRAM_BINS

    def example(self, split: str, n_tokens: int, is_random: bool | None, truncated: bool) -> None:
        c = self.counts
        c[f"{split}_examples"] += 1
        c[f"{split}_tokens"] += n_tokens
        c["truncated_examples"] += truncated
        if is_random is not None:
            c["nsp_random_next"] += is_random
            c["nsp_examples"] += 1
        self.lengths[min(HISTOGRAM_BINS - 1, (n_tokens - 1) // self.bin_width)] += 1


def write_unit(unit: Unit, cfg: DataPrepConfig, tokenizer_path: str, out_dir: str) -> dict:
    """Tokenize a unit, make its examples, write its shards; returns the unit record (see `finish_record`)."""
    sp = load_tokenizer(tokenizer_path)
    params = ExampleParams.from_config(cfg.examples, sp.GetPieceSize())
    word_start = word_start_table(sp) if cfg.examples.whole_word_mask else None
    root = Path(out_dir)
    writers = {s: ShardWriter(root, s, unit.index, cfg.shards.examples_per_shard) for s in SPLITS}
    stats = UnitStats(cfg.examples.max_seq_length)
    docs, reports = read_unit(unit, cfg)
    pools: dict[str, list] = {s: [] for s in SPLITS}
    window = 0

    def flush(split: str) -> None:
        nonlocal window
        pool = pools[split]
        if pool:
            # One batched encode per pool: ~2x the per-document call rate of sentencepiece.
            flat = sp.Encode([s for _, d in pool for s in d], num_threads=1)
            tokenized, k = [], 0
            for doc_index, doc in pool:
                tokenized.append((doc_index, [t for t in flat[k:k + len(doc)] if t]))
                k += len(doc)
            stats.counts["document_tokens"] += sum(map(len, flat))
            _write_window(tokenized, window, unit, cfg, params, word_start, writers[split], stats, split)
            window += 1
        pools[split] = []

    for doc_index, doc in enumerate(docs):
        stats.counts["documents"] += 1
        stats.counts["sentences"] += len(doc)
        split = "val" if unit_fraction(cfg.seed, "split", unit.index, doc_index) < cfg.val_fraction else "train"
        pools[split].append((doc_index, doc))
        if len(pools[split]) >= cfg.examples.pool_documents:
            flush(split)
    for split in SPLITS:
        flush(split)
    shards = [asdict(info) for s in SPLITS for info in writers[s].close()]
    return {
        "unit": unit.index,
        "sources": [s.url for s in unit.sources],
        "counts": dict(stats.counts),
        "length_histogram": {"bin_width": stats.bin_width, "counts": stats.lengths},
        "files": [r.to_json() for r in reports],
        "shards": shards,
    }


def _write_window(pool: list, window: int, unit: Unit, cfg: DataPrepConfig, params: ExampleParams,
                  word_start: bytes | None, writer: ShardWriter, stats: UnitStats, split: str) -> None:
    """Examples of one pool of documents (all copies), shuffled within the pool, appended to the shards."""
    docs = [d for _, d in pool]
    made = []
    for copy in range(cfg.examples.dupe_factor):
        for pos, (doc_index, doc) in enumerate(pool):
            if not doc:
                continue
            rng = doc_rng(cfg.seed, unit.index, doc_index, copy)
            examples = create_pairs(docs, pos, params, rng) if params.nsp else create_segments(doc, params, rng)
            for ex in examples:
                input_ids, positions, labels = mask_example(ex, params, rng, word_start)
                nsp_label = None if ex.is_random_next is None else int(ex.is_random_next)
                made.append((encode_sample(input_ids, ex.b_start, positions, labels, nsp_label),
                             len(ex.tokens), ex.is_random_next, ex.truncated))
    doc_rng(cfg.seed, unit.index, -2, window).shuffle(made)
    for payload, n_tokens, is_random, truncated in made:
        writer.add(payload, n_tokens)
        stats.example(split, n_tokens, is_random, truncated)


def write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
