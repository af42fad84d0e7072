"""Pretraining under Ray Train: `TorchTrainer` runs `pretrain.train.train` in every worker, DeepSpeed inside it.

Ray Train creates the process group (gloo on CPU, NCCL on GPUs) and sets RANK/WORLD_SIZE/LOCAL_RANK;
`pretrain` joins the existing group, so the training function is the one torchrun runs. Recovery is
pretrain's own: after a worker dies, Ray restarts the workers (up to `max_failures`) and `train` resumes
from the newest committed checkpoint in `checkpoint.dir`, which must be on storage every node sees.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from cluster.jobs import JobSpec

WORKERS_DIR = "workers"  # CHECKPOINT_DIR/workers/rank-NNNNN.json: where each rank of the latest attempt runs


def _record_placement(ckdir: Path) -> None:
    """Write which node and process this rank runs in (for operators: where to look, what to kill)."""
    import ray
    import ray.train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    rec = {"rank": rank, "local_rank": ctx.get_local_rank(), "node_rank": ctx.get_node_rank(),
           "node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
           "host": socket.gethostname(), "pid": os.getpid()}
    out = ckdir / WORKERS_DIR
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rank-{rank:05d}.json.partial"
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, out / f"rank-{rank:05d}.json")


def _worker_loop(config: dict[str, Any]) -> None:
    from pretrain.config import PretrainConfig
    from pretrain.train import train

    cfg = PretrainConfig.model_validate(config["pretrain"])
    _record_placement(Path(cfg.checkpoint.dir))
    train(cfg)


def pretrain_on_ray(cfg, spec: JobSpec, run_name: str, storage: str | None = None) -> dict[str, Any]:
    """Fit the pretraining `cfg` with the job's resources on the Ray this process is connected to.

    `storage` (default: the job's) holds Ray Train's own run state. Returns {checkpoint, step, samples,
    mlflow_run_id} of the newest committed checkpoint (the run's outcome as pretrain recorded it); raises
    RuntimeError when the job fails for good.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = spec.resources
    per_worker: dict[str, float] = {"CPU": r.cpus_per_worker}
    if r.gpus:
        per_worker["GPU"] = r.gpus
    if r.memory_gb_per_worker:
        per_worker["memory"] = r.memory_gb_per_worker * 2**30
    scaling = dict(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=per_worker)
    if r.node_labels:
        scaling["label_selector"] = dict(r.node_labels)
    storage = str(Path(storage or spec.storage).resolve())
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"pretrain": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(**scaling),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=spec.max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"pretraining failed after {spec.max_failures} restarts: {result.error}")
    from pretrain import checkpoint

    newest = checkpoint.committed(Path(cfg.checkpoint.dir))
    if not newest:
        raise RuntimeError(f"the workers finished but {cfg.checkpoint.dir} holds no committed checkpoint")
    client = checkpoint.read_client(newest[0])
    return {"checkpoint": str(newest[0]), "step": client["step"], "samples": client["samples"],
            "mlflow_run_id": client.get("mlflow_run_id")}
