"""Train, load and check the sentencepiece tokenizer; BERT's special tokens sit at fixed ids 0-4."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import unicodedata
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from data_prep.config import SPECIAL_PIECES, TokenizerConfig
from data_prep.configfile import ConfigError
from data_prep.masking import NEXT_STARTS, WORD_START

# sentencepiece skips longer sentences during training; we pass them through unchanged otherwise.
MAX_TRAINING_SENTENCE_BYTES = 4192


class TokenizerError(Exception):
    """The tokenizer cannot be trained or used; the message says which key to change."""


def sha256_file(path: str | Path) -> str:
    """The file's sha256 (hex); `path` may be an fsspec URL (s3://, gs://, ...)."""
    h = hashlib.sha256()
    if "://" in str(path):
        import fsspec

        opened = fsspec.open(str(path), "rb")
    else:
        opened = open(path, "rb")  # (closed by the with below)
    with opened as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def train(sentences: Iterable[str], cfg: TokenizerConfig, out_path: Path,
          corpus_sentences: int | None = None) -> dict[str, int]:
    """Train on `sentences` (already a sample of the corpus's `corpus_sentences`, where known) and write the model
    to `out_path` atomically; returns {"sentences": how many, "too_long": how many of them sentencepiece left out
    for their length}."""
    buf = io.BytesIO()
    seen = {"sentences": 0, "too_long": 0}

    def counted() -> Iterable[str]:
        for s in sentences:
            seen["sentences"] += 1
            seen["too_long"] += len(s.encode("utf-8")) > MAX_TRAINING_SENTENCE_BYTES
            yield s

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted(),
            model_writer=buf,
            vocab_size=cfg.vocab_size,
            model_type=cfg.model_type,
            character_coverage=cfg.character_coverage,
            pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
            pad_piece=SPECIAL_PIECES[0], unk_piece=SPECIAL_PIECES[1],
            control_symbols=list(SPECIAL_PIECES[2:]),
            # The sample is already drawn across the corpus with our seed: use it all, in order.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=MAX_TRAINING_SENTENCE_BYTES,
            split_digits=cfg.split_digits,
            normalization_rule_name="nmt_nfkc_cf" if cfg.lowercase else "nmt_nfkc",
            num_threads=cfg.threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise TokenizerError(_explain_training_error(str(e), cfg, corpus_sentences=corpus_sentences, **seen)) from None
    from data_prep.shards import write_whole

    write_whole(out_path, lambda tmp: tmp.write_bytes(buf.getvalue()))  # (on disk before the records that follow)
    return seen


def _explain_training_error(msg: str, cfg: TokenizerConfig, sentences: int = 0, too_long: int = 0,
                            corpus_sentences: int | None = None) -> str:
    if sentences and too_long == sentences:
        return (f"every one of the {sentences:,} sampled sentences is longer than {MAX_TRAINING_SENTENCE_BYTES} "
                "bytes, which sentencepiece does not train on: the corpus's lines are paragraphs or whole "
                "documents, not sentences. Set read.split_sentences=always to split them into sentences.")
    m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
    if m:
        return (
            f"tokenizer.vocab_size={cfg.vocab_size} is too small for this corpus: its text has {m.group(2)} distinct "
            f"characters that must each be a piece. Set tokenizer.vocab_size above {m.group(2)} (BERT's vocabularies "
            "hold 30,000 or so), or lower tokenizer.character_coverage to leave rare characters to [UNK]."
        )
    m = re.search(r"value <= (\d+)", msg)
    whole = sentences >= corpus_sentences if corpus_sentences is not None else sentences < cfg.sample_sentences
    if m:
        return (
            f"tokenizer.vocab_size={cfg.vocab_size} is too large for this corpus: sentencepiece can learn at most "
            f"{m.group(1)} pieces from the sampled text. Set tokenizer.vocab_size={m.group(1)} or lower, or add text"
            + (f" (the sample already holds all {sentences:,} sentences of the corpus)." if whole else
               f", or raise tokenizer.sample_sentences (now {cfg.sample_sentences:,}; the sample holds {sentences:,}"
               + (f" of the corpus's {corpus_sentences:,} sentences)." if corpus_sentences else " sentences)."))
        )
    return f"sentencepiece could not train a tokenizer: {msg.strip()} (check the tokenizer.* settings)"


