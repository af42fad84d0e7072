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
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from cluster.head import free_port, kill_and_wait
from data_prep import storage
from data_prep.ray_client import drain_worker_output, host_port, quiet_local_token_notice

log = print
# In every Ray worker of a job: Ray Train's print patch would send each line of pretrain's console output twice
# (to its logger and, as our stdout is wrapped, to stdout as well). Its preemption watcher, an actor that only logs
# node drains, is off: creating it printed a core-worker error line in every job. (A worker whose node goes away
# is restarted from the last checkpoint, up to max_failures; a stop of the job is `_Stopping`'s.) A process Ray
# gives no GPU sees none (CUDA_VISIBLE_DEVICES=""): since Ray 2.60 it would see all of the machine's, and a CPU job
# on a GPU machine would train on GPUs Ray never assigned it (or fail: "invalid device ordinal").
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
              "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}


# How long Ray waits for a stopped job's driver before killing it (Ray's own default is 3 s): time for the
# pretraining workers to finish their step and commit a checkpoint (`_Stopping`). Set in each submitted job.
STOP_GRACE_S = 300


class StageError(Exception):
    """A stage failed for good; the message names the stage and what to do."""


# A stop the workers have not heard of within this many seconds (none is running yet: waiting for nodes,
# starting up; or they are stuck) ends the driver as a second stop would.
UNHEARD_S = float(os.environ.get("BERTFORGE_STOP_UNHEARD_S", "30"))


class _Stopping:
    """A stop while the job runs: SIGTERM (Ray's `stop_job`, `python -m cluster stop`, a scheduler) or Ctrl-C.

    Ray signals the driver only, and the Train workers die with it, losing every step since their last checkpoint.
    During pretraining the driver raises the job's `StopFlag` instead: each worker finishes its step, commits a
    checkpoint and stops, and the driver waits for that and ends with the job's summary (a resubmission resumes
    from there). A stop no worker hears of within UNHEARD_S, a second stop, or a stop in another stage ends the
    driver at once (KeyboardInterrupt, in the main thread)."""

    def __init__(self, flag):
        self.flag = flag
        self.pretraining = False
        self.asked = False
        self.previous: dict = {}
        self.over = threading.Event()  # pretraining has ended: nothing left to wait for
        self.asking: threading.Thread | None = None

    def __enter__(self) -> _Stopping:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        self.over.set()
        if self.asking is not None:
            self.asking.join(timeout=5)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, sig, _frame) -> None:
        # (no printing here: the main thread may be inside a print; the asking thread says what happens)
        if not self.pretraining or self.asked:
            raise KeyboardInterrupt
        self.asked = True
        self.asking = threading.Thread(target=self._ask, args=(signal.Signals(sig).name,), daemon=True)
        self.asking.start()

    def _ask(self, name: str) -> None:
        import _thread

        import ray

        log(f"{name}: asking the pretraining workers to commit a checkpoint at the end of their step and stop (stop "
            "again to end at once, losing the steps since the last checkpoint)", flush=True)
        try:
            ray.get(self.flag.ask.remote(), timeout=30)
            deadline = time.monotonic() + UNHEARD_S
            while not ray.get(self.flag.heard.remote(), timeout=30):
                if self.over.wait(1.0):
                    return
                if time.monotonic() > deadline:
                    why = f"no pretraining worker heard of the stop within {UNHEARD_S:.0f} s (none is running yet?)"
                    break
            else:  # heard: the workers commit and stop; bounded as Ray bounds a stopped job
                if self.over.wait(STOP_GRACE_S):
                    return
                why = f"the pretraining workers did not stop within {STOP_GRACE_S} s of hearing of the stop"
        except Exception as e:  # noqa: BLE001 (the flag cannot be reached: end as Ray would)
            if self.over.is_set():
                return
            why = f"the pretraining workers cannot be told ({type(e).__name__}: {e})"
        if self.over.is_set():
            return
        log(f"{why}: stopping now; a resubmission resumes from the last checkpoint", flush=True)
        _thread.interrupt_main()  # (the handler above, on SIGINT: a KeyboardInterrupt in the main thread)


