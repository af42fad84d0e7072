"""`python -m pretrain evaluate`: a pretrained encoder's masked-LM (and NSP) figures on a dataset's split.

The same measure as pretraining's periodic evaluation (`pretrain.train.evaluate`, over the same evenly spread
examples, with the masks the dataset stores: a run with train.masking=dynamic drew its own), for any model
pretraining can start from or export: a checkpoint, a model directory, a registered
version. Its use: compare models on one held-out set (two pretraining runs, a phase 2 against its phase 1, a
model before and after domain-adaptive pretraining), or score a model on another dataset built with its
tokenizer (the same token ids are required: a model reads ids, not text).
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from data_prep.dataset import DatasetError
from pretrain.data import eval_batches, open_dataset
from pretrain.engine import native_bf16
from pretrain.export import ExportError, load_model, pretraining_problem, resolve_model, untrained_positions


class EvaluationError(Exception):
    """The model cannot be evaluated on that dataset; the message says why and what to give instead."""


def evaluate_model(source: str, dataset_location: str, uri: str, split: str = "val", examples: int | None = None,
                   batch_size: int = 32, device: str = "auto", precision: str = "auto", progress=print,
                   warn=lambda m: print(f"warning: {m}", file=sys.stderr, flush=True)) -> dict:
    """Evaluate `source` (anything `resolve_model` takes) on up to `examples` examples of the dataset's `split`
    (None: as many as its pretraining run evaluated on, where this is that run's dataset's val split, else 2000),
    with their stored masks, in `precision` (auto: bf16 autocast on a GPU that has it, else fp32):
    {"model": ..., "dataset": ..., "split", "examples", "seconds", "eval/loss", "eval/mlm_acc", ..., "warnings"}
    (what `warn` was told: figures to read with care)."""
    from pretrain.batch import Collator
    from pretrain.train import evaluate

    try:
        dataset = open_dataset(dataset_location)
    except DatasetError as e:  # (in pretraining's words: its key)
        raise DatasetError(str(e).replace("data.dataset", "--dataset", 1)) from None
    damage = dataset.damage("--dataset")
    if damage:
        raise DatasetError(damage)
    manifest = dataset.manifest
    available = manifest["splits"][split]["examples"]
    if not available:
        other = "train" if split == "val" else "val"
        raise EvaluationError(f"the {split} split of '{dataset.root}' is empty; evaluate on --split {other}, or "
                              "build the dataset with a larger val_fraction")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}); "
                              "leave --device at auto, or give cpu")
    bf16 = precision == "bf16" or (precision == "auto" and native_bf16(dev))
    with tempfile.TemporaryDirectory(prefix="evaluate-") as scratch:
        model_dir, info = resolve_model(source, Path(scratch) / "model", uri)
        if not (model_dir / "dataset.json").is_file():
            raise EvaluationError(f"'{source}' is not a model directory of this project (no dataset.json; a "
                                  "Hugging Face export?): give a pretraining checkpoint, its export "
                                  "(python -m pretrain export) or its registered version")
        trained_on = json.loads((model_dir / "dataset.json").read_text())
        problem = pretraining_problem(json.loads((model_dir / "config.json").read_text()), trained_on, manifest)
        if problem:
            raise EvaluationError(f"'{source}' {problem}")
        model, config = load_model(model_dir, dev)
        training = json.loads((model_dir / "training.json").read_text()) if (model_dir / "training.json").is_file() \
            else {}
    as_run = None  # the run's own number of evaluation examples, where this is its evaluation
    if examples is None:
        run_examples = ((training.get("config") or {}).get("data") or {}).get("eval_examples")
        same_data = trained_on.get("dataset_id") == dataset.id
        as_run = run_examples if run_examples and split == "val" and same_data else None
        examples = as_run or DEFAULT_EXAMPLES
    seq = manifest["examples"]["max_seq_length"]
    if model.config.max_position < seq:
        raise EvaluationError(f"'{source}' has {model.config.max_position} positions; the dataset's sequences are "
                              f"{seq} tokens long: evaluate on a dataset of sequences that fit")
    warnings = []
    untrained = untrained_positions(config, seq)
    if untrained:
        trained_len, untrained = untrained
        warnings.append(f"the dataset's sequences are up to {seq} tokens long; '{source}' was pretrained on "
                        f"{trained_len}: {untrained}, so the figures understate the model (evaluate on a dataset "
                        f"built at {trained_len}, or pretrain a last phase at {seq})")
    for w in warnings:
        warn(w)
    t0 = time.monotonic()
    n = min(examples, available)
    progress(f"evaluating {info.get('uri', source)} on {n:,} of the {available:,} {split} examples of "
             f"{dataset.root} ({dev.type})" + (" (as its pretraining run did: data.eval_examples; --examples to "
                                               "change)" if as_run else ""))
    batches = eval_batches(dataset, Collator(manifest), batch_size, 0, 1, n, split=split)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        metrics = evaluate(model, batches, dev)
    out = {"model": {k: v for k, v in info.items() if k != "pinned" and v is not None}, "dataset": dataset.root,
           "dataset_id": dataset.id, "split": split, "examples": n, "device": dev.type,
           "precision": "bf16" if bf16 else "fp32",
           "seconds": round(time.monotonic() - t0, 1), **metrics, "warnings": warnings}
    return out


DEFAULT_EXAMPLES = 2000


def summary_lines(result: dict) -> list[str]:
    """The figures of `evaluate_model`'s result, as printed."""
    nsp = f", nsp loss {result['eval/nsp_loss']:.4f}, nsp acc {result['eval/nsp_acc']:.3f}" \
        if "eval/nsp_acc" in result else ""
    return [f"mlm loss {result['eval/mlm_loss']:.4f} (perplexity {result['eval/perplexity']:.2f}), "
            f"mlm acc {result['eval/mlm_acc']:.3f}{nsp}",
            f"on {result['examples']:,} {result['split']} examples of {result['dataset']} in {result['seconds']:.1f}s"]


__all__ = ["EvaluationError", "ExportError", "evaluate_model", "summary_lines"]
