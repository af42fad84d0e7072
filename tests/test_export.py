"""Export: a DeepSpeed checkpoint of any ZeRO stage -> a standalone model directory, equal to the engine's weights."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import REPO, RunsCode, pretrain_cli, pretrain_config, run_pretrain
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage, nproc, precision", [(2, 2, "fp32"), (3, 2, "fp32"), (0, 1, "bf16")])
def test_export_equals_the_engine_to_the_bit(tmp_path, train_dataset, stage, nproc, precision, capsys):
    """Consolidated from any ZeRO stage; bf16 (fp32 weights under autocast) exports full precision without ZeRO."""
    cfg = tmp_path / "pretrain.yaml"
    cfg.write_text(yaml.safe_dump(pretrain_config(train_dataset, tmp_path / "ck", train__max_steps=6,
                                                  deepspeed__zero_stage=stage, debug__dump_weights=True,
                                                  precision=precision, mlflow__enabled=False)))
    out = run_pretrain(cfg, nproc=nproc)
    assert out.returncode == 0, out.stderr[-3000:]
    model_dir = tmp_path / "model"
    ex = pretrain_cli("export", str(tmp_path / "ck"), "--out", str(model_dir), cwd=REPO)
    assert ex.returncode == 0, ex.stderr[-3000:]
    assert "exported step 6" in ex.stdout
    from pretrain.export import ExportError, export

    for bad in (tmp_path / "ck", tmp_path, tmp_path / "ck" / "step-00000006" / "x"):
        with pytest.raises(ExportError, match="would overwrite the checkpoints"):
            export(tmp_path / "ck", bad)
    exported = load_file(str(model_dir / "model.safetensors"))
    engine = load_file(str(tmp_path / "ck" / "engine-weights.safetensors"))
    assert exported.keys() == engine.keys()
    for k in engine:
        assert torch.equal(exported[k], engine[k]), k
    assert all(v.dtype == torch.float32 for v in exported.values())

    from pretrain.export import load_model, verify

    assert verify(model_dir) == []
    model, config = load_model(model_dir)
    assert config["format"]["name"] == "bertforge-model" and config["special_ids"]["[MASK]"] == 4
    training = json.loads((model_dir / "training.json").read_text())
    assert training["step"] == 6 and "loss" in training["metrics"]
    dataset = json.loads((model_dir / "dataset.json").read_text())
    assert dataset["dataset_id"] == json.loads((train_dataset / "manifest.json").read_text())["dataset_id"]
    tok = "tokenizer/spm.model"
    assert (model_dir / tok).read_bytes() == (train_dataset / tok).read_bytes()
    if stage == 3:
        _consolidation_keeps_other_threads_output(tmp_path / "ck" / "step-00000006", stage, capsys)
    if stage == 2:  # a file changed in place (same size): its sha256 differs, and nothing is published
        import shutil

        shutil.copytree(tmp_path / "ck", tmp_path / "rot")
        states = next((tmp_path / "rot" / "step-00000006").glob("*optim_states.pt"))
        data = bytearray(states.read_bytes())
        data[len(data) // 2] ^= 0xFF
        states.write_bytes(bytes(data))
        with pytest.raises(ExportError, match=f"incomplete or damaged: {states.name} differs from its sha256"):
            export(tmp_path / "rot", tmp_path / "rotten-model")
        assert not (tmp_path / "rotten-model").exists()
    ids = torch.tensor([[2, 10, 11, 3, 12, 3]])
    mlm, nsp = model(ids, torch.tensor([[0, 0, 0, 0, 1, 1]]), torch.ones_like(ids), torch.tensor([1, 4]))
    assert mlm.shape == (2, model.bert.embeddings.word.weight.shape[0]) and nsp.shape == (1, 2)


def test_a_checkpoint_that_would_run_code_as_it_loads_is_refused(tmp_path, monkeypatch):
    """DeepSpeed's checkpoint files are pickles, and DeepSpeed loads them in full: ours are loaded weights-only, so
    one from elsewhere cannot run code; the trusted can be loaded in full on request."""
    from pretrain.checkpoint import CheckpointError
    from pretrain.engine import checkpoint_weights

    step = tmp_path / "step-00000006"
    step.mkdir()
    marker = tmp_path / "ran"
    torch.save({"module": {"w": torch.ones(2)}, "payload": RunsCode(marker)}, step / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match=r"step-00000006 holds more than tensors and plain values \(it asks "
                                              r"for .*\).*set BERTFORGE_TRUST_CHECKPOINTS=1 to load it"):
        checkpoint_weights(step, 0)
    assert not marker.exists()
    # a checkpoint of the version before, whose DeepSpeed config was pickled as our dict subclass: loaded as it is
    from pretrain.engine import _ReadKeys

    torch.save({"module": {"w": torch.ones(2)}, "ds_config": _ReadKeys({"train_batch_size": 8})},
               step / "mp_rank_00_model_states.pt")
    assert checkpoint_weights(step, 0)["w"].tolist() == [1.0, 1.0]
    torch.save({"module": {"w": torch.ones(2)}, "payload": RunsCode(marker)}, step / "mp_rank_00_model_states.pt")
    monkeypatch.setenv("BERTFORGE_TRUST_CHECKPOINTS", "1")
    assert checkpoint_weights(step, 0)["w"].tolist() == [1.0, 1.0] and marker.exists()


def _consolidation_keeps_other_threads_output(step_dir, stage, capsys):
    """DeepSpeed's consolidation chatter is held back; what another thread prints meanwhile (the tracker's lines,
    when training registers a checkpoint) is not; DeepSpeed's module is left as it was."""
    import functools
    import threading
    import time

    from deepspeed.utils import zero_to_fp32

    from pretrain.engine import checkpoint_weights

    stop, printed = threading.Event(), [0]

    def chatter():
        while not stop.is_set():
            print(f"line {printed[0]}")
            printed[0] += 1
            time.sleep(0.0005)

    original = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint

    @functools.wraps(original)  # (its module's output is the one held back)
    def overlapped(*args, **kwargs):  # the other thread prints while the block holds it back, however busy the CPUs
        start, deadline = printed[0], time.monotonic() + 30
        while printed[0] < start + 5 and time.monotonic() < deadline:
            time.sleep(0.001)
        return original(*args, **kwargs)

    capsys.readouterr()
    before = {name: zero_to_fp32.__dict__.get(name) for name in ("print", "tqdm")}
    thread = threading.Thread(target=chatter)
    thread.start()
    zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint = overlapped
    try:
        checkpoint_weights(step_dir, stage)
    finally:
        zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint = original
        stop.set()
        thread.join()
    out = capsys.readouterr()
    numbers = [int(line.split()[1]) for line in out.out.splitlines() if line.startswith("line ")]
    assert numbers == list(range(len(numbers))) and len(numbers) > 5, "lines of another thread went missing"
    assert "Processing zero checkpoint" not in out.out + out.err and "Loading checkpoint shards" not in out.err
    assert {name: zero_to_fp32.__dict__.get(name) for name in ("print", "tqdm")} == before


