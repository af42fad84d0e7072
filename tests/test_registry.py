"""Register an exported checkpoint in MLflow's Model Registry (sqlite store), pull it back, predict with its pyfunc."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import (
    free_port,
    pretrain_cli,
    pretrain_config,
    pyfunc_loads_without_the_project_installed,
    read_metrics,
    run_pretrain,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_dataset):
    tmp = tmp_path_factory.mktemp("registry")
    cfg = tmp / "pretrain.yaml"
    cfg.write_text(yaml.safe_dump(pretrain_config(train_dataset, tmp / "ck", train__max_steps=10)))
    out = run_pretrain(cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp, f"sqlite:///{tmp / 'mlflow.db'}"


def test_register_pull_and_predict(trained, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pretrain.tracking import model_files

    tmp, uri = trained
    reg = pretrain_cli("register", "--checkpoint", str(tmp / "ck"), "--name", "tiny-bert", "--alias", "champion",
                       "--tracking-uri", uri, cwd=tmp)
    assert reg.returncode == 0, reg.stderr[-3000:]
    assert "tiny-bert version 1 (alias 'champion') registered from" in reg.stdout
    assert "Warning" not in reg.stderr and "Processing zero checkpoint" not in reg.stdout, reg.stderr[-3000:]
    assert "Downloading artifacts" not in reg.stderr  # MLflow's bar for its local copy of the model directory
    client = MlflowClient(uri, registry_uri=uri)
    v = client.get_model_version_by_alias("tiny-bert", "champion")
    training_run = json.loads((tmp / "ck" / "step-00000010" / "client.json").read_text())["mlflow_run_id"]
    assert str(v.version) == "1" and v.run_id == training_run
    manifest = json.loads((tmp / "ck" / "manifest.json").read_text())
    assert v.tags["dataset_id"] == manifest["dataset_id"] and v.tags["step"] == "10" and "eval/loss" in v.tags

    again = pretrain_cli("register", "--run", training_run, "--name", "tiny-bert", "--alias", "champion",
                         "--tracking-uri", uri, cwd=tmp)
    assert again.returncode == 0 and "tiny-bert version 1 (alias 'champion') was registered already" in \
        again.stdout, again.stdout + again.stderr[-2000:]
    assert len(client.search_model_versions("name='tiny-bert'")) == 1, "a rerun registers nothing new"
    # the same checkpoint with the other pooling: a version of its own, which leaves version 1's files as they are;
    # an alias that moves says from where
    mean = pretrain_cli("register", "--run", training_run, "--name", "tiny-bert", "--pooling", "mean", "--alias",
                        "champion", "--tracking-uri", uri, cwd=tmp)
    assert mean.returncode == 0 and "tiny-bert version 2 (alias 'champion' moved from version 1 to 2) registered" \
        in mean.stdout, mean.stdout + mean.stderr[-2000:]
    back = pretrain_cli("register", "--run", training_run, "--name", "tiny-bert", "--alias", "champion",
                        "--tracking-uri", uri, cwd=tmp)
    assert "(alias 'champion' moved from version 2 to 1) was registered already" in back.stdout, back.stdout
    versions = {str(v.version): v for v in client.search_model_versions("name='tiny-bert'")}
    assert versions["1"].tags["pooling"] == "cls" and versions["2"].tags["pooling"] == "mean"
    assert versions["1"].source != versions["2"].source
    damaged = tmp / "damaged"
    shutil.copytree(tmp / "ck", damaged)
    (damaged / "step-00000010" / "client.json").write_text("")
    bad = pretrain_cli("register", "--checkpoint", str(damaged / "step-00000010"), "--name", "x", "--tracking-uri", uri,
                       cwd=tmp)
    assert bad.returncode == 1 and "is incomplete or damaged: client.json has 0 bytes" in bad.stderr, bad.stderr

    from pretrain.tracking import pull

    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    pull("models:/tiny-bert/1", tmp / "pulled-in-process", uri)  # (the CLI's pull, in this process)
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before, "pull changed process-wide MLflow URIs"
    by_run = pull(f"runs:/{training_run}/registered-model/step-00000010", tmp / "pulled-by-run", uri)
    assert (by_run / "MLmodel").is_file() and (model_files(by_run) / "model.safetensors").is_file()
    assert not (tmp / "pulled-by-run.partial").exists()
    pulled = pretrain_cli("pull", "models:/tiny-bert@champion", "--out", str(tmp / "pulled-tiny-bert-champion"),
                          "--tracking-uri", uri, cwd=tmp)
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    for out in (tmp / "pulled-tiny-bert-champion", tmp / "pulled-in-process"):  # by alias, by version number
        assert (out / "MLmodel").is_file() and (model_files(out) / "model.safetensors").is_file()
        assert model_files(out) == out / "artifacts" / "model"  # a visible name, not the export's scratch
        umask = os.umask(0)
        os.umask(umask)  # the weights are as readable as any file the user writes (safetensors writes them 0600)
        assert (model_files(out) / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask

    # a pulled directory remembers what it was pulled as: a fine-tune from it is tagged with the registered version
    from pretrain.export import resolve_model

    _, info = resolve_model(str(tmp / "pulled-tiny-bert-champion"), tmp / "scratch", uri)
    assert (info["name"], info["version"], info["run_id"]) == ("tiny-bert", "1", training_run)
    assert info["pulled_from"] == "models:/tiny-bert@champion"
    assert resolve_model(str(by_run), tmp / "scratch", uri)[1]["run_id"] == training_run

    pyfunc_loads_without_the_project_installed(tmp / "pulled-tiny-bert-champion", tmp, shape=[1, 128])
    # registered again from a newer project (its requirements differ): version 1's files stay as they are
    from pretrain import tracking

    monkeypatch.setattr(tracking, "PYFUNC_REQUIREMENTS", (*tracking.PYFUNC_REQUIREMENTS, "packaging"))
    again = tracking.register(model_files(tmp / "pulled-in-process"), "tiny-bert", "champion", uri)
    assert again["version"] == "1" and again["reused"]
    stored = client.download_artifacts(training_run, "registered-model/step-00000010/requirements.txt",
                                       str(tmp / "stored"))
    assert "packaging" not in open(stored).read()

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        model = mlflow.pyfunc.load_model("models:/tiny-bert@champion")
    assert not [w for w in said if "predict" in str(w.message)], "MLflow's advice on predict's type hints"
    emb = model.predict(["The river carries stone.", "Quiet harbor lantern.", "The river carries stone."])
    assert emb.shape == (3, 128) and emb.dtype == np.float32
    assert np.allclose(emb[0], emb[2]) and not np.allclose(emb[0], emb[1])
    mean = model.predict(["The river carries stone."], params={"pooling": "mean"})
    assert not np.allclose(mean[0], emb[0])
    with pytest.raises(Exception, match=r"input row 1 has no text"):  # not embedded as the text "None"
        model.predict(["The river carries stone.", None])


def test_mlflow_models_serve_answers_with_the_embeddings_load_model_gives(trained, tmp_path):
    """`mlflow models serve` of a registered version (in this environment: --env-manager local) answers a REST
    request with the embeddings `mlflow.pyfunc.load_model` computes, per-request params included."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    import mlflow

    tmp, uri = trained
    reg = pretrain_cli("register", "--checkpoint", str(tmp / "ck"), "--name", "served-bert", "--tracking-uri", uri,
                       cwd=tmp)
    assert reg.returncode == 0, reg.stderr[-2000:]
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/served-bert/1",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path,
                              env={**os.environ, "MLFLOW_TRACKING_URI": uri,  # (the environment's uvicorn, as an
                                   "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"},  # active one)
                              stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    texts = ["The river carries stone.", "Quiet harbor lantern."]

    def ask(body: dict) -> np.ndarray:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            return np.array(json.loads(answer.read())["predictions"], dtype=np.float32)

    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        served = ask({"inputs": texts})
        served_mean = ask({"inputs": texts, "params": {"pooling": "mean"}})
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
    pulled = pretrain_cli("pull", "models:/served-bert/1", "--out", str(tmp_path / "local"), "--tracking-uri", uri,
                          cwd=tmp_path)
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    local = mlflow.pyfunc.load_model(str(tmp_path / "local"))
    assert served.shape == (2, 128)
    assert np.allclose(served, local.predict(texts), atol=1e-5)
    assert np.allclose(served_mean, local.predict(texts, params={"pooling": "mean"}), atol=1e-5)
    assert not np.allclose(served, served_mean)


