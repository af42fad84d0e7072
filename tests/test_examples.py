"""Pure-function tests of example creation: pairing, truncation, masking rates, caps, determinism."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from data_prep.config import CLS_ID, MASK_ID, NUM_SPECIAL, SEP_ID
from data_prep.examples import (
    Example, ExampleParams, Pool, create_pairs, create_segments, doc_rng, truncation,
)
from data_prep.masking import mask_batch, noise_bytes

VOCAB = 1000


def params(**kw) -> ExampleParams:
    base = dict(max_seq_length=64, short_seq_prob=0.1, nsp=True, masked_lm_prob=0.15,
                max_predictions_per_seq=10, whole_word_mask=False, vocab_size=VOCAB)
    base.update(kw)
    return ExampleParams(**base)


def make_pool(n_docs: int, seed: int = 0) -> Pool:
    """Documents whose token ids encode provenance: id = 5 + 100 * document + sentence."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        docs.append([[NUM_SPECIAL + 100 * d + s] * rng.randint(3, 15) for s in range(rng.randint(3, 9))])
    return Pool.of(docs)


def doc_of(token: int) -> int:
    return (token - NUM_SPECIAL) // 100


def test_pool_gather_matches_token_lists():
    pool = make_pool(6)
    p = params()
    examples = [e for d in range(6) for e in create_pairs(pool, d, p, doc_rng(1, 0, d, 0))]
    tokens, lengths, b_start = pool.gather(examples, p.max_seq_length)
    for row, ex in enumerate(examples):
        want = pool.tokens(ex)
        assert tokens[row, :len(want)].tolist() == want and not tokens[row, len(want):].any()
        assert lengths[row] == ex.length == len(want) and b_start[row] == ex.b_start


def test_pairs_have_bert_layout_and_fit():
    pool = make_pool(8)
    p = params()
    for d in range(len(pool)):
        for ex in create_pairs(pool, d, p, doc_rng(1, 0, d, 0)):
            t = pool.tokens(ex)
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
                if ex.is_random_next:
                    foreign += all(doc_of(x) != d for x in pool.tokens(ex)[ex.b_start:-1])
    total = labels[True] + labels[False]
    assert total > 300
    assert 0.45 < labels[True] / total < 0.65  # Google's rule: 50% plus the single-sentence chunks
    assert foreign / labels[True] > 0.95


def test_a_sentence_longer_than_an_example_is_cut_into_parts_that_pair():
    """A 600-token "sentence" (an unsplit paragraph, a table) between ordinary ones: cut into parts of at most half
    an example, nearly all of its tokens reach the document's examples, which stay within the length."""
    long, p = list(range(NUM_SPECIAL, NUM_SPECIAL + 600)), params(short_seq_prob=0.0)
    docs = [[[900] * 20, long, [901] * 20], [[902] * 30] * 5]

    def kept(pool: Pool) -> float:
        seen = set()
        for copy in range(3):
            for ex in create_pairs(pool, 0, p, doc_rng(1, 0, 0, copy)):
                assert ex.length <= p.max_seq_length
                spans = [(ex.a0, ex.la)] + ([] if ex.is_random_next else [(ex.b0, ex.lb)])
                seen.update(t for a0, n in spans for t in pool.flat[a0:a0 + n].tolist() if t < 900)
        return len(seen) / len(long)

    cut = Pool.of(docs, longest=p.max_seq_length - 3)
    assert cut.cut == 1 and max(np.diff(cut.bounds[0])) <= (p.max_seq_length - 3) // 2
    assert cut.flat.tolist() == Pool.of(docs).flat.tolist()  # (the same tokens, in parts)
    assert kept(cut) > 0.9 and kept(Pool.of(docs)) < 0.2


