"""The job driver: runs a resolved job's stages on the Ray it is connected to, skipping stages already done.

It runs inside the cluster (the entrypoint of a Ray job: `python -m cluster run`) or in the submitting process
on an embedded local Ray. Each stage is skipped when its output already exists with the same config, so a
resubmitted pipeline continues where the last one stopped: data prep by its manifest's recipe, pretraining by
a final committed checkpoint of the same config (an unfinished one resumes from its newest checkpoint),
registration by MLflow's own record of the checkpoint's upload, fine-tuning by its summary and config.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

log = print
# In every Ray worker of a job: Ray Train's print patch would send each line of pretrain's console output twice
# (to its logger and, as our stdout is wrapped, to stdout as well).
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


class StageError(Exception):
    """A stage failed for good; the message names the stage and what to do."""


def connect(local: bool = False, num_cpus: int | None = None) -> bool:
    """Join the Ray this driver belongs to (`RAY_ADDRESS`, set for Ray jobs), or start a local one (always, with
    `local`); True when this call started Ray (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=True)
    if any(os.environ.get(k) != v for k, v in WORKER_ENV.items()):  # a submitted job has them already
        kwargs["runtime_env"] = {"env_vars": dict(WORKER_ENV)}
    if os.environ.get("RAY_ADDRESS") and not local:
        ray.init(**kwargs)
    else:  # embedded: a fresh local Ray for this job, never a cluster that happens to be running. With the
        # dashboard (loopback): Ray Train's placement-group cleaner asks its State API whether the run is alive.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    return True


def run(plan: dict[str, Any], local: bool = False) -> dict[str, Any]:
    """Run every stage of `plan` (from `cluster.jobs.resolve`) on the Ray this process belongs to, or on a local
    one started for it (`local`); returns {stage: outcome} and prints a summary."""
    import ray

    t0 = time.monotonic()
    started = connect(local)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    log(f"job '{plan['name']}' ({plan['kind']}): {len(plan['stages'])} stage(s) on a Ray cluster of {len(nodes)} "
        f"node(s), {ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs; "
        f"storage {plan['storage']}", flush=True)
    Path(plan["storage"]).mkdir(parents=True, exist_ok=True)
    outcome: dict[str, Any] = {}
    try:
        for stage in plan["stages"]:
            kind = stage["kind"]
            log(f"\n== stage: {kind} ==", flush=True)
            t = time.monotonic()
            outcome[kind] = STAGES[kind](stage, plan, outcome)
            outcome[kind]["seconds"] = round(time.monotonic() - t, 1)
            if outcome[kind].get("preempted"):
                break
    finally:
        if started:
            ray.shutdown()
    outcome["seconds"] = round(time.monotonic() - t0, 1)
    _summary(plan, outcome)
    return outcome


def _data_prep(stage: dict, plan: dict, outcome: dict) -> dict:
    from data_prep.config import DataPrepConfig
    from data_prep.pipeline import run as prepare

    summary = prepare(DataPrepConfig.model_validate(stage["config"]))
    return {"skipped": "stage_seconds" not in summary, "dataset": summary["dataset"],
            "dataset_id": summary["dataset_id"], "examples": summary["examples"]}


def _final_checkpoint(cfg) -> Path | None:
    """The committed checkpoint at train.max_steps of this very config, if the run already got there."""
    from pretrain import checkpoint

    newest = checkpoint.committed(Path(cfg.checkpoint.dir))
    if not newest:
        return None
    client = checkpoint.read_client(newest[0])
    return newest[0] if client["step"] >= cfg.train.max_steps and client.get("config_hash") == cfg.hash() else None


def _pretrain(stage: dict, plan: dict, outcome: dict) -> dict:
    from cluster.jobs import JobSpec
    from cluster.launch import pretrain_on_ray
    from pretrain import checkpoint
    from pretrain.config import PretrainConfig

    cfg = PretrainConfig.model_validate(stage["config"])
    done = _final_checkpoint(cfg)
    if done is not None:
        log(f"'{done}' is this config's final checkpoint (step {cfg.train.max_steps}); nothing to do.")
        client = checkpoint.read_client(done)
        return {"skipped": True, "checkpoint": str(done), "step": client["step"],
                "mlflow_run_id": client.get("mlflow_run_id"), "metrics": _last_metrics(done.parent)}
    spec = JobSpec.model_validate(plan["spec"])
    # Ray Train keeps its own run state under storage; a fresh name per attempt (pretrain's checkpoints, not
    # Ray's, carry the resume point).
    result = pretrain_on_ray(cfg, spec, f"{plan['name']}-pretrain-{uuid.uuid4().hex[:8]}",
                             storage=str(Path(plan["storage"]) / "ray-train"))
    return {"skipped": False, **result, "preempted": result["step"] < cfg.train.max_steps,
            "metrics": _last_metrics(Path(cfg.checkpoint.dir))}


