"""The whole data-prep job on a small generated corpus with a real local Ray, read back with stock webdataset."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import BUCKET, REPO, RunsCode, run_cli, small_config
from data_prep.config import CLS_ID, MASK_ID, SEP_ID

pytestmark = pytest.mark.slow


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative name (manifest included: it holds no path or CPU count)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def config_file(reference: Path, out: Path, path: Path, **ray) -> Path:
    """A config file that rebuilds `reference`'s dataset into `out` (the manifest holds every content key)."""
    cfg = json.loads((reference / "manifest.json").read_text())["config"]
    cfg.update(output=str(out), ray=ray)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def built(small_dataset):
    """One dataset built in-process (shared Ray), reused by the read-back tests."""
    return small_dataset


def test_dataset_layout_manifest_and_report(built):
    cfg, corpus, root, summary = built
    m = json.loads((root / "manifest.json").read_text())
    report = json.loads((root / "report.json").read_text())
    assert not (root / ".work").exists()
    assert m["config_hash"] == cfg.content_hash() and m["config"] == cfg.content()
    assert "output" not in m["config"] and "ray" not in m["config"]
    assert [s["path"] for s in m["sources"]] == sorted(str(p) for p in corpus.iterdir())
    assert all(s["bytes"] > 0 for s in m["sources"])
    on_disk = sorted(f"{d}/{p.name}" for d in ("train", "val") for p in (root / d).iterdir())
    listed = sorted(s["name"] for sp in m["splits"].values() for s in sp["shards"])
    assert on_disk == listed
    for sp in m["splits"].values():
        assert sp["examples"] == sum(s["examples"] for s in sp["shards"])
        assert all(s["examples"] <= cfg.shards.examples_per_shard for s in sp["shards"])
    assert m["splits"]["val"]["examples"] > 0 and m["splits"]["train"]["examples"] > 5 * m["splits"]["val"]["examples"]
    assert m["tokenizer"]["sha256"] == hashlib.sha256((root / "tokenizer/spm.model").read_bytes()).hexdigest()
    assert report["documents"] == 120
    assert report["examples"] == {k: v["examples"] for k, v in m["splits"].items()}
    assert 0.4 < report["nsp"]["random_next_fraction"] < 0.7
    assert sum(report["length_histogram"]["counts"].values()) == sum(report["examples"].values())
    assert len(report["files"]) == 4 and report["bad_input"] == {}
    assert summary["dataset_id"] == m["dataset_id"]
    from data_prep.dataset import verify

    assert verify(root) == []


def test_stock_webdataset_reads_every_example(built):
    import numpy as np
    import webdataset as wds

    cfg, _, root, _ = built
    m = json.loads((root / "manifest.json").read_text())
    urls = [str(root / s["name"]) for s in m["splits"]["train"]["shards"]]
    n = 0
    keys = set()
    dtype = m["examples"]["token_dtype"]
    for sample in wds.WebDataset(urls, shardshuffle=False).decode(only=["mp"]):
        s = sample["mp"]
        keys.add(sample["__key__"])
        ids = np.frombuffer(s["input_ids"], dtype)
        b = s["segment_b_start"]
        assert ids[0] == CLS_ID and ids[-1] == SEP_ID and ids[b - 1] == SEP_ID
        assert len(ids) <= cfg.examples.max_seq_length
        pos = np.frombuffer(s["masked_lm_positions"], m["examples"]["position_dtype"])
        labels = np.frombuffer(s["masked_lm_ids"], dtype)
        assert 1 <= len(pos) <= cfg.examples.max_predictions_per_seq and len(pos) == len(labels)
        assert (np.diff(pos.astype(int)) > 0).all()
        assert (ids[pos] == MASK_ID).mean() > 0 or len(pos) < 3
        assert s["next_sentence_label"] in (0, 1)
        n += 1
    assert n == m["splits"]["train"]["examples"] and len(keys) == n


