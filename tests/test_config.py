"""Config loading: YAML flow overrides, errors that name key/file/closest key, every shipped config valid."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import REPO
from data_prep.config import DataPrepConfig
from data_prep.configfile import ConfigError, config_hash, flatten, load_config, parse_overrides


def test_overrides_are_yaml_flow_values():
    got = dict(parse_overrides([
        'inputs=["a.jsonl","b/*.txt"]', "examples.nsp=false", "--seed", "7", "--tokenizer.path=x.model",
        "ray.address=", "val_fraction=0.05",
    ]))
    assert got == {"inputs": ["a.jsonl", "b/*.txt"], "examples.nsp": False, "seed": 7,
                   "tokenizer.path": "x.model", "ray.address": "", "val_fraction": 0.05}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["oops"])
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--seed"])


def test_a_mapping_for_a_section_sets_the_keys_it_names(tmp_path):
    """`train={max_steps: 10}` sets train.max_steps as `train.max_steps=10` would: the file's other train keys
    stay (it used to replace the whole section with defaults), and a typo inside it is named by its dotted key."""
    from pretrain.config import PretrainConfig, TrainConfig

    base = load_config(PretrainConfig, REPO / "configs/pretrain/quickstart.yaml", [])
    got = load_config(PretrainConfig, REPO / "configs/pretrain/quickstart.yaml",
                      ["train.global_batch_size=64", "train={max_steps: 10}"])
    assert got.train.max_steps == 10 and got.train.global_batch_size == 64 and got.train.lr == base.train.lr
    assert base.train.lr != TrainConfig().lr  # (the file's own value, not the default)
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_stepz' \(in command line\); did you mean "
                                          r"'train.max_steps'"):
        load_config(PretrainConfig, REPO / "configs/pretrain/quickstart.yaml", ["train={max_stepz: 10}"])
    with pytest.raises(ConfigError, match=r"'train' \(in command line\) is a section, not a value \(got 3\): set its "
                                          r"keys, e.g. train.max_steps=VALUE \(its keys: max_steps, micro_batch_size"):
        load_config(PretrainConfig, REPO / "configs/pretrain/quickstart.yaml", ["train=3"])


def test_file_plus_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inputs: [a.txt]\noutput: out\nexamples:\n  dupe_factor: 3\n")
    cfg = load_config(DataPrepConfig, f, ["examples.nsp=false", "--tokenizer.vocab_size", "1000"])
    assert cfg.examples.dupe_factor == 3 and cfg.examples.nsp is False and cfg.tokenizer.vocab_size == 1000
    assert cfg.examples.max_seq_length == 128  # untouched defaults stay
    assert flatten(cfg)["examples.dupe_factor"] == 3


def test_a_directory_or_a_second_file_is_named_as_such(tmp_path):
    """A folder of configs given as the config, or two config files (a shell glob): each said for what it is, not
    as a missing file or an unreadable override."""
    for name in ("b.yaml", "a.yaml"):
        (tmp_path / name).write_text("inputs: [a.txt]\noutput: out\n")
    with pytest.raises(ConfigError, match=r"is a directory: give one file of it \(a.yaml, b.yaml\)"):
        load_config(DataPrepConfig, tmp_path)
    with pytest.raises(ConfigError, match=f"'{tmp_path / 'b.yaml'}' is a second config file: a command takes one"):
        load_config(DataPrepConfig, tmp_path / "a.yaml", [str(tmp_path / "b.yaml")])


def test_typo_names_key_source_and_closest_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inputs: [a.txt]\noutput: out\nexamples:\n  max_seq_lenght: 256\n")
    with pytest.raises(ConfigError) as e:
        load_config(DataPrepConfig, f)
    msg = str(e.value)
    assert "examples.max_seq_lenght" in msg and str(f) in msg and "did you mean 'examples.max_seq_length'" in msg
    with pytest.raises(ConfigError) as e:
        load_config(DataPrepConfig, f.with_name("none.yaml"))
    assert "does not exist" in str(e.value)
    f.write_text("inputs: [a.txt]\noutput: out\n")
    with pytest.raises(ConfigError) as e:
        load_config(DataPrepConfig, f, ["tokenizr.vocab_size=5"])
    assert "command line" in str(e.value) and "did you mean 'tokenizer'" in str(e.value)
    f.write_text("inputs: [a.txt\noutput: out\n")  # a YAML syntax error: YAML's marks name the file
    with pytest.raises(ConfigError) as e:
        load_config(DataPrepConfig, f)
    assert f'in "{f}", line 1' in str(e.value) and "<unicode string>" not in str(e.value)


def test_bad_values_name_the_valid_choices(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inputs: [a.txt]\noutput: out\n")
    with pytest.raises(ConfigError) as e:
        load_config(DataPrepConfig, f, ["tokenizer.model_type=wordpiece", "examples.masked_lm_prob=1.5"])
    msg = str(e.value)
    assert "tokenizer.model_type" in msg and "'unigram' or 'bpe'" in msg and "wordpiece" in msg
    assert "examples.masked_lm_prob" in msg and "less than 1" in msg
    with pytest.raises(ConfigError, match="output"):
        load_config(DataPrepConfig, None, ["inputs=[a.txt]"])
    with pytest.raises(ConfigError, match="max_predictions_per_seq"):
        load_config(DataPrepConfig, f, ["examples.max_seq_length=16", "examples.max_predictions_per_seq=20"])


def test_locations_are_never_empty_and_name_local_paths(tmp_path, monkeypatch):
    """An empty location (an unset `${VAR}`) is refused rather than meaning the working directory; `file://` URLs
    and `~` name the local paths they mean, in every config; object-store URLs are kept as they are."""
    from pretrain.config import FinetuneConfig, PretrainConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError) as e:
        load_config(DataPrepConfig, None, ['inputs=["a.txt", ""]', "output="])
    assert "'inputs.1' (in command line): String should have at least 1 character" in str(e.value)
    assert "'output' (in command line): String should have at least 1 character" in str(e.value)
    cfg = load_config(DataPrepConfig, None, ["inputs=[a.txt]", "output=file:///data/ds", "tokenizer.path=~/t.model"])
    assert cfg.output == "/data/ds" and cfg.tokenizer.path == str(tmp_path / "t.model")
    assert load_config(DataPrepConfig, None, ["inputs=[a.txt]", "output=s3://b/ds"]).output == "s3://b/ds"
    pre = load_config(PretrainConfig, None, ["data.dataset=~/ds", "checkpoint.dir=file:///ckpt"])
    assert pre.data.dataset == str(tmp_path / "ds") and pre.checkpoint.dir == "/ckpt"
    fine = load_config(FinetuneConfig, None, ["model=m", "task.train=file:///t.jsonl", "output=~/out"])
    assert fine.task.train == "/t.jsonl" and fine.output == str(tmp_path / "out")
    with pytest.raises(ConfigError, match="'checkpoint.dir' .*at least 1 character"):
        load_config(PretrainConfig, None, ["data.dataset=d", "checkpoint.dir="])


def test_content_hash_ignores_where_and_how_fast():
    a = DataPrepConfig(inputs=["a"], output="x")
    b = DataPrepConfig(inputs=["a"], output="y", ray={"num_cpus": 1, "address": "ray://h:10001"})
    assert a.content_hash() == b.content_hash()
    assert a.content_hash() != DataPrepConfig(inputs=["a"], output="x", seed=1).content_hash()
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "data_prep").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_data_prep_config_is_valid(path: Path):
    cfg = load_config(DataPrepConfig, path)
    assert cfg.inputs and cfg.output


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_pretrain_config_is_valid(path: Path):
    from pretrain.config import PretrainConfig
    from pretrain.engine import batching

    cfg = load_config(PretrainConfig, path)
    assert cfg.data.dataset and cfg.checkpoint.dir
    assert batching(cfg, 1).global_batch == cfg.train.global_batch_size


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "finetune").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_finetune_config_is_valid(path: Path):
    from pretrain.config import FinetuneConfig

    cfg = load_config(FinetuneConfig, path, ["model=models:/other@champion"])
    assert cfg.model == "models:/other@champion" and cfg.task.train and cfg.init == "pretrained"


def test_finetune_config_errors_name_the_key():
    from pretrain.config import FinetuneConfig

    base = REPO / "configs" / "finetune" / "classify.yaml"
    with pytest.raises(ConfigError, match=r"init.*'pretrained' or 'random'"):
        load_config(FinetuneConfig, base, ["init=scratch"])
    with pytest.raises(ConfigError, match="registry.name needs mlflow.enabled"):
        load_config(FinetuneConfig, base, ["registry.name=x", "mlflow.enabled=false"])
    with pytest.raises(ConfigError, match="fp16 needs deepspeed.enabled"):
        load_config(FinetuneConfig, base, ["precision=fp16"])
    with pytest.raises(ConfigError, match="task.text_feild"):
        load_config(FinetuneConfig, base, ["task.text_feild=x"])
    with pytest.raises(ConfigError, match=r"deepspeed.config.gradient_accumulation_steps is set from "
                                          r"train.micro_batch_size \(fine-tuning does not accumulate\)"):
        load_config(FinetuneConfig, base, ["deepspeed.config={gradient_accumulation_steps: 2}"])


def test_deepspeed_passthrough_keeps_to_what_the_config_does_not_set():
    """deepspeed.config may add DeepSpeed keys, not replace the ones the config's keys set; DeepSpeed's refusal of
    a merged key names it, other DeepSpeed errors are left as they are."""
    from pydantic import BaseModel, ValidationError

    from pretrain.config import PretrainConfig
    from pretrain.engine import _about

    for extra, ours in (("{optimizer: {type: Adam}}", "train.optimizer"), ("{gradient_clipping: 5}", "train.grad_clip"),
                        ("{zero_optimization: {stage: 3}}", "deepspeed.zero_stage"),
                        ("{gradient_accumulation_steps: 4}", "train.global_batch_size and train.micro_batch_size: "
                                                             "set that instead")):
        with pytest.raises(ConfigError, match=f"is set from {ours}"):
            load_config(PretrainConfig, None, ["data.dataset=d", f"deepspeed.config={extra}"])
    cfg = load_config(PretrainConfig, None, ["data.dataset=d", "deepspeed.config={zero_optimization: {overlap_comm: "
                                             "false}, bf16: {enabled: true}, torch_autocast: {enabled: false}}"])
    assert cfg.deepspeed.config["bf16"] == {"enabled": True}

    class Strict(BaseModel):
        n: int

    with pytest.raises(ValidationError) as refused:
        Strict(n="many")
    merged = ["deepspeed.config.zero_optimization.overlap_comm"]
    assert _about(refused.value, merged) and _about(AssertionError("overlap_comm needs ZeRO >= 1"), merged)
    assert not _about(AssertionError("a tensor of the model is not on the device"), merged)
    assert not _about(refused.value, [])


def test_pretrain_batch_arithmetic_and_schedules():
    from pretrain.config import PretrainConfig
    from pretrain.engine import Schedule, SetupError, batching, ds_config

    cfg = PretrainConfig(data={"dataset": "d"}, train={"micro_batch_size": 8, "global_batch_size": 64})
    b = batching(cfg, 4)
    assert (b.micro, b.accumulation, b.global_batch) == (8, 2, 64)
    ds = ds_config(cfg, b, "bf16", __import__("torch").device("cpu"))
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (8, 2, 64)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    assert ds["zero_optimization"]["stage"] == 1
    with pytest.raises(SetupError, match=r"multiple of train.micro_batch_size x ranks \(8 x 3 = 24\).*=72"):
        batching(cfg, 3)
    cfg.deepspeed.config = {"zero_optimization": {"reduce_bucket_size": 7}}
    assert ds_config(cfg, b, "fp32", __import__("torch").device("cpu"))["zero_optimization"] == {
        **ds["zero_optimization"], "reduce_bucket_size": 7}
    for kind in ("linear", "cosine", "poly"):
        s = Schedule(kind, warmup=10, total=110, min_ratio=0.1)
        assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0) and s(10) == pytest.approx(1.0)
        assert s(110) == pytest.approx(0.1) and 0.1 < s(60) < 1.0
    assert Schedule("cosine", 0, 100)(50) == pytest.approx(0.5)
    assert Schedule("constant", 5, 100)(99) == 1.0


def test_pretrain_config_errors_name_the_key(tmp_path: Path):
    from pretrain.config import PretrainConfig

    f = tmp_path / "p.yaml"
    f.write_text("data: {dataset: d}\ntrain: {micro_batch_size: 8}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model.layers'.*did you mean 'model.num_layers'"):
        load_config(PretrainConfig, f, ["model.layers=3"])
    with pytest.raises(ConfigError, match=r"'model.preset'.*'tiny', 'mini'"):
        load_config(PretrainConfig, f, ["model.preset=huge"])
    with pytest.raises(ConfigError, match="offload_optimizer needs deepspeed.zero_stage >= 1"):
        load_config(PretrainConfig, f, ["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"])
    # a check across keys names each one and where its value came from
    with pytest.raises(ConfigError, match=r"\n  train.global_batch_size \(20\) is not a multiple of "
                                          r"train.micro_batch_size \(8\): set it to 16 or 24 \(on one process; "
                                          r".*\(train.global_batch_size: command line; "
                                          rf"train.micro_batch_size: {f}\)$"):
        load_config(PretrainConfig, f, ["train.global_batch_size=20"])
    with pytest.raises(ConfigError, match=r"model.hidden_size \(256\) is not a multiple of model.num_heads \(5\) "
                                          r"\(model.hidden_size: default; model.num_heads: command line\)"):
        load_config(PretrainConfig, f, ["model.preset=mini", "model.num_heads=5"])
    with pytest.raises(ConfigError, match=r"'data' \(in defaults\): Field required"):
        load_config(PretrainConfig, None, [])
    with pytest.raises(ConfigError, match="alias 'latest' is reserved by MLflow"):
        load_config(PretrainConfig, f, ["registry.name=m", "registry.alias=Latest"])
    # MLflow's other rules, before any training rather than at registration after it
    for over, said in {"registry.alias=v9": r"'v9' is reserved by MLflow \(models:/NAME@v9 means version 9\)",
                       "registry.alias=a b": "aliases hold letters, digits, '_' and '-' only",
                       "registry.name=team/bert": "names are not empty and hold no '/', ':' or quotes",
                       "registry.name=o'brien": "names are not empty and hold no '/', ':' or quotes"}.items():
        with pytest.raises(ConfigError, match=said):
            load_config(PretrainConfig, f, ["registry.name=m", over])
    assert load_config(PretrainConfig, f, ["registry.name=m", "registry.alias=prod_v2-b"]).registry.alias == "prod_v2-b"
    with pytest.raises(ConfigError, match="train.compile=true cannot run under ZeRO-3"):
        load_config(PretrainConfig, f, ["train.compile=true", "deepspeed.zero_stage=3"])
    assert load_config(PretrainConfig, f, ["deepspeed.zero_stage=3"]).train.compile == "auto"
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(PretrainConfig, f, ["train.compile=sometimes"])
    with pytest.raises(ConfigError, match="train.varlen_attention=true .* needs train.unpad=true"):
        load_config(PretrainConfig, f, ["train.varlen_attention=true", "train.unpad=false"])
    with pytest.raises(ConfigError, match="registry.when=best needs evaluation"):
        load_config(PretrainConfig, f, ["registry.name=m", "registry.when=best", "data.eval_examples=0"])
    cfg = load_config(PretrainConfig, f, ["model.preset=tiny", "model.num_layers=3"])
    built = cfg.model.build(vocab_size=100)
    assert (built.num_layers, built.hidden_size, built.vocab_size) == (3, 128, 128)


def test_registry_names_are_checked_before_any_work(tmp_path):
    """`pretrain register` and a pipeline job refuse what MLflow would refuse, before touching a store or training."""
    import subprocess
    import sys

    from conftest import pretrain_cli

    r = pretrain_cli("register", "--checkpoint", str(tmp_path), "--name", "m", "--alias", "V2", cwd=tmp_path)
    assert r.returncode == 2 and "the alias 'V2' is reserved by MLflow" in r.stderr, r.stderr
    assert not (tmp_path / "mlflow.db").exists()
    r = subprocess.run([sys.executable, "-m", "cluster", "validate", "configs/jobs/quickstart.yaml",
                        "stages.registry.name=team/bert"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "'team/bert': MLflow names are not empty and hold no '/', ':' or quotes" in r.stderr, r.stderr


def test_data_prep_run_takes_overwrite_before_or_after_the_config():
    from data_prep.cli import _parser

    before = _parser().parse_args(["run", "--overwrite", "c.yaml", "output=x"])
    assert before.overwrite and before.config == "c.yaml" and before.overrides == ["output=x"]
    after = _parser().parse_args(["run", "c.yaml", "output=x", "--overwrite"])
    assert not after.overwrite and after.overrides == ["output=x", "--overwrite"]  # (_run reads it from there)


@pytest.mark.parametrize("argv", [["train", "c.yaml", "train.lr=1e-4", "--help"], ["finetune", "c.yaml", "-h"]])
def test_help_after_the_config_is_the_commands_help(argv, capsys):
    """(REMAINDER takes what follows CONFIG as overrides: --help there is help, not an override without a value.)"""
    from pretrain.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and f"usage: python -m pretrain {argv[0]} [-h] config" in capsys.readouterr().out


CHECK_WITHOUT_TORCH = """
import sys
from cluster.cli import main as cluster
from pretrain.cli import main as pretrain
codes = [pretrain(["train", "configs/pretrain/quickstart.yaml", "train.optimiser=lamb"]),
         pretrain(["finetune", "configs/finetune/classify.yaml", "init=scratch"]),
         cluster(["validate", "configs/jobs/quickstart.yaml"]),  # its task files read and checked
         cluster(["validate", "configs/jobs/quickstart.yaml", "stages.finetune.overrides.task.test=data/task/tset.jsonl"])]
