"""The pipeline job on embedded defaults (`python -m cluster submit JOB`, no address): data prep -> pretraining
under Ray Train -> registration -> fine-tuning from the registered alias, all in one job; resubmitted, every
stage is skipped."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import (
    BUCKET,
    free_port,
    pretrain_cli,
    pretrain_env,
    small_config,
    write_pipeline_job,
    write_small_corpus,
    write_topic_task,
)

pytestmark = pytest.mark.slow


def _submit(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**pretrain_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "cluster", "submit", "job.yaml", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, s3):
    """The pipeline on a local storage directory, its checkpoints and fine-tuned model sent to an S3 bucket (moto
    on loopback): the object-store paths of the pretraining, registration (from a fetched copy) and fine-tuning
    stages, and of their skip checks on resubmission.

    On a machine where the last `ray start` left the address of a Ray that is gone (in the file Ray's State API
    falls back to; a short RAY_TMPDIR of the test's own holds it and the local Ray's session)."""
    root = tmp_path_factory.mktemp("pipeline")
    write_pipeline_job(root, storage="out")
    for name, key, where in (("pt", ("checkpoint", "dir"), "checkpoints"), ("ft", ("output",), "finetuned")):
        tree = yaml.safe_load((root / f"{name}.yaml").read_text())
        section = tree
        for k in key[:-1]:
            section = section[k]
        section[key[-1]] = f"s3://{BUCKET}/pipeline/{where}"
        if name == "pt":  # training registers its final checkpoint too, from the bucket
            tree["registry"] = {"name": "small-bert-live", "when": "end"}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(tree))
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    env = {**s3[0], "BERTFORGE_STAGING": str(root / "staging"), "RAY_TMPDIR": str(ray_tmp)}
    yield root, env, _submit(root, env=env)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_the_pipeline_runs_every_stage_and_ends_with_a_summary(pipeline, s3):
    root, _, out = pipeline
    fs = s3[1]
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    # Ray Train's placement-group cleaner reached this job's Ray, not the dead one: no 12 s stall, no traceback.
    # (On a machine too busy to start an actor within 5 s, Ray Train's controller logs its autoscaling request's
    # timeout with a traceback, and says that it is safe to ignore then; that one is Ray's, not the job's.)
    text = out.stdout + out.stderr
    assert text.count("Traceback") == text.count("resource request for train-"), text[-8000:]
    assert "Processing zero checkpoint" not in out.stdout  # DeepSpeed's consolidation works quietly
    assert "(RayTrainWorker pid=" in text and "\x1b[" not in text  # workers' lines, without colour codes in a pipe
    for notice in ("Token authentication is enabled", "Creating initial MLflow database tables", "PreemptionWatcher",
                   "Downloading artifacts"):
        assert notice not in out.stdout + out.stderr, notice  # libraries' news to nobody
    summary = out.stdout[out.stdout.index("== job summary: small =="):]
    out_dir = root / "out"
    assert f"dataset      {out_dir / 'data/small'}" in summary
    assert f"pretraining  s3://{BUCKET}/pipeline/checkpoints/step-00000010 (step 10" in summary
    assert "registered   small-bert version 1 (models:/small-bert@champion" in summary
    assert f"fine-tuned   s3://{BUCKET}/pipeline/finetuned/model (test_accuracy" in summary
    # the fine-tune's own result lines, printed once by the driver (a Ray task's last lines can be lost)
    assert out.stdout.count("\ntest_accuracy ") == 1 and f"model        s3://{BUCKET}/pipeline/finetuned/model (" \
        "labels:" in out.stdout, out.stdout[-4000:]
    assert f"mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}" in summary
    assert "skipped" not in summary
    assert re.search(r"^time +\d+s \(data_prep \d+s, pretrain \d+s, register \d+s, finetune \d+s\)$", summary, re.M)
    assert (out_dir / "data/small/manifest.json").is_file()
    uploaded = fs.find(f"{BUCKET}/pipeline/finetuned")  # the model and its summary (last)
    assert f"{BUCKET}/pipeline/finetuned/summary.json" in uploaded
    assert any("/finetuned/model/" in f for f in uploaded)
    assert fs.exists(f"{BUCKET}/pipeline/checkpoints/step-00000010")
    # the registered checkpoint's and the model's local copies are gone (the lock files of its outputs stay)
    assert [p.name for p in (root / "staging").glob("*") if p.name != "locks"] == []

    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(store, registry_uri=store)  # (not the registry an earlier test set process-wide)
    version = client.get_model_version_by_alias("small-bert", "champion")
    assert str(version.version) == "1" and version.tags["pooling"] == "mean"  # (the registry stage's pooling)
    pretrain_run = client.get_run(version.run_id)
    # created by the Ray Train worker, whose working directory is Ray's: its artifacts still live beside the store
    experiment = client.get_experiment(pretrain_run.info.experiment_id)
    assert experiment.artifact_location == (root / "mlruns" / "bert-pretraining").as_uri()
    assert version.source.startswith(experiment.artifact_location + "/")
    assert pretrain_run.data.params["checkpoint.dir"] == f"s3://{BUCKET}/pipeline/checkpoints"
    live = client.get_model_version("small-bert-live", "1")  # registered by training itself
    assert f"checkpoint s3://{BUCKET}/pipeline/checkpoints/step-00000010\n" in out.stdout  # as training names it
    assert f"checkpoint   s3://{BUCKET}/pipeline/checkpoints/step-00000010\n" in out.stdout  # (its summary)
    assert live.run_id == version.run_id and live.tags["step"] == "10"
    finetunes = client.search_runs([client.get_experiment_by_name("bert-finetuning").experiment_id])
    assert [r.data.tags["source_model_name"] for r in finetunes] == ["small-bert"]
    assert finetunes[0].data.tags["source_model_version"] == "1"


def test_a_resubmitted_pipeline_skips_what_is_done(pipeline):
    root, env, first = pipeline
    assert first.returncode == 0
    manifest = (root / "out/data/small/manifest.json").stat().st_mtime_ns
    # Meanwhile the alias was moved to another version (by hand, or by another job registering under this name):
    # the job moves it back to its own version, which it fine-tuned, and says so; registration is not "skipped".
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(store, registry_uri=store)
    ours = client.get_model_version_by_alias("small-bert", "champion")
    other = client.create_model_version("small-bert", ours.source, run_id=ours.run_id)
    client.set_registered_model_alias("small-bert", "champion", other.version)
    again = _submit(root, env=env)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert f"note: alias 'champion' pointed at version {other.version}; this job points it at the version it " \
        "registered, 1, which it fine-tunes" in again.stdout, again.stdout[-4000:]
    assert f"             alias 'champion' moved from version {other.version}\n" in again.stdout  # (the summary)
    assert client.get_model_version_by_alias("small-bert", "champion").version == ours.version
    assert "skipped      data_prep, pretrain, finetune (already done with the same config)" in again.stdout
    assert "== stage: pretrain ==\n" in again.stdout and "nothing to do" in again.stdout
    assert "RayTrainWorker" not in again.stdout  # no training worker started
    assert (root / "out/data/small/manifest.json").stat().st_mtime_ns == manifest
    assert "registered   small-bert version 1 " in again.stdout  # the same version, not a second one
    # found by the checkpoint's run and step, without downloading or exporting the checkpoint again
    assert f"s3://{BUCKET}/pipeline/checkpoints/step-00000010 is registered already: small-bert version 1 (alias " \
        f"'champion' moved from version {other.version} to 1)" in again.stdout


def test_checkpoints_in_the_bucket_are_exported_and_registered_from_their_url(pipeline, s3, tmp_path):
    """The run records the bucket as its checkpoint.dir, so `register --run` finds the checkpoints a job
    uploaded; `export` takes their URL. Both download a copy for the time they need it."""
    root, env, first = pipeline
    assert first.returncode == 0
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{root / 'mlflow.db'}"
    run_id = MlflowClient(store, registry_uri=store).get_model_version_by_alias("small-bert", "champion").run_id
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}

    def pretrain(*args):
        return pretrain_cli(*args, cwd=tmp_path, env=env)

    url = f"s3://{BUCKET}/pipeline/checkpoints"
    reg = pretrain("register", "--run", run_id, "--name", "from-bucket")
    assert reg.returncode == 0, reg.stderr[-3000:]
    assert f"from-bucket version 1 registered from {url}/step-00000010 (run {run_id})" in reg.stdout
    out = pretrain("export", f"{url}/step-00000005", "--out", "exported")
    assert out.returncode == 0, out.stderr[-3000:]
    training = json.loads((tmp_path / "exported" / "training.json").read_text())
    assert training["checkpoint"] == f"{url}/step-00000005" and training["step"] == 5
    assert [p.name for p in (root / "staging").glob("*") if p.name != "locks"] == []  # the downloaded copies: gone
    missing = pretrain("export", f"s3://{BUCKET}/pipeline/nothing-here", "--out", "x")
    assert missing.returncode == 1 and "holds no complete uploaded checkpoint" in missing.stderr, missing.stderr


def test_a_failed_pretraining_is_said_in_the_workers_words(tmp_path, train_dataset):
    """Ray Train's error names each distinct worker failure once, by its last line; a dataset that is not there,
    or that the model cannot take, is found before any worker starts (every one would fail the same way,
    max_failures times)."""
    from ray.train import WorkerGroupError

    from cluster.jobs import JobSpec
    from cluster.launch import _workers_words, pretrain_on_ray
    from data_prep.dataset import DatasetError
    from pretrain.config import PretrainConfig

    failures = {0: RuntimeError("Traceback (most recent call last):\n  ...\nValueError: bad batch"),
                1: RuntimeError("Traceback (most recent call last):\n  ...\nValueError: bad batch"),
                2: OSError("disk full")}
    assert _workers_words(WorkerGroupError("three failed", failures)) == \
        "ValueError: bad batch (rank 0, 1); disk full (rank 2)"
    try:  # an error that carries its cause: the cause's words, not the wrapper's advice
        raise RuntimeError("Training failed. Inspect the logs, then restart the run.") from ValueError("bad config")
    except RuntimeError as wrapped:
        assert _workers_words(wrapped) == "bad config"
    cfg = PretrainConfig.model_validate({"data": {"dataset": str(tmp_path / "nowhere")}})
    spec = JobSpec.model_validate({"kind": "pretrain", "config": "x.yaml", "storage": str(tmp_path)})
    with pytest.raises(DatasetError, match=r"'.*nowhere' is not a finished dataset \(manifest.json is missing\)"):
        pretrain_on_ray(cfg, spec, "run")
    short = PretrainConfig.model_validate({"data": {"dataset": str(train_dataset)}, "model": {"max_position": 16}})
    with pytest.raises(DatasetError, match=r"model.max_position \(16\) is shorter than the dataset's sequences"):
        pretrain_on_ray(short, spec, "run")
    # a checkpoint to resume of another dataset (its vocabulary changed with it): said once, before any worker
    from dataclasses import asdict

    from pretrain.data import open_dataset

    ours = PretrainConfig.model_validate({"data": {"dataset": str(train_dataset)}})
    manifest = open_dataset(str(train_dataset)).manifest
    client = {"dataset_id": "0" * 16, "model": asdict(ours.model.build(manifest["tokenizer"]["vocab_size"] + 500))}
    with pytest.raises(DatasetError, match=r"checkpoint ck/step-00000040 was trained on dataset 0{16}, data.dataset"):
        pretrain_on_ray(ours, spec, "run", resume_from=("ck/step-00000040", client))
    client["dataset_id"] = manifest["dataset_id"]
    with pytest.raises(DatasetError, match=r"holds a different model \(vocab_size changed\)"):
        pretrain_on_ray(ours, spec, "run", resume_from=("ck/step-00000040", client))


def test_a_failing_fine_tuning_stage_is_one_clear_error(ray_local, tmp_path):
    """The fine-tuning stage runs as a Ray task; its failure reaches the driver as one StageError naming the
    output and the cause, not a remote traceback."""
    from cluster.jobs import JobSpec
    from cluster.runner import StageError, _finetune
    from pretrain.config import FinetuneConfig

    task = write_topic_task(tmp_path / "task", rows=20)
    cfg = FinetuneConfig.model_validate({"model": str(tmp_path / "no-such-model"), "task": {"train": str(task["train"])},
                                         "output": str(tmp_path / "ft"), "mlflow": {"enabled": False}})
    plan = {"spec": JobSpec.model_validate({"kind": "finetune", "config": "ft.yaml"}).model_dump(mode="json")}
    with pytest.raises(StageError, match=rf"fine-tuning into {tmp_path / 'ft'} failed: \w+Error: .*no-such-model"):
        _finetune({"kind": "finetune", "config": cfg.model_dump(mode="json")}, plan, {})
    assert not (tmp_path / "ft" / "summary.json").exists()


def test_a_fine_tuning_task_with_a_bad_row_stops_the_job_before_its_first_stage(ray_local, tmp_path):
    """The task files are read before data prep and pretraining run (hours on a cluster), not after them."""
    from cluster.jobs import JobSpec
    from cluster.runner import StageError, run
    from pretrain.config import FinetuneConfig

    write_small_corpus(tmp_path / "corpus")
    prep = small_config(tmp_path / "corpus", tmp_path / "data").model_dump(mode="json")
    bad = tmp_path / "task.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b", "lable": "y"}\n')
    ft = FinetuneConfig.model_validate({"model": "models:/later@x", "task": {"train": str(bad)},
                                        "output": str(tmp_path / "ft"), "mlflow": {"enabled": False}})
    spec = JobSpec.model_validate({"kind": "finetune", "config": "ft.yaml", "storage": str(tmp_path)})
    plan = {"name": "early", "kind": "pipeline", "storage": str(tmp_path), "spec": spec.model_dump(mode="json"),
            "stages": [{"kind": "data_prep", "config": prep}, {"kind": "finetune", "config": ft.model_dump(mode="json")}]}
    with pytest.raises(StageError, match=rf"fine-tuning's task \(checked before the first stage\): {bad}:2: no field "
                                         "'label'"):
        run(plan)
    assert not (tmp_path / "data").exists(), "data prep did not start"


def test_a_changed_task_file_is_fine_tuned_again(tmp_path, capsys):
    """A finished fine-tune of the same config is done only while its task files have the bytes it was trained on
    (recorded in its summary; in an older summary's model, in training.json)."""
    from cluster.runner import finished_finetune
    from pretrain.config import FinetuneConfig
    from pretrain.finetune import SUMMARY, task_files

    files = write_topic_task(tmp_path / "task", rows=20)
    cfg = FinetuneConfig.model_validate({"model": str(tmp_path / "model"), "output": str(tmp_path / "ft"),
                                         "task": {k: str(v) for k, v in files.items()}, "mlflow": {"enabled": False}})
    (tmp_path / "ft" / "model").mkdir(parents=True)
    summary = {"model": str(tmp_path / "ft" / "model"), "config": cfg.model_dump(mode="json"),
               "task_files": task_files(cfg)}
    (tmp_path / "ft" / SUMMARY).write_text(json.dumps(summary))
    assert finished_finetune(cfg) is not None
    with open(files["test"], "a") as f:  # one row more
        f.write(json.dumps({"text": "a sentence more", "label": "animal"}) + "\n")
    assert finished_finetune(cfg) is None
    assert f"task.test ({files['test']}) changed since {tmp_path / 'ft' / SUMMARY}" in capsys.readouterr().out
    (tmp_path / "ft" / SUMMARY).write_text(json.dumps({**summary, "task_files": task_files(cfg)}))
    assert finished_finetune(cfg) is not None
    # the same number of bytes, written at once to a new file that takes the old one's place (as editors save)
    text = files["test"].read_text()
    (tmp_path / "edited").write_text(text.replace("animal", "plants", 1))
    os.replace(tmp_path / "edited", files["test"])
    assert files["test"].stat().st_size == len(text) and finished_finetune(cfg) is None
    # ... or written in place, its modification time then set back (`touch -r`, `rsync -t --inplace`)
    (tmp_path / "ft" / SUMMARY).write_text(json.dumps({**summary, "task_files": task_files(cfg)}))
    assert finished_finetune(cfg) is not None
    before = files["test"].stat()
    with open(files["test"], "r+") as f:  # ("plants" -> "fungus": as many bytes)
        f.write(text.replace("animal", "fungus", 1))
    os.utime(files["test"], ns=(before.st_atime_ns, before.st_mtime_ns))
    assert files["test"].stat().st_mtime_ns == before.st_mtime_ns and finished_finetune(cfg) is None
    (tmp_path / "ft" / SUMMARY).write_text(json.dumps(summary))
    # a summary from before task files were recorded there: its model's training.json has them
    old = {k: v for k, v in summary.items() if k != "task_files"}
    (tmp_path / "ft" / SUMMARY).write_text(json.dumps(old))
    (tmp_path / "ft" / "model" / "training.json").write_text(json.dumps({"task_files": summary["task_files"]}))
    assert finished_finetune(cfg) is None
    (tmp_path / "ft" / "model" / "training.json").write_text(json.dumps({"task_files": task_files(cfg)}))
    assert finished_finetune(cfg) is not None
    # task files in an object store (fsspec's memory filesystem standing in for a bucket) are compared too
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe({f"/task-{tmp_path.name}/{k}.jsonl": v.read_bytes() for k, v in files.items()})
    remote = cfg.model_copy(update={"task": cfg.task.model_copy(update={
        k: f"memory:///task-{tmp_path.name}/{k}.jsonl" for k in files})})
    recorded = task_files(remote)
    assert recorded["test"]["sha256"] == task_files(cfg)["test"]["sha256"] and recorded["test"]["sha256"]
    (tmp_path / "ft" / SUMMARY).write_text(json.dumps({**summary, "config": remote.model_dump(mode="json"),
                                                       "task_files": recorded}))
    assert finished_finetune(remote) is not None
    fs.pipe(f"/task-{tmp_path.name}/train.jsonl", b"")
    assert finished_finetune(remote) is None
    assert f"task.train (memory:///task-{tmp_path.name}/train.jsonl) changed" in capsys.readouterr().out


def test_the_final_figures_skip_a_metrics_line_cut_short(tmp_path):
    """A metrics.jsonl line cut short (a full disk, a crash mid-write) does not stop the job's summary."""
    from cluster.runner import _last_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.5}\n')
    assert _last_metrics(str(tmp_path / "step-00000003"), None) == {"step": 3, "loss": 1.5}


