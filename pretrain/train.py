"""The training loop: one function, top to bottom, that runs the same under any launcher."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from data_prep import storage
from data_prep.configfile import ConfigError, config_changes, dotted, flatten, redact_secrets
from data_prep.dataset import DatasetError
from data_prep.examples import stable_seed
from data_prep.tokenizer import cached
from pretrain import checkpoint
from pretrain.batch import Batch, Collator
from pretrain.config import PretrainConfig
from pretrain.data import StreamPlan, eval_batches, open_dataset, train_loader
from pretrain.engine import (
    SetupError,
    Topology,
    apply_hyperparameters,
    batching,
    build_engine,
    engine_weights,
    init_distributed,
    resolve_precision,
)
from pretrain.model import BertForPretraining, compile_layers, pretraining_loss, training_flops
from pretrain.tracking import (
    METRICS_FILE,
    RegistryError,
    Tracker,
    check_store,
    final_figures,
    git_commit,
    how_to_see,
    shown,
    tracking_uri,
)

# The bf16 peak per GPU that MFU divides by: for H100 and H200 a dense bf16 matmul's measured rate, about 790 TFLOP/s
# (below the datasheet's 989 for SXM parts, which large matmuls do not reach in practice: MFU against 989 is 0.8x
# these figures; tests/benchmarks/gpu_throughput.py measures the device's own); for A100 its datasheet 312.
PEAK_FLOPS = {"H100": 790e12, "H200": 790e12, "A100": 312e12}
EXIT_PREEMPTED = 143  # 128 + SIGTERM: the job stopped early, with a checkpoint to resume from

# Indices of the per-step sums that are all-reduced across ranks once per step.
SUMS = 13
LOSS, MLM, NSP, MLM_OK, MLM_N, NSP_OK, NSP_N, MICRO, TOKENS, SEQS, FLOPS, STOP, WAIT = range(SUMS)


class NumericsError(Exception):
    """Too many consecutive steps had a non-finite loss or gradient."""


class StopRequest:
    """SIGTERM or SIGINT asks for a checkpoint at the end of the current step; a second SIGINT stops at once.

    Handlers can only be set from the main thread; elsewhere (e.g. inside Ray Train) the launcher
    decides how a job stops.
    """

    def __init__(self, resume: str = "run the same command again"):
        self.signal: int | None = None
        self.resume = resume  # how whoever stopped the run continues it (a cluster job: submit it again)
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, sig, _frame):
        if self.signal is not None and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = sig


def _ignore_signals(_worker_id: int) -> None:
    # Loader workers leave stopping to the training process (which saves first); they exit with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _resume_point(cfg: PretrainConfig, world: int, tracker: Tracker) -> list[str]:
    """Names (step-NNNNNNNN) of the checkpoints to try, newest first, as rank 0 sees them; every rank gets rank 0's
    answer and finds each under its own checkpoint.dir (the same directory on shared storage; a rank's local copy
    of the uploaded checkpoint where the ranks share none)."""
    root = Path(cfg.checkpoint.dir)
    answer: list = [None]
    if dist.get_rank() == 0:
        if cfg.resume == "never" and checkpoint.committed(root):
            answer = [f"checkpoint.dir '{root}' holds checkpoints of an earlier run and resume=never: point "
                      "checkpoint.dir at an empty directory (or delete those checkpoints) to start afresh"]
        elif cfg.resume != "never":
            try:
                answer = [[p.name for p in checkpoint.choose(root, world, tracker.warn)]]
            except checkpoint.CheckpointError as e:
                answer = [str(e)]
            if cfg.resume == "must" and not answer[0]:
                answer = [f"resume=must but checkpoint.dir '{root}' has no complete checkpoint"]
        else:
            answer = [[]]
    dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], str):  # every rank raises, so none waits in a collective for the others
        raise checkpoint.CheckpointError(answer[0])
    return answer[0]


RESUMED = "resumed.step-"  # MLflow params of a resumed run: resumed.step-NNNNNNNN.KEY, each setting that changed


def _shown_precision(cfg: PretrainConfig, precision: str) -> str:
    """The precision as it runs: DeepSpeed's own bf16 mode, when deepspeed.config turns it on, overrides ours."""
    if dotted(cfg.deepspeed.config, "bf16.enabled") or dotted(cfg.deepspeed.config, "bfloat16.enabled"):
        return "bf16 (DeepSpeed's bf16 mode: bf16 weights, fp32 master copies; from deepspeed.config)"
    return precision


def resume_problem(client: dict, model_cfg: dict, dataset_id: str, path: str | Path) -> str | None:
    """Why the checkpoint at `path` (its client record) cannot be resumed by a run of this model on this dataset
    (None: it can, as far as they go); also asked by a cluster job's driver before its workers start."""
    if client["dataset_id"] != dataset_id:  # (first: another dataset's tokenizer also changes the model's vocab_size)
        return (f"checkpoint {path} was trained on dataset {client['dataset_id']}, data.dataset is {dataset_id}; "
                "resume on the same dataset, or use a new checkpoint.dir")
    if client["model"] != model_cfg:
        changed = sorted(k for k in model_cfg if client["model"].get(k) != model_cfg[k])
        return (f"checkpoint {path} holds a different model ({', '.join(changed)} changed); resume with the model "
                "config it was trained with, or use a new checkpoint.dir")
    return None