print(codes, sorted(m for m in ("torch", "deepspeed", "ray", "mlflow") if m in sys.modules))
codes.append(pretrain(["pull", "models:/x/1", "--out", "x", "--tracking-uri", "sqlite:///no/such/mlflow.db"]))
print(codes, sorted(m for m in ("torch", "deepspeed", "ray") if m in sys.modules))  # a pull loads no weights
"""


def test_a_config_is_checked_without_loading_torch(tmp_path):
    """A bad override is reported at once, and a cluster job validates (its fine-tuning task's files read and
    checked), without importing torch (seconds); a pull needs MLflow but not torch. A task file that is not on this
    machine is named, not checked."""
    import shutil
    import subprocess
    import sys

    from conftest import write_topic_task

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    write_topic_task(tmp_path / "data" / "task", rows=20)
    out = subprocess.run([sys.executable, "-c", CHECK_WITHOUT_TORCH], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-2:] == ["[2, 2, 0, 0] []", "[2, 2, 0, 0, 1] []"], out.stdout + out.stderr[-2000:]
    assert out.stdout.count("note: not on this machine") == 1 and "not on this machine: task.test " \
        f"{tmp_path / 'data/task/tset.jsonl'}; so the task's files were not checked here (the job checks them where " \
        "it runs). If it should be here, check the path" in out.stdout, out.stdout
    assert "unknown key 'train.optimiser'" in out.stderr and "'pretrained' or 'random'" in out.stderr
    assert "there is no MLflow store" in out.stderr


CTRL_C_WHILE_LOADING = """
import importlib.abc, os, runpy, signal, sys

