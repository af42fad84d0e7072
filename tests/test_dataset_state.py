"""Dataset directory state: resume only with the same inputs, clean restarts, clear errors, failed tasks."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from conftest import make_document, run_cli, small_config, write_txt
from data_prep.configfile import ConfigError
from data_prep.dataset import RECIPE_VERSION, DatasetError, prepare_output, recipe_hash, verify
from data_prep.shards import ShardWriter
from data_prep.sources import DocumentReader, Source, expand_inputs
from data_prep.worker import plan_units


def test_changed_input_files_are_a_different_dataset(small_corpus, tmp_path, ray_local, capsys):
    from data_prep.pipeline import run

    cfg = small_config(small_corpus, tmp_path / "ds")
    run(cfg)
    assert run(cfg)["seconds"] < 5, "same config, same files: complete"
    # the same files spelt otherwise (a relative path, a glob) are the same dataset, which keeps its first spelling
    relative = os.path.relpath(small_corpus)
    assert run(small_config(relative, tmp_path / "ds"))["seconds"] < 5
    assert run(small_config(f"{small_corpus}/../{small_corpus.name}/*", tmp_path / "ds"))["seconds"] < 5
    with pytest.raises(DatasetError, match=r"different dataset \(inputs: .*; input gone: .*extra.jsonl\)"):
        run(small_config(f"{small_corpus}/*.txt", tmp_path / "ds"))  # (fewer files: another dataset)
    assert json.loads((tmp_path / "ds/manifest.json").read_text())["config"]["inputs"] == [str(small_corpus)]
    import random

    write_txt(small_corpus / "aaa_new.txt", [make_document(random.Random(3), 5)])
    with pytest.raises(DatasetError, match=r"already holds a different dataset \(new input: .*aaa_new.txt\)"):
        run(cfg)
    with pytest.raises(DatasetError, match=r"different dataset \(examples.dupe_factor: 2 -> 3; new input: .*aaa_new"):
        run(small_config(small_corpus, tmp_path / "ds", examples__dupe_factor=3))
    run(cfg, overwrite=True)
    m = json.loads((tmp_path / "ds/manifest.json").read_text())
    assert any(s["path"].endswith("aaa_new.txt") for s in m["sources"])
    assert verify(tmp_path / "ds") == []
    # a dataset an older data_prep made (other examples from the same config and files) is kept, with a note
    capsys.readouterr()
    m["recipe_version"] = RECIPE_VERSION - 1
    (tmp_path / "ds/manifest.json").write_text(json.dumps(m))
    assert run(cfg)["seconds"] < 5
    assert f"note: this dataset was made by a data_prep of recipe version {RECIPE_VERSION - 1}, this one makes " \
        f"{RECIPE_VERSION}" in capsys.readouterr().err


def test_an_output_inside_an_input_directory_does_not_read_its_own_files(small_corpus, ray_local, capsys):
    """The dataset's own files (its folders, its work in progress) are not its corpus: a rerun after an interruption
    would otherwise see other inputs and refuse to resume. Other files under the output are inputs like any."""
    from data_prep.pipeline import run

    out = small_corpus / "ds"
    for folder in (out / ".work" / "sample", out / "raw"):
        folder.mkdir(parents=True)
    write_txt(out / ".work" / "sample" / "unit-000009.txt", [["A sentence sampled by an interrupted run."]])
    write_txt(out / "raw" / "notes.txt", [["A user's own text kept under the output.", "It is read."]])
    (small_corpus / "README.md").write_text("# not a corpus file\n")
    (small_corpus / "data.json").write_text("{}\n")
    run(small_config(small_corpus, out), overwrite=True)
    err = capsys.readouterr().err
    assert f"note: 1 files of the dataset at '{out}' (its folders, its work in progress) are not read" in err, err
    # files of other kinds in an input directory are named, not read silently or skipped silently
    assert (f"note: 2 files in the input directories or globs are not .txt/.jsonl/.parquet files (optionally compressed) and "
            f"are not read, e.g. {small_corpus / 'README.md'}, {small_corpus / 'data.json'}") in err, err
    read = [s["path"] for s in json.loads((out / "manifest.json").read_text())["sources"]]
    assert str(out / "raw" / "notes.txt") in read and not [p for p in read if "/.work/" in p]
    assert (out / "raw" / "notes.txt").exists() and verify(out) == []
    assert run(small_config(small_corpus, out))["seconds"] < 5, "the same inputs again: complete"
    (out / ".work" / "sample").mkdir(parents=True)
    write_txt(out / ".work" / "sample" / "unit-000000.txt", [["Work in progress only."]])
    with pytest.raises(ConfigError, match=r"inputs: every input file is one of the dataset's own"):
        run(small_config(out / ".work", out))


def test_unfinished_work_of_other_inputs_is_not_reused(small_corpus, tmp_path):
    cfg = small_config(small_corpus, tmp_path / "ds")
    root = tmp_path / "ds"
    sources = expand_inputs(cfg.inputs)
    (root / ".work/units").mkdir(parents=True)
    (root / ".work/config.json").write_text(json.dumps({"recipe_hash": "old"}))
    (root / ".work/units/unit-000000.json").write_text("{}")
    with pytest.raises(DatasetError, match="different config, different input files or another version of data_prep"):
        prepare_output(root, recipe_hash(cfg, sources, None), overwrite=False)
    # the same config and inputs, started by a data_prep whose examples differ: not resumed (mixed shards)
    same = {"recipe_hash": recipe_hash(cfg, sources, None), "recipe_version": RECIPE_VERSION}
    (root / ".work/config.json").write_text(json.dumps(same))
    assert prepare_output(root, recipe_hash(cfg, sources, None), overwrite=False) == "resume"
    (root / ".work/config.json").write_text(json.dumps({**same, "recipe_version": RECIPE_VERSION - 1}))
    with pytest.raises(DatasetError, match="another version of data_prep"):
        prepare_output(root, recipe_hash(cfg, sources, None), overwrite=False)
    # Without finished units, a restart clears everything the old attempt wrote, stray shards included.
    (root / ".work/units/unit-000000.json").unlink()
    (root / "train").mkdir()
    (root / "train/shard-000000-00000.tar").write_bytes(b"old")
    (root / "train/shard-000000-00001.tar.partial").write_bytes(b"old")
    assert prepare_output(root, recipe_hash(cfg, sources, None), overwrite=False) == "fresh"
    assert not (root / "train").exists() and not (root / ".work").exists()


def test_damaged_state_in_the_output_is_replaced_with_overwrite(small_corpus, tmp_path):
    cfg = small_config(small_corpus, tmp_path / "ds")
    root = tmp_path / "ds"
    recipe = recipe_hash(cfg, expand_inputs(cfg.inputs), None)
    (root / ".work/units").mkdir(parents=True)
    (root / ".work/config.json").write_text("garbage{")
    (root / ".work/units/unit-000000.json").write_text("{}")
    with pytest.raises(DatasetError, match="Pass --overwrite to discard it"):
        prepare_output(root, recipe, overwrite=False)
    assert prepare_output(root, recipe, overwrite=True) == "fresh" and not (root / ".work").exists()
    (root / "manifest.json").write_text("")
    with pytest.raises(DatasetError, match=r"manifest.json' is not valid JSON .*; pass --overwrite to replace"):
        prepare_output(root, recipe, overwrite=False)
    assert prepare_output(root, recipe, overwrite=True) == "fresh" and not (root / "manifest.json").exists()


def test_overwrite_removes_only_what_a_dataset_consists_of(small_corpus, tmp_path):
    """--overwrite on a directory that is not (only) a dataset: the user's own files are never removed; where
    they sit in the dataset's folders, nothing is removed and the error names them."""
    cfg = small_config(small_corpus, tmp_path / "proj")
    root = tmp_path / "proj"
    recipe = recipe_hash(cfg, expand_inputs(cfg.inputs), None)
    for name, text in {"notes.md": "mine", "manifest.json": "{}", "train/shard-000000-00000.tar": "old",
                       "train/shard-1000000-100000.tar": "old", "train/my_script.py": "mine", "tokenizer/spm.model": "old", "tokenizer/vocab.txt": "mine",
                       "val/sub/x.tar": "mine"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    with pytest.raises(DatasetError, match=r"\(tokenizer/vocab.txt, train/my_script.py, val/sub/x.tar\); nothing "
                                           r"was removed. Move them out of tokenizer/, train/, val/"):
        prepare_output(root, recipe, overwrite=True)
    assert (root / "manifest.json").exists() and (root / "train/shard-000000-00000.tar").exists()
    for name in ("train/my_script.py", "tokenizer/vocab.txt", "val/sub/x.tar"):
        (root / name).unlink()
    assert prepare_output(root, recipe, overwrite=True) == "fresh"
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["notes.md"]
    assert (root / "notes.md").read_text() == "mine"


def test_overwrite_in_an_object_store_removes_only_what_a_dataset_consists_of(small_corpus, tmp_path):
    """The same for an output URL (fsspec's in-memory filesystem stands for an object store here)."""
    import fsspec

    from data_prep.pipeline import _prepare_remote

    fs = fsspec.filesystem("memory")
    url = "memory://overwrite-test/out"
    cfg = small_config(small_corpus, tmp_path / "unused")
    recipe = recipe_hash(cfg, expand_inputs(cfg.inputs), None)
    for name in ("notes.md", "manifest.json", "train/shard-000000-00000.tar", "train/my_script.py", ".work/x"):
        fs.pipe(f"{url}/{name}", b"x")
    with pytest.raises(DatasetError, match=r"\(train/my_script.py\); nothing was removed"):
        _prepare_remote(url, tmp_path / "staging", recipe, overwrite=True)
    assert fs.exists(f"{url}/manifest.json") and fs.exists(f"{url}/train/shard-000000-00000.tar")
    fs.rm(f"{url}/train/my_script.py")
    assert _prepare_remote(url, tmp_path / "staging", recipe, overwrite=True) == "fresh"
    assert [p.rsplit("/out/", 1)[1] for p in fs.find(url)] == ["notes.md"]
    fs.rm(url, recursive=True)


def test_an_object_stores_unfinished_state_is_kept_and_its_users_files_are_never_removed(tmp_path, monkeypatch):
    """Resume state at an output URL: another run's unfinished start is cleared, but never with files of the user's
    own in the dataset's folders (nor are they written beside); the URL's state is the one that counts: a copy on
    this machine of state the URL no longer holds (deleted to start over) is dropped, never uploaded (its records
    and manifest name shards that are gone); state that cannot be read is said, not a traceback."""
    import fsspec

    from data_prep import storage

    from data_prep.pipeline import _prepare_remote

    fs = fsspec.filesystem("memory")
    url = "memory://resume-state/out"
    fs.pipe(f"{url}/.work/config.json", json.dumps({"recipe_hash": "other"}).encode())
    fs.pipe(f"{url}/train/README.txt", b"mine")
    with pytest.raises(DatasetError, match=r"\(train/README.txt\); nothing was removed"):
        _prepare_remote(url, tmp_path / "staging", "ours", overwrite=False)
    assert fs.cat_file(f"{url}/train/README.txt") == b"mine"
    fs.rm(f"{url}/.work", recursive=True)  # (no state at all: the user's file still keeps the folder)
    with pytest.raises(DatasetError, match=r"\(train/README.txt\); nothing was removed"):
        _prepare_remote(url, tmp_path / "staging", "ours", overwrite=False)
    fs.rm(url, recursive=True)

    staging = tmp_path / "staging"
    for finished in (False, True):
        (staging / ".work" / "units").mkdir(parents=True)
        (staging / ".work" / "config.json").write_text(json.dumps({"recipe_hash": "ours",
                                                                   "recipe_version": RECIPE_VERSION}))
        (staging / ".work" / "units" / "unit-000000.json").write_text("{}")
        if finished:  # (finished here, its upload not yet made)
            (staging / "manifest.json").write_text(json.dumps({"recipe_hash": "ours"}))
        assert _prepare_remote(url, staging, "ours", overwrite=False) == "fresh"
        assert not (staging / ".work" / "units").exists() and not (staging / "manifest.json").exists()
        assert not fs.exists(url)

    def denied(where: str) -> str:  # (a bucket whose listing is allowed and whose reading is not)
        raise PermissionError("Access Denied")

    fs.pipe(f"{url}/.work/config.json", json.dumps({"recipe_hash": "ours", "recipe_version": RECIPE_VERSION}).encode())
    monkeypatch.setattr(storage, "read_text", denied)
    with pytest.raises(DatasetError, match=r"^output: cannot read 'memory://resume-state/out/.work/config.json' "
                                           r"\(PermissionError: Access Denied\); check the storage's credentials"):
        _prepare_remote(url, staging, "ours", overwrite=False)


def test_a_refused_upload_at_a_fresh_start_names_the_url(small_corpus, tmp_path, monkeypatch):
    """An output URL this machine may list but not write to: the first upload (the work config) is refused with
    the URL and where to look, before any work (and before Ray starts)."""
    from data_prep import storage
    from data_prep.pipeline import run

    def refused(local, url: str) -> None:  # (a bucket whose policy denies writes)
        raise PermissionError("Access Denied")

    monkeypatch.setattr(storage, "upload", refused)
    monkeypatch.setenv("BERTFORGE_STAGING", str(tmp_path / "staging"))
    with pytest.raises(DatasetError, match=r"^output: cannot write 'memory://refused/out/.work/config.json' "
                                           r"\(PermissionError: Access Denied\); check the storage's credentials"):
        run(small_config(small_corpus, "memory://refused/out"))


def test_output_that_is_a_file_is_a_clear_error(small_corpus, tmp_path):
    out = tmp_path / "taken"
    out.write_text("x")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"inputs: ['{small_corpus}']\noutput: {out}\n")
    r = run_cli("run", str(cfg))
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr


def test_environment_errors_are_raised_for_a_retry_data_errors_are_counted(tmp_path):
    d = tmp_path / "dir.txt"
    d.mkdir()
    reader = DocumentReader(Source(str(d), 10, "txt", None), "text", "auto", 1 << 20, 1)
    with pytest.raises(IsADirectoryError):
        list(reader)  # errno set: the machine's problem, so the task fails and Ray retries it
    bad = tmp_path / "bad.txt.bz2"
    bad.write_bytes(b"BZh91AY&SY" + bytes(200))  # a bz2 header over garbage: the file's problem
    reader = DocumentReader(Source(str(bad), bad.stat().st_size, "txt", "bz2"), "text", "auto", 1 << 20, 1)
    assert list(reader) == [] and reader.report.issues["read_error"] == 1


def test_a_task_that_keeps_failing_names_its_unit_and_files(tmp_path, ray_local):
    from data_prep.config import RayConfig
    from data_prep.pipeline import JobError, _run_units

    def _fails(unit, path):  # nested: Ray ships it by value (workers cannot import test modules)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)

    write_txt(tmp_path / "a.txt", [["One.", "Two."]])
    units = plan_units(expand_inputs([str(tmp_path / "a.txt")]), 1000)
    with pytest.raises(JobError) as e:
        _run_units(_fails, units, ("gone.txt",), RayConfig(max_retries=1), lambda u, r: None, "shards")
    msg = str(e.value)
    assert "work unit 0" in msg and "a.txt" in msg and "FileNotFoundError" in msg and "rerun" in msg


