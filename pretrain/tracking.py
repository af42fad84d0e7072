"""Rank 0's side effects in one object: console lines, `metrics.jsonl`, and MLflow (the only module importing it).

Other ranks hold the same object with `active=False`, where every method does nothing, so the training
loop never asks which rank it is on. MLflow calls run in a background thread from a queue: a tracking
server that is slow or down costs the training loop nothing. Records are kept, retried with backoff,
and sent when the server is back; the console says when it is unreachable and when it has caught up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from pretrain.config import MlflowConfig

# MLflow says at INFO that it creates a local store's tables, also when they exist: noise in every command's output
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

# MLflow's own HTTP retries back off for minutes; ours (below) keep the buffer and try again.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

METRICS_FILE = "metrics.jsonl"
FINAL_FIGURES = ("step", "loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc", "skipped_steps", "eval/loss",
                 "eval/mlm_acc", "eval/nsp_acc", "eval/perplexity")
MAX_BATCH = 1000      # MLflow's limit of metrics per log_batch call
MAX_PARAMS = 100      # params per log_batch call
MAX_BACKOFF_S = 30.0
# Records go out at most this often, in one batch: a sqlite store costs ~20-50 ms of CPU per call, which
# on a CPU-bound run would otherwise be taken from training at every step.
FLUSH_EVERY_S = 5.0
# MLflow error codes that are answers rather than outages: the record is dropped (or a new run made).
PERMANENT = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "PERMISSION_DENIED", "INVALID_STATE",
             "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS"}


def tracking_uri(cfg: MlflowConfig) -> str:
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def shown(uri: str) -> str:
    """`uri` as messages say it: the password of a database-backed store's URI replaced by `***`."""
    from data_prep.configfile import redact_secrets

    return redact_secrets(uri)


def how_to_see(uri: str) -> str:
    """The command (or address) that shows the runs and models of the store at `uri` in MLflow's UI."""
    if uri.startswith(("http://", "https://")):
        return f"open {shown(uri)} (the tracking server's UI)"
    return f"mlflow ui --backend-store-uri {shown(uri)}"


def experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment `name`, created if missing. In a store on this machine (a sqlite file) a new
    experiment's artifacts go to `mlruns/<name>` beside the file: MLflow's default, ./mlruns, is relative to the
    process that creates the experiment, which for training under Ray is a worker in Ray's session directory."""
    exp = client.get_experiment_by_name(name)
    if exp and exp.lifecycle_stage == "deleted":  # (MLflow finds a deleted one by name, and refuses runs in it)
        raise DeletedExperiment(f"experiment '{name}' in {shown(uri)} is deleted: restore it (mlflow experiments "
                                f"restore --experiment-id {exp.experiment_id}) or set mlflow.experiment to another "
                                "name")
    if exp:
        return exp.experiment_id
    db = _sqlite_file(uri)
    location = (db.resolve().parent / "mlruns" / name.replace("/", "_")).as_uri() if db else None
    return client.create_experiment(name, artifact_location=location)


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` store (None for other stores)."""
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0]) if uri.startswith("sqlite:///") else None


def check_store(uri: str) -> None:
    """A file store (a directory, file://) is refused by MLflow 3 unless MLFLOW_ALLOW_FILE_STORE is set: said here
    in a line, not in a traceback from deep inside MLflow."""
    file_store = uri.startswith("file:") or ("://" not in uri and uri not in ("databricks", "databricks-uc", "uc"))
    if not file_store or os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1"):
        return
    if "://" not in uri and Path(uri).is_file() and Path(uri).read_bytes()[:15] == b"SQLite format 3":
        raise RegistryError(f"tracking URI {shown(uri)} is a path, which MLflow reads as a file store; that file is a "
                            f"sqlite database: write it as sqlite:///{Path(uri).absolute()}")
    raise RegistryError(f"tracking URI {shown(uri)} is an MLflow file store, which MLflow refuses by default (its file "
                        "backend is in maintenance mode): use a database store such as sqlite:///PATH/mlflow.db "
                        "(`mlflow migrate-filestore` converts one), or set MLFLOW_ALLOW_FILE_STORE=true")


def check_source(uri: str, model_uri: str | None = None) -> None:
    """Before reading from the store: a local one must exist (MLflow would create an empty one and then report
    the model missing), and a `models:/` URI must name a version."""
    check_store(uri)
    db = _sqlite_file(uri)
    if db and not db.is_file():
        raise RegistryError(f"there is no MLflow store at {db}: run from the directory that holds your mlflow.db, "
                            "or point at your store (MLFLOW_TRACKING_URI, --tracking-uri, or a config's "
                            "mlflow.tracking_uri)")
    body = (model_uri or "").removeprefix("models:/")
    if model_uri and model_uri.startswith("models:/") and "@" not in body and "/" not in body.strip("/"):
        raise RegistryError(f"{model_uri} names no version: use models:/{body}@ALIAS or models:/{body}/VERSION")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class Tracker:
    """Console, metrics file and MLflow run of a training job; a no-op when `active` is false."""

    def __init__(self, active: bool, cfg: MlflowConfig, out_dir: str | Path):
        self.active = active
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.uri = tracking_uri(cfg)
        self.run_id: str | None = None
        self._queue: queue.Queue = queue.Queue()
        self._pending: list[tuple[str, Any]] = []
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._down_since: float | None = None
        self._started = threading.Event()
        self._untracked = False  # MLflow refused to start a run: nothing more is sent
        self._whole: list[tuple[str, Any]] = []
        self._metrics_file = None  # opened at the first record: a run whose setup fails leaves no directory behind

    def _metrics(self):
        if self._metrics_file is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._metrics_file = open(self.out_dir / METRICS_FILE, "a", buffering=1, encoding="utf-8")
        return self._metrics_file

    # -- console --------------------------------------------------------------------------------------
    def print(self, line: str) -> None:
        if self.active:
            print(line, flush=True)

    def warn(self, line: str) -> None:
        if self.active:
            print(f"warning: {line}", file=sys.stderr, flush=True)

    def fresh_start(self) -> None:
        """A run starting at step 0 begins a new metrics.jsonl (one left by deleted checkpoints is set aside)."""
        path = self.out_dir / METRICS_FILE
        if self.active and path.is_file() and path.stat().st_size:
            if self._metrics_file:
                self._metrics_file.close()
                self._metrics_file = None
            path.replace(path.with_suffix(f".{int(time.time())}.jsonl"))

    def save_inputs(self, config: dict, manifest: dict, tokenizer: Path) -> dict[str, Path]:
        """Keep the effective config, the dataset manifest and the tokenizer with the checkpoints, so the
        directory is self-contained (export needs nothing else); returns {artifact dir: file}."""
        if not self.active:
            return {}
        import shutil

        import yaml

        self.out_dir.mkdir(parents=True, exist_ok=True)
        config_file, manifest_file = self.out_dir / "config.yaml", self.out_dir / "manifest.json"
        tok_file = self.out_dir / "tokenizer" / tokenizer.name
        from data_prep.shards import write_whole

        # Each replaced whole: export reads them beside committed checkpoints.
        write_whole(config_file, lambda p: p.write_text(yaml.safe_dump(config, sort_keys=False)))
        write_whole(manifest_file, lambda p: p.write_text(json.dumps(manifest, indent=1)))
        if tokenizer.resolve() != tok_file.resolve():
            tok_file.parent.mkdir(exist_ok=True)
            write_whole(tok_file, lambda p: shutil.copyfile(tokenizer, p))
        return {"config": config_file, "dataset": manifest_file, "tokenizer": tok_file}

    def save_weights(self, weights: dict, name: str) -> None:
        if self.active:
            from safetensors.torch import save_file

            save_file(weights, str(self.out_dir / name))

    def register(self, source: str | Path, name: str, alias: str | None, pooling: str) -> None:
        """Register a checkpoint (a path or an uploaded checkpoint's URL) from inside training; a failure is
        reported, never fatal to the run."""
        if not self.active:
            return
        try:
            v = register_checkpoint(source, name, alias, self.uri, pooling)
        except Exception as e:  # noqa: BLE001 (a store that is down or refusing must not end training)
            self.warn(f"registering {source} failed ({_briefly(e)}); "
                      f"complete it later: python -m pretrain register --checkpoint {source} --name {name}")
            return
        self.print(f"registered {alias_words(v, alias)}")

    # -- MLflow ---------------------------------------------------------------------------------------
    def start(self, run_id: str | None, params: dict[str, Any], tags: dict[str, str],
              artifacts: dict[str, Path], changed: dict[str, Any] | None = None, wait_s: float = 15.0) -> None:
        """Continue MLflow run `run_id` (a resumed job) or create one; waits up to `wait_s` for its id.

        A new run gets `params` (the whole config) and the input `artifacts`; a resumed one has them already and
        gets `changed`, the settings the resume changed under names of their own (MLflow keeps a param's first
        value). Should the resumed run be refused (another store), the new run gets the whole record."""
        if not self.active or not self.cfg.enabled:
            return
        self.run_id = run_id
        self._queue.put(("run", tags))
        self._whole = self._records(params, artifacts)
        for record in self._whole if run_id is None else self._records(changed or {}, {}):
            self._queue.put(record)
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()
        self._started.wait(wait_s)
        if self.run_id is None and not self._untracked:
            self.warn(f"MLflow at {shown(self.uri)} did not answer within {wait_s:.0f} s; training goes on "
                      "and its records are kept until the server answers")

    @staticmethod
    def _records(params: dict[str, Any], artifacts: dict[str, Path]) -> list[tuple[str, Any]]:
        items = sorted((k, str(v)[:6000]) for k, v in params.items())
        return ([("params", items[i:i + MAX_PARAMS]) for i in range(0, len(items), MAX_PARAMS)]
                + [("artifact", (dest, str(path))) for dest, path in artifacts.items()])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record one step's metrics: a line in metrics.jsonl now, MLflow in the background."""
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._metrics().write(json.dumps({"step": step, **clean}) + "\n")
        if self.cfg.enabled and not self._untracked:
            self._queue.put(("metrics", (step, int(time.time() * 1000), clean)))

    def close(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None:
        """Send what is buffered (waiting up to `timeout_s`), then mark the run `status`."""
        if not self.active:
            return
        if self._thread is not None:
            self._queue.put(("end", status))
            self._closing.set()
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self.warn(f"MLflow did not take the last records within {timeout_s:.0f} s; metrics.jsonl has them all")
        if self._metrics_file:
            self._metrics_file.close()

    def _work(self) -> None:
        try:
            self._loop()
        except Exception as e:  # noqa: BLE001 (tracking must never take training down with it)
            self.warn(f"MLflow tracking stopped ({type(e).__name__}: {e}); metrics.jsonl keeps every record")
            self._started.set()

    def _loop(self) -> None:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        backoff = 1.0
        while True:
            if not self._pending:
                self._pending.append(self._queue.get())
            while True:  # take everything queued so far, so a backlog goes out in big batches
                try:
                    self._pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                done = self._send(client, Metric, Param, RunTag)
            except Exception as e:  # the server is down, slow or refusing: keep the records, try again
                if getattr(e, "error_code", None) in PERMANENT:  # an answer, not an outage: retrying cannot help
                    if self._refused(e):
                        return
                    continue
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    self.warn(f"MLflow at {shown(self.uri)} is unreachable ({_briefly(e)}); records are kept and "
                              "retried")
                self._started.set()  # do not hold up the start of training
                time.sleep(min(backoff, 2.0) if self._closing.is_set() else backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
                continue
            backoff = 1.0
            if self._down_since is not None:
                self.print(f"MLflow is reachable again after {time.monotonic() - self._down_since:.0f} s; "
                           "buffered records sent")
                self._down_since = None
            if done:
                return
            self._closing.wait(FLUSH_EVERY_S)  # returns at once when the run ends

    def _refused(self, e: Exception) -> bool:
        """Skip the record MLflow refused (or, for a run it cannot continue, start a new one); True when tracking
        ends here: no run could be started, or the refused record was the run's end."""
        kind = self._pending[0][0]
        first = _said(e)[:300]
        if kind == "run" and self.run_id is not None:
            self.warn(f"MLflow cannot continue run {self.run_id} ({first}); recording to a new run")
            self.run_id = None
            self._pending[1:1] = self._whole  # (the config and inputs a new run starts with)
            return False
        if kind == "run":  # no run to record into: every later record would be refused too
            self.warn(f"MLflow refused to start a run: {first}. This run is not recorded in MLflow; metrics.jsonl has "
                      "every record")
            self._pending.clear()
            self._untracked = True
            self._started.set()
            return True
        self.warn(f"MLflow refused a {kind} record ({first}); it is skipped (metrics.jsonl has it)")
        self._pending.pop(0)
        return kind == "end"

    def _send(self, client, Metric, Param, RunTag) -> bool:  # noqa: N803 (MLflow's classes, imported late)
        """Send the pending records in order; returns True once the run has been ended."""
        while self._pending:
            kind, body = self._pending[0]
            if kind == "run":
                self._start_run(client, body, RunTag)
            elif kind == "params":
                client.log_batch(self.run_id, params=[Param(k, v) for k, v in body])
            elif kind == "artifact":
                if Path(body[1]).is_file():
                    client.log_artifact(self.run_id, body[1], artifact_path=body[0])
                else:  # removed meanwhile (a cluster worker's staging copy, after a long outage): not an outage
                    self.warn(f"{body[1]} was removed before MLflow took it; the run is recorded without it")
            elif kind == "metrics":
                batch, n = [], 0
                for k2, rec in self._pending:
                    if k2 != "metrics" or (batch and len(batch) + len(rec[2]) > MAX_BATCH):
                        break
                    step, ts, values = rec
                    batch += [Metric(k, v, ts, step) for k, v in values.items()]
                    n += 1
                client.log_batch(self.run_id, metrics=batch)
                del self._pending[:n]  # only once they are sent
                continue
            else:
                client.set_terminated(self.run_id, status=body)
                self._pending.pop(0)
                return True
            self._pending.pop(0)
        return False

    def _start_run(self, client, tags: dict[str, str], RunTag) -> None:
        if self.run_id is None:
            exp_id = experiment_id(client, self.cfg.experiment, self.uri)
            self.run_id = client.create_run(exp_id, run_name=self.cfg.run_name, tags=tags).info.run_id
        else:
            client.update_run(self.run_id, status="RUNNING")
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self._started.set()


# -- Model registry ------------------------------------------------------------------------------------

REGISTERED_DIR = "registered-model"
PYFUNC_ADVICE = ("An input example was not provided",)
# What a registered version's pyfunc imports when it loads and predicts, beyond the project's own packages
# (which travel with the version as its code): the requirements `mlflow models serve` installs for it.
PYFUNC_REQUIREMENTS = ("mlflow", "torch", "numpy", "sentencepiece", "safetensors", "pydantic", "pyyaml", "fsspec",
                       "msgpack", "sentencex", "tqdm", "backports.zstd;python_version<'3.14'", "pandas")
PROJECT_PACKAGES = ("pretrain", "data_prep")


class RegistryError(Exception):
    """A registration or pull that cannot be done; the message says what to do."""


class DeletedExperiment(RegistryError):
    """The experiment a run or registration needs is deleted: an answer, not an outage (retrying cannot help)."""

    error_code = "INVALID_STATE"


def _said(e: BaseException) -> str:
    """An error's own words, first line (an MlflowException's message without the quotes its str adds)."""
    text = str(getattr(e, "message", None) or e)
    return text.splitlines()[0] if text.strip() else repr(e)


def _remote_files(client, run_id: str, path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            out.update(_remote_files(client, run_id, item.path))
        else:  # (MLflow's artifact server lists an empty file, e.g. a package's __init__.py, with no size)
            out[item.path] = item.file_size or 0
    return out


def _missing(found: dict[str, int], expected: dict[str, int]) -> list[str]:
    """Expected files the store lacks or holds at another size (MLflow may add files of its own)."""
    return sorted(k for k, size in expected.items() if found.get(k) != size)


def _embedder_signature(pooling: str):
    """Texts in, (N, H) float32 out; `pooling` may be chosen per call (`params={"pooling": "mean"}`)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([ColSpec("string")]),
                          outputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1))]),
                          params=ParamSchema([ParamSpec("pooling", "string", pooling)]))


def _classifier_signature(config: dict):
    """One text column (or the task's two for pair models) in; `label` and `score` out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    pair = config["task"].get("text_pair_field")
    inputs = Schema([ColSpec("string", config["task"]["text_field"]), ColSpec("string", pair)]) if pair else \
        Schema([ColSpec("string")])
    kind = "long" if all(isinstance(v, int) and not isinstance(v, bool) for v in config["labels"]) else "string"
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(kind, "label"), ColSpec("double", "score")]))


def _pyfunc(model_dir: Path, pooling: str) -> tuple[Path, dict, Any, dict[str, str]]:
    """(code file, model_config, signature, extra version tags) of the pyfunc for this kind of model directory."""
    from pretrain.export import CLASSIFIER_FORMAT

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("format", {}).get("name") == CLASSIFIER_FORMAT["name"]:
        training = json.loads((model_dir / "training.json").read_text())
        source = training.get("source_model") or {}
        tags = {"kind": "classifier", "labels": json.dumps(config["labels"])[:5000],
                **({"init": str(training["init"])} if training.get("init") else {}),  # (random: a baseline)
                **{f"source_model_{k}": str(v) for k, v in source.items() if v}}
        return Path(__file__).with_name("classifier.py"), {}, _classifier_signature(config), tags
    return (Path(__file__).with_name("embedder.py"), {"pooling": pooling}, _embedder_signature(pooling),
            {"kind": "encoder", "pooling": pooling})


@contextlib.contextmanager
def _progress_bar(shown: bool) -> Iterator[None]:
    """MLflow's artifact progress bar on or off for the block (MLflow reads the variable at each call)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "true" if shown else "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _project_code(into: Path) -> list[str]:
    """Copies of the project's packages (without bytecode caches) for a version's code: its pyfunc then loads
    where the project is not installed, e.g. in the environment `mlflow models serve` builds."""
    import shutil

    here = Path(__file__).resolve().parents[1]
    for package in PROJECT_PACKAGES:
        shutil.copytree(here / package, into / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return [str(into / package) for package in PROJECT_PACKAGES]


def _pyfunc_requirements() -> list[str]:
    """PYFUNC_REQUIREMENTS at the versions installed here (the versions the model was registered and checked
    with; a local build tag such as torch's +cpu is left to the installer)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for requirement in PYFUNC_REQUIREMENTS:
        dist, marker = (requirement.split(";", 1) + [""])[:2]
        try:
            out.append(f"{dist}=={version(dist).split('+')[0]}" + (f";{marker}" if marker else ""))
        except PackageNotFoundError:
            out.append(requirement)
    return out


def register(model_dir: str | Path, name: str, alias: str | None, uri: str, pooling: str = "cls") -> dict:
    """Upload a model directory as an MLflow pyfunc model, verify it, register it, then set `alias`.

    A pretrained encoder's pyfunc returns sentence embeddings (`pooling`); a fine-tuned classifier's returns
    labels and their probabilities.

    In that order, so a failure part way never leaves a version that points at missing files; rerunning
    reuses what was uploaded and the version already registered for it. Returns {name, version, source}.
    """
    check_store(uri)
    if not Path(model_dir).is_dir():
        raise RegistryError(f"{model_dir} does not exist: give a model directory that `pretrain export` or `pretrain "
                            "finetune` (OUTPUT/model) wrote, or --checkpoint for a checkpoint")
    missing = [n for n in ("config.json", "training.json", "dataset.json") if not Path(model_dir, n).is_file()]
    if missing:
        raise RegistryError(f"{model_dir} is not a model directory ({', '.join(missing)} missing): give one that "
                            "`pretrain export` or `pretrain finetune` (OUTPUT/model) wrote, or --checkpoint for a "
                            "checkpoint")
    stage = ["reaching the store"]
    try:
        return _register(Path(model_dir), name, alias, uri, pooling, stage)
    except RegistryError:
        raise
    except Exception as e:  # noqa: BLE001 (MLflow and HTTP errors of every kind: the store failed mid-way)
        raise RegistryError(f"MLflow at {shown(uri)} failed while {stage[0]} ({_briefly(e)}); nothing points at an "
                            "incomplete upload, and registering again completes it (what was uploaded is "
                            "reused)") from None


