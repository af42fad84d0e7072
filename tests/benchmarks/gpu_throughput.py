"""One-GPU training throughput: our model in the DeepSpeed engine (ZeRO-1, bf16), unpadded (the default) and
padded, against transformers' BertForPreTraining (SDPA attention, bf16 autocast, fused AdamW), side by side.

    python tests/benchmarks/gpu_throughput.py                       # BERT-base@128, base@512, large@128
    python tests/benchmarks/gpu_throughput.py --configs base:128 --batches 128,256 --dataset data/bench128
    python tests/benchmarks/gpu_throughput.py --configs tiny:64 --batches 8 --steps 3 --precision fp32  # CPU smoke

For each config and variant it tries every batch size of --batches (an out-of-memory one is skipped) and
keeps the best; rounds alternate between variants and each keeps its best round. Batches are synthetic,
shaped like pretraining data (lengths --min-fill..100% of the sequence, 15% of real tokens masked). Reported:
sequences/s, real (non-padding) tokens/s, MFU = model FLOPs on real tokens (pretrain.model.training_flops)
/ time / 790 TFLOP/s (the bf16 peak used for H100 and H200), and peak GPU memory. With --dataset (a dataset
of that sequence length, e.g. built by `python -m data_prep run configs/data_prep/quickstart.yaml
examples.max_seq_length=128 output=data/bench128`) the default variant also trains from pretrain's own
loader (--workers processes, pinned memory) and the share of time spent waiting for data is reported.
The table is printed as Markdown and written as JSON with --json.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_model_throughput import hf_step, make_batches  # noqa: E402

from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.engine import batching, build_engine, init_distributed  # noqa: E402
from pretrain.hf_compat import hf_config_fields  # noqa: E402
from pretrain.model import BertForPretraining, pretraining_loss, preset, training_flops  # noqa: E402

PEAK = 790e12
VARIANTS = ("ours", "ours-padded", "transformers")


def to(b: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in b.items()}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, batches, device) -> float:
    """Seconds for steps on batches[1:], after a warm-up step on batches[0]."""
    step(batches[0])
    sync(device)
    t = time.perf_counter()
    for b in batches[1:]:
        step(b)
    sync(device)
    return time.perf_counter() - t


def engine_for(c, unpad: bool, batch: int, precision: str, device):
    cfg = PretrainConfig(data={"dataset": "-"}, precision=precision, deepspeed={"zero_stage": 1},
                         train={"micro_batch_size": batch, "global_batch_size": batch, "grad_clip": 1.0})
    return build_engine(BertForPretraining(c, unpad=unpad), cfg, batching(cfg, 1), precision, device)


def ours_step(engine):
    def step(b):
        mlm, nsp = engine(b["ids"], b["types"], b["mask"], b["positions"])
        loss, _, _ = pretraining_loss(mlm, b["labels"], nsp, b["nsp"])
        engine.backward(loss)
        engine.step()
    return step


def theirs_step(c, device, dtype):
    import transformers

    model = transformers.BertForPreTraining(
        transformers.BertConfig(**hf_config_fields(c), attn_implementation="sdpa")).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step(b):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            hf_step(model, opt, b)
    return step


def measure(variant: str, c, batch: int, seq: int, args, device) -> dict | None:
    """Best of --rounds for one variant at one batch size; None when it does not fit in memory."""
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    batches = [to(b, device) for b in make_batches(c.vocab_size, args.steps + 1, batch, seq, min_fill=args.min_fill)]
    step = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step = (theirs_step(c, device, dtype) if variant == "transformers"
                else ours_step(engine_for(c, variant == "ours", batch, args.precision, device)))
        best = min(timed(step, batches, device) for _ in range(args.rounds))
    except torch.OutOfMemoryError:
        return None
    finally:
        del step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    timed_batches = batches[1:]
    flops = sum(training_flops(c, b["mask"].sum(1).cpu(), len(b["labels"])) for b in timed_batches)
    real = sum(int(b["mask"].sum()) for b in timed_batches)
    out = {"batch": batch, "seq_per_s": round(args.steps * batch / best, 1), "real_tokens_per_s": round(real / best),
           "mfu": round(flops / best / PEAK, 3)}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def data_wait(c, batch: int, args, device) -> dict:
    """Train the default variant from pretrain's loader over --dataset: seq/s and the share of time waiting."""
    from data_prep.tokenizer import cached
    from pretrain.batch import Collator
    from pretrain.data import StreamPlan, open_dataset, train_loader

    ds = open_dataset(args.dataset)
    collator = Collator(ds.manifest, "static", 1234, word_start=cached(str(ds.tokenizer_file(".")))[1])
    plan = StreamPlan(ds.shards("train"), max(1, args.workers), 1234, 10000)
    loader = iter(train_loader(plan, collator, batch, 0, 1, 0, args.workers, pin_memory=device.type == "cuda"))
    step = ours_step(engine_for(c, True, batch, args.precision, device))

    def next_batch():
        b = next(loader)
        return {"ids": b.input_ids, "types": b.token_type_ids, "mask": b.attention_mask,
                "positions": b.masked_positions, "labels": b.mlm_labels, "nsp": b.nsp_labels}

    for _ in range(3):  # warm-up: workers started, kernels chosen
        step(to(next_batch(), device))
    sync(device)
    wait, t0 = 0.0, time.perf_counter()
    for _ in range(args.steps * args.rounds):
        t = time.perf_counter()
        b = to(next_batch(), device)
        wait += time.perf_counter() - t
        step(b)
    sync(device)
    took = time.perf_counter() - t0
    return {"loader_seq_per_s": round(args.steps * args.rounds * batch / took, 1),
            "data_wait": round(wait / took, 4), "loader_workers": args.workers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="base:128,base:512,large:128", help="PRESET:SEQ, comma-separated")
    ap.add_argument("--batches", default="64,128,256", help="batch sizes to try per config and variant")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--min-fill", type=float, default=0.8, help="shortest sequence as a share of --seq")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--dataset", help="a dataset whose sequence length matches a config: measures data-wait")
    ap.add_argument("--workers", type=int, default=4, help="loader processes for the data-wait measurement")
    ap.add_argument("--json")
    args = ap.parse_args()

    topo = init_distributed()
    device = topo.device
    rows = []
    dataset_seq = None
    if args.dataset:
        from pretrain.data import open_dataset

        dataset_seq = open_dataset(args.dataset).manifest["examples"]["max_seq_length"]
    for spec in args.configs.split(","):
        name, seq = spec.split(":")
        seq = int(seq)
        torch.manual_seed(0)
        c = preset(name, args.vocab, max_position=max(512, seq))
        best: dict[str, dict] = {}
        for batch in (int(b) for b in args.batches.split(",")):
            for variant in args.variants.split(","):
                got = measure(variant, c, batch, seq, args, device)
                print(f"{name}@{seq} batch {batch} {variant}: {got or 'out of memory'}", flush=True)
                if got and got["seq_per_s"] > best.get(variant, {}).get("seq_per_s", 0):
                    best[variant] = got
        for variant, got in best.items():
            row = {"config": f"{name}@{seq}", "variant": variant, **got}
            if variant == "ours" and dataset_seq == seq:
                row.update(data_wait(c, got["batch"], args, device))
            rows.append(row)
        if "ours" in best and "transformers" in best:
            rows.append({"config": f"{name}@{seq}", "variant": "ours / transformers",
                         "seq_per_s": round(best["ours"]["seq_per_s"] / best["transformers"]["seq_per_s"], 2)})
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    report(rows, {"device": device_name, "precision": args.precision, "torch": torch.__version__,
                  "date": time.strftime("%Y-%m-%d")}, args.json)


def report(rows: list[dict], meta: dict, json_path: str | None) -> None:
    import json

    cols = ["config", "variant", "batch", "seq_per_s", "real_tokens_per_s", "mfu", "peak_memory_gib", "data_wait",
            "loader_seq_per_s"]
    print("\n" + ", ".join(f"{k} {v}" for k, v in meta.items()))
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if json_path:
        Path(json_path).write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