def test_pull_refuses_an_unknown_model_and_a_corrupted_store(trained):
    tmp, uri = trained
    out = pretrain_cli("pull", "models:/no-such-model/1", "--out", str(tmp / "x"), "--tracking-uri", uri, cwd=tmp)
    assert out.returncode == 1, out.stderr
    # said once, in MLflow's words without the quotes of its exception's str
    assert out.stderr.startswith(f"error: cannot resolve models:/no-such-model/1 at {uri}: Model Version "
                                 "(name=no-such-model, version=1) not found"), out.stderr
    assert not (tmp / "x").exists() and not (tmp / "x.partial").exists()
    out = pretrain_cli("pull", "tiny-bert@champion", "--out", str(tmp / "x"), "--tracking-uri", uri, cwd=tmp)
    assert out.returncode == 2 and "'tiny-bert@champion' is not a model URI: write models:/tiny-bert@champion" in \
        out.stderr, out.stderr

    reg = pretrain_cli("register", "--checkpoint", str(tmp / "ck"), "--name", "tiny-bert-2", "--tracking-uri", uri,
                       cwd=tmp)
    assert reg.returncode == 0, reg.stderr[-2000:]
    from mlflow.tracking import MlflowClient

    run_id = MlflowClient(uri, registry_uri=uri).get_model_version("tiny-bert-2", "1").run_id
    out = pretrain_cli("pull", f"runs:/{run_id}/registered-model", "--out", str(tmp / "z"), "--tracking-uri", uri,
                       cwd=tmp)  # the folder above the model
    assert out.returncode == 1 and f"runs:/{run_id}/registered-model holds no model (it holds step-00000010" in \
        out.stderr, out.stderr
    from pretrain.tracking import RegistryError, pull

    with pytest.raises(RegistryError, match=rf"cannot download runs:/{run_id}/model from \S+: run {run_id} holds no "
                                            r"'model' \(at its top it holds config/, dataset/, registered-model/, "
                                            r"tokenizer/\)"):
        pull(f"runs:/{run_id}/model", tmp / "w", uri)  # a path the run does not have: what it has instead
    with pytest.raises(RegistryError, match=r"holds no 'registered-model/step-1' \(in registered-model/ it holds "
                                            r"(step-00000010-mean/, )?step-00000010/\)"):  # (-mean: another test's)
        pull(f"runs:/{run_id}/registered-model/step-1", tmp / "w", uri)
    with pytest.raises(RegistryError, match=r"holds no 'nope' \(at its top it holds config/"):
        pull(f"runs:/{run_id}/nope/model", tmp / "w", uri)  # (the first part that is not there is named)
    assert not (tmp / "w").exists() and not (tmp / "w.partial").exists()
    (stored,) = (tmp / "mlruns").rglob("registered-model/step-00000010/artifacts/*/model.safetensors")  # (cls)
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF  # bit rot in the store, same size
    stored.write_bytes(bytes(data))
    out = pretrain_cli("pull", "models:/tiny-bert-2/1", "--out", str(tmp / "y"), "--tracking-uri", uri, cwd=tmp)
    assert out.returncode == 1 and "model.safetensors differs from its checksum" in out.stderr
    assert not (tmp / "y").exists()


