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
from itertools import chain
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


def _below(rng: random.Random, n: int) -> int:
    """Uniform int in [0, n) from one C-level `random()` draw (randrange costs ~10x more in pure Python)."""
    return int(rng.random() * n)


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
        target = 2 + _below(rng, max_num_tokens - 1)
    out: list[Example] = []
    chunk: list[Sequence[int]] = []
    length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            a_end = 1 + _below(rng, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = list(chain.from_iterable(chunk[:a_end]))
            tokens_b: list[int] = []
            if len(chunk) == 1 or rng.random() < 0.5:
                is_random = True
                target_b = target - len(tokens_a)
                # Ten tries at another document, as Google does; a pool of one falls back to itself.
                for _ in range(10):
                    other = _below(rng, len(pool))
                    if other != doc_index:
                        break
                random_doc = pool[other]
                for j in range(_below(rng, len(random_doc)), len(random_doc)):
                    tokens_b.extend(random_doc[j])
                    if len(tokens_b) >= target_b:
                        break
                i -= len(chunk) - a_end  # the unused sentences of this chunk start the next one
            else:
                is_random = False
                tokens_b = list(chain.from_iterable(chunk[a_end:]))
            truncated = truncate_pair(tokens_a, tokens_b, max_num_tokens, rng)
            if tokens_a and tokens_b:
                tokens = [CLS_ID, *tokens_a, SEP_ID, *tokens_b, SEP_ID]
                out.append(Example(tokens, len(tokens_a) + 2, is_random, truncated))
            chunk, length = [], 0
        i += 1
    return out


def truncate_pair(a: list[int], b: list[int], max_num_tokens: int, rng: random.Random) -> bool:
    """Trim the longer of a/b, one token at a time from a random end, until they fit; True if anything was cut.

    Same distribution as Google's loop, done in bulk: how many tokens each side loses depends on the
    lengths only, and the number taken from the front is Binomial(removed, 1/2) (one `getrandbits`).
    """
    excess = len(a) + len(b) - max_num_tokens
    if excess <= 0:
        return False
    # The longer side loses tokens until both are level; after that removals alternate, b first
    # (Google's loop takes b on a tie), so b loses the odd one.
    first = min(excess, abs(len(a) - len(b)))
    ra, rb = (first, 0) if len(a) > len(b) else (0, first)
    rest = excess - first
    ra, rb = ra + rest // 2, rb + (rest + 1) // 2
    for side, r in ((a, ra), (b, rb)):
        if r:
            front = bin(rng.getrandbits(r)).count("1")
            del side[len(side) - (r - front):]
            del side[:front]
    return True


def create_segments(document: Doc, p: ExampleParams, rng: random.Random) -> list[Example]:
    """MLM-only examples: whole sentences packed up to the target length; an over-long sentence is split."""
    max_num_tokens = p.max_seq_length - 2
    target = max_num_tokens
    if rng.random() < p.short_seq_prob:
        target = 2 + _below(rng, max_num_tokens - 1)
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
    # Candidates are every position but [CLS] and the [SEP]s: index i of the m candidates sits at
    # i + 1, or i + 2 past segment A (the middle [SEP]); no candidate list is built on the fast path.
    has_b = ex.b_start < n
    m = n - 3 if has_b else n - 2
    a_len = ex.b_start - 2 if has_b else m
    k = min(p.max_predictions_per_seq, max(1, int(round(n * p.masked_lm_prob))), m)
    rnd = rng.random
    if p.whole_word_mask and word_start is not None:
        cand = [*range(1, ex.b_start - 1), *range(ex.b_start, n - 1)] if has_b else list(range(1, n - 1))
        positions = _whole_word_positions(tokens, cand, k, rng, word_start)
    elif 2 * k > m:
        positions = sorted(i + 1 + (i >= a_len) for i in rng.sample(range(m), k))
    else:
        chosen: set[int] = set()
        add = chosen.add
        while len(chosen) < k:  # rejection sampling: k is small next to m, so few draws repeat
            add(int(rnd() * m))
        positions = sorted(i + 1 + (i >= a_len) for i in chosen)
    input_ids = tokens.copy()
    labels = [tokens[pos] for pos in positions]
    span = p.vocab_size - NUM_SPECIAL
    for pos in positions:
        r = rnd()
        if r < 0.8:
            input_ids[pos] = MASK_ID
        elif r >= 0.9:
            input_ids[pos] = NUM_SPECIAL + int(rnd() * span)
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