def _last_metrics(ckdir: Path) -> dict[str, float]:
    """The last training record and the last eval record of metrics.jsonl (the run's final figures)."""
    out: dict[str, float] = {}
    path = ckdir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out.update({k: v for k, v in rec.items() if k in ("step", "loss", "mlm_acc", "nsp_acc", "eval/loss",
                                                              "eval/mlm_acc", "eval/nsp_acc", "eval/perplexity")})
    return out


def _register(stage: dict, plan: dict, outcome: dict) -> dict:
    from pretrain.tracking import RegistryError, register_checkpoint

    step_dir = Path(outcome["pretrain"]["checkpoint"])
    try:
        v = register_checkpoint(step_dir, stage["name"], stage["alias"], plan["mlflow_uri"])
    except RegistryError as e:
        raise StageError(f"registering {step_dir} as '{stage['name']}': {e}") from None
    alias = f"@{stage['alias']}" if stage["alias"] else ""
    log(f"registered {v['name']} version {v['version']}{alias} (models:/{v['name']}/{v['version']})")
    return {"name": v["name"], "version": v["version"], "alias": stage["alias"], "run_id": v.get("run_id"),
            "skipped": v["reused"]}


def _finetune(stage: dict, plan: dict, outcome: dict) -> dict:
    from pretrain.config import FinetuneConfig

    cfg = FinetuneConfig.model_validate(stage["config"])
    out = Path(cfg.output)
    done = out / "summary.json"
    if done.is_file() and (out / "job-config.json").is_file() and \
            json.loads((out / "job-config.json").read_text()) == stage["config"]:
        log(f"'{out}' holds this fine-tune's result; nothing to do.")
        return {"skipped": True, **json.loads(done.read_text())}
    import ray

    from cluster.jobs import JobSpec

    # On a worker with the job's per-worker resources (a GPU on GPU clusters), not on the driver's node.
    r = JobSpec.model_validate(plan["spec"]).resources
    task = ray.remote(_finetune_task).options(num_cpus=r.cpus_per_worker, num_gpus=r.gpus, max_retries=0)
    try:
        summary = ray.get(task.remote(stage["config"]))
    except ray.exceptions.RayError as e:
        cause = getattr(e, "cause", None) or e
        raise StageError(f"fine-tuning into {out} failed: {type(cause).__name__}: {cause}") from None
    (out / "job-config.json").write_text(json.dumps(stage["config"], indent=1))
    return {"skipped": False, **summary}


def _finetune_task(config: dict) -> dict:
    from pretrain.config import FinetuneConfig
    from pretrain.finetune import finetune

    return finetune(FinetuneConfig.model_validate(config))


STAGES = {"data_prep": _data_prep, "pretrain": _pretrain, "register": _register, "finetune": _finetune}


def _summary(plan: dict, o: dict) -> None:
    lines = ["", f"== job summary: {plan['name']} ==", f"storage      {plan['storage']}"]
    skipped = [k for k, v in o.items() if isinstance(v, dict) and v.get("skipped")]
    if "data_prep" in o:
        d = o["data_prep"]
        ex = ", ".join(f"{k} {v:,}" for k, v in d["examples"].items())
        lines.append(f"dataset      {d['dataset']} (id {d['dataset_id']}; examples {ex})")
    if "pretrain" in o:
        p, m = o["pretrain"], o["pretrain"].get("metrics", {})
        figures = ", ".join(f"{k} {m[k]:.4g}" for k in ("loss", "eval/loss", "eval/mlm_acc", "eval/nsp_acc") if k in m)
        lines.append(f"pretraining  {p['checkpoint']} (step {p['step']}; {figures})")
        if p.get("mlflow_run_id"):
            lines.append(f"mlflow run   {p['mlflow_run_id']}")
        if p.get("preempted"):
            lines.append("             stopped before train.max_steps: submit the job again to continue")
    if "register" in o:
        r = o["register"]
        alias = f"models:/{r['name']}@{r['alias']}, " if r["alias"] else ""
        lines.append(f"registered   {r['name']} version {r['version']} ({alias}models:/{r['name']}/{r['version']})")
    if "finetune" in o:
        f, m = o["finetune"], o["finetune"].get("metrics", {})
        figures = ", ".join(f"{k} {m[k]:.4g}" for k in ("test_accuracy", "test_macro_f1", "accuracy") if k in m)
        lines.append(f"fine-tuned   {f['model']} ({figures})")
    if skipped:
        lines.append(f"skipped      {', '.join(skipped)} (already done with the same config)")
    lines.append(f"time         {o['seconds']:.0f}s")
    if any(s["kind"] in ("pretrain", "register", "finetune") for s in plan["stages"]):
        lines.append(f"look         mlflow ui --backend-store-uri {plan['mlflow_uri']}")
    log("\n".join(lines), flush=True)
