"""Command line of pretraining: `python -m pretrain train CONFIG [KEY=VALUE ...]`."""

from __future__ import annotations

import argparse
import json
import sys

from data_prep.configfile import ConfigError, load_config
from data_prep.dataset import DatasetError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

TRAIN_HELP = """\
Pretrain a BERT encoder (MLM + NSP) with DeepSpeed ZeRO on a dataset built by `python -m data_prep`.

Runs the same as one process, under `torchrun --nproc_per_node N -m pretrain train ...` and under the
`deepspeed` launcher: gloo on CPU, NCCL on GPUs. Overrides follow the config file as KEY=VALUE or
--KEY VALUE; values are YAML, e.g.
  model.preset=mini train.max_steps=2000 train.global_batch_size=512 deepspeed.zero_stage=2

It resumes from the newest complete checkpoint in checkpoint.dir (resume=auto|must|never). SIGTERM or
Ctrl-C saves a checkpoint at the end of the current step and exits with status 143.
Every key and its default: see pretrain/config.py.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain",
                                description="Pretrain BERT (MLM + NSP) with DeepSpeed ZeRO from WebDataset shards.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tr = sub.add_parser("train", help="train (or resume) from a config", description=TRAIN_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("config", help="YAML config file (e.g. configs/pretrain/quickstart.yaml)")
    tr.add_argument("overrides", nargs=argparse.REMAINDER, help="KEY=VALUE or --KEY VALUE overrides")
    ex = sub.add_parser("export", help="a checkpoint -> a standalone model directory (safetensors, config, tokenizer)",
                        description="Consolidate a DeepSpeed checkpoint of any ZeRO stage into a model directory: "
                                    "model.safetensors, config.json, tokenizer/, dataset.json, training.json, "
                                    "checksums.json.")
    ex.add_argument("checkpoint", help="a committed checkpoint (step-NNNNNNNN/) or a checkpoint.dir (its newest)")
    ex.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    rg = sub.add_parser("register", help="export a checkpoint and register it in the MLflow Model Registry",
                        description="Export (if needed), upload as an MLflow pyfunc model (texts -> embeddings), "
                                    "verify the upload, register a version, then set the alias. Rerunning after a "
                                    "failure completes the registration.")
    src = rg.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a committed checkpoint or a checkpoint.dir (its newest)")
    src.add_argument("--run", help="an MLflow run id of `pretrain train` (its checkpoint.dir, newest checkpoint)")
    rg.add_argument("--name", required=True, help="registered model name")
    rg.add_argument("--alias", help="alias to point at the new version (e.g. champion)")
    rg.add_argument("--pooling", default="cls", choices=["cls", "mean"], help="sentence embedding pooling")
    rg.add_argument("--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db")
    pl = sub.add_parser("pull", help="download a registered model version and verify its checksums")
    pl.add_argument("model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH")
    pl.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    pl.add_argument("--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db")
    return p


def _drop_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N; the rank comes from the environment instead."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--local_rank", "--local-rank"):
            skip = True
        elif not a.startswith(("--local_rank=", "--local-rank=")):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_drop_launcher_args(sys.argv[1:] if argv is None else argv))
    if args.command == "export":
        return _export(args)
    if args.command in ("register", "pull"):
        return _registry(args)
    try:
        from pretrain.config import PretrainConfig

        cfg = load_config(PretrainConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    from pretrain.checkpoint import CheckpointError
    from pretrain.engine import SetupError
    from pretrain.train import EXIT_PREEMPTED, NumericsError, train

    import torch.distributed as dist

    try:
        summary = train(cfg)
    except (SetupError, CheckpointError, DatasetError, NumericsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return EXIT_PREEMPTED if summary["preempted"] else EXIT_OK


def _export(args) -> int:
    from pretrain.export import ExportError, export

    try:
        out = export(args.checkpoint, args.out)
    except (ExportError, OSError, KeyError, ValueError) as e:  # a damaged or foreign checkpoint, an unwritable --out
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    training = json.loads((out / "training.json").read_text())
    print(f"exported step {training['step']} of {training['checkpoint']} to {out}")
    return EXIT_OK


def _registry(args) -> int:
    from pretrain.config import RESERVED_ALIAS, MlflowConfig
    from pretrain.export import ExportError, find_checkpoint
    from pretrain.tracking import (
        RegistryError,
        model_files,
        pull,
        register_checkpoint,
        run_checkpoint_dir,
        tracking_uri,
    )

    uri = tracking_uri(MlflowConfig(tracking_uri=args.tracking_uri))
    try:
        if args.command == "pull":
            out = pull(args.model_uri, args.out, uri)
            print(f"pulled {args.model_uri} to {out} (verified); model files in {model_files(out)}")
            return EXIT_OK
        if args.alias and args.alias.lower() == "latest":
            raise RegistryError(RESERVED_ALIAS)
        source = args.checkpoint or run_checkpoint_dir(args.run, uri)
        step_dir = find_checkpoint(source)
        v = register_checkpoint(step_dir, args.name, args.alias, uri, args.pooling)
    except (ExportError, RegistryError, OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    alias = f" with alias '{args.alias}'" if args.alias else ""
    print(f"registered {v['name']} version {v['version']}{alias} from {step_dir} (run {v['run_id']})\n"
          f"use it: mlflow.pyfunc.load_model('models:/{v['name']}/{v['version']}'), or "
          f"python -m pretrain pull models:/{v['name']}/{v['version']} --out DIR")
    return EXIT_OK