def _check_compatible(client: dict, model_cfg: dict, dataset_id: str, layout: dict, cfg: PretrainConfig,
                      path: Path, tracker: Tracker) -> None:
    problem = resume_problem(client, model_cfg, dataset_id, path)
    if problem:
        raise checkpoint.CheckpointError(problem)
    old_layout = {k: client["cursor"][k] for k in layout}  # (not the deal: the restored checkpoint's own is kept)
    if old_layout != layout:
        changed = sorted(k for k in layout if old_layout[k] != layout[k])
        raise checkpoint.CheckpointError(
            f"checkpoint {path} was written with a different data order ({', '.join(changed)} changed: "
            f"{', '.join(f'{k} {old_layout[k]} -> {layout[k]}' for k in changed)}); keep them to resume exactly")
    changed = config_changes(redact_secrets(client["config"]), redact_secrets(cfg))
    if changed:
        tracker.print("resuming with changed settings: " + "; ".join(changed))


def _rate_change(before: dict, cfg: PretrainConfig, step: int, at: int | None = None) -> str | None:
    """The learning rate's jump at a resume whose schedule settings changed (a raised train.max_steps stretches the
    decay to the new end, so the rate goes back up), with the rates either side; None when the next step's rate is
    within 1% of what the checkpoint's schedule gave it. `at` is the schedule's own position (`step` less the
    skipped steps, which hold it), where given."""
    from pretrain.engine import Schedule

    t, at = cfg.train, step if at is None else at
    try:
        old = Schedule.of(before)
        last, planned = before["lr"] * old(max(0, at - 1)), before["lr"] * old(at)
    except (KeyError, TypeError):
        return None
    new = t.lr * Schedule.of(t.model_dump())(at)
    if abs(new - planned) <= 0.01 * abs(planned):
        return None
    return (f"the learning rate goes from {last:.3g} (step {step}) to {new:.3g} (step {step + 1}): the schedule "
            f"is now the changed train settings' (warmup {t.warmup_steps}, {t.schedule} decay to step {t.max_steps})")