def test_a_random_next_segment_never_comes_from_a_document_without_tokens():
    """A document of invisible characters encodes to no tokens: a random next segment drawn from it would be empty
    and its example lost; it is not drawn."""
    docs = [[[NUM_SPECIAL + s] * 12 for s in range(8)], [[], []], [[], []], [[700 + s] * 12 for s in range(8)]]
    pool, full = Pool.of(docs), Pool.of([docs[0], docs[3]])
    assert pool.drawable == [0, 3]
    for seed in range(20):
        made = create_pairs(pool, 0, params(), doc_rng(seed, 0, 0, 0))
        assert [(e.la, e.lb, e.is_random_next) for e in made] == \
            [(e.la, e.lb, e.is_random_next) for e in create_pairs(full, 0, params(), doc_rng(seed, 0, 0, 0))]
        assert all(pool.flat[e.b0] >= 700 for e in made if e.is_random_next)


def test_short_seq_prob_gives_short_targets():
    pool = make_pool(30)
    mean = {}
    for sp in (0.0, 1.0):
        lengths = [e.length for d in range(len(pool)) for e in create_pairs(pool, d, params(short_seq_prob=sp),
                                                                             doc_rng(5, 0, d, 0))]
        mean[sp] = sum(lengths) / len(lengths)
    assert mean[1.0] < 0.75 * mean[0.0]


def google_truncate(a: list, b: list, max_num_tokens: int, rng: random.Random) -> None:
    """Google's loop, one token at a time (the reference for `truncation`)."""
    while len(a) + len(b) > max_num_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


@pytest.mark.parametrize("la,lb,limit", [(40, 10, 30), (10, 40, 30), (20, 20, 25), (31, 30, 20), (5, 5, 20), (1, 60, 30)])
def test_truncation_matches_googles_loop_in_distribution(la, lb, limit):
    ref, got = Counter(), Counter()
    for i in range(3000):
        a, b = list(range(la)), list(range(100, 100 + lb))
        google_truncate(a, b, limit, random.Random(i))
        ref[(len(a), len(b), a[0] if a else None, b[0] if b else None)] += 1
        fa, ra, fb, rb = truncation(la, lb, limit, random.Random(i))
        got[(la - fa - ra, lb - fb - rb, fa if la - fa - ra else None, 100 + fb if lb - fb - rb else None)] += 1
    assert {k[:2] for k in ref} == {k[:2] for k in got}, "same final lengths"
    for key in set(ref) | set(got):  # same distribution of where the cuts fall
        assert abs(ref[key] - got[key]) < 0.04 * 3000 + 3 * (ref[key] + 1) ** 0.5


def test_segments_without_nsp_fill_to_length_and_keep_all_tokens():
    doc = [[NUM_SPECIAL + i] * 7 for i in range(40)]
    pool = Pool.of([doc])
    p = params(nsp=False, short_seq_prob=0.0)
    exs = create_segments(pool, 0, p, random.Random(0))
    body = [t for e in exs for t in pool.tokens(e)[1:-1]]
    assert body == [t for s in doc for t in s], "every token once, in order"
    for e in exs[:-1]:
        assert e.length > p.max_seq_length - 7 - 1
        assert e.is_random_next is None and e.b_start == e.length
    pool = Pool.of([[[NUM_SPECIAL] * 500]])
    exs = create_segments(pool, 0, p, random.Random(0))
    assert all(e.length <= p.max_seq_length for e in exs) and sum(e.length - 2 for e in exs) == 500


def _examples(rng: random.Random, count: int, lo: int = 10, hi: int = 125) -> tuple[Pool, list[Example]]:
    """Pairs with A and B of random lengths over distinct token ids."""
    docs, examples, offset = [], [], 0
    for _ in range(count):
        n = rng.randint(lo, hi)
        half = n // 2
        docs.append([list(range(NUM_SPECIAL, NUM_SPECIAL + n))])
        examples.append(Example(offset, half, offset + half, n - half, False, False))
        offset += n
    return Pool.of(docs), examples


def _mask(pool: Pool, examples: list[Example], p: ExampleParams, rng: random.Random, word_start=None):
    noise = rng.randbytes(noise_bytes(len(examples), p))
    tokens, lengths, b_start = pool.gather(examples, p.max_seq_length)
    return tokens, mask_batch(tokens, lengths, b_start, noise, p, word_start)