def _briefly(e: BaseException) -> str:
    """An error in a few words: the operating system's reason inside an HTTP client's long retry message (e.g.
    `[Errno 111] Connection refused`), else its first line."""
    text = str(e)
    reason = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if reason:
        return f"{type(e).__name__}: {reason.group(0).strip()}"
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text.strip() else ''}"


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
        return True
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def _register(model_dir: Path, name: str, alias: str | None, uri: str, pooling: str, stage: list[str]) -> dict:
    import mlflow
    from mlflow.tracking import MlflowClient

    training = json.loads((model_dir / "training.json").read_text())
    dataset = json.loads((model_dir / "dataset.json").read_text())
    client = MlflowClient(uri, registry_uri=uri)
    run_id = training["mlflow_run_id"]
    run_tags = {"dataset_id": dataset["dataset_id"]}
    if run_id is not None and not _run_exists(client, run_id):  # trained with another store: say which run it was
        run_tags["trained_in_run"], run_id = run_id, None
    if run_id is None:  # trained without tracking (or elsewhere): a run of its own holds the files, the same run
        # each time these very files are registered (found by their digest), so registering again reuses the version
        from pretrain.export import CHECKSUMS

        exp_id = experiment_id(client, training["config"]["mlflow"]["experiment"], uri)
        run_tags["model_digest"] = hashlib.sha256((model_dir / CHECKSUMS).read_bytes()).hexdigest()
        held = client.search_runs([exp_id], filter_string=f"tags.model_digest = '{run_tags['model_digest']}'",
                                  order_by=["attributes.start_time ASC"], max_results=1)  # (the first, always)
        if held:
            run_id = held[0].info.run_id
        else:
            run_id = client.create_run(exp_id, run_name=f"register-{name}", tags=run_tags).info.run_id
            client.set_terminated(run_id)
    path = registered_path(training["step"], pooling, json.loads((model_dir / "config.json").read_text()))

    code, model_config, signature, kind_tags = _pyfunc(model_dir, pooling)
    source = _version_source(client, run_id, path)
    if not [v for v in client.search_model_versions(f"run_id='{run_id}'") if v.source == source]:
        _upload(client, run_id, path, uri, model_dir, code, model_config, signature, stage)
    # else: a version holds these files already; they stay as they are (this project's code or its requirements
    # may have changed since, and a registered version's files must not)

    stage[0] = "registering the version"  # 3. register (once per source)
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description=f"BERT {kind_tags['kind']} trained with bertforge")
    versions = [v for v in client.search_model_versions(f"name='{name}'") if v.source == source]
    metrics = training["metrics"]
    tags = {"dataset_id": dataset["dataset_id"], "step": str(training["step"]), "source_run": run_id, **kind_tags,
            **{k: f"{v:.6g}" for k, v in metrics.items() if k.startswith(("eval/", "val_", "test_"))}}
    version = versions[0] if versions else client.create_model_version(name, source, run_id=run_id, tags=tags)
    stage[0] = "setting the alias"
    moved = _move_alias(client, name, alias, version.version) if alias else None  # 4. the alias moves last
    return {"name": name, "version": str(version.version), "source": source, "run_id": run_id,
            "reused": bool(versions), "alias_was": moved}