def _all_reduce(t: torch.Tensor, device: torch.device, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small CPU tensor through `device` (NCCL reduces CUDA tensors only); returns it on CPU."""
    on = t.to(device)
    dist.all_reduce(on, op=op)
    return on.cpu()


def _gathered(what: tuple[str, str] | None, world: int) -> dict[str, list[str]]:
    """Every rank's `what` ((kind, text), or None: nothing to say) by kind, each text as "rank R: ..." where there
    are several ranks. A collective: whatever one rank found, every rank acts on."""
    said: list = [None] * world
    dist.all_gather_object(said, what)
    out: dict[str, list[str]] = {}
    for r, w in enumerate(said):
        if w:
            out.setdefault(w[0], []).append(f"rank {r}: {w[1]}" if world > 1 else w[1])
    return out


def _checked(path: Path) -> tuple[dict | None, tuple[str, str] | None]:
    """(client record, problem) of the committed checkpoint at `path` as this rank sees it; the problem is
    ("damaged", why): shown to differ from what was written, or ("unreadable", why): anything else."""
    rank = dist.get_rank()
    try:
        client = checkpoint.read_client(path)
    except ValueError as e:  # of the size its commit names, yet not what was written
        return None, ("damaged", f"{checkpoint.CLIENT} cannot be read ({type(e).__name__}: {e})")
    except FileNotFoundError as e:  # rank 0 listed it whole: gone since there, not seen at all elsewhere
        return None, ("damaged" if rank == 0 else "unreadable", f"{checkpoint.CLIENT} cannot be read ({e})")
    except OSError as e:
        return None, ("unreadable", f"{checkpoint.CLIENT} cannot be read ({e})")
    if rank == 0:  # bytes changed in place (a disk, a copy) keep their sizes: their digests tell
        try:
            altered = checkpoint.altered(path)
        except Exception as e:  # noqa: BLE001 (whatever it is, the other ranks must hear of it)
            return None, ("unreadable", f"its files cannot be checked against {checkpoint.COMMIT} "
                                        f"({type(e).__name__}: {e})")
        if altered:
            return None, ("damaged", "; ".join(altered[:3]))
    return client, None


def _restore(engine, candidates: list[str], model_cfg: dict, dataset_id: str, layout: dict, cfg: PretrainConfig,
             tracker: Tracker, checkpoint_url: str | None = None) -> dict | None:
    """Load the newest loadable checkpoint and return its client state; None for a fresh start.

    A checkpoint shown to be damaged (its client record unreadable or gone, or bytes that differ from their
    digests) is skipped for the one before it, which the run then continues from. One that cannot be read or
    loaded for any other reason (a file system's error, a rank that cannot see it, out of memory, another
    DeepSpeed) stops the run and is kept: falling back would delete its steps at the next save."""
    world = dist.get_world_size()
    for name in candidates:
        path = Path(cfg.checkpoint.dir) / name
        # where it is kept: the upload, where the ranks' directories are only copies of it
        kept = (f"its upload {storage.join(checkpoint_url, name)} is kept: delete {checkpoint.COMPLETE} there"
                if checkpoint_url else "it is kept: move it out of checkpoint.dir")
        client, problem = _checked(path)
        # Every rank hears of any problem before any loads: a load runs collectives, so all ranks load, or none.
        problems = _gathered(problem, world)
        if "unreadable" in problems:
            raise checkpoint.CheckpointError(
                f"checkpoint {path}: {'; '.join(problems['unreadable'][:3])}. Rerun once every rank can read it "
                f"({kept} to resume from the one before it)")
        if "damaged" in problems:
            tracker.warn(f"checkpoint {path} is damaged ({'; '.join(problems['damaged'][:3])}); trying an older one")
            continue
        _check_compatible(client, model_cfg, dataset_id, layout, cfg, path, tracker)
        failure = None
        try:
            checkpoint.load(engine, path)
        except Exception as e:  # noqa: BLE001 (whatever it is, every rank must hear of it)
            failure = ("failed", f"{type(e).__name__}: {e}")
        failed = _gathered(failure, world).get("failed")
        if failed:
            raise checkpoint.CheckpointError(
                f"checkpoint {path} could not be loaded ({'; '.join(failed[:3])}). Its files are as they were "
                f"written, so {kept} to resume from the one before it, or rerun once the cause is fixed")
        tracker.print(f"resuming from {path} (step {client['step']}, {client['samples']:,} samples seen)")
        apply_hyperparameters(engine, cfg)
        jump = _rate_change(client["config"].get("train", {}), cfg, client["step"],
                            getattr(engine.lr_scheduler, "last_epoch", None))
        if jump:
            tracker.print(jump)
        return client
    if candidates:
        raise checkpoint.CheckpointError(
            f"none of the {len(candidates)} complete checkpoints in '{cfg.checkpoint.dir}' could be loaded (see the "
            "warnings above); move them away to start afresh there")
    tracker.print("no checkpoint to resume from: starting at step 0" if cfg.resume != "never"
                  else "resume=never: starting at step 0")
    tracker.fresh_start()
    return None


def train(cfg: PretrainConfig, on_checkpoint: Callable[[Path, int], None] | None = None,
          checkpoint_url: str | None = None, stop: StopRequest | None = None) -> dict:
    """Train as `cfg` says, resuming from its checkpoint directory; returns the run's summary (every rank).

    `on_checkpoint(path, step)` runs on every rank after each committed checkpoint (e.g. to copy it to
    storage the ranks do not share); `path` is the committed directory as rank 0 names it. Where it uploads
    them to `checkpoint_url/<tag>`, that URL is what the run records as its checkpoint.dir, names in its output
    and registers from (checkpoint.dir is then only the local copy). `stop`: a StopRequest that another thread
    raises (by default, one that SIGTERM and SIGINT raise, where this is the main thread).
    """
    if "://" in cfg.checkpoint.dir and not cfg.checkpoint.dir.startswith("file://"):
        raise SetupError(f"checkpoint.dir {cfg.checkpoint.dir}: checkpoints in an object store are kept by cluster "
                         "jobs (python -m cluster submit, storage: s3://...); here, give a directory")
    if Path(cfg.checkpoint.dir).exists() and not Path(cfg.checkpoint.dir).is_dir():
        raise SetupError(f"checkpoint.dir {cfg.checkpoint.dir} is a file; give a directory (new, or of this run)")
    if (Path(cfg.checkpoint.dir) / checkpoint.COMMIT).is_file():
        raise SetupError(f"checkpoint.dir {cfg.checkpoint.dir} is one checkpoint of a run; give the run's directory "
                         f"({Path(cfg.checkpoint.dir).parent}) to resume it, or a new one")
    unwritable = _unwritable(Path(cfg.checkpoint.dir))
    if unwritable:
        raise SetupError(f"checkpoint.dir {cfg.checkpoint.dir} cannot be written: {unwritable}; give a directory this "
                         "user can write")
    _check_tracking(cfg.mlflow)
    topo = init_distributed()
    tracker = Tracker(topo.is_main, cfg.mlflow, cfg.checkpoint.dir)
    try:
        with contextlib.ExitStack() as cleanup:
            _sole_run(cfg, cleanup)
            return _train(cfg, topo, tracker, cleanup, on_checkpoint, checkpoint_url, stop)
    except BaseException:
        tracker.close("FAILED", timeout_s=10)
        raise


def _unwritable(path: Path) -> str | None:
    """Why a directory could not be made or written at `path` (None: it can), found before anything loads and
    without making it (a run that fails to set up leaves nothing behind)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"this user may not write in {p}"
    return None


def model_problem(cfg: PretrainConfig, manifest: dict) -> str | None:
    """Why the configured model cannot train on the dataset of `manifest` (None: it can)."""
    model_cfg = cfg.model.build(manifest["tokenizer"]["vocab_size"])
    if model_cfg.max_position < manifest["examples"]["max_seq_length"]:
        return (f"model.max_position ({model_cfg.max_position}) is shorter than the dataset's sequences "
                f"({manifest['examples']['max_seq_length']}); raise model.max_position")
    return None


def _check_tracking(mlflow_cfg) -> None:
    """A store MLflow would refuse stops the run before it starts (every rank sees the same answer)."""
    if mlflow_cfg.enabled:
        try:
            check_store(tracking_uri(mlflow_cfg))
        except RegistryError as e:
            raise SetupError(f"{e} (or set mlflow.enabled=false)") from None


def _sole_run(cfg: PretrainConfig, cleanup: contextlib.ExitStack) -> None:
    """Rank 0 holds this machine's lock on checkpoint.dir for the run; every rank stops when another run holds it
    (two runs in one directory would write the same checkpoints and metrics)."""
    busy: list = [None]
    if dist.get_rank() == 0:
        try:
            cleanup.enter_context(storage.exclusive(str(Path(cfg.checkpoint.dir).resolve()), "checkpoints"))
        except storage.Busy as e:
            busy = [str(e)]
    dist.broadcast_object_list(busy, src=0)
    if busy[0]:
        raise SetupError(f"another run ({busy[0]}) is training in checkpoint.dir {cfg.checkpoint.dir} on this "
                         "machine: wait for it to finish (rerunning then resumes from its checkpoints), or give "
                         "another checkpoint.dir")


def _initial_weights(cfg: PretrainConfig, model: BertForPretraining, manifest: dict, topo, tracker: Tracker) -> dict:
    """Load `init_from`'s weights into `model` on every rank: rank 0 resolves and checks the source (the same
    architecture, the same tokenizer as the dataset's) and sends each tensor to the others. Returns what the
    source is ({uri, name, version, run_id, step})."""
    import tempfile

    from pretrain.export import ExportError, load_model, resolve_model

    answer: list = [None]
    weights: dict[str, torch.Tensor] = {}
    if topo.rank == 0:
        try:
            with tempfile.TemporaryDirectory(prefix="init-from-") as scratch:
                src_dir, info = resolve_model(cfg.init_from, Path(scratch) / "model", tracker.uri)
                source, src_config = load_model(src_dir)
                dataset = json.loads((src_dir / "dataset.json").read_text())
                training = json.loads((src_dir / "training.json").read_text())
            answer = [_init_problem(src_config, dataset, model, manifest) or
                      {**{k: v for k, v in info.items() if k != "pinned"}, "step": training.get("step")}]
            weights = source.state_dict()
        except Exception as e:  # noqa: BLE001 (whatever it is, the other ranks wait to hear of it)
            answer = [f"{type(e).__name__}: {e}" if not isinstance(e, ExportError) else str(e)]
    dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], str):
        raise SetupError(f"init_from={cfg.init_from}: {answer[0]}")
    with torch.no_grad():
        for name, tensor in model.state_dict().items():  # (through the device: NCCL moves CUDA tensors only)
            t = weights[name].to(topo.device) if topo.rank == 0 else torch.empty_like(tensor, device=topo.device)
            dist.broadcast(t, src=0)
            tensor.copy_(t.cpu())
    tracker.print(f"initial weights from {cfg.init_from} (step {answer[0]['step']} of its run)")
    return answer[0]