def test_masking_rates_cap_and_special_tokens():
    p = params(max_seq_length=128, max_predictions_per_seq=20)
    rng = random.Random(11)
    pool, examples = _examples(rng, 3000)
    tokens, batch = _mask(pool, examples, p, rng)
    kinds = Counter()
    for e, ex in enumerate(examples):
        n = ex.length
        k = int(batch.counts[e])
        assert k == min(20, max(1, round(n * 0.15)))
        positions = batch.positions[e, :k].tolist()
        assert positions == sorted(set(positions)) and not batch.positions[e, k:].any()
        for pos, label in zip(positions, batch.labels[e, :k].tolist()):
            assert tokens[e, pos] not in (CLS_ID, SEP_ID), "special tokens are never targets"
            assert label == tokens[e, pos]
            got = batch.input_ids[e, pos]
            kinds["mask" if got == MASK_ID else "same" if got == label else "random"] += 1
            if got not in (MASK_ID, label):
                assert NUM_SPECIAL <= got < VOCAB
        untouched = np.ones(p.max_seq_length, bool)
        untouched[positions] = False
        assert (batch.input_ids[e][untouched] == tokens[e][untouched]).all()
    total = sum(kinds.values())
    assert abs(kinds["mask"] / total - 0.8) < 0.02
    assert abs(kinds["same"] / total - 0.1) < 0.015
    assert abs(kinds["random"] / total - 0.1) < 0.015


def test_every_candidate_position_is_equally_likely():
    p = params(max_seq_length=32, max_predictions_per_seq=5)
    rng = random.Random(4)
    pool, examples = _examples(rng, 4000, lo=29, hi=29)  # all [CLS] 14 [SEP] 15 [SEP]
    _, batch = _mask(pool, examples, p, rng)
    assert (batch.counts == 5).all()  # round(32 * 0.15) = 5 targets each
    hits = np.bincount(batch.positions.ravel(), minlength=32)
    cand = [i for i in range(1, 31) if i != 15]
    assert hits[15] == 0 and hits[31] == 0
    expected = 4000 * 5 / len(cand)
    assert all(abs(hits[i] - expected) < 5 * expected ** 0.5 for i in cand)


def test_whole_word_masking_masks_whole_words():
    # Token ids >= 500 continue a word; ids < 500 start one.
    word_start = bytes(1 if i < 500 else 0 for i in range(VOCAB))
    p = params(max_seq_length=128, max_predictions_per_seq=20, whole_word_mask=True)
    rng = random.Random(2)
    docs = []
    for _ in range(300):
        body = []
        while len(body) < 100:
            body += [rng.randint(NUM_SPECIAL, 499)] + [rng.randint(500, 999) for _ in range(rng.randint(0, 3))]
        docs.append([body])
    pool = Pool.of(docs)
    examples = [Example(pool.bounds[d][0], len(docs[d][0]), 0, 0, None, False) for d in range(300)]
    tokens, batch = _mask(pool, examples, p, rng, word_start)
    for e in range(300):
        k = int(batch.counts[e])
        assert 0 < k <= 20
        chosen = set(batch.positions[e, :k].tolist())
        row = tokens[e].tolist()
        for pos in chosen:  # the word around each target is fully chosen
            start = pos
            while not word_start[row[start]]:
                start -= 1
            end = pos + 1
            while end < examples[e].length - 1 and not word_start[row[end]]:
                end += 1
            assert set(range(start, end)) <= chosen


