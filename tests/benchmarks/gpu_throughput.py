"""One-GPU training throughput: our model in the DeepSpeed engine (ZeRO-1, bf16) as pretraining runs it on a
GPU (unpadded, compiled layers, fused AdamW), its levers one at a time, and transformers' BertForPreTraining
(SDPA attention, bf16 autocast, fused AdamW), side by side.

    python tests/benchmarks/gpu_throughput.py                       # BERT-base@128, base@512, large@128
    python tests/benchmarks/gpu_throughput.py --configs base:128:256/512 --dataset data/bench128
    python tests/benchmarks/gpu_throughput.py --configs tiny:64:8 --steps 3 --precision fp32  # CPU smoke

Variants: `ours` (the default: unpadded, compiled, bf16 through autocast), `ours-eager` (unpadded, not
compiled), `ours-padded` (neither), `ours-varlen` (attention on the packed tokens too: `train.varlen_attention`),
`ours-zero0` (the default under ZeRO-0), `ours-dsbf16` and
`ours-dsbf16-zero0` (DeepSpeed's bf16 mode: bf16 weights with fp32 master copies), `transformers`.

    python tests/benchmarks/gpu_throughput.py --count-ops --configs base:128:8 --variants ours,ours-dsbf16

counts the host-side work of one optimizer step per phase instead of timing (runs on CPU too). Where a config
names two or more batch sizes without accumulation, each variant's time per step is also fitted as a fixed cost
per step plus a cost per sequence ("step cost fit" rows).

For each config (PRESET:SEQ, optionally :B1/B2/... batch sizes, else --batches) and variant it tries every
batch size (an out-of-memory one is skipped) and keeps the best; rounds alternate between variants and each keeps its best round. Batches are synthetic,
shaped like pretraining data (lengths --min-fill..100% of the sequence, 15% of real tokens masked). Reported:
sequences/s, real (non-padding) tokens/s, MFU = model FLOPs on real tokens (pretrain.model.training_flops)
/ time / the device's bf16 matmul peak (measured at the start: about 790 TFLOP/s on H100 and H200; --peak-tflops
sets it), and peak GPU memory. With --dataset (a dataset
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

import torch.nn.functional as F  # noqa: E402
from cpu_model_throughput import make_batches  # noqa: E402

from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.engine import batching, build_engine, init_distributed  # noqa: E402
from pretrain.hf_compat import hf_config_fields  # noqa: E402
from pretrain.model import BertForPretraining, compile_layers, pretraining_loss, training_flops  # noqa: E402
from pretrain.presets import preset  # noqa: E402
from torch.profiler import ProfilerActivity, record_function  # noqa: E402
from torch.profiler import profile as torch_profile  # noqa: E402

PEAK = 790e12  # FLOP/s that MFU divides by: on a GPU, replaced by the bf16 matmul rate measured at the start


def matmul_peak(n: int = 8192, reps: int = 10, rounds: int = 5) -> float:
    """The device's dense bf16 matmul rate in FLOP/s: the best round of `reps` products of two n x n matrices."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    del a, b
    torch.cuda.empty_cache()
    return best
VARIANTS = ("ours", "ours-eager", "ours-padded", "transformers")
# DeepSpeed's bf16 mode (bf16 weights, fp32 master copies), the default before bf16 went through autocast
DS_BF16 = {"bf16": {"enabled": True, "check_grad_overflow": True}, "torch_autocast": {"enabled": False}}
# variant -> (unpad, varlen attention, compile, ZeRO stage, DeepSpeed config overrides)
OURS = {"ours": (True, False, True, 1, {}), "ours-eager": (True, False, False, 1, {}),
        "ours-padded": (False, False, False, 1, {}), "ours-varlen": (True, True, True, 1, {}),
        "ours-zero0": (True, False, True, 0, {}), "ours-dsbf16": (True, False, True, 1, DS_BF16),
        "ours-dsbf16-zero0": (True, False, True, 0, DS_BF16)}
