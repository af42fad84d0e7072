"""Model directories: a committed checkpoint (or a fine-tuned classifier) that loads without DeepSpeed or its run.

    MODEL_DIR/model.safetensors   the full fp32 weights (consolidated from any ZeRO stage)
              config.json         the model config, special token ids, sequence length (a classifier: its labels)
              tokenizer/spm.model the sentencepiece model the dataset was built with
              dataset.json        the dataset's identity: id, recipe and config hashes, tokenizer sha256
              training.json       provenance: MLflow run id, step, metrics, the training config (and source model)
              checksums.json      sha256 of every other file (checked by `pull` and `load_model`)

Nothing in it is a pickle: loading it runs no code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from data_prep import storage
from data_prep.configfile import dotted, redact_secrets
from data_prep.dataset import DatasetError, parse_manifest
from data_prep.tokenizer import sha256_file
from data_prep.worker import write_json_atomic
from pretrain import checkpoint
from pretrain.presets import ModelConfig
from pretrain.tracking import METRICS_FILE

if TYPE_CHECKING:  # torch loads where weights are read or written: checking, publishing and pulling need none
    import torch

FORMAT = {"name": "bertforge-model", "version": 1}                 # a pretrained encoder with MLM/NSP heads
CLASSIFIER_FORMAT = {"name": "bertforge-classifier", "version": 1}  # a fine-tuned sequence classifier
URI_SCHEMES = ("models:/", "runs:/")  # model sources resolved through MLflow
MODEL_FILE, CONFIG_FILE, CHECKSUMS = "model.safetensors", "config.json", "checksums.json"
CLIENT_KEYS = ("model", "config.deepspeed.zero_stage", "mlflow_run_id", "step", "samples")  # what export reads


class ExportError(Exception):
    """A checkpoint or model directory that cannot be used; the message says what to do."""


def pretraining_problem(config: dict, dataset: dict, manifest: dict) -> str | None:
    """Why a model (its config.json and dataset.json) cannot read a dataset's examples as pretraining does (None:
    it can), worded to follow the model's name: not a pretrained encoder, or another tokenizer's token ids."""
    if config.get("format", {}).get("name") != FORMAT["name"]:
        return ("is not a pretrained encoder with its MLM head (a fine-tuned classifier?); give a pretraining "
                "checkpoint, its export or its registered version")
    if dataset.get("tokenizer_sha256") != manifest["tokenizer"]["sha256"]:
        return ("was trained with another tokenizer than the dataset was built with, so the dataset's token ids "
                "mean other pieces to it; build the dataset with the model's tokenizer: data prep's "
                "tokenizer.path=<the model's dataset>/tokenizer/spm.model, or DIR/tokenizer/spm.model after "
                "python -m pretrain export SOURCE --out DIR")
    return None


def check_out(out: str | Path, what: str = "--out") -> None:
    """Refuse an output directory (`what` names it in the error) that holds anything but an earlier model directory
    (ours, transformers' or a pulled MLflow model): writing the new one replaces it whole, which would delete
    those files."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{what} {out} is a file; give a directory to write")
    ours = ((CONFIG_FILE, CHECKSUMS), (CONFIG_FILE, "bertforge_training.json"), ("MLmodel",))  # export, hf, pull
    if any(all((out / name).is_file() for name in names) for names in ours):
        return
    held = sorted(p.name for p in out.iterdir())
    if held:
        raise ExportError(f"{what} {out} holds {', '.join(held[:5])}{', ...' if len(held) > 5 else ''}, not a model "
                          "directory; it would be replaced whole, so choose a new or empty directory")


