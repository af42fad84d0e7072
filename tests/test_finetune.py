"""Fine-tuning from a registered model, its baseline, its outputs and records; the transformers export."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import (
    pretrain_cli,
    pretrain_config,
    pretrain_env,
    pretrain_refusals,
    pyfunc_loads_without_the_project_installed,
    run_pretrain,
    small_config,
    write_topic_corpus,
    write_topic_task,
)

pytestmark = pytest.mark.slow

PRETRAIN_STEPS = 300  # the topic classes are learned by then (nouns of a class embed together)


def _printed(stdout: str, key: str) -> float:
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith(key + " ")]
    return float(line.split()[1])


@pytest.fixture(scope="module")
def registered(tmp_path_factory, ray_local):
    """A tiny BERT pretrained on the topic corpus (BPE tokenizer) and registered as topic-bert@champion."""
    from data_prep.pipeline import run

    tmp = tmp_path_factory.mktemp("finetune")
    run(small_config(write_topic_corpus(tmp / "corpus"), tmp / "ds", tokenizer__vocab_size=200,
                     tokenizer__model_type="bpe"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tree = pretrain_config(tmp / "ds", tmp / "ck", train__max_steps=PRETRAIN_STEPS, train__micro_batch_size=32,
                           train__global_batch_size=32, train__lr=2e-3, train__warmup_steps=20, train__log_every=50,
                           train__eval_every=0, checkpoint__every_steps=0, data__eval_examples=64,
                           # 300 steps of a tiny model learn the classes well on most draws of the dropout masks and
                           # data order, not all: seeds 99 and 1234 give test accuracy 0.41 and 0.36 above random
                           # init, 7 only 0.2 (with streams dealt by size)
                           seed=99)
    (tmp / "pretrain.yaml").write_text(yaml.safe_dump(tree))
    out = run_pretrain(tmp / "pretrain.yaml")
    assert out.returncode == 0, out.stderr[-3000:]
    reg = pretrain_cli("register", "--checkpoint", str(tmp / "ck"), "--name", "topic-bert", "--alias", "champion",
                       "--tracking-uri", uri, cwd=tmp)
    assert reg.returncode == 0, reg.stderr[-3000:]
    files = write_topic_task(tmp / "task")
    (tmp / "finetune.yaml").write_text(yaml.safe_dump({
        "task": {k: str(v) for k, v in files.items()},
        "train": {"epochs": 6, "micro_batch_size": 16, "lr": 5e-4, "max_seq_length": 32, "log_every": 10},
        "mlflow": {"tracking_uri": uri},
    }))
    return tmp, uri


def test_fine_tuning_a_registered_model_beats_random_init(registered):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pretrain.export import load_model, verify

    tmp, uri = registered
    runs = {}
    for init in ("pretrained", "random"):
        extra = ["--register", "topic-classifier", "--alias", "champion"] if init == "pretrained" else []
        out = pretrain_cli("finetune", str(tmp / "finetune.yaml"), "model=models:/topic-bert@champion", f"init={init}",
                           f"output={tmp / init}", *extra, cwd=tmp)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[init] = out.stdout
    acc = {init: _printed(stdout, "test_accuracy") for init, stdout in runs.items()}
    assert acc["pretrained"] >= acc["random"] + 0.2, acc  # the test nouns never appear in fine-tuning
    assert _printed(runs["pretrained"], "test_macro_f1") > 0.5

    model_dir = tmp / "pretrained" / "model"
    assert verify(model_dir) == []
    model, config = load_model(model_dir)
    assert config["labels"] == ["animal", "tool"] and model.classifier.out_features == 2
    summary = json.loads((tmp / "pretrained" / "summary.json").read_text())
    assert summary["metrics"]["test_accuracy"] == pytest.approx(acc["pretrained"], abs=1e-4)
    assert summary["source"]["name"] == "topic-bert" and summary["source"]["version"] == "1"

    client = MlflowClient(uri, registry_uri=uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["source_model_name"] == "topic-bert" and run.data.tags["source_model_version"] == "1"
    assert run.data.tags["source_model_run_id"] == client.get_model_version("topic-bert", "1").run_id
    assert run.data.metrics["test_accuracy"] == pytest.approx(acc["pretrained"], abs=1e-4)
    assert "test_macro_f1" in run.data.metrics and run.data.params["init"] == "pretrained"

    v = client.get_model_version_by_alias("topic-classifier", "champion")
    assert v.run_id == run.info.run_id and v.tags["source_model_version"] == "1" and v.tags["kind"] == "classifier"
    assert v.tags["init"] == "pretrained"  # (a random-init baseline says so)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/topic-classifier@champion")
    texts = [json.loads(line)["text"] for line in (tmp / "task" / "test.jsonl").read_text().splitlines()[:8]]
    pred = pyfunc.predict(texts)
    assert list(pred.columns) == ["label", "score"] and set(pred["label"]) <= {"animal", "tool"}
    assert ((pred["score"] >= 0.5) & (pred["score"] <= 1.0)).all()
    from pretrain.tracking import pull

    pulled = pull("models:/topic-classifier@champion", tmp / "pulled-classifier", uri)
    pyfunc_loads_without_the_project_installed(pulled, tmp, shape=[1, 2])  # a label and its score


def test_a_pair_task_from_csv_with_string_labels(registered, tmp_path):
    """Text pairs from csv, labels mapped in a stable order, validation split from train, DeepSpeed-free on CPU."""
    from pretrain.config import FinetuneConfig
    from pretrain.finetune import finetune

    tmp, uri = registered
    rows = [json.loads(line)["text"] for line in (tmp / "task" / "train.jsonl").read_text().splitlines()]
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["premise", "hypothesis", "gold"])
        for i, text in enumerate(rows):
            same = i % 3 != 0
            w.writerow([text, text if same else rows[(i * 7 + 1) % len(rows)], "entailment" if same else "other"])
    cfg = FinetuneConfig.model_validate({
        "model": str(tmp / "ck"),
        "task": {"train": str(path), "test": str(path), "text_field": "premise", "text_pair_field": "hypothesis",
                 "label_field": "gold", "validation_fraction": 0.25},
        "train": {"epochs": 1, "micro_batch_size": 16, "max_seq_length": 48, "log_every": 5},
        "output": str(tmp_path / "out"), "mlflow": {"enabled": False},
    })
    summary = finetune(cfg)
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert config["labels"] == ["entailment", "other"] and config["task"]["text_pair_field"] == "hypothesis"
    assert summary["labels"] == ["entailment", "other"] and 0.0 <= summary["metrics"]["test_macro_f1"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_accuracy" in r for r in records) and any("test_accuracy" in r for r in records)
    from pretrain.engine import Schedule

    total = summary["steps"]  # each logged rate is the one that step's update used (the last: above 0)
    schedule = Schedule("linear", round(0.1 * total), total)
    logged = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert logged and total in logged, logged
    assert all(lr == pytest.approx(5e-5 * schedule(step - 1)) for step, lr in logged.items()), logged
    training = json.loads((tmp_path / "out" / "model" / "training.json").read_text())
    assert training["task_files"]["train"]["sha256"] and training["init"] == "pretrained"


def test_only_a_finished_run_leaves_a_summary_and_a_job_skips_only_its_config(registered, tmp_path, capsys):
    """A job's fine-tuning stage is skipped when its output holds the summary of a finished run of the same config.
    A run into that output with another config removes the summary before it writes anything: killed midway, it
    leaves no summary that would vouch for the half-replaced output."""
    from cluster.runner import finished_finetune
    from pretrain.config import FinetuneConfig

    tmp, _ = registered
    base = yaml.safe_load((tmp / "finetune.yaml").read_text())

    def config(**train) -> FinetuneConfig:
        tree = {**base, "model": str(tmp / "ck"), "output": str(tmp_path / "out"), "mlflow": {"enabled": False},
                "train": {**base["train"], **train}}
        (tmp_path / "ft.yaml").write_text(yaml.safe_dump(tree))
        return FinetuneConfig.model_validate(tree)

    rows = (tmp / "task" / "train.jsonl").read_text() + '{"text": "a kind of animal", "label": "aminal"}\n'
    (tmp_path / "train.jsonl").write_text(rows)  # a misspelt label: a class of its own, with a single row
    base["task"]["train"] = str(tmp_path / "train.jsonl")
    first = config(epochs=1, max_seq_length=4096)
    out = pretrain_cli("finetune", str(tmp_path / "ft.yaml"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = len(rows.splitlines())
    assert f"1 of the 3 classes have a single training row (a misspelt label?): 'aminal' ({tmp_path / 'train.jsonl'}:" \
        f"{lines})" in out.stderr, out.stderr[-3000:]
    assert "train.max_seq_length 4096 is more than the model's" in out.stderr
    assert "is more than the 64 tokens the model was pretrained on: positions 64-" in out.stderr, out.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert finished_finetune(first) == summary and summary["config"]["train"]["epochs"] == 1
    assert finished_finetune(config(epochs=2)) is None
    _a_job_registers_a_finished_fine_tune_whose_registration_failed(tmp_path, registered[1], summary, capsys)
    typo = pretrain_cli("finetune", str(tmp_path / "ft.yaml"), f"model={tmp / 'no-such-model'}", cwd=tmp_path)
    assert typo.returncode == 1 and "model=" in typo.stderr, typo.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary  # the earlier run is whole
    fresh = pretrain_cli("finetune", str(tmp_path / "ft.yaml"), f"model={tmp / 'no-such-model'}",
                         f"output={tmp_path / 'fresh'}", cwd=tmp_path)
    assert fresh.returncode == 1 and not (tmp_path / "fresh").exists(), fresh.stderr[-2000:]

    second = config(epochs=500)
    said = open(tmp_path / "second.out", "w")  # (closed once the run has ended)
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", "finetune", str(tmp_path / "ft.yaml")], cwd=tmp_path,
                            env=pretrain_env(), stdout=said, stderr=subprocess.PIPE, text=True)
    effective, record = tmp_path / "out" / "config.yaml", tmp_path / "out" / "model" / "training.json"
    deadline = time.monotonic() + 120
    while "epochs: 500" not in effective.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    started = effective.stat().st_mtime
    while record.stat().st_mtime < started and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # into its training loop, past its first validation (which writes its best model)
    other = pretrain_cli("finetune", str(tmp_path / "ft.yaml"), cwd=tmp_path)  # a second run into the same output
    assert other.returncode == 1 and "another fine-tune (pid " in other.stderr and \
        f"is writing output {tmp_path / 'out'} on this machine" in other.stderr, other.stderr[-2000:]
    assert proc.poll() is None, "still training when interrupted"
    proc.send_signal(signal.SIGINT)  # Ctrl-C: one line that says what is left, no traceback
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    said.close()
    assert f"note: {tmp_path / 'out'} holds an earlier fine-tune; this run replaces it" in \
        (tmp_path / "second.out").read_text()
    step = json.loads(record.read_text())["step"]
    assert f"interrupted: {tmp_path / 'out'}/model holds this run's best model so far (of step {step})" in err, err
    assert "Traceback" not in err, err
    assert not (tmp_path / "out" / "summary.json").exists()
    assert finished_finetune(first) is None and finished_finetune(second) is None


def _a_job_registers_a_finished_fine_tune_whose_registration_failed(tmp_path, uri, summary, capsys) -> None:
    """A job's fine-tuning stage, given an output whose fine-tune finished but whose registration failed, registers
    that model (alias and all) and records the version in the summary; it trains nothing again."""
    import shutil

    from mlflow.tracking import MlflowClient

    from cluster.runner import _finetune
    from pretrain.config import FinetuneConfig

    out = tmp_path / "unregistered"
    shutil.copytree(tmp_path / "out", out)
    tree = {**summary["config"], "output": str(out), "registry": {"name": "topic-clf", "alias": "prod"},
            "mlflow": {"tracking_uri": uri}}
    failed = {**summary, "config": FinetuneConfig.model_validate(tree).model_dump(mode="json"),
              "model": str(out / "model"),
              "register_error": "MLflow at ... failed while reaching the store (ConnectionError: ...)"}
    (out / "summary.json").write_text(json.dumps(failed))
    weights = {p.name: p.stat().st_mtime_ns for p in (out / "model").iterdir()}
    capsys.readouterr()
    done = _finetune({"config": tree}, {"spec": {"kind": "finetune"}}, {})  # (fine-tuning would need Ray: none here)
    said = capsys.readouterr().out
    assert "its registration failed (MLflow at ... failed" in said and "registering it now" in said, said
    version = MlflowClient(uri, registry_uri=uri).get_model_version_by_alias("topic-clf", "prod")
    assert done["skipped"] and done["registered"] == {"name": "topic-clf", "version": str(version.version),
                                                      "alias": "prod", "alias_was": None}
    kept = json.loads((out / "summary.json").read_text())
    assert "register_error" not in kept and kept["registered"] == done["registered"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "model").iterdir()} == weights  # trained nothing again
    assert done["registered_now"] and "registered_now" not in kept  # (the job's summary says so)
    again = _finetune({"config": tree}, {"spec": {"kind": "finetune"}}, {})
    assert "holds this fine-tune's result; nothing to do" in capsys.readouterr().out and again["registered"]
    assert not again.get("registered_now")
    # registered by hand (`pretrain register --model OUTPUT/model`): the summary records it too, and only for the
    # model it names
    from pretrain.finetune import record_registration

    v = {"name": "topic-clf", "version": "7", "alias_was": None}
    (out / "summary.json").write_text(json.dumps({**failed, "model": str(tmp_path / "elsewhere" / "model")}))
    assert not record_registration(out / "model", v, "prod")  # (its summary is of another model)
    (out / "summary.json").write_text(json.dumps(failed))
    reg = pretrain_cli("register", "--model", str(out / "model"), "--name", "topic-clf", "--alias", "prod",
                       "--tracking-uri", uri, cwd=tmp_path)
    assert reg.returncode == 0 and f"{out / 'summary.json'} records the version" in reg.stdout, reg.stderr[-2000:]
    kept = json.loads((out / "summary.json").read_text())
    said = f"topic-clf version {kept['registered']['version']} "  # (a new version: the model names no MLflow run)
    assert "register_error" not in kept and said in reg.stdout, reg.stdout


def test_deepspeed_zero3_on_two_ranks_equals_zero0(registered, tmp_path):
    """The DeepSpeed path: ZeRO-3 shards parameters across 2 ranks and still computes ZeRO-0's model."""
    from safetensors.torch import load_file

    tmp, uri = registered
    results = {}
    for stage in (0, 3):
        for attempt in range(2):
            out = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                 "pretrain", "finetune", str(tmp / "finetune.yaml"), f"model={tmp / 'ck'}",
                 f"output={tmp_path / str(stage)}", "deepspeed.enabled=true", f"deepspeed.zero_stage={stage}",
                 "train.epochs=2", "mlflow.enabled=false"],
                cwd=tmp, env=pretrain_env(), capture_output=True, text=True, timeout=300)
            # A rank sometimes aborts in native code ("terminate called without an active exception", seen in 2 of
            # ~6 full runs on the 2-core CI machine, cause not yet found): run it once more, the result must hold
            if out.returncode == 0 or "terminate called without an active exception" not in out.stderr:
                break
        assert out.returncode == 0, out.stderr[-3000:]
        results[stage] = (_printed(out.stdout, "test_accuracy"),
                          load_file(str(tmp_path / str(stage) / "model" / "model.safetensors")))
    assert results[0][0] == pytest.approx(results[3][0], abs=1e-6)
    for name, w in results[0][1].items():
        torch.testing.assert_close(results[3][1][name], w, atol=1e-5, rtol=1e-4, msg=name)


