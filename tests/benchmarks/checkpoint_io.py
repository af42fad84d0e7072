"""What the sha256 digests of a checkpoint cost: at save (recorded in commit.json) and at resume (checked before
the load), against the save and the load themselves, side by side in one run.

    python tests/benchmarks/checkpoint_io.py [--preset base] [--zero-stage 1] [--rounds 3]

A real DeepSpeed engine of the preset (one process, CPU or the GPU there is), one step trained (so that the
optimizer's moments exist), writes a real checkpoint with
`pretrain.checkpoint.save`, which syncs every file and records its sha256 (each rank hashes a share of the files,
a thread per file); the digests are then timed on their own over the same, freshly written files as the save
computes them (and with one thread, for comparison), and `checkpoint.altered` (the check a resume makes) against
`checkpoint.load`. Rounds alternate save and load; each figure is the median.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_model_throughput import make_batches  # noqa: E402
from data_prep.tokenizer import sha256_file  # noqa: E402
from pretrain import checkpoint  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.engine import batching, build_engine, init_distributed  # noqa: E402
from pretrain.model import BertForPretraining, pretraining_loss  # noqa: E402
from pretrain.presets import preset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--zero-stage", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", help="where to write the checkpoints (default: a temporary directory)")
    args = ap.parse_args()
    topo = init_distributed()
    cfg = PretrainConfig(data={"dataset": "-"}, precision="fp32", deepspeed={"zero_stage": args.zero_stage},
                         train={"micro_batch_size": 8, "global_batch_size": 8})
    engine = build_engine(BertForPretraining(preset(args.preset, 30522)), cfg, batching(cfg, 1), "fp32",
                          topo.device)
    # one step first: the optimizer's moments exist from then on, and make up most of a checkpoint
    b = {k: v.to(topo.device) for k, v in make_batches(30522, 1, 8, 128)[0].items()}
    mlm, nsp = engine(b["ids"], b["types"], b["mask"], b["positions"])
    engine.backward(pretraining_loss(mlm, b["labels"], nsp, b["nsp"])[0])
    engine.step()
    client = {"step": 1}
    times: dict[str, list[float]] = {"save (digests included)": [], "digests alone": [], "digests, one thread": [],
                                     "load": [], "check before load": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        for r in range(args.rounds):
            shutil.rmtree(root / checkpoint.tag(r + 1), ignore_errors=True)
            start = time.perf_counter()
            path = checkpoint.save(engine, root, r + 1, client, keep=1)
            times["save (digests included)"].append(time.perf_counter() - start)
            names = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
            start = time.perf_counter()
            checkpoint._digests(path, names)  # as a save of one rank computes them (a thread per file)
            times["digests alone"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for name in names:
                sha256_file(path / name)
            times["digests, one thread"].append(time.perf_counter() - start)
            start = time.perf_counter()
            assert checkpoint.altered(path) == []
            times["check before load"].append(time.perf_counter() - start)
            start = time.perf_counter()
            checkpoint.load(engine, path)
            times["load"].append(time.perf_counter() - start)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nBERT-{args.preset} ZeRO-{args.zero_stage}, 1 rank, {topo.device.type}: "
          f"checkpoint of {size / 1e9:.2f} GB\n")
    print("| step | median s | share |")
    print("|---|---|---|")
    print(f"| save (digests included) | {med['save (digests included)']:.2f} | |")
    print(f"| digests alone | {med['digests alone']:.2f} | {med['digests alone'] / med['save (digests included)']:.0%} "
          f"of the save ({size / 1e9 / med['digests alone']:.2f} GB/s) |")
    print(f"| digests, one thread | {med['digests, one thread']:.2f} | (for comparison) |")
    print(f"| load | {med['load']:.2f} | |")
    print(f"| check before load | {med['check before load']:.2f} | "
          f"{med['check before load'] / med['load']:.0%} of the load |")


if __name__ == "__main__":
    main()
