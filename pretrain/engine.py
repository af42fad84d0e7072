"""DeepSpeed, in one place: the process group, the DeepSpeed config dict, the optimizer and the engine.

The batch arithmetic (micro x accumulation x world = global) is derived here once. AdamW is torch's fused
implementation (a few kernels per step on GPUs and CPUs; DeepSpeed's own Adam would compile a C++/CUDA op at
the first run); DeepSpeed builds its LAMB and, for ZeRO-Offload, its CPU Adam from the "optimizer" section.

bf16 is mixed precision through DeepSpeed's `torch_autocast` section: the weights, their gradients and the
optimizer stay fp32, the matmuls and attention run in bf16 under `torch.autocast`, and gradients of Linear
weights are reduced (and ZeRO-3 weights gathered) in bf16. DeepSpeed's `bf16` section (bf16 weights with
fp32 master copies) costs a fixed ~2,700 extra kernel launches per optimizer step at BERT-base's 206
parameter tensors, almost all from its per-tensor inf/NaN check, plus, without ZeRO, one host sync per
tensor (counted by tests/benchmarks/gpu_throughput.py --count-ops; on one H200 that mode showed a fixed
56 ms per step). Under autocast an inf/NaN gradient is caught by the global norm, once per step.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import re
import shutil
import socket
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
import torch.distributed as dist

from pretrain.config import FinetuneConfig, PretrainConfig

AnyConfig = PretrainConfig | FinetuneConfig  # both have .train (optimizer fields), .deepspeed and .precision


class SetupError(Exception):
    """The config cannot run on this machine or with this many processes; the message says what to change."""


@dataclass(frozen=True)
class Topology:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Batching:
    micro: int
    accumulation: int
    world: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accumulation * self.world


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_deepspeed() -> None:
    """Set up this process for DeepSpeed, before it is first imported (repeatable, cheap):

    - this Python environment's executables first on PATH when they include `ninja`. DeepSpeed builds some ops
      at their first use (ZeRO-Offload's CPU Adam, LAMB) with the ninja on PATH; pip installs one with
      DeepSpeed, beside python. Run as `.venv/bin/python -m ...` without activating the environment, a machine
      would otherwise need a system ninja, and processes that found different ninjas would each rebuild the op
      (their build records differ);
    - the deprecation warning DeepSpeed's ZeRO calls raise in torch, on every rank, silenced;
    - on a machine without a GPU: DeepSpeed's CPU accelerator named (what it would pick, without the warning
      that it guessed), and its shared-memory all-reduce op never built. Only DeepSpeed's inference and
      tensor-parallel layers call that op (`inference_all_reduce`), but its communication backend builds it
      whenever it starts on CPUs: ~30 s of C++ compilation at a run's first start, and a compiler and ninja
      required for any training on CPUs. DeepSpeed reads which ops it may build from
      `deepspeed.ops.__compatible_ops__`, a dict it keeps for the process so that edits persist.
    """
    bindir = Path(sys.executable).parent
    ninja = bindir / ("ninja.exe" if os.name == "nt" else "ninja")
    if ninja.is_file() and Path(shutil.which("ninja") or "") != ninja:
        os.environ["PATH"] = os.pathsep.join(p for p in (str(bindir), os.environ.get("PATH")) if p)
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning)
    if torch.cuda.is_available():
        return  # (only the CPU accelerator builds that op; reading which ops may build costs a probe of each)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> Topology:
    """Join (or create) the process group: gloo on CPU, NCCL on GPUs.

    Works unchanged under torchrun, the deepspeed launcher (both set RANK/WORLD_SIZE/LOCAL_RANK), a
    process group someone else created (Ray Train), and a bare `python -m pretrain` (a group of one).
    """
    prepare_deepspeed()
    import deepspeed

    if not dist.is_initialized() and "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
    return Topology(dist.get_rank(), dist.get_world_size(), local_rank, device)


def batching(cfg: PretrainConfig, world: int) -> Batching:
    t = cfg.train
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step:
        raise SetupError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size x ranks "
            f"({t.micro_batch_size} x {world} = {per_step}); e.g. train.global_batch_size="
            f"{max(1, round(t.global_batch_size / per_step)) * per_step}")
    return Batching(t.micro_batch_size, t.global_batch_size // per_step, world)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively (GPUs since Ampere). Older ones (V100, T4) only emulate it, far
    slower than their fp16 tensor cores."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(cfg: AnyConfig, device: torch.device) -> str:
    # auto: bf16 where the GPU computes in it, else fp32. Both keep fp32 weights and optimizer state, so a run moved
    # between GPU kinds resumes as it was; fp16 (faster on V100/T4 tensor cores) changes the checkpoint's layout and
    # needs loss scaling, so it is asked for, not guessed.
    if cfg.precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if cfg.precision == "fp16" and device.type != "cuda":
        raise SetupError("precision=fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use precision=bf16 or fp32")
    return cfg.precision


def ds_config(cfg: AnyConfig, b: Batching, precision: str, device: torch.device) -> dict:
    """The DeepSpeed config dict: the only place one is written."""
    t, z = cfg.train, cfg.deepspeed
    on_gpu = device.type == "cuda"
    zero: dict = {"stage": z.zero_stage}
    if z.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=on_gpu, reduce_bucket_size=int(5e7),
                    allgather_bucket_size=int(5e7))
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    out: dict = {
        "train_micro_batch_size_per_gpu": b.micro,
        "gradient_accumulation_steps": b.accumulation,
        "train_batch_size": b.global_batch,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # progress is ours (pretrain/tracking.py)
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":  # fp32 weights and optimizer, bf16 compute (see the module's docstring)
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        out["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    if t.optimizer == "lamb" or z.offload_optimizer:
        opt = {"type": "Lamb" if t.optimizer == "lamb" else "AdamW",
               "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay}}
        out["optimizer"] = opt
    else:
        out["zero_allow_untested_optimizer"] = True
    return _merge(out, z.config)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class StepGuard:
    """An optimizer (as the first base of a subclass) that clips by global norm and skips a step whose gradients
    hold inf/NaN.

    DeepSpeed's ZeRO optimizers and its fp16 wrapper check and clip gradients themselves. Without ZeRO (stage 0)
    in fp32 or bf16 the engine calls the optimizer directly, so this does both and reports through the two
    attributes the engine reads: `overflow` (counts the skip and holds the LR schedule) and `_global_grad_norm`.
    """

    def __init__(self, params, max_norm: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        self.overflow = False
        self._global_grad_norm = 0.0

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return super().step(closure)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            self.zero_grad(set_to_none=True)
            return None
        if self.max_norm > 0 and self._global_grad_norm > self.max_norm:
            torch._foreach_mul_(grads, self.max_norm / (self._global_grad_norm + 1e-6))
        return super().step(closure)


class GuardedAdamW(StepGuard, torch.optim.AdamW):
    """torch's AdamW, guarded."""


