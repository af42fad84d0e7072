"""MLflow tracking against a real `mlflow server` on loopback: a server that is down at the start costs nothing,
and everything recorded meanwhile arrives once it is up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from conftest import free_port, pretrain_command, pretrain_config, pretrain_env, read_metrics

pytestmark = pytest.mark.slow


def _wait_for(path, text: str, proc, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.is_file() and text in path.read_text():
            return True
        time.sleep(0.1)
    return path.is_file() and text in path.read_text()


def test_training_goes_on_while_the_server_is_down_and_catches_up(tmp_path, train_dataset):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cfg = tmp_path / "pretrain.yaml"
    cfg.write_text(yaml.safe_dump(pretrain_config(train_dataset, tmp_path / "ck", train__max_steps=120,
                                                  mlflow__tracking_uri=uri, checkpoint__every_steps=60)))
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "w") as o, open(err, "w") as e:
        train = subprocess.Popen(pretrain_command(cfg), cwd=tmp_path, env=pretrain_env(), stdout=o, stderr=e)
    server = None
    try:
        assert _wait_for(err, "is unreachable", train, 120), err.read_text()[-2000:]
        # in a few words: the reason, not the HTTP client's retry message cut short
        assert "[Errno 111] Connection refused); records are kept and retried" in err.read_text(), err.read_text()
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert train.wait(timeout=240) == 0, err.read_text()[-3000:]
        assert "MLflow is reachable again" in out.read_text()

        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("bert-pretraining")
        (run,) = client.search_runs([exp.experiment_id])
        assert run.info.status == "FINISHED"
        assert run.data.params["train.max_steps"] == "120"
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
        assert steps == list(range(1, 121)) == sorted(read_metrics(tmp_path / "ck"))
        assert {a.path for a in client.list_artifacts(run.info.run_id, "config")} == {"config/config.yaml"}
    finally:
        for p in (train, server):  # the server runs its web workers as child processes
            if p is not None:
                for q in psutil.Process(p.pid).children(recursive=True) if p.poll() is None else []:
                    q.kill()
                p.kill()
                p.wait()
        shutil.rmtree(tmp_path / "artifacts", ignore_errors=True)


def test_an_artifact_removed_before_it_is_sent_is_skipped_not_retried(tmp_path, capsys):
    """(A cluster worker clears its staging copy after a run; a tracker still catching up must not retry the
    missing file as if MLflow were down, holding back every record queued after it.)"""
    from mlflow.tracking import MlflowClient

    from pretrain.config import MlflowConfig
    from pretrain.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kept = tmp_path / "manifest.json"
    kept.write_text("{}")
    tracker = Tracker(True, MlflowConfig(tracking_uri=uri), tmp_path / "ck")
    tracker.start(None, {"train.lr": 0.001}, {}, {"config": tmp_path / "gone.yaml", "dataset": kept})
    tracker.log(1, {"loss": 2.5})
    tracker.close(timeout_s=30)
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] == 2.5
    assert [a.path for a in client.list_artifacts(tracker.run_id, "dataset")] == ["dataset/manifest.json"]
    assert f"{tmp_path / 'gone.yaml'} was removed before MLflow took it" in capsys.readouterr().err


def test_a_deleted_experiment_is_said_once_and_training_is_not_held_up(tmp_path, capsys):
    """MLflow finds a deleted experiment by name and refuses runs in it: an answer, not an outage. The tracker says
    so once and stops (no retries, no wait at the start or the end); registering into it says what to do."""
    from mlflow.tracking import MlflowClient

    from pretrain.config import MlflowConfig
    from pretrain.tracking import RegistryError, Tracker, experiment_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.delete_experiment(experiment_id(client, "bert-pretraining", uri))
    tracker = Tracker(True, MlflowConfig(tracking_uri=uri), tmp_path / "ck")
    t0 = time.monotonic()
    tracker.start(None, {"train.lr": 0.001}, {}, {})
    tracker.log(1, {"loss": 2.5})
    tracker.close(timeout_s=30)
    assert time.monotonic() - t0 < 10 and tracker.run_id is None
    err = capsys.readouterr().err
    assert err.count("MLflow refused to start a run: experiment 'bert-pretraining' in") == 1, err
    assert "is deleted: restore it (mlflow experiments restore --experiment-id" in err and "unreachable" not in err
    assert (tmp_path / "ck" / "metrics.jsonl").read_text().strip() == '{"step": 1, "loss": 2.5}'
    with pytest.raises(RegistryError, match="experiment 'bert-pretraining' in .* is deleted: restore it"):
        experiment_id(client, "bert-pretraining", uri)


def test_the_summary_names_how_to_see_the_store():
    """`mlflow ui` serves a store it can open itself; a tracking server shows its own UI at its address."""
    from pretrain.tracking import how_to_see

    assert how_to_see("sqlite:////data/mlflow.db") == "mlflow ui --backend-store-uri sqlite:////data/mlflow.db"
    assert how_to_see("http://mlflow.internal:5000") == "open http://mlflow.internal:5000 (the tracking server's UI)"


def test_a_store_that_cannot_be_reached_is_said_in_its_reason(tmp_path):
    """An HTTP client's retry message hides the reason at its end: the error says `Connection refused`, and a
    fine-tune whose registration failed is not counted finished by a job (which would never register it)."""
    import json

    from cluster.runner import finished_finetune
    from pretrain.config import FinetuneConfig
    from pretrain.tracking import _briefly

    e = ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=5999): Max retries exceeded with url: "
                        "/api/2.0/mlflow/experiments/get-by-name?experiment_name=bertforge (Caused by NewConnection"
                        "Error('<urllib3.connection.HTTPConnection object at 0x7f>: Failed to establish a new "
                        "connection: [Errno 111] Connection refused'))")
    assert _briefly(e) == "ConnectionError: [Errno 111] Connection refused"
    assert _briefly(ValueError("one line\nmore")) == "ValueError: one line"
    cfg = FinetuneConfig.model_validate({"model": "m", "task": {"train": "t.jsonl"}, "output": str(tmp_path),
                                         "registry": {"name": "clf"}})
    summary = {"config": cfg.model_dump(mode="json"), "registered": None}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert finished_finetune(cfg) == summary
    failed = {**summary, "register_error": "MLflow at ... failed"}  # (finished: a job registers it, see test_finetune)
    (tmp_path / "summary.json").write_text(json.dumps(failed))
    assert finished_finetune(cfg) == failed
