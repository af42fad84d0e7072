"""How long commands that only read a config take to answer, against `import torch` alone, side by side in one run.

    python tests/benchmarks/startup.py [--rounds 5]

Each command runs in a fresh interpreter, as a user runs it, and ends before any real work:
  train, bad key    `python -m pretrain train configs/pretrain/quickstart.yaml train.max_stepz=1` (exit 2)
  finetune, bad key the same for `python -m pretrain finetune configs/finetune/classify.yaml` (exit 2)
  cluster validate  `python -m cluster validate configs/jobs/quickstart.yaml` (every stage's config checked, and
                    the fine-tuning task's files read: the quickstart's demo task is made for it first)
  cluster render    `python -m cluster render configs/jobs/quickstart.yaml --target kuberay`
  pull, no store    `python -m pretrain pull models:/x@y --tracking-uri sqlite:///<missing>` (exit 1)
  import torch      `python -c "import torch"`: what each of them would cost at least if it loaded torch

`cluster validate` runs in a scratch directory that holds that task in data/task (where the quickstart job's
fine-tune reads it) and `configs` (a link to the repository's); the rest in the repository. Commands alternate
round by round (the VM's speed drifts); the table gives each one's median wall time and its ratio to `import
torch` measured in the same rounds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def job_dir(scratch: Path) -> Path:
    """A directory to run the quickstart job's commands in, with the demo task in data/task."""
    work = scratch / "job"
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    for cmd in (["demo-corpus", str(scratch / "corpus")],
                ["demo-task", str(work / "data" / "task"), "--corpus", str(scratch / "corpus")]):
        subprocess.run([sys.executable, "-m", "data_prep", *cmd], cwd=REPO, check=True, capture_output=True)
    return work


def commands(scratch: Path) -> dict[str, tuple[list[str], int, Path]]:
    """{name: (command, its exit status, where it runs)}."""
    py = [sys.executable]
    work = job_dir(scratch)
    return {
        "train, bad key": (py + ["-m", "pretrain", "train", "configs/pretrain/quickstart.yaml", "train.max_stepz=1"],
                           2, REPO),
        "finetune, bad key": (py + ["-m", "pretrain", "finetune", "configs/finetune/classify.yaml",
                                    "train.epochz=1"], 2, REPO),
        "cluster validate": (py + ["-m", "cluster", "validate", "configs/jobs/quickstart.yaml"], 0, work),
        "cluster render": (py + ["-m", "cluster", "render", "configs/jobs/quickstart.yaml", "--target", "kuberay"],
                           0, REPO),
        "pull, no store": (py + ["-m", "pretrain", "pull", "models:/x@y", "--out", str(scratch / "out"),
                                 "--tracking-uri", f"sqlite:///{scratch / 'missing.db'}"], 1, REPO),
        "import torch": (py + ["-c", "import torch"], 0, REPO),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(Path(tmp))
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for r in range(args.rounds):
            for name, (cmd, status, where) in cmds.items():
                start = time.perf_counter()
                out = subprocess.run(cmd, cwd=where, capture_output=True, text=True, timeout=300)
                times[name].append(time.perf_counter() - start)
                if out.returncode != status:
                    sys.exit(f"{name}: exit {out.returncode}, expected {status}\n{out.stderr[-2000:]}")
                if "not on this machine" in out.stdout:  # (validate did not find the task files it is to read)
                    sys.exit(f"{name}: {out.stdout[-2000:]}")
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    torch_s = statistics.median(times["import torch"])
    print(f"{'command':<20} {'median s':>9} {'vs import torch':>16}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<20} {med:>9.2f} {med / torch_s:>15.2f}x")


if __name__ == "__main__":
    main()
