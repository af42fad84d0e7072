"""Pure-function tests of example creation: pairing, truncation, masking rates, caps, determinism."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from data_prep.config import CLS_ID, MASK_ID, NUM_SPECIAL, SEP_ID
from data_prep.examples import (
    Example, ExampleParams, create_pairs, create_segments, doc_rng, mask_example, truncate_pair,
)

VOCAB = 1000


def params(**kw) -> ExampleParams:
    base = dict(max_seq_length=64, short_seq_prob=0.1, nsp=True, masked_lm_prob=0.15,
                max_predictions_per_seq=10, whole_word_mask=False, vocab_size=VOCAB)
    base.update(kw)
    return ExampleParams(**base)


def make_pool(n_docs: int, seed: int = 0) -> list[list[list[int]]]:
    """Documents whose token ids encode (document, sentence) so provenance can be checked: id = 100*doc + sent + 5."""
    rng = random.Random(seed)
    pool = []
    for d in range(n_docs):
        doc = []
        for s in range(rng.randint(3, 9)):
            doc.append([NUM_SPECIAL + 100 * d + s] * rng.randint(3, 15))
        pool.append(doc)
    return pool


def doc_of(token: int) -> int:
    return (token - NUM_SPECIAL) // 100


def test_pairs_have_bert_layout_and_fit():
    pool = make_pool(8)
    p = params()
    for d in range(len(pool)):
        for ex in create_pairs(pool, d, p, doc_rng(1, 0, d, 0)):
            t = ex.tokens
            assert len(t) <= p.max_seq_length
            assert t[0] == CLS_ID and t[-1] == SEP_ID and t[ex.b_start - 1] == SEP_ID
            assert t.count(SEP_ID) == 2 and t.count(CLS_ID) == 1
            a, b = t[1:ex.b_start - 1], t[ex.b_start:-1]
            assert a and b
            assert all(doc_of(x) == d for x in a), "segment A always comes from the document itself"
            if not ex.is_random_next:
                assert all(doc_of(x) == d for x in b)
                # Actual next: B continues A in order (sentence ids do not go backwards).
                assert max(x % 100 for x in a) <= min(x % 100 for x in b)


def test_random_next_is_about_half_and_from_other_documents():
    pool = make_pool(50)
    p = params(short_seq_prob=0.0)
    labels = Counter()
    foreign = 0
    for d in range(len(pool)):
        for copy in range(4):
            for ex in create_pairs(pool, d, p, doc_rng(3, 0, d, copy)):
                labels[ex.is_random_next] += 1
                b = ex.tokens[ex.b_start:-1]
                if ex.is_random_next:
                    foreign += all(doc_of(x) != d for x in b)
    total = labels[True] + labels[False]
    assert total > 300
    assert 0.45 < labels[True] / total < 0.65  # Google's rule: 50% plus the single-sentence chunks
    assert foreign / labels[True] > 0.95


def test_short_seq_prob_gives_short_targets():
    pool = make_pool(30)
    lengths = {sp: [] for sp in (0.0, 1.0)}
    for sp in lengths:
        for d in range(len(pool)):
            lengths[sp] += [len(e.tokens) for e in create_pairs(pool, d, params(short_seq_prob=sp), doc_rng(5, 0, d, 0))]
    mean = {sp: sum(v) / len(v) for sp, v in lengths.items()}
    assert mean[1.0] < 0.75 * mean[0.0]


def test_truncate_pair_trims_longer_side_from_both_ends():
    rng = random.Random(0)
    fronts = backs = 0
    for _ in range(200):
        a, b = list(range(100, 140)), list(range(200, 210))
        assert truncate_pair(a, b, 30, rng)
        assert len(a) + len(b) == 30 and len(b) == 10
        fronts += a[0] != 100
        backs += a[-1] != 139
    assert fronts > 150 and backs > 150
    a, b = [1, 2], [3]
    assert not truncate_pair(a, b, 10, rng) and a == [1, 2] and b == [3]


def test_segments_without_nsp_fill_to_length_and_keep_all_tokens():
    doc = [[NUM_SPECIAL + i] * 7 for i in range(40)]
    p = params(nsp=False, short_seq_prob=0.0)
    exs = create_segments(doc, p, random.Random(0))
    body = [t for e in exs for t in e.tokens[1:-1]]
    assert body == [t for s in doc for t in s], "every token once, in order"
    for e in exs[:-1]:
        assert len(e.tokens) > p.max_seq_length - 7 - 1
        assert e.is_random_next is None and e.b_start == len(e.tokens)
    long_doc = [[NUM_SPECIAL] * 500]
    exs = create_segments(long_doc, p, random.Random(0))
    assert all(len(e.tokens) <= p.max_seq_length for e in exs) and sum(len(e.tokens) - 2 for e in exs) == 500


def _example(n: int) -> Example:
    body = list(range(NUM_SPECIAL, NUM_SPECIAL + n))
    half = n // 2
    tokens = [CLS_ID, *body[:half], SEP_ID, *body[half:], SEP_ID]
    return Example(tokens, half + 2, False, False)


def test_masking_rates_cap_and_special_tokens():
    p = params(max_seq_length=128, max_predictions_per_seq=20)
    rng = random.Random(11)
    kinds = Counter()
    for _ in range(2000):
        ex = _example(rng.randint(10, 125))
        input_ids, positions, labels = mask_example(ex, p, rng)
        n = len(ex.tokens)
        assert len(positions) == min(20, max(1, round(n * 0.15)))
        assert positions == sorted(set(positions))
        for pos, label in zip(positions, labels):
            assert ex.tokens[pos] not in (CLS_ID, SEP_ID), "special tokens are never targets"
            assert label == ex.tokens[pos]
            got = input_ids[pos]
            kinds["mask" if got == MASK_ID else "same" if got == label else "random"] += 1
            if got not in (MASK_ID, label):
                assert NUM_SPECIAL <= got < VOCAB
        unmasked = [i for i in range(n) if i not in set(positions)]
        assert all(input_ids[i] == ex.tokens[i] for i in unmasked)
    total = sum(kinds.values())
    assert abs(kinds["mask"] / total - 0.8) < 0.02
    assert abs(kinds["same"] / total - 0.1) < 0.015
    assert abs(kinds["random"] / total - 0.1) < 0.015


def test_whole_word_masking_masks_whole_words():
    # Token ids >= 500 continue a word; ids < 500 start one.
    word_start = bytes(1 if i < 500 else 0 for i in range(VOCAB))
    p = params(max_seq_length=128, max_predictions_per_seq=20, whole_word_mask=True)
    rng = random.Random(2)
    for _ in range(300):
        body = []
        while len(body) < 100:
            body += [rng.randint(NUM_SPECIAL, 499)] + [rng.randint(500, 999) for _ in range(rng.randint(0, 3))]
        ex = Example([CLS_ID, *body, SEP_ID], len(body) + 2, None, False)
        _, positions, _ = mask_example(ex, p, rng, word_start)
        chosen = set(positions)
        assert 0 < len(positions) <= 20
        for pos in positions:  # the word around each target is fully chosen
            start = pos
            while not word_start[ex.tokens[start]]:
                start -= 1
            end = pos + 1
            while end < len(ex.tokens) - 1 and not word_start[ex.tokens[end]]:
                end += 1
            assert set(range(start, end)) <= chosen


def test_examples_are_a_pure_function_of_seed_document_and_copy():
    pool = make_pool(10)
    p = params()

    def make(d, copy, seed=1):
        rng = doc_rng(seed, 4, d, copy)
        return [(e.tokens, mask_example(e, p, rng)) for e in create_pairs(pool, d, p, rng)]

    # Order of processing and what else ran before do not matter.
    forward = {d: make(d, 0) for d in range(10)}
    backward = {d: make(d, 0) for d in reversed(range(10))}
    assert forward == backward
    assert make(3, 0) != make(3, 1), "copies differ"
    assert make(3, 0) != make(3, 0, seed=2), "seeds differ"


@pytest.mark.parametrize("n", [3, 4, 5])
def test_tiny_examples_never_break(n):
    p = params(max_seq_length=8, max_predictions_per_seq=2)
    ex = _example(n)
    input_ids, positions, labels = mask_example(ex, p, random.Random(0))
    assert 1 <= len(positions) <= 2
