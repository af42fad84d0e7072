"""BERT pretraining examples from tokenized documents: NSP pairs or MLM-only segments, then MLM masks.

Semantics follow Google's `create_pretraining_data.py`: `[CLS] A [SEP] B [SEP]`, a target length that is
shorter with probability `short_seq_prob`, B is a random segment from another document half of the time,
pairs are truncated from a random end of the longer side, 15% of tokens are predicted (80% `[MASK]`,
10% random, 10% unchanged) with a per-sequence cap, optionally whole words at a time.

Every function takes its randomness as an explicit `random.Random`; `doc_rng(seed, unit, doc, copy)` makes
one per document and copy, so an example depends only on (seed, document id, copy) and the pool the
document sits in, never on which task or process made it. Python's Mersenne Twister is used rather
than numpy because these loops draw a few scalars at a time: seeding costs ~5 us against ~15 us for a
numpy Generator, and a scalar draw ~0.05 us against ~0.5 us (measured on the 2-core dev machine).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Sequence

from data_prep.config import CLS_ID, MASK_ID, NUM_SPECIAL, SEP_ID, ExamplesConfig

Doc = Sequence[Sequence[int]]  # a document: its sentences as token id lists


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


@dataclass
class Example:
    """One training example before serialisation; `tokens` are the originals (unmasked)."""

    tokens: list[int]           # [CLS] A [SEP] B [SEP], or [CLS] A [SEP] without NSP
    b_start: int                # index of B's first token (= len(tokens) when there is no B)
    is_random_next: bool | None  # None without NSP
    truncated: bool


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=16).digest(), "little")


def doc_rng(seed: int, unit: int, doc: int, copy: int) -> random.Random:
    """The generator for document `doc` of work unit `unit`, duplicate `copy`."""
    return random.Random(_seed(seed, unit, doc, copy))


def unit_fraction(*parts: object) -> float:
    """A uniform number in [0, 1) that is a pure function of `parts` (split assignment, sampling)."""
    return _seed(*parts) / 2**128


def create_pairs(pool: Sequence[Doc], doc_index: int, p: ExampleParams, rng: random.Random) -> list[Example]:
    """NSP examples from `pool[doc_index]`; random next segments come from the other documents of `pool`."""
    document = pool[doc_index]
    max_num_tokens = p.max_seq_length - 3
    target = max_num_tokens
    if rng.random() < p.short_seq_prob:
        target = rng.randint(2, max_num_tokens)
    out: list[Example] = []
    chunk: list[Sequence[int]] = []
    length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = [t for s in chunk[:a_end] for t in s]
            tokens_b: list[int] = []
            if len(chunk) == 1 or rng.random() < 0.5:
                is_random = True
                target_b = target - len(tokens_a)
                # Ten tries at another document, as Google does; a pool of one falls back to itself.
                for _ in range(10):
                    other = rng.randint(0, len(pool) - 1)
                    if other != doc_index:
                        break
                random_doc = pool[other]
                for j in range(rng.randint(0, len(random_doc) - 1), len(random_doc)):
                    tokens_b.extend(random_doc[j])
                    if len(tokens_b) >= target_b:
                        break
                i -= len(chunk) - a_end  # the unused sentences of this chunk start the next one
            else:
                is_random = False
                tokens_b = [t for s in chunk[a_end:] for t in s]
            truncated = truncate_pair(tokens_a, tokens_b, max_num_tokens, rng)
            if tokens_a and tokens_b:
                tokens = [CLS_ID, *tokens_a, SEP_ID, *tokens_b, SEP_ID]
                out.append(Example(tokens, len(tokens_a) + 2, is_random, truncated))
            chunk, length = [], 0
        i += 1
    return out


def truncate_pair(a: list[int], b: list[int], max_num_tokens: int, rng: random.Random) -> bool:
    """Trim the longer of a/b from a random end until they fit; True if anything was cut."""
    cut = False
    while len(a) + len(b) > max_num_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()
        cut = True
    return cut


def create_segments(document: Doc, p: ExampleParams, rng: random.Random) -> list[Example]:
    """MLM-only examples: whole sentences packed up to the target length; an over-long sentence is split."""
    max_num_tokens = p.max_seq_length - 2
    target = max_num_tokens
    if rng.random() < p.short_seq_prob:
        target = rng.randint(2, max_num_tokens)
    out: list[Example] = []
    chunk: list[int] = []

    def emit(body: list[int], truncated: bool) -> None:
        tokens = [CLS_ID, *body, SEP_ID]
        out.append(Example(tokens, len(tokens), None, truncated))

    for sentence in document:
        if chunk and len(chunk) + len(sentence) > target:
            emit(chunk, False)
            chunk = []
        chunk.extend(sentence)
        while len(chunk) > max_num_tokens:
            emit(chunk[:max_num_tokens], True)
            chunk = chunk[max_num_tokens:]
    if chunk:
        emit(chunk, False)
    return out


def mask_example(
    ex: Example, p: ExampleParams, rng: random.Random, word_start: bytes | None = None
) -> tuple[list[int], list[int], list[int]]:
    """Choose MLM targets: returns (input_ids with masks applied, sorted positions, original ids there).

    `word_start[id]` is 1 when token `id` begins a word; needed for whole-word masking only.
    """
    tokens = ex.tokens
    n = len(tokens)
    # Candidates are every position but [CLS] and the [SEP]s, whose places are known.
    if ex.b_start < n:
        cand = [*range(1, ex.b_start - 1), *range(ex.b_start, n - 1)]
    else:
        cand = list(range(1, n - 1))
    k = min(p.max_predictions_per_seq, max(1, int(round(n * p.masked_lm_prob))), len(cand))
    if p.whole_word_mask and word_start is not None:
        positions = _whole_word_positions(tokens, cand, k, rng, word_start)
    else:
        positions = sorted(rng.sample(cand, k))
    input_ids = list(tokens)
    labels = []
    for pos in positions:
        labels.append(tokens[pos])
        r = rng.random()
        if r < 0.8:
            input_ids[pos] = MASK_ID
        elif r >= 0.9:
            input_ids[pos] = rng.randrange(NUM_SPECIAL, p.vocab_size)
    return input_ids, positions, labels


def _whole_word_positions(
    tokens: list[int], cand: list[int], k: int, rng: random.Random, word_start: bytes
) -> list[int]:
    words: list[list[int]] = []
    prev = -2
    for pos in cand:
        if words and pos == prev + 1 and not word_start[tokens[pos]]:
            words[-1].append(pos)
        else:
            words.append([pos])
        prev = pos
    # A random order of words: sort by one uniform key each (cheaper than shuffle for ~100 words).
    keys = [rng.random() for _ in words]
    chosen: list[int] = []
    for w in sorted(range(len(words)), key=keys.__getitem__):
        if len(chosen) >= k:
            break
        if len(chosen) + len(words[w]) > k:
            continue  # Google's rule: skip a word that would overshoot the budget
        chosen.extend(words[w])
    return sorted(chosen)
