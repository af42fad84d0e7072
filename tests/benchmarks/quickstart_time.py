"""How long the README's first command takes after its installs: the quickstart job end to end, in a fresh directory.

    python tests/benchmarks/quickstart_time.py [--keep DIR]

Runs, in a new scratch directory holding `configs` (a link to the repository's) and nothing else, what the
README's first command runs after `pip install`:
  python -m data_prep demo-corpus corpus/demo
  python -m data_prep demo-task data/task
  python -m cluster submit configs/jobs/quickstart.yaml
and prints each command's wall time, the job summary's time line (each stage's seconds) and the total. The job
starts its own local Ray and writes a local MLflow store, as a new user's does; with `--keep DIR` the scratch
directory is DIR and stays (run `quickstart_quality.py --corpus DIR/corpus/demo` from DIR), else it is removed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMANDS = {
    "demo-corpus": ["-m", "data_prep", "demo-corpus", "corpus/demo"],
    "demo-task": ["-m", "data_prep", "demo-task", "data/task"],
    "cluster submit": ["-m", "cluster", "submit", "configs/jobs/quickstart.yaml"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, help="run in this new directory and keep it")
    args = ap.parse_args()
    if args.keep and args.keep.exists():
        sys.exit(f"--keep {args.keep} exists: give a new directory")
    work = args.keep or Path(tempfile.mkdtemp(prefix="quickstart-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "configs").symlink_to(REPO / "configs")
    times, job_log = {}, ""
    try:
        for name, cmd in COMMANDS.items():
            start = time.perf_counter()
            run = subprocess.run([sys.executable, *cmd], cwd=work, capture_output=True, text=True)
            times[name] = time.perf_counter() - start
            if run.returncode != 0:
                sys.exit(f"{name}: exit {run.returncode}\n{(run.stdout + run.stderr)[-3000:]}")
            print(f"{name:<16} {times[name]:7.1f} s", flush=True)
            job_log = run.stdout
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary = job_log[job_log.rfind("== job summary"):]
    stages = re.search(r"^time +(.*)$", summary, re.M)
    total = sum(times.values())
    print(f"{'job':<16} {stages.group(1) if stages else '(no time line in the job summary)'}")
    print(f"{'total':<16} {total:7.1f} s ({int(total // 60)} min {total % 60:.0f} s)")


if __name__ == "__main__":
    main()