def test_a_checkpoint_registers_into_another_store_than_it_was_trained_with(trained, tmp_path):
    """The training run lives in the store it was trained with; registered elsewhere (e.g. a team's server), a run
    of the new store holds the files and names the training run."""
    from mlflow.tracking import MlflowClient

    tmp, uri = trained
    other = f"sqlite:///{tmp_path / 'other.db'}"
    reg = pretrain_cli("register", "--checkpoint", str(tmp / "ck"), "--name", "moved-bert", "--tracking-uri", other,
                       cwd=tmp_path)
    assert reg.returncode == 0 and "moved-bert version 1 registered from" in reg.stdout, reg.stderr[-2000:]
    client = MlflowClient(other, registry_uri=other)
    (version,) = client.search_model_versions("name='moved-bert'")
    trained_run = json.loads((tmp / "ck" / "step-00000010" / "client.json").read_text())["mlflow_run_id"]
    assert client.get_run(version.run_id).data.tags["trained_in_run"] == trained_run != version.run_id
    # registered again (with an alias now): the same run and version, not a copy of the files
    from pretrain.tracking import register_checkpoint

    again = register_checkpoint(tmp / "ck", "moved-bert", "prod", other)
    assert (again["version"], again["run_id"], again["reused"]) == ("1", version.run_id, True), again
    assert len(client.search_model_versions("name='moved-bert'")) == 1
    assert str(client.get_model_version_by_alias("moved-bert", "prod").version) == "1"