def guarded_lamb(groups: list[dict], params: dict, max_norm: float) -> torch.optim.Optimizer:
    """DeepSpeed's fused LAMB (CUDA), guarded, built from the DeepSpeed config's optimizer params as DeepSpeed
    would build it."""
    from deepspeed.ops.lamb import FusedLamb

    params = {**params, **({"betas": tuple(params["betas"])} if "betas" in params else {})}
    return type("GuardedLamb", (StepGuard, FusedLamb), {})(groups, max_norm=max_norm, **params)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (as Google's and NVIDIA's BERT)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        (plain if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


class Schedule:
    """LR multiplier: linear warmup, then linear / cosine / poly decay to `min_ratio` (or constant)."""

    def __init__(self, kind: str, warmup: int, total: int, min_ratio: float = 0.0, power: float = 0.5):
        self.kind, self.warmup, self.total, self.min_ratio, self.power = kind, warmup, total, min_ratio, power

    @classmethod
    def of(cls, train: Mapping) -> "Schedule":
        """Pretraining's schedule from a `train` config section as a dict (a checkpoint's, from before
        min_lr_ratio and poly_power, takes their defaults)."""
        return cls(train["schedule"], train["warmup_steps"], train["max_steps"], train.get("min_lr_ratio", 0.0),
                   train.get("poly_power", 0.5))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        done = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "linear":
            f = 1.0 - done
        elif self.kind == "cosine":
            f = 0.5 * (1.0 + math.cos(math.pi * done))
        else:
            f = (1.0 - done) ** self.power
        return self.min_ratio + (1.0 - self.min_ratio) * f


def build_engine(model: torch.nn.Module, cfg: AnyConfig, b: Batching, precision: str, device: torch.device,
                 schedule: Schedule | None = None, warn=None):
    """A DeepSpeed engine around `model`, with the optimizer of `cfg.train` and `schedule` (default: pretraining's).
    `warn(line)` hears of deepspeed.config keys DeepSpeed did not read (it ignores unknown ones silently)."""
    import deepspeed

    t = cfg.train
    if device.type != "cuda":
        if t.optimizer == "lamb":
            raise SetupError("train.optimizer=lamb needs a GPU (DeepSpeed's LAMB is CUDA-only); use adamw")
        if cfg.deepspeed.offload_optimizer:
            raise SetupError("deepspeed.offload_optimizer moves optimizer states from GPU to CPU memory; "
                             "on a CPU-only machine leave it false")
    config = _ReadKeys(ds_config(cfg, b, precision, device))
    groups = param_groups(model, t.weight_decay)
    optimizer = None
    if cfg.deepspeed.zero_stage == 0 and t.optimizer == "adamw":
        config.pop("optimizer", None)
        config["gradient_clipping"] = 0.0  # GuardedAdamW clips, after its check
        optimizer = GuardedAdamW(groups, max_norm=t.grad_clip, lr=t.lr, betas=t.betas, eps=t.eps,
                                 fused=True)
    elif t.optimizer == "lamb" and precision != "fp16":  # (ZeRO-0: LAMB runs under no ZeRO; fp16's wrapper checks)
        params = config.pop("optimizer")["params"]
        config["gradient_clipping"] = 0.0  # (as above)
        optimizer = guarded_lamb(groups, params, t.grad_clip)
    elif "optimizer" not in config:
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, fused=True)
    sched = schedule or Schedule.of(t.model_dump())

    def lr_scheduler(opt):
        # A plain function is not saved in the scheduler's state, so a resumed run follows the schedule of
        # its current config (e.g. a raised train.max_steps) from the restored step on.
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: sched(step))

    try:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                               lr_scheduler=lr_scheduler, config=config)
    except (ValueError, AssertionError, TypeError, KeyError) as e:  # (pydantic's errors are ValueErrors)
        merged = _leaf_keys(cfg.deepspeed.config, "deepspeed.config")
        if not _about(e, merged):
            raise
        why = [line.strip() for line in str(e).splitlines() if line.strip() and "errors.pydantic.dev" not in line]
        raise SetupError(f"DeepSpeed refused its config, into which deepspeed.config merged {', '.join(merged)}: "
                         f"{' '.join(why[:4]) or type(e).__name__}; fix or remove those keys") from None
    if warn and "train_batch_size" in config.read:  # (else DeepSpeed read a copy: nothing to tell)
        for key in (k for k in cfg.deepspeed.config if k not in config.read):
            warn(f"deepspeed.config.{key}: DeepSpeed {deepspeed.__version__} has no such setting and ignores it; "
                 "check its spelling against DeepSpeed's config documentation")
    if getattr(engine, "config", None) is config:  # (saved in every checkpoint: a plain dict loads weights-only)
        engine.config = dict(config)
    return engine


