"""One-GPU training throughput: our model in the DeepSpeed engine (ZeRO-1, bf16) against transformers'
BertForPreTraining in a plain PyTorch loop (bf16 autocast, fused AdamW), side by side in one run.

    python tests/benchmarks/gpu_throughput.py [--preset base] [--seq 128] [--batch 64] [--steps 30]
    python tests/benchmarks/gpu_throughput.py --preset tiny --steps 3 --precision fp32   # smoke run on CPU

Batches are synthetic, shaped like pretraining data (lengths 80-100% of --seq, 15% of real tokens
masked). Reported per model: sequences/s, real (non-padding) tokens/s, MFU = model FLOPs on real
tokens (pretrain.model.training_flops) / time / 790 TFLOP/s (the bf16 peak used for H100 and H200),
and peak GPU memory. Rounds alternate between the two models; each keeps its best round.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_model_throughput import hf_step, make_batches, report  # noqa: E402

from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.engine import batching, build_engine, init_distributed  # noqa: E402
from pretrain.hf_compat import hf_config_fields  # noqa: E402
from pretrain.model import BertForPretraining, pretraining_loss, preset, training_flops  # noqa: E402

PEAK = 790e12


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


def run_ours(engine, batches, device) -> float:
    def step(b):
        mlm, nsp = engine(b["ids"], b["types"], b["mask"], b["positions"])
        loss, _, _ = pretraining_loss(mlm, b["labels"], nsp, b["nsp"])
        engine.backward(loss)
        engine.step()

    return timed(step, batches, device)


def run_theirs(model, opt, batches, device, dtype) -> float:
    def step(b):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            hf_step(model, opt, b)

    return timed(step, batches, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per round (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--json")
    args = ap.parse_args()
    import transformers

    topo = init_distributed()
    device = topo.device
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    c = preset(args.preset, args.vocab)
    cfg = PretrainConfig(data={"dataset": "-"}, precision=args.precision, deepspeed={"zero_stage": 1},
                         train={"micro_batch_size": args.batch, "global_batch_size": args.batch, "grad_clip": 1.0})
    engine = build_engine(BertForPretraining(c), cfg, batching(cfg, 1), args.precision, device)
    theirs = transformers.BertForPreTraining(
        transformers.BertConfig(**hf_config_fields(c), attn_implementation="sdpa")).to(device).train()
    opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4, fused=device.type == "cuda")
    batches = [to(b, device) for b in make_batches(c.vocab_size, args.steps + 1, args.batch, args.seq)]
    timed = batches[1:]
    flops = sum(training_flops(c, b["mask"].sum(1).cpu(), len(b["labels"])) for b in timed)
    real = sum(int(b["mask"].sum()) for b in timed)
    seqs = args.steps * args.batch
    best = {"ours": float("inf"), "transformers": float("inf")}
    memory = {}
    for r in range(args.rounds):
        for name in best:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            took = run_ours(engine, batches, device) if name == "ours" else run_theirs(theirs, opt, batches, device,
                                                                                       dtype)
            best[name] = min(best[name], took)
            if device.type == "cuda":
                memory[name] = torch.cuda.max_memory_allocated() / 2**30
        print(f"round {r + 1}: ours {best['ours']:.2f}s, transformers {best['transformers']:.2f}s (best so far)",
              flush=True)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "preset": args.preset,
           "seq": args.seq, "batch": args.batch, "precision": args.precision, "torch": torch.__version__}
    for name, took in best.items():
        res[f"{name}_seq_per_s"] = round(seqs / took, 1)
        res[f"{name}_real_tokens_per_s"] = round(real / took)
        res[f"{name}_mfu"] = round(flops / took / PEAK, 3)
        if name in memory:
            res[f"{name}_peak_memory_gib"] = round(memory[name], 2)
    res["speedup"] = round(best["transformers"] / best["ours"], 2)
    report(res, args.json)


if __name__ == "__main__":
    main()
