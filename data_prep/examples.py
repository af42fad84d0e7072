"""BERT pretraining examples from tokenized documents: NSP pairs or MLM-only segments (masks: `masking.py`).

Semantics follow Google's `create_pretraining_data.py`: `[CLS] A [SEP] B [SEP]`, a target length that is
shorter with probability `short_seq_prob`, B is a random segment from another document half of the time,
pairs are truncated from a random end of the longer side.

A pool's tokens live in one flat array (`Pool`); an example is two spans of it (A and B), so planning
is integer arithmetic on sentence offsets and no token is copied until `Pool.gather` builds the padded
matrix in one numpy call. (Building per-example token lists cost ~10 us an example, more than
tokenization itself; see tests/benchmarks/RESULTS.md.)

Every function takes its randomness as an explicit `random.Random`; `doc_rng(seed, unit, doc, copy)` makes
one per document and copy, so an example depends only on (seed, document id, copy) and the pool the
document sits in, never on which task or process made it. Python's Mersenne Twister is used rather
than numpy because the planning draws a few scalars at a time: seeding costs ~5 us against ~15 us for
a numpy Generator, and a scalar `random()` ~0.05 us against ~0.5 us. Only `random()`, `getrandbits()`
and `randbytes()` are used: the stream behind them is stable across CPython versions.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate, chain
from typing import Sequence

import numpy as np

from data_prep.config import CLS_ID, SEP_ID, ExamplesConfig


@dataclass(frozen=True)
class ExampleParams:
    max_seq_length: int
    short_seq_prob: float
    nsp: bool
    masked_lm_prob: float
    max_predictions_per_seq: int
    whole_word_mask: bool
    vocab_size: int

    @classmethod
    def from_config(cls, ex: ExamplesConfig, vocab_size: int) -> "ExampleParams":
        return cls(
            ex.max_seq_length, ex.short_seq_prob, ex.nsp, ex.masked_lm_prob,
            ex.max_predictions_per_seq, ex.whole_word_mask, vocab_size,
        )


@dataclass(slots=True)
class Example:
    """One example as spans of its pool's flat token array: A = flat[a0:a0+la], B = flat[b0:b0+lb]."""

    a0: int
    la: int
    b0: int
    lb: int                      # 0 when there is no B (MLM-only)
    is_random_next: bool | None  # None without NSP
    truncated: bool

    @property
    def length(self) -> int:
        """Tokens with [CLS] and the [SEP]s."""
        return self.la + self.lb + (3 if self.lb else 2)

    @property
    def b_start(self) -> int:
        """Index of B's first token in the example (= length when there is no B)."""
        return self.la + 2 if self.lb else self.length


