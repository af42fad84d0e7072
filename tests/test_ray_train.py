"""Pretraining under Ray Train (TorchTrainer, 2 CPU workers, ZeRO-2 over gloo) computes what one process does."""

from __future__ import annotations

import uuid

import pytest
import yaml
from conftest import pretrain_config, read_metrics, run_pretrain

pytestmark = pytest.mark.slow

STEPS = 6


def _tree(tmp, dataset):
    # No dropout: one process and two ranks draw dropout masks from different generators.
    return pretrain_config(dataset, tmp / "ck", train__max_steps=STEPS, model__dropout=0.0,
                           model__attention_dropout=0.0, deepspeed__zero_stage=2, data__eval_examples=0,
                           checkpoint__every_steps=0, mlflow__enabled=False)


def test_ray_train_runs_the_pretraining_function(tmp_path, train_dataset, ray_local):
    from cluster.jobs import JobSpec
    from cluster.launch import pretrain_on_ray
    from pretrain.config import PretrainConfig

    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "pretrain.yaml").write_text(yaml.safe_dump(_tree(tmp_path / "one", train_dataset)))
    out = run_pretrain(tmp_path / "one" / "pretrain.yaml")
    assert out.returncode == 0, out.stderr[-3000:]
    one = read_metrics(tmp_path / "one" / "ck")

    spec = JobSpec(kind="pretrain", config="unused.yaml", resources={"num_workers": 2},
                   storage=str(tmp_path / "storage"))
    summary = pretrain_on_ray(PretrainConfig.model_validate(_tree(tmp_path / "ray", train_dataset)), spec,
                              f"test-{uuid.uuid4().hex[:8]}")
    assert summary["step"] == STEPS and summary["checkpoint"].endswith(f"step-{STEPS:08d}")
    two = read_metrics(tmp_path / "ray" / "ck")
    for step in range(1, STEPS + 1):
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5, abs=1e-6), step
