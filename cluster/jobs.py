"""Job specs (`configs/jobs/*.yaml`): what to run, with which config, on how many workers, stored where.

A job file is validated whole before anything is submitted or rendered: its own keys, and the config
each stage runs (loaded with its overrides against that stage's schema), so a typo in
`train.max_step` is reported with the job file's name before any cluster resource is requested.

    kind: pretrain                      # data_prep | pretrain | finetune | pipeline
    config: configs/pretrain/quickstart.yaml
    overrides: [train.max_steps=100]    # or a mapping {train.max_steps: 100}
    resources: {num_workers: 2, use_gpu: false, cpus_per_worker: 1}
    max_failures: 2
    storage: /shared/bertforge           # datasets, checkpoints, models: a path every node mounts
    runtime_env: {pip: [], env_vars: {MLFLOW_TRACKING_URI: http://mlflow:5000}}

A pipeline names its stages instead of one config: `stages: {data_prep: {config, overrides},
pretrain: {config, overrides}, registry: {name, alias}, finetune: {config, overrides}}`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from data_prep import storage as store
from data_prep.configfile import ConfigError, Section, load_config
from pretrain.config import RegistrySection

KINDS = ("data_prep", "pretrain", "finetune", "pipeline")


def _schema(kind: str):
    if kind == "data_prep":
        from data_prep.config import DataPrepConfig

        return DataPrepConfig
    if kind == "pretrain":
        from pretrain.config import PretrainConfig

        return PretrainConfig
    from pretrain.config import FinetuneConfig

    return FinetuneConfig


class Resources(Section):
    num_workers: int = Field(1, ge=1, description="training processes (Ray Train workers), one per GPU on GPUs")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float | None = Field(None, ge=0, description="default: 1 with use_gpu, else 0")
    memory_gb_per_worker: float | None = Field(None, gt=0)
    workers_per_node: int = Field(1, ge=1, description="workers that share a node (e.g. 8 on an 8-GPU machine)")
    node_labels: dict[str, str] = Field(default_factory=dict, description="place workers on nodes with these labels")

    @property
    def gpus(self) -> float:
        return self.gpus_per_worker if self.gpus_per_worker is not None else (1.0 if self.use_gpu else 0.0)

    @property
    def nodes(self) -> int:
        return -(-self.num_workers // self.workers_per_node)

    @property
    def memory_bytes(self) -> int | None:
        """What each worker asks Ray for (whole bytes: a node offers workers_per_node times this, exactly)."""
        return math.ceil(self.memory_gb_per_worker * 2**30) if self.memory_gb_per_worker else None

    @model_validator(mode="after")
    def _consistent(self) -> Resources:
        if self.gpus_per_worker and not self.use_gpu:
            raise ValueError("resources.gpus_per_worker is set but resources.use_gpu is false; set use_gpu: true")
        if self.workers_per_node > self.num_workers:
            raise ValueError(f"resources.workers_per_node ({self.workers_per_node}) exceeds resources.num_workers "
                             f"({self.num_workers})")
        return self


# KubeRay takes a RayJob's name as a DNS-1035 label of at most 47 characters (its RayCluster's name adds a suffix)
# and not ending in -NUMBER: a job's submissions are NAME-1, NAME-2, ..., which no other job's name may be (`cluster
# stop bert-2` would stop the second submission of `bert` where a job were named `bert-2`)
NAME = re.compile(r"(?!.*-[0-9]+$)[a-z]([-a-z0-9]{0,45}[a-z0-9])?")
NAME_RULE = ("lowercase letters, digits and '-', starting with a letter, at most 47 (KubeRay's rule for a job), and "
             "not ending in -NUMBER (its submissions are numbered so)")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class RuntimeEnv(Section):
    pip: list[str] = Field(default_factory=list, description="extra pip packages on every node")
    env_vars: dict[str, str] = Field(default_factory=dict)
    image: str | None = Field(None, description="container image for KubeRay (default: bertforge:latest)")

    @field_validator("env_vars")
    @classmethod
    def _env_names(cls, v):
        bad = [k for k in v if not ENV_NAME.fullmatch(k)]
        if bad:  # (a Slurm script exports them: bash refuses such a name)
            raise ValueError(f"{bad[0]!r} is not an environment variable name: use letters, digits and '_', not "
                             "starting with a digit")
        return v


class Stage(Section):
    config: str
    overrides: list[str] | dict[str, Any] = Field(default_factory=list)

    @field_validator("overrides", mode="after")
    @classmethod
    def _as_list(cls, v):
        return [f"{k}={_flow(val)}" for k, val in v.items()] if isinstance(v, dict) else v


class RegisterStage(RegistrySection):
    name: str
    pooling: Literal["cls", "mean"] = Field("cls", description="sentence embedding of the registered pyfunc")


class PipelineStages(Section):
    data_prep: Stage
    pretrain: Stage
    registry: RegisterStage | None = None
    finetune: Stage | None = None


def _flow(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


class JobSpec(Section):
    kind: Literal[KINDS]  # type: ignore[valid-type]
    name: str | None = Field(None, description="job name: a second submission with the same name is not started")
    config: str | None = Field(None, description="the config the job runs (every kind but pipeline)")
    overrides: list[str] | dict[str, Any] = Field(default_factory=list)
    stages: PipelineStages | None = None
    resources: Resources = Resources()
    max_failures: int = Field(0, ge=0, description="worker restarts before the job fails (from the last checkpoint)")
    storage: str = Field("outputs", description="where datasets, checkpoints and fine-tuned models go: a directory "
                                                "every node sees (local disk on one machine; NFS or Lustre on a "
                                                "cluster) or an object-store URL (s3://bucket/prefix, gs://...)")
    runtime_env: RuntimeEnv = RuntimeEnv()

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if v is not None and not NAME.fullmatch(v):
            raise ValueError(f"name {v!r}: use {NAME_RULE}")
        return v

    @field_validator("overrides", mode="after")
    @classmethod
    def _as_list(cls, v):
        return [f"{k}={_flow(val)}" for k, val in v.items()] if isinstance(v, dict) else v

    @field_validator("storage")
    @classmethod
    def _storage(cls, v):
        if not v.strip():
            raise ValueError("storage is empty: give a directory (relative to where the job is submitted) or an "
                             "object-store URL")
        return v.removeprefix("file://").rstrip("/") or "/"

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.kind == "pipeline":
            if self.config is not None:
                raise ValueError("kind: pipeline names its configs under stages (data_prep, pretrain, registry, "
                                 "finetune), not under config")
            if self.stages is None:
                raise ValueError("kind: pipeline needs stages: at least data_prep and pretrain, each with its config "
                                 "(registry and finetune may follow)")
        elif self.config is None or self.stages is not None:
            raise ValueError(f"kind: {self.kind} needs config: PATH (and no stages)")
        if self.kind == "data_prep" and self.resources.num_workers > 1:
            raise ValueError("kind: data_prep spreads its tasks over the cluster by itself; leave "
                             "resources.num_workers at 1 (the driver)")
        if self.kind in ("pretrain", "pipeline") and self.resources.use_gpu and self.resources.gpus != 1:
            raise ValueError(f"resources.gpus_per_worker is {self.resources.gpus:g}, and pretraining runs one process "
                             "per GPU (NCCL refuses two on one GPU; a second GPU would sit idle): leave it out, or set "
                             "it to 1")
        return self

    def stage_list(self) -> list[tuple[str, Stage]]:
        """(kind, stage) of each config-driven stage, in the order they run."""
        if self.kind != "pipeline":
            return [(self.kind, Stage(config=self.config, overrides=self.overrides))]
        s = self.stages
        return [(k, st) for k, st in (("data_prep", s.data_prep), ("pretrain", s.pretrain), ("finetune", s.finetune))
                if st is not None]


def _resolve(path: str, job_file: Path) -> Path:
    """A config path as written (relative to the working directory), else relative to the job file."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else job_file.parent / p