def test_units_that_finished_while_another_failed_are_kept(ray_local):
    """When a unit fails for good, the units that finished meanwhile and were not yet handed on are recorded before
    the rest are cancelled (the rerun does not do them again). (Ray mostly hands finished units over before a
    failure, so the moment is made here: every task has ended when `_keep_finished` is called.)"""
    import ray

    from data_prep.pipeline import _keep_finished
    from data_prep.worker import Unit

    def work(unit):  # (nested: Ray ships it by value)
        if unit.index == 0:
            raise ValueError("unit 0 cannot be read")
        return unit.index

    task = ray.remote(work).options(max_retries=0)
    pending = {task.remote(Unit(i, ())): Unit(i, ()) for i in range(3)}
    ray.wait(list(pending), num_returns=3)
    kept = []
    _keep_finished(pending, lambda unit, result: kept.append((unit.index, result)))
    assert sorted(kept) == [(1, 1), (2, 2)] and not pending


def test_unknown_sizes_make_units_of_their_own():
    sources = [Source(f"s3://b/{i}.txt", size, "txt", None) for i, size in enumerate([10, -1, 10, 10])]
    units = plan_units(sources, 100)
    assert [len(u.sources) for u in units] == [1, 1, 2]
    assert units[1].bytes == 100 and units[2].bytes == 20