def _init_problem(src_config: dict, dataset: dict, model: BertForPretraining, manifest: dict) -> str | None:
    """Why the source's weights cannot start this run (None: they can)."""
    from pretrain.export import pretraining_problem

    problem = pretraining_problem(src_config, dataset, manifest)
    if problem:
        return problem
    mine, theirs = model.config.__dict__, src_config["model"]
    changed = [f"{k} {theirs.get(k)} -> {v}" for k, v in mine.items()
               if k not in ("dropout", "attention_dropout") and theirs.get(k) != v]
    if changed:
        return (f"its model differs ({', '.join(changed)}): give this run the model config it was trained with "
                "(model.preset and overrides)")
    return None


MIN_STREAMS = 8  # by default: consecutive micro batches come from this many shards at least, not one


def _kept_streams(cfg: PretrainConfig, candidates: list[str], readers: int) -> int | None:
    """The stream count the newest checkpoint was trained with, where data.streams is left to its default: a
    resumed run keeps its data order (rank 0 reads it; every rank gets the same answer)."""
    kept: list = [None]
    if dist.get_rank() == 0 and candidates:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            kept = [int(checkpoint.read_client(Path(cfg.checkpoint.dir) / candidates[0])["cursor"]["streams"])]
    dist.broadcast_object_list(kept, src=0)
    if kept[0] and kept[0] % readers:
        world = dist.get_world_size()
        fits = [w for w in range(1, 17) if kept[0] % (world * w) == 0]
        raise SetupError(f"the newest checkpoint read its data in {kept[0]} streams, which ranks x data.num_workers "
                         f"({world} x {readers // world}) does not divide: to resume in the same data order, set "
                         f"data.num_workers to {' or '.join(map(str, fits[:4]))}")
    return kept[0]


def _shown(path: Path, checkpoint_url: str | None) -> str:
    """A committed checkpoint as the run names it: its uploaded copy's URL where there is one."""
    return storage.join(checkpoint_url, path.name) if checkpoint_url else str(path)


