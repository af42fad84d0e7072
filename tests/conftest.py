"""Shared fixtures: small generated corpora, a configured dataset run, one local Ray for the session."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cluster.head import free_port  # noqa: F401  (the tests' free ports: the same helper `up` uses)

if TYPE_CHECKING:
    from data_prep.config import DataPrepConfig

REPO = Path(__file__).resolve().parents[1]
BUCKET = "bertforge-test"  # the bucket of the `s3` fixture

# Started in the background by a shell without job control (`cmd &` in a script), the test processes have Ctrl-C
# ignored, and so would every process they start: the tests that press Ctrl-C in one would see nothing happen. A
# handler of our own is reset to the default in each process they start, which then handles Ctrl-C as a user's does.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray runs its workers at niceness 15. Beside the other test process's training runs (niceness 0) on two cores,
# they got a tenth of a core: a two-node job's worker group took 95 s to start instead of 8 (the clusters the tests
# start, and so their workers, inherit this).
os.environ.setdefault("RAY_worker_niceness", "0")

_WORDS = (
    "river stone cloud market engine garden signal paper window letter forest bridge harbor lantern copper "
    "valley orbit meadow canvas ladder beacon thread marble pocket summit violet ember falcon quarry timber "
    "north quiet bright hollow rapid gentle silver ancient narrow broad steady distant warm frozen hidden "
    "carries follows builds gathers crosses measures holds turns opens finds shapes lifts reads keeps draws"
).split()


def make_document(rng: random.Random, n_sentences: int) -> list[str]:
    """A document of made-up sentences (5-20 words each) from a fixed vocabulary."""
    out = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 20))]
        out.append(" ".join(words).capitalize() + ".")
    return out


def write_txt(path: Path, docs: list[list[str]]) -> Path:
    """Google format: one sentence per line, a blank line between documents."""
    path.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, docs: list[list[str]], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: " ".join(d)}) + "\n" for d in docs), encoding="utf-8")
    return path


def write_small_corpus(root: Path) -> Path:
    """~60 KB: three .txt files and one .jsonl, 120 documents in all, the same bytes every time."""
    rng = random.Random(7)
    root.mkdir(parents=True)
    for i in range(3):
        write_txt(root / f"part{i}.txt", [make_document(rng, rng.randint(2, 12)) for _ in range(30)])
    write_jsonl(root / "extra.jsonl", [make_document(rng, rng.randint(2, 12)) for _ in range(30)])
    return root


# A corpus with hidden structure for the fine-tuning tests: two classes of nouns that pretraining can only tell
# apart by the words they occur with. The task names a noun in a neutral sentence; its test rows use nouns the
# fine-tuning rows never show, so only a model whose pretraining learned the classes can label them.
_CLASSES = {
    "animal": ("otter heron badger lynx moose bison ferret gecko walrus marten ibex tapir".split(),
               "swims eats sleeps hunts grazes nests".split(), "fish grass reeds burrow den pond".split()),
    "tool": ("hammer chisel wrench trowel pliers mallet auger anvil sickle scythe lathe clamp".split(),
             "cuts polishes rusts grips bends sharpens".split(), "metal timber bench bolt plank wire".split()),
}
_NEUTRAL = ("old small large grey brown heavy new quiet".split(), "yard shed road field barn gate".split())


def _neutral_sentence(rng: random.Random, noun: str) -> str:
    adj, place = rng.choice(_NEUTRAL[0]), rng.choice(_NEUTRAL[1])
    return f"The {adj} {noun} was seen near the {place} today."


def write_topic_corpus(root: Path, docs: int = 400, seed: int = 11) -> Path:
    """Documents of sentences where each noun keeps company with its class's verbs and objects (~150 KB)."""
    rng = random.Random(seed)
    out = []
    for _ in range(docs):
        nouns, verbs, objects = _CLASSES[rng.choice(sorted(_CLASSES))]  # a document keeps to one class
        doc = []
        for _ in range(rng.randint(4, 9)):
            a, b = rng.sample(nouns, 2)
            if rng.random() < 0.2:
                doc.append(_neutral_sentence(rng, a))
            else:
                doc.append(f"The {a} {rng.choice(verbs)} the {rng.choice(objects)} with the {b}.")
        out.append(doc)
    root.mkdir(parents=True, exist_ok=True)
    return write_txt(root / "topics.txt", out)