def test_output_swaps_in_two_threads_take_turns():
    """Two blocks capturing one module's output in different threads, the second entered while the first is
    inside: each restores what it found, so the module ends as it began (interleaved, the first's capture
    would stay behind)."""
    import io
    import threading
    import types

    from pretrain.engine import _output_of

    module = types.ModuleType("chatty")
    inside = {name: threading.Event() for name in ("a", "b")}
    leave = {name: threading.Event() for name in ("a", "b")}

    def block(name):
        with _output_of(module, io.StringIO()):
            inside[name].set()
            leave[name].wait(10)

    threads = {name: threading.Thread(target=block, args=(name,)) for name in ("a", "b")}
    threads["a"].start()
    assert inside["a"].wait(10)
    threads["b"].start()
    assert not inside["b"].wait(0.5), "a second block entered while the first held the module"
    leave["a"].set()
    threads["a"].join(10)
    assert inside["b"].wait(10)
    leave["b"].set()
    threads["b"].join(10)
    assert "print" not in module.__dict__ and "tqdm" not in module.__dict__


def test_publishing_over_a_model_keeps_the_earlier_one_whole_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    """Putting a new directory in place of an earlier one sets the earlier aside first: should the last step fail
    (a crash, a full disk), the earlier one is still whole (set aside beside it), not deleted or half deleted. The
    next publish clears what was set aside; a user's own OUT.old is never touched."""
    from pathlib import Path

    from pretrain.export import publish

    def directory(name: str, text: str) -> Path:
        d = tmp_path / name
        (d / "tokenizer").mkdir(parents=True)
        (d / "model.safetensors").write_text(text)
        (d / "tokenizer" / "spm.model").write_text(text)
        return d

    mine = tmp_path / "model.old" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("the user's")
    out = publish(directory("first.partial", "first"), tmp_path / "model")
    assert (out / "model.safetensors").read_text() == "first"
    rename = Path.rename

    def failing(self, target):
        if self.name == "second.partial":
            raise OSError(28, "No space left on device")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError):
        publish(directory("second.partial", "second"), tmp_path / "model")
    monkeypatch.undo()
    assert not (tmp_path / "model").exists()
    (kept,) = tmp_path.glob(".model.replaced-*/model")
    assert (kept / "model.safetensors").read_text() == "first" and (kept / "tokenizer" / "spm.model").is_file()
    out = publish(directory("third.partial", "third"), tmp_path / "model")
    assert (out / "model.safetensors").read_text() == "third" and not list(tmp_path.glob(".model.replaced-*"))
    assert mine.read_text() == "the user's"


def test_a_commit_record_names_what_it_lacks(tmp_path):
    from pretrain.checkpoint import problems

    step = tmp_path / "step-00000001"
    step.mkdir()
    assert problems(step) == ["commit.json is missing"]
    for text, why in (("{", "commit.json is not valid JSON"), ("[]", "commit.json has no file list"),
                      ('{"step": 1}', "commit.json has no file list"), ('{"files": {"a": 3}}', "a is missing")):
        (step / "commit.json").write_text(text)
        assert problems(step) == [why], text