def test_aborted_writer_leaves_only_finished_shards(tmp_path):
    w = ShardWriter(tmp_path, "train", 0, per_shard=3)
    w.add_many([b"x" * 10] * 4, [5] * 4)  # one full shard, one open
    w.abort()
    names = sorted(p.name for p in (tmp_path / "train").iterdir())
    assert names == ["shard-000000-00000.tar"]


def test_a_full_disk_leaves_no_partial_file_and_is_said_in_a_line(tmp_path, small_corpus, monkeypatch):
    """(A full disk cannot be made here on purpose: the write that fails stands in for it.)"""
    from data_prep import pipeline
    from data_prep.shards import write_whole

    def full(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    (tmp_path / "out").mkdir()
    with pytest.raises(OSError):
        write_whole(tmp_path / "out" / "report.json", full)
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.setattr(pipeline, "_run", lambda cfg, overwrite: full(tmp_path / "out" / "x.partial"))
    with pytest.raises(pipeline.JobError, match=r"^OSError: No space left on device \(.*/out/x.partial\); finished "
                                                r"work is kept: fix the cause and run the same command again"):
        pipeline.run(small_config(small_corpus, tmp_path / "ds"))


def test_a_shard_whose_commit_fails_leaves_no_partial_file(tmp_path, monkeypatch):
    """(The failing fsync stands in for a full disk.)"""
    from data_prep import shards

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards.os, "fsync", full)
    w = ShardWriter(tmp_path, "train", 0, per_shard=3)
    w.add_many([b"x" * 10] * 4, [5] * 4)  # the first shard's commit fails in the background; one more is open
    w.abort()
    assert list((tmp_path / "train").iterdir()) == []


