"""Cluster jobs through the Ray Jobs API on a real two-node Ray on loopback (`python -m cluster up` plus a second
`ray start` on 127.0.0.3), every output in an S3 bucket (moto's server on loopback; the nodes share no disk for
them): data prep, pretraining spread over both nodes, a killed worker recovered from the last checkpoint in the
bucket, stopping a job, one copy per name, and `down` leaving nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import (
    BUCKET,
    REPO,
    free_port,
    pretrain_command,
    pretrain_config,
    pretrain_env,
    read_metrics,
    small_config,
    write_small_corpus,
)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"),
                                                   reason="a second node needs 127.0.0.3 (Linux loopback)")]

STEPS = 20
STORAGE = f"s3://{BUCKET}/cluster"  # every job's outputs: the nodes share no disk for them


STORE: dict[str, str] = {}  # the bucket's environment (endpoint, keys) and a staging directory, set by `head`


def env() -> dict:
    """The test process's environment, less the RAY_ADDRESS of the session's own local Ray (ray.init sets it),
    plus the bucket's (the nodes started with it pass it to every job)."""
    out = {**pretrain_env(), **STORE}
    out.pop("RAY_ADDRESS", None)
    out["BERTFORGE_STOP_UNHEARD_S"] = "10"  # (a job stopped before its workers run ends within seconds)
    return out


def cluster(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def head(tmp_path_factory, s3):
    """A head (1 CPU) started with `up`, and a second node (1 CPU) joined to it on 127.0.0.3; both labelled
    pool=train (what a job's resources.node_labels select)."""
    root = tmp_path_factory.mktemp("cluster")
    STORE.update(s3[0], BERTFORGE_STAGING=str(root / "staging"))
    up = cluster("up", "--num-cpus", "1", "--dashboard-port", "0", "--labels", "pool=train", cwd=root)
    assert up.returncode == 0, up.stderr
    state = json.loads((root / ".bertforge" / "head.json").read_text())
    assert state["address"] in up.stdout and "token authentication" in up.stdout
    assert "--labels=pool=train" in up.stdout  # the line that joins another node keeps the label
    ray = str(Path(sys.executable).parent / "ray")
    # The second node stages checkpoints in a directory of its own, as a machine of its own would.
    node_env = {**env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state["token_path"],
                "BERTFORGE_STAGING": str(root / "staging-node2")}
    node = subprocess.run([ray, "start", f"--address={state['gcs']}", "--node-ip-address=127.0.0.3", "--num-cpus=1",
                           "--labels=pool=train", f"--dashboard-agent-listen-port={free_port()}",
                           "--disable-usage-stats"],
                          env=node_env, capture_output=True, text=True, timeout=120)
    try:
        assert node.returncode == 0, node.stderr
        yield root, state
    finally:
        down = cluster("down", cwd=root)
        assert down.returncode == 0, down.stderr
        assert f"its logs stay in {state['temp_dir']}/session_latest/logs" in down.stdout
        import psutil

        left = [p for p in psutil.process_iter(["cmdline"]) if state["temp_dir"] in " ".join(p.info["cmdline"] or ())]
        assert not left, f"processes left after down: {[p.pid for p in left]}"
        shutil.rmtree(state["temp_dir"], ignore_errors=True)  # the head's logs, which `down` leaves for the user


def _api(state: dict, job: str, what: str = "") -> dict:
    """The Jobs API's record of a job (what="") or its logs (what="logs"), asked over HTTP with the head's token:
    the tests wait on this, a process spared per poll, and check the CLI's own output where it matters."""
    token = Path(state["token_path"]).read_text().strip()
    req = urllib.request.Request(f"{state['address']}/api/jobs/{job}/{what}".rstrip("/"),
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def _wait(state: dict, job: str, done, deadline: float, what: str = "") -> dict:
    while not done(got := _api(state, job, what)):
        assert time.monotonic() < deadline, str(got)[-3000:]
        time.sleep(0.5)
    return got


def _job(root: Path, name: str, body: dict) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "storage": STORAGE, **body}))
    return path


