"""Decoded shard samples -> model-ready tensors, with the shards' masks (static) or fresh ones (dynamic).

Dynamic masks are redrawn per epoch as a pure function of (seed, epoch, example key), with the same
batched masking code data prep uses, so a resumed run redraws exactly what it would have drawn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from data_prep.examples import ExampleParams, stable_seed
from data_prep.masking import mask_batch, noise_bytes
from data_prep.shards import decode_sample


@dataclass
class Batch:
    """B examples padded to the batch's longest (rounded up to 8); M masked tokens in all."""

    input_ids: torch.Tensor        # (B, L) long, masks applied
    token_type_ids: torch.Tensor   # (B, L) long
    attention_mask: torch.Tensor   # (B, L) long, 1 for real tokens
    masked_positions: torch.Tensor  # (M,) long, flat indices into B * L
    mlm_labels: torch.Tensor       # (M,) long, the original tokens there
    nsp_labels: torch.Tensor | None  # (B,) long, 1 = random next; None without NSP
    real_tokens: int               # non-padding tokens, for throughput figures
    keys: list[str] = field(default_factory=list)  # the examples' `__key__`s, in row order
    epoch: int = 0                 # the (latest) epoch its examples come from

    def pin_memory(self) -> "Batch":
        return Batch(**{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()})

    def to(self, device: torch.device | str) -> "Batch":
        moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in self.__dict__.items()}
        return Batch(**moved)


class Collator:
    """Builds `Batch`es for one dataset (its manifest says the dtypes, lengths and whether NSP is on)."""

    def __init__(self, manifest: dict, masking: str = "static", seed: int = 0, vocab_size: int | None = None,
                 word_start: bytes | None = None):
        if masking not in ("static", "dynamic"):
            raise ValueError(f"train.masking must be 'static' or 'dynamic', not {masking!r}")
        ex = manifest["examples"]
        self.max_len = ex["max_seq_length"]
        self.token_dtype = np.dtype(ex["token_dtype"])
        self.nsp = ex["nsp"]
        self.masking, self.seed = masking, seed
        cfg = manifest["config"]["examples"]
        self.params = ExampleParams(
            ex["max_seq_length"], cfg["short_seq_prob"], ex["nsp"], cfg["masked_lm_prob"],
            ex["max_predictions_per_seq"], ex["whole_word_mask"], vocab_size or manifest["tokenizer"]["vocab_size"],
        )
        self.word_start = word_start

    def __call__(self, samples: list[dict], epoch: int | list[int] = 0) -> Batch:
        """`epoch`: one for all samples or one per sample (a batch may straddle an epoch boundary)."""
        B, L = len(samples), self.max_len
        epochs = [epoch] * B if isinstance(epoch, int) else epoch
        ids = np.zeros((B, L), np.int64)
        lengths = np.zeros(B, np.int64)
        b_start = np.zeros(B, np.int64)
        pos_rows, pos_cols, labels = [], [], []
        for i, sample in enumerate(samples):
            s = decode_sample(sample["mp"], self.token_dtype)
            n = len(s["input_ids"])
            ids[i, :n] = s["input_ids"]
            lengths[i], b_start[i] = n, s["segment_b_start"]
            pos = s["masked_lm_positions"].astype(np.int64)
            lab = s["masked_lm_ids"]
            if self.masking == "dynamic":
                ids[i, pos] = lab  # back to the original text; new masks are drawn below
            else:
                pos_rows.append(np.full(len(pos), i))
                pos_cols.append(pos)
                labels.append(lab.astype(np.int64))
        if self.masking == "dynamic":
            noise = b"".join(random.Random(stable_seed(self.seed, e, s["__key__"])).randbytes(
                noise_bytes(1, self.params)) for s, e in zip(samples, epochs))
            m = mask_batch(ids, lengths, b_start, noise, self.params, self.word_start)
            ids = m.input_ids.astype(np.int64)
            used = np.arange(m.positions.shape[1])[None] < m.counts[:, None]
            pos_rows = [np.nonzero(used)[0]]
            pos_cols = [m.positions[used]]
            labels = [m.labels[used].astype(np.int64)]
        width = min(L, int(-(-lengths.max() // 8) * 8))  # pad to the batch's longest, a multiple of 8
        col = np.arange(width)
        rows, cols = np.concatenate(pos_rows), np.concatenate(pos_cols)
        nsp = None
        if self.nsp:
            nsp = torch.tensor([s["mp"]["next_sentence_label"] for s in samples], dtype=torch.long)
        return Batch(
            input_ids=torch.from_numpy(ids[:, :width].copy()),
            token_type_ids=torch.from_numpy(((col[None] >= b_start[:, None]) & (col[None] < lengths[:, None]))
                                            .astype(np.int64)),
            attention_mask=torch.from_numpy((col[None] < lengths[:, None]).astype(np.int64)),
            masked_positions=torch.from_numpy(rows * width + cols),
            mlm_labels=torch.from_numpy(np.concatenate(labels)),
            nsp_labels=nsp,
            real_tokens=int(lengths.sum()),
            keys=[s["__key__"] for s in samples],
            epoch=max(epochs),
        )
