"""Pretraining under Ray Train: `TorchTrainer` runs `pretrain.train.train` in every worker, DeepSpeed inside it.

Ray Train creates the process group (gloo on CPU, NCCL on GPUs) and sets RANK/WORLD_SIZE/LOCAL_RANK;
`pretrain` joins the existing group, so the training function is the one torchrun runs. Recovery is
pretrain's own: after a worker dies, Ray restarts the workers (up to `max_failures`) and `train` resumes
from the newest committed checkpoint in `checkpoint.dir`.

Two kinds of storage:
- a shared path (NFS, a mounted bucket, or one machine's disk): `checkpoint.dir` is on it, every rank writes
  its part there and rank 0 commits;
- an object-store URL (`remote_checkpoints`): each rank checkpoints into a directory of its own on its machine,
  and `ray.train.report` uploads every rank's files into one checkpoint directory under the URL
  (`URL/step-NNNNNNNN/`); when all of them are there, rank 0 uploads `complete.json`, the marker of a usable
  checkpoint. A starting worker downloads the newest complete one into its own directory and resumes from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from cluster.jobs import JobSpec
from data_prep import storage
from data_prep.dataset import DatasetError
from pretrain import checkpoint

WORKERS_DIR = "workers"  # CHECKPOINT_DIR/workers/rank-NNNNN.json: where each rank of the latest attempt runs


def _record_placement(ckdir: Path, remote: str | None = None) -> None:
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
    if remote:
        storage.upload(out / f"rank-{rank:05d}.json", storage.join(remote, WORKERS_DIR, f"rank-{rank:05d}.json"))


def _watch(flag_name: str, stop) -> None:
    """Poll the driver's stop flag (`cluster.runner.StopFlag`) every second; once it is raised, `stop` asks
    training for a checkpoint at the end of its step (as SIGTERM does outside Ray, where train's thread is the
    main one). A slow answer is waited out; the flag gone (its driver ended) ends the watch."""
    import ray

    from ray.exceptions import ActorDiedError, ActorUnavailableError

    flag = None
    while stop.signal is None:
        try:
            flag = flag or ray.get_actor(flag_name)
            if ray.get(flag.asked.remote(), timeout=60):
                stop.signal = signal.SIGTERM
                return
        except ActorUnavailableError:  # (for now)
            pass
        except ActorDiedError:  # its driver has ended
            return
        except Exception:  # noqa: BLE001 (not found yet, a slow answer, an RPC hiccup: ask again)
            flag = None
        time.sleep(1.0)


def _worker_loop(config: dict[str, Any]) -> None:
    from pretrain.config import PretrainConfig
    from pretrain.train import StopRequest, train

    cfg = PretrainConfig.model_validate(config["pretrain"])
    stop = StopRequest("submit the job again")  # (no handlers: train runs in a thread of Ray Train's worker)
    if config.get("stop_flag"):
        threading.Thread(target=_watch, args=(config["stop_flag"], stop), daemon=True).start()
    remote = config.get("remote_checkpoints")
    if not remote:
        _record_placement(Path(cfg.checkpoint.dir))
        train(cfg, stop=stop)
        return
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    local = storage.staging_dir(remote, "checkpoints") / f"rank-{rank:05d}"
    _download_newest(remote, local, rank)
    _record_placement(local, remote)
    cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"dir": str(local)})})
    train(cfg, on_checkpoint=lambda path, step: _upload(path, step, remote, rank, world), checkpoint_url=remote,
          stop=stop)
    # Finished: every checkpoint is in the bucket, which a later run resumes from. The local copies (kept across
    # a failure, for a restarted worker on this node) would only fill the node's disk.
    storage.clear_local(local)
    with contextlib.suppress(OSError):  # the job's directory, once the other ranks on this node cleared theirs
        local.parent.rmdir()


def _download_newest(remote: str, local: Path, rank: int) -> None:
    """Make the newest complete uploaded checkpoint this rank's newest local one (kept if already there). Local
    checkpoints are only copies of the bucket's: one the bucket does not hold complete (never finished there, or
    from an earlier run of the same URL) is removed, never resumed from."""
    tags = checkpoint.uploaded(remote)
    for p in checkpoint.committed(local):
        if p.name not in tags:
            shutil.rmtree(p, ignore_errors=True)
    if tags:
        checkpoint.fetch(storage.join(remote, tags[0]), local)


def _upload(path: Path, step: int, remote: str, rank: int, world: int) -> None:
    """Upload this rank's part of the checkpoint just committed; rank 0 marks it complete once every rank's is."""
    import ray.train

    mine = path if path.is_dir() else path.with_name(path.name + checkpoint.PARTIAL)  # only rank 0 renames
    if rank == 0:  # the run's files so far travel along (metrics; what export needs)
        for name in checkpoint.RUN_FILES:
            if (path.parent / name).is_file():
                (mine / checkpoint.RUN_DIR / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path.parent / name, mine / checkpoint.RUN_DIR / name)
    ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(str(mine)),
                     checkpoint_dir_name=path.name)
    # Each rank's report returns once its own files are uploaded: past this barrier every rank's are, so the
    # marker never vouches for a rank whose upload is still under way (or died midway).
    import torch.distributed as dist

    dist.barrier()
    if rank == 0:
        where = storage.join(remote, path.name)
        expected = {f"rank-{r:05d}.pt" for r in range(world)}
        deadline = time.monotonic() + 120
        while not expected <= set(files := storage.listing(where)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"checkpoint {where}: the files of ranks "
                                   f"{sorted(expected - set(files))} did not arrive within 120 s")
            time.sleep(0.2)
        marker = mine / checkpoint.COMPLETE
        marker.write_text(json.dumps({"step": step, "world_size": world, "files": files}))
        storage.upload(marker, storage.join(where, checkpoint.COMPLETE))
    else:  # rank 0 prunes its directory as it commits; the others keep only the newest part
        for p in path.parent.iterdir():
            if p.name.startswith(checkpoint.PREFIX) and p != mine:
                shutil.rmtree(p, ignore_errors=True)


def _workers_words(e: BaseException) -> str:
    """What failed in the workers, a line per distinct error: the last line of each worker's traceback."""
    # (a controller's failure, or an older Ray Train's error, carries the cause inside: its own text is advice)
    failures = getattr(e, "worker_failures", None) or {None: getattr(e, "controller_failure", None) or e.__cause__ or e}
    said: dict[str, list] = {}
    for rank, failure in sorted(failures.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        lines = [line for line in str(failure).strip().splitlines() if line.strip()]
        said.setdefault(lines[-1].strip() if lines else type(failure).__name__, []).append(rank)
    return "; ".join(f"{text}" + (f" (rank {', '.join(map(str, ranks))})" if ranks != [None] else "")
                     for text, ranks in said.items())


def pretrain_on_ray(cfg, spec: JobSpec, run_name: str, storage_path: str | None = None,
                    remote_checkpoints: bool = False, stop_flag: str | None = None,
                    resume_from: tuple[str, dict] | None = None) -> dict[str, Any]:
    """Fit the pretraining `cfg` with the job's resources on the Ray this process is connected to.

    `storage_path` (default: the job's storage) holds Ray Train's own run state. With `remote_checkpoints`
    (object-store storage) the checkpoints go to `storage_path/run_name/step-NNNNNNNN/`, not `checkpoint.dir`.
    Returns {checkpoint, step, samples, mlflow_run_id} of the newest committed checkpoint (the run's outcome
    as pretrain recorded it); raises RuntimeError when the job fails for good. `stop_flag`: the name of the
    driver's `cluster.runner.StopFlag` actor, on which the workers commit a checkpoint and stop. `resume_from`:
    (location, client record) of the checkpoint the workers will resume, checked against the run first.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from pretrain.data import open_dataset

    # A dataset that is not there, or that the model cannot take, fails every worker the same way: said once here,
    # not after max_failures restarts.
    dataset = open_dataset(cfg.data.dataset)
    damage = dataset.damage()
    if damage:
        raise DatasetError(damage)
    from pretrain.train import model_problem, resume_problem

    problem = model_problem(cfg, dataset.manifest)
    if problem:
        raise DatasetError(problem)
    if resume_from and cfg.resume != "never":  # (a checkpoint of another dataset or model: refused by every worker)
        problem = resume_problem(resume_from[1], vars(cfg.model.build(dataset.manifest["tokenizer"]["vocab_size"])),
                                 dataset.id, resume_from[0])
        if problem:
            raise DatasetError(problem)
    r = spec.resources
    per_worker: dict[str, float] = {"CPU": r.cpus_per_worker}
    if r.gpus:
        per_worker["GPU"] = r.gpus
    if r.memory_bytes:
        per_worker["memory"] = r.memory_bytes
    scaling = dict(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=per_worker)
    if r.node_labels:
        scaling["label_selector"] = dict(r.node_labels)
    where = storage_path or spec.storage
    where = where.rstrip("/") if storage.is_remote(where) else str(Path(where).resolve())
    remote = storage.join(where, run_name) if remote_checkpoints else None
    loop_config: dict[str, Any] = {"pretrain": cfg.model_dump(mode="json"), "stop_flag": stop_flag}
    run = dict(name=run_name, storage_path=where, failure_config=FailureConfig(max_failures=spec.max_failures))
    if remote:
        loop_config["remote_checkpoints"] = remote
        run["checkpoint_config"] = CheckpointConfig(num_to_keep=cfg.checkpoint.keep)
    class Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller):
            """Not Ray Train's Ctrl-C handler, which aborts the run (the steps since the last checkpoint are lost):
            the driver's own asks the workers to commit a checkpoint first (cluster.runner._Stopping)."""

    trainer = Trainer(_worker_loop, train_loop_config=loop_config, scaling_config=ScalingConfig(**scaling),
                      run_config=RunConfig(**run))
    try:
        result = trainer.fit()
    except TrainingFailedError as e:  # (Ray Train raises it; older versions put it in result.error)
        raise RuntimeError(f"pretraining failed after {spec.max_failures} restarts: {_workers_words(e)}") from None
    if result.error is not None:
        raise RuntimeError(f"pretraining failed after {spec.max_failures} restarts: {_workers_words(result.error)}")
    if remote:
        tags = checkpoint.uploaded(remote)
        if not tags:
            raise RuntimeError(f"the workers finished but {remote} holds no complete checkpoint")
        client = json.loads(storage.read_text(storage.join(remote, tags[0], checkpoint.CLIENT)))
        newest = storage.join(remote, tags[0])
    else:
        found = checkpoint.committed(Path(cfg.checkpoint.dir))
        if not found:
            raise RuntimeError(f"the workers finished but {cfg.checkpoint.dir} holds no committed checkpoint")
        client, newest = checkpoint.read_client(found[0]), str(found[0])
    return {"checkpoint": newest, "step": client["step"], "samples": client["samples"],
            "mlflow_run_id": client.get("mlflow_run_id")}