PHASES = ("forward", "backward", "step")
# aten ops that launch no kernel (views, allocation, metadata) or are counted as host syncs
NO_KERNEL = {"aten::" + n for n in (
    "view", "as_strided", "detach", "detach_", "empty", "empty_strided", "empty_like",
    "_has_compatible_shallow_copy_type", "resolve_conj", "resolve_neg", "_unsafe_view", "alias", "expand", "t",
    "transpose", "reshape", "_reshape_alias", "select", "slice", "unsqueeze", "squeeze", "lift_fresh", "to",
    "_to_copy", "chunk", "split", "narrow", "permute", "set_", "result_type", "is_nonzero", "item",
    "_local_scalar_dense", "unbind", "flatten", "contiguous", "zeros", "ones", "full", "new_zeros", "new_empty")}
HOST_SYNCS = {"aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize", "cudaDeviceSynchronize",
              "cudaMemcpy"}
LAUNCHES = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"}


def to(b: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in b.items()}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, batches, device, warm: int = 1) -> float:
    """Seconds for micro steps on batches[warm:], after warm-up micro steps on batches[:warm]."""
    for b in batches[:warm]:
        step(b)
    sync(device)
    t = time.perf_counter()
    for b in batches[warm:]:
        step(b)
    sync(device)
    return time.perf_counter() - t


def engine_for(c, variant: str, batch: int, precision: str, device, accumulation: int = 1, **train):
    """The DeepSpeed engine of one of OURS variants, with `train` overriding keys of the train section."""
    unpad, varlen, compiled, stage, overrides = OURS[variant]
    cfg = PretrainConfig(data={"dataset": "-"}, precision=precision,
                         deepspeed={"zero_stage": stage, "config": overrides},
                         train={"micro_batch_size": batch, "global_batch_size": batch * accumulation,
                                "grad_clip": 1.0, **train})
    model = BertForPretraining(c, unpad=unpad, varlen=varlen)
    if compiled:
        compile_layers(model)
    return build_engine(model, cfg, batching(cfg, 1), precision, device)


def ours_step(engine):
    def step(b):
        with record_function("forward"):
            mlm, nsp = engine(b["ids"], b["types"], b["mask"], b["positions"])
            loss, _, _ = pretraining_loss(mlm, b["labels"], nsp, b["nsp"])
        with record_function("backward"):
            engine.backward(loss)
        with record_function("step"):
            engine.step()
    return step


def theirs_step(c, device, dtype, accumulation: int = 1):
    import transformers

    model = transformers.BertForPreTraining(
        transformers.BertConfig(**hf_config_fields(c), attn_implementation="sdpa")).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    micro = [0]

    def step(b):  # as hf_step, without reading the loss back (no sync per step, as ours)
        with record_function("forward"), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(input_ids=b["ids"], token_type_ids=b["types"], attention_mask=b["mask"])
            V = out.prediction_logits.shape[-1]
            loss = F.cross_entropy(out.prediction_logits.view(-1, V), b["labels_full"].view(-1)) \
                + F.cross_entropy(out.seq_relationship_logits, b["nsp"])
        with record_function("backward"):
            (loss / accumulation).backward()
        micro[0] += 1
        if micro[0] % accumulation == 0:
            with record_function("step"):
                opt.step()
                opt.zero_grad(set_to_none=True)
    return step


def setup(variant: str, c, size: str, seq: int, args, device, steps: int):
    """(step function, device batches for warm-up + `steps` optimizer steps, micro batch, accumulation)."""
    batch, acc = (int(x) for x in (size.split("x") if "x" in size else (size, 1)))
    batches = [to(b, device) for b in make_batches(c.vocab_size, (steps + 1) * acc, batch, seq, min_fill=args.min_fill)]
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    step = (theirs_step(c, device, dtype, acc) if variant == "transformers"
            else ours_step(engine_for(c, variant, batch, args.precision, device, acc)))
    return step, batches, batch, acc