def load_job(path: str | Path, overrides: list[str] | None = None) -> tuple[JobSpec, dict[str, Any]]:
    """(the job spec, {stage kind: its validated config}); every error names the job file and the key, and every
    stage's config is checked (one message says what is wrong in each)."""
    job_file = Path(path)
    spec = load_config(JobSpec, job_file, overrides)
    configs, errors = {}, []
    for kind, stage in spec.stage_list():
        where = f"{job_file}: {'stages.' + kind + '.' if spec.kind == 'pipeline' else ''}config"
        cfg_path = _resolve(stage.config, job_file)
        if not cfg_path.exists() and not Path(stage.config).is_absolute():
            errors.append(f"{where}: '{stage.config}' is neither under the working directory ({Path.cwd()}) nor "
                          f"beside the job file ({job_file.parent.absolute()}): run the command where the path "
                          "starts, or write it absolute")
            continue
        extra = []
        if kind == "finetune" and spec.kind == "pipeline" and spec.stages.registry:  # the model just registered
            reg = spec.stages.registry
            extra = [f"model=models:/{reg.name}" + (f"@{reg.alias}" if reg.alias else "/latest")]
        try:
            configs[kind] = load_config(_schema(kind), cfg_path, extra + list(stage.overrides),
                                        overrides_from=f"the job's {where.rsplit(': ', 1)[1].replace('config', 'overrides')}")
        except ConfigError as e:
            errors.append(f"{where} ({cfg_path}): {e}")
    if errors:
        raise ConfigError("\n".join(errors))
    return spec, configs


# ---------------------------------------------------------------------------------------------------------------
# The resolved job: what a driver runs, with every path absolute, so it runs the same wherever the driver starts.