def test_transformers_loads_the_hf_export(registered, tmp_path):
    """Registered encoder -> --format hf: same token ids and hidden states; the fine-tuned one: same logits."""
    import sentencepiece as spm
    import transformers

    from pretrain.export import load_model
    from pretrain.text import encode

    tmp, uri = registered
    out = pretrain_cli("export", "models:/topic-bert@champion", "--format", "hf", "--out", str(tmp_path / "hf"),
                       "--tracking-uri", uri, cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"transformers.AutoModel.from_pretrained('{tmp_path / 'hf'}')" in out.stdout
    texts = [json.loads(line)["text"] for line in (tmp / "task" / "test.jsonl").read_text().splitlines()[:6]]
    texts += ["  Spaces   around  ", "Digits 2024 and ünïcode", "tapir sharpens the wire"]
    pairs = texts[::-1]

    ours, _ = load_model(_pulled(tmp, uri, tmp_path))

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "hf" / "spm.model"))
    ids, types, mask = encode(sp, texts, 64, pairs)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    # named as transformers 4 knows it too (checked by hand: 4.57 loads it and gives these ids)
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    enc = tok(texts, pairs, padding=True, return_tensors="pt")
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["token_type_ids"], types)
    assert torch.equal(enc["attention_mask"], mask)

    hf = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(**enc).last_hidden_state
        seq, _ = ours.bert(ids, types, mask)
    keep = mask.bool()
    torch.testing.assert_close(theirs[keep], seq[keep], atol=1e-5, rtol=1e-5)
    pretraining = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf").eval()
    masked = keep.view(-1).nonzero().view(-1)[::3]  # (flat positions of real tokens: the MLM head's, tied decoder)
    with torch.no_grad():
        theirs = pretraining(**enc)
        ours_mlm, ours_nsp = ours(ids, types, mask, masked)
    torch.testing.assert_close(theirs.seq_relationship_logits, ours_nsp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.prediction_logits.view(-1, ours_mlm.shape[-1])[masked], ours_mlm, atol=1e-4,
                               rtol=1e-4)

    clf_dir = _classifier(tmp, tmp_path)  # a fine-tuned model: BertForSequenceClassification with its labels
    hf_clf_dir = tmp_path / "exports" / "hf-clf"  # (--out's parent is made too)
    out = pretrain_cli("export", str(clf_dir), "--format", "hf", "--out", str(hf_clf_dir), cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"transformers.AutoModelForSequenceClassification.from_pretrained('{hf_clf_dir}')" in out.stdout
    clf, _ = load_model(clf_dir)
    hf_clf = transformers.AutoModelForSequenceClassification.from_pretrained(hf_clf_dir).eval()
    assert hf_clf.config.id2label == {0: "animal", 1: "tool"}
    with torch.no_grad():
        torch.testing.assert_close(hf_clf(**enc).logits, clf(ids, types, mask), atol=1e-5, rtol=1e-5)
    # the export is transformers' to read, not this project's: said so where one is given back to it
    from pretrain.export import ExportError, resolve_model

    with pytest.raises(ExportError, match="is a Hugging Face \\(transformers\\) model, not this project's"):
        load_model(tmp_path / "hf")
    with pytest.raises(ExportError, match="is a Hugging Face \\(transformers\\) model"):  # (before a fine-tune
        resolve_model(str(tmp_path / "hf"), tmp_path / "scratch", "")  # replaces an earlier one's summary)
    out = pretrain_cli("export", str(tmp_path / "hf"), "--out", str(tmp_path / "copy"), cwd=tmp)  # (native format)
    assert out.returncode == 1 and "is a Hugging Face (transformers) model, not this project's" in out.stderr, \
        out.stdout + out.stderr[-2000:]
    assert not (tmp_path / "copy").exists()
    out = pretrain_cli("evaluate", str(tmp_path / "hf"), "--dataset", str(tmp / "ds"), cwd=tmp)
    assert out.returncode == 1 and "is a Hugging Face (transformers) model, not this project's" in out.stderr, \
        out.stderr[-2000:]
    out = pretrain_cli("evaluate", str(tmp / "ck"), "--dataset", str(tmp / "ds"), "--json",
                       str(tmp_path / "nodir" / "x.json"), cwd=tmp)
    assert out.returncode == 2 and f"the directory {tmp_path / 'nodir'} does not exist" in out.stderr


def _classifier(tmp, tmp_path):
    """One epoch of fine-tuning from the pretraining checkpoint, in this process."""
    from pretrain.config import FinetuneConfig
    from pretrain.finetune import finetune

    tree = yaml.safe_load((tmp / "finetune.yaml").read_text())
    tree.update(model=str(tmp / "ck"), output=str(tmp_path / "clf"), mlflow={"enabled": False})
    tree["train"]["epochs"] = 1
    return finetune(FinetuneConfig.model_validate(tree))["model"]


def _pulled(tmp, uri, tmp_path):
    from pretrain.tracking import model_files, pull

    return model_files(pull("models:/topic-bert/1", tmp_path / "pulled", uri))


def test_bad_model_and_task_files_are_clear_errors(registered, tmp_path):
    tmp, uri = registered
    cfg = str(tmp / "finetune.yaml")
    bad = tmp_path / "test.jsonl"
    bad.write_text('{"text": "a", "label": "animal"}\n{"text": "b", "label": "mineral"}\n')
    notes = tmp_path / "elsewhere" / "notes.txt"  # an output that holds files of its own: refused, nothing written
    notes.parent.mkdir()
    notes.write_text("keep")
    mine = tmp_path / "proj" / "model" / "mine.txt"  # an output whose model/ is not a model: nothing is replaced
    mine.parent.mkdir(parents=True)
    mine.write_text("keep")
    nowhere, alias, name, task, held, flags, proj, typo = pretrain_refusals(*[(tmp, ["finetune", cfg, *a]) for a in (
        [f"model={tmp_path / 'nowhere'}"],
        ["model=models:/topic-bert@no-such-alias"],
        ["model=models:/topic-brt@champion"],
        [f"model={tmp / 'ck'}", f"task.test={bad}", f"output={tmp_path / 'out'}"],
        [f"model={tmp / 'ck'}", f"output={notes.parent}"],
        [f"model={tmp / 'ck'}", "--alias", "champion"],
        [f"model={tmp / 'ck'}", f"output={tmp_path / 'proj'}"],
        [f"model={tmp / 'ck'}", "--registr", "topic-classifier"],  # the flag, not the `registry` section
    )])
    assert nowhere.returncode == 1 and "is neither a models:/ or runs:/ URI nor an existing directory" in nowhere.stderr
    assert alias.returncode == 1 and "cannot resolve models:/topic-bert@no-such-alias" in alias.stderr
    assert "(topic-bert has aliases: @champion (version 1); versions: 1)" in alias.stderr, alias.stderr
    assert name.returncode == 1 and "(the store has no model 'topic-brt'; its models: topic-bert" in name.stderr, \
        name.stderr
    assert task.returncode == 1 and f"{bad}:2: label 'mineral' does not occur in" in task.stderr, task.stderr[-2000:]
    assert not (tmp_path / "out").exists(), "the task is read before the model is fetched or anything is written"
    said = f"error: output {notes.parent} holds notes.txt, which a fine-tune did not write"
    assert held.returncode == 1 and said in held.stderr, held.stderr[-2000:]
    assert [p.name for p in notes.parent.iterdir()] == ["notes.txt"]
    assert flags.returncode == 2 and "registry.alias needs registry.name (--register NAME)" in flags.stderr, \
        flags.stderr
    assert proj.returncode == 1 and f"output {mine.parent} holds mine.txt, not a model directory" in proj.stderr, \
        proj.stderr[-2000:]
    assert mine.read_text() == "keep" and not (tmp_path / "proj" / "source").exists()
    assert typo.returncode == 2 and "error: unknown option --registr; did you mean --register?" in typo.stderr, \
        typo.stderr