class StopFlag:
    """The driver's word to its pretraining workers (an actor of the job, on the driver's node): once `ask`ed, each
    worker commits a checkpoint at the end of its step and stops (cluster.launch polls it); `heard` says whether
    one has polled since."""

    def __init__(self):
        self._asked = False
        self._heard = False

    def ask(self) -> None:
        self._asked = True

    def asked(self) -> bool:
        self._heard = self._heard or self._asked
        return self._asked

    def heard(self) -> bool:
        return self._heard


def _stop_flag():
    """This job's StopFlag, on the driver's node (it outlives any worker node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(StopFlag).options(name=stop_flag_name(), get_if_exists=True,
                                                    scheduling_strategy=here).remote()


def stop_flag_name() -> str:
    import ray

    return f"bertforge-stop-{ray.get_runtime_context().get_job_id()}"


def connect(local: bool = False, num_cpus: int | None = None) -> str | None:
    """Join the Ray this driver belongs to (`RAY_ADDRESS`, set for Ray jobs), or start a local one (always, with
    `local`); "joined" or "embedded" when this call connected (and so should disconnect), None when this process
    was connected already."""
    import ray

    if ray.is_initialized():
        return None
    if not sys.stdout.isatty():  # a job's log or a pipe: the workers' lines without colour codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    kwargs: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=True)
    if os.environ.get("RAY_ADDRESS") and not local:
        env = job_env(os.environ)
        ray.init(**kwargs, **({"runtime_env": {"env_vars": env}} if env else {}))
        return "joined"
    # embedded: a fresh local Ray for this job, never a cluster that happens to be running. With the dashboard
    # (loopback): Ray Train's placement-group cleaner asks its State API whether the run is alive.
    port = free_port()
    quiet_local_token_notice()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, runtime_env={"env_vars": job_env(os.environ, dashboard_port=port)}, **kwargs)
    return "embedded"


def descendants() -> list:
    """This process's children and theirs (psutil processes): once `connect` has started a local Ray, its processes
    and their workers among them."""
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def end_stragglers(procs: list, grace_s: float = 10.0) -> int:
    """After a local Ray is shut down: wait up to `grace_s` for `procs` (its processes, listed before the shutdown)
    to exit, then kill those left (at once on Ctrl-C); returns how many were killed. A worker can hang in Ray's own
    exit handler and outlive its Ray (seen with Ray Train's controller, Ray 2.60, about once in dozens of runs),
    holding its memory until the machine restarts."""
    import psutil

    left = procs
    try:
        _, left = psutil.wait_procs(procs, timeout=grace_s)
    except KeyboardInterrupt:
        left = [p for p in procs if p.is_running()]
    kill_and_wait(left)
    return len(left)


def job_env(environ: Mapping[str, str], dashboard_port: int | None = None) -> dict[str, str]:
    """The environment variables this driver adds to its job's processes: WORKER_ENV (unless the job was submitted
    with it), and which Ray they belong to: the local one's dashboard (`dashboard_port`), else the GCS address
    (`RAY_ADDRESS`, as Ray gives it to a job's driver) unless the submitted job sets that itself.

    Without the address, Ray's State API, which Ray Train's placement-group cleaner polls from inside the
    cluster, takes the address of the last `ray start` on the machine: a dead cluster's costs a 40 s connect
    timeout and a 12 s stall with a traceback at the end of every run; a live one answers that the run's
    controller does not exist, and the cleaner quits.
    """
    env = {k: v for k, v in WORKER_ENV.items() if environ.get(k) != v}
    if dashboard_port is not None:
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
        return env
    try:  # the job's submitted runtime_env, which Ray hands its driver; a key set there cannot be set again
        submitted = json.loads(environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["runtime_env"].get("env_vars") or {}
    except (KeyError, ValueError, TypeError, AttributeError):
        submitted = {}
    address = environ.get("RAY_ADDRESS", "")
    if host_port(address) and not address.startswith("ray://") and "RAY_ADDRESS" not in submitted:
        env["RAY_ADDRESS"] = address
    return env


def run(plan: dict[str, Any], local: bool = False) -> dict[str, Any]:
    """Run every stage of `plan` (from `cluster.jobs.resolve`) on the Ray this process belongs to, or on a local
    one started for it (`local`); returns {stage: outcome} and prints a summary."""
    import ray

    t0 = time.monotonic()
    existing = {p.pid for p in descendants()}  # (this process's own children, if any, are not the local Ray's)
    connected = connect(local)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    log(f"job '{plan['name']}' ({plan['kind']}): {len(plan['stages'])} stage(s) on a Ray cluster of {len(nodes)} "
        f"node(s), {ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs; "
        f"storage {plan['storage']}", flush=True)
    if not storage.is_remote(plan["storage"]):
        Path(plan["storage"]).mkdir(parents=True, exist_ok=True)
    outcome: dict[str, Any] = {}
    interrupted = failed = None
    try:
        _check_ahead(plan)
        with _Stopping(_stop_flag()) as stopping:
            kinds = [stage["kind"] for stage in plan["stages"]]
            try:
                for i, stage in enumerate(plan["stages"]):
                    kind = stage["kind"]
                    log(f"\n== stage: {kind} ==", flush=True)
                    t = time.monotonic()
                    stopping.pretraining = kind == "pretrain"
                    outcome[kind] = STAGES[kind](stage, plan, outcome)
                    if stopping.pretraining:
                        stopping.pretraining = False
                        stopping.over.set()
                    outcome[kind]["seconds"] = round(time.monotonic() - t, 1)
                    if outcome[kind].get("preempted") or stopping.asked:
                        outcome["not_run"] = kinds[i + 1:]
                        break
            except KeyboardInterrupt as e:  # the stages done so far are still summed up
                interrupted, outcome["not_run"] = e, kinds[len([k for k in kinds if k in outcome]):]
    except BaseException as e:
        failed = e
        raise
    finally:
        _leave(connected, drain=not isinstance(interrupted or failed, KeyboardInterrupt), existing=existing)
    outcome["seconds"] = round(time.monotonic() - t0, 1)
    _summary(plan, outcome)
    if interrupted is not None:
        raise interrupted
    return outcome


def _leave(connected: str | None, drain: bool, existing: set[int]) -> None:
    """Disconnect from Ray as `connect` connected (`connected`), the workers' last lines first (`drain`; not after a
    Ctrl-C); the processes a local Ray started (this process's descendants, less those in `existing`, from before
    it) that outlive its shutdown are ended. A Ctrl-C here cuts the waits short."""
    import ray

    try:
        if drain:  # the last stage's last lines (or its error's), before this driver leaves
            drain_worker_output()
    except KeyboardInterrupt:
        pass
    if not connected:
        return
    ours = [p for p in descendants() if p.pid not in existing] if connected == "embedded" else []  # (not a cluster's)
    ray.shutdown()
    ended = end_stragglers(ours)
    if ended:
        log(f"note: {ended} process(es) of this job's local Ray did not exit with it (a worker hung in Ray's own "
            "exit handler); they were ended")


def _check_ahead(plan: dict) -> None:
    """Read the fine-tuning stage's task files, and ask the MLflow server the job registers in or pulls from,
    before the first stage: a mistake there would otherwise be found only after data prep and pretraining
    (hours, on a cluster)."""
    from pretrain.tracking import shown

    for uri, needed in job_stores(plan).items():
        silent = _unanswered(uri)
        if silent and needed:
            raise StageError(f"the MLflow server at {shown(uri)} does not answer ({silent}), and the job {needed}: "
                             "start it, or point the job at one that runs (MLFLOW_TRACKING_URI in "
                             "runtime_env.env_vars, or the configs' mlflow.tracking_uri)")
        if silent:
            log(f"warning: the MLflow server at {shown(uri)} does not answer ({silent}); pretraining goes on and "
                "sends its records once it does", flush=True)
    problem = task_problem(plan)  # (after: it asks the store whether a finished fine-tune's alias has moved)
    if problem:
        raise StageError(f"fine-tuning's task (checked before the first stage): {problem}")


def job_stores(plan: dict) -> dict[str, str]:
    """{tracking URI: what the job needs it for ("" where only pretraining's records go there)}."""
    out: dict[str, str] = {}
    for stage in plan["stages"]:
        if stage["kind"] == "register":
            out[plan["mlflow_uri"]] = "registers its checkpoint there"
        elif stage["kind"] == "pretrain" and stage["config"]["mlflow"]["enabled"]:
            out.setdefault(stage["config"]["mlflow"]["tracking_uri"], "")
        elif stage["kind"] == "finetune":
            c = stage["config"]
            need = ("fine-tunes a model from there" if c["model"].startswith(("models:/", "runs:/")) else
                    "registers its fine-tuned model there" if c["registry"]["name"] else "")
            if need or c["mlflow"]["enabled"]:
                out[c["mlflow"]["tracking_uri"]] = out.get(c["mlflow"]["tracking_uri"]) or need
    return out


def _unanswered(uri: str) -> str | None:
    """Why the MLflow server at `uri` did not answer its health check (None: it did, or `uri` is no server)."""
    import urllib.error
    import urllib.request

    import ssl

    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10):
            return None
    except urllib.error.HTTPError as e:  # it answers (a proxy's or the server's own error): let MLflow say more
        return None if e.code < 500 else f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        # a certificate MLflow is told how to trust (MLFLOW_TRACKING_SERVER_CERT_PATH, _INSECURE_TLS): it answered
        return None if isinstance(reason, ssl.SSLCertVerificationError) else str(reason)


def task_files_elsewhere(plan: dict) -> list[str]:
    """The fine-tuning stage's task files (as `task.SPLIT PATH`) that are paths, not URLs, and not files on this
    machine: `cluster validate` names them (a typo, or files the cluster has and this machine lacks)."""
    from pretrain.config import FinetuneConfig

    out = []
    for stage in plan["stages"]:
        if stage["kind"] == "finetune":
            task = FinetuneConfig.model_validate(stage["config"]).task
            out += [f"task.{split} {path}" for split in ("train", "validation", "test")
                    if (path := getattr(task, split)) and "://" not in path and not Path(path).is_file()]
    return out


def task_problem(plan: dict, here: bool = False) -> str | None:
    """What is wrong with the fine-tuning stage's task files, naming the file and line (None: nothing), not asked
    of a fine-tune already done. `here` (`cluster validate`, on the submitting machine): files that are not on this
    machine, or that it cannot read (a bucket without credentials here), are left for the job to check where it
    runs."""
    for stage in plan["stages"]:
        if stage["kind"] != "finetune":
            continue
        from pretrain.config import FinetuneConfig

        cfg = FinetuneConfig.model_validate(stage["config"])
        if here and task_files_elsewhere({"stages": [stage]}):
            return None  # (on the cluster's storage, or made before the job runs)
        if not here and finished_finetune(cfg, say=lambda _: None) is not None:  # (the stage says why not)
            return None
        from pretrain.tasks import TaskError, read_splits  # (torch-free: validate answers in a fraction of a second)

        try:
            read_splits(cfg.task)
        except TaskError as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 (a bucket this machine cannot read)
            return None if here else f"{type(e).__name__}: {e}"
    return None


def _data_prep(stage: dict, plan: dict, outcome: dict) -> dict:
    from data_prep.config import DataPrepConfig
    from data_prep.pipeline import run as prepare

    from data_prep.dataset import DatasetError

    cfg = DataPrepConfig.model_validate(stage["config"])
    try:
        summary = prepare(cfg)
    except DatasetError as e:
        if not e.in_a_job:
            raise
        said = str(e).rstrip()
        raise StageError(f"{said}{'' if said.endswith('.') else '.'} In this job: "
                         f"{e.in_a_job.format(output=cfg.output)}.") from None
    return {"skipped": "stage_seconds" not in summary, "dataset": summary["dataset"],
            "dataset_id": summary["dataset_id"], "examples": summary["examples"]}


def _newest_checkpoint(cfg, remote: str | None) -> tuple[str, dict] | None:
    """(location, client record) of the newest committed checkpoint: under `remote` (object-store storage)
    or in `checkpoint.dir`."""
    from pretrain import checkpoint

    if remote:
        tags = checkpoint.uploaded(remote)
        if not tags:
            return None
        where = storage.join(remote, tags[0])
        return where, json.loads(storage.read_text(storage.join(where, checkpoint.CLIENT)))
    newest = checkpoint.committed(Path(cfg.checkpoint.dir))
    return (str(newest[0]), checkpoint.read_client(newest[0])) if newest else None


def _pretrain(stage: dict, plan: dict, outcome: dict) -> dict:
    from cluster.jobs import JobSpec
    from cluster.launch import pretrain_on_ray
    from pretrain.config import PretrainConfig

    cfg = PretrainConfig.model_validate(stage["config"])
    # An object-store checkpoint.dir (URL/NAME): Ray Train's run NAME under URL keeps the checkpoints, so a
    # resubmission resumes from them. A path: pretrain's checkpoint.dir carries the resume point, and Ray's own
    # run state goes under storage with a fresh name per attempt.
    remote = cfg.checkpoint.dir.rstrip("/") if storage.is_remote(cfg.checkpoint.dir) else None
    newest = _newest_checkpoint(cfg, remote)
    if newest and newest[1]["step"] >= cfg.train.max_steps and newest[1].get("config_hash") == cfg.hash():
        log(f"'{newest[0]}' is this config's final checkpoint (step {cfg.train.max_steps}); nothing to do.")
        return {"skipped": True, "checkpoint": newest[0], "step": newest[1]["step"],
                "mlflow_run_id": newest[1].get("mlflow_run_id"), "metrics": _last_metrics(newest[0], remote)}
    spec = JobSpec.model_validate(plan["spec"])
    import ray

    short = _short_of(spec.resources, ray.cluster_resources())
    if short:
        log(f"warning: the job asks for {short}: Ray Train waits for nodes to join (an autoscaler adds them) and "
            "retries every minute, and without one it waits until stopped. Lower resources.num_workers or the "
            "per-worker resources, or add nodes", flush=True)
    if remote:
        where, name = remote.rsplit("/", 1)
        result = pretrain_on_ray(cfg, spec, name, storage_path=where, remote_checkpoints=True,
                                 stop_flag=stop_flag_name(), resume_from=newest)
    else:
        result = pretrain_on_ray(cfg, spec, f"{plan['name']}-pretrain-{uuid.uuid4().hex[:8]}",
                                 storage_path=storage.join(plan["storage"], "ray-train"), stop_flag=stop_flag_name(),
                                 resume_from=newest)
    return {"skipped": False, **result, "preempted": result["step"] < cfg.train.max_steps,
            "metrics": _last_metrics(result["checkpoint"], remote)}


def _short_of(r, cluster: Mapping[str, float]) -> str | None:
    """What the job's workers ask for beyond all the cluster has now (None: it fits, in total)."""
    asks = {"CPU": r.num_workers * r.cpus_per_worker, "GPU": r.num_workers * r.gpus}
    over = [f"{asks[k]:g} {k}s ({r.num_workers} workers), the cluster has {cluster.get(k, 0):g}"
            for k in ("CPU", "GPU") if asks[k] > cluster.get(k, 0)]
    return "; ".join(over) or None


def _last_metrics(step_dir: str, remote: str | None) -> dict[str, float]:
    """The last training record and the last eval record of the run's metrics.jsonl (its final figures): in
    the checkpoint directory's parent, or the copy an uploaded checkpoint carries."""
    if remote:
        from pretrain.checkpoint import RUN_DIR

        where = storage.join(step_dir, RUN_DIR, "metrics.jsonl")
        text = storage.read_text(where) if storage.exists(where) else ""
    else:
        path = Path(step_dir).parent / "metrics.jsonl"
        text = path.read_text() if path.is_file() else ""
    from pretrain.tracking import final_figures

    return final_figures(text)


def _register(stage: dict, plan: dict, outcome: dict) -> dict:
    from pretrain.export import ExportError
    from pretrain.tracking import RegistryError, register_checkpoint

    where = outcome["pretrain"]["checkpoint"]  # an uploaded checkpoint is registered from a downloaded copy
    try:
        v = register_checkpoint(where, stage["name"], stage["alias"], plan["mlflow_uri"], stage.get("pooling", "cls"))
    except (RegistryError, ExportError) as e:
        raise StageError(f"registering {where} as '{stage['name']}': {e}") from None
    from pretrain.tracking import alias_words

    said = f"{alias_words(v, stage['alias'])} (models:/{v['name']}/{v['version']})"
    log(f"{v['checkpoint']} is registered already: {said}" if v["reused"] else f"registered {said}")
    if v["reused"] and v.get("alias_was") and stage["alias"]:
        fine_tunes = any(s["kind"] == "finetune" for s in plan["stages"])
        log(f"note: alias '{stage['alias']}' pointed at version {v['alias_was']}; this job points it at the version "
            f"it registered, {v['version']}{', which it fine-tunes' if fine_tunes else ''} (to move it: the "
            f"model's page in the MLflow UI, or MlflowClient('{plan['mlflow_uri']}').set_registered_model_alias("
            f"'{v['name']}', '{stage['alias']}', {v['alias_was']}))")
    return {"name": v["name"], "version": v["version"], "alias": stage["alias"], "run_id": v.get("run_id"),
            "skipped": v["reused"], "alias_was": v.get("alias_was")}


def _finetune(stage: dict, plan: dict, outcome: dict) -> dict:
    from pretrain.config import FinetuneConfig

    config, reg = stage["config"], outcome.get("register")
    if reg and not reg["alias"] and config["model"] == f"models:/{reg['name']}/latest":
        # the version this job's register stage registered or found, not whichever is newest by then
        config = {**config, "model": f"models:/{reg['name']}/{reg['version']}"}
    cfg = FinetuneConfig.model_validate(config)
    out = cfg.output.rstrip("/")
    done = finished_finetune(cfg)  # (asked again: this job's register stage may have moved the alias since)
    if done is not None and done.get("register_error"):
        return {"skipped": True, **_register_finetuned(cfg, done)}
    if done is not None:
        log(f"'{out}' holds this fine-tune's result; nothing to do.")
        return {"skipped": True, **done}
    import ray

    from cluster.jobs import JobSpec

    # On a worker with the job's per-worker resources (a GPU on GPU clusters), not on the driver's node.
    r = JobSpec.model_validate(plan["spec"]).resources
    task = ray.remote(_finetune_task).options(num_cpus=r.cpus_per_worker, num_gpus=r.gpus, max_retries=0)
    try:
        summary = ray.get(task.remote(config))
    except ray.exceptions.RayError as e:
        cause = getattr(e, "cause", None) or e
        raise StageError(f"fine-tuning into {out} failed: {type(cause).__name__}: {cause}") from None
    from pretrain.finetune import summary_text
    from pretrain.tracking import tracking_uri

    log(summary_text(summary, tracking_uri(cfg.mlflow)), flush=True)  # here: the task's own last lines can be lost
    return {"skipped": False, **summary}


def finished_finetune(cfg, say=log) -> dict | None:
    """The summary of a finished fine-tune of this very config in `cfg.output` (None: there is none). A run
    removes an earlier run's summary before it writes anything there, and writes its own last, config included
    (where it ran does not count: an object-store output is fine-tuned in a staging directory). A summary with a
    `register_error` is a finished fine-tune whose model is still to be registered. `say` is told why a summary
    that is there does not count."""
    from pretrain.finetune import SUMMARY

    where = storage.join(cfg.output.rstrip("/"), SUMMARY)
    try:
        summary = json.loads(storage.read_text(where))
        made_by = dict(summary["config"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:  # cut short, or from a version that did not record its config
        say(f"warning: {where} cannot be read as a finished fine-tune's summary ({type(e).__name__}: {e}); "
            "fine-tuning again")
        return None
    wanted = cfg.model_dump(mode="json")
    made_by.pop("output", None)
    wanted.pop("output", None)
    if made_by != wanted:
        return None
    changed = _changed_task_files(summary, cfg)
    if changed:
        say(f"{', '.join(changed)} changed since {where} was fine-tuned from it: fine-tuning again")
        return None
    if cfg.model.startswith("models:/") and "@" in cfg.model:  # an alias may have moved since (a new pretraining)
        from pretrain.tracking import RegistryError, resolve_model_uri, tracking_uri

        try:
            now = resolve_model_uri(cfg.model, tracking_uri(cfg.mlflow))
        except RegistryError:
            return None  # (the fine-tune itself will say what is wrong)
        then = summary.get("source") or {}
        if (then.get("name"), then.get("version")) != (now["name"], now["version"]):
            say(f"{cfg.model} is version {now['version']} now; {where} is a fine-tune of version "
                f"{then.get('version')}: fine-tuning again")
            return None
    return summary


def _changed_task_files(summary: dict, cfg) -> list[str]:
    """The task files (as `task.SPLIT (PATH)`) whose bytes differ from those a finished fine-tune's summary records
    (or, for a summary from before it recorded them, its model's training.json); files not on this machine, or not
    recorded, are not compared."""
    from pretrain.finetune import task_files

    then = summary.get("task_files")
    if then is None:
        try:
            then = json.loads(storage.read_text(storage.join(summary["model"], "training.json")))["task_files"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
    now = task_files(cfg)
    return [f"task.{split} ({f['path']})" for split, f in now.items()
            if f["sha256"] and (then.get(split) or {}).get("sha256") not in (None, f["sha256"])]


def _register_finetuned(cfg, summary: dict) -> dict:
    """Register the complete model of a finished fine-tune whose registration failed (the summary says so), from a
    downloaded copy where the output is in an object store, and record the version in its summary: registering is
    all that is left to do, so nothing is trained again."""
    from data_prep.worker import write_json_atomic
    from pretrain.finetune import SUMMARY, registered_summary
    from pretrain.tracking import RegistryError, alias_words, register, tracking_uri

    out = cfg.output.rstrip("/")
    log(f"'{out}' holds this fine-tune's finished model; its registration failed "
        f"({summary['register_error'][:200]}): registering it now")
    model, remote = storage.join(out, "model"), storage.is_remote(out)
    local = storage.staging_dir(out, "register") if remote else Path(storage.local_form(out))
    try:
        if remote:
            storage.clear_local(local)
            if not storage.download_dir(model, local / "model"):
                raise StageError(f"{model} holds no files: remove {storage.join(out, SUMMARY)} and submit the job "
                                 "again to fine-tune again")
        v = register(local / "model", cfg.registry.name, cfg.registry.alias, tracking_uri(cfg.mlflow))
        summary = registered_summary(summary, v, cfg.registry.alias)
        write_json_atomic(local / SUMMARY, summary)
        if remote:
            storage.upload(local / SUMMARY, storage.join(out, SUMMARY))
    except RegistryError as e:
        raise StageError(f"registering the fine-tuned model {model} as '{cfg.registry.name}': {e}") from None
    except StageError:
        raise
    except Exception as e:  # noqa: BLE001 (the output's storage: credentials, endpoint, a file gone)
        raise StageError(f"registering the fine-tuned model {model}: {storage.unreadable(model, e)}") from None
    finally:
        if remote:
            storage.clear_local(local)
    log(f"registered {alias_words(summary['registered'], cfg.registry.alias)} (models:/{v['name']}/{v['version']})")
    return {**summary, "registered_now": True}


def _finetune_task(config: dict) -> dict:
    """Fine-tune as `config` says. An object-store output is written in a local staging directory and uploaded
    with its summary.json last (an earlier run's is removed first); the returned summary names the uploaded
    files."""
    from data_prep.worker import write_json_atomic
    from pretrain.config import FinetuneConfig
    from pretrain.finetune import SUMMARY, finetune

    cfg = FinetuneConfig.model_validate(config)
    if not storage.is_remote(cfg.output):
        return finetune(cfg, show_summary=False)  # (the driver prints it)
    remote = cfg.output.rstrip("/")
    storage.remove(storage.join(remote, SUMMARY))
    local = storage.staging_dir(remote, "finetune").resolve()  # (absolute: the summary names it, then the URL)
    summary = finetune(cfg.model_copy(update={"output": str(local)}), show_summary=False)
    summary = json.loads(json.dumps(summary).replace(str(local), remote))
    write_json_atomic(local / SUMMARY, summary)
    storage.upload_dir(local, remote, last=(SUMMARY,))
    storage.clear_local(local)
    if summary.get("register_error"):  # (the warning above names the staging copy, removed now)
        log(f"the fine-tuned model is complete in {remote}/model: submit the job again to register it (nothing is "
            "fine-tuned again)")
    return summary


STAGES = {"data_prep": _data_prep, "pretrain": _pretrain, "register": _register, "finetune": _finetune}


def _summary(plan: dict, o: dict) -> None:
    lines = ["", f"== job summary: {plan['name']} ==", f"storage      {plan['storage']}"]
    skipped = [k for k, v in o.items() if isinstance(v, dict) and v.get("skipped") and not v.get("registered_now")
               and not v.get("alias_was")]  # (a registration done before whose alias was moved back: not skipped)
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
        if r.get("alias_was"):
            lines.append(f"             alias '{r['alias']}' moved from version {r['alias_was']}")
    if "finetune" in o:
        f, m = o["finetune"], o["finetune"].get("metrics", {})
        figures = ", ".join(f"{k} {m[k]:.4g}" for k in ("test_accuracy", "test_macro_f1", "accuracy") if k in m)
        lines.append(f"fine-tuned   {f['model']} ({figures})")
        if f.get("registered_now"):  # (the fine-tune was done; its registration had failed)
            r = f["registered"]
            lines.append(f"             registered now as {r['name']} version {r['version']}")
        elif f.get("register_error"):
            lines.append("             not registered: the registration failed (above); submit the job again to "
                         "register it (nothing is fine-tuned again)")
    if skipped:
        lines.append(f"skipped      {', '.join(skipped)} (already done with the same config)")
    if o.get("not_run"):
        lines.append(f"not run      {', '.join(o['not_run'])} (the job was stopped: submit it again to continue)")
    each = [f"{k} {o[k]['seconds']:.0f}s" for k in STAGES if isinstance(o.get(k), dict) and "seconds" in o[k]]
    lines.append(f"time         {o['seconds']:.0f}s" + (f" ({', '.join(each)})" if len(each) > 1 else ""))
    if job_stores(plan):
        from pretrain.tracking import how_to_see

        lines.append(f"look         {how_to_see(plan['mlflow_uri'])}")
    log("\n".join(lines), flush=True)