def test_a_checkpoint_whose_records_lack_keys_is_named(tmp_path):
    """A committed checkpoint whose client record or manifest copy lacks what export reads: an error naming the
    file and the keys, not a KeyError."""
    from pretrain.export import ExportError, export

    step = tmp_path / "ck" / "step-00000001"
    step.mkdir(parents=True)

    def record(client: dict) -> None:
        (step / "client.json").write_text(json.dumps(client))
        (step / "commit.json").write_text(json.dumps({"files": {"client.json": (step / "client.json").stat().st_size}}))

    record({"step": 1, "model": {}})
    with pytest.raises(ExportError, match=r"client.json lacks config.deepspeed.zero_stage, mlflow_run_id, samples"):
        export(step, tmp_path / "out")
    record({"step": 1, "samples": 8, "mlflow_run_id": None, "model": {}, "config": {"deepspeed": {"zero_stage": 1}}})
    (tmp_path / "ck" / "tokenizer").mkdir()
    (tmp_path / "ck" / "tokenizer" / "spm.model").write_bytes(b"x")
    (tmp_path / "ck" / "manifest.json").write_text('{"format": {"name": "bert-pretraining-webdataset"}}')
    with pytest.raises(ExportError, match=r"manifest.json' is not a complete manifest: key .* is missing.*; copy"):
        export(step, tmp_path / "out")


def test_a_damaged_model_directory_is_refused(tmp_path):
    from pretrain.export import ExportError, export, load_model

    with pytest.raises(ExportError, match="neither a committed checkpoint"):
        export(tmp_path, tmp_path / "out")
    with pytest.raises(ExportError, match="checkpoints/quickstrat' does not exist: give a committed checkpoint"):
        export(tmp_path / "checkpoints" / "quickstrat", tmp_path / "out")  # a typo
    (tmp_path / "m").mkdir()
    with pytest.raises(ExportError, match="checksums.json is missing"):
        load_model(tmp_path / "m")


def test_a_model_config_of_other_sizes_than_its_weights_is_refused_before_it_is_built(tmp_path):
    """A model directory whose config.json (its checksums rewritten with it) gives sizes its weights do not have is
    refused by comparing shapes with the weights file's header, before a model of the config's size is allocated
    (an intermediate size of a billion would take gigabytes)."""
    import dataclasses
    import hashlib

    from pretrain.export import CHECKSUMS, CONFIG_FILE, FORMAT, ExportError, load_model, write_model_dir
    from pretrain.model import BertForPretraining
    from pretrain.presets import preset

    c = preset("tiny", 500)
    (tmp_path / "spm.model").write_bytes(b"(a tokenizer's bytes)")
    d = write_model_dir(tmp_path / "m", BertForPretraining(c).state_dict(), tmp_path / "spm.model",
                        config={"format": FORMAT, "model": dataclasses.asdict(c)}, dataset={}, training={})
    assert load_model(d)[0].bert.embeddings.word.weight.shape[0] == c.vocab_size
    config = json.loads((d / CONFIG_FILE).read_text())
    config["model"]["intermediate_size"] = 10**9
    (d / CONFIG_FILE).write_text(json.dumps(config))
    sums = json.loads((d / CHECKSUMS).read_text())
    sums[CONFIG_FILE] = hashlib.sha256((d / CONFIG_FILE).read_bytes()).hexdigest()
    (d / CHECKSUMS).write_text(json.dumps(sums))
    with pytest.raises(ExportError, match=r"config.json describes other weights than .*model.safetensors holds \(.*"
                                          r"1000000000.*\): the directory's files do not belong together"):
        load_model(d)


def test_out_holding_other_files_is_refused_not_replaced(tmp_path, capsys, monkeypatch):
    """export and pull write --out whole (replacing an earlier model directory there); a directory holding
    anything else is refused before any work, and keeps its files. (The command line, in this process.)"""
    from pretrain.cli import main

    mine = tmp_path / "project"
    (mine / "notes").mkdir(parents=True)
    (mine / "a.txt").write_text("keep me")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for args in (["export", str(tmp_path / "no-checkpoint")], ["export", "models:/x@y", "--format", "hf"],
                 ["pull", "models:/x@y"]):
        assert main([*args, "--out", str(mine)]) == 1, args
        err = capsys.readouterr().err
        assert f"--out {mine} holds a.txt, notes, not a model directory" in err, (args, err)
        assert (mine / "a.txt").read_text() == "keep me" and (mine / "notes").is_dir()
    (mine / "config.json").write_text("{}")  # a common name: not enough to be taken for a model directory
    assert main(["export", str(tmp_path / "no-checkpoint"), "--out", str(mine)]) == 1
    assert "not a model directory" in capsys.readouterr().err and (mine / "a.txt").is_file()
    earlier = tmp_path / "earlier"  # an earlier model directory: replaced (here the source is missing, so kept)
    earlier.mkdir()
    (earlier / "config.json").write_text("{}")
    (earlier / "checksums.json").write_text("{}")
    assert main(["export", str(tmp_path / "no-checkpoint"), "--out", str(earlier)]) == 1
    assert f"'{tmp_path / 'no-checkpoint'}' does not exist: give a committed checkpoint" in capsys.readouterr().err
