"""Fine-tune a pretrained encoder for sequence classification: `python -m pretrain finetune CONFIG model=URI`.

One linear function, like pretraining: resolve the source model, read the task, train `train.epochs`
epochs, validate, keep the best weights, score the test split with them, write the model directory and
record everything in MLflow (the run is tagged with the source model's name, version and run). One
process trains with torch's AdamW on the CPU or one GPU; `deepspeed.enabled=true` trains under a
DeepSpeed ZeRO engine instead, across the processes torchrun or the deepspeed launcher starts.

    OUTPUT/model/        the best model (a model directory: pretrain/export.py), labels in its config.json
           source/       the pulled or exported source model (when it was not a local model directory)
           metrics.jsonl every logged record; config.yaml the effective config
           summary.json  the final figures and the config that made them: written last, by a finished run only
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from data_prep.configfile import flatten, redact_secrets
from data_prep.tokenizer import sha256_file
from data_prep.worker import write_json_atomic
from pretrain.config import FinetuneConfig
from pretrain.export import (
    CLASSIFIER_FORMAT,
    ExportError,
    check_out,
    load_model,
    resolve_model,
    untrained_positions,
    write_model_dir,
)
from pretrain.model import BertForSequenceClassification
from pretrain.presets import ModelConfig
from pretrain.tasks import Rows, read_splits, scores, stratified_split
from pretrain.text import encode
from pretrain.tracking import RegistryError, Tracker, check_store, register, shown, tracking_uri


class FinetuneError(Exception):
    """A fine-tuning run that cannot go on; the message says what to change."""


@dataclass
class Split:
    name: str
    rows: Rows
    y: torch.Tensor  # (N,) class ids


@dataclass(frozen=True)
class Topo:
    rank: int
    world: int
    device: torch.device


class _PlainStepper:
    """The DeepSpeed engine's calls (`backward`, `step`, `get_lr`) for a single process with torch's AdamW."""

    def __init__(self, model: torch.nn.Module, cfg: FinetuneConfig, schedule, device: torch.device):
        from pretrain.engine import param_groups

        t = cfg.train
        self.module, self.clip = model, t.grad_clip
        self.opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas, eps=t.eps,
                                     fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)

    def __call__(self, *inputs):
        return self.module(*inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return self.sched.get_last_lr()


def _setup(cfg: FinetuneConfig) -> Topo:
    if cfg.mlflow.enabled:  # a store MLflow would refuse: before anything starts
        try:
            check_store(tracking_uri(cfg.mlflow))
        except RegistryError as e:
            raise FinetuneError(f"{e} (or set mlflow.enabled=false)") from None
    if cfg.deepspeed.enabled:
        from pretrain.engine import init_distributed

        t = init_distributed()
        return Topo(t.rank, t.world, t.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FinetuneError("several processes were started, but a plain fine-tune runs in one: set "
                            "deepspeed.enabled=true to fine-tune across processes")
    return Topo(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _all_reduce(t: torch.Tensor, topo: Topo) -> torch.Tensor:
    if topo.world == 1:
        return t
    out = t.to(topo.device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(out)
    return out.cpu()


def _broadcast(obj, topo: Topo):
    if topo.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _inputs(sp, split: Split, idx: list[int], max_len: int, device: torch.device):
    pairs = [split.rows.pairs[i] for i in idx] if split.rows.pairs is not None else None
    ids, types, mask = encode(sp, [split.rows.texts[i] for i in idx], max_len, pairs)
    return ids.to(device), types.to(device), mask.to(device), split.y[idx].to(device)


@torch.no_grad()
def evaluate(forward, sp, split: Split, max_len: int, micro: int, num_labels: int, topo: Topo,
             autocast=contextlib.nullcontext) -> dict[str, float]:
    """Loss, accuracy and macro-F1 over `split`, its rows divided among the ranks (summed with one all-reduce).

    Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively); a rank short
    of rows repeats row 0 and does not count it.
    """
    k = num_labels
    mine = list(range(topo.rank, len(split.rows), topo.world))
    sums = torch.zeros(k * k + 1, dtype=torch.float64)  # the confusion matrix, then the summed loss
    for b in range(math.ceil(math.ceil(len(split.rows) / topo.world) / micro)):
        idx = mine[b * micro:(b + 1) * micro]
        real = len(idx)
        ids, types, mask, y = _inputs(sp, split, idx or [0], max_len, topo.device)
        with autocast():
            logits = forward(ids, types, mask).float()
        if real:
            sums[-1] += float(F.cross_entropy(logits, y, reduction="sum"))
            sums[:-1] += torch.bincount((y * k + logits.argmax(-1)).cpu(), minlength=k * k).double()
    sums = _all_reduce(sums, topo)
    confusion = sums[:-1].view(k, k)
    return {"loss": float(sums[-1]) / max(1.0, float(confusion.sum())), **scores(confusion)}


def read_task(cfg: FinetuneConfig) -> tuple[list, Split, Split | None, Split | None]:
    """(class names, train, validation, test) from the task files, checked (TaskError names the file and line)."""
    task = cfg.task
    names, train_rows, val_rows, test_rows = read_splits(task)
    if val_rows is None:
        keep, held = stratified_split(train_rows.ids, task.validation_fraction, cfg.seed)
        train_rows, val_rows = (train_rows.subset(keep, task.train),
                                train_rows.subset(held, f"{task.train} (held out)") if held else None)
    train, val, test = (Split(name, rows, torch.tensor(rows.ids, dtype=torch.int64)) if rows is not None else None
                        for name, rows in (("train", train_rows), ("validation", val_rows), ("test", test_rows)))
    return names, train, val, test


def _rare_labels(splits: list[Rows], names: list) -> list[tuple[object, str]]:
    """(label, FILE:LINE) of each class with a single row in all of `splits`."""
    first: dict[str, str] = {}
    count: dict[str, int] = {}
    for rows in splits:
        for label, where in zip(rows.labels, rows.where, strict=True):
            first.setdefault(str(label), where)
            count[str(label)] = count.get(str(label), 0) + 1
    return [(name, first[str(name)]) for name in names if count.get(str(name)) == 1]


# The files a fine-tune writes in its output (and their in-progress or set-aside forms; job-config.json: a cluster
# job's record of the config, from before summary.json carried it)
OWNED = re.compile(r"(model|source|config\.yaml|summary\.json|metrics(\.\d+)?\.jsonl|job-config\.json)(\.partial)?"
                   r"|\.(model|source)\.replaced-\w+")


def _check_output(out: Path) -> None:
    """Refuse an `output` that holds files a fine-tune did not write there (a run replaces its own files)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} is a file; give a directory (new, or an earlier fine-tune's)")
    foreign = sorted(p.name for p in out.iterdir() if not OWNED.fullmatch(p.name)) if out.is_dir() else []
    if foreign:
        raise ExportError(f"output {out} holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}, which "
                          "a fine-tune did not write: a run replaces what is there, so choose a new directory (or "
                          "an earlier fine-tune's)")


def task_files(cfg: FinetuneConfig) -> dict[str, dict]:
    """{split: {"path", "sha256"}} of the task's files (sha256 None where the file cannot be read from here)."""
    out = {}
    for split in ("train", "validation", "test"):
        path = getattr(cfg.task, split)
        if path:
            try:
                digest = sha256_file(path) if "://" in path else _local_digest(Path(path))
            except (OSError, ImportError, ValueError):  # (a bucket this machine has no credentials or driver for)
                digest = None
            out[split] = {"path": path, "sha256": digest}
    return out


def _local_digest(path: Path) -> str | None:
    """A local file's sha256 (None: not a regular file, e.g. a FIFO, which hashing would drain)."""
    return sha256_file(path) if stat.S_ISREG(path.stat().st_mode) else None


SUMMARY = "summary.json"  # written last, and only by a run that finished: what made it is in its "config"


def finetune(cfg: FinetuneConfig, show_summary: bool = True) -> dict:
    """Run the fine-tune `cfg` describes; returns the summary (also written to OUTPUT/summary.json), printed at the
    end unless `show_summary` is false (a cluster job's driver prints it: a Ray task's last lines can be lost)."""
    topo = _setup(cfg)
    out = Path(cfg.output)
    with _sole_writer(out, topo):
        tracker = Tracker(topo.rank == 0, cfg.mlflow, out)
        try:
            return _finetune(cfg, topo, tracker, show_summary)
        except BaseException as e:
            tracker.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", timeout_s=10)
            raise


@contextlib.contextmanager
def _sole_writer(out: Path, topo: Topo):
    """Rank 0 holds this machine's lock on `output` for the run; every rank stops when another fine-tune holds it
    (two runs in one output would interleave their metrics and replace each other's model)."""
    from data_prep import storage

    with contextlib.ExitStack() as held:
        busy = None
        if topo.rank == 0:
            try:
                held.enter_context(storage.exclusive(str(out.resolve()), "finetune"))
            except storage.Busy as e:
                busy = str(e)
        busy = _broadcast(busy, topo)
        if busy:
            raise FinetuneError(f"another fine-tune ({busy}) is writing output {out} on this machine: wait for it "
                                "to finish, or choose another output")
        yield


def _finetune(cfg: FinetuneConfig, topo: Topo, tracker: Tracker, show_summary: bool) -> dict:
    started = time.time()
    out = Path(cfg.output)
    t = cfg.train
    # The task first: a mistake in its files is found before a model is downloaded or anything is written. Their
    # bytes are hashed once, before they are read (the model and summary record them: a rerun compares).
    files = task_files(cfg) if topo.rank == 0 else {}
    names, train, val, test = read_task(cfg)
    k = len(names)
    source = None
    if topo.rank == 0:  # one process pulls or exports the source model; the others read its files
        try:
            _check_output(out)
            for sub in ("source", "model"):  # (each is replaced whole: only an earlier run's model may be there)
                check_out(out / sub, what="output")
        except ExportError as e:
            source = ("error", str(e))  # (the message names output)
        else:
            existed = out.exists()
            try:
                source = resolve_model(cfg.model, out / "source", tracker.uri)
                # An earlier run's summary would vouch for what this run is about to replace: it goes first (once
                # the source is found: a typo in model= leaves an earlier run whole).
                if (out / SUMMARY).is_file() or (out / "model").is_dir():
                    tracker.print(f"note: {out} holds an earlier fine-tune; this run replaces it (its summary now, "
                                  "its model when this run saves one)")
                (out / SUMMARY).unlink(missing_ok=True)
            except ExportError as e:
                source = ("error", f"model={cfg.model}: {e}")
                if not existed:
                    with contextlib.suppress(OSError):
                        out.rmdir()  # (only an empty one: this run made it)
    source = _broadcast(source, topo)
    if source[0] == "error":
        raise FinetuneError(source[1])
    src_dir, src_info = Path(source[0]), source[1]
    pretrained, src_config = load_model(src_dir)
    model_cfg = ModelConfig(**src_config["model"])
    sp = spm.SentencePieceProcessor(model_file=str(src_dir / "tokenizer" / "spm.model"))
    max_len = min(t.max_seq_length, model_cfg.max_position)
    if max_len < t.max_seq_length:
        tracker.warn(f"train.max_seq_length {t.max_seq_length} is more than the model's {model_cfg.max_position} "
                     f"positions: texts are cut at {max_len} tokens")
    untrained = untrained_positions(src_config, max_len)
    if cfg.init == "pretrained" and untrained:
        trained_len, untrained = untrained
        tracker.warn(f"train.max_seq_length {max_len} is more than the {trained_len} tokens the model was pretrained "
                     f"on: {untrained} (pretrain a last phase at {max_len}, or fine-tune at {trained_len})")
    few = [f"{name!r} ({where})" for name, where in _rare_labels([x.rows for x in (train, val) if x], names)]
    if few:
        tracker.warn(f"{len(few)} of the {k} classes have a single training row (a misspelt label?): "
                     f"{', '.join(few[:10])}")

    torch.manual_seed(cfg.seed)
    model = BertForSequenceClassification(model_cfg, k, t.classifier_dropout)
    if cfg.init == "pretrained":
        encoder = {n.removeprefix("bert."): w for n, w in pretrained.state_dict().items() if n.startswith("bert.")}
        model.bert.load_state_dict(encoder)
    del pretrained
    from pretrain.engine import Schedule, resolve_precision

    precision = resolve_precision(cfg, topo.device)
    per_rank = len(train.rows) // topo.world
    if per_rank == 0:
        raise FinetuneError(f"{cfg.task.train} has {len(train.rows)} training rows for {topo.world} processes")
    steps_per_epoch = math.ceil(per_rank / t.micro_batch_size)
    total = t.epochs * steps_per_epoch
    schedule = Schedule(t.schedule, round(t.warmup_ratio * total), total)

    def bf16():
        return torch.autocast(topo.device.type, dtype=torch.bfloat16)

    autocast = contextlib.nullcontext  # around the model's forward; the DeepSpeed engine autocasts its own
    if cfg.deepspeed.enabled:
        from pretrain.engine import Batching, build_engine, engine_weights

        stepper = build_engine(model, cfg, Batching(t.micro_batch_size, 1, topo.world), precision, topo.device,
                               schedule, warn=tracker.warn)

        def weights():
            return engine_weights(stepper)
    else:
        model.to(topo.device)
        stepper = _PlainStepper(model, cfg, schedule, topo.device)
        if precision == "bf16":
            autocast = bf16

        def weights():
            return {n: w.detach().float().cpu().clone() for n, w in model.state_dict().items()}

    if topo.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(redact_secrets(cfg), sort_keys=False))
    tracker.fresh_start()
    dataset = json.loads((src_dir / "dataset.json").read_text())
    tags = {"kind": "finetune", "init": cfg.init, "dataset_id": dataset["dataset_id"],
            **{f"source_model_{k2}": str(v) for k2, v in src_info.items() if v and k2 != "pinned"}}
    params = {**flatten(redact_secrets(cfg)), "derived.num_labels": k, "derived.train_rows": len(train.rows),
              "derived.validation_rows": len(val.rows) if val else 0,
              "derived.test_rows": len(test.rows) if test else 0, "derived.world_size": topo.world}
    tracker.start(None, params, tags, {"config": out / "config.yaml"})
    where = f"{topo.world} processes" if topo.world > 1 else topo.device.type
    tracker.print(f"fine-tuning {src_info['uri']} ({'pretrained' if cfg.init == 'pretrained' else 'random init'}) "
                  f"on {len(train.rows):,} rows, {k} labels ({', '.join(map(str, names[:10]))}), {t.epochs} epochs "
                  f"x {steps_per_epoch} steps, {precision}, {where}")
    if val is None:
        tracker.warn("no validation rows: the final weights are kept (set task.validation or a larger "
                     "task.validation_fraction to choose the best epoch)")

    def save(state: dict, step: int, epoch: float, metrics: dict) -> None:
        if topo.rank != 0:
            return
        write_model_dir(out / "model", state, src_dir / "tokenizer" / "spm.model", config={
            "format": CLASSIFIER_FORMAT, "model": asdict(model_cfg), "special_ids": src_config["special_ids"],
            "tokenizer_vocab_size": src_config["tokenizer_vocab_size"], "max_seq_length": max_len,
            "labels": names, "classifier_dropout": t.classifier_dropout,
            "task": {"text_field": cfg.task.text_field, "text_pair_field": cfg.task.text_pair_field,
                     "label_field": cfg.task.label_field},
        }, dataset=dataset, training={
            "kind": "finetune", "mlflow_run_id": tracker.run_id, "step": step, "epoch": epoch,
            "source_model": {k2: v for k2, v in src_info.items() if k2 != "pinned"}, "init": cfg.init,
            "metrics": metrics, "task_files": files, "config": redact_secrets(cfg),
        })

    best: dict = {"score": None, "state": None, "step": 0, "epoch": 0.0, "metrics": {}}
    sign = -1.0 if t.best_metric == "loss" else 1.0
    stale, step, stop, validated = 0, 0, False, -1
    window_loss, window_n, window_start = 0.0, 0, time.perf_counter()

    def validate(epoch: float) -> None:
        nonlocal stale, stop, validated
        validated = step
        model.eval()  # the engine's module is `model` itself
        m = evaluate(stepper, sp, val, max_len, t.micro_batch_size, k, topo, autocast)
        model.train()
        metrics = {f"val_{n}": v for n, v in m.items()}
        tracker.log(step, metrics)
        improved = best["score"] is None or sign * m[t.best_metric] > sign * best["score"]
        tracker.print(f"validation at step {step} (epoch {epoch:.2f}): loss {m['loss']:.4f} | accuracy "
                      f"{m['accuracy']:.4f} | macro-F1 {m['macro_f1']:.4f}" + (" (best so far)" if improved else ""))
        if improved:
            best.update(score=m[t.best_metric], state=weights(), step=step, epoch=epoch, metrics=metrics)
            save(best["state"], step, epoch, metrics)
            stale = 0
        else:
            stale += 1
            stop = bool(t.patience) and stale >= t.patience

    model.train()
    for epoch in range(t.epochs):
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(train.rows), generator=g)[topo.rank::topo.world][:per_rank].tolist()
        for b in range(steps_per_epoch):
            ids, types, mask, y = _inputs(sp, train, order[b * t.micro_batch_size:(b + 1) * t.micro_batch_size],
                                          max_len, topo.device)
            with autocast():
                logits = stepper(ids, types, mask)
            loss = F.cross_entropy(logits.float(), y)
            stepper.backward(loss)
            lr = stepper.get_lr()[0]  # the rate this step's update uses (the step moves the schedule on)
            stepper.step()
            step += 1
            window_loss += loss.detach()
            window_n += 1
            if step % t.log_every == 0 or step == total:
                mean = float(_all_reduce(torch.tensor([float(window_loss) / window_n]), topo)[0]) / topo.world
                if not math.isfinite(mean):
                    raise FinetuneError(f"the training loss is {mean} at step {step}; lower train.lr (now {t.lr:g})"
                                        + (" or use precision=fp32" if precision != "fp32" else
                                           "; if it is not finite from the first steps on, check the source model's "
                                           "weights (a damaged checkpoint)"))
                rate = window_n * t.micro_batch_size * topo.world / (time.perf_counter() - window_start)
                tracker.log(step, {"train_loss": mean, "lr": lr, "epoch": step / steps_per_epoch})
                tracker.print(f"epoch {epoch + 1}/{t.epochs} step {step}/{total} | loss {mean:.4f} | lr {lr:.2e} | "
                              f"{rate:,.0f} seq/s")
                window_loss, window_n, window_start = 0.0, 0, time.perf_counter()
            end_of_epoch = b == steps_per_epoch - 1
            if val is not None and ((t.eval_every and step % t.eval_every == 0) or (not t.eval_every
                                                                                   and end_of_epoch)):
                validate(step / steps_per_epoch)
                if stop:
                    break
        if stop:
            tracker.print(f"stopping early: no better validation {t.best_metric} in {t.patience} validations")
            break
    if val is not None and validated != step:  # the steps after the last validation count too
        validate(step / steps_per_epoch)
    if best["state"] is None:  # no validation: the final weights
        best.update(state=weights(), step=step, epoch=step / steps_per_epoch)

    final = dict(best["metrics"])
    if test is not None:  # the best weights, in a plain model on every rank (whatever the ZeRO stage)
        scorer = BertForSequenceClassification(model_cfg, k, t.classifier_dropout)
        scorer.load_state_dict(best["state"])
        scorer.to(topo.device).eval()
        # (in validation's precision: a plain module, so bf16 is autocast here whichever path trained it)
        m = evaluate(scorer, sp, test, max_len, t.micro_batch_size, k, topo,
                     bf16 if precision == "bf16" else contextlib.nullcontext)
        final.update({f"test_{n}": v for n, v in m.items()})
        tracker.log(step, {f"test_{n}": v for n, v in m.items()})
    save(best["state"], best["step"], best["epoch"], final)
    summary = {"model": str((out / "model").absolute()),
               "source": {k2: v for k2, v in src_info.items() if k2 != "pinned"},
               "init": cfg.init, "labels": names, "steps": step, "best_step": best["step"],
               "best_epoch": best["epoch"], "seconds": time.time() - started, "mlflow_run_id": tracker.run_id,
               "metrics": final, "registered": None, "config": cfg.model_dump(mode="json"),
               "task_files": files}  # (only rank 0 writes the summary)
    tracker.close("FINISHED")
    if topo.rank == 0 and cfg.registry.name:
        try:
            v = register(out / "model", cfg.registry.name, cfg.registry.alias, tracker.uri)
            summary = registered_summary(summary, v, cfg.registry.alias)
        except RegistryError as e:
            summary["register_error"] = str(e)
            alias = f" --alias {cfg.registry.alias}" if cfg.registry.alias else ""
            tracker.warn(f"{e}\nthe fine-tuned model is complete in {out / 'model'}; register it (no need to "
                         f"fine-tune again) with: python -m pretrain register --model {out / 'model'} --name "
                         f"{cfg.registry.name}{alias}")
    if topo.rank == 0:
        write_json_atomic(out / SUMMARY, summary)
        if show_summary:
            print(summary_text(summary, tracker.uri), flush=True)
    return summary