def test_a_stop_no_worker_hears_ends_the_job_with_its_summary(tmp_path, train_dataset):
    """Ctrl-C while pretraining waits for workers the cluster cannot place (none polls the stop flag): after
    BERTFORGE_STOP_UNHEARD_S the driver ends as a second Ctrl-C would, and the summary names what did not run."""
    import os
    import signal
    import time

    from conftest import pretrain_config

    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(pretrain_config(train_dataset, tmp_path / "ck",
                                                                           mlflow__enabled=False)))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "name": "too-big", "kind": "pretrain", "config": "pretrain.yaml", "storage": str(tmp_path / "out"),
        "resources": {"num_workers": 64, "cpus_per_worker": 1}}))
    env = {**pretrain_env(), "BERTFORGE_STOP_UNHEARD_S": "3"}
    env.pop("RAY_ADDRESS", None)
    with open(tmp_path / "out.txt", "w") as out:
        job = subprocess.Popen([sys.executable, "-m", "cluster", "submit", "job.yaml"], cwd=tmp_path, env=env,
                               stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while "warning: the job asks for 64 CPUs" not in (tmp_path / "out.txt").read_text():
            assert time.monotonic() < deadline and job.poll() is None, (tmp_path / "out.txt").read_text()[-3000:]
            time.sleep(0.5)
        os.kill(job.pid, signal.SIGINT)
        assert job.wait(timeout=90) == 130
    finally:
        if job.poll() is None:
            job.kill()
    said = (tmp_path / "out.txt").read_text()
    assert "SIGINT: asking the pretraining workers to commit a checkpoint" in said, said[-3000:]
    assert "no pretraining worker heard of the stop within 3 s" in said, said[-3000:]
    assert "not run      pretrain (the job was stopped" in said and "interrupted" in said, said[-3000:]
