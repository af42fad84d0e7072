"""Job specs: every shipped one validates; mistakes in the spec or in a config it names are caught up front."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

from cluster.jobs import load_job
from data_prep.configfile import ConfigError


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_spec_is_valid(path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec, configs = load_job(path)
    assert set(configs) == {k for k, _ in spec.stage_list()} and configs


def test_a_pipeline_stage_config_error_names_the_job_file_and_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    job = tmp_path / "job.yaml"
    job.write_text("kind: pipeline\nstages:\n  data_prep: {config: configs/data_prep/quickstart.yaml}\n"
                   "  pretrain: {config: configs/pretrain/quickstart.yaml, overrides: {train.max_step: 5}}\n")
    with pytest.raises(ConfigError, match=r"(?s)job.yaml: stages.pretrain.config .*unknown key 'train.max_step' "
                                          r"\(in the job's stages.pretrain.overrides\); did you mean 'train.max_steps'"):
        load_job(job)
    # every stage's mistakes at once, not one per attempt
    with pytest.raises(ConfigError) as e:
        load_job(job, ["stages.data_prep.config=configs/data_prep/quickstart.yml"])
    said = str(e.value).splitlines()
    assert said[0].startswith(f"{job}: stages.data_prep.config: 'configs/data_prep/quickstart.yml' is neither under")
    assert any("unknown key 'train.max_step'" in line for line in said[1:]), said


@pytest.mark.parametrize("body, message", [
    ("kind: pretrain\n", "needs config"),
    ("kind: pipeline\nconfig: x.yaml\n", "names its configs under stages"),
    ("kind: pipeline\n", "kind: pipeline needs stages: at least data_prep and pretrain"),
    ("kind: train\nconfig: x.yaml\n", "kind"),
    ("kind: data_prep\nconfig: configs/data_prep/quickstart.yaml\nresources: {num_workers: 4}\n",
     "spreads its tasks"),
    ("kind: pretrain\nconfig: configs/pretrain/quickstart.yaml\nresources: {gpus_per_worker: 1}\n",
     "use_gpu is false"),
    ("kind: pretrain\nconfig: configs/pretrain/quickstart.yaml\nresources: {use_gpu: true, gpus_per_worker: 0.5}\n",
     "gpus_per_worker is 0.5, and pretraining runs one process per GPU"),
    ("kind: pretrain\nname: My_Job\nconfig: configs/pretrain/quickstart.yaml\n", "KubeRay.s rule for a job"),
    ("kind: pretrain\nname: bert-2\nconfig: configs/pretrain/quickstart.yaml\n",  # (the second submission of bert)
     r"not ending in -NUMBER \(its submissions are numbered so\)"),
    ("kind: pretrain\nconfig: configs/pretrain/missing.yaml\n", "is neither under the working directory"),
    ("kind: pretrain\nconfig: configs/pretrain/quickstart.yaml\nstorage: ''\n", "storage is empty"),
    ("kind: pipeline\nstages: {pretraining: {config: x.yaml}}\n",  # (a section that may be left out)
     r"did you mean 'stages.pretrain'\? Valid keys here: data_prep, pretrain, registry, finetune"),
])
def test_bad_job_specs(tmp_path, monkeypatch, body, message):
    monkeypatch.chdir(REPO)
    (tmp_path / "job.yaml").write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_job(tmp_path / "job.yaml")


def _quickstart_pipeline(root, registry: str):
    (root / "task.yaml").write_text("task: {train: t.jsonl}\n")
    (root / "job.yaml").write_text(
        "kind: pipeline\nstages:\n  data_prep: {config: configs/data_prep/quickstart.yaml}\n"
        f"  pretrain: {{config: configs/pretrain/quickstart.yaml}}\n  registry: {registry}\n"
        "  finetune: {config: task.yaml}\n")
    return load_job(root / "job.yaml")


def test_a_pipeline_fine_tunes_the_model_it_registered(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec, configs = _quickstart_pipeline(tmp_path, "{name: qb, alias: champion}")
    assert configs["finetune"].model == "models:/qb@champion"
    assert [k for k, _ in spec.stage_list()] == ["data_prep", "pretrain", "finetune"]


def test_a_pipelines_fine_tune_looks_for_its_model_in_the_store_it_was_registered_in(tmp_path, monkeypatch):
    """The registry stage registers in the pretrain config's store: a fine-tune config that names none uses that one,
    and one that names another is refused before the job starts (it would look for the model where it is not)."""
    from cluster.jobs import resolve

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path / 'team.db'}"
    (tmp_path / "task.yaml").write_text("task: {train: t.jsonl}\n")
    (tmp_path / "job.yaml").write_text(
        "kind: pipeline\nstages:\n  data_prep: {config: configs/data_prep/quickstart.yaml}\n"
        f"  pretrain: {{config: configs/pretrain/quickstart.yaml, overrides: [mlflow.tracking_uri={store}]}}\n"
        "  registry: {name: qb}\n  finetune: {config: task.yaml}\n")
    spec, configs = load_job(tmp_path / "job.yaml")
    plan = resolve(spec, configs, tmp_path / "job.yaml", cwd=tmp_path, environ={})
    assert plan["mlflow_uri"] == store
    uris = [s["config"]["mlflow"]["tracking_uri"] for s in plan["stages"] if s["kind"] in ("pretrain", "finetune")]
    assert uris == [store, store]
    other = f"sqlite:///{tmp_path / 'x.db'}"
    (tmp_path / "task.yaml").write_text(f"task: {{train: t.jsonl}}\nmlflow: {{tracking_uri: '{other}'}}\n")
    spec, configs = load_job(tmp_path / "job.yaml")
    with pytest.raises(ConfigError, match=r"stages.finetune config: mlflow.tracking_uri is sqlite:///.*x.db, but the "
                                          r"registry stage registers the model it fine-tunes in sqlite:///.*team.db"):
        resolve(spec, configs, tmp_path / "job.yaml", cwd=tmp_path, environ={})


def test_a_job_run_from_here_sets_its_environment_here(tmp_path, monkeypatch, capsys):
    """A local submit (or `run JOB`) sets the job's runtime_env.env_vars in its own process, as a cluster does for a
    submitted job (a local Ray started afterwards hands them on); pip is said to be for cluster jobs only."""
    import argparse

    from cluster.cli import _load

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("BERTFORGE_JOB_ENV_CHECK", "before")
    (tmp_path / "job.yaml").write_text(
        "kind: data_prep\nconfig: configs/data_prep/quickstart.yaml\n"
        "runtime_env: {pip: [example-package], env_vars: {BERTFORGE_JOB_ENV_CHECK: from-the-job}}\n")
    args = argparse.Namespace(job=str(tmp_path / "job.yaml"), overrides=[], name=None)
    _load(args)  # (a submit to a cluster: the cluster sets them)
    assert os.environ["BERTFORGE_JOB_ENV_CHECK"] == "before" and not capsys.readouterr().err
    _load(args, here=True)
    assert os.environ["BERTFORGE_JOB_ENV_CHECK"] == "from-the-job"
    assert "runtime_env.pip (example-package) is installed for jobs submitted to a cluster" in capsys.readouterr().err


def test_a_pipeline_without_an_alias_fine_tunes_the_version_it_registered(tmp_path, monkeypatch):
    """Without an alias the fine-tune's model is the version the register stage gave (registered or found), not
    `latest`, which another pipeline may have moved past it. (A finished fine-tune stands in for the run.)"""
    from cluster import runner

    monkeypatch.chdir(REPO)
    _, configs = _quickstart_pipeline(tmp_path, "{name: qb}")
    assert configs["finetune"].model == "models:/qb/latest"
    asked = []
    monkeypatch.setattr(runner, "finished_finetune", lambda cfg: asked.append(cfg.model) or {"model": "m"})
    stage = {"kind": "finetune", "config": configs["finetune"].model_dump(mode="json")}
    register = {"name": "qb", "version": "3", "alias": None}
    assert runner._finetune(stage, {}, {"register": register})["skipped"]
    assert runner._finetune(stage, {}, {"register": {**register, "alias": "champion"}})["skipped"]  # (as given)
    assert asked == ["models:/qb/3", "models:/qb/latest"]


def test_the_readme_job_example_is_a_valid_job(tmp_path, monkeypatch):
    """The job file the README shows, with every key explained, validates as it is printed."""
    import re

    monkeypatch.chdir(REPO)
    text = re.search(r"```yaml\n(kind: pipeline .*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    (tmp_path / "job.yaml").write_text(text)
    spec, configs = load_job(tmp_path / "job.yaml")
    assert spec.resources.nodes == 2 and set(configs) == {"data_prep", "pretrain", "finetune"}


def test_validate_command():
    ok = subprocess.run([sys.executable, "-m", "cluster", "validate", "configs/jobs/pretrain_quickstart.yaml",
                         "max_failures=5"], cwd=REPO, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "MLFLOW_TRACKING_URI": "http://mlflow.example:5000"})
    assert ok.returncode == 0, ok.stderr
    assert "  mlflow     http://mlflow.example:5000" in ok.stdout, ok.stdout  # where its runs will be
    assert "a valid pretrain job 'pretrain-quickstart'" in ok.stdout and "max_failures 5" in ok.stdout
    assert "2 worker(s)" in ok.stdout and "deepspeed.zero_stage=2" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "cluster", "validate", "configs/jobs/quickstart.yaml",
                          "resources.num_wrkers=2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "resources.num_wrkers" in bad.stderr and "num_workers" in bad.stderr


def test_validate_reads_a_fine_tuning_task_that_is_here(tmp_path):
    """A task file on this machine is read as the job will read it (a row without the field is refused now, not
    after pretraining); one that is not here (on the cluster's storage, or made later) is left to the job."""
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "train.jsonl").write_text('{"text": "a", "label": "x"}\n{"body": "b", "label": "y"}\n')
    job = tmp_path / "job.yaml"
    job.write_text(f"kind: finetune\nconfig: {REPO}/configs/finetune/classify.yaml\n"
                   f"overrides: {{task.train: task/train.jsonl, task.test: null}}\n")
    out = subprocess.run([sys.executable, "-m", "cluster", "validate", str(job)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"stages.finetune's task: {tmp_path / 'task' / 'train.jsonl'}:2: no field 'text'" in out.stderr, out.stderr
    (tmp_path / "task" / "train.jsonl").unlink()
    out = subprocess.run([sys.executable, "-m", "cluster", "validate", str(job)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "a valid finetune job" in out.stdout, out.stderr


def test_a_jobs_processes_are_told_which_ray_they_belong_to():
    """Ray Train's placement-group cleaner finds the State API of the job's own Ray (not the machine's last
    `ray start`): a local job's dashboard, a submitted job's GCS address, never a key the job set itself."""
    import json

    from cluster.runner import WORKER_ENV, job_env

    assert job_env({}, dashboard_port=8300) == {**WORKER_ENV, "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:8300"}
    driver = {**WORKER_ENV, "RAY_ADDRESS": "10.1.2.3:6379"}  # a submitted job's driver
    assert job_env(driver) == {"RAY_ADDRESS": "10.1.2.3:6379"}
    submitted = {"runtime_env": {"env_vars": {"RAY_ADDRESS": "10.1.2.3:6379"}}}
    assert job_env({**driver, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(submitted)}) == {}
    assert job_env({**driver, "RAY_ADDRESS": "ray://head:10001"}) == {}  # Ray Client: not a GCS address


def test_a_jobs_processes_given_no_gpu_see_none(ray_local):
    """A CPU job on a GPU machine: its processes must not see the machine's GPUs (Ray 2.60 stopped hiding them from
    a process given none; the job's environment asks for that back)."""
    import ray

    from cluster.runner import job_env

    @ray.remote(num_gpus=0)
    def visible():
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    assert ray.get(visible.options(runtime_env={"env_vars": job_env({}, dashboard_port=8300)}).remote()) == ""


def test_a_running_jobs_stage_and_progress_and_a_failure_without_a_log():
    """What `cluster status` shows: the stage a running job is in and its last line, without Ray's colours and
    process prefixes; for a job that failed before writing a log, the end of Ray's message."""
    from cluster.client import message_tail, progress

    log = ("job 'x' (pipeline): 3 stage(s)\n\n== stage: data_prep ==\nwrote 8 shards\n\n== stage: pretrain ==\n"
           "\x1b[36m(TrainController pid=11)\x1b[0m Requesting resources: {'CPU': 1.0} * 1\n"
           "\x1b[36m(RayTrainWorker pid=12, ip=10.0.0.2)\x1b[0m step 60/3000 | loss 4.9920 | eta 1h54m\n"
           "\x1b[36m(TrainController pid=11)\x1b[0m - (ip=10.0.0.2, pid=12) world_rank=0\n")
    assert progress(log) == ("pretrain", "step 60/3000 | loss 4.9920 | eta 1h54m")
    assert progress("starting\n") == (None, None)
    message = ("runtime_env setup failed: Failed to set up runtime environment.\n"
               "Could not create the actor's environment\n  pip install nosuchpkg-zzz failed\n")
    assert message_tail(message) == "Could not create the actor's environment | pip install nosuchpkg-zzz failed"
    assert message_tail("Job finished successfully.") is None


def test_a_job_asks_its_mlflow_server_before_the_first_stage(capsys):
    """A server the job registers in that does not answer stops the job before its first stage (not after hours
    of pretraining); one only pretraining's records go to is a warning (they are kept and sent later)."""
    import http.server
    import threading

    from cluster.runner import StageError, _check_ahead
    from conftest import free_port

    silent = f"http://127.0.0.1:{free_port()}"
    plan = {"mlflow_uri": silent, "stages": [{"kind": "register", "name": "x", "alias": None}]}
    with pytest.raises(StageError, match=rf"the MLflow server at {silent} does not answer .*registers its checkpoint"):
        _check_ahead(plan)
    records_only = {"kind": "pretrain", "config": {"mlflow": {"enabled": True, "tracking_uri": silent}}}
    _check_ahead({"mlflow_uri": silent, "stages": [records_only]})
    assert f"warning: the MLflow server at {silent} does not answer" in capsys.readouterr().out

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _check_ahead({**plan, "mlflow_uri": f"http://127.0.0.1:{server.server_port}"})
    finally:
        server.shutdown()


def test_a_file_store_is_warned_of_only_for_a_job_that_uses_mlflow_on_another_machine():
    """Submitting to a Jobs API elsewhere with a sqlite store: the file is the head's; a data-prep job has no
    store to warn of, and a head on this machine's loopback (any 127.x address) shares its disk."""
    from cluster.cli import _on_this_machine
    from cluster.runner import job_stores

    assert [_on_this_machine(a) for a in ("http://127.0.0.2:8265", "http://localhost:8265", "http://[::1]:8265",
                                          "http://10.0.0.5:8265", "http://head.internal:8265")] == \
        [True, True, True, False, False]
    store = "sqlite:////work/mlflow.db"
    assert job_stores({"mlflow_uri": store, "stages": [{"kind": "data_prep", "config": {}}]}) == {}
    assert job_stores({"mlflow_uri": store, "stages": [{"kind": "register", "name": "x", "alias": None}]}) == {
        store: "registers its checkpoint there"}


def test_a_local_rays_processes_that_outlive_it_are_ended():
    """A Ray worker that hangs in Ray's own exit handler outlives the local Ray a job started (a Ray bug seen about
    once in dozens of runs, which cannot be caused on demand): stand-in child processes, found among this process's
    descendants. One that exits within the grace period is left to exit; one that hangs is killed."""
    import time

    import psutil

    from cluster.runner import descendants, end_stragglers

    before = {p.pid for p in descendants()}
    procs = [subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({wait})"]) for wait in (1, 600)]
    try:
        assert {p.pid for p in procs} <= {p.pid for p in descendants() if p.pid not in before}
        ours = [psutil.Process(p.pid) for p in procs]
        t0 = time.monotonic()
        assert end_stragglers(ours, grace_s=3) == 1
        assert time.monotonic() - t0 >= 3
        assert procs[0].wait(timeout=10) == 0  # exited by itself within the grace period
        assert not psutil.pid_exists(procs[1].pid) or procs[1].poll() is not None  # ended, 597 s early
        assert end_stragglers(ours, grace_s=3) == 0 and time.monotonic() - t0 < 6  # nothing left: no wait
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_job_larger_than_the_cluster_is_said():
    from cluster.jobs import Resources
    from cluster.runner import _short_of

    assert _short_of(Resources(num_workers=2, cpus_per_worker=1), {"CPU": 2.0}) is None
    assert _short_of(Resources(num_workers=3, cpus_per_worker=1), {"CPU": 2.0}) == \
        "3 CPUs (3 workers), the cluster has 2"
    assert _short_of(Resources(num_workers=2, use_gpu=True), {"CPU": 16.0, "GPU": 1.0}) == \
        "2 GPUs (2 workers), the cluster has 1"


def test_a_refused_output_in_a_job_says_what_a_job_can_do(tmp_path):
    """Data prep's refusals advise --overwrite, which a job does not have: the job says what it can do instead (for
    a directory of other files: another output, never deleting them)."""
    from cluster.runner import StageError, _data_prep
    from conftest import small_config, write_small_corpus

    write_small_corpus(tmp_path / "corpus")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine\n")
    config = small_config(tmp_path / "corpus", tmp_path / "data").model_dump(mode="json")
    stage = {"kind": "data_prep", "config": config}
    with pytest.raises(StageError, match=r"In this job: choose an empty or new output for the data_prep config \(its "
                                         r"files are not a dataset's\)"):
        _data_prep(stage, {}, {})
    assert (tmp_path / "data" / "notes.txt").is_file()


def test_a_job_whose_fine_tune_did_not_register_fails_after_its_summary(monkeypatch, capsys):
    """A pipeline whose fine-tune finished but whose registration failed (the store was down) ends with exit 1 and
    says to submit it again; one that registered ends well. (The stages' outcomes stand in for a run: the status is
    what is tested, and `tests/test_finetune.py` registers such a fine-tune for real.)"""
    from cluster import cli, runner

    outcome = {"finetune": {"model": "/out/model", "register_error": "MLflow at http://x failed while reaching the "
                            "store (ConnectionError: [Errno 111] Connection refused)"}}
    monkeypatch.setattr(runner, "run", lambda plan, local: outcome)
    assert cli._drive({"name": "clf"}) == 1
    said = capsys.readouterr().err
    assert "error: job 'clf' failed: the fine-tuned model /out/model is complete, but registering it failed (MLflow" \
        in said and "submit the job again to register it (nothing is fine-tuned again)" in said, said
    outcome["finetune"] = {"model": "/out/model", "registered": {"name": "clf", "version": "1"}}
    assert cli._drive({"name": "clf"}) == 0
    # the job's summary: a stage that only registered says so (not "skipped"); one that did not says what to do
    plan = {"name": "clf", "storage": "/out", "stages": []}
    runner._summary(plan, {"finetune": {"model": "/out/model", "skipped": True, "registered_now": True,
                                        "registered": {"name": "clf", "version": "2"}}, "seconds": 3})
    said = capsys.readouterr().out
    assert "registered now as clf version 2" in said and "skipped" not in said, said
    runner._summary(plan, {"finetune": {"model": "/out/model", "register_error": "refused"}, "seconds": 3})
    assert "not registered: the registration failed (above); submit the job again" in capsys.readouterr().out


def test_a_stop_that_leaves_the_job_running_fails(monkeypatch, capsys):
    """`cluster stop` ends with 0 only for a job that ended. (Ray's Jobs API client stands in: a job that outlives
    its stop cannot be made on purpose.)"""
    from cluster import cli, client

    monkeypatch.setattr(cli, "_client", lambda args: (client, None))
    monkeypatch.setattr(client, "resolve", lambda c, ident: f"{ident}-1")
    for status, code in (("STOPPED", 0), ("RUNNING", 1)):
        monkeypatch.setattr(client, "stop", lambda c, job_id, stopping: status)
        assert cli.main(["stop", "bert"]) == code
        out, err = capsys.readouterr()
        assert f"job bert-1: {status}" in out
        assert ("error: job bert-1 is still RUNNING after the stop's grace period" in err) == (code == 1), err


def test_a_followed_job_that_failed_without_a_log_says_why(monkeypatch, capsys):
    """`logs --follow` (and `submit --wait`) end with the job's status; one that failed before its driver wrote a
    line (its runtime_env's pip install) also gets Ray's reason. (A stand-in client: the status line is tested.)"""
    import types

    from cluster import cli, client

    message = ("Job failed due to an application error.\nruntime_env setup failed: pip install\n"
               "ERROR: No matching distribution found for nosuchpackage")
    fake = types.SimpleNamespace(get_job_logs=lambda job_id: "")
    monkeypatch.setattr(cli, "_client", lambda args: (client, fake))
    monkeypatch.setattr(client, "resolve", lambda c, ident: ident)
    monkeypatch.setattr(client, "follow", lambda c, job_id, out: "FAILED")
    monkeypatch.setattr(client, "info", lambda c, job_id: types.SimpleNamespace(message=message))
    assert cli.main(["logs", "bad-1", "--follow"]) == 1
    assert capsys.readouterr().out == ("job bad-1: FAILED\n  runtime_env setup failed: pip install | ERROR: No "
                                       "matching distribution found for nosuchpackage\n")
    fake.get_job_logs = lambda job_id: "error: inputs[0] matched no files\n"  # (its log says why already)
    assert cli.main(["logs", "bad-1", "--follow"]) == 1 and capsys.readouterr().out == "job bad-1: FAILED\n"
