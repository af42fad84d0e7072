"""The model: shapes, presets, pre-LN, and numerical equality with transformers' BertForPreTraining."""

from __future__ import annotations

import pytest
import torch

from pretrain.hf_compat import hf_config_fields, to_hf_state_dict
from pretrain.model import BertForPretraining, compile_layers, pretraining_loss
from pretrain.presets import PRESETS, ModelConfig, padded_vocab, preset


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
    assert torch.isclose(m, torch.nn.functional.cross_entropy(mlm, ids.view(-1)[masked]))  # (the token mean)
    total.backward()
    assert model.bert.embeddings.word.weight.grad is not None
    # a micro batch without a masked token (whole-word masking skipped every word): no MLM loss, not NaN
    none = mlm[:0]
    for masked_total in (None, torch.tensor(0)):
        total, m, _ = pretraining_loss(none, ids.view(-1)[:0], nsp, torch.tensor([0, 1, 0]), masked_total)
        assert m.item() == 0.0 and torch.isfinite(total), masked_total


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


@pytest.mark.parametrize("pre_ln, varlen", [(False, False), (True, False), (False, True), (True, True)])
def test_unpadded_path_computes_the_same_outputs_and_gradients(pre_ln, varlen):
    torch.manual_seed(0)
    c = preset("tiny", 500, pre_ln=pre_ln, dropout=0.0, attention_dropout=0.0)
    plain, unpadded = BertForPretraining(c), BertForPretraining(c, unpad=True, varlen=varlen)
    unpadded.load_state_dict(plain.state_dict())
    assert_same_outputs_and_gradients(plain, unpadded, *batch(c))


def assert_same_outputs_and_gradients(a: BertForPretraining, b: BertForPretraining, ids, types, mask, masked):
    labels, nsp_labels = ids.view(-1)[masked], torch.tensor([0, 1, 0])
    results = []
    for model in (a, b):
        model.zero_grad()
        mlm, nsp = model(ids, types, mask, masked)
        loss, _, _ = pretraining_loss(mlm, labels, nsp, nsp_labels)
        loss.backward()
        results.append((mlm, nsp, {n: p.grad for n, p in model.named_parameters()}))
    (mlm_a, nsp_a, grads_a), (mlm_b, nsp_b, grads_b) = results
    assert torch.allclose(mlm_a, mlm_b, atol=1e-5) and torch.allclose(nsp_a, nsp_b, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5), name


@pytest.mark.parametrize("unpad, varlen", [(True, False), (False, False), (True, True)])
def test_compiled_layers_are_captured_whole_once_and_compute_the_same(unpad, varlen):
    """`compile_layers` as on GPUs, through the compiler's front end (dynamo + autograd capture, no codegen):
    every layer is one graph (fullgraph: a graph break fails), all layers share it, a batch with another
    real-token count reuses it, and outputs and gradients equal the eager model's. With varlen attention the
    one break is around its eager core: three graphs (before it, the output projection, the rest of the layer)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    c = preset("tiny", 500, num_layers=3, dropout=0.0, attention_dropout=0.0)
    eager = BertForPretraining(c, unpad=unpad, varlen=varlen)
    compiled = BertForPretraining(c, unpad=unpad, varlen=varlen)
    compiled.load_state_dict(eager.state_dict())
    compile_layers(compiled, backend="aot_eager")
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints are interchangeable
    torch._dynamo.reset()
    counters.clear()
    for seed in (0, 1):  # the second batch has another number of real tokens
        ids, types, mask, masked = batch(c, seed=seed)
        if seed:
            mask[1, 10:] = 0
        assert_same_outputs_and_gradients(eager, compiled, ids, types, mask, masked)
    assert counters["stats"]["unique_graphs"] == (3 if varlen else 1), dict(counters["stats"])
    breaks = list(counters["graph_break"])
    assert all("varlen_attention" in b for b in breaks) and (len(breaks) > 0) == varlen, breaks
    assert counters["stats"]["calls_captured"] > 0


def test_unpadded_training_follows_the_plain_loss_curve():
    """40 AdamW steps on batches with 0-60% padding: the three paths (padded, unpadded, unpadded with varlen
    attention) train the same model (fp32, no dropout)."""
    torch.manual_seed(1)
    c = preset("tiny", 300, dropout=0.0, attention_dropout=0.0)
    models = [BertForPretraining(c), BertForPretraining(c, unpad=True), BertForPretraining(c, unpad=True, varlen=True)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=2e-3) for m in models]
    g = torch.Generator().manual_seed(2)
    curves: list[list[float]] = [[], [], []]
    B, L = 8, 32
    for _ in range(40):
        lengths = torch.randint(L * 4 // 10, L + 1, (B,), generator=g)
        mask = (torch.arange(L)[None] < lengths[:, None]).long()
        ids = torch.randint(5, 300, (B, L), generator=g) * mask
        types = ((torch.arange(L)[None] >= (lengths // 2)[:, None]) & mask.bool()).long()
        masked = torch.cat([b * L + torch.randperm(int(lengths[b]) - 1, generator=g)[:4] + 1 for b in range(B)])
        labels, nsp_labels = ids.view(-1)[masked], (lengths > L * 7 // 10).long()  # learnable: copy, length
        for model, opt, curve in zip(models, opts, curves):
            mlm, nsp = model(ids, types, mask, masked)
            loss, _, _ = pretraining_loss(mlm, labels, nsp, nsp_labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
    assert curves[0][-1] < curves[0][0] - 0.5  # it learned something, so equal curves mean something
    assert curves[1] == pytest.approx(curves[0], rel=1e-4, abs=1e-5)
    assert curves[2] == pytest.approx(curves[0], rel=1e-4, abs=1e-5)
