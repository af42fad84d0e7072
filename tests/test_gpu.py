"""Training on a CUDA device (skipped without one): bf16 and fp16 under ZeRO, NCCL chosen automatically.

MLflow is off here (metrics.jsonl is what these tests read), so a GPU machine needs no tracking store.
    BERTFORGE_TRAIN_DATASET=DIR pytest -m gpu tests/test_gpu.py   # DIR: a dataset built once, e.g. on a CPU machine
"""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import pretrain_config, read_metrics, run_pretrain

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("precision, stage", [("bf16", 1), ("fp16", 2), ("bf16", 3)])
def test_training_on_gpu(tmp_path, train_dataset, precision, stage):
    cfg = tmp_path / "pretrain.yaml"
    cfg.write_text(yaml.safe_dump(pretrain_config(
        train_dataset, tmp_path / "ck", precision=precision, deepspeed__zero_stage=stage, train__max_steps=40,
        data__num_workers=2, train__lr=2e-3, mlflow__enabled=False)))
    out = run_pretrain(cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"cuda rank(s), {precision}, ZeRO-{stage}" in out.stdout
    assert ("compiled layers" in out.stdout) == (stage < 3)  # train.compile=auto: on with CUDA, off under ZeRO-3
    m = read_metrics(tmp_path / "ck")
    assert sum(m[s]["loss"] for s in range(31, 41)) < sum(m[s]["loss"] for s in range(1, 11))
    if precision == "fp16":
        assert m[40]["loss_scale"] > 0


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_nan_step_under_lamb_is_skipped_and_counted(tmp_path, train_dataset, precision):
    """LAMB (ZeRO-0, CUDA only) in bf16 or fp32: DeepSpeed's fused LAMB has no inf/NaN check of its own; ours
    skips the step, as for AdamW."""
    cfg = tmp_path / "pretrain.yaml"
    cfg.write_text(yaml.safe_dump(pretrain_config(
        train_dataset, tmp_path / "ck", precision=precision, deepspeed__zero_stage=0, train__optimizer="lamb",
        train__max_steps=6, debug__nan_at_step=3, mlflow__enabled=False)))
    out = run_pretrain(cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 3: non-finite loss or gradient; the update was skipped (1 skipped so far)" in out.stderr
    m = read_metrics(tmp_path / "ck")
    assert m[3]["skipped_steps"] == 1 and all(m[s]["loss"] == m[s]["loss"] for s in (4, 5, 6))


def test_export_refuses_fp16_weights_without_zero(tmp_path, train_dataset):
    """DeepSpeed's fp16 mode without ZeRO keeps fp16 weights in the module (the fp32 ones in its optimizer
    wrapper): export says so and what to train with, rather than writing half-precision weights."""
    from pretrain.export import ExportError, export

    cfg = tmp_path / "pretrain.yaml"
    cfg.write_text(yaml.safe_dump(pretrain_config(train_dataset, tmp_path / "ck", precision="fp16",
                                                  deepspeed__zero_stage=0, train__max_steps=4,
                                                  checkpoint__every_steps=4, mlflow__enabled=False)))
    out = run_pretrain(cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    with pytest.raises(ExportError, match=r"\(precision fp16, ZeRO-0\) holds float16 module weights.*zero_stage >= 1"):
        export(tmp_path / "ck", tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_optimized_training_matches_the_plain_path_in_bf16(tmp_path, train_dataset):
    """300 bf16 steps each way: the default path on a GPU (unpadded, compiled layers) trains the model the
    plain path (padded, eager) does."""
    curves = {}
    for fast in (True, False):
        cfg = tmp_path / f"fast-{fast}.yaml"
        cfg.write_text(yaml.safe_dump(pretrain_config(
            train_dataset, tmp_path / f"ck-{fast}", precision="bf16", train__max_steps=300, train__unpad=fast,
            train__compile="auto" if fast else False, model__dropout=0.0, model__attention_dropout=0.0,
            checkpoint__every_steps=0, data__eval_examples=0, train__log_every=50, mlflow__enabled=False)))
        out = run_pretrain(cfg, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        assert ("compiled layers" in out.stdout) == fast
        m = read_metrics(tmp_path / f"ck-{fast}")
        curves[fast] = [m[s]["loss"] for s in range(1, 301)]
    fast, plain = curves[True], curves[False]
    # bf16 rounds differently along the two paths, so steps drift apart a little; the curves must not
    assert sum(abs(a - b) for a, b in zip(fast, plain)) / 300 < 0.05
    assert abs(sum(fast[-50:]) - sum(plain[-50:])) / sum(plain[-50:]) < 0.02
    assert sum(fast[-50:]) < sum(fast[:50])  # and both learned


def test_varlen_attention_on_gpu_computes_what_the_padded_path_does():
    """Nested jagged attention dispatches to a fused varlen kernel on CUDA (on CPU it falls back to a loop): in
    bf16 under autocast, eager and compiled, it gives the padded path's outputs and gradients."""
    from test_model import batch

    from pretrain.model import BertForPretraining, compile_layers, pretraining_loss
    from pretrain.presets import preset

    torch.manual_seed(0)
    c = preset("mini", 500, dropout=0.0, attention_dropout=0.0)
    plain = BertForPretraining(c).cuda()
    varlen = BertForPretraining(c, unpad=True, varlen=True).cuda()
    varlen.load_state_dict(plain.state_dict())
    compiled = compile_layers(BertForPretraining(c, unpad=True, varlen=True).cuda())
    compiled.load_state_dict(plain.state_dict())
    ids, types, mask, masked = (t.cuda() for t in batch(c, B=3, L=64))
    labels, nsp_labels = ids.view(-1)[masked], torch.tensor([0, 1, 0], device="cuda")
    results = []
    for model in (plain, varlen, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            mlm, nsp = model(ids, types, mask, masked)
            loss, _, _ = pretraining_loss(mlm, labels, nsp, nsp_labels)
        loss.backward()
        results.append((mlm.float(), model.bert.layers[0].attention.query.weight.grad))
    for mlm, grad in results[1:]:
        assert torch.allclose(mlm, results[0][0], atol=5e-2, rtol=5e-2), (mlm - results[0][0]).abs().max()
        assert torch.allclose(grad, results[0][1], atol=5e-3, rtol=5e-2), (grad - results[0][1]).abs().max()