def _stop_workers(loader) -> None:
    """Stop the loader's worker processes now. They ignore SIGTERM (`_ignore_signals`), so the interpreter's exit,
    which terminates and then joins them, would wait forever for a loader an error left running."""
    shutdown = getattr(loader, "_shutdown_workers", None)  # torch's multi-process loader
    if shutdown:
        shutdown()
    for w in getattr(loader, "_workers", []):
        if w.is_alive():
            w.kill()


def _train(cfg: PretrainConfig, topo: Topology, tracker: Tracker, cleanup: contextlib.ExitStack,
           on_checkpoint: Callable[[Path, int], None] | None = None, checkpoint_url: str | None = None,
           stop: StopRequest | None = None) -> dict:
    ckdir = Path(cfg.checkpoint.dir)
    b = batching(cfg, topo.world)
    precision = resolve_precision(cfg, topo.device)
    dataset = open_dataset(cfg.data.dataset)
    damage = dataset.damage()
    if damage:
        raise SetupError(damage)
    manifest = dataset.manifest
    model_cfg = cfg.model.build(manifest["tokenizer"]["vocab_size"])
    problem = model_problem(cfg, manifest)
    if problem:
        raise SetupError(problem)
    workers = cfg.data.num_workers
    readers = topo.world * max(1, workers)
    candidates = _resume_point(cfg, topo.world, tracker)
    streams = cfg.data.streams or _kept_streams(cfg, candidates, readers) or readers * math.ceil(MIN_STREAMS / readers)
    if streams % readers:
        raise SetupError(f"data.streams ({streams}) must be a multiple of ranks x data.num_workers "
                         f"({topo.world} x {max(1, workers)})")
    layout = {"streams": streams, "micro_batch_size": b.micro, "seed": cfg.seed,
              "shuffle_buffer": cfg.data.shuffle_buffer, "masking": cfg.train.masking}

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = BertForPretraining(model_cfg, unpad=cfg.train.unpad, varlen=cfg.train.varlen_attention)
    initialised = _initial_weights(cfg, model, manifest, topo, tracker) if cfg.init_from and not candidates else None
    if cfg.init_from and candidates:
        tracker.print(f"init_from={cfg.init_from} is not used: this run resumes from its own checkpoints")
    compiled = cfg.train.compile is True or (cfg.train.compile == "auto" and topo.device.type == "cuda"
                                              and cfg.deepspeed.zero_stage < 3)
    if compiled:
        compile_layers(model)
    n_params = sum(p.numel() for p in model.parameters())
    engine = build_engine(model, cfg, b, precision, topo.device, warn=tracker.warn)
    torch.manual_seed(stable_seed(cfg.seed, "dropout", topo.rank) % 2**63)

    client = _restore(engine, candidates, model_cfg.__dict__, dataset.id, layout, cfg, tracker, checkpoint_url) or {}
    # a resumed run keeps its checkpoint's deal (one that names none was dealt round-robin); a fresh one: by size
    layout["deal"] = client["cursor"].get("deal", "round-robin") if client else "balanced"
    step, skipped, run_id = client.get("step", 0), client.get("skipped_steps", 0), client.get("mlflow_run_id")
    best_eval = math.inf if client.get("best_eval_loss") is None else client["best_eval_loss"]
    # The data cursor and samples seen advance by what each step consumed, so a resume with another
    # accumulation (a changed global batch) continues the same example order without gaps or repeats.
    micro_batches = client.get("cursor", {}).get("micro_batches", 0)
    samples = client.get("samples", 0)

    tok_file = dataset.tokenizer_file(ckdir)
    try:
        word_start = cached(str(tok_file), "data.dataset")[1]
    except ConfigError as e:  # the dataset's own tokenizer, damaged
        raise DatasetError(f"{e}; check the dataset with `python -m data_prep verify`") from None
    collator = Collator(manifest, cfg.train.masking, cfg.seed, word_start=word_start)
    plan = StreamPlan(dataset.shards("train"), streams, cfg.seed, cfg.data.shuffle_buffer, layout["deal"],
                      dataset.digests("train"))
    loader = iter(train_loader(plan, collator, b.micro, topo.rank, topo.world, micro_batches, workers,
                               pin_memory=topo.device.type == "cuda", worker_init_fn=_ignore_signals))
    cleanup.callback(_stop_workers, loader)
    evals = None
    do_eval = bool(cfg.data.eval_examples and manifest["splits"]["val"]["examples"])
    if cfg.data.eval_examples and not do_eval:
        if cfg.registry.name and cfg.registry.when == "best":
            raise SetupError("registry.when=best needs evaluation, and the dataset's val split is empty")
        tracker.warn("the dataset's val split is empty: no evaluation (raise val_fraction in data prep: each document "
                     "is drawn on its own, and with few documents a small fraction draws none)")
    trace = None
    if cfg.debug.trace_examples:
        (ckdir / "trace").mkdir(parents=True, exist_ok=True)
        trace = cleanup.enter_context(open(ckdir / "trace" / f"rank-{topo.rank:05d}.jsonl", "a", buffering=1))

    shown_precision = _shown_precision(cfg, precision)
    params = {**flatten(redact_secrets(cfg)), "derived.world_size": topo.world, "derived.accumulation": b.accumulation,
              "derived.precision": shown_precision, "derived.parameters": n_params,
              "derived.data_streams": streams}
    if checkpoint_url:
        params["checkpoint.dir"] = checkpoint_url
    changed = None
    if run_id is not None:  # resumed: what changed since the checkpoint, under names of its own (params are fixed)
        old = {**flatten(redact_secrets(client["config"])), **({"checkpoint.dir": client["checkpoint_dir"]}
                                                if client.get("checkpoint_dir") else {})}
        changed = {f"{RESUMED}{step:08d}.{k}": v for k, v in params.items()
                   if not k.startswith("derived.") and str(old.get(k)) != str(v)}
    tags = {"dataset_id": dataset.id, "device": topo.device.type, "world_size": str(topo.world)}
    if initialised:  # where its initial weights came from (the first phase's run, checkpoint or version)
        tags.update({f"init_from_{k}": str(v) for k, v in initialised.items() if v is not None})
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    artifacts = tracker.save_inputs(redact_secrets(cfg), manifest, tok_file)
    tracker.start(run_id, params, tags, artifacts, changed)
    peak = next((f for name, f in PEAK_FLOPS.items() if topo.device.type == "cuda"
                 and name in torch.cuda.get_device_name(topo.device) and precision != "fp32"), None)
    tracker.print(f"training BERT-{cfg.model.preset} ({n_params / 1e6:.1f}M parameters) on {topo.world} "
                  f"{topo.device.type} rank(s), {shown_precision}, ZeRO-{cfg.deepspeed.zero_stage}"
                  f"{', compiled layers' if compiled else ''}"
                  f"{', varlen attention' if cfg.train.varlen_attention else ''}: global batch "
                  f"{b.global_batch} = {b.micro} x {b.accumulation} accumulation x {topo.world} ranks; "
                  f"{max(cfg.train.max_steps - step, 0)} steps to go"
                  + (f" (the checkpoint is at step {step}, past train.max_steps={cfg.train.max_steps}: raise it to "
                     "train on)" if step > cfg.train.max_steps else ""))
    if step < cfg.train.max_steps:
        tracker.print(f"a line every {cfg.train.log_every} steps (train.log_every): loss and accuracies are means "
                      "over those steps; metrics.jsonl has every step")

    stop = stop or StopRequest()
    cleanup.callback(stop.restore)  # (however the run ends: a caller's own Ctrl-C works again afterwards)
    consecutive = 0
    last = {}
    window = Window(topo.world)
    started, first_step = time.perf_counter(), step
    last_eval_step = -1  # "best" registration compares checkpoints' eval losses with best_eval
    while step < cfg.train.max_steps:
        sums = torch.zeros(SUMS, dtype=torch.float64)
        on_device = torch.zeros(7, dtype=torch.float64, device=topo.device)  # read once per step: one sync
        lr = engine.get_lr()[0]  # the rate this step's update uses
        t_step = time.perf_counter()
        batches: list[Batch] = []
        for _ in range(b.accumulation):
            t0 = time.perf_counter()
            batches.append(next(loader))
            sums[WAIT] += time.perf_counter() - t0
        masked_total = None
        if cfg.train.mlm_loss == "global_mean":  # (stays on the device: no wait for the GPU here)
            masked_total = torch.tensor(float(sum(x.mlm_labels.numel() for x in batches)), device=topo.device)
            if topo.world > 1:
                dist.all_reduce(masked_total)
        for batch in batches:
            if trace:
                trace.write(json.dumps({"step": step + 1, "keys": batch.keys}) + "\n")
            sums[MICRO] += 1
            sums[TOKENS] += batch.real_tokens
            sums[SEQS] += batch.input_ids.shape[0]
            sums[FLOPS] += training_flops(model_cfg, batch.attention_mask.sum(1), batch.mlm_labels.numel())
            batch = batch.to(topo.device)
            mlm_logits, nsp_logits = engine(batch.input_ids, batch.token_type_ids, batch.attention_mask,
                                            batch.masked_positions)
            loss, mlm, nsp = pretraining_loss(mlm_logits, batch.mlm_labels, nsp_logits, batch.nsp_labels,
                                              masked_total, b.accumulation * topo.world)
            if cfg.debug.nan_at_step == step + 1:
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()
            with torch.no_grad():
                on_device[LOSS] += loss.detach()
                on_device[MLM] += mlm.detach()
                on_device[NSP] += nsp.detach()
                on_device[MLM_OK] += (mlm_logits.argmax(-1) == batch.mlm_labels).sum()
                on_device[MLM_N] += batch.mlm_labels.numel()
                if batch.nsp_labels is not None:
                    on_device[NSP_OK] += (nsp_logits.argmax(-1) == batch.nsp_labels).sum()
                    on_device[NSP_N] += batch.nsp_labels.numel()
        sums[:7] = on_device.cpu()
        step += 1
        micro_batches += b.accumulation
        samples += b.global_batch
        sums[STOP] = 1.0 if stop.signal is not None else 0.0
        sums = _all_reduce(sums, topo.device)
        applied = engine.was_step_applied()
        if applied:
            consecutive = 0
        else:
            skipped += 1
            consecutive += 1
            tracker.warn(f"step {step}: non-finite loss or gradient; the update was skipped "
                         f"({skipped} skipped so far)")
            if consecutive >= cfg.train.max_skipped_steps:
                raise NumericsError(
                    f"{consecutive} consecutive steps had a non-finite loss or gradient (last at step {step}). "
                    "Lower train.lr, raise train.warmup_steps, keep train.grad_clip on (e.g. 1.0), or use "
                    "precision=bf16 instead of fp16; then resume from the last checkpoint")
        last = _step_metrics(sums, time.perf_counter() - t_step, lr, skipped, engine, precision, peak, topo.world)
        last["epoch"] = samples / max(1, manifest["splits"]["train"]["examples"])  # (passes over the train split)
        window.add(sums)
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            line, last["data_wait"] = window.report(step, cfg.train.max_steps, lr)
            tracker.print(line)
        tracker.log(step, last)

        end = step == cfg.train.max_steps
        if do_eval and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or end):
            if evals is None:
                evals = eval_batches(dataset, collator, b.micro, topo.rank, topo.world, cfg.data.eval_examples)
            metrics = evaluate(engine, evals, topo.device)
            tracker.log(step, metrics)
            nsp = f" | nsp acc {metrics['eval/nsp_acc']:.3f}" if "eval/nsp_acc" in metrics else ""
            tracker.print(f"eval at step {step}: loss {metrics['eval/loss']:.4f} | "
                          f"mlm acc {metrics['eval/mlm_acc']:.3f}{nsp}")
            last.update(metrics)
            last_eval_step = step
        preempted = bool(sums[STOP])
        if end or preempted or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0):
            evaluated = last.get("eval/loss") if step == last_eval_step else None
            is_best = evaluated is not None and evaluated < best_eval
            best_eval = evaluated if is_best else best_eval
            client = {
                "step": step, "samples": samples, "skipped_steps": skipped, "precision": precision,
                "best_eval_loss": None if math.isinf(best_eval) else best_eval,
                "cursor": {"micro_batches": micro_batches, **layout},
                "model": model_cfg.__dict__, "dataset_id": dataset.id, "config_hash": cfg.hash(),
                "config": cfg.model_dump(mode="json"), "mlflow_run_id": tracker.run_id, "world_size": topo.world,
                "checkpoint_dir": checkpoint_url or cfg.checkpoint.dir,  # (as the run records it)
            }
            path = checkpoint.save(engine, ckdir, step, client, cfg.checkpoint.keep)
            if on_checkpoint:
                on_checkpoint(path, step)
            path = _shown(path, checkpoint_url)
            tracker.print(f"checkpoint {path}")
            reg = cfg.registry
            if reg.name and not preempted and ((reg.when == "end" and end) or reg.when == "every_checkpoint"
                                               or (reg.when == "best" and is_best)):
                tracker.register(path, reg.name, reg.alias, reg.pooling)
        if preempted:
            tracker.print(f"stopped by signal at step {step}; {stop.resume} to resume from {path}")
            tracker.close("KILLED")
            return {"step": step, "preempted": True, "checkpoint": str(path), **last}

    if cfg.debug.dump_weights:
        tracker.save_weights(engine_weights(engine), "engine-weights.safetensors")
    took = time.perf_counter() - started
    if step == first_step and (ckdir / METRICS_FILE).is_file():  # nothing to train: the figures it ended with
        last = {k: v for k, v in final_figures((ckdir / METRICS_FILE).read_text()).items() if k != "step"}
    summary = {"step": step, "preempted": False, "seconds": took, "mlflow_run_id": tracker.run_id,
               "checkpoint": _shown(checkpoint.committed(ckdir)[0], checkpoint_url) if checkpoint.committed(ckdir)
               else None, **last}
    tracker.print(_summary(summary, (step - first_step) * b.global_batch, tracker, cfg.registry))
    tracker.close("FINISHED")
    return summary


