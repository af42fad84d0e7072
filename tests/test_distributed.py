"""Two CPU ranks over gloo under torchrun: ZeRO stages agree with one process, and a SIGKILLed run resumes exactly."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO, free_port, pretrain_command, pretrain_config, pretrain_env, read_metrics, run_pretrain

pytestmark = pytest.mark.slow

STEPS = 10


def _config(tmp: Path, dataset: Path, **over) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "pretrain.yaml"
    path.write_text(yaml.safe_dump(pretrain_config(dataset, tmp / "ck", **over)))
    return path


def _equivalence_config(tmp: Path, dataset: Path, stage: int) -> Path:
    # No dropout: one process and two ranks draw dropout masks from different generators.
    return _config(tmp, dataset, train__max_steps=STEPS, model__dropout=0.0, model__attention_dropout=0.0,
                   deepspeed__zero_stage=stage, data__eval_examples=0, checkpoint__every_steps=0,
                   mlflow__enabled=False)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, train_dataset) -> dict[int, dict]:
    """Losses of one process at global batch 16 = micro 8 x 2 accumulation steps."""
    cfg = _equivalence_config(tmp_path_factory.mktemp("single"), train_dataset, 0)
    out = run_pretrain(cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "8 x 2 accumulation x 1 ranks" in out.stdout
    return read_metrics(cfg.parent / "ck")


# ZeRO-2 on two ranks (one per node, under Ray Train) is tests/test_cluster_jobs.py's fault test
@pytest.mark.parametrize("stage", [1, 3])  # ZeRO-0 on two ranks: the DeepSpeed launcher's test below
def test_zero_stages_on_two_ranks_match_one_process(tmp_path, train_dataset, one_process, stage):
    cfg = _equivalence_config(tmp_path, train_dataset, stage)
    out = run_pretrain(cfg, nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "8 x 1 accumulation x 2 ranks" in out.stdout and f"ZeRO-{stage}" in out.stdout
    assert "Warning" not in out.stderr, out.stderr[-3000:]  # (ZeRO's deprecated torch calls, silenced)
    two = read_metrics(tmp_path / "ck")
    for step in range(1, STEPS + 1):
        for key in ("loss", "mlm_acc", "nsp_acc"):
            assert two[step][key] == pytest.approx(one_process[step][key], rel=1e-5, abs=1e-6), (step, key)
    assert two[STEPS]["loss"] < two[1]["loss"]


def test_the_deepspeed_launcher_runs_the_same_job(tmp_path, train_dataset, one_process):
    """DeepSpeed's own launcher (which appends --local_rank=N to the arguments), ZeRO-0 over two ranks: the same
    losses."""
    cfg = _equivalence_config(tmp_path, train_dataset, 0)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_ssh", "--node_rank", "0",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--module", "pretrain", "train",
           str(cfg)]
    out = subprocess.run(cmd, cwd=tmp_path, env=pretrain_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on 2 cpu rank(s)" in out.stdout and "ZeRO-0" in out.stdout
    two = read_metrics(tmp_path / "ck")
    for step in range(1, STEPS + 1):
        assert two[step]["loss"] == pytest.approx(one_process[step]["loss"], rel=1e-5, abs=1e-6), step


def _trace(ck: Path, after: dict[str, int] | None = None) -> dict[tuple[int, int], list[str]]:
    """Examples trained on per (rank, step), from each rank's trace file past byte `after[name]` (a file's start by
    default); a step recorded twice keeps its last record. With accumulation 1 each rank writes one record a step.
    A record that does not end its line (cut short by a kill) is left out."""
    by_step: dict[tuple[int, int], list[str]] = {}
    for rank_file in sorted((ck / "trace").glob("rank-*.jsonl")):
        rank = int(rank_file.stem.split("-")[1])
        text = rank_file.read_bytes()[(after or {}).get(rank_file.name, 0):].decode()
        for line in text.split("\n")[:-1]:  # (whole lines only)
            rec = json.loads(line)
            by_step[(rank, rec["step"])] = rec["keys"]
    return by_step


def test_sigkill_and_resume_is_exact(tmp_path, train_dataset):
    """2 ranks, ZeRO-2, fp32, dropout on, dynamic masks, 80 steps: the 713 examples' first epoch ends in step 45.

    The run is SIGKILLed (torchrun and both ranks) past step 47, after its step-40 checkpoint; the rerun resumes from
    the newest committed checkpoint. The steps it trains again (from there to the kill: across the epoch's end)
    must equal their first training bit for bit (loss, accuracy, the very examples); the run must end with every
    step trained once, every example in it once or twice.
    """
    over = dict(train__max_steps=80, train__micro_batch_size=8, train__global_batch_size=16, train__log_every=1,
                train__masking="dynamic", deepspeed__zero_stage=2, checkpoint__every_steps=20,
                checkpoint__keep=10, debug__trace_examples=True, data__eval_examples=0, mlflow__enabled=False)
    cut = _config(tmp_path, train_dataset, **over)
    ck = cut.parent / "ck"
    metrics = ck / "metrics.jsonl"
    proc = subprocess.Popen(pretrain_command(cut, nproc=2), cwd=cut.parent, env=pretrain_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and sum(1 for _ in metrics.open()) >= 47:
            break
        time.sleep(0.02)
    # torchrun starts its workers in their own sessions: kill the whole tree, as a lost node would.
    tree = psutil.Process(proc.pid)
    for p in [tree, *tree.children(recursive=True)]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    first, first_trace = read_metrics(ck), _trace(ck)
    killed_at = max(first)
    assert 47 <= killed_at < 80, "killed mid-run"
    saved = sorted(p.name for p in ck.iterdir() if p.name.startswith("step-"))
    resume_step = max(int(n.split("-")[1]) for n in saved if not n.endswith(".partial"))
    assert resume_step < 46 <= killed_at, "the steps trained again cross the end of the first epoch"
    written = {f.name: f.stat().st_size for f in (ck / "trace").iterdir()}

    out = run_pretrain(cut, nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"(step {resume_step}," in out.stdout
    resumed, again = read_metrics(ck), _trace(ck, after=written)  # (again: what the rerun trained)
    assert sorted(resumed) == list(range(1, 81))
    assert sorted(again) == [(rank, step) for rank in (0, 1) for step in range(resume_step + 1, 81)]
    for step in range(resume_step + 1, killed_at + 1):
        assert resumed[step]["loss"] == first[step]["loss"], step  # bit for bit (JSON floats round-trip)
        assert resumed[step]["mlm_acc"] == first[step]["mlm_acc"], step
        for rank in (0, 1):  # (a rank may have been killed before recording the last step)
            if step < killed_at or (rank, step) in first_trace:
                assert again[(rank, step)] == first_trace[(rank, step)], (rank, step)
    trained = {k: v for k, v in first_trace.items() if k[1] <= resume_step} | again
    counts = Counter(k for keys in trained.values() for k in keys)
    examples = json.loads((train_dataset / "manifest.json").read_text())["splits"]["train"]["examples"]
    assert sum(counts.values()) == 80 * 16 and len(counts) == examples and set(counts.values()) == {1, 2}


LEAVE = """
import atexit, sys
from pretrain import cli

class Finalized:
    def __del__(self):
        print("finalized", flush=True)

kept = Finalized()  # freed when the interpreter finalizes its modules
atexit.register(print, "exit handler", flush=True)
cli._joined["group"] = {joined}
print("buffered", end="")
cli.leave(3)
"""


@pytest.mark.parametrize("joined", [True, False])
def test_a_process_that_was_in_a_group_leaves_without_finalizing(joined):
    """After a process group, `python -m pretrain` exits with its status, its exit handlers run and its output
    flushed, but without the interpreter's finalization (during which gloo's threads abort the process)."""
    out = subprocess.run([sys.executable, "-c", LEAVE.format(joined=joined)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert out.stdout.startswith("buffered") and "exit handler" in out.stdout
    assert ("finalized" in out.stdout) is not joined


APART = """
import os, sys
from pathlib import Path

