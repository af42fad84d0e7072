"""Command line of cluster jobs: `python -m cluster validate JOB [KEY=VALUE ...]`."""

from __future__ import annotations

import argparse
import sys

from data_prep.configfile import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cluster",
                                description="Cluster jobs: data prep, pretraining, fine-tuning and the whole pipeline "
                                            "as one job spec (configs/jobs/).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    v = sub.add_parser("validate", help="check a job spec and every config it names; print what it would run",
                       description="Validate a job file in full (its keys, resources, and each stage's config with "
                                   "its overrides) without starting anything.")
    v.add_argument("job", help="a job spec, e.g. configs/jobs/quickstart.yaml")
    v.add_argument("overrides", nargs=argparse.REMAINDER, help="KEY=VALUE overrides of the job spec's own keys")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from cluster.jobs import load_job

    try:
        spec, configs = load_job(args.job, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    r = spec.resources
    print(f"{args.job}: a valid {spec.kind} job" + (f" '{spec.name}'" if spec.name else ""))
    for kind, stage in spec.stage_list():
        over = f" with {' '.join(stage.overrides)}" if stage.overrides else ""
        print(f"  {kind:<10} {stage.config}{over}")
    if spec.kind == "pipeline" and spec.stages.registry:
        reg = spec.stages.registry
        print(f"  {'register':<10} {reg.name}" + (f"@{reg.alias}" if reg.alias else ""))
    gpus = f", {r.gpus:g} GPU" if r.use_gpu else ""
    print(f"  resources  {r.num_workers} worker(s) x ({r.cpus_per_worker:g} CPU{gpus}) on {r.nodes} node(s); "
          f"max_failures {spec.max_failures}; storage {spec.storage}")
    return EXIT_OK