class Window:
    """Sums since the last console line: its averages, rate, ETA and the fraction of time spent waiting for data
    (the ranks' mean: a rank whose loader falls behind holds every rank's step)."""

    def __init__(self, world: int = 1):
        self.sums = torch.zeros(SUMS, dtype=torch.float64)
        self.start, self.steps, self.world = time.perf_counter(), 0, world

    def add(self, sums: torch.Tensor) -> None:
        self.sums += sums
        self.steps += 1

    def report(self, step: int, max_steps: int, lr: float) -> tuple[str, float]:
        s, span = self.sums, time.perf_counter() - self.start
        nsp = f" | nsp acc {s[NSP_OK] / s[NSP_N]:.3f}" if s[NSP_N] else ""  # (none: a dataset without NSP)
        line = (f"step {step}/{max_steps} | loss {s[LOSS] / s[MICRO]:.4f} | mlm acc {s[MLM_OK] / max(1, s[MLM_N]):.3f}"
                f"{nsp} | lr {lr:.2e} | {s[SEQS] / span:,.0f} seq/s"
                f" | eta {_duration((max_steps - step) * span / self.steps)}")
        wait = float(s[WAIT]) / self.world / span
        self.__init__(self.world)
        return line, wait


def _step_metrics(sums: torch.Tensor, elapsed: float, lr: float, skipped: int, engine, precision: str,
                  peak: float | None, world: int) -> dict[str, float]:
    """One step's metrics from its all-reduced sums (means over micro batches and ranks)."""
    out = {
        "loss": sums[LOSS] / sums[MICRO], "mlm_loss": sums[MLM] / sums[MICRO], "nsp_loss": sums[NSP] / sums[MICRO],
        "mlm_acc": sums[MLM_OK] / max(1, sums[MLM_N]), "nsp_acc": sums[NSP_OK] / max(1, sums[NSP_N]),
        "lr": lr, "grad_norm": engine.get_global_grad_norm(), "skipped_steps": skipped,
        "seq_per_s": sums[SEQS] / elapsed, "tokens_per_s": sums[TOKENS] / elapsed,
    }
    if not sums[NSP_N]:  # a dataset without NSP: no NSP figures (not zeros)
        del out["nsp_loss"], out["nsp_acc"]
    if precision == "fp16":
        out["loss_scale"] = engine.optimizer.loss_scale
    if peak:
        out["mfu"] = sums[FLOPS] / elapsed / (peak * world)
    return {k: float(v) for k, v in out.items() if v is not None}