class _ReadKeys(dict):
    """A config dict that notes the top-level keys read from it: DeepSpeed ignores those it does not know."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def _leaf_keys(tree: dict, prefix: str) -> list[str]:
    return [k for key, v in tree.items()
            for k in (_leaf_keys(v, f"{prefix}.{key}") if isinstance(v, dict) and v else [f"{prefix}.{key}"])]


def _about(e: Exception, merged: list[str]) -> bool:
    """Whether DeepSpeed's error `e` is its config validation's, or names one of the keys deepspeed.config set
    (anything else is not the user's keys' doing, and keeps its traceback)."""
    from pydantic import ValidationError

    return bool(merged) and (isinstance(e, ValidationError) or any(k.rsplit(".", 1)[-1] in str(e) for k in merged))

def apply_hyperparameters(engine, cfg: PretrainConfig) -> None:
    """After loading a checkpoint: the config's LR, betas, eps, weight decay and gradient clipping win over the
    saved optimizer's.

    Loading restores the optimizer's and the schedule's saved hyperparameters (ZeRO's optimizers their clipping
    norm too); a resumed run with a lowered train.lr or train.grad_clip (what the numerics guard advises) must
    actually use them. Weight decay goes to the first group only: the one `param_groups` decays.
    """
    t = cfg.train
    sched = engine.lr_scheduler
    opt = engine.optimizer
    guarded = next((o for o in (opt, getattr(opt, "optimizer", None)) if isinstance(o, StepGuard)), None)
    if guarded is not None:  # (alone, or inside DeepSpeed's fp16/bf16 wrapper at ZeRO-0, whose own clipping stays 0)
        guarded.max_norm = t.grad_clip
    elif hasattr(opt, "clip_grad"):  # DeepSpeed's ZeRO and bf16 optimizers
        opt.clip_grad = t.grad_clip
    groups = opt.param_groups
    if groups and "weight_decay" in groups[0]:
        groups[0]["weight_decay"] = t.weight_decay
    if sched is not None:
        sched.base_lrs = [t.lr] * len(groups)
        factors = [fn(sched.last_epoch) for fn in sched.lr_lambdas]
    else:
        factors = [1.0] * len(groups)
    for g, f in zip(groups, factors, strict=False):
        g["lr"] = t.lr * f
        if "betas" in g:
            g["betas"] = tuple(t.betas)
        if "eps" in g:
            g["eps"] = t.eps


TRUST_ENV = "BERTFORGE_TRUST_CHECKPOINTS"
_LOADING = threading.RLock()  # (the block changes process-wide settings: one at a time)


@contextlib.contextmanager
def weights_only_loading(what: str | Path) -> Iterator[None]:
    """Every `torch.load` in the block, DeepSpeed's own included (which ask for full unpickling), reads tensors and
    plain containers only, plus the few DeepSpeed classes its checkpoints hold: a checkpoint from elsewhere (a shared
    bucket, a colleague's directory) cannot run code as it loads. A file that needs more is refused, naming `what`
    and the way to load it in full where it is trusted ($BERTFORGE_TRUST_CHECKPOINTS=1)."""
    import pickle

    if os.environ.get(TRUST_ENV, "").lower() in ("1", "true", "yes"):
        yield
        return
    from collections import OrderedDict

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # (checkpoints written before the engine's saved config became a plain dict hold it as our _ReadKeys: read as
    # an ordered dict, one of the containers a weights-only load fills)
    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, (OrderedDict, f"{__name__}._ReadKeys")]
    with _LOADING:
        saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                                      "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            with torch.serialization.safe_globals(allowed):
                yield
        except pickle.UnpicklingError as e:
            from pretrain.checkpoint import CheckpointError

            found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(e))
            why = f" (it asks for {found.group(1) or found.group(2)})" if found else ""
            raise CheckpointError(
                f"{what} holds more than tensors and plain values{why}, and loading it in full would run whatever "
                f"code it holds: it was altered, or written by other software. If it comes from you or someone you "
                f"trust, set {TRUST_ENV}=1 to load it") from None
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def checkpoint_weights(step_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full weights stored in a DeepSpeed checkpoint directory, whatever its ZeRO stage (fp32, except
    fp16 weights without ZeRO, whose fp32 masters sit in the optimizer wrapper's state).

    ZeRO 1-3 keep the fp32 master weights partitioned in the optimizer states; DeepSpeed's
    consolidation merges them. Without ZeRO the model-states file holds the module's own weights.
    Both are DeepSpeed's pickled files, read weights-only (`weights_only_loading`).
    """
    prepare_deepspeed()  # (a ZeRO-0 checkpoint's pickle imports DeepSpeed too)
    if zero_stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        said = io.StringIO()  # its progress lines and bars, shown only if it fails
        try:
            with weights_only_loading(step_dir), \
                    _output_of(sys.modules[get_fp32_state_dict_from_zero_checkpoint.__module__], said):
                weights = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
        except BaseException:
            sys.stderr.write(said.getvalue())
            raise
    else:
        with weights_only_loading(step_dir):
            weights = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu",
                                 weights_only=False)["module"]  # (unless trusted, the block makes it weights-only)
    return {k: v.detach().contiguous() for k, v in weights.items()}


_OUTPUT_SWAP = threading.RLock()  # (re-entrant: a block nested in one thread restores in order)


@contextlib.contextmanager
def _output_of(module, into: io.StringIO) -> Iterator[None]:
    """Send what `module` prints (print, tqdm bars) to `into` for the block. Only that module's: swapping
    sys.stdout would also take the lines other threads print meanwhile (the tracker's, during a registration
    inside training). The swap is of module globals, so blocks in different threads take turns."""
    from tqdm import tqdm

    def quiet_print(*args, **kwargs):
        print(*args, **{**kwargs, "file": into})

    with _OUTPUT_SWAP:
        saved = {name: module.__dict__[name] for name in ("print", "tqdm") if name in module.__dict__}
        module.print, module.tqdm = quiet_print, functools.partial(tqdm, file=into)
        try:
            yield
        finally:
            for name in ("print", "tqdm"):
                if name in saved:
                    setattr(module, name, saved[name])
                else:
                    delattr(module, name)


def engine_weights(engine) -> dict[str, torch.Tensor]:
    """The live engine's full weights (gathering ZeRO-3 partitions; a collective call), on CPU in fp32."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
