"""Training on a CUDA device (skipped without one): bf16 and fp16 under ZeRO, NCCL chosen automatically."""

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
        data__num_workers=2, train__lr=2e-3)))
    out = run_pretrain(cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"cuda rank(s), {precision}, ZeRO-{stage}" in out.stdout
    m = read_metrics(tmp_path / "ck")
    assert sum(m[s]["loss"] for s in range(31, 41)) < sum(m[s]["loss"] for s in range(1, 11))
    if precision == "fp16":
        assert m[40]["loss_scale"] > 0