@torch.no_grad()
def evaluate(engine, batches: list[tuple[Batch, float]], device: torch.device) -> dict[str, float]:
    """Loss and accuracies on the validation batches, summed over every rank."""
    engine.eval()
    s = torch.zeros(6, dtype=torch.float64)
    for batch, weight in batches:
        batch = batch.to(device)
        mlm_logits, nsp_logits = engine(batch.input_ids, batch.token_type_ids, batch.attention_mask,
                                        batch.masked_positions)
        mlm_ce = torch.nn.functional.cross_entropy(mlm_logits.float(), batch.mlm_labels, reduction="sum")
        s[0] += weight * mlm_ce.item()
        s[1] += weight * (mlm_logits.argmax(-1) == batch.mlm_labels).sum().item()
        s[2] += weight * batch.mlm_labels.numel()
        if batch.nsp_labels is not None:
            nsp_ce = torch.nn.functional.cross_entropy(nsp_logits.float(), batch.nsp_labels, reduction="sum")
            s[3] += weight * nsp_ce.item()
            s[4] += weight * (nsp_logits.argmax(-1) == batch.nsp_labels).sum().item()
            s[5] += weight * batch.nsp_labels.numel()
    if dist.is_initialized():
        s = _all_reduce(s, device)
    engine.train()
    mlm, nsp = s[0] / max(1, s[2]), s[3] / max(1, s[5])
    out = {"eval/loss": float(mlm + nsp), "eval/mlm_loss": float(mlm), "eval/nsp_loss": float(nsp),
           "eval/mlm_acc": float(s[1] / max(1, s[2])), "eval/nsp_acc": float(s[4] / max(1, s[5])),
           "eval/perplexity": float(math.exp(min(mlm, 50.0)))}
    if not s[5]:  # a dataset without NSP
        del out["eval/nsp_loss"], out["eval/nsp_acc"]
    return out