def test_a_killed_workers_scratch_directory_is_removed_by_the_next_one(tmp_path, monkeypatch):
    """A force-cancelled Ray task never runs its cleanup: the shards it staged for upload stay on the disk. The
    next scratch directory made on the machine removes them, but never one whose process is alive."""
    import signal
    import subprocess
    import sys

    from data_prep import storage

    monkeypatch.setenv("BERTFORGE_STAGING", str(tmp_path / "staging"))
    code = ("import sys, time\nfrom data_prep import storage\nwith storage.scratch('unit-000001-') as d:\n"
            "    (d / 'shard.tar').write_bytes(b'x' * 1000)\n    print(d, flush=True)\n    time.sleep(600)\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    killed, alive = (subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
                     for _ in range(2))
    try:
        dead_dir, live_dir = Path(killed.stdout.readline().strip()), Path(alive.stdout.readline().strip())
        assert (dead_dir / "shard.tar").is_file() and (live_dir / "shard.tar").is_file()
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        with storage.scratch("unit-000002-") as mine:  # too soon: a directory being made is never taken
            assert dead_dir.is_dir() and mine.is_dir()
        assert not mine.exists()
        monkeypatch.setattr(storage, "STALE_S", 0.0)
        with storage.scratch("unit-000002-"):
            assert not dead_dir.exists() and (live_dir / "shard.tar").is_file()
    finally:
        alive.kill()
        killed.kill()
    (tmp_path / "not-a-dir").write_text("")  # a staging area this process cannot make (another user's, say)
    monkeypatch.setenv("BERTFORGE_STAGING", str(tmp_path / "not-a-dir"))
    with storage.scratch("unit-000003-") as elsewhere:
        assert elsewhere.is_dir() and not str(elsewhere).startswith(str(tmp_path))
    assert not elsewhere.exists()


