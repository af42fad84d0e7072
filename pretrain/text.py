"""Raw text -> model inputs with the dataset's sentencepiece model, and sentence embeddings from the encoder."""

from __future__ import annotations

import re

import numpy as np
import sentencepiece as spm
import torch

from data_prep.config import CLS_ID, PAD_ID, SEP_ID, SPECIAL_PIECES
from data_prep.sources import plain_text
from pretrain.model import BertForPretraining

# A special piece spelt out in a text ("premise [SEP] hypothesis") is that token, as transformers' tokenizers read
# it; sentencepiece alone would read it as characters.
_SPECIAL = re.compile("(" + "|".join(re.escape(p) for p in SPECIAL_PIECES) + ")")


def as_texts(values, what: str = "input") -> list[str]:
    """`values` as texts; a missing one (None, NaN: a gap in a DataFrame) is an error naming its row, not the
    text "None"."""
    out = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and v != v):
            raise ValueError(f"{what} row {i} has no text ({v!r})")
        out.append(v if isinstance(v, str) else str(v))
    return out


def encode(sp: spm.SentencePieceProcessor, texts: list[str], max_len: int,
           pairs: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, truncated to `max_len`, padded: the ids, segment ids and
    masks of the exported transformers tokenizer (`hf_compat.fast_tokenizer`), truncation included.

    Returns (input_ids, token_type_ids, attention_mask), each (B, L) with L the longest row.
    """
    a = _pieces(sp, texts)
    b = _pieces(sp, pairs) if pairs is not None else [None] * len(a)
    rows, types = [], []
    for x, y in zip(a, b, strict=True):
        room = max_len - (3 if y is not None else 2)
        if y is None:
            x = x[:room]
        elif len(x) + len(y) > room:
            # transformers' "longest_first": the shorter side (the first, at equal lengths) keeps up to half the
            # room, the other side the rest
            half = min(len(x), len(y), room // 2)
            x, y = (x[:half], y[:room - half]) if len(x) <= len(y) else (x[:room - half], y[:half])
        ids = [CLS_ID, *x, SEP_ID] + ([*y, SEP_ID] if y is not None else [])
        rows.append(ids)
        types.append([0] * (len(x) + 2) + [1] * (len(ids) - len(x) - 2))
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), PAD_ID, np.int64)
    tt = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)  # (by length: a "[PAD]" in a text is a real token)
    for i, (r, t) in enumerate(zip(rows, types, strict=True)):
        ids[i, :len(r)], tt[i, :len(t)], mask[i, :len(r)] = r, t, 1
    return torch.from_numpy(ids), torch.from_numpy(tt), torch.from_numpy(mask)


def _pieces(sp: spm.SentencePieceProcessor, texts: list[str]) -> list[list[int]]:
    """Each text's pieces, its text cleaned as pretraining's corpus was (`plain_text`)."""
    texts = list(texts)
    if not any("[" in t for t in texts):
        return [list(ids) for ids in sp.encode(list(map(plain_text, texts)))]  # (the common case, in one call)
    out = []
    for t in texts:
        ids: list[int] = []
        for i, part in enumerate(_SPECIAL.split(t)):
            ids.extend([SPECIAL_PIECES.index(part)] if i % 2 else sp.encode(plain_text(part)))
        out.append(ids)
    return out


@torch.no_grad()
def embed(model: BertForPretraining, sp: spm.SentencePieceProcessor, texts: list[str], max_len: int,
          pooling: str = "cls", batch_size: int = 64) -> np.ndarray:
    """(N, H) float32 sentence embeddings: the final [CLS] state, or the mean over real tokens."""
    if pooling not in ("cls", "mean"):
        raise ValueError(f"pooling must be 'cls' or 'mean', not {pooling!r}")
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        ids, types, mask = (t.to(device) for t in encode(sp, texts[i:i + batch_size], max_len))
        seq, _ = model.bert(ids, types, mask)
        if pooling == "cls":
            out.append(seq[:, 0])
        else:
            m = mask.unsqueeze(-1).to(seq.dtype)
            out.append((seq * m).sum(1) / m.sum(1))
    return torch.cat(out).float().cpu().numpy() if out else np.zeros((0, model.bert.embeddings.word.weight.shape[1]),
                                                                     np.float32)