loading, sys.argv = sys.argv[1], sys.argv[2:]

class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == loading:
            os.kill(os.getpid(), signal.SIGINT)  # a person pressing Ctrl-C while that library loads
        return None

sys.meta_path.insert(0, CtrlC())
if sys.argv[0].startswith("entry:"):  # a console script's function (bert-pretrain: entry:pretrain_command)
    from data_prep import entry

    getattr(entry, sys.argv[0].removeprefix("entry:"))()
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("loading, command", [
    ("mlflow", ["pretrain", "pull", "models:/x/1", "--out", "x"]),
    ("pydantic", ["data_prep", "run", "configs/data_prep/quickstart.yaml"]),
    ("pydantic", ["cluster", "validate", "configs/jobs/quickstart.yaml"]),
    ("mlflow", ["entry:pretrain_command", "pull", "models:/x/1", "--out", "x"]),
    ("pydantic", ["entry:data_prep_command", "run", "configs/data_prep/quickstart.yaml"]),
])
def test_ctrl_c_while_the_libraries_load_is_one_line(tmp_path, loading, command):
    """Ctrl-C in the first second of a command, before the command itself handles it: exit 130 and one line, no
    traceback."""
    import subprocess
    import sys

    (tmp_path / "mlflow.db").touch()  # (a store for the pull to find: it loads MLflow only once it has one)
    out = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_LOADING, loading, *command], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI":
                              f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert out.returncode == 130 and out.stderr == "interrupted\n", (out.returncode, out.stderr[-3000:])


