"""`python -m pretrain train` as a user runs it: one CPU process, the real DeepSpeed engine, a real MLflow store.

Covers learning, checkpoints and resume, refusals, the numerics guard, SIGTERM, damaged checkpoints,
tracking, and config errors. Runs on 2 ranks live in test_distributed.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    pretrain_cli,
    pretrain_command,
    pretrain_config,
    pretrain_env,
    pretrain_refusals,
    read_metrics,
    run_pretrain,
)

pytestmark = pytest.mark.slow


def write_config(tmp: Path, dataset: Path, **over) -> Path:
    path = tmp / "pretrain.yaml"
    path.write_text(yaml.safe_dump(pretrain_config(dataset, tmp / "ck", **over)))
    return path


def copy_run(cfg: Path, dest: Path) -> Path:
    """A copy of a trained run (config, checkpoints, MLflow store) to change without touching the original."""
    shutil.copytree(cfg.parent, dest)
    conf = dest / cfg.name
    conf.write_text(conf.read_text().replace(str(cfg.parent), str(dest)))
    return conf


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_dataset):
    """80 steps of the tiny model, checkpoints every 20 (keep 3), into a sqlite MLflow store.

    Run as `.venv/bin/python -m pretrain` with an empty PATH: training on CPUs needs no C++ compiler and no
    `ninja` (DeepSpeed's communication backend would otherwise build an op, with both, before the first step)."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = write_config(tmp, train_dataset, train__max_steps=80, train__lr=2e-3, train__eval_every=40,
                       checkpoint__every_steps=20, checkpoint__keep=3)
    (tmp / "bin").mkdir()
    out = subprocess.run(pretrain_command(cfg), cwd=tmp, env={**pretrain_env(), "PATH": str(tmp / "bin")},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # nothing a user cannot act on: DeepSpeed's guess of the accelerator, its deprecated calls into torch
    assert "Setting accelerator" not in out.stdout + out.stderr and "FutureWarning" not in out.stderr, out.stderr
    return cfg, tmp / "ck", out


def test_the_model_learns(trained, train_dataset):
    cfg, ck, out = trained
    m = read_metrics(ck)
    assert sorted(m) == list(range(1, 81))
    first = sum(m[s]["loss"] for s in range(1, 11)) / 10
    last = sum(m[s]["loss"] for s in range(71, 81)) / 10
    assert last < first - 0.3, (first, last)
    chance = 1 / 120  # the tokenizer's vocabulary
    assert sum(m[s]["mlm_acc"] for s in range(71, 81)) / 10 > 8 * chance
    assert m[80]["eval/mlm_acc"] > 6 * chance and m[80]["eval/mlm_acc"] > m[40]["eval/mlm_acc"] * 0.9
    for key in ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc", "lr", "grad_norm", "skipped_steps",
                "seq_per_s", "tokens_per_s"):
        assert key in m[80], key
    assert 0 <= m[10]["data_wait"] < 1 and m[80]["skipped_steps"] == 0
    import yaml

    per_step = yaml.safe_load(cfg.read_text())["train"]["global_batch_size"]
    examples = json.loads((train_dataset / "manifest.json").read_text())["splits"]["train"]["examples"]
    assert m[80]["epoch"] == pytest.approx(80 * per_step / examples)  # (passes over the train split)
    assert "step 80/80 | loss" in out.stdout and "eval at step 80" in out.stdout


def test_checkpoints_are_committed_and_pruned(trained):
    _, ck, _ = trained
    names = sorted(p.name for p in ck.iterdir() if p.name.startswith("step-"))
    assert names == ["step-00000040", "step-00000060", "step-00000080"]
    client = json.loads((ck / "step-00000080" / "client.json").read_text())
    assert client["step"] == 80 and client["samples"] == 80 * 16
    assert client["cursor"]["micro_batches"] == 160 and client["cursor"]["streams"] == 2
    assert client["cursor"]["deal"] == "balanced"
    commit = json.loads((ck / "step-00000080" / "commit.json").read_text())
    assert "rank-00000.pt" in commit["files"] and "client.json" in commit["files"]
    assert all((ck / "step-00000080" / f).stat().st_size == n for f, n in commit["files"].items())


