"""Pretraining under Ray Train: `TorchTrainer` runs `pretrain.train.train` in every worker, DeepSpeed inside it.

Ray Train creates the process group (gloo on CPU, NCCL on GPUs) and sets RANK/WORLD_SIZE/LOCAL_RANK;
`pretrain` joins the existing group, so the training function is the one torchrun runs. Recovery is
pretrain's own: after a worker dies, Ray restarts the workers (up to `max_failures`) and `train` resumes
from the newest committed checkpoint in `checkpoint.dir`, which must be on storage every node sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.jobs import JobSpec


def _worker_loop(config: dict[str, Any]) -> None:
    from pretrain.config import PretrainConfig
    from pretrain.train import train

    train(PretrainConfig.model_validate(config["pretrain"]))


def pretrain_on_ray(cfg, spec: JobSpec, run_name: str) -> dict[str, Any]:
    """Fit the pretraining `cfg` with the job's resources on the Ray this process is connected to.

    Returns {checkpoint, step, samples, mlflow_run_id} of the newest committed checkpoint (the run's
    outcome as pretrain recorded it); raises RuntimeError when the job fails for good.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = spec.resources
    per_worker: dict[str, float] = {"CPU": r.cpus_per_worker}
    if r.gpus:
        per_worker["GPU"] = r.gpus
    if r.memory_gb_per_worker:
        per_worker["memory"] = r.memory_gb_per_worker * 2**30
    storage = spec.storage if "://" in spec.storage else str(Path(spec.storage).resolve())
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"pretrain": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=per_worker),
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