def test_rerun_same_config_is_a_no_op(built, ray_local):
    from data_prep.pipeline import run

    cfg, _, root, _ = built
    before = tree_digest(root)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*.tar")}
    run(cfg)
    assert tree_digest(root) == before
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.tar")} == mtimes, "finished shards are not rewritten"


def test_other_config_into_same_dir_is_refused(built):
    from data_prep.dataset import DatasetError
    from data_prep.pipeline import run

    cfg, corpus, root, _ = built
    before = tree_digest(root)
    with pytest.raises(DatasetError, match="different dataset.*--overwrite"):
        run(small_config(corpus, root, seed=99))
    assert tree_digest(root) == before


def test_a_pool_is_also_full_at_its_size_in_characters(built, tmp_path, monkeypatch):
    """Pools hold examples.pool_documents documents, or fewer where their text reaches MAX_POOL_CHARS (memory stays
    bounded for long documents); every document is still written."""
    from data_prep import worker
    from data_prep.sources import expand_inputs

    cfg, corpus, root, _ = built
    unit = worker.plan_units(expand_inputs(cfg.inputs), cfg.shards.group_bytes)[0]
    docs, _ = worker.read_unit(unit, cfg)
    chars = [sum(map(len, d)) for d in docs]
    real, pools = worker._write_window, []
    monkeypatch.setattr(worker, "_write_window", lambda tokens, ids, *rest: (pools.append(len(ids)),
                                                                             real(tokens, ids, *rest)))
    worker.write_unit(unit, cfg, str(root / "tokenizer/spm.model"), str(tmp_path / "a"))
    by_count, pools[:] = list(pools), []
    monkeypatch.setattr(worker, "MAX_POOL_CHARS", 4 * max(chars))
    worker.write_unit(unit, cfg, str(root / "tokenizer/spm.model"), str(tmp_path / "b"))
    assert max(by_count) == cfg.examples.pool_documents and max(pools) < cfg.examples.pool_documents, pools
    assert len(pools) > len(by_count) and sum(pools) == sum(by_count) == len(chars)


def test_same_bytes_whatever_the_task_split(built, tmp_path):
    """Units run serially in reverse order in this process give the bytes Ray's parallel tasks gave."""
    from data_prep.dataset import build_manifest, build_report
    from data_prep.sources import expand_inputs
    from data_prep.worker import plan_units, write_unit

    cfg, corpus, root, _ = built
    tok = root / "tokenizer/spm.model"
    units = plan_units(expand_inputs(cfg.inputs), cfg.shards.group_bytes)
    assert len(units) >= 3
    records = {u.index: write_unit(u, cfg, str(tok), str(tmp_path)) for u in reversed(units)}
    for split in ("train", "val"):
        for p in (root / split).iterdir():
            assert (tmp_path / split / p.name).read_bytes() == p.read_bytes()
    m = json.loads((root / "manifest.json").read_text())
    again = build_manifest(cfg, expand_inputs(cfg.inputs), m["tokenizer"]["sha256"], m["tokenizer"]["vocab_size"],
                           [records[i] for i in sorted(records)], m["recipe_hash"])
    assert again["dataset_id"] == m["dataset_id"]
    assert build_report([records[i] for i in sorted(records)]) == json.loads((root / "report.json").read_text())