def test_copies_beside_the_checkpoints_are_neither_resumed_from_nor_pruned(tmp_path):
    """A user's copy of a checkpoint (`step-00000040.bak`, `step-00000040-good`) is not a checkpoint: not listed,
    so not resumed from, and left alone when the run prunes (a name that does not parse once stopped the save)."""
    from pretrain.checkpoint import committed, prune

    for name in ("step-00000040", "step-00000060", "step-00000040.bak", "step-00000040-good", "step-00000080.partial",
                 "step-100000000"):
        (tmp_path / name).mkdir()
    assert [p.name for p in committed(tmp_path)] == ["step-100000000", "step-00000060", "step-00000040"]
    prune(tmp_path, 1, 60)  # (100000000 is past the step this run is at: a skipped, damaged one)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000040-good", "step-00000040.bak", "step-00000060"]


def test_the_run_is_tracked_in_mlflow(trained, train_dataset):
    from mlflow.tracking import MlflowClient

    cfg, ck, _ = trained
    client = json.loads((ck / "step-00000080" / "client.json").read_text())
    mc = MlflowClient(f"sqlite:///{cfg.parent / 'mlflow.db'}")
    run = mc.get_run(client["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "80" and run.data.params["model.preset"] == "tiny"
    assert run.data.params["derived.accumulation"] == "2"
    manifest = json.loads((train_dataset / "manifest.json").read_text())
    assert run.data.tags["dataset_id"] == manifest["dataset_id"]
    assert len(run.data.tags.get("git_commit", "")) in (0, 40)
    history = mc.get_metric_history(run.info.run_id, "loss")
    assert sorted(h.step for h in history) == list(range(1, 81))
    assert {h.step for h in mc.get_metric_history(run.info.run_id, "eval/mlm_acc")} == {40, 80}
    arts = {a.path for d in ("config", "dataset", "tokenizer") for a in mc.list_artifacts(run.info.run_id, d)}
    assert arts == {"config/config.yaml", "dataset/manifest.json", "tokenizer/spm.model"}


def test_resume_continues_the_run_and_its_mlflow_run(trained, tmp_path):
    cfg, ck, _ = trained
    conf = copy_run(cfg, tmp_path / "copy")
    tmp = conf.parent
    done = run_pretrain(conf)  # at train.max_steps already: nothing to train, the figures it ended with
    last = read_metrics(tmp / "ck")[80]
    assert done.returncode == 0 and "steps        80 (none this run: the checkpoint is at train.max_steps" in \
        done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"train        last step: loss {last['loss']:.4f}" in done.stdout
    assert f"mlm acc {last['eval/mlm_acc']:.3f}" in done.stdout
    # as a checkpoint written before streams were dealt by size, whose cursor names no deal: it keeps its order
    step80 = tmp / "ck" / "step-00000080"
    client = json.loads((step80 / "client.json").read_text())
    del client["cursor"]["deal"]
    (step80 / "client.json").write_text(json.dumps(client))
    commit = json.loads((step80 / "commit.json").read_text())
    commit["files"]["client.json"] = (step80 / "client.json").stat().st_size
    commit["sha256"]["client.json"] = hashlib.sha256((step80 / "client.json").read_bytes()).hexdigest()
    (step80 / "commit.json").write_text(json.dumps(commit))
    out = run_pretrain(conf, "train.max_steps=90")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from" in out.stdout and "step-00000080 (step 80" in out.stdout
    assert json.loads((tmp / "ck" / "step-00000090" / "client.json").read_text())["cursor"]["deal"] == "round-robin"
    assert "train.max_steps: 80 -> 90" in out.stdout
    m = read_metrics(tmp / "ck")
    assert sorted(m) == list(range(1, 91))
    assert m[90]["lr"] == pytest.approx(2e-3 / 85)  # the linear decay to the new max_steps (warmup 5)
    assert f"the learning rate goes from {2e-3 / 75:.3g} (step 80) to {m[81]['lr']:.3g} (step 81)" in out.stdout
    assert m[81]["lr"] == pytest.approx(2e-3 * 10 / 85)
    old = json.loads((ck / "step-00000080" / "client.json").read_text())["mlflow_run_id"]
    new = json.loads((tmp / "ck" / "step-00000090" / "client.json").read_text())["mlflow_run_id"]
    assert new == old
    # the run keeps its first settings and records what the resume changed (the copy's checkpoint.dir too)
    from mlflow.tracking import MlflowClient

    from pretrain.tracking import run_checkpoint_dir

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    params = MlflowClient(uri).get_run(new).data.params
    assert params["train.max_steps"] == "80" and params["resumed.step-00000080.train.max_steps"] == "90"
    assert params["resumed.step-00000080.checkpoint.dir"] == str(tmp / "ck")
    assert not [k for k in params if k.startswith("resumed.") and ".train." in k and "max_steps" not in k]
    assert run_checkpoint_dir(new, uri) == str(tmp / "ck")

    again = run_pretrain(conf, "train.max_steps=90")  # nothing left to do
    assert again.returncode == 0 and "0 steps to go" in again.stdout
    assert "resuming from" in again.stdout and "the learning rate goes" not in again.stdout  # (the same schedule)
    below = run_pretrain(conf, "train.max_steps=85")
    assert below.returncode == 0 and "0 steps to go (the checkpoint is at step 90, past train.max_steps=85: " \
        "raise it to train on)" in below.stdout, below.stdout


def test_a_resume_into_another_store_records_the_whole_run_there(trained, tmp_path):
    """The checkpoint's MLflow run is not in the store the resumed job uses: a new run there gets the whole config
    and inputs, not only what changed, so it stands on its own (register --run finds its checkpoints)."""
    from mlflow.tracking import MlflowClient

    from pretrain.tracking import run_checkpoint_dir

    conf = copy_run(trained[0], tmp_path / "copy")
    other = f"sqlite:///{tmp_path / 'other.db'}"
    out = run_pretrain(conf, "train.max_steps=82", f"mlflow.tracking_uri={other}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MLflow cannot continue run" in out.stderr and "recording to a new run" in out.stderr, out.stderr[-3000:]
    (run,) = MlflowClient(other).search_runs([MlflowClient(other).get_experiment_by_name("bert-pretraining")
                                               .experiment_id])
    assert run.data.params["train.max_steps"] == "82" and run.data.params["train.lr"] == "0.002"
    assert {a.path for a in MlflowClient(other).list_artifacts(run.info.run_id)} >= {"config", "dataset", "tokenizer"}
    assert run_checkpoint_dir(run.info.run_id, other) == str(conf.parent / "ck")


def test_the_learning_rate_jump_is_said_where_the_schedule_stands():
    """Skipped steps hold the schedule: at a resume after 10 of them the rates either side of the jump are the
    schedule's at step 70, not at the checkpoint's 80."""
    from pretrain.config import PretrainConfig
    from pretrain.train import _rate_change

    before = {"lr": 1e-3, "schedule": "linear", "warmup_steps": 0, "max_steps": 100}
    cfg = PretrainConfig(data={"dataset": "-"}, train={"lr": 1e-3, "schedule": "linear", "warmup_steps": 0,
                                                       "max_steps": 200})
    said = _rate_change(before, cfg, 80, at=70)
    assert said.startswith(f"the learning rate goes from {1e-3 * 31 / 100:.3g} (step 80) to {1e-3 * 130 / 200:.3g} "
                           "(step 81)"), said
    assert _rate_change(before, cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 100})}),
                        80, at=70) is None


