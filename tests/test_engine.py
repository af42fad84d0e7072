"""bf16 through the DeepSpeed engine on CPU, the code paths GPUs run: the optimizer step's host-side cost
(counted with the benchmark's counter) and the loss curves of the padded, unpadded and varlen layouts.

bf16 runs as fp32 weights under autocast (pretrain/engine.py). DeepSpeed's own bf16 mode checks every
parameter tensor for inf/NaN on each step, ~15 kernel launches per tensor: on a GPU that was a fixed cost of
56 ms per BERT-base step. The counts are the same on CPU (the same Python code paths), so CI guards them.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import argparse, json, sys
sys.path[:0] = [{root!r}, {bench!r}]
import torch
import gpu_throughput as g
from pretrain.engine import init_distributed
from pretrain.model import BertForPretraining
from pretrain.presets import preset

device = init_distributed().device
g.OURS.update({{"zero1": (True, False, False, 1, {{}}), "zero0": (True, False, False, 0, {{}}),
               "ds-bf16": (True, False, False, 1, g.DS_BF16), "padded": (False, False, False, 1, {{}}),
               "varlen": (True, True, False, 1, {{}})}})
args = argparse.Namespace(min_fill=0.5, precision="bf16")
c = preset("tiny", 1000, dropout=0.0, attention_dropout=0.0)  # (BERT-mini: the same, at 2.5x the time)
out = {{"tensors": len(list(BertForPretraining(c).parameters()))}}
for variant in ("zero1", "zero0", "ds-bf16"):
    out[variant] = g.count_ops(variant, c, "4", 32, args, device)
engine = g.engine_for(c, "zero1", 4, "bf16", device)
b = g.to(g.make_batches(c.vocab_size, 1, 4, 32)[0], device)
mlm, _ = engine(b["ids"], b["types"], b["mask"], b["positions"])
out["weights"] = str(next(engine.module.parameters()).dtype)
out["logits"] = str(mlm.dtype)
# the same code paths train: 30 steps of each layout from the same weights, batches with 0-50% padding whose
# masked tokens are left in place (a copy task: learnable in a few steps)
batches = [g.to(x, device) for x in g.make_batches(c.vocab_size, 30, 8, 32, seed=3, min_fill=0.5)]
for variant in ("zero1", "padded", "varlen"):
    torch.manual_seed(0)
    engine = g.engine_for(c, variant, 8, "bf16", device, lr=2e-3, warmup_steps=0)
    curve = []
    for x in batches:
        mlm, nsp = engine(x["ids"], x["types"], x["mask"], x["positions"])
        loss, _, _ = g.pretraining_loss(mlm, x["labels"], nsp, x["nsp"])
        engine.backward(loss)
        engine.step()
        curve.append(loss.item())
    out[variant + "_curve"] = curve
# the MLM loss's global mean through the engine's gradient accumulation: micro batches of ~19 and 2 masked tokens,
# against one token mean over both (and the micro batch means, which weigh the 2 tokens ~10x more)
import torch.nn.functional as F
from pretrain.model import pretraining_loss
x = g.make_batches(c.vocab_size, 1, 4, 32, seed=5, min_fill=1.0)[0]
few = dict(x, positions=x["positions"][:2], labels=x["labels"][:2])
total = torch.tensor(float(x["labels"].numel() + 2))
grads = {{}}
for mode in ("global_mean", "micro_batch_mean"):
    torch.manual_seed(0)
    engine = g.engine_for(c, "zero0", 4, "fp32", device, accumulation=2, grad_clip=0.0)
    start = {{k: v.clone() for k, v in engine.module.state_dict().items()}}
    for b in (x, few):
        mlm, nsp = engine(b["ids"], b["types"], b["mask"], b["positions"])
        engine.backward(pretraining_loss(mlm, b["labels"], nsp, b["nsp"],
                                         total if mode == "global_mean" else None, 2)[0])
    grads[mode] = torch.cat([p.grad.flatten() for p in engine.module.parameters()])
ref = BertForPretraining(c)
ref.load_state_dict(start)
ce = nsp_sum = 0.0
for b in (x, few):
    mlm, nsp = ref(b["ids"], b["types"], b["mask"], b["positions"])
    ce = ce + F.cross_entropy(mlm.float(), b["labels"], reduction="sum")
    nsp_sum = nsp_sum + F.cross_entropy(nsp.float(), b["nsp"])
(ce / total + nsp_sum / 2).backward()
want = torch.cat([p.grad.flatten() for p in ref.parameters()])
out["masked"] = [int(x["labels"].numel()), 2]
for mode, got in grads.items():
    out[mode] = float((got - want).norm() / want.norm())
# a resume's clipping under ZeRO-0 with DeepSpeed's bf16 mode (GuardedAdamW inside DeepSpeed's wrapper, as fp16)
from pretrain.config import PretrainConfig
from pretrain.engine import apply_hyperparameters
g.OURS["ds-bf16-0"] = (True, False, False, 0, g.DS_BF16)
engine = g.engine_for(c, "ds-bf16-0", 4, "bf16", device)
apply_hyperparameters(engine, PretrainConfig(data={{"dataset": "-"}}, train={{"grad_clip": 0.5, "micro_batch_size": 4,
                                                                            "global_batch_size": 4}}))
out["resumed_clip"] = [engine.optimizer.clip_grad, engine.optimizer.optimizer.max_norm]
print("RESULT " + json.dumps(out))
"""