def write_topic_task(root: Path, rows: int = 160, seed: int = 5) -> dict[str, Path]:
    """train/validation/test jsonl: a neutral sentence naming a noun, labelled with its class. Train and
    validation use the first half of each class's nouns; test only the other half."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n, half in (("train", rows, 0), ("validation", rows // 4, 0), ("test", rows // 2, 1)):
        lines = []
        for i in range(n):
            label = sorted(_CLASSES)[i % 2]
            nouns = _CLASSES[label][0]
            noun = rng.choice(nouns[:6] if half == 0 else nouns[6:])
            lines.append(json.dumps({"text": _neutral_sentence(rng, noun), "label": label}))
        files[split] = root / f"{split}.jsonl"
        files[split].write_text("\n".join(lines) + "\n")
    return files


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    return write_small_corpus(tmp_path / "corpus")


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory, ray_local):
    """(config, corpus, dataset dir, summary): the small corpus built in-process once per test module."""
    from data_prep.pipeline import run

    base = tmp_path_factory.mktemp("dataset")
    corpus = write_small_corpus(base / "corpus")
    cfg = small_config(corpus, base / "ds")
    return cfg, corpus, base / "ds", run(cfg)


def with_overrides(tree: dict, over: dict) -> dict:
    """`tree` with `a__b=value` keyword overrides set at tree["a"]["b"] (the test spelling of `a.b=value`)."""
    for key, value in over.items():
        node = tree
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree


def small_config(corpus: Path, out: Path, **over) -> "DataPrepConfig":
    """A config sized for a ~60 KB corpus (a small vocabulary, small shards, several units)."""
    from data_prep.config import DataPrepConfig

    tree = {
        "inputs": [str(corpus)],
        "output": str(out),
        "tokenizer": {"vocab_size": 120, "sample_sentences": 5000, "threads": 1},
        "examples": {"max_seq_length": 64, "max_predictions_per_seq": 10, "dupe_factor": 2, "pool_documents": 20},
        "shards": {"examples_per_shard": 100, "group_bytes": 20000},
        "val_fraction": 0.1,
        "ray": {"num_cpus": 2},
    }
    return DataPrepConfig.model_validate(with_overrides(tree, over))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting one costs ~5 s on 2 cores)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m data_prep ARGS` in a fresh process (its own local Ray)."""
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *args], cwd=cwd or REPO, capture_output=True, text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def train_dataset(tmp_path_factory, request) -> Path:
    """The small corpus built once per session as a dataset for the pretraining tests (713 train examples).

    With BERTFORGE_TRAIN_DATASET=DIR it is built there once and reused by later sessions (e.g. on a GPU
    machine without Ray: build it elsewhere and bring the folder).
    """
    from data_prep.dataset import MANIFEST

    keep = os.environ.get("BERTFORGE_TRAIN_DATASET")
    if keep and (Path(keep) / "ds" / MANIFEST).exists():
        return Path(keep).resolve() / "ds"
    from data_prep.pipeline import run

    request.getfixturevalue("ray_local")
    base = Path(keep).resolve() if keep else tmp_path_factory.mktemp("train-dataset")
    run(small_config(write_small_corpus(base / "corpus"), base / "ds"))
    return base / "ds"


def pretrain_config(dataset: Path, ckdir: Path, **over) -> dict:
    """A config tree for the tiny model on `train_dataset`: ~300 sequences/s on one CPU core."""
    tree = {
        "data": {"dataset": str(dataset), "eval_examples": 30, "num_workers": 0, "streams": 2},
        "model": {"preset": "tiny"},
        "train": {"max_steps": 20, "micro_batch_size": 8, "global_batch_size": 16, "lr": 1e-3,
                  "warmup_steps": 5, "log_every": 5, "eval_every": 10},
        "precision": "fp32",
        "checkpoint": {"dir": str(ckdir), "every_steps": 10},
        "mlflow": {"tracking_uri": f"sqlite:///{ckdir.parent / 'mlflow.db'}"},
    }
    return with_overrides(tree, over)




def pretrain_command(config: Path, *overrides: str, nproc: int = 1) -> list[str]:
    """`python -m pretrain train`, under torchrun when `nproc` > 1."""
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "pretrain", "train", str(config), *overrides]