def job_name(spec: JobSpec, job_file: str | Path) -> str:
    """The spec's name, else the job file's (`pretrain_quickstart.yaml` -> `pretrain-quickstart`)."""
    if spec.name:
        return spec.name
    derived = Path(job_file).stem.replace("_", "-").lower()
    if not NAME.fullmatch(derived):
        raise ConfigError(f"{job_file}: the job takes its file's name, '{derived}', which is not a job name "
                          f"({NAME_RULE}); set name: in the job spec")
    return derived


def _is_url(path: str) -> bool:
    return "://" in path


def _output(path: str, storage: str) -> str:
    """Outputs a job writes with a relative path go under its storage (a directory or an object-store URL)."""
    return path if _is_url(path) or Path(path).is_absolute() else store.join(storage, path)


def _input(path: str, storage: str, cwd: Path) -> str:
    """Inputs with a relative path: under storage when something is there (an earlier job's output), else
    relative to the submitting directory."""
    if _is_url(path) or Path(path).is_absolute():
        return path
    under = store.join(storage, path)
    try:
        found = store.exists(under) if store.is_remote(storage) else Path(under).exists()
    except Exception:  # an object store this machine cannot read (no credentials here): the job's nodes can
        found = True
    return under if found else str(cwd / path)


def _mlflow_uri(given: str, spec: JobSpec, cwd: Path, environ: dict[str, str]) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI (the job's runtime_env first), else the submitting directory's
    sqlite store: the one `python -m pretrain register/pull/finetune` use there by default."""
    uri = given or spec.runtime_env.env_vars.get("MLFLOW_TRACKING_URI") or environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{cwd / 'mlflow.db'}"


def resolve(spec: JobSpec, configs: dict[str, Any], job_file: str | Path, cwd: Path | None = None,
            environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The plan a driver runs: {name, kind, job_file, storage, mlflow_uri, stages: [{kind, config | name/alias}]}.

    Relative outputs (dataset, checkpoints, fine-tuned model) go under `storage`; in a pipeline, pretraining
    reads the dataset the data-prep stage writes, and fine-tuning the model the registry stage registers.
    """
    import os

    cwd = Path(cwd or Path.cwd()).resolve()
    environ = dict(os.environ) if environ is None else environ
    storage = spec.storage if store.is_remote(spec.storage) else str((cwd / spec.storage).resolve())
    uri = _mlflow_uri("", spec, cwd, environ)
    stages: list[dict[str, Any]] = []
    dataset = registered_at = None
    for kind, _ in spec.stage_list():
        tree = configs[kind].model_dump(mode="json")
        if kind == "data_prep":
            tree["inputs"] = [_input(p, storage, cwd) for p in tree["inputs"]]
            tree["output"] = dataset = _output(tree["output"], storage)
            if tree["tokenizer"]["path"]:
                tree["tokenizer"]["path"] = _input(tree["tokenizer"]["path"], storage, cwd)
            tree["ray"]["address"] = ""  # the driver's own cluster
        elif kind == "pretrain":
            tree["data"]["dataset"] = dataset or _input(tree["data"]["dataset"], storage, cwd)
            tree["checkpoint"]["dir"] = _output(tree["checkpoint"]["dir"], storage)
            tree["mlflow"]["tracking_uri"] = uri = _mlflow_uri(tree["mlflow"]["tracking_uri"], spec, cwd, environ)
        else:  # finetune
            for split in ("train", "validation", "test"):
                if tree["task"][split]:
                    tree["task"][split] = _input(tree["task"][split], storage, cwd)
            if not tree["model"].startswith(("models:/", "runs:/")):
                tree["model"] = _input(tree["model"], storage, cwd)
            tree["output"] = _output(tree["output"], storage)
            given = tree["mlflow"]["tracking_uri"]
            tree["mlflow"]["tracking_uri"] = _mlflow_uri(given, spec, cwd, environ)
            if registered_at and tree["mlflow"]["tracking_uri"] != registered_at:
                if given:  # the model it starts from is registered in the pretraining's store, not in this one
                    raise ConfigError(f"{job_file}: stages.finetune config: mlflow.tracking_uri is {given}, but the "
                                      f"registry stage registers the model it fine-tunes in {registered_at} (the "
                                      "pretrain config's store): remove the key from the fine-tune config, or give "
                                      "both configs the same store")
                tree["mlflow"]["tracking_uri"] = registered_at  # (one pipeline, one store)
        stages.append({"kind": kind, "config": _schema(kind).model_validate(tree).model_dump(mode="json")})
        if kind == "pretrain" and spec.kind == "pipeline" and spec.stages.registry:
            reg = spec.stages.registry
            stages.append({"kind": "register", "name": reg.name, "alias": reg.alias, "pooling": reg.pooling})
            registered_at = uri
    return {"name": job_name(spec, job_file), "kind": spec.kind,
            "job_file": str(job_file), "storage": storage, "mlflow_uri": uri, "stages": stages,
            "spec": spec.model_dump(mode="json")}