def test_a_resume_takes_a_new_batch_size_and_learning_rate(trained, tmp_path):
    """The data cursor advances by what each step consumed; the config's LR, weight decay and gradient clipping
    win over the saved optimizer's (the checkpoint written after the resume holds what the steps used)."""
    import torch

    conf = copy_run(trained[0], tmp_path / "copy")
    out = run_pretrain(conf, "train.max_steps=82", "train.global_batch_size=32", "train.lr=1e-4",
                       "train.grad_clip=0.25", "train.weight_decay=0.1",
                       "data.streams=null")  # (left to its default: the checkpoint's count, 2, stays)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train.grad_clip: 1.0 -> 0.25" in out.stdout and "train.weight_decay: 0.01 -> 0.1" in out.stdout
    for step, clip, decay in ((80, 1.0, 0.01), (82, 0.25, 0.1)):
        (states,) = (conf.parent / "ck" / f"step-{step:08d}").glob("*optim_states.pt")
        saved = torch.load(states, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        groups = saved["base_optimizer_state"]["param_groups"]
        assert (saved["clip_grad"], groups[0]["weight_decay"], groups[1]["weight_decay"]) == (clip, decay, 0.0)
    client = json.loads((conf.parent / "ck" / "step-00000082" / "client.json").read_text())
    assert client["cursor"]["streams"] == 2
    assert client["cursor"]["micro_batches"] == 80 * 2 + 2 * 4  # 2 more steps of 4 micro batches of 8
    assert client["samples"] == 80 * 16 + 2 * 32
    m = read_metrics(conf.parent / "ck")
    assert m[81]["lr"] == pytest.approx(1e-4 * (1 - (80 - 5) / (82 - 5)))


def test_a_fresh_run_reads_from_eight_streams_by_default(tmp_path, train_dataset):
    """Left to its default, a step's batch mixes the examples of 8 streams (shards), not one shard's."""
    cfg = write_config(tmp_path, train_dataset, train__max_steps=2, data__eval_examples=0, data__streams=None)
    out = run_pretrain(cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    client = json.loads((tmp_path / "ck" / "step-00000002" / "client.json").read_text())
    assert client["cursor"]["streams"] == 8


RESUMES = [
    ("model.num_layers=3", "different model (num_layers changed)"),
    ("data.streams=4", "different data order (streams changed: streams 2 -> 4)"),
    ("data={streams: null, num_workers: 3}", "the newest checkpoint read its data in 2 streams, which ranks x "
     "data.num_workers (1 x 3) does not divide: to resume in the same data order, set data.num_workers to 1 or 2"),
    ("resume=never", "holds checkpoints of an earlier run and resume=never"),
    ("checkpoint.dir=ck/step-00000080", "checkpoint.dir ck/step-00000080 is one checkpoint of a run; give the run's "
                                        "directory (ck) to resume it"),
]
CONFIG_ERRORS = [
    ("train.optimiser=lamb", 2, "unknown key 'train.optimiser'"),
    ("train.optimizer=lamb", 2, "train.optimizer=lamb cannot run under ZeRO"),
    ("train.global_batch_size=20", 2, "is not a multiple of train.micro_batch_size"),
    ("precision=fp16", 1, "precision=fp16 needs a GPU"),
    ("data.dataset=/nonexistent", 1, "is not a finished dataset (manifest.json is missing); build one with"),
    ("data.dataset={ds}/train", 1, "is not a finished dataset (manifest.json is missing); give the dataset "
                                   "directory that holds it: data.dataset={ds}"),
    ("checkpoint.dir={ds}/manifest.json", 1, "checkpoint.dir {ds}/manifest.json is a file; give a directory"),
    ("checkpoint.dir={ds}/manifest.json/ck", 1, "checkpoint.dir {ds}/manifest.json/ck cannot be written: "
                                              "{ds}/manifest.json is a file; give a directory this user can write"),
    ("data.dataset={ds}/manifest.json", 1,
     "is a file, not a dataset directory; give the directory that holds it ({ds})"),
    ("deepspeed.config={{zero_optimization: {{stagee: 2}}}}", 1, "DeepSpeed refused its config, into which "
     "deepspeed.config merged deepspeed.config.zero_optimization.stagee: 1 validation error"),
]


@pytest.fixture(scope="module")
def refused(tmp_path_factory, trained) -> dict:
    """What the resumes of the trained run refused below said (run one after another, forked from one loaded
    process), and its checkpoint directory's listing before them."""
    cfg, ck, _ = trained
    cases = {o: (cfg.parent, ["train", str(cfg), o, "train.max_steps=100"]) for o, _ in RESUMES}
    other = tmp_path_factory.mktemp("other")
    cases["dataset"] = (cfg.parent, ["train", str(cfg), f"data.dataset={ck}", f"checkpoint.dir={other / 'ck'}"])
    before = sorted(p.name for p in ck.iterdir())
    return {"before": before, **dict(zip(cases, pretrain_refusals(*cases.values())))}


@pytest.fixture(scope="module")
def refused_configs(tmp_path_factory, train_dataset) -> dict:
    """What the fresh runs with the config errors below, and one with resume=must, said (as `refused`)."""
    cases = {}
    for override, _, _ in CONFIG_ERRORS:
        fresh = write_config(tmp_path_factory.mktemp("refused"), train_dataset, train__max_steps=1,
                             data__eval_examples=0)
        cases[override] = (fresh.parent, ["train", str(fresh), override.format(ds=train_dataset)])
    fresh = write_config(tmp_path_factory.mktemp("must"), train_dataset)
    cases["resume=must"] = (fresh.parent, ["train", str(fresh), "resume=must"])
    return dict(zip(cases, pretrain_refusals(*cases.values())))


@pytest.mark.parametrize("override, message", RESUMES)
def test_incompatible_resumes_are_refused(trained, refused, override, message):
    out = refused[override]
    assert out.returncode == 1 and message in out.stderr, out.stderr[-2000:]
    assert sorted(p.name for p in trained[1].iterdir()) == refused["before"], "nothing written or deleted"


def test_a_checkpoint_directory_given_as_the_dataset_is_named_as_such(trained, refused, train_dataset):
    """A checkpoint directory keeps a copy of its dataset's manifest: given as data.dataset it is said to be a
    checkpoint directory, with the dataset its run read, not a dataset with missing shards."""
    ck, out = trained[1], refused["dataset"]
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"data.dataset: '{ck}' is a pretraining checkpoint directory" in out.stderr and \
        f"its run read data.dataset={train_dataset}" in out.stderr, out.stderr[-2000:]


def test_a_second_run_in_the_same_checkpoint_dir_is_refused_while_the_first_runs(tmp_path, train_dataset):
    """Two runs in one checkpoint.dir would write the same checkpoints and metrics: the second stops at once."""
    import os

    from data_prep import storage

    cfg = write_config(tmp_path, train_dataset, train__max_steps=2, data__eval_examples=0)
    with storage.exclusive(str((tmp_path / "ck").resolve()), "checkpoints"):  # as the first run's rank 0 holds it
        out = run_pretrain(cfg)
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"another run (pid {os.getpid()} on " in out.stderr and f"is training in checkpoint.dir {tmp_path / 'ck'}" \
        in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not list(tmp_path.glob("ck/step-*")), "nothing written"
    out = run_pretrain(cfg)  # once it is free
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_second_phase_starts_from_the_first_phases_weights(trained, tmp_path, train_dataset):
    """init_from: a fresh run (step 0, a new optimizer and schedule) whose initial weights are a checkpoint's; a
    source of another architecture is refused before anything is trained."""
    cfg, ck, _ = trained
    first = read_metrics(ck)
    over = dict(train__max_steps=2, train__log_every=1, train__warmup_steps=1, data__eval_examples=0,
                mlflow__enabled=False)
    for sub in ("fresh", "other"):
        (tmp_path / sub).mkdir()
    fresh = write_config(tmp_path / "fresh", train_dataset, **over)
    # (its random-init baseline also shows: a top-level deepspeed.config key DeepSpeed does not read, which it would
    # ignore silently, is warned of; one it reads is not)
    out = run_pretrain(fresh, "deepspeed.config={zero_optimizaton: {stage: 2}, wall_clock_breakdown: false}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "warning: deepspeed.config.zero_optimizaton: DeepSpeed " in out.stderr, out.stderr[-2000:]
    assert "deepspeed.config.wall_clock_breakdown" not in out.stderr
    phase2 = write_config(tmp_path, train_dataset, **over, init_from=str(ck))
    out = run_pretrain(phase2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"initial weights from {ck} (step 80 of its run)" in out.stdout, out.stdout[-2000:]
    second, random_init = read_metrics(tmp_path / "ck"), read_metrics(tmp_path / "fresh" / "ck")
    assert second[1]["loss"] < random_init[1]["loss"] - 0.3, (second[1], random_init[1])
    assert abs(second[1]["loss"] - first[80]["loss"]) < 0.5 * abs(random_init[1]["loss"] - first[80]["loss"])
    again = run_pretrain(phase2, "train.max_steps=3")  # resuming: its own checkpoint wins
    assert again.returncode == 0 and "is not used: this run resumes from its own checkpoints" in again.stdout
    other = write_config(tmp_path / "other", train_dataset, **over, init_from=str(ck), model__num_layers=3)
    out = run_pretrain(other)
    assert out.returncode == 1 and f"init_from={ck}: its model differs (num_layers 2 -> 3)" in out.stderr, \
        out.stderr[-2000:]


def test_a_checkpoint_of_another_dataset_is_refused_for_its_dataset_first(tmp_path):
    """A dataset built with another vocabulary changes the model's vocab_size too: the refusal names the dataset,
    the cause, not the model size the user never set."""
    from pretrain.checkpoint import CheckpointError
    from pretrain.train import _check_compatible

    client = {"model": {"vocab_size": 2000, "hidden_size": 128}, "dataset_id": "a" * 16, "cursor": {"streams": 8}}
    with pytest.raises(CheckpointError, match=f"was trained on dataset {'a' * 16}, data.dataset is {'b' * 16}"):
        _check_compatible(client, {"vocab_size": 2500, "hidden_size": 128}, "b" * 16, {"streams": 8}, None,
                          tmp_path / "step-00000010", None)
    with pytest.raises(CheckpointError, match=r"holds a different model \(vocab_size changed\)"):
        _check_compatible(client, {"vocab_size": 2500, "hidden_size": 128}, "a" * 16, {"streams": 8}, None,
                          tmp_path / "step-00000010", None)


def test_init_from_refuses_a_source_of_another_tokenizer_or_a_classifier():
    """The checks behind init_from's refusals: the same architecture is not enough, the token ids must mean the
    same pieces (the dataset's tokenizer), and a fine-tuned classifier is no pretrained encoder."""
    from dataclasses import asdict

    from pretrain.export import FORMAT
    from pretrain.model import BertForPretraining
    from pretrain.presets import preset
    from pretrain.train import _init_problem

    model = BertForPretraining(preset("tiny", 500))
    src = {"format": dict(FORMAT), "model": asdict(model.config)}
    ours = {"tokenizer": {"sha256": "a" * 64}}
    assert _init_problem(src, {"tokenizer_sha256": "a" * 64}, model, ours) is None
    problem = _init_problem(src, {"tokenizer_sha256": "b" * 64}, model, ours)
    assert problem and problem.startswith("was trained with another tokenizer") and "tokenizer.path=" in problem
    assert "its model differs (hidden_size" in _init_problem(
        {**src, "model": {**src["model"], "hidden_size": 2 * model.config.hidden_size}},
        {"tokenizer_sha256": "a" * 64}, model, ours)
    assert "fine-tuned classifier" in _init_problem({**src, "format": {"name": "something-else"}}, {}, model, ours)


def test_evaluate_scores_a_checkpoint_as_its_training_did(trained, tmp_path, train_dataset):
    """`pretrain evaluate` gives the figures the run's own last evaluation logged (by default on as many examples as
    the run evaluated on: the same examples, the same weights), and refuses a dataset whose token ids come from
    another tokenizer."""
    cfg, ck, _ = trained
    logged = read_metrics(ck)[80]
    out = pretrain_cli("evaluate", str(ck), "--dataset", str(train_dataset), "--batch-size", "8",
                       "--json", str(tmp_path / "eval.json"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(as its pretraining run did: data.eval_examples; --examples to change)" in out.stdout, out.stdout
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["examples"] == 30 and result["split"] == "val" and result["model"]["run_id"]
    for key in ("eval/mlm_loss", "eval/mlm_acc", "eval/nsp_acc"):
        assert abs(result[key] - logged[key]) < 1e-3, (key, result[key], logged[key])
    assert f"mlm loss {result['eval/mlm_loss']:.4f}" in out.stdout, out.stdout
    other = tmp_path / "other-tokenizer"
    shutil.copytree(train_dataset, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    out = pretrain_cli("evaluate", str(ck), "--dataset", str(other), cwd=tmp_path)
    assert out.returncode == 1 and "was trained with another tokenizer than" in out.stderr, out.stderr[-2000:]
    out = pretrain_cli("evaluate", str(ck), "--dataset", str(train_dataset), "--examples", "0", cwd=tmp_path)
    assert out.returncode == 2 and "'0' is not a positive whole number" in out.stderr
    if not torch.cuda.is_available():
        from pretrain.evaluation import EvaluationError, evaluate_model

        with pytest.raises(EvaluationError, match="--device cuda: this machine has no CUDA device"):
            evaluate_model(str(ck), str(train_dataset), "sqlite:///unused.db", device="cuda")
    assert result["precision"] == "fp32" and result["warnings"] == []
    _positions_it_never_trained_are_warned_of(ck, train_dataset, tmp_path)


def _positions_it_never_trained_are_warned_of(ck: Path, dataset: Path, tmp_path: Path) -> None:
    """A model pretrained on shorter sequences than the dataset's (its record says 32 tokens; the dataset's are
    64): `evaluate` scores it and warns that its positions 32-63 were never trained, as fine-tuning does."""
    from pretrain.evaluation import evaluate_model
    from pretrain.export import CHECKSUMS, export

    short = export(ck, tmp_path / "short")
    config = json.loads((short / "config.json").read_text())
    assert config["max_seq_length"] == 64
    (short / "config.json").write_text(json.dumps({**config, "max_seq_length": 32}))  # (as a 32-token phase 1)
    sums = json.loads((short / CHECKSUMS).read_text())
    sums["config.json"] = hashlib.sha256((short / "config.json").read_bytes()).hexdigest()
    (short / CHECKSUMS).write_text(json.dumps(sums))
    told: list[str] = []
    result = evaluate_model(str(short), str(dataset), "sqlite:///unused.db", examples=8, batch_size=8,
                            progress=lambda m: None, warn=told.append)
    assert told == result["warnings"] and len(told) == 1, told
    assert "sequences are up to 64 tokens long" in told[0] and "was pretrained on 32: positions 32-63" in told[0]


def test_resume_must_needs_a_checkpoint(refused_configs):
    out = refused_configs["resume=must"]
    assert out.returncode == 1 and "resume=must but checkpoint.dir" in out.stderr
    assert not (Path(out.args[1]).parent / "ck").exists(), "a run that never started leaves no directory behind"


def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(trained, tmp_path):
    cfg, ck, _ = trained
    conf = copy_run(cfg, tmp_path / "copy")
    tmp = conf.parent
    newest = tmp / "ck" / "step-00000080"
    victim = next(p for p in sorted(newest.iterdir()) if p.name.endswith("optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])  # a torn write
    (tmp / "ck" / "step-00000100.partial").mkdir()  # a save that never finished
    (tmp / "ck" / "step-00000100.partial" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    out = run_pretrain(conf, "train.max_steps=62", "checkpoint.every_steps=1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step-00000080 is incomplete or damaged" in out.stderr and "has 100 bytes" in out.stderr
    assert "resuming from" in out.stdout and "step-00000060 (step 60" in out.stdout
    assert not (tmp / "ck" / "step-00000100.partial").exists(), "unfinished saves are cleared"
    # damaged in place, at the size its commit record names: found out when read
    conf = copy_run(cfg, tmp_path / "copy2")
    client = conf.parent / "ck" / "step-00000080" / "client.json"
    client.write_bytes(b"x" * client.stat().st_size)
    out = run_pretrain(conf, "train.max_steps=62", "checkpoint.every_steps=1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step-00000080 is damaged (client.json cannot be read (JSONDecodeError" in out.stderr, out.stderr[-3000:]
    assert "step-00000060 (step 60" in out.stdout
    # bytes of the optimizer states changed in place (same size, still loadable): their digest gives them away
    conf = copy_run(cfg, tmp_path / "copy3")
    (states,) = (conf.parent / "ck" / "step-00000080").glob("*optim_states.pt")
    data = bytearray(states.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    states.write_bytes(bytes(data))
    out = run_pretrain(conf, "train.max_steps=62", "checkpoint.every_steps=1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"step-00000080 is damaged ({states.name} differs from its sha256); trying an older one" in out.stderr, \
        out.stderr[-3000:]
    assert "step-00000060 (step 60" in out.stdout


def test_a_checkpoint_that_fails_to_load_stops_the_run_and_is_kept(trained, tmp_path):
    """Intact as far as its commit record can tell (here: one from before digests were recorded), but DeepSpeed
    cannot load it: falling back to the one before would delete it at the next save, so the run stops instead."""
    cfg, _, _ = trained
    conf = copy_run(cfg, tmp_path / "copy")
    newest = conf.parent / "ck" / "step-00000080"
    commit = json.loads((newest / "commit.json").read_text())
    del commit["sha256"]
    (newest / "commit.json").write_text(json.dumps(commit))
    (states,) = newest.glob("*optim_states.pt")
    data = bytearray(states.read_bytes())
    data[-64:] = bytes(64)  # the end of its zip archive, at the same size
    states.write_bytes(bytes(data))
    out = run_pretrain(conf, "train.max_steps=100")
    assert out.returncode == 1, out.stderr[-3000:]
    assert f"checkpoint {newest} could not be loaded (" in out.stderr and "so it is kept" in out.stderr, \
        out.stderr[-3000:]
    assert "resuming from" not in out.stdout
    assert newest.is_dir() and (conf.parent / "ck" / "step-00000060").is_dir()


def test_a_different_world_size_or_no_complete_checkpoint_is_refused(trained, tmp_path):
    cfg, _, _ = trained
    out = run_pretrain(cfg, "train.max_steps=100", nproc=2)
    assert out.returncode != 0 and "was written by 1 ranks and this run has 2" in out.stderr

    conf = copy_run(cfg, tmp_path / "copy")
    tmp = conf.parent
    for commit in (tmp / "ck").glob("step-*/commit.json"):
        commit.unlink()
    out = run_pretrain(conf, "train.max_steps=100")
    assert out.returncode == 1 and "none of the 3 checkpoints" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (2, "bf16")])
def test_a_nan_step_is_skipped_and_counted(tmp_path, train_dataset, stage, precision):
    """Without ZeRO our optimizer checks the gradients; under ZeRO (bf16: fp32 weights under autocast) DeepSpeed's
    global gradient norm does."""
    cfg = write_config(tmp_path, train_dataset, train__max_steps=6, debug__nan_at_step=3,
                       deepspeed__zero_stage=stage, precision=precision)
    out = run_pretrain(cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 3: non-finite loss or gradient; the update was skipped (1 skipped so far)" in out.stderr
    m = read_metrics(tmp_path / "ck")
    assert m[2]["skipped_steps"] == 0 and m[3]["skipped_steps"] == 1 and m[6]["skipped_steps"] == 1
    assert m[3]["loss"] != m[3]["loss"]  # NaN
    assert all(m[s]["loss"] == m[s]["loss"] for s in (4, 5, 6)), "the weights stayed finite"
    assert m[4]["lr"] == m[3]["lr"], "a skipped step does not advance the schedule"


def test_repeated_nans_stop_the_run_with_advice(tmp_path, train_dataset):
    cfg = write_config(tmp_path, train_dataset, train__max_steps=6, debug__nan_at_step=2,
                       train__max_skipped_steps=1)
    out = run_pretrain(cfg)
    assert out.returncode == 1
    assert "1 consecutive steps had a non-finite loss" in out.stderr and "Lower train.lr" in out.stderr


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path, train_dataset):
    cfg = write_config(tmp_path, train_dataset, train__max_steps=100_000, train__warmup_steps=5,
                       train__log_every=1, checkpoint__every_steps=0)
    proc = subprocess.Popen(pretrain_command(cfg), cwd=tmp_path, env=pretrain_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("step 5/") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by signal at step" in rest and "; run the same command again to resume from" in rest, rest
    saved = [p for p in (tmp_path / "ck").iterdir() if p.name.startswith("step-")]
    assert len(saved) == 1 and (saved[0] / "commit.json").is_file()
    step = int(saved[0].name.split("-")[1])
    assert step >= 5
    out = run_pretrain(cfg, f"train.max_steps={step + 2}")
    assert out.returncode == 0 and f"(step {step}," in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("override, code, message", CONFIG_ERRORS)
def test_config_errors_name_the_key(refused_configs, train_dataset, override, code, message):
    out = refused_configs[override]
    assert out.returncode == code, out.stderr[-2000:]
    assert message.format(ds=train_dataset) in out.stderr
    assert "Traceback" not in out.stderr


def test_a_damaged_dataset_stops_the_run_with_advice(tmp_path, train_dataset):
    """A shard the manifest names but the directory lacks: refused before training, naming the file. One that
    cannot be read: the loader's error ends the run (its worker, which leaves stopping to the training process,
    is stopped with it rather than waited for)."""
    ds = tmp_path / "ds"
    shutil.copytree(train_dataset, ds)
    shard = json.loads((ds / "manifest.json").read_text())["splits"]["train"]["shards"][1]["name"]
    (ds / shard).unlink()
    cfg = write_config(tmp_path, ds, train__max_steps=2, data__eval_examples=0, data__num_workers=1)
    out = run_pretrain(cfg)
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"data.dataset '{ds}' is damaged: {shard} missing; check it with python -m data_prep verify {ds}" \
        in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    shutil.copyfile(train_dataset / shard, ds / shard)
    with open(ds / shard, "r+b") as f:  # truncated (a copy cut short)
        f.truncate((ds / shard).stat().st_size // 2)
    out = run_pretrain(cfg, timeout=120)  # (it used to hang here, in the interpreter's exit)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    # one line, in the loader's words without torch's wrapping of a worker's error
    (said,) = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert said.startswith(f"error: {ds / shard}: cannot be read (its bytes differ from the sha256 the manifest "
                           "recorded") and \
        said.endswith("check the dataset with `python -m data_prep verify`, and rebuild it with data_prep run"), said
    shutil.copyfile(train_dataset / shard, ds / shard)
    with open(ds / shard, "r+b") as f:  # changed in place, its size kept: once a crash deep in decoding a batch
        f.seek((ds / shard).stat().st_size // 3)
        f.write(bytes(range(256)) * 2)
    out = run_pretrain(cfg, timeout=120)
    assert out.returncode == 1 and f"error: {ds / shard}: cannot be read (its bytes differ" in out.stderr and \
        "Traceback" not in out.stderr, out.stderr[-2000:]
    shutil.copyfile(train_dataset / shard, ds / shard)
    (ds / "tokenizer" / "spm.model").write_bytes(b"not a model")  # its tokenizer: named by the key that led to it
    out = run_pretrain(cfg, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"error: data.dataset: '{ds / 'tokenizer' / 'spm.model'}' is not a sentencepiece model" in out.stderr, \
        out.stderr[-2000:]


def test_the_banner_says_when_deepspeed_runs_its_own_bf16_mode():
    """deepspeed.config may turn on DeepSpeed's bf16 mode (an expert option): the run says so, not fp32."""
    from pretrain.config import PretrainConfig
    from pretrain.train import _shown_precision

    plain = PretrainConfig.model_validate({"data": {"dataset": "d"}})
    ds_bf16 = PretrainConfig.model_validate({"data": {"dataset": "d"},
                                             "deepspeed": {"config": {"bf16": {"enabled": True}}}})
    assert _shown_precision(plain, "fp32") == "fp32"
    assert _shown_precision(ds_bf16, "fp32").startswith("bf16 (DeepSpeed's bf16 mode")
