"""The encoder's sizes: `ModelConfig` and Google's named presets. No torch here, so a config (and every
command that only reads one: `cluster render`, `cluster submit`, a bad override) is checked without loading it."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 30528
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    pre_ln: bool = False  # False: post-LayerNorm as the original BERT; True: pre-LN (stabler when deep)
    init_std: float = 0.02

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


# Google's released sizes (layers, hidden, heads); intermediate is 4 x hidden.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


def padded_vocab(vocab_size: int, multiple: int = 64) -> int:
    """Round the tokenizer's vocabulary up so the decoder matmul tiles evenly on GPUs."""
    return int(math.ceil(vocab_size / multiple) * multiple)


def preset(name: str, vocab_size: int, **overrides) -> ModelConfig:
    """A preset's config for a tokenizer of `vocab_size` pieces (padded to a multiple of 64)."""
    layers, hidden, heads = PRESETS[name]
    cfg = ModelConfig(vocab_size=padded_vocab(vocab_size), hidden_size=hidden, num_layers=layers, num_heads=heads,
                      intermediate_size=4 * hidden)
    return replace(cfg, **overrides)