def _pretrain_tree(root: Path, ckdir: str, **over) -> Path:
    """A pretraining config whose relative paths the job places: the dataset found under storage, checkpoints
    written there."""
    settings = dict(train__max_steps=STEPS, model__dropout=0.0, model__attention_dropout=0.0,
                    deepspeed__zero_stage=2, data__eval_examples=0, checkpoint__every_steps=10, mlflow__enabled=False)
    tree = pretrain_config(Path("data"), Path(ckdir), **{**settings, **over})
    path = root / f"{ckdir}.pretrain.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def dataset(head):
    """The small corpus prepared by a data-prep job submitted with --wait."""
    root, state = head
    write_small_corpus(root / "corpus")
    tree = small_config(Path("corpus"), Path("data")).model_dump(mode="json")
    tree["ray"] = {}
    (root / "dp.yaml").write_text(yaml.safe_dump(tree))
    out = cluster("submit", str(_job(root, "prep", {"kind": "data_prep", "config": "dp.yaml"})), "--address",
                  state["address"], "--wait", cwd=root)
    return root, state, out


def test_the_head_requires_its_token(head):
    root, state = head
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(state["address"] + "/api/jobs/", timeout=10)
    assert e.value.code == 401
    token = Path(state["token_path"])
    assert token.stat().st_mode & 0o077 == 0  # the token file is the owner's alone
    req = urllib.request.Request(state["address"] + "/api/jobs/",
                                 headers={"Authorization": f"Bearer {token.read_text().strip()}"})
    assert urllib.request.urlopen(req, timeout=10).status == 200
    again = cluster("up", cwd=root)
    assert again.returncode == 0 and "already up" in again.stdout and state["address"] in again.stdout