def _summary(s: dict, sequences: int, tracker: Tracker, registry=None) -> str:
    done = (f"none this run: the checkpoint is at train.max_steps (raise it to train on); the run's last figures"
            if not sequences else f"{sequences:,} sequences this run in {_duration(s['seconds'])}, "
                                  f"{sequences / max(s['seconds'], 1e-9):,.0f} seq/s")
    lines = ["", "== pretraining summary ==", f"steps        {s['step']} ({done})"]
    if "loss" in s:
        nsp = (f", nsp {s['nsp_loss']:.4f}", f", nsp acc {s['nsp_acc']:.3f}") if "nsp_acc" in s else ("", "")
        lines.append(f"train        last step: loss {s['loss']:.4f} (mlm {s['mlm_loss']:.4f}{nsp[0]}), "
                     f"mlm acc {s['mlm_acc']:.3f}{nsp[1]}, {s['skipped_steps']:.0f} skipped steps")
    if "eval/loss" in s:
        nsp_acc = f", nsp acc {s['eval/nsp_acc']:.3f}" if "eval/nsp_acc" in s else ""
        lines.append(f"eval         loss {s['eval/loss']:.4f}, mlm acc {s['eval/mlm_acc']:.3f}"
                     f"{nsp_acc}, perplexity {s['eval/perplexity']:.1f}")
    lines.append(f"checkpoint   {s['checkpoint']}")
    if s["mlflow_run_id"]:
        lines.append(f"mlflow       run {s['mlflow_run_id']} at {shown(tracker.uri)} "
                     f"(see it: {how_to_see(tracker.uri)})")
    if s["checkpoint"] and registry is not None and registry.name:  # (registered as it trained)
        ref = f"models:/{registry.name}@{registry.alias}" if registry.alias else f"models:/{registry.name}/latest"
        lines.append(f"next         python -m pretrain finetune configs/finetune/classify.yaml model={ref}  (or "
                     "export it, evaluate it: python -m pretrain --help)")
    elif s["checkpoint"]:
        lines.append(f"next         python -m pretrain register --checkpoint {s['checkpoint']} --name NAME --alias "
                     "champion  (or export it, evaluate it: python -m pretrain --help)")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
