"""Config loading: YAML flow overrides, errors that name key/file/closest key, every shipped config valid."""

from __future__ import annotations

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


def test_file_plus_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inputs: [a.txt]\noutput: out\nexamples:\n  dupe_factor: 3\n")
    cfg = load_config(DataPrepConfig, f, ["examples.nsp=false", "--tokenizer.vocab_size", "1000"])
    assert cfg.examples.dupe_factor == 3 and cfg.examples.nsp is False and cfg.tokenizer.vocab_size == 1000
    assert cfg.examples.max_seq_length == 128  # untouched defaults stay
    assert flatten(cfg)["examples.dupe_factor"] == 3


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