def registered_summary(summary: dict, v: dict, alias: str | None) -> dict:
    """A fine-tune's `summary` with the version `register` answered (`v`), and no registration error."""
    out = {k: x for k, x in summary.items() if k != "register_error"}
    out["registered"] = {"name": v["name"], "version": v["version"], "alias": alias, "alias_was": v.get("alias_was")}
    return out


def record_registration(model_dir: Path, v: dict, alias: str | None) -> bool:
    """After `pretrain register --model OUTPUT/model`: where OUTPUT/summary.json says that model's registration
    failed, it says this version instead (so a cluster job does not register the model again). Whether it did."""
    path = Path(model_dir).parent / SUMMARY
    try:
        summary = json.loads(path.read_text())
        ours = Path(summary["model"]).resolve() == Path(model_dir).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not (ours and summary.get("register_error")):
        return False
    write_json_atomic(path, registered_summary(summary, v, alias))
    return True


def summary_text(s: dict, uri: str) -> str:
    m = s["metrics"]
    src = s["source"]
    version = f" (version {src['version']} of {src['name']})" if src.get("version") else ""
    lines = [f"fine-tuned {src['uri']}{version}, {s['init']} init: {s['steps']} steps in {s['seconds']:.0f} s"]
    if "val_accuracy" in m:
        lines.append(f"best         step {s['best_step']} (epoch {s['best_epoch']:.2f}): validation accuracy "
                     f"{m['val_accuracy']:.4f}, macro-F1 {m['val_macro_f1']:.4f}")
    if "test_accuracy" in m:
        lines.append(f"test_accuracy {m['test_accuracy']:.4f}")
        lines.append(f"test_macro_f1 {m['test_macro_f1']:.4f}")
    lines.append(f"model        {s['model']} (labels: {', '.join(map(str, s['labels'][:10]))})")
    if s["mlflow_run_id"]:
        lines.append(f"mlflow       run {s['mlflow_run_id']} at {shown(uri)}")
    if s["registered"]:
        r = s["registered"]
        from pretrain.tracking import alias_words

        lines.append(f"registered   {alias_words(r, r['alias'])}")
    elif s.get("register_error"):
        lines.append("registered   no: the registration failed (above); the model is complete")
    return "\n".join(lines)