def _move_alias(client, name: str, alias: str, version) -> str | None:
    """Point `alias` at `version`; returns the other version it pointed at before (None: none, or this one)."""
    import mlflow

    try:
        before = str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        before = None
    client.set_registered_model_alias(name, alias, version)
    return before if before != str(version) else None


def alias_words(v: dict, alias: str | None) -> str:
    """How registration's answer `v` is told: "NAME version N" with what became of `alias`."""
    said = f"{v['name']} version {v['version']}"
    if alias and v.get("alias_was"):
        said += f" (alias '{alias}' moved from version {v['alias_was']} to {v['version']})"
    elif alias:
        said += f" (alias '{alias}')"
    return said


def _upload(client, run_id: str, path: str, uri: str, model_dir: Path, code: Path, model_config: dict, signature,
            stage: list[str]) -> None:
    """Build the MLflow model locally, upload what the store lacks of it to `path` in the run, verify."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:  # 1. the MLflow model, built locally, uploaded whole
        local = Path(tmp) / "model"
        with warnings.catch_warnings(record=True) as said, _progress_bar(False):  # (a local copy: no bar)
            mlflow.pyfunc.save_model(str(local), python_model=str(code), artifacts={"model_dir": str(model_dir)},
                                     model_config=model_config, signature=signature,
                                     code_paths=_project_code(Path(tmp) / "code"),
                                     pip_requirements=_pyfunc_requirements())
        for w in said:  # all but MLflow's advice for pyfuncs written otherwise (ours comes with its signature)
            if not any(advice in str(w.message) for advice in PYFUNC_ADVICE):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        expected = {f"{path}/{p.relative_to(local)}": p.stat().st_size for p in local.rglob("*") if p.is_file()}
        stage[0] = "uploading the model"
        if _missing(_remote_files(client, run_id, path), expected):
            client.log_artifacts(run_id, str(local), artifact_path=path)
    stage[0] = "verifying the upload"
    missing = _missing(_remote_files(client, run_id, path), expected)  # 2. verify what the store holds
    if missing:
        raise RegistryError(f"the upload to {shown(uri)} is incomplete ({', '.join(missing[:3])}); rerun to complete "
                            "it")


PULLED = "pulled.json"  # in a pulled directory: the URI it was pulled as, and the registered name and version


def pull(model_uri: str, out: str | Path, uri: str) -> Path:
    """Download `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/ID/path` to `out` and verify it.

    `out` is an MLflow model directory (`mlflow.pyfunc.load_model(out)` works); `model_files(out)` is
    the exported model directory inside it. `out` appears only once complete and verified.
    """
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    from pretrain.export import publish, verify

    check_source(uri, model_uri)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        source = model_uri
        v = resolve_model_uri(model_uri, uri) if model_uri.startswith(("models:/", "runs:/")) else {}
        if model_uri.startswith("models:/"):  # resolved here: MLflow would use the process-wide registry URI
            source = MlflowClient(uri, registry_uri=uri).get_model_version_download_uri(v["name"], v["version"])
        with _progress_bar(sys.stderr.isatty()):  # for a person at a terminal, not in a job's log
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=uri))
    except Exception as e:  # noqa: BLE001 (MLflow, HTTP and file errors alike: nothing half-pulled stays)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, RegistryError):  # (resolving the name said what is wrong)
            raise
        missing = _run_holds(uri, model_uri) if model_uri.startswith("runs:/") else ""
        raise RegistryError(f"cannot download {model_uri} from {shown(uri)}: {missing or _said(e)}") from None
    try:  # (a directory's URI is downloaded into tmp/<its name>)
        problems = verify(model_files(got))
    except Exception as e:  # noqa: BLE001 (not our model, or unreadable: nothing half-pulled stays)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, RegistryError):
            raise
        raise RegistryError(f"{model_uri} cannot be checked ({type(e).__name__}: {e}); pull it again") from None
    if problems:
        no_model = not (model_files(got) / "config.json").is_file()  # a folder that holds none (runs:/ID/a-parent)
        inside = sorted(p.name for p in got.iterdir())[:5] if got.is_dir() else []
        shutil.rmtree(tmp, ignore_errors=True)
        if no_model:
            raise RegistryError(f"{model_uri} holds no model (it holds {', '.join(inside) or 'nothing'}): name the "
                                "model's own folder, e.g. the one `pretrain register` logged (MLmodel inside)")
        raise RegistryError(f"{model_uri} failed verification ({'; '.join(problems[:3])}); pull it again")
    # What was pulled, for whatever reads the directory later (a fine-tune tags its run with it)
    (got / PULLED).write_text(json.dumps({k: v.get(k) for k in ("uri", "name", "version", "run_id")} if v else
                                         {"uri": model_uri}, indent=1))
    published = publish(got, out)
    shutil.rmtree(tmp, ignore_errors=True)  # (the folder around `got`, when there is one)
    return published


def _run_holds(uri: str, model_uri: str) -> str:
    """For a `runs:/ID/PATH` that could not be downloaded because the run has no PATH: that, and what the run holds
    where PATH was looked for (empty where PATH is there after all, or the store cannot say: the run is unknown,
    the store is down)."""
    from mlflow.tracking import MlflowClient

    run_id, _, path = model_uri.removeprefix("runs:/").partition("/")
    if not path.strip("/"):
        return ""  # (the whole run: its files are there, the download failed for another reason)
    parent, _, leaf = path.strip("/").rpartition("/")
    try:
        held = MlflowClient(uri).list_artifacts(run_id, parent or None)
    except Exception:  # noqa: BLE001 (the download's own error says it)
        return ""
    if parent and not held:  # (no such folder either: said of the first missing part)
        return _run_holds(uri, f"runs:/{run_id}/{parent}")
    names = sorted(Path(f.path).name + ("/" if f.is_dir else "") for f in held)
    if leaf in {n.rstrip("/") for n in names}:
        return ""
    where = f"in {parent}/" if parent else "at its top"
    return (f"run {run_id} holds no '{path.strip('/')}' ({where} it holds {', '.join(names[:10]) or 'nothing'}): "
            "name the model's folder, e.g. the one `pretrain register` logged")


def resolve_model_uri(model_uri: str, uri: str) -> dict:
    """{uri, pinned, name, version, run_id} of a `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/ID/PATH`.

    `pinned` names the exact version, so what is downloaded is what was resolved even if the alias moves.
    """
    from mlflow.tracking import MlflowClient

    check_source(uri, model_uri)
    info = {"uri": model_uri, "pinned": model_uri, "name": None, "version": None, "run_id": None}
    if model_uri.startswith("runs:/"):
        info["run_id"] = model_uri.removeprefix("runs:/").split("/")[0]
        return info
    body = model_uri.removeprefix("models:/")
    client = MlflowClient(uri, registry_uri=uri)
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            v = client.get_model_version_by_alias(name, alias)
        else:
            name, version = body.split("/", 1)
            if version == "latest":
                found = client.search_model_versions(f"name='{name}'")
                if not found:
                    raise RegistryError(f"{model_uri}: model '{name}' has no versions at {shown(uri)}")
                v = max(found, key=lambda m: int(m.version))
            else:
                v = client.get_model_version(name, version)
    except RegistryError:
        raise
    except Exception as e:  # noqa: BLE001 (an unknown name/alias/version, a store that is down)
        # (the store answered that it has no such thing: it can say what it has; one that did not answer is not
        # asked again)
        hint = _what_is_there(client, body) if getattr(e, "error_code", None) in (
            "RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") else ""
        raise RegistryError(f"cannot resolve {model_uri} at {shown(uri)}: {_said(e)}{hint}") from None
    info.update(pinned=f"models:/{v.name}/{v.version}", name=v.name, version=str(v.version), run_id=v.run_id)
    return info


def _what_is_there(client, body: str) -> str:
    """The aliases and versions the store holds for the model `body` names (NAME@ALIAS, NAME/VERSION), as a hint
    after an error; empty where there is nothing to tell (or the store cannot say)."""
    name = body.split("@", 1)[0].split("/", 1)[0]
    try:
        aliases = client.get_registered_model(name).aliases or {}
        versions = sorted((int(v.version) for v in client.search_model_versions(f"name='{name}'")))
    except Exception:  # noqa: BLE001 (no such model: the names there are; the store is down: the error says enough)
        try:
            names = sorted(m.name for m in client.search_registered_models(max_results=100))
        except Exception:  # noqa: BLE001
            return ""
        return f" (the store has no model '{name}'; its models: {', '.join(names[:10]) or 'none'}" \
               f"{', ...' if len(names) > 10 else ''})"
    said = ", ".join(f"@{a} (version {v})" for a, v in sorted(aliases.items())) or "none"
    return f" ({name} has aliases: {said}; versions: {', '.join(map(str, versions)) or 'none'})"


def model_files(path: str | Path) -> Path:
    """The exported model directory inside a pulled MLflow model (or `path` itself when it is one)."""
    import yaml

    p = Path(path)
    if not (p / "MLmodel").is_file():
        return p
    try:
        flavor = yaml.safe_load((p / "MLmodel").read_text())["flavors"]["python_function"]
        return p / flavor["artifacts"]["model_dir"]["path"]
    except (KeyError, TypeError, yaml.YAMLError):
        raise RegistryError(f"{p} is an MLflow model, but not one registered by `pretrain register`") from None


def run_checkpoint_dir(run_id: str, uri: str) -> str:
    """The checkpoint.dir a `pretrain train` run recorded among its params (the newest, where it was resumed from
    another directory)."""
    from mlflow.tracking import MlflowClient

    check_source(uri)
    try:
        params = MlflowClient(uri).get_run(run_id).data.params
        moved = sorted(k for k in params if k.startswith("resumed.step-") and k.endswith(".checkpoint.dir"))
        return params[moved[-1] if moved else "checkpoint.dir"]  # (a resume from where the checkpoints were moved)
    except Exception as e:  # noqa: BLE001 (unknown run, a run of something else, a store that is down)
        raise RegistryError(f"cannot find the checkpoint.dir of run {run_id} at {shown(uri)}: {e}") from None


def register_checkpoint(source: str | Path, name: str, alias: str | None, uri: str, pooling: str = "cls") -> dict:
    """Export a committed checkpoint (a path or an uploaded checkpoint's URL, or a checkpoint.dir: its newest) to
    a scratch directory next to it, register that, remove the scratch; where a version of `name` already holds
    that checkpoint (same run, step and pooling), only move the alias. The version's dict names the checkpoint
    (`checkpoint`)."""
    import shutil

    from pretrain.export import checkpoint_at, checkpoint_record, export_step

    where, record = checkpoint_record(source)
    found = _registered(record, name, alias, uri, pooling)
    if found:
        return {**found, "checkpoint": where}
    with checkpoint_at(where) as (step_dir, where):
        scratch = step_dir.parent / f".export-{step_dir.name}"  # its model/ becomes the version's artifacts/model
        try:
            return {**register(export_step(step_dir, where, scratch / "model"), name, alias, uri, pooling),
                    "checkpoint": where}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _version_source(client, run_id: str, path: str) -> str:
    """The source a version registered from `path` in run `run_id` records (how versions are matched to files)."""
    return f"{client.get_run(run_id).info.artifact_uri}/{path}"


def registered_path(step: int, pooling: str, config: dict | None = None) -> str:
    """Where in its run a version's files go: one place per checkpoint step and, for an encoder, per pooling
    (uploading a second pooling over the first would change a version already registered)."""
    from pretrain.export import CLASSIFIER_FORMAT

    classifier = (config or {}).get("format", {}).get("name") == CLASSIFIER_FORMAT["name"]
    return f"{REGISTERED_DIR}/step-{step:08d}" + ("" if classifier or pooling == "cls" else f"-{pooling}")


def _registered(record: dict, name: str, alias: str | None, uri: str, pooling: str) -> dict | None:
    """`register`'s answer for the version of `name` registered from the checkpoint whose client record this is,
    its alias moved; None when there is none (or the store does not answer: `register` then says why)."""
    from mlflow.tracking import MlflowClient

    run_id = record.get("mlflow_run_id")
    if not run_id:
        return None
    try:
        client = MlflowClient(uri, registry_uri=uri)
        source = _version_source(client, run_id, registered_path(record["step"], pooling))
        versions = [v for v in client.search_model_versions(f"name='{name}'")
                    if v.source == source and v.tags.get("pooling") == pooling]
        if not versions:
            return None
        moved = _move_alias(client, name, alias, versions[0].version) if alias else None
    except Exception:  # noqa: BLE001 (a store that is down: the full path reports it)
        return None
    return {"name": name, "version": str(versions[0].version), "source": source, "run_id": run_id, "reused": True,
            "alias_was": moved}


def final_figures(metrics_text: str) -> dict[str, float]:
    """The last value of each of FINAL_FIGURES in a metrics.jsonl's text (the last training and eval records)."""
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short (a full disk, a crash mid-write): the others still count
            continue
        out.update({k: v for k, v in rec.items() if k in FINAL_FIGURES})
    return out
