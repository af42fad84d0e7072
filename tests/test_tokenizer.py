"""Tokenizer training and loading: fixed special ids, determinism, BPE, an existing model, and its checks."""

from __future__ import annotations

import random
import re
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from conftest import make_document
from data_prep.config import SPECIAL_PIECES, TokenizerConfig
from data_prep.configfile import ConfigError
from data_prep.masking import NEXT_STARTS, WORD_START
from data_prep.tokenizer import load, punctuation, sha256_file, train, unspaced, word_start_table


def sentences(n: int = 3000) -> list[str]:
    rng = random.Random(1)
    return [s for _ in range(n // 6) for s in make_document(rng, 6)]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_trained_model_has_bert_special_ids_and_is_deterministic(tmp_path, model_type):
    cfg = TokenizerConfig(vocab_size=150, model_type=model_type, threads=2)
    a, b = tmp_path / "a.model", tmp_path / "b.model"
    train(sentences(), cfg, a)
    train(sentences(), cfg, b)
    assert sha256_file(a) == sha256_file(b), "same sample, same bytes (a killed job retrains identically)"
    sp = load(a)
    assert [sp.IdToPiece(i) for i in range(5)] == list(SPECIAL_PIECES)
    assert sp.GetPieceSize() == 150
    ids = sp.Encode("Quiet river carries copper lanterns.")
    assert ids and min(ids) >= 5, "control symbols never come out of text"
    assert not list(tmp_path.glob("*.partial"))


def test_word_start_table_marks_word_initial_pieces(tmp_path):
    cjk = ["北京是中国的首都。", "東京は日本の首都です。", "我们今天学习自然语言处理。", "ひらがなとカタカナを書きます。"]
    train(sentences() + cjk * 50, TokenizerConfig(vocab_size=200, threads=1), tmp_path / "m.model")
    sp = load(tmp_path / "m.model")
    table = word_start_table(sp)
    spaced = 0
    for i in range(5, sp.GetPieceSize()):
        piece = sp.IdToPiece(i)
        first = piece.lstrip("\u2581")[:1]
        last = piece.rstrip("\u2581")[-1:]
        ends_word = bool(last) and (unspaced(last) or punctuation(last))  # (the piece after it begins a word)
        assert bool(table[i] & NEXT_STARTS) == ends_word, piece
        if "\u3040" <= first <= "\u9fff":  # CJK and kana: every character starts a word, as BERT's basic tokenizer
            assert table[i] & WORD_START, piece
        else:
            spaced += 1
            assert bool(table[i] & WORD_START) == (piece.startswith("\u2581") or punctuation(piece[0])), piece
    assert spaced > 100
    # a Chinese sentence is words of a character or a few, not one word of the whole sentence
    ids = sp.Encode("我们今天学习自然语言处理。")
    assert sum(table[i] & WORD_START for i in ids) >= len(ids) - 1, [sp.IdToPiece(i) for i in ids]


def test_whole_words_keep_their_combining_marks_and_part_at_punctuation(tmp_path):
    """Hindi words are the text between spaces, their vowel signs and viramas on them (each piece that starts with
    a mark goes on its word); a parenthesis or quotation mark is a word of its own on either side, as in BERT's
    basic tokenizer."""
    from data_prep.masking import words

    hindi = ["लड़कों ने बच्चियों को किताबें दीं।", "बच्चियों ने लड़कों को चिट्ठियाँ लिखीं।",
             "हमने किताबें पढ़ीं और चिट्ठियाँ भेजीं।"]
    marked = ['Call foo(bar) with "quoted" values (see below) now.', 'Say "yes" (or no) to foo(baz) twice.']
    train(sentences(1200) + hindi * 40 + marked * 20, TokenizerConfig(vocab_size=170, threads=1), tmp_path / "m.model")
    sp = load(tmp_path / "m.model")
    table = word_start_table(sp)
    for text in hindi + marked:
        pieces = sp.EncodeAsPieces(text)
        ids = [sp.PieceToId(x) for x in pieces]
        got = ["".join(pieces[i] for i in w) for w in words(ids, np.ones(len(ids), bool), table)]
        want = []  # the words of BERT's basic tokenizer, a space marker on the first of each run between spaces
        for run in text.split(" "):
            marks = "".join(filter(punctuation, run))
            parts = [x for x in re.split(f"([{re.escape(marks)}])", run) if x] if marks else [run]
            want += ["\u2581" + parts[0], *parts[1:]]
        assert got == want, (text, pieces)
    assert any(unicodedata.category(x[0])[0] == "M" for x in sp.EncodeAsPieces(" ".join(hindi)))  # (marks start pieces)


def test_byte_pieces_go_on_their_word(tmp_path):
    """A model with byte fallback spells a character it has no piece for as bytes (`<0xC3>` `<0xAF>`): they are
    part of the word they stand in, not words of their own (their `<`, `>` are not the text's punctuation)."""
    from data_prep.masking import words

    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences()), model_prefix=str(tmp_path / "bytes"),
                                   vocab_size=400, pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, pad_piece="[PAD]",
                                   unk_piece="[UNK]", control_symbols=["[CLS]", "[SEP]", "[MASK]"], byte_fallback=True,
                                   character_coverage=1.0, minloglevel=2)
    sp = load(tmp_path / "bytes.model")
    table = word_start_table(sp)
    pieces = sp.EncodeAsPieces("quiet naïve river")
    assert any(sp.IsByte(sp.PieceToId(x)) for x in pieces), pieces
    ids = [sp.PieceToId(x) for x in pieces]
    got = ["".join(pieces[i] for i in w) for w in words(ids, np.ones(len(ids), bool), table)]
    assert len(got) == 3 and got[0].startswith("\u2581") and "<0xC3><0xAF>" in got[1], got