@functools.cache
def probe() -> dict:
    """The probe's results, run once in a fresh process (DeepSpeed keeps process-wide state)."""
    code = PROBE.format(root=str(ROOT), bench=str(ROOT / "tests" / "benchmarks"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def test_bf16_weights_stay_fp32_and_the_step_has_no_per_tensor_checks():
    got = probe()
    n = got["tensors"]
    assert got["weights"] == "torch.float32" and got["logits"] == "torch.bfloat16"  # autocast computes in bf16
    # ZeRO-1: about one copy per tensor between the flat fp32 partition and the weights, a few host syncs
    assert got["zero1"]["step_ops"] <= 3 * n and got["zero1"]["step_syncs"] <= 8, got["zero1"]
    # without ZeRO: the fused AdamW and the norm check, one host sync (the norm, read for the inf/NaN check)
    assert got["zero0"]["step_ops"] <= 10 and got["zero0"]["step_syncs"] == 1, got["zero0"]
    # DeepSpeed's bf16 mode, for contrast: the counter sees its per-tensor checks
    assert got["ds-bf16"]["step_ops"] >= 10 * n, got["ds-bf16"]
    for variant in ("zero1", "zero0"):  # one sync in the forward: the packed token count (unpadding)
        assert got[variant]["forward_syncs"] == 1 and got[variant]["backward_syncs"] == 0, got[variant]


def test_bf16_training_is_the_same_padded_unpadded_and_with_varlen_attention():
    """The engine's bf16 path (autocast, ZeRO-1) on CPU, the code that runs on GPUs: unpadded and varlen
    attention follow the padded layout's loss curve within bf16 rounding, and learn."""
    got = probe()
    padded = got["padded_curve"]
    assert sum(padded[-5:]) < sum(padded[:5]) - 2.0, padded  # it learned, so equal curves mean something
    for variant in ("zero1", "varlen"):
        curve = got[variant + "_curve"]
        assert max(abs(a - b) for a, b in zip(curve, padded)) < 0.03, (variant, curve, padded)


def test_the_global_mlm_mean_weighs_every_masked_token_the_same_through_accumulation():
    """train.mlm_loss=global_mean through DeepSpeed's accumulation (which divides each micro batch's loss by
    their count) gives the gradient of one token mean over the step's masked tokens; micro batch means do not."""
    got = probe()
    assert got["masked"][0] > 5 * got["masked"][1], got["masked"]
    assert got["global_mean"] < 1e-5, got
    assert got["micro_batch_mean"] > 0.05, got


def test_a_resumed_zero0_run_clips_once_with_its_config_norm():
    """At ZeRO-0, GuardedAdamW clips (after its inf/NaN check) and DeepSpeed's wrapper (fp16, or its bf16 mode) is
    told not to; a resume's config clipping norm goes to GuardedAdamW, not to the wrapper (which clipped twice)."""
    assert probe()["resumed_clip"] == [0.0, 0.5]


def test_the_step_guard_skips_a_non_finite_step_and_clips_whatever_the_optimizer():
    """The guard is a base any optimizer class takes (AdamW; LAMB on GPUs, which DeepSpeed runs unchecked):
    gradients holding NaN leave the weights and the optimizer's state as they were; finite ones are clipped to
    max_norm by their global norm."""
    import torch

    from pretrain.engine import StepGuard

    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = type("GuardedSGD", (StepGuard, torch.optim.SGD), {})([w], max_norm=1.0, lr=1.0, momentum=0.9)
    w.grad = torch.tensor([float("nan"), 1.0])
    opt.step()
    assert opt.overflow and w.tolist() == [1.0, 2.0] and w.grad is None and not opt.state[w]
    w.grad = torch.tensor([3.0, 4.0])  # norm 5: clipped to 1
    opt.step()
    assert not opt.overflow and opt._global_grad_norm == 5.0
    assert torch.allclose(w.detach(), torch.tensor([1.0 - 0.6, 2.0 - 0.8]), atol=1e-5)


def test_deepspeed_is_prepared_before_it_starts(monkeypatch):
    """DeepSpeed builds ops (ZeRO-Offload's CPU Adam, LAMB) with the `ninja` on PATH: this environment's own
    (pip installs it with DeepSpeed), also when the environment is used without activating it. The op only its
    inference layers use is never built; without a GPU the CPU accelerator is named rather than guessed."""
    import torch

    from pretrain.engine import prepare_deepspeed

    bindir = str(Path(sys.executable).parent)
    assert (Path(bindir) / "ninja").is_file(), "DeepSpeed's dependency ninja is installed beside python"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    prepare_deepspeed()
    assert os.environ["PATH"] == os.pathsep.join((bindir, "/usr/bin", "/bin"))
    prepare_deepspeed()  # already first: unchanged
    assert os.environ["PATH"].count(bindir) == 1
    if not torch.cuda.is_available():
        import deepspeed.ops

        assert os.environ.get("DS_ACCELERATOR") == "cpu"
        assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_on_gpus_that_have_it(monkeypatch, native):
    """On V100s and T4s torch only emulates bf16 (it says "supported" unless asked without emulation): `auto` takes
    fp32 there, which keeps the checkpoint's layout (fp32 weights and optimizer, as bf16 does). (No GPU here:
    torch's answer is stood in for.)"""
    import torch

    from pretrain.config import FinetuneConfig, PretrainConfig
    from pretrain.engine import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    configs = (PretrainConfig.model_validate({"data": {"dataset": "ds"}}),
               FinetuneConfig.model_validate({"model": "m", "task": {"train": "t.jsonl"}}))
    assert [resolve_precision(c, gpu) for c in configs] == ["bf16" if native else "fp32"] * 2
    assert [resolve_precision(c, cpu) for c in configs] == ["fp32"] * 2