def test_a_data_prep_job_runs_through_the_jobs_api(dataset, s3):
    root, state, out = dataset
    _, fs = s3
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "submitted job prep-1" in out.stdout and "job prep-1: SUCCEEDED" in out.stdout
    assert "== data prep summary ==" in out.stdout  # --wait streamed the job's output
    # in the bucket: every shard a worker uploaded, the manifest last; nothing of the job's staging state
    manifest = json.loads(fs.cat_file(f"{BUCKET}/cluster/data/manifest.json"))
    assert manifest["splits"]["train"]["examples"] > 0
    shards = [s["name"] for split in manifest["splits"].values() for s in split["shards"]]
    assert all(fs.exists(f"{BUCKET}/cluster/data/{name}") for name in shards)
    assert not fs.exists(f"{BUCKET}/cluster/data/.work") and not (root / "store").exists()
    shown = subprocess.run([sys.executable, "-m", "data_prep", "inspect", f"{STORAGE}/data", "-n", "2"], env=env(),
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and f"dataset {STORAGE}/data  id {manifest['dataset_id']}" in shown.stdout
    assert shown.stdout.count("\n[") == 2, shown.stdout + shown.stderr
    for name in ("manifest.json", manifest["tokenizer"]["file"]):  # a copy whose shards were never uploaded
        fs.copy(f"{BUCKET}/cluster/data/{name}", f"{BUCKET}/cluster/partial/{name}")
    partial = subprocess.run([sys.executable, "-m", "data_prep", "inspect", f"{STORAGE}/partial", "-n", "2"],
                             env=env(), capture_output=True, text=True, timeout=120)
    assert partial.returncode == 1 and "Traceback" not in partial.stderr, partial.stderr
    assert f"cannot read '{STORAGE}/partial/{shards[0]}' (FileNotFoundError" in partial.stderr, partial.stderr
    status = cluster("status", "prep-1", cwd=root)  # the address comes from `up`'s record in this directory
    assert status.returncode == 0 and "prep-1  SUCCEEDED" in status.stdout
    by_name = cluster("status", "prep", cwd=root)  # a job's name: its newest submission
    assert by_name.returncode == 0 and "prep-1  SUCCEEDED" in by_name.stdout, by_name.stderr
    logs = cluster("logs", "prep-1", cwd=root)
    assert logs.returncode == 0 and "== job summary: prep ==" in logs.stdout


def _placement(fs, ck: str) -> list[dict]:
    return [json.loads(fs.cat_file(f"{ck}/workers/rank-{r:05d}.json")) for r in (0, 1)]


def _on_both_nodes(workers: list[dict]) -> None:
    assert [w["rank"] for w in workers] == [0, 1]
    assert len({w["node_id"] for w in workers}) == 2  # one worker on each node
    assert {w["node_ip"] for w in workers} == {"127.0.0.2", "127.0.0.3"}
    assert sorted(w["node_rank"] for w in workers) == [0, 1]


def test_pretraining_spans_two_nodes_survives_a_killed_worker_and_matches_one_process(dataset, s3, monkeypatch,
                                                                                      request):
    """ZeRO-2 over gloo with one worker per node (selected by their label), checkpoints in an S3 bucket (the
    nodes share no disk for them); SIGKILL of a worker at step 10 of 20: Ray restarts the group (max_failures 1),
    the workers download the newest complete checkpoint and resume, and every step's loss equals what one
    uninterrupted process computes (which also shows the two nodes train as one process would)."""
    root, state, _ = dataset
    aws, fs = s3
    _pretrain_tree(root, "ck-two")
    job = _job(root, "two", {"kind": "pretrain", "config": "ck-two.pretrain.yaml", "max_failures": 1,
                             "runtime_env": {"env_vars": aws},  # (the nodes have it too: shown as a job sets it)
                             "resources": {"num_workers": 2, "cpus_per_worker": 1,
                                           "node_labels": {"pool": "train"}}})
    out = cluster("submit", str(job), "--address", state["address"], cwd=root)
    assert out.returncode == 0, out.stderr
    reference = _single_process_reference(root, aws, monkeypatch)  # runs while the job does
    request.addfinalizer(lambda: reference.poll() is None and reference.kill())
    ck = f"{BUCKET}/cluster/ck-two"
    deadline = time.monotonic() + 300
    while not fs.exists(f"{ck}/step-00000010/complete.json"):  # every rank's part uploaded, at step 10 of 20
        assert time.monotonic() < deadline, "no checkpoint within 300 s: " + cluster("logs", "two-1", cwd=root).stdout
        time.sleep(0.2)
        fs.invalidate_cache()
    first = _placement(fs, ck)
    _on_both_nodes(first)
    os.kill(first[1]["pid"], signal.SIGKILL)
    _wait(state, "two-1", lambda job: job["status"] in ("SUCCEEDED", "FAILED", "STOPPED"), deadline + 300)
    status = cluster("status", "two-1", cwd=root).stdout
    logs = cluster("logs", "two-1", cwd=root).stdout
    assert "SUCCEEDED" in status, logs[-4000:]
    assert "resuming from" in logs, logs[-3000:]
    fs.invalidate_cache()
    again = _placement(fs, ck)
    _on_both_nodes(again)
    assert again[1]["pid"] != first[1]["pid"]  # a new worker group took over
    final = root / "two-final"
    final.mkdir()
    (final / "metrics.jsonl").write_bytes(fs.cat_file(f"{ck}/step-{STEPS:08d}/run/metrics.jsonl"))
    two = read_metrics(final)
    assert max(two) == STEPS

    assert reference.wait(timeout=300) == 0, (root / "one" / "stderr.txt").read_text()[-3000:]
    single = read_metrics(root / "one" / "ck")
    for step in range(1, STEPS + 1):
        assert two[step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-5, abs=1e-6), step


def _single_process_reference(root: Path, aws: dict, monkeypatch) -> subprocess.Popen:
    """The fault test's job as one uninterrupted process, reading the dataset from the bucket (started now)."""
    ref = root / "one"
    ref.mkdir()
    tree = yaml.safe_load((root / "ck-two.pretrain.yaml").read_text())
    tree["data"]["dataset"] = f"{STORAGE}/data"  # the data-prep job's output, read from the bucket
    tree["checkpoint"]["dir"] = str(ref / "ck")
    for k, v in aws.items():
        monkeypatch.setenv(k, v)
    (ref / "pretrain.yaml").write_text(yaml.safe_dump(tree))
    with open(ref / "stderr.txt", "w") as err:
        return subprocess.Popen(pretrain_command(ref / "pretrain.yaml"), cwd=ref, env=pretrain_env(),
                                stdout=subprocess.DEVNULL, stderr=err)


def test_one_copy_per_name_stop_and_list(dataset, s3):
    """A second submission of a running name reports the first; `stop` has the pretraining workers commit a
    checkpoint (none was due) before the job ends, and the next submission resumes from it."""
    root, state, _ = dataset
    _, fs = s3
    _pretrain_tree(root, "ck-long", train__max_steps=100000, checkpoint__every_steps=0, train__log_every=5)
    job = _job(root, "long", {"kind": "pretrain", "config": "ck-long.pretrain.yaml"})
    first = cluster("submit", str(job), "--address", state["address"], cwd=root)
    second = cluster("submit", str(job), "--address", state["address"], cwd=root)
    assert first.returncode == 0 and "submitted job long-1" in first.stdout, first.stderr
    assert second.returncode == 0 and "already running as long-1" in second.stdout, second.stderr
    listed = cluster("list", "--address", state["address"], cwd=root).stdout
    assert listed.count("(long)") == 1 and "prep-1  SUCCEEDED" in listed
    deadline = time.monotonic() + 120
    _wait(state, "long-1", lambda job: job["status"] != "PENDING", deadline)
    assert "long-1  RUNNING" in cluster("status", "long-1", cwd=root).stdout  # its driver has started
    _wait(state, "long-1", lambda got: "step 10/" in got["logs"], deadline + 120, "logs")  # no checkpoint yet
    stopped = cluster("stop", "long-1", cwd=root)
    assert stopped.returncode == 0 and "long-1: STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    logs = cluster("logs", "long-1", cwd=root).stdout
    assert "SIGTERM: asking the pretraining workers to commit a checkpoint" in logs, logs[-3000:]
    fs.invalidate_cache()
    kept = fs.glob(f"{BUCKET}/cluster/ck-long/step-*/complete.json")
    assert len(kept) == 1 and f"stopped by signal at step {int(kept[0].split('step-')[1][:8])}; submit the job " \
        "again to resume" in logs, logs[-3000:]
    again = cluster("stop", "long-1", cwd=root)
    assert again.returncode == 1 and "already ended (STOPPED)" in again.stderr and "Traceback" not in again.stderr
    assert "stopping job" not in again.stdout, again.stdout  # (only a job still running is said to be stopping)
    # a job that fails: its status says why, in the job's own words
    (root / "dp-bad.yaml").write_text(yaml.safe_dump({**yaml.safe_load((root / "dp.yaml").read_text()),
                                                   "inputs": ["no-such-corpus/*.txt"], "output": "bad"}))
    bad = cluster("submit", str(_job(root, "bad", {"kind": "data_prep", "config": "dp-bad.yaml"})), "--address",
                  state["address"], "--wait", cwd=root)
    assert bad.returncode != 0 and "submitted job bad-1" in bad.stdout, bad.stdout[-2000:] + bad.stderr[-2000:]
    failed = cluster("status", "bad", cwd=root)
    assert "bad-1  FAILED" in failed.stdout and "error: inputs[0]" in failed.stdout, failed.stdout
    assert "matched no files" in failed.stdout and "python -m cluster logs bad-1" in failed.stdout
    (line,) = [x for x in cluster("list", cwd=root).stdout.splitlines() if x.startswith("bad-1  FAILED")]
    assert "(bad): error: inputs[0] " in line and "matched no files" in line, line  # the job's own line
    unknown = cluster("logs", "no-such-job", cwd=root)
    assert unknown.returncode == 1 and "no job 'no-such-job'" in unknown.stderr and "Traceback" not in unknown.stderr
    # a stopped job's name is free again: the next submission is a new job
    third = cluster("submit", str(job), "--address", state["address"], cwd=root)
    assert third.returncode == 0 and "submitted job long-2" in third.stdout
    _wait(state, "long-2", lambda got: "resuming from" in got["logs"], deadline + 300, "logs")  # the stop's checkpoint
    status = cluster("status", "long-2", cwd=root).stdout
    assert "long-2  RUNNING" in status and "\n  stage pretrain: " in status, status  # where it is
    other = cluster("submit", str(job), "max_failures=3", "--address", state["address"], cwd=root)
    assert other.returncode == 1 and "is running as long-2 with another plan" in other.stderr, other.stderr
    assert cluster("stop", "long-2", cwd=root).returncode == 0
    # the numbers go past a deleted (older) job's: the count of listed jobs would give long-3's twice
    deleted = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "delete", "long-1", "--address",
                              state["address"]], env={**env(), "RAY_AUTH_MODE": "token",
                                                      "RAY_AUTH_TOKEN_PATH": state["token_path"]},
                             capture_output=True, text=True, timeout=120)
    assert deleted.returncode == 0, deleted.stderr[-2000:]
    over_at_once = _job(root, "long", {"kind": "data_prep", "config": "dp-bad.yaml"})  # (the same name)
    fourth = cluster("submit", str(over_at_once), "--address", state["address"], "--wait", cwd=root)
    assert fourth.returncode != 0 and "submitted job long-3" in fourth.stdout, fourth.stdout + fourth.stderr
