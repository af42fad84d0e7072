"""Our BERT's weights under transformers' `BertForPreTraining` names, and the matching `BertConfig` fields.

Pure mapping, no transformers import: the equivalence test and the Hugging Face export use it.
Only the post-LayerNorm model has a transformers counterpart.
"""

from __future__ import annotations

import re

import torch

from pretrain.model import ModelConfig

# (our name pattern, transformers' name); {i} is a layer index.
_NAMES = [
    ("bert.embeddings.word.", "bert.embeddings.word_embeddings."),
    ("bert.embeddings.position.", "bert.embeddings.position_embeddings."),
    ("bert.embeddings.token_type.", "bert.embeddings.token_type_embeddings."),
    ("bert.embeddings.norm.", "bert.embeddings.LayerNorm."),
    ("bert.layers.{i}.attention.query.", "bert.encoder.layer.{i}.attention.self.query."),
    ("bert.layers.{i}.attention.key.", "bert.encoder.layer.{i}.attention.self.key."),
    ("bert.layers.{i}.attention.value.", "bert.encoder.layer.{i}.attention.self.value."),
    ("bert.layers.{i}.attention.out.", "bert.encoder.layer.{i}.attention.output.dense."),
    ("bert.layers.{i}.attention_norm.", "bert.encoder.layer.{i}.attention.output.LayerNorm."),
    ("bert.layers.{i}.intermediate.", "bert.encoder.layer.{i}.intermediate.dense."),
    ("bert.layers.{i}.output.", "bert.encoder.layer.{i}.output.dense."),
    ("bert.layers.{i}.output_norm.", "bert.encoder.layer.{i}.output.LayerNorm."),
    ("bert.pooler.", "bert.pooler.dense."),
    ("mlm_transform.", "cls.predictions.transform.dense."),
    ("mlm_norm.", "cls.predictions.transform.LayerNorm."),
    ("nsp.", "cls.seq_relationship."),
]


def _rename(name: str) -> str:
    if name == "mlm_bias":
        return "cls.predictions.bias"
    for ours, theirs in _NAMES:
        pattern = "^" + re.escape(ours).replace(r"\{i\}", r"(\d+)")
        m = re.match(pattern, name)
        if m:
            return theirs.replace("{i}", m.group(1) if m.groups() else "") + name[m.end():]
    raise KeyError(f"no transformers name for parameter '{name}'")


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> `BertForPreTraining`'s (the decoder weight is the tied word embedding)."""
    if any(k.startswith("bert.final_norm.") for k in state):
        raise ValueError("a pre-LayerNorm model has no transformers BERT counterpart")
    out = {_rename(k): v for k, v in state.items()}
    out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]
    out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
    return out


def hf_config_fields(c: ModelConfig) -> dict:
    """Keyword arguments for `transformers.BertConfig` describing the same network."""
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size, hidden_act="gelu",
        hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.attention_dropout,
        max_position_embeddings=c.max_position, type_vocab_size=c.type_vocab_size,
        layer_norm_eps=c.layer_norm_eps, initializer_range=c.init_std, pad_token_id=0,
    )