def find_checkpoint(path: str | Path) -> Path:
    """`path` itself when it is a committed checkpoint, else the newest complete one inside it."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"'{path}' does not exist: give a committed checkpoint (a step-NNNNNNNN directory) or the "
                          "checkpoint.dir that holds them")
    if (p / checkpoint.COMMIT).is_file():
        return p
    for candidate in checkpoint.committed(p):
        if not checkpoint.problems(candidate):
            return candidate
    raise ExportError(f"'{path}' is neither a committed checkpoint nor a checkpoint.dir holding a complete one")


def _uploaded_step(source: str | Path) -> str:
    """The URL of an uploaded checkpoint: `source` itself, or the newest complete one under it."""
    url = str(source).rstrip("/")
    if storage.exists(storage.join(url, checkpoint.COMPLETE)):
        return url
    tags = checkpoint.uploaded(url)
    if not tags:
        raise ExportError(f"'{source}' holds no complete uploaded checkpoint (a step-NNNNNNNN/ directory with "
                          f"{checkpoint.COMPLETE}, as cluster jobs upload them)")
    return storage.join(url, tags[0])


def checkpoint_record(source: str | Path) -> tuple[str, dict]:
    """(where, client record: step, config, MLflow run id...) of the checkpoint `checkpoint_at(source)` would
    give, read without downloading it."""
    if not storage.is_remote(source):
        step_dir = find_checkpoint(source)
        why = checkpoint.problems(step_dir)
        if why:
            raise ExportError(f"checkpoint {step_dir} is incomplete or damaged: {'; '.join(why[:3])}")
        where = str(step_dir)
    else:
        where = _uploaded_step(source)
    try:
        return where, checkpoint.read_client(where)
    except (OSError, ValueError) as e:
        raise ExportError(f"checkpoint {where}: {checkpoint.CLIENT} cannot be read ({type(e).__name__}: {e})") \
            from None


@contextlib.contextmanager
def checkpoint_at(source: str | Path) -> Iterator[tuple[Path, str]]:
    """(local checkpoint directory, where it is) for a committed checkpoint or a checkpoint.dir (its newest):
    a local path as it is, or one uploaded by a cluster job (an object-store URL of `step-NNNNNNNN/` or of the
    directory holding them) downloaded for the duration of the block."""
    if not storage.is_remote(source):
        step_dir = find_checkpoint(source)
        yield step_dir, str(step_dir)
        return
    url = _uploaded_step(source)
    local = storage.staging_dir(url, f"checkpoint-{os.getpid()}")  # (another process may export it too)
    try:
        yield checkpoint.fetch(url, local), url
    finally:
        storage.clear_local(local)


def _metrics_at(root: Path, step: int) -> dict[str, float]:
    """The metrics recorded for `step` and the latest evaluation up to it (from metrics.jsonl)."""
    out: dict[str, float] = {}
    f = root / METRICS_FILE
    for line in f.read_text().splitlines() if f.is_file() else []:
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a crash
            continue
        if rec["step"] == step or (rec["step"] <= step and "eval/loss" in rec):
            out.update({k: v for k, v in rec.items() if k != "step"})
    return out


def export(source: str | Path, out: str | Path) -> Path:
    """Write the model directory of the checkpoint at `source` (a path or an uploaded checkpoint's URL, see
    `checkpoint_at`) to `out` (atomically: `out` appears whole)."""
    with checkpoint_at(source) as (step_dir, where):
        return export_step(step_dir, where, Path(out))


def export_step(step_dir: Path, where: str, out: Path) -> Path:
    """`export` of the local checkpoint directory `step_dir`, recorded as the checkpoint at `where`; its files'
    bytes are checked against the sha256s its commit recorded (a file changed in place is not published)."""
    why = checkpoint.problems(step_dir) or checkpoint.altered(step_dir)
    if why:
        raise ExportError(f"checkpoint {step_dir} is incomplete or damaged: {'; '.join(why[:3])}")
    root, client = step_dir.parent, checkpoint.read_client(step_dir)
    absent = object()  # (a key present as None, mlflow_run_id without tracking, is there)
    lacks = [key for key in CLIENT_KEYS if dotted(client, key, absent) is absent]
    if lacks:
        raise ExportError(f"checkpoint {step_dir}: {checkpoint.CLIENT} lacks {', '.join(lacks)}; it was not written "
                          "by `pretrain train` (export an older checkpoint of the run, or retrain)")
    manifest_file, tokenizer = root / "manifest.json", root / "tokenizer" / "spm.model"
    for needed in (manifest_file, tokenizer):
        if not needed.is_file():
            raise ExportError(f"{needed} is missing: the checkpoint directory was not written by `pretrain train`")
    try:
        manifest = parse_manifest(manifest_file.read_text(), str(manifest_file))
    except DatasetError as e:
        raise ExportError(f"{e}; copy the dataset's manifest.json there") from None
    model_cfg = ModelConfig(**client["model"])
    stage = client["config"]["deepspeed"]["zero_stage"]
    out, r = Path(out).resolve(), root.resolve()
    steps = [c.resolve() for c in checkpoint.committed(root)]
    if out == r or out in r.parents or any(out == c or c in out.parents for c in steps):
        raise ExportError(f"--out {out} would overwrite the checkpoints in {root}; choose a directory outside it")
    import torch  # (after the checks above, which need none of it)

    from pretrain.engine import checkpoint_weights  # DeepSpeed's consolidation, imported only here
    from pretrain.model import BertForPretraining

    try:
        weights = checkpoint_weights(step_dir, stage)
    except checkpoint.CheckpointError as e:  # (one that would run code as it loads: what export's callers catch)
        raise ExportError(str(e)) from None
    low = sorted({str(w.dtype).removeprefix("torch.") for w in weights.values() if w.dtype != torch.float32})
    if low:  # DeepSpeed's fp16 mode without ZeRO: the module holds fp16 copies of the weights
        raise ExportError(f"checkpoint {step_dir} (precision {client.get('precision')}, ZeRO-{stage}) holds "
                          f"{'/'.join(low)} module weights: its fp32 master weights are inside the optimizer wrapper, "
                          "which export does not read; train with deepspeed.zero_stage >= 1 (or precision bf16 or "
                          "fp32) to export full-precision weights")
    weights = {k: w.float() for k, w in weights.items()}
    with torch.device("meta"):
        expected = BertForPretraining(model_cfg).state_dict()
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in expected):
        raise ExportError(f"checkpoint {step_dir} does not hold the weights its model config describes")

    write_model_dir(out, weights, tokenizer, config={
        "format": FORMAT, "model": client["model"], "special_ids": manifest["tokenizer"]["special_ids"],
        "tokenizer_vocab_size": manifest["tokenizer"]["vocab_size"],
        "max_seq_length": manifest["examples"]["max_seq_length"],
    }, dataset={
        "dataset_id": manifest["dataset_id"], "recipe_hash": manifest["recipe_hash"],
        "config_hash": manifest["config_hash"], "tokenizer_sha256": manifest["tokenizer"]["sha256"],
        "examples": manifest["examples"], "train_examples": manifest["splits"]["train"]["examples"],
    }, training={
        "mlflow_run_id": client["mlflow_run_id"], "step": client["step"], "samples": client["samples"],
        "checkpoint": where, "metrics": _metrics_at(root, client["step"]), "config": redact_secrets(client["config"]),
    })
    return out


def write_model_dir(out: Path, weights: dict[str, torch.Tensor], tokenizer: Path, config: dict, dataset: dict,
                    training: dict) -> Path:
    """Write a model directory to `out` atomically (`out.partial`, then a rename): `out` appears whole or not at all."""
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tokenizer").mkdir(parents=True)
    save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    shutil.copyfile(tokenizer, tmp / "tokenizer" / "spm.model")
    write_json_atomic(tmp / CONFIG_FILE, config)
    write_json_atomic(tmp / "dataset.json", dataset)
    write_json_atomic(tmp / "training.json", training)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    write_json_atomic(tmp / CHECKSUMS, {str(p.relative_to(tmp)): sha256_file(p) for p in files})
    return publish(tmp, out)


def publish(tmp: Path, out: Path) -> Path:
    """Put the finished directory `tmp` in place of `out`, its files readable as the umask allows (safetensors
    writes its files for the owner alone, which on shared storage hides the weights from everyone else)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in tmp.rglob("*"):
        if p.is_file():
            p.chmod(0o666 & ~umask)
    # The earlier directory is set aside, not deleted, until the new one is in place: a crash in between leaves it
    # whole beside (in .OUT.replaced-XXXX/), never half deleted under its own name; the next publish puts a copy
    # that was set aside back where it was missing, or clears it once OUT is there.
    for aside in sorted(out.parent.glob(f".{out.name}.replaced-*")):
        if not out.exists() and (aside / out.name).is_dir():
            (aside / out.name).rename(out)
        shutil.rmtree(aside, ignore_errors=True)
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
    if out.exists():
        out.rename(aside / out.name)
    tmp.rename(out)
    shutil.rmtree(aside, ignore_errors=True)
    return out


