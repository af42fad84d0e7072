"""The model: shapes, presets, pre-LN, and numerical equality with transformers' BertForPreTraining."""

from __future__ import annotations

import pytest
import torch

from pretrain.hf_compat import hf_config_fields, to_hf_state_dict
from pretrain.model import PRESETS, BertForPretraining, ModelConfig, padded_vocab, pretraining_loss, preset


def batch(c: ModelConfig, B: int = 3, L: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, c.vocab_size, (B, L), generator=g)
    lengths = torch.tensor([L, L - 7, 9])[:B]
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = ids * mask
    types = ((torch.arange(L)[None] >= (lengths // 2)[:, None]) & mask.bool()).long()
    masked = torch.tensor([1, 3, L + 2, L + 5, 2 * L + 1])  # flat positions into B * L, real tokens only
    return ids, types, mask, masked


def test_presets_have_googles_sizes_and_a_padded_vocab():
    assert padded_vocab(30522) == 30528 and padded_vocab(8000) == 8000 and padded_vocab(8001) == 8064
    c = preset("base", 30522)
    assert (c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size, c.vocab_size) == (12, 768, 12, 3072, 30528)
    assert set(PRESETS) == {"tiny", "mini", "small", "medium", "base", "large"}
    assert preset("tiny", 1000, num_layers=3).num_layers == 3
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(hidden_size=100, num_heads=3)


@pytest.mark.parametrize("pre_ln", [False, True])
def test_forward_shapes_and_padding_does_not_leak(pre_ln):
    c = preset("tiny", 500, pre_ln=pre_ln, dropout=0.0, attention_dropout=0.0)
    model = BertForPretraining(c).eval()
    ids, types, mask, masked = batch(c)
    mlm, nsp = model(ids, types, mask, masked)
    assert mlm.shape == (5, c.vocab_size) and nsp.shape == (3, 2)
    # Changing what sits in padded slots changes nothing for real tokens.
    ids2 = ids.clone()
    ids2[mask == 0] = 7
    mlm2, nsp2 = model(ids2, types, mask, masked)
    assert torch.allclose(mlm, mlm2, atol=1e-6) and torch.allclose(nsp, nsp2, atol=1e-6)
    total, m, n = pretraining_loss(mlm, ids.view(-1)[masked], nsp, torch.tensor([0, 1, 0]))
    assert torch.isclose(total, m + n) and total.requires_grad
    total.backward()
    assert model.bert.embeddings.word.weight.grad is not None


def test_equals_transformers_bert_for_pretraining():
    import transformers  # a dev dependency: its absence fails the test rather than skipping it
    torch.manual_seed(0)
    c = preset("mini", 1000, dropout=0.0, attention_dropout=0.0)
    ours = BertForPretraining(c).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so a wrong mapping cannot hide
        for name, p in ours.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    theirs = transformers.BertForPreTraining(transformers.BertConfig(**hf_config_fields(c))).eval()
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    ids, types, mask, masked = batch(c, L=40)
    with torch.no_grad():
        mlm, nsp = ours(ids, types, mask, masked)
        out = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
    ref_mlm = out.prediction_logits.reshape(-1, c.vocab_size)[masked]
    assert torch.allclose(mlm, ref_mlm, atol=1e-5, rtol=0), (mlm - ref_mlm).abs().max()
    assert torch.allclose(nsp, out.seq_relationship_logits, atol=1e-5, rtol=0)