def pretrain_env() -> dict:
    """Quiet, one thread per rank, and any op DeepSpeed builds kept in one cache with the environment."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=path)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return env


def run_pretrain(config: Path, *overrides: str, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(pretrain_command(config, *overrides, nproc=nproc), cwd=config.parent, env=pretrain_env(),
                          capture_output=True, text=True, timeout=timeout)


def pretrain_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m pretrain ARGS` (export, register, pull, finetune) in a fresh process; `env` adds to
    `pretrain_env()`."""
    return subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=cwd, env={**pretrain_env(), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


REFUSALS = """
import json, os, runpy, signal, sys, traceback

from pretrain.engine import prepare_deepspeed

prepare_deepspeed()  # (as `python -m pretrain` does before DeepSpeed loads)
import deepspeed, mlflow, torch  # noqa: F401,E401  (loaded once, before the forks)
import pretrain.cli, pretrain.finetune, pretrain.train  # noqa: F401,E401

cases, results, each_s = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for i, (cwd, argv) in enumerate(cases):
    out = os.path.join(results, str(i))
    sys.stdout.flush()  # (what is buffered here would be written again by every child)
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the case, in a process of its own: `python -m pretrain ARGV` with the libraries loaded
        signal.alarm(each_s)  # (a case that hangs ends, and is reported as killed by SIGALRM)
        os.chdir(cwd)
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(f"{out}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = ["pretrain", *argv]
        code = 70  # (`python -m pretrain` ends by sys.exit or os._exit: anything else is a bug)
        try:
            runpy.run_module("pretrain", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    with open(f"{out}.code", "w") as f:
        f.write(str(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])))
"""


def pretrain_refusals(*cases: tuple[Path, list[str]], each_s: int = 120) -> list[subprocess.CompletedProcess]:
    """`python -m pretrain ARGV` in directory CWD for each (CWD, ARGV): command lines that stop before training (a
    refused config, model or checkpoint). Each runs in a process of its own forked from one that has loaded torch,
    DeepSpeed and MLflow (once, instead of once a case), on the CPU (CUDA is not forked), for up to `each_s`
    seconds. Each case's exit status (-14: it ran out of time) and output, as a CompletedProcess."""
    import tempfile

    env = {**pretrain_env(), "CUDA_VISIBLE_DEVICES": ""}
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([sys.executable, "-c", REFUSALS, json.dumps([[str(c), a] for c, a in cases]), tmp,
                              str(each_s)], env=env, capture_output=True, text=True, timeout=60 + each_s * len(cases))
        assert run.returncode == 0, run.stderr[-3000:]
        said = [[(Path(tmp) / f"{i}.{name}").read_text() for name in ("code", "out", "err")] for i in range(len(cases))]
    return [subprocess.CompletedProcess(argv, int(code), out, err) for (_, argv), (code, out, err) in zip(cases, said)]


def read_metrics(ckdir: Path) -> dict[int, dict]:
    """metrics.jsonl by step; a step trained twice (after a resume) keeps its latest record."""
    out: dict[int, dict] = {}
    for line in (ckdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:  # a training record starts the step afresh; eval records add to it
            out[rec["step"]] = rec
        else:
            out.setdefault(rec["step"], {}).update(rec)
    return out


def write_pipeline_job(root: Path, storage: str, resources: dict | None = None, steps: int = 10,
                       every: int = 5) -> None:
    """`root/job.yaml`: the small pipeline (data prep -> pretrain `steps` steps, a checkpoint `every` steps ->
    register -> fine-tune) with its corpus, task and stage configs, every output relative (under `storage`)."""
    import yaml

    write_small_corpus(root / "corpus")
    write_topic_task(root / "task", rows=40)
    dp = small_config(Path("corpus"), Path("data/small")).model_dump(mode="json")
    dp["ray"] = {}  # the job's Ray
    (root / "dp.yaml").write_text(yaml.safe_dump(dp))
    pt = pretrain_config(Path("data/small"), Path("checkpoints/small"), train__max_steps=steps,
                         checkpoint__every_steps=every)
    del pt["mlflow"]  # MLFLOW_TRACKING_URI decides
    (root / "pt.yaml").write_text(yaml.safe_dump(pt))
    (root / "ft.yaml").write_text(yaml.safe_dump({
        "model": "models:/unused@x", "task": {"train": "task/train.jsonl", "validation": "task/validation.jsonl",
                                             "test": "task/test.jsonl"},
        "train": {"epochs": 1, "micro_batch_size": 16, "max_seq_length": 32}, "output": "finetuned"}))
    (root / "job.yaml").write_text(yaml.safe_dump({
        "kind": "pipeline", "name": "small", "storage": storage, **({"resources": resources} if resources else {}),
        "stages": {"data_prep": {"config": "dp.yaml"}, "pretrain": {"config": "pt.yaml"},
                   "registry": {"name": "small-bert", "alias": "champion", "pooling": "mean"},
                   "finetune": {"config": "ft.yaml"}}}))


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """An S3 endpoint on loopback and the environment that points boto/s3fs/pyarrow at it."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key="testing", secret="testing")
    deadline = time.monotonic() + 30
    while True:
        try:
            fs.mkdir(BUCKET)
            break
        except Exception:
            if time.monotonic() > deadline or server.poll() is not None:
                raise
            time.sleep(0.3)
    yield env, fs
    server.terminate()
    server.wait(10)
    log.close()


ISOLATED_LOAD = """
import ast, importlib.util, json, sys
from pathlib import Path
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if p not in ("", {repo!r})]
assert importlib.util.find_spec("pretrain") is None, "the project is still importable"
import mlflow
model = mlflow.pyfunc.load_model({model!r})
out = model.predict(["The river carries stone."])
import pretrain
from importlib.metadata import packages_distributions
code = Path(pretrain.__file__).parents[1]
ours = set()  # the top-level modules the project's code imports, and this process has loaded
for f in code.rglob("*.py"):
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            ours |= {{a.name.split(".")[0] for a in node.names}}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            ours.add(node.module.split(".")[0])
ours = {{m for m in ours if m in sys.modules and m not in sys.stdlib_module_names and m not in ("pretrain", "data_prep")}}
names = packages_distributions()
print("RESULT " + json.dumps({{"shape": list(out.shape), "pretrain": pretrain.__file__,
                              "dists": sorted({{d for m in ours for d in names.get(m, [m])}})}}))
"""


def pyfunc_loads_without_the_project_installed(model_dir: Path, cwd: Path, shape: list[int]) -> None:
    """A version is self-contained: its pyfunc loads from the project code it carries, and every distribution that
    code imports is in its requirements.txt (or required by one that is), which is what `mlflow models serve`
    installs."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    code = ISOLATED_LOAD.format(repo=str(REPO), model=str(model_dir))
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert got["shape"] == shape and got["pretrain"].startswith(str(model_dir / "code"))

    def norm(name: str) -> str:
        return name.lower().replace("_", "-")

    listed = [Requirement(line).name for line in map(str.strip, (model_dir / "requirements.txt").read_text().splitlines())
              if line and not line.startswith("-")]
    assert "bertforge" not in map(norm, listed)
    closure, todo = set(), list(listed)
    while todo:
        name = norm(todo.pop())
        if name in closure:
            continue
        closure.add(name)
        try:
            todo += [r.name for r in map(Requirement, requires(name) or [])
                     if r.marker is None or r.marker.evaluate({"extra": ""})]
        except PackageNotFoundError:
            pass
    unlisted = {norm(d) for d in got["dists"]} - closure
    assert not unlisted, f"imported but not required: {sorted(unlisted)}"


# The test files that take longest, longest first (about 1-5 minutes each on 2 busy cores). pytest-xdist hands
# whole files to its processes in collection order (.ci/run keeps that order: --no-loadscope-reorder), so these
# start first and the many short files fill in at the end, instead of a long file starting last beside an idle
# process.
SLOWEST_FIRST = ("test_cluster_jobs.py", "test_distributed.py", "test_finetune.py", "test_train.py",
                 "test_pipeline.py", "test_cluster_pipeline.py", "test_registry.py", "test_registry_server.py",
                 "test_export.py", "test_tracking.py", "test_engine.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: each file's own order is kept)


class RunsCode:
    """What an altered checkpoint or shard could hold: a pickle whose loading runs code (it makes the file `marker`)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)