def test_training_registers_its_best_checkpoints(tmp_path, train_dataset):
    from mlflow.tracking import MlflowClient

    cfg = tmp_path / "pretrain.yaml"
    cfg.write_text(yaml.safe_dump(pretrain_config(
        train_dataset, tmp_path / "ck", train__max_steps=15, train__eval_every=5, checkpoint__every_steps=5,
        train__lr=3e-3, registry={"name": "best-bert", "alias": "best", "when": "best"})))
    out = run_pretrain(cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    versions = sorted(client.search_model_versions("name='best-bert'"), key=lambda v: int(v.version))
    evals = {s: m["eval/loss"] for s, m in read_metrics(tmp_path / "ck").items() if "eval/loss" in m}
    best_so_far, expected = float("inf"), []
    for step in sorted(evals):
        if evals[step] < best_so_far:
            best_so_far = evals[step]
            expected.append(str(step))
    assert [v.tags["step"] for v in versions] == expected and expected[0] == "5"
    assert str(client.get_model_version_by_alias("best-bert", "best").version) == str(versions[-1].version)
    assert out.stdout.count("registered best-bert version") == len(expected)
    assert "next         python -m pretrain finetune configs/finetune/classify.yaml model=models:/best-bert@best" \
        in out.stdout, out.stdout[-1500:]


def test_register_model_refuses_what_is_not_a_model_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{}")
    out = pretrain_cli("register", "--model", str(tmp_path / "data"), "--name", "x", "--tracking-uri",
                       f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert out.returncode == 1
    assert f"{tmp_path / 'data'} is not a model directory (config.json, training.json, dataset.json missing)" \
        in out.stderr and "MLflow" not in out.stderr, out.stderr
    out = pretrain_cli("register", "--model", str(tmp_path / "nowhere"), "--name", "x", "--tracking-uri",
                       f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert out.returncode == 1 and f"{tmp_path / 'nowhere'} does not exist" in out.stderr, out.stderr


@pytest.mark.parametrize("uri", ["file:///{tmp}/mlruns", "{tmp}/mlruns"])
def test_a_file_store_is_named_in_one_line_before_anything_starts(tmp_path, uri):
    """MLflow 3 refuses its file store by default: each command says so in a line (no traceback), and training
    stops before it starts rather than deep inside MLflow."""
    uri = uri.format(tmp=tmp_path)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"data": {"dataset": str(tmp_path / "no-dataset")}}))
    env = {"MLFLOW_TRACKING_URI": uri}
    for args in (["pull", "models:/x@champion", "--out", "x"], ["export", "models:/x@champion", "--out", "x"],
                 ["train", "p.yaml"]):
        out = pretrain_cli(*args, cwd=tmp_path, env=env)
        assert out.returncode == 1, out.stderr
        assert f"tracking URI {uri} is an MLflow file store" in out.stderr and "Traceback" not in out.stderr, \
            (args, out.stderr)
    assert not (tmp_path / "mlruns").exists()
    if "://" not in uri:  # a sqlite database given as a path: the URI it needs
        import sqlite3

        sqlite3.connect(tmp_path / "mlflow.db").execute("create table t (x)").connection.commit()
        out = pretrain_cli("pull", "models:/x@champion", "--out", "x", "--tracking-uri", "mlflow.db", cwd=tmp_path)
        assert out.returncode == 1 and "that file is a sqlite database: write it as " \
            f"sqlite:///{tmp_path / 'mlflow.db'}" in out.stderr, out.stderr


def test_reading_a_store_that_is_not_there_creates_none(tmp_path):
    """Run from the wrong directory, a read names the missing store rather than creating an empty one and
    reporting the model missing; a models:/ URI without a version says how to name one."""
    env_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = pretrain_cli("pull", "models:/tiny-bert@champion", "--out", "x", "--tracking-uri", env_uri, cwd=tmp_path)
    assert out.returncode == 1 and f"there is no MLflow store at {tmp_path / 'mlflow.db'}" in out.stderr, out.stderr
    assert not (tmp_path / "mlflow.db").exists()
    (tmp_path / "mlflow.db").touch()
    out = pretrain_cli("pull", "models:/tiny-bert", "--out", "x", "--tracking-uri", env_uri, cwd=tmp_path)
    assert out.returncode == 1 and "models:/tiny-bert names no version: use models:/tiny-bert@ALIAS or " \
        "models:/tiny-bert/VERSION" in out.stderr, out.stderr