class Pool:
    """Tokenized documents held together: one flat token array and each document's sentence offsets."""

    def __init__(self, sentences: Sequence[Sequence[int]], sentences_per_doc: Sequence[int],
                 longest: int | None = None):
        """`sentences`: every document's sentences in order, as sentencepiece returns them; document d
        has `sentences_per_doc[d]` of them. Empty sentences are dropped. A sentence of more than `longest`
        tokens (NSP: longer than a whole example) is cut into near-equal parts of at most half that, which
        pair with each other; uncut, all but half an example of it would be truncated away."""
        lens = list(map(len, sentences))
        self.flat = np.fromiter(chain.from_iterable(sentences), np.int32, sum(lens))
        # bounds[d] = [o0, o1, ..., on]: sentence i of document d is flat[bounds[d][i]:bounds[d][i + 1]]
        self.bounds: list[list[int]] = []
        self.cut = 0  # sentences cut into parts
        half = max(1, (longest or 0) // 2)
        long_docs: set[int] = set()  # documents with a sentence to cut (rare: the plain path below is C-level)
        if longest and lens:
            over = np.flatnonzero(np.asarray(lens) > longest)
            long_docs = set(np.searchsorted(np.cumsum(sentences_per_doc), over, side="right").tolist())
        first = offset = 0
        for d, n in enumerate(sentences_per_doc):
            doc = lens[first:first + n]
            if d in long_docs:
                b = [offset]
                for m in doc:
                    if m > longest:
                        parts = -(-m // half)
                        b += [offset + m * k // parts for k in range(1, parts)]
                        self.cut += 1
                    if m:
                        offset += m
                        b.append(offset)
            else:
                b = list(accumulate(filter(None, doc), initial=offset))
            self.bounds.append(b)
            first, offset = first + n, b[-1]
        # the documents a random next segment can come from: those with a token (a document of invisible
        # characters encodes to none)
        self.drawable = [d for d, b in enumerate(self.bounds) if len(b) > 1]

    @classmethod
    def of(cls, docs: Sequence[Sequence[Sequence[int]]], longest: int | None = None) -> "Pool":
        """A pool from documents given as lists of tokenized sentences."""
        return cls([s for d in docs for s in d], [len(d) for d in docs], longest)

    def __len__(self) -> int:
        return len(self.bounds)

    def tokens(self, ex: Example) -> list[int]:
        """The example's original tokens, [CLS] A [SEP] (B [SEP])."""
        a = self.flat[ex.a0:ex.a0 + ex.la].tolist()
        b = self.flat[ex.b0:ex.b0 + ex.lb].tolist()
        return [CLS_ID, *a, SEP_ID, *b, SEP_ID] if ex.lb else [CLS_ID, *a, SEP_ID]

    def gather(self, examples: list[Example], max_seq_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens (E, L) int32 0-padded, lengths (E,), b_start (E,)) for `examples`, in one vectorized gather."""
        E, L = len(examples), max_seq_length
        spans = np.array([(e.a0, e.la, e.b0, e.lb) for e in examples], np.int64).reshape(E, 4)
        a0, la, b0, lb = spans.T
        col = np.arange(L)[None, :]
        in_a = (col >= 1) & (col <= la[:, None])
        in_b = (col >= la[:, None] + 2) & (col < (la + 2 + lb)[:, None])
        src = np.where(in_a, a0[:, None] + col - 1, np.where(in_b, b0[:, None] + col - la[:, None] - 2, 0))
        tokens = np.where(in_a | in_b, self.flat[src] if len(self.flat) else 0, 0).astype(np.int32)
        rows = np.arange(E)
        lengths = la + np.where(lb > 0, lb + 3, 2)
        tokens[:, 0] = CLS_ID
        tokens[rows, la + 1] = SEP_ID
        tokens[rows, lengths - 1] = SEP_ID
        b_start = np.where(lb > 0, la + 2, lengths)
        return tokens, lengths, b_start


def stable_seed(*parts: object) -> int:
    """A 128-bit integer that is a pure function of `parts` (their repr), for seeding generators."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=16).digest(), "little")


def doc_rng(seed: int, unit: int, doc: int, copy: int) -> random.Random:
    """The generator for document `doc` of work unit `unit`, duplicate `copy`."""
    return random.Random(stable_seed(seed, unit, doc, copy))


def unit_fraction(*parts: object) -> float:
    """A uniform number in [0, 1) that is a pure function of `parts` (split assignment, sampling)."""
    return stable_seed(*parts) / 2**128


def _target_length(max_num_tokens: int, p: ExampleParams, rnd) -> int:
    if rnd() < p.short_seq_prob:
        return 2 + int(rnd() * (max_num_tokens - 1))  # uniform in [2, max_num_tokens]
    return max_num_tokens


def create_pairs(pool: Pool, doc_index: int, p: ExampleParams, rng: random.Random) -> list[Example]:
    """NSP examples from document `doc_index` of `pool`; random next segments come from its other documents."""
    bounds = pool.bounds[doc_index]
    n_sent = len(bounds) - 1
    max_num_tokens = p.max_seq_length - 3
    rnd = rng.random
    target = _target_length(max_num_tokens, p, rnd)
    out: list[Example] = []
    start = length = i = 0  # the current chunk is sentences start..i
    while i < n_sent:
        length += bounds[i + 1] - bounds[i]
        if i == n_sent - 1 or length >= target:
            n_chunk = i + 1 - start
            a_end = start + (1 + int(rnd() * (n_chunk - 1)) if n_chunk >= 2 else 1)
            a0, la = bounds[start], bounds[a_end] - bounds[start]
            if n_chunk == 1 or rnd() < 0.5:
                is_random = True
                # Ten tries at another document, as Google does; a pool of one falls back to itself.
                for _ in range(10):
                    other = pool.drawable[int(rnd() * len(pool.drawable))]
                    if other != doc_index:
                        break
                ob = pool.bounds[other]
                j0 = int(rnd() * (len(ob) - 1))
                # Whole sentences from j0 until B reaches its target length (at least one sentence).
                j = min(bisect_left(ob, ob[j0] + target - la, j0 + 1), len(ob) - 1)
                b0, lb = ob[j0], ob[j] - ob[j0]
                i = a_end - 1  # the unused sentences of this chunk start the next one
            else:
                is_random = False
                b0, lb = bounds[a_end], bounds[i + 1] - bounds[a_end]
            fa, ra, fb, rb = truncation(la, lb, max_num_tokens, rng)
            la, lb = la - fa - ra, lb - fb - rb
            if la > 0 and lb > 0:
                out.append(Example(a0 + fa, la, b0 + fb, lb, is_random, fa + ra + fb + rb > 0))
            start, length = i + 1, 0
        i += 1
    return out


def truncation(la: int, lb: int, max_num_tokens: int, rng: random.Random) -> tuple[int, int, int, int]:
    """Tokens to cut as (A front, A back, B front, B back) so that A + B fit in `max_num_tokens`.

    Google trims the longer side one token at a time, from the front or the back with equal chance.
    Same distribution, in bulk: how many tokens each side loses depends on the lengths only (the longer
    side loses until both are level, then they alternate, B first, as Google's loop takes B on a tie),
    and the number taken from the front is Binomial(removed, 1/2), one `getrandbits` per side.
    """
    excess = la + lb - max_num_tokens
    if excess <= 0:
        return 0, 0, 0, 0
    first = min(excess, abs(la - lb))
    ra, rb = (first, 0) if la > lb else (0, first)
    rest = excess - first
    ra, rb = ra + rest // 2, rb + (rest + 1) // 2
    fa = bin(rng.getrandbits(ra)).count("1") if ra else 0
    fb = bin(rng.getrandbits(rb)).count("1") if rb else 0
    return fa, ra - fa, fb, rb - fb


def create_segments(pool: Pool, doc_index: int, p: ExampleParams, rng: random.Random) -> list[Example]:
    """MLM-only examples: whole sentences packed up to the target length; an over-long sentence is split."""
    bounds = pool.bounds[doc_index]
    max_num_tokens = p.max_seq_length - 2
    target = _target_length(max_num_tokens, p, rng.random)
    out: list[Example] = []
    c0 = c_len = 0  # current chunk: flat[c0:c0 + c_len] (a document's sentences are contiguous)
    for s0, s1 in zip(bounds, bounds[1:]):
        if c_len and c_len + (s1 - s0) > target:
            out.append(Example(c0, c_len, 0, 0, None, False))
            c_len = 0
        if not c_len:
            c0 = s0
        c_len += s1 - s0
        while c_len > max_num_tokens:
            out.append(Example(c0, max_num_tokens, 0, 0, None, True))
            c0, c_len = c0 + max_num_tokens, c_len - max_num_tokens
    if c_len:
        out.append(Example(c0, c_len, 0, 0, None, False))
    return out
