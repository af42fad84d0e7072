"""How fast pretrain's loader makes batches on CPU: can --workers processes feed a GPU at --target seq/s?

    python tests/benchmarks/loader_throughput.py DATASET [--batch 256] [--batches 60] [--workers 0,1,2]
    [--target 6200]

It iterates pretrain.data.train_loader (shard reading, msgpack decoding, collation with MLM labels and
masked positions) exactly as training does, without a model, and reports sequences/s for each worker
count. A training loop waits for data only when the loader is slower than the model, so with W workers
the loader keeps data-wait near zero while W x (sequences/s of one worker) stays above the model's rate;
the last line says how many workers --target needs, from the best per-worker rate measured. A dataset:
`python -m data_prep demo-corpus corpus/demo && python -m data_prep run configs/data_prep/quickstart.yaml
examples.max_seq_length=128` (the sequence length of the recorded figures).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_prep.tokenizer import cached  # noqa: E402
from pretrain.batch import Collator  # noqa: E402
from pretrain.data import StreamPlan, open_dataset, train_loader  # noqa: E402


def rate(dataset, workers: int, batch: int, batches: int, masking: str, digests: bool = True) -> float:
    """Sequences/s of the loader with `workers` processes, after the first batches (start-up) are drawn; `digests`:
    each shard's sha256 checked as it is read, as training does."""
    collator = Collator(dataset.manifest, masking, 1234, word_start=cached(str(dataset.tokenizer_file(".")))[1])
    plan = StreamPlan(dataset.shards("train"), max(1, workers), 1234, 10000,
                      digests=dataset.digests("train") if digests else None)
    it = iter(train_loader(plan, collator, batch, 0, 1, 0, workers, pin_memory=False))
    for _ in range(max(2, workers * 2)):  # every worker has started and filled its first batch
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--masking", default="static", choices=["static", "dynamic"])
    ap.add_argument("--target", type=float, default=6200.0, help="the model's sequences/s to keep fed")
    ap.add_argument("--digest-cost", action="store_true",
                    help="also time each worker count without the shards' sha256 check, side by side")
    args = ap.parse_args()
    ds = open_dataset(args.dataset)
    print(f"dataset {args.dataset}: seq {ds.manifest['examples']['max_seq_length']}, "
          f"{ds.manifest['splits']['train']['examples']:,} train examples; {os.cpu_count()} CPUs; "
          f"masking {args.masking}; batch {args.batch}")
    print("| loader workers | sequences/s | per worker |" + (" without sha256 check | ratio |\n|---|---|---|---|---|"
                                                          if args.digest_cost else "\n|---|---|---|"))
    per_worker = 0.0
    for w in (int(x) for x in args.workers.split(",")):
        r = rate(ds, w, args.batch, args.batches, args.masking)
        if w:  # training uses worker processes: their rate includes handing batches to the training process
            per_worker = max(per_worker, r / w)
        unchecked = rate(ds, w, args.batch, args.batches, args.masking, digests=False) if args.digest_cost else 0
        print(f"| {w} | {r:,.0f} | {r / max(1, w):,.0f} |" + (f" {unchecked:,.0f} | {r / unchecked:.3f} |"
                                                              if unchecked else ""), flush=True)
    if not per_worker:
        return
    need = math.ceil(args.target * 1.02 / per_worker)  # 2% headroom for the loader's own jitter
    print(f"\n{args.target:,.0f} seq/s needs {need} loader worker(s) at {per_worker:,.0f} seq/s each "
          f"(one CPU core per worker)")


if __name__ == "__main__":
    main()