def test_foreign_model_is_refused_with_the_key(tmp_path):
    prefix = tmp_path / "plain"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences()), model_prefix=str(prefix), vocab_size=100,
                                   minloglevel=2)
    with pytest.raises(ConfigError) as e:
        load(f"{prefix}.model")
    assert "tokenizer.path" in str(e.value) and "[PAD]=0" in str(e.value)
    # the right names at the right ids, but [CLS]/[SEP]/[MASK] user-defined: text would make them
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences()), model_prefix=str(tmp_path / "ud"),
                                   vocab_size=100, pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, pad_piece="[PAD]",
                                   unk_piece="[UNK]", user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"],
                                   minloglevel=2)
    with pytest.raises(ConfigError, match=r"has \[CLS\], \[SEP\], \[MASK\] as ordinary pieces at ids 0-4"):
        load(tmp_path / "ud.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="tokenizer.path.*not a sentencepiece model"):
        load(tmp_path / "junk.model")
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "missing.model")
    (tmp_path / "ds" / "tokenizer").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"is a directory; give the model file \(a sentencepiece \.model"):
        load(tmp_path / "ds")
    shutil.copyfile(f"{prefix}.model", tmp_path / "ds" / "tokenizer" / "spm.model")  # (any file: it is named)
    with pytest.raises(ConfigError, match=f"is a directory; give the model file: tokenizer.path={tmp_path}/ds/"
                                          "tokenizer/spm.model"):
        load(tmp_path / "ds")


@pytest.mark.parametrize("vocab, message", [
    (20, r"tokenizer.vocab_size=20 is too small for this corpus: its text has \d+ distinct characters"),
    (5000, r"tokenizer.vocab_size=5000 is too large for this corpus: sentencepiece can learn at most \d+ pieces "
           r"from the sampled text. Set tokenizer.vocab_size=\d+ or lower, or add text \(the sample already holds all "
           r"300 sentences of the corpus\)"),
])
def test_a_vocabulary_the_corpus_cannot_fill_is_said_in_the_configs_words(tmp_path, vocab, message):
    from data_prep.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match=message):
        train(sentences(300), TokenizerConfig(vocab_size=vocab, threads=1), tmp_path / "x.model")
    assert not list(tmp_path.iterdir()), "nothing written"


def test_a_sample_short_of_the_corpus_says_to_raise_it(tmp_path):
    from data_prep.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match=r"or add text, or raise tokenizer.sample_sentences \(now 300; the "
                                             r"sample holds 300 of the corpus's 2,000 sentences\)\.$"):
        train(sentences(300), TokenizerConfig(vocab_size=5000, threads=1, sample_sentences=300), tmp_path / "x.model",
              corpus_sentences=2000)


def test_sentences_too_long_to_train_on_are_counted_and_named():
    """sentencepiece leaves out sentences over its byte limit: one line of a paragraph per document trains on
    nothing, and the error says to split sentences (no tokenizer.* setting helps)."""
    import tempfile

    from data_prep.tokenizer import MAX_TRAINING_SENTENCE_BYTES, TokenizerError

    long = ["word " * (MAX_TRAINING_SENTENCE_BYTES // 5 + 1) for _ in range(20)]
    with tempfile.TemporaryDirectory() as d, pytest.raises(TokenizerError) as e:
        train(iter(long), TokenizerConfig(vocab_size=50, threads=1), Path(d) / "x.model")
    assert str(e.value).startswith(f"every one of the 20 sampled sentences is longer than {MAX_TRAINING_SENTENCE_BYTES}"
                                   " bytes") and "read.split_sentences=always" in str(e.value)
    with tempfile.TemporaryDirectory() as d:
        seen = train(iter(sentences(300) + long[:5]), TokenizerConfig(vocab_size=150, threads=1), Path(d) / "x.model")
    assert seen == {"sentences": 305, "too_long": 5}