def test_a_second_run_into_the_same_output_is_refused_while_the_first_runs(small_corpus, tmp_path):
    """Two runs at once would clear or resume each other's work: while one holds the output, another is refused
    at once, naming it, and writes nothing; once the first has finished, the output is free again."""
    import yaml

    from data_prep.pipeline import sole_writer

    cfg = small_config(small_corpus, tmp_path / "ds")
    (tmp_path / "dp.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    with sole_writer(str(tmp_path / "ds")):
        out = run_cli("run", str(tmp_path / "dp.yaml"), cwd=tmp_path, timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        assert f"another data prep run (pid {os.getpid()} on " in out.stderr and \
            f"is writing '{tmp_path / 'ds'}' on this machine" in out.stderr, out.stderr[-2000:]
        assert not (tmp_path / "ds").exists()
    with sole_writer(str(tmp_path / "ds" / ".." / "ds")):  # (the same output, however it is spelt)
        with pytest.raises(DatasetError, match="another data prep run"), sole_writer(str(tmp_path / "ds")):
            pass


def test_a_finished_datasets_figures_name_the_key_to_change():
    """The summary's warnings: a text field most records lack, documents of one sentence (sentences not split),
    sentences as long as an example (lines that are paragraphs), examples far shorter (short documents), an empty val
    or train split; and, before a run, a prediction cap below masked_lm_prob."""
    from data_prep.config import DataPrepConfig
    from data_prep.pipeline import advice, masking_cap

    config = DataPrepConfig.model_validate({"inputs": ["x"], "output": "y", "text_field": "body",
                                            "val_fraction": 0.01}).content()
    report = {"documents": 40, "sentences": 400, "tokens": 8000, "examples": {"train": 300, "val": 0},
              "example_tokens": {"train": 30000, "val": 0}, "truncation_rate": 0.05,
              "bad_input": {"missing_field": 120, "single_sentence_document": 30}}
    said = advice(config, report)
    assert len(said) == 3
    assert said[0].startswith("120 records have no 'body' field and were skipped") and "set text_field" in said[0]
    assert said[1].startswith("30 of 40 documents are a single sentence") and "read.split_sentences=always" in said[1]
    assert "the val split is empty: val_fraction=0.01 of 40 documents drew none" in said[2] and \
        "40 documents are too few to spare some" in said[2]
    report.update(documents=400, bad_input={})
    assert "raise it to 0.05 or more" in advice(config, report)[0]
    report.update(examples={"train": 300, "val": 12}, example_tokens={"train": 30000, "val": 1200})
    assert advice(config, report) == []
    # short documents: examples of 50 tokens where 128 fit
    report.update(example_tokens={"train": 15000, "val": 600})
    assert advice(config, report) == ["examples average 50 tokens of examples.max_seq_length=128: the documents are "
                                      "short, and an example never spans two. With train.unpad (the default) their "
                                      "padding costs no compute, but a step holds fewer tokens than its batch size "
                                      "suggests: raise train.global_batch_size to match, or lower "
                                      "examples.max_seq_length"]
    # one paragraph per line: 60 documents of 200-token "sentences", examples of 128 tokens keep a third of the text
    report.update(sentences=60, tokens=12000, example_tokens={"train": 3800, "val": 200}, truncation_rate=1.0)
    (said,) = advice(config, report)
    assert said.startswith("the corpus's sentences average 200 tokens, over half of examples.max_seq_length=128") \
        and "keep 33% of the text; truncated 100%" in said and "set read.split_sentences=always" in said
    report.update(sentences=400, examples={"train": 0, "val": 300}, example_tokens={"train": 0, "val": 30000})
    assert advice(config, report) == ["the train split is empty: there is nothing to pretrain on; lower val_fraction "
                                      "(now 0.01) or add documents"]
    long = DataPrepConfig.model_validate({"inputs": ["x"], "output": "y", "examples": {"max_seq_length": 512}})
    assert "examples.max_predictions_per_seq=20 caps full-length examples at 3.9% of their tokens predicted" in \
        masking_cap(long) and "set it to 77" in masking_cap(long)
    assert masking_cap(DataPrepConfig.model_validate({"inputs": ["x"], "output": "y"})) is None


def test_a_bucket_key_that_leads_out_of_the_download_folder_is_refused(tmp_path):
    """Object stores allow keys with `..` in them: copying a folder from a bucket never writes outside the local
    folder it is copied into (a checkpoint or a resumed dataset from a shared bucket)."""
    import fsspec

    from data_prep import storage

    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket-keys/ck/step-00000001/ok.json", b"{}")
    assert storage.download_dir("memory:///bucket-keys/ck", tmp_path / "a") == ["step-00000001/ok.json"]
    assert (tmp_path / "a" / "step-00000001" / "ok.json").read_bytes() == b"{}"
    fs.pipe("/bucket-keys/ck/step-00000001/../../../victim.txt", b"x")
    if not any(".." in n for n in storage.listing("memory:///bucket-keys/ck")):
        pytest.skip("this fsspec's memory filesystem normalizes `..` in keys")
    with pytest.raises(OSError, match=r"its name would place it outside .*; refusing to copy it"):
        storage.download_dir("memory:///bucket-keys/ck", tmp_path / "b" / "c")
    assert not (tmp_path / "victim.txt").exists() and not (tmp_path / "b" / "victim.txt").exists()


def test_the_default_staging_area_is_private_to_its_user(tmp_path, monkeypatch):
    """Staged checkpoints and tokenizers are loaded as found, and lock files written: the default staging area is
    the user's own folder, readable by no one else; one that is not (open to others, or a link) is refused."""
    import tempfile

    from data_prep import storage

    monkeypatch.delenv("BERTFORGE_STAGING", raising=False)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    made = storage.staging_dir("s3://b/x", "ck")
    base = tmp_path / f"bertforge-staging-{os.getuid()}"
    assert made.parent == base and base.stat().st_mode & 0o777 == 0o700
    base.chmod(0o777)
    with pytest.raises(OSError, match=f"{base} is not a private folder of yours .*set BERTFORGE_STAGING"):
        storage.staging_dir("s3://b/x", "ck")
    base.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    base.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError, match="is not a private folder of yours"):
        storage.staging_dir("s3://b/x", "ck")