def load(path: str | Path, key: str = "tokenizer.path") -> spm.SentencePieceProcessor:
    """Load a model and check that BERT's special pieces are where the rest of the system expects them."""
    p = Path(path)
    if p.is_dir():
        inside = next((str(q) for q in (p / "spm.model", p / "tokenizer" / "spm.model") if q.is_file()), None)
        raise ConfigError(f"{key}: '{path}' is a directory; give the model file" +
                          (f": {key}={inside}" if inside else " (a sentencepiece .model, e.g. DATASET/tokenizer/"
                                                              "spm.model)"))
    if not p.is_file():
        raise ConfigError(f"{key}: '{path}' does not exist")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(p))
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"{key}: '{path}' is not a sentencepiece model ({e})") from None
    found = [sp.IdToPiece(i) if i < sp.GetPieceSize() else None for i in range(len(SPECIAL_PIECES))]
    # [CLS], [SEP] and [MASK] as control pieces: sentencepiece never makes them from text (as user-defined pieces
    # it would, and a corpus's "[SEP]" would become a separator, or a masking target's answer)
    kinds = [found[0] and sp.IsControl(0), found[1] and sp.IsUnknown(1), *(
        found[i] and sp.IsControl(i) for i in range(2, len(found)))]
    if found != list(SPECIAL_PIECES) or not all(kinds):
        want = ", ".join(f"{s}={i}" for i, s in enumerate(SPECIAL_PIECES))
        what = (f"pieces {found}" if found != list(SPECIAL_PIECES) else
                f"{', '.join(p for p, ok in zip(found, kinds, strict=True) if not ok)} as ordinary pieces")
        raise ConfigError(
            f"{key}: '{path}' has {what} at ids 0-4; this system needs {want}, the last three as control "
            "symbols. Train one with pad_id=0 unk_id=1 bos_id=-1 eos_id=-1 pad_piece=[PAD] unk_piece=[UNK] "
            "control_symbols=[CLS],[SEP],[MASK], or leave tokenizer.path empty to train one."
        )
    return sp


def refuse_extra_control(sp: spm.SentencePieceProcessor, path: str | Path, key: str = "tokenizer.path") -> None:
    """Refuse a model with control or unused pieces past ids 0-4 (`<s>`, language tags): masking's random
    replacements are drawn from ids 5 and up, and would put them into the text."""
    extra = [i for i in range(len(SPECIAL_PIECES), sp.GetPieceSize()) if sp.IsControl(i) or sp.IsUnused(i)]
    if extra:
        named = ", ".join(f"{sp.IdToPiece(i)}={i}" for i in extra[:5]) + (", ..." if len(extra) > 5 else "")
        raise ConfigError(f"{key}: '{path}' has {len(extra)} control or unused pieces besides ids 0-4 ({named}); "
                          "masking's random replacements would put them into examples. Train it with "
                          "control_symbols=[CLS],[SEP],[MASK] only (user_defined_symbols for pieces that stand in the "
                          "text), or leave tokenizer.path empty to train one.")


def model_type(path: str | Path) -> str:
    """The algorithm a model file was trained with ("unigram", "bpe", ...), read from the file itself."""
    from sentencepiece import sentencepiece_model_pb2 as pb  # (protobuf: installed with Ray and MLflow)

    proto = pb.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()


def cached(path: str, key: str = "tokenizer.path") -> tuple[spm.SentencePieceProcessor, bytes]:
    """(processor, word-start table) for a model file, loaded once per worker process while the file is unchanged;
    `key` names where the file came from in an error (as in `load`)."""
    st = os.stat(path)
    return _cached(path, st.st_size, st.st_mtime_ns, key)


@functools.lru_cache(maxsize=4)
def _cached(path: str, size: int, mtime_ns: int, key: str) -> tuple[spm.SentencePieceProcessor, bytes]:
    sp = load(path, key)
    return sp, word_start_table(sp)


# Scripts written without spaces between words, whose every character BERT's basic tokenizer makes a word of its
# own (Google's covers the CJK ideographs; the kana are here too: a run of them is not one word either)
UNSPACED = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF),
            (0x2A700, 0x2CEAF), (0x2F800, 0x2FA1F), (0x30000, 0x3134F))


def unspaced(ch: str) -> bool:
    """Whether `ch` is a character of a script written without spaces (CJK ideographs, kana)."""
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in UNSPACED)


def punctuation(ch: str) -> bool:
    """Whether `ch` is a punctuation mark or a symbol (Unicode categories P* and S*): a word of its own."""
    return unicodedata.category(ch)[0] in "PS"


def word_start_table(sp: spm.SentencePieceProcessor) -> bytes:
    """`table[id] & WORD_START` when piece `id` begins a word, `table[id] & NEXT_STARTS` when the piece after it
    does (for whole-word masking; the bits are `data_prep.masking`'s).

    A piece begins a word when it carries sentencepiece's space marker, starts with a punctuation mark or symbol,
    or starts with a CJK or kana character, so `"▁word" "."` are two words and so are `"中" "国"`, as BERT's basic
    tokenizer would have them (without the last, a sentence of Chinese is one "word", too long to mask). A piece
    that ends with such a character ends its word: in `"国" "abc"` and `"▁(" "bar"` the Latin word is one of its
    own, as BERT's basic tokenizer (a space around every CJK character and punctuation mark) has it. A piece that
    starts with a combining mark (a vowel sign or virama of an Indic script, a Thai tone mark, an Arabic or Hebrew
    diacritic) or an invisible joiner goes on its word.
    """
    table = bytearray(sp.GetPieceSize())
    for i in range(sp.GetPieceSize()):
        piece = sp.IdToPiece(i)
        first, special = piece[:1], sp.IsControl(i) or sp.IsUnknown(i)  # ([UNK] may stand inside a word)
        last = piece.rstrip("\u2581")[-1:]  # (the marker, a symbol itself, only begins the word after it)
        if sp.IsByte(i):  # a byte of a character without a piece (byte_fallback): `<0xC3>` goes on its word
            continue
        begins = special or not first or first == "\u2581" or punctuation(first) or unspaced(first)
        ends = not special and bool(last) and (punctuation(last) or unspaced(last))
        table[i] = (WORD_START if begins else 0) | (NEXT_STARTS if ends else 0)
    return bytes(table)