def test_a_word_after_a_cjk_character_is_a_word_of_its_own():
    """`中国abc def` as pieces `▁中` `国` `abc` `▁de` `f`: BERT's basic tokenizer puts a space around each CJK
    character, so `abc` is a word of its own, not the end of `国`'s; `▁de` `f` stays one word."""
    from data_prep.masking import NEXT_STARTS, WORD_START, words

    table = bytearray(VOCAB)
    table[10] = table[11] = WORD_START | NEXT_STARTS  # ▁中, 国
    table[13] = WORD_START  # ▁de (abc, id 12, and f, id 14: no space marker)
    tokens = [CLS_ID, 10, 11, 12, 13, 14, SEP_ID]
    cand = np.array([False, True, True, True, True, True, False])
    assert words(tokens, cand, bytes(table)) == [[1], [2], [3], [4, 5]]
    table[11] = WORD_START  # (were 国 not a CJK character, abc would continue its word)
    assert words(tokens, cand, bytes(table)) == [[1], [2, 3], [4, 5]]


def test_examples_are_a_pure_function_of_seed_document_and_copy():
    pool = make_pool(10)
    p = params()

    def make(d, copy, seed=1):
        rng = doc_rng(seed, 4, d, copy)
        exs = create_pairs(pool, d, p, rng)
        _, batch = _mask(pool, exs, p, rng)
        return [pool.tokens(e) for e in exs], batch.input_ids.tolist(), batch.positions.tolist()

    # Order of processing and what else ran before do not matter.
    forward = {d: make(d, 0) for d in range(10)}
    backward = {d: make(d, 0) for d in reversed(range(10))}
    assert forward == backward
    assert make(3, 0) != make(3, 1), "copies differ"
    assert make(3, 0) != make(3, 0, seed=2), "seeds differ"


@pytest.mark.parametrize("n", [3, 4, 5])
def test_tiny_examples_never_break(n):
    p = params(max_seq_length=8, max_predictions_per_seq=2)
    pool = Pool.of([[list(range(NUM_SPECIAL, NUM_SPECIAL + n))]])
    ex = Example(0, n - 1, n - 1, 1, False, False)
    _, batch = _mask(pool, [ex], p, random.Random(0))
    assert 1 <= int(batch.counts[0]) <= 2


# The examples a fixed token stream makes, per data_prep.dataset.RECIPE_VERSION. An unfinished dataset is resumed
# only at the same version, so a change to pairing, masking or shuffling must raise that version (and record its
# digest here); otherwise a resumed dataset would hold examples of both kinds. (This guards the example-making code
# only: a change to sentence splitting, the tokenizer's sample or the word-start table must raise it too.)
RECIPE_DIGESTS = {2: {True: "35147fa39e083381", False: "e2d6ae6d27109e0b"},
                  3: {True: "35147fa39e083381", False: "e2d6ae6d27109e0b"},  # (3 cuts documents, not a pool's examples)
                  4: {True: "35147fa39e083381", False: "e2d6ae6d27109e0b"}}  # (4: the word-start table; sentences cut)


@pytest.mark.parametrize("nsp", [True, False])
def test_a_change_to_the_examples_raises_the_recipe_version(nsp, tmp_path):
    import hashlib

    from conftest import small_config
    from data_prep.dataset import RECIPE_VERSION
    from data_prep.worker import Unit, UnitStats, _write_window

    class Collect:  # stands in for a ShardWriter: the examples' bytes, in the order written
        def __init__(self):
            self.digest = hashlib.sha256()

        def add_many(self, payloads, lengths):
            for payload, n in zip(payloads, lengths):
                self.digest.update(n.to_bytes(4, "little") + payload)

    cfg = small_config(tmp_path, tmp_path / "out", examples__dupe_factor=3, seed=7)
    p = params(nsp=nsp, whole_word_mask=True, short_seq_prob=0.3)
    word_start = bytes(int(i % 3 != 1) for i in range(VOCAB))
    out = Collect()
    for window in range(2):
        _write_window(make_pool(9, seed=window), list(range(9)), window, Unit(5, ()), cfg, p, word_start, out,
                      UnitStats(p.max_seq_length), "train")
    digest = out.digest.hexdigest()[:16]
    assert digest == RECIPE_DIGESTS[RECIPE_VERSION][nsp], (
        "these examples differ from the ones recipe version "
        f"{RECIPE_VERSION} makes: raise RECIPE_VERSION in data_prep/dataset.py and record the new digests here")