def verify(model_dir: str | Path) -> list[str]:
    """Files of a model directory that are missing or differ from its checksums (empty: all good)."""
    d = Path(model_dir)
    if not (d / CHECKSUMS).is_file():
        return [f"{CHECKSUMS} is missing"]
    problems = []
    for name, sha in json.loads((d / CHECKSUMS).read_text()).items():
        if not (d / name).is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(d / name) != sha:
            problems.append(f"{name} differs from its checksum")
    return problems


def untrained_positions(config: dict, length: int) -> tuple[int, str] | None:
    """What a model directory's `config` (config.json) leaves untrained for sequences of `length` tokens: the
    length it was pretrained on and the positions past it, said as a warning; None when it was pretrained on all."""
    trained = config.get("max_seq_length")
    if not trained or length <= trained:
        return None
    return trained, f"positions {trained}-{length - 1} keep their untrained initial embeddings"


def check_model_dir(d: Path) -> None:
    """Raise ExportError unless `d` is a complete model directory of this project (its checksums hold), saying
    what it is instead where that is known (a transformers export)."""
    problems = verify(d)
    if problems:
        _refuse_transformers_dir(d)
        raise ExportError(f"model directory {d} is damaged: {'; '.join(problems[:3])}")


def _refuse_transformers_dir(d: Path) -> None:
    if not (d / CHECKSUMS).is_file() and (d / "config.json").is_file() and \
            "model_type" in json.loads((d / "config.json").read_text()):
        raise ExportError(f"{d} is a Hugging Face (transformers) model, not this project's model directory: give "
                          "the pretraining checkpoint, its export (python -m pretrain export) or its registered "
                          "version it was made from")


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, config.json) from a verified model directory: a `BertForPretraining` (pretrained)
    or a `BertForSequenceClassification` (fine-tuned)."""
    from safetensors.torch import load_file

    from pretrain.model import BertForPretraining, BertForSequenceClassification

    import torch
    from safetensors import safe_open

    d = Path(model_dir)
    check_model_dir(d)
    config = json.loads((d / CONFIG_FILE).read_text())
    kind = config.get("format", {}).get("name")
    if kind == FORMAT["name"]:
        def build():
            return BertForPretraining(ModelConfig(**config["model"]))
    elif kind == CLASSIFIER_FORMAT["name"]:
        def build():
            return BertForSequenceClassification(ModelConfig(**config["model"]), len(config["labels"]),
                                                 config.get("classifier_dropout"))
    else:
        raise ExportError(f"{d / CONFIG_FILE} describes a {kind!r} model; this version reads "
                          f"{FORMAT['name']} and {CLASSIFIER_FORMAT['name']}")
    # The sizes config.json gives, against the weights' own (read from the file's header) before any memory is
    # taken: a config of other sizes (a directory mixed up, or made to exhaust memory) is refused, not allocated.
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    with safe_open(str(d / MODEL_FILE), "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if shapes != stored:
        name = next((k for k in sorted(shapes.keys() | stored.keys()) if shapes.get(k) != stored.get(k)), "")
        raise ExportError(f"{d / CONFIG_FILE} describes other weights than {d / MODEL_FILE} holds ({name}: "
                          f"{shapes.get(name)} against {stored.get(name)}): the directory's files do not belong "
                          "together; pull or export the model again")
    model = build()
    model.load_state_dict(load_file(str(d / MODEL_FILE), device="cpu"))
    return model.to(device).eval(), config


def resolve_model(source: str, scratch: Path, uri: str) -> tuple[Path, dict]:
    """(model directory, what it is) for a `models:/` or `runs:/` URI (pulled into `scratch`), a pulled MLflow
    model, an exported model directory, or a pretraining checkpoint, local or uploaded (exported into `scratch`).

    The dict holds `uri` plus, where known, the registered `name` and `version` and the `run_id` that made it.
    """
    from pretrain.tracking import PULLED, RegistryError, model_files, pull, resolve_model_uri

    if not source.startswith(URI_SCHEMES):
        if storage.is_remote(source):  # a checkpoint a cluster job uploaded
            try:
                d, where = export(source, scratch), source
            except (OSError, ValueError, KeyError) as e:
                raise ExportError(f"cannot read the checkpoint at {source}: {type(e).__name__}: {e}") from None
        else:
            path = Path(source.removeprefix("file://"))
            if not path.exists():
                raise ExportError(f"model '{source}' is neither a models:/ or runs:/ URI nor an existing directory")
            d, where = model_files(path), str(path.resolve())
            _refuse_transformers_dir(d)  # (before a fine-tune replaces anything for a source it cannot load)
            if not (d / CONFIG_FILE).is_file():  # a checkpoint (or checkpoint.dir) from `pretrain train`
                d = export(path, scratch)
        training = json.loads((d / "training.json").read_text()) if (d / "training.json").is_file() else {}
        info = {"uri": where, "run_id": training.get("mlflow_run_id")}
        pulled = Path(source.removeprefix("file://")) / PULLED  # a pulled model: what it was pulled as
        if pulled.is_file():
            with contextlib.suppress(ValueError, OSError):
                record = json.loads(pulled.read_text())
                info.update({k: record[k] for k in ("name", "version", "run_id") if record.get(k)})
                info["pulled_from"] = record.get("uri")
        return d, info
    try:
        info = resolve_model_uri(source, uri)
        return model_files(pull(info["pinned"], scratch, uri)), info
    except RegistryError as e:
        raise ExportError(str(e)) from None
