"""Command line of pretraining: `python -m pretrain train CONFIG [KEY=VALUE ...]`."""

from __future__ import annotations

import argparse
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