from data_prep.configfile import load_config
from pretrain.config import PretrainConfig
from pretrain.train import train

# Each rank keeps its checkpoints in a directory of its own, as ranks on machines that share no disk do (a cluster
# job's local copies of the checkpoints it uploads). The other ranks' directories are on "other machines": opening
# a file there fails.
rank, base = int(os.environ["RANK"]), Path(sys.argv[2])
mine = base / f"rank-{rank}"
def other_machines(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = Path(os.fsdecode(args[0])).absolute()
        if path.is_relative_to(base) and not path.is_relative_to(mine):
            raise PermissionError(f"{path} is on another machine")
sys.addaudithook(other_machines)
cfg = load_config(PretrainConfig, sys.argv[1], sys.argv[3:])
cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"dir": str(mine)})})
summary = train(cfg)
sys.stdout.flush()
os.write(1, f"final step {summary['step']}\\n".encode())  # one write: the two ranks' lines cannot interleave
os._exit(0)  # (gloo's threads and the interpreter's finalization: see pretrain.cli.leave)
"""


def test_ranks_that_share_no_disk_resume_each_from_its_own_copy(tmp_path, train_dataset):
    """Two ranks, each with its own checkpoint directory, where only its own files can be read: once each holds
    the whole step-10 checkpoint (as a cluster job's workers download it), the rerun resumes from it on both."""
    cfg = _config(tmp_path, train_dataset, train__max_steps=10, deepspeed__zero_stage=2, checkpoint__every_steps=5,
                  data__eval_examples=0, mlflow__enabled=False)
    (tmp_path / "apart.py").write_text(APART)
    base = tmp_path / "apart"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "apart.py"), str(cfg), str(base)]
    out = subprocess.run(cmd, cwd=tmp_path, env=pretrain_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "final step 10" in out.stdout
    # rank 1 wrote its part of each checkpoint in its own directory (rank 0 commits its own): the download gives
    # each rank the whole checkpoint, in its own directory
    whole, part = base / "rank-0" / "step-00000010", base / "rank-1" / "step-00000010.partial"
    assert {p.name for p in part.iterdir()} >= {"rank-00001.pt"}
    for p in part.iterdir():
        shutil.copy2(p, whole / p.name)
    # Before rank 1 has its copy: the run stops (falling back to an older checkpoint would delete the newest at the
    # next save), and says which rank lacks what
    out = subprocess.run([*cmd, "train.max_steps=20"], cwd=tmp_path, env=pretrain_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert f"checkpoint {whole}: rank 1: client.json cannot be read" in out.stderr and "Rerun once every rank can " \
        "read it" in out.stderr, out.stderr[-3000:]
    assert whole.is_dir() and (base / "rank-0" / "step-00000005").is_dir()
    shutil.copytree(whole, base / "rank-1" / "step-00000010")

    out = subprocess.run([*cmd, "train.max_steps=20"], cwd=tmp_path, env=pretrain_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming from {whole} (step 10" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    assert "final step 20" in out.stdout