BROKEN_SOCKET = """
import socket, sys, types

def main():  # a command whose own connection breaks (a server that went away), its standard output intact
    mine, theirs = socket.socketpair()
    theirs.close()
    while True:
        mine.sendall(bytes(65536))

sys.modules["brokencli"] = types.SimpleNamespace(main=main)
from data_prep.entry import run_main

run_main("brokencli")
"""


def test_a_broken_pipe_of_the_commands_own_is_an_error():
    """Only standard output's reader going away (`| head`) ends a command quietly with 0: a connection of its own
    that breaks is reported, and the command fails."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", BROKEN_SOCKET], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "BrokenPipeError" in out.stderr, (out.returncode, out.stderr[-2000:])


def test_the_console_scripts_are_the_python_m_commands():
    """`bert-data-prep`, `bert-pretrain` and `bert-cluster` (installed beside python) run as `python -m` does:
    their help, and an unknown key answered with its closest one (exit 2), not a traceback."""
    import subprocess
    import sys

    bindir = Path(sys.executable).parent
    for script, words in (("bert-data-prep", "demo-corpus"), ("bert-pretrain", "finetune"), ("bert-cluster", "submit")):
        function = script.removeprefix("bert-").replace("-", "_") + "_command"
        assert f"from data_prep.entry import {function}" in (bindir / script).read_text(), script
        out = subprocess.run([str(bindir / script), "--help"], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert out.returncode == 0 and words in out.stdout, (script, out.stdout, out.stderr[-2000:])
    bad = subprocess.run([str(bindir / "bert-pretrain"), "train", "configs/pretrain/quickstart.yaml",
                          "train.max_stepz=1"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode == 2 and "did you mean 'train.max_steps'" in bad.stderr, bad.stderr[-2000:]


def test_published_configs_carry_no_url_passwords():
    """MLflow params and artifacts and a model's training.json are read by everyone with access to the store: the
    password of a URL in a config (a database-backed tracking store's) is replaced; the rest is kept as it is."""
    from data_prep.configfile import flatten, redact_secrets
    from pretrain.config import PretrainConfig

    cfg = PretrainConfig(data={"dataset": "s3://bucket/ds"},
                         mlflow={"tracking_uri": "postgresql://mlflow:Sup3r:s3cret@db.internal:5432/mlflow"})
    public = flatten(redact_secrets(cfg))
    assert public["mlflow.tracking_uri"] == "postgresql://mlflow:***@db.internal:5432/mlflow"
    assert public["data.dataset"] == "s3://bucket/ds" and "Sup3r" not in str(public)
    kept = ["https://token@host/x", "http://h:5000/", 3]  # (no password: as they are)
    assert redact_secrets(kept) == kept
    from pretrain.tracking import how_to_see, shown  # (and in what is printed)

    assert shown(cfg.mlflow.tracking_uri) == "postgresql://mlflow:***@db.internal:5432/mlflow"
    assert "Sup3r" not in how_to_see(cfg.mlflow.tracking_uri)
    assert "pw@" not in how_to_see("https://u:pw@mlflow.internal")