def measure(variant: str, c, size: str, seq: int, args, device) -> dict | None:
    """Best of --rounds for one variant at one batch size (MICRO or MICROxACCUMULATION); None when it does not
    fit in memory."""
    step = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step, batches, batch, acc = setup(variant, c, size, seq, args, device, args.steps)
        best = min(timed(step, batches, device, warm=acc) for _ in range(args.rounds))
    except torch.OutOfMemoryError:
        return None
    except Exception as e:  # one variant failing (e.g. a compiler error) must not lose the others' figures
        print(f"{variant} at batch {size} failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
        return {"batch": size, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    finally:
        del step
        release(device)
    timed_batches = batches[acc:]
    flops = sum(training_flops(c, b["mask"].sum(1).cpu(), len(b["labels"])) for b in timed_batches)
    real = sum(int(b["mask"].sum()) for b in timed_batches)
    out = {"batch": size, "seq_per_s": round(len(timed_batches) * batch / best, 1),
           "real_tokens_per_s": round(real / best), "mfu": round(flops / best / PEAK, 3),
           "ms_per_step": round(1000 * best / args.steps, 1)}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def profiled(variant: str, c, size: str, seq: int, args, device, steps: int):
    """`steps` optimizer steps of one variant under torch.profiler (after a warm-up) -> (profiler, wall seconds)."""
    step, batches, _, acc = setup(variant, c, size, seq, args, device, steps)
    for b in batches[:acc]:
        step(b)
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        t = time.perf_counter()
        for b in batches[acc:]:
            step(b)
        sync(device)
        wall = time.perf_counter() - t
    del step
    release(device)
    return prof, wall


def profile(variant: str, c, size: str, seq: int, args, device, out_dir: str) -> dict:
    """Three steps of one variant under torch.profiler: the busiest kernels and host functions, written to
    out_dir, and the share of wall time the GPU was busy (low: the step is bound by host-side work)."""
    prof, wall = profiled(variant, c, size, seq, args, device, 3)
    events = prof.key_averages()
    name = f"{c.num_layers}x{c.hidden_size}@{seq}-{size}-{variant}"
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    Path(out_dir, f"profile-{name}.txt").write_text(
        f"wall {wall * 1000:.1f} ms for 3 steps\n\n" + events.table(sort_by=sort, row_limit=40)
        + "\n\n" + events.table(sort_by="cpu_time_total", row_limit=40))
    busy = sum(e.self_device_time_total for e in events) / 1e6 if device.type == "cuda" else 0.0
    return {"config": name, "wall_ms_per_step": round(wall * 1000 / 3, 1), "gpu_busy": round(busy / wall, 3)}


def multi_tensor(e) -> bool:
    """A foreach or fused op: one multi-tensor kernel (per ~100 tensors) on a GPU."""
    return e.name.startswith(("aten::_foreach_", "aten::_fused_"))


def in_multi_tensor(e) -> bool:
    """Inside a foreach or fused op, whose CPU fallback loops over the tensors (and reads the step counters
    inline): on a GPU these are part of its one kernel, neither launches nor syncs of their own."""
    while e.cpu_parent is not None:
        e = e.cpu_parent
        if multi_tensor(e):
            return True
    return False


def count_ops(variant: str, c, size: str, seq: int, args, device) -> dict:
    """Host-side work of one optimizer step, per phase (forward, backward, step): host milliseconds, aten ops
    that launch a kernel (on CPU they run inline), CUDA kernel launches, and host syncs (reading a device value
    back). A phase's fixed cost on a GPU is its launches x a few microseconds each plus its syncs, whatever the
    batch. On CPU the same code paths run as on a GPU, with compiled layers' kernels not counted as aten ops."""
    prof, _ = profiled(variant, c, size, seq, args, device, 1)
    events = prof.events()
    out = {}
    for phase in PHASES:
        for span in (e for e in events if e.name == phase):
            start, end = span.time_range.start, span.time_range.end
            inside = [e for e in events if start <= e.time_range.start and e.time_range.end <= end and e is not span]
            aten = [e for e in inside if e.name.startswith("aten::")]
            leaves = [e for e in aten if e.name not in NO_KERNEL and not in_multi_tensor(e) and (
                multi_tensor(e) or not any(ch.name.startswith("aten::") for ch in e.cpu_children))]
            out[f"{phase}_ms"] = round(out.get(f"{phase}_ms", 0) + (end - start) / 1000, 1)
            out[f"{phase}_ops"] = out.get(f"{phase}_ops", 0) + len(leaves)
            out[f"{phase}_syncs"] = out.get(f"{phase}_syncs", 0) + sum(
                e.name in HOST_SYNCS and not in_multi_tensor(e) for e in inside)
            if device.type == "cuda":
                out[f"{phase}_launches"] = out.get(f"{phase}_launches", 0) + sum(e.name in LAUNCHES for e in inside)
    return out


def data_wait(c, batch: int, args, device) -> dict:
    """Train the default variant from pretrain's loader over --dataset: seq/s and the share of time waiting."""
    from data_prep.tokenizer import cached
    from pretrain.batch import Collator
    from pretrain.data import StreamPlan, open_dataset, train_loader

    ds = open_dataset(args.dataset)
    collator = Collator(ds.manifest, "static", 1234, word_start=cached(str(ds.tokenizer_file(".")))[1])
    plan = StreamPlan(ds.shards("train"), max(1, args.workers), 1234, 10000, digests=ds.digests("train"))
    loader = iter(train_loader(plan, collator, batch, 0, 1, 0, args.workers, pin_memory=device.type == "cuda"))
    step = ours_step(engine_for(c, "ours", batch, args.precision, device))

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
    ap.add_argument("--configs", default="base:128:512/512x4/1024,base:512:64x4/128x2,large:128:256x4",
                    help="PRESET:SEQ[:B1/B2/...], comma-separated; a batch MICROxN accumulates N micro batches "
                         "per optimizer step")
    ap.add_argument("--batches", default="64,128,256", help="batch sizes to try where a config names none")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--min-fill", type=float, default=0.8, help="shortest sequence as a share of --seq")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--dataset", help="a dataset whose sequence length matches a config: measures data-wait")
    ap.add_argument("--workers", type=int, default=4, help="loader processes for the data-wait measurement")
    ap.add_argument("--profile", metavar="DIR", help="also profile 3 steps of each variant's best batch into DIR "
                                                     "(kernel and host tables, GPU-busy share)")
    ap.add_argument("--count-ops", action="store_true",
                    help="instead of timing: count each variant's host-side work per optimizer step (host ms, "
                         "kernel-launching ops, host syncs per phase) at each config's first batch size")
    ap.add_argument("--peak-tflops", type=float,
                    help="the bf16 peak MFU divides by (default: measured at the start with 8192^3 matmuls; "
                         "790 on CPU)")
    ap.add_argument("--json")
    args = ap.parse_args()

    global PEAK
    topo = init_distributed()
    device = topo.device
    if args.peak_tflops:
        PEAK = args.peak_tflops * 1e12
    elif device.type == "cuda" and not args.count_ops:
        PEAK = matmul_peak()
    print(f"MFU against a bf16 peak of {PEAK / 1e12:.0f} TFLOP/s"
          + (" (measured here)" if device.type == "cuda" and not args.peak_tflops else ""), flush=True)
    rows = []
    dataset_seq = None
    if args.dataset:
        from pretrain.data import open_dataset

        dataset_seq = open_dataset(args.dataset).manifest["examples"]["max_seq_length"]
    for spec in args.configs.split(","):
        name, seq, *sizes = spec.split(":")
        seq = int(seq)
        batches = sizes[0].split("/") if sizes else args.batches.split(",")
        torch.manual_seed(0)
        c = preset(name, args.vocab, max_position=max(512, seq))
        if args.count_ops:
            for variant in args.variants.split(","):
                rows.append({"config": f"{name}@{seq}", "variant": variant, "batch": batches[0],
                             **count_ops(variant, c, batches[0], seq, args, device)})
                print(rows[-1], flush=True)
            continue
        best: dict[str, dict] = {}
        every: dict[str, list[dict]] = {}
        for batch in batches:
            for variant in args.variants.split(","):
                got = measure(variant, c, batch, seq, args, device)
                print(f"{name}@{seq} batch {batch} {variant}: {got or 'out of memory'}", flush=True)
                if got and "seq_per_s" in got:
                    every.setdefault(variant, []).append(got)
                if got and "error" in got:
                    best.setdefault(variant, got)
                elif got and got["seq_per_s"] > best.get(variant, {}).get("seq_per_s", 0):
                    best[variant] = got
        for variant, got in best.items():
            row = {"config": f"{name}@{seq}", "variant": variant, **got}
            if variant == "ours" and dataset_seq == seq and "error" not in got:
                row.update(data_wait(c, int(got["batch"].split("x")[0]), args, device))
            if args.profile and "error" not in got:
                found = profile(variant, c, got["batch"], seq, args, device, args.profile)
                print(f"profile: {found}", flush=True)
                row["gpu_busy"] = found["gpu_busy"]
            rows.append(row)
            if args.json:  # kept as it goes: a run stopped early still leaves what it measured
                report(rows, meta(device, args.precision), args.json, quiet=True)
        for variant, got in every.items():
            fit = step_cost(got)
            if fit:
                rows.append({"config": f"{name}@{seq}", "variant": f"{variant}: step cost fit", **fit})
        if "seq_per_s" in best.get("ours", {}) and "seq_per_s" in best.get("transformers", {}):
            rows.append({"config": f"{name}@{seq}", "variant": "ours / transformers",
                         "seq_per_s": round(best["ours"]["seq_per_s"] / best["transformers"]["seq_per_s"], 2)})
    report(rows, meta(device, args.precision), args.json)


def step_cost(measured: list[dict]) -> dict | None:
    """Least-squares fit of ms per optimizer step = fixed + per sequence x batch over the batch sizes measured
    without accumulation: the fixed part is what a step costs whatever its batch (optimizer, launches, syncs)."""
    points = [(int(m["batch"]), m["ms_per_step"]) for m in measured if "x" not in m["batch"]]
    if len({b for b, _ in points}) < 2:
        return None
    n = len(points)
    mb, mt = sum(b for b, _ in points) / n, sum(t for _, t in points) / n
    slope = sum((b - mb) * (t - mt) for b, t in points) / sum((b - mb) ** 2 for b, _ in points)
    return {"fixed_ms": round(mt - slope * mb, 1), "ms_per_seq": round(slope, 4)}


def meta(device, precision: str = "bf16") -> dict:
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "precision": precision,
            "peak_tflops": round(PEAK / 1e12, 1), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}


def report(rows: list[dict], meta: dict, json_path: str | None, quiet: bool = False) -> None:
    import json

    if json_path:
        Path(json_path).write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    if quiet:
        return
    cols = ["config", "variant", "batch", "seq_per_s", "real_tokens_per_s", "mfu", "ms_per_step", "peak_memory_gib",
            "gpu_busy", "data_wait", "loader_seq_per_s", "fixed_ms", "ms_per_seq", "error"]
    if rows and "step_ops" in rows[0]:
        cols = ["config", "variant", "batch"] + [f"{p}_{k}" for p in PHASES for k in ("ms", "ops", "launches", "syncs")]
        cols = [k for k in cols if any(k in r for r in rows)]
    print("\n" + ", ".join(f"{k} {v}" for k, v in meta.items()))
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