def test_cli_run_inspect_verify(small_corpus, tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    out = tmp_path / "ds"
    cfg_file.write_text(yaml.safe_dump({
        "inputs": [str(small_corpus)], "output": str(out),
        "tokenizer": {"vocab_size": 120, "sample_sentences": 5000, "threads": 1},
        "examples": {"max_seq_length": 64, "max_predictions_per_seq": 10},
        "shards": {"examples_per_shard": 100, "group_bytes": 20000}, "ray": {"num_cpus": 2}, "val_fraction": 0.2,
    }))
    r = run_cli("run", str(cfg_file), "examples.nsp=false", "--examples.whole_word_mask", "true")
    assert r.returncode == 0, r.stderr
    assert "data prep summary" in r.stdout and "next" in r.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["examples"]["nsp"] is False and m["examples"]["whole_word_mask"] is True
    r = run_cli("inspect", str(out), "-n", "2", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert set(row) >= {"input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids",
                            "masked_lm_weights", "text"}
        assert len(row["input_ids"]) == 64 and len(row["masked_lm_positions"]) == 10
        assert row["next_sentence_labels"] == 0 and set(row["segment_ids"]) == {0}  # (Google's features without NSP)
        assert "[MASK]" in row["text"] or sum(row["masked_lm_weights"]) < 3
    r = run_cli("inspect", str(out), "-n", "1")
    assert r.returncode == 0 and "train:" in r.stdout and "targets:" in r.stdout
    assert run_cli("verify", str(out)).returncode == 0
    # pretraining on it shows no NSP figures (not zeros) in its lines, its records or its summary
    from conftest import pretrain_config, read_metrics, run_pretrain

    (tmp_path / "pt.yaml").write_text(yaml.safe_dump(pretrain_config(
        out, tmp_path / "ck", train__max_steps=4, train__log_every=2, train__eval_every=4, data__eval_examples=8,
        mlflow__enabled=False)))
    trained = run_pretrain(tmp_path / "pt.yaml")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "eval at step 4: loss" in trained.stdout and "mlm acc" in trained.stdout, trained.stdout
    assert "nsp acc" not in trained.stdout and ", nsp " not in trained.stdout, trained.stdout
    assert not {k for rec in read_metrics(tmp_path / "ck").values() for k in rec if "nsp" in k}
    shard = out / m["splits"]["train"]["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = run_cli("verify", str(out))
    assert r.returncode == 1 and shard.name in r.stdout and "else build it again with the config that made it (in " \
        "its manifest.json) and --overwrite" in r.stdout, r.stdout
    r = run_cli("run", str(cfg_file), "seed=5")
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = run_cli("run", str(cfg_file), "seed=5", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "manifest.json").read_text())["config"]["seed"] == 5


def _start(cfg_file: Path, *extra: str, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "data_prep", "run", str(cfg_file), *extra], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True, text=True,
    )


@pytest.mark.parametrize("kill_when", ["sample", "shards", "shards-ctrl-c"])
def test_killed_job_rerun_gives_identical_output(kill_when, tmp_path, built):
    """SIGKILL the job (driver and its Ray) mid-stage, or interrupt it (SIGINT, as Ctrl-C sends); the rerun finishes
    with the bytes of an uninterrupted run."""
    _, _, reference, _ = built
    out = tmp_path / "ds"
    cfg_file = config_file(reference, out, tmp_path / "cfg.yaml", num_cpus=1)  # one task at a time
    said = tmp_path / "stderr.txt"
    with said.open("w") as stderr:
        proc = _start(cfg_file, stderr=stderr)
    marker = {"sample": lambda: any((out / ".work/sample").glob("unit-*.txt")),
              "shards": lambda: any((out / ".work/units").glob("unit-*.json"))}[kill_when.split("-")[0]]
    deadline = time.monotonic() + 120
    try:
        while not marker():
            assert proc.poll() is None, f"the job ended before it could be killed: {said.read_text()[-3000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        if kill_when.endswith("ctrl-c"):
            proc.send_signal(signal.SIGINT)  # (the driver only: Ray's own processes can crash on a SIGINT of theirs)
            proc.wait(timeout=120)
            err = said.read_text()
            # One line and 130, as for any Ctrl-C; but a task's reply still in flight can make Ray's core worker fail
            # a check (its C++ "Tried to complete task that was not pending", a Ray bug, about 1 interrupt in 7),
            # which ends the process at once, sometimes before the line: the rerun below must resume exactly anyway
            if "You have likely discovered a bug in Ray" not in err:
                assert "interrupted: finished work is kept; run the same command again to resume" in err, err[-3000:]
                assert proc.returncode == 130, err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists()
    r = run_cli("run", str(cfg_file))
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    assert tree_digest(out) == tree_digest(reference)


def test_a_killed_job_writing_to_an_object_store_resumes_on_another_machine(tmp_path, built, s3):
    """An object-store output keeps its unfinished state at its URL: a job killed mid-shards and rerun on another
    machine (another staging directory) skips the units it finished there, and ends with the bytes of an
    uninterrupted run."""
    env, fs = s3
    _, _, reference, _ = built
    url = f"s3://{BUCKET}/resume-{tmp_path.name}"
    cfg_file = config_file(reference, url, tmp_path / "cfg.yaml", num_cpus=1)  # one task at a time
    machine = {name: {**os.environ, **env, "BERTFORGE_STAGING": str(tmp_path / name)} for name in ("a", "b")}
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", "run", str(cfg_file)], cwd=REPO, env=machine["a"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    records = f"{BUCKET}/resume-{tmp_path.name}/.work/units"
    deadline = time.monotonic() + 120
    try:
        while not fs.exists(records) or not fs.ls(records, refresh=True):
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGSTOP)  # (at once: its next unit must not finish the job)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    units = len(json.loads((reference / "report.json").read_text())["files"])
    assert not fs.exists(f"{BUCKET}/resume-{tmp_path.name}/manifest.json")
    r = subprocess.run([sys.executable, "-m", "data_prep", "run", str(cfg_file)], cwd=REPO, env=machine["b"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout and re.search(r"(\d+) of (\d+) units already written; skipping them", r.stdout), \
        r.stdout
    ours = json.loads(fs.cat_file(f"{BUCKET}/resume-{tmp_path.name}/manifest.json"))
    theirs = json.loads((reference / "manifest.json").read_text())
    assert ours["splits"] == theirs["splits"] and ours["tokenizer"] == theirs["tokenizer"]
    assert not fs.exists(f"{BUCKET}/resume-{tmp_path.name}/.work") and units


def test_readme_snippet_rebuilds_google_features(built, tmp_path, monkeypatch):
    """The README's stock-webdataset snippet runs as printed and agrees with `inspect --json`."""
    import re

    _, _, root, _ = built
    code = re.search(r"```python\n(import json, numpy as np, webdataset as wds.*?)```", (REPO / "README.md").read_text(),
                     re.S).group(1)
    code = code.replace("outputs/quickstart/data/quickstart/", f"{root}/")
    code = code.replace("    original =", "    rows.append((input_ids, segment_ids, masked_lm_positions, masked_lm_ids, "
                        "next_sentence_labels))\n    original =")
    scope = {"rows": []}
    exec(compile("rows = []\n" + code, "README.md", "exec"), scope)
    rows = scope["rows"]
    m = json.loads((root / "manifest.json").read_text())
    assert len(rows) == m["splits"]["train"]["examples"]
    r = run_cli("inspect", str(root), "-n", "3", "--json")
    for (ids, seg, pos, lab, nsp), line in zip(rows, r.stdout.splitlines()):
        want = json.loads(line)
        assert ids.tolist() == want["input_ids"] and seg.tolist() == want["segment_ids"]
        assert pos.tolist() == want["masked_lm_positions"] and lab.tolist() == want["masked_lm_ids"]
        assert nsp == want["next_sentence_labels"]


def test_existing_tokenizer_and_url_inputs(built, tmp_path, ray_local, capsys):
    """`tokenizer.path` skips training (its sha256 is recorded; the settings for training one are said to be
    unused); inputs and the tokenizer may be fsspec URLs."""
    import fsspec

    from data_prep.pipeline import run

    cfg, corpus, root, _ = built
    model = root / "tokenizer/spm.model"
    url = f"memory://tok-{tmp_path.name}/spm.model"  # (an object store's stand-in: read by this process only)
    fsspec.filesystem("memory").pipe(url, model.read_bytes())
    other = small_config(corpus, tmp_path / "ds", tokenizer__path=url, inputs=[f"file://{corpus}/*.txt"],
                         tokenizer__model_type="bpe")  # (a setting for training one: the given model's type counts)
    summary = run(other)
    assert "warning: tokenizer.model_type, tokenizer.sample_sentences, tokenizer.vocab_size train a tokenizer, and " \
        "tokenizer.path gives one: they are not used" in capsys.readouterr().err
    m = json.loads((tmp_path / "ds/manifest.json").read_text())
    assert m["tokenizer"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert m["tokenizer"]["model_type"] == "unigram"
    assert [s["path"] for s in m["sources"]] == [str(corpus / f"part{i}.txt") for i in range(3)]  # local URLs: paths
    assert summary["documents"] == 90
    assert "tokenizer" not in summary["stage_seconds"] or summary["stage_seconds"]["tokenizer"] < 5
    # a model with a control piece of its own (a language tag): masking's random replacements would put it in text
    import sentencepiece as spm

    from data_prep.configfile import ConfigError

    spm.SentencePieceTrainer.train(input=str(corpus / "part0.txt"), model_prefix=str(tmp_path / "tagged"),
                                   vocab_size=120, pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, pad_piece="[PAD]",
                                   unk_piece="[UNK]", control_symbols=["[CLS]", "[SEP]", "[MASK]", "<en>"],
                                   minloglevel=2)
    with pytest.raises(ConfigError, match=r"tokenizer.path: '.*tagged.model' has 1 control or unused pieces besides "
                                          r"ids 0-4 \(<en>=5\); masking's random replacements"):
        run(small_config(corpus, tmp_path / "tagged-ds", tokenizer__path=str(tmp_path / "tagged.model")))
    assert not (tmp_path / "tagged-ds").exists()


def test_the_dataset_id_names_the_bytes_not_the_spelling_of_the_inputs(built):
    """The same shards and tokenizer from a config whose inputs are spelt otherwise (a relative path, a URL): the
    same id; another shard's bytes: another id."""
    from data_prep.dataset import build_manifest

    cfg, corpus, root, _ = built
    m = json.loads((root / "manifest.json").read_text())
    records = [{"shards": [s for split in m["splits"].values() for s in split["shards"]]}]
    spelt = small_config(corpus, root, inputs=[f"file://{corpus}/*.txt"])

    def rebuilt(c, recs):
        return build_manifest(c, [], m["tokenizer"]["sha256"], m["tokenizer"]["vocab_size"], recs, "recipe")

    assert rebuilt(spelt, records)["dataset_id"] == rebuilt(cfg, records)["dataset_id"] == m["dataset_id"]
    other = [{"shards": [{**s, "sha256": "0" * 64} if i == 0 else s for i, s in enumerate(records[0]["shards"])]}]
    assert rebuilt(cfg, other)["dataset_id"] != m["dataset_id"]


def test_help(small_corpus, tmp_path):
    r = run_cli("--help")
    assert r.returncode == 0 and "run" in r.stdout and "inspect" in r.stdout and "verify" in r.stdout
    r = run_cli("run", "--help")
    assert r.returncode == 0 and "--overwrite" in r.stdout and "KEY=VALUE" in r.stdout


def _ray_task_pids(name: str, job: int) -> list[int]:
    """The processes of job `job`'s Ray (its own local one) running the task `name`."""
    import psutil

    out = []
    for p in psutil.Process(job).children(recursive=True):
        try:
            if any(name in part for part in p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def test_worker_killed_mid_task_is_retried(tmp_path, built):
    """SIGKILL the Ray worker that is writing shards: Ray retries the task and the output is unchanged."""
    _, _, reference, _ = built
    out = tmp_path / "ds"
    cfg_file = config_file(reference, out, tmp_path / "cfg.yaml", num_cpus=1)
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", "run", str(cfg_file)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    killed = False
    try:
        while not killed:
            assert proc.poll() is None, "the job ended before a worker could be killed"
            assert time.monotonic() < deadline
            pids = _ray_task_pids("ray::write_unit", proc.pid)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed = True
            time.sleep(0.01)
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    assert "[shards]" in output and "ETA" in output, "progress lines in a non-interactive log"
    assert tree_digest(out) == tree_digest(reference)


@pytest.fixture
def ray_head():
    """A real `ray start --head` on 127.0.0.2 (not 127.0.0.1: Ray swaps that for the machine's IP);
    stopped by pid afterwards, since `ray stop` would also stop the session's own Ray."""
    import psutil
    from cluster.head import free_port

    port = free_port("127.0.0.2")
    ray_bin = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.2", f"--port={port}",
                    "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                   check=True, capture_output=True, timeout=120)
    address = f"127.0.0.2:{port}"
    yield address
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if address in cmd or f"--gcs_server_port={port}" in cmd:
                p.kill()
        except psutil.Error:
            pass


def test_job_on_a_ray_head_given_by_address(built, ray_head, tmp_path):
    """`ray.address` sends the tasks to a running cluster (token auth as Ray sets it up); same bytes. The output
    is relative to the command's directory, not the one the head (and so its workers) started in."""
    _, _, reference, _ = built
    out = tmp_path / "ds"
    cfg_file = config_file(reference, Path("ds"), tmp_path / "cfg.yaml", address=ray_head)
    r = run_cli("run", str(cfg_file), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert tree_digest(out) == tree_digest(reference) and not (REPO / "ds").exists()


def test_inspect_the_val_split(built):
    _, _, root, _ = built
    r = run_cli("inspect", str(root), "-n", "2", "--split", "val", "--json")
    assert r.returncode == 0, r.stderr
    keys = {json.loads(line)["key"] for line in r.stdout.splitlines()}
    m = json.loads((root / "manifest.json").read_text())
    assert len(keys) == 2 and m["splits"]["val"]["examples"] >= 2


def test_inspect_into_a_reader_that_stops_early_exits_quietly(built):
    """`inspect ... | head -1`: the reader closes the pipe; the command ends with 0 and no traceback."""
    import subprocess
    import sys

    _, _, root, _ = built
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", "inspect", str(root), "-n", "200", "--json"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert json.loads(proc.stdout.readline())["key"]
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_inspect_names_a_damaged_shard_or_manifest(built, tmp_path, capsys):
    import shutil

    from data_prep.cli import main

    _, _, root, _ = built
    for command in ("inspect", "verify"):  # a path that is not there is said as such, not as an unfinished dataset
        assert main([command, str(tmp_path / "nowhere")]) == 2  # (as a wrong argument)
        assert f"'{tmp_path / 'nowhere'}' does not exist: give the directory" in capsys.readouterr().err
    copy = tmp_path / "ds"
    shutil.copytree(root, copy)
    m = json.loads((copy / "manifest.json").read_text())
    first = m["splits"]["train"]["shards"][0]["name"]
    data = bytearray((copy / first).read_bytes())
    data[600:1400] = b"\xff" * 800  # the first member's payload and the next header
    (copy / first).write_bytes(bytes(data))
    assert main(["inspect", str(copy), "-n", "3"]) == 1
    err = capsys.readouterr().err
    assert f"shard {first} of {copy} cannot be read" in err and "data_prep verify" in err
    del m["examples"]["token_dtype"]
    (copy / "manifest.json").write_text(json.dumps(m))
    assert main(["inspect", str(copy)]) == 2
    assert "key examples.token_dtype is missing" in capsys.readouterr().err
    # a manifest from elsewhere whose names lead out of the dataset: refused before anything is read or fetched
    m = json.loads((root / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["name"] = "../../home/someone/.bashrc"
    (copy / "manifest.json").write_text(json.dumps(m))
    assert main(["inspect", str(copy)]) == 2
    assert "splits.train.shards[0].name '../../home/someone/.bashrc' is not a shard of train/" in \
        capsys.readouterr().err
    # a shard from elsewhere with a pickled member beside an example's: the example is shown, the pickle not loaded
    import io
    import pickle
    import tarfile

    m = json.loads((root / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(m))
    with tarfile.open(root / first) as tar:
        member = next(x for x in tar if x.name.endswith(".mp"))
        payload = tar.extractfile(member).read()
    marker = tmp_path / "ran"
    with tarfile.open(copy / first, "w") as tar:
        for name, data in ((member.name, payload), (member.name[:-3] + ".pyd", pickle.dumps(RunsCode(marker)))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert main(["inspect", str(copy), "-n", "1"]) == 0, capsys.readouterr().err
    assert member.name[:-3] in capsys.readouterr().out and not marker.exists()


def test_a_last_pool_of_one_document_joins_the_one_before(tmp_path, ray_local):
    """21 documents in pools of 20: the last one would be a pool of its own, whose "random next" segments could
    only come from itself; it joins the full pool before it instead. A unit of a single document has nothing to
    join: the report counts such pools."""
    import random

    from conftest import make_document, write_txt

    from data_prep.pipeline import run

    rng = random.Random(11)
    (tmp_path / "corpus").mkdir()
    write_txt(tmp_path / "corpus" / "a.txt", [make_document(rng, 8) for _ in range(21)])
    write_txt(tmp_path / "corpus" / "b.txt", [make_document(rng, 8)])  # a unit of its own (group_bytes)
    run(small_config(tmp_path / "corpus", tmp_path / "ds", val_fraction=0.0, shards__group_bytes=100))
    report = json.loads((tmp_path / "ds" / "report.json").read_text())
    assert report["documents"] == 22 and len(report["files"]) == 2
    assert report["nsp"]["single_document_pools"] == 1, report["nsp"]  # b.txt's; a.txt's last joined its pool


def test_a_tasks_last_lines_reach_the_driver_before_it_leaves(tmp_path):
    """Ray drops the worker output still on its way when the driver shuts Ray down: `drain_worker_output`, which
    data prep and a job's driver call before that, waits for it (without it, most of this burst is lost)."""
    script = tmp_path / "burst.py"
    script.write_text(
        "import ray\n"
        "from data_prep.ray_client import drain_worker_output\n"
        "ray.init(address='local', num_cpus=1, include_dashboard=False, log_to_driver=True)\n"
        "burst = ray.remote(lambda n: [print(f'line {i}') for i in range(n)] and n)\n"
        "ray.get(burst.remote(5000))\n"
        "drain_worker_output(quiet_s=3, most_s=120)\n"
        "ray.shutdown()\n"
        "print('done')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_COLOR_PREFIX": "0"}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    missing = sorted(set(range(5000)) - {int(line.rsplit(" ", 1)[-1]) for line in lines
                                         if " line " in line and line.rsplit(" ", 1)[-1].isdigit()})
    # (all of them, but for a stray one a busy machine's log monitor may lose anywhere: without the drain, some
    # 4,000 of the last lines are lost)
    assert len(missing) <= 3 and lines[-1] == "done", missing[:20]


def test_sample_shares_follow_sentences_and_add_up_to_the_budget():
    from data_prep.pipeline import _sample_shares

    assert _sample_shares({0: 10, 1: 30}, 100) == {0: 10, 1: 30}  # a corpus under the budget: all of it
    assert _sample_shares({0: 10, 1: 30}, 20) == {0: 5, 1: 15}
    shares = _sample_shares({0: 1, 1: 1, 2: 1, 3: 0}, 2)
    assert sum(shares.values()) == 2 and shares[3] == 0 and max(shares.values()) == 1
    seen = {i: 7 + i for i in range(50)}
    shares = _sample_shares(seen, 333)
    assert sum(shares.values()) == 333 and all(abs(shares[i] - 333 * seen[i] / sum(seen.values())) < 1 for i in seen)


def _skewed_corpus(corpus: Path) -> Path:
    """A gzip file of ~1,200 sentences, small on disk, and a plain file whose bytes are mostly one long line."""
    import gzip
    import random

    from conftest import make_document

    rng = random.Random(3)
    corpus.mkdir()
    with gzip.open(corpus / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n\n".join("\n".join(make_document(rng, 12)) for _ in range(100)) + "\n")
    (corpus / "b.txt").write_text("x" * 600_000 + "\n\n" + "\n".join(make_document(rng, 40)) + "\n")
    return corpus


def test_a_tokenizer_sample_stopped_between_its_passes_resumes_to_the_same_tokenizer(tmp_path, ray_local):
    """A run stopped in the second sampling pass (a short unit's new sample written, its counts not yet; or neither)
    trains the same tokenizer, byte for byte, as one that was not stopped."""
    from data_prep.pipeline import _train_tokenizer
    from data_prep.sources import expand_inputs
    from data_prep.worker import plan_units

    corpus = _skewed_corpus(tmp_path / "corpus")
    cfg = small_config(corpus, tmp_path / "ds", read__max_line_bytes=10_000, tokenizer__sample_sentences=500)
    units = plan_units(expand_inputs(cfg.inputs), 1)
    total, work = sum(u.bytes for u in units), tmp_path / "work"
    (work / "sample").mkdir(parents=True)
    _train_tokenizer(cfg, units, total, work, tmp_path / "whole.model")
    gz = work / "sample" / "unit-000000.json"  # the gzip file's unit, sampled twice
    counts = json.loads(gz.read_text())
    assert counts["kept"] == len((work / "sample" / "unit-000000.txt").read_text().splitlines()) < counts["seen"]
    gz.write_text(json.dumps({**counts, "kept": 3}))  # the first pass's counts beside the second pass's sample
    _train_tokenizer(cfg, units, total, work, tmp_path / "resumed.model")
    gz.unlink()  # stopped before its counts were written at all
    _train_tokenizer(cfg, units, total, work, tmp_path / "again.model")
    whole = (tmp_path / "whole.model").read_bytes()
    assert (tmp_path / "resumed.model").read_bytes() == whole == (tmp_path / "again.model").read_bytes()


def test_the_tokenizer_sample_is_shared_by_sentences_not_bytes_on_disk(tmp_path, ray_local, capsys):
    """A gzip file holds far more sentences than its bytes on disk suggest, and a file whose bytes are mostly one
    skipped line far fewer: each unit still gives the sample its share of the corpus's sentences (all of them,
    when the corpus has fewer than tokenizer.sample_sentences)."""
    from data_prep.pipeline import run

    corpus = _skewed_corpus(tmp_path / "corpus")
    (corpus / "c.jsonl").write_text(json.dumps({"text": "A carriage\rreturn inside a sentence."}) + "\n")
    cfg = small_config(corpus, tmp_path / "all", read__max_line_bytes=10_000, shards__group_bytes=1)
    run(cfg)
    said = capsys.readouterr().out
    n = int(re.search(r"on ([\d,]+) of the corpus's \1 sentences", said).group(1).replace(",", ""))
    # everything (the count trained on is the corpus's), the gzip file's after a second read
    assert n > 1_000 and "sampling them again for their share" in said
    run(small_config(corpus, tmp_path / "part", read__max_line_bytes=10_000, shards__group_bytes=1,
                     tokenizer__sample_sentences=500))
    said = capsys.readouterr().out
    assert re.search(rf"on 500 of the corpus's {n:,} sentences", said) and "sampling them again" in said, said
