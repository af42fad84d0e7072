"""The training data order: every example once per epoch, seekable, the same on any number of ranks or workers."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest

from data_prep.dataset import DatasetError
from pretrain.batch import Collator
from pretrain.data import StreamPlan, TrainBatches, eval_batches, open_dataset, train_loader


@pytest.fixture(scope="module")
def ds(train_dataset):
    return open_dataset(str(train_dataset))


def _keys(plan: StreamPlan, stream: int, n: int, start: int = 0) -> list[tuple[int, str]]:
    return [(e, s["__key__"]) for e, s in itertools.islice(plan.examples(stream, start), n)]


@pytest.mark.parametrize("streams", [1, 2, 3, 20])
def test_each_epoch_covers_every_example_once(ds, streams):
    """Across all streams, epoch e holds each training example exactly once, whatever the stream count.

    20 streams > 8 shards: shards are cut into interleaved pieces so every stream gets examples.
    """
    plan = StreamPlan(ds.shards("train"), streams, seed=1, shuffle_buffer=150)
    total = ds.manifest["splits"]["train"]["examples"]
    per_stream = [sum(p.count for g in plan.groups(s, 0) for p in g) for s in range(streams)]
    assert sum(per_stream) == total and min(per_stream) > 0
    seen = Counter()
    for s in range(streams):
        seen.update(k for e, k in _keys(plan, s, per_stream[s] + 5) if e == 0)
    assert len(seen) == total and set(seen.values()) == {1}


def test_streams_are_dealt_equal_shares_of_unequal_shards():
    """Each unit's last shard is partial: dealt by size, streams hold within one piece of each other (here within
    7%), where round-robin (the order of checkpoints that name no deal) left them up to 70% apart."""
    import random

    rng = random.Random(0)
    shards = [(f"s{i}.tar", 1000 if i % 2 == 0 else rng.randint(1, 999)) for i in range(40)]  # 20 units
    spreads, ratios = {}, {}
    for deal in ("balanced", "round-robin"):
        plan = StreamPlan(shards, 8, seed=1, shuffle_buffer=1, deal=deal)
        for epoch in range(5):
            dealt = plan.dealt(epoch)
            assert sorted(i for stream in dealt for i in stream) == list(range(len(plan.pieces)))
            sizes = [sum(plan.pieces[i].count for i in stream) for stream in dealt]
            spreads[deal, epoch] = max(sizes) - min(sizes)
            ratios[deal] = max(ratios.get(deal, 0), max(sizes) / min(sizes))
    assert all(spreads["balanced", e] <= 1000 for e in range(5)), spreads  # (within one piece)
    assert ratios["balanced"] < 1.08 and ratios["round-robin"] > 1.6, ratios  # (the figures data.py quotes)
    assert sum(spreads["balanced", e] for e in range(5)) < sum(spreads["round-robin", e] for e in range(5)) / 3
    with pytest.raises(ValueError, match="deal"):
        StreamPlan(shards, 8, seed=1, shuffle_buffer=1, deal="random")


def test_epochs_are_reshuffled_and_deterministic(ds):
    plan = StreamPlan(ds.shards("train"), 1, seed=1, shuffle_buffer=250)
    n = ds.manifest["splits"]["train"]["examples"]
    two = _keys(plan, 0, 2 * n)
    assert [k for _, k in two[:n]] != [k for _, k in two[n:]], "epoch 1 has its own order"
    assert sorted(k for _, k in two[:n]) == sorted(k for _, k in two[n:])
    assert two == _keys(StreamPlan(ds.shards("train"), 1, seed=1, shuffle_buffer=250), 0, 2 * n)
    assert two != _keys(StreamPlan(ds.shards("train"), 1, seed=2, shuffle_buffer=250), 0, 2 * n)


@pytest.mark.parametrize("start", [0, 1, 99, 400, 713, 1500])
def test_seeking_equals_replaying(ds, start):
    plan = StreamPlan(ds.shards("train"), 2, seed=3, shuffle_buffer=200)
    assert _keys(plan, 1, 50, start=start) == _keys(plan, 1, start + 50)[start:]


def _batches(ds, world: int, rank: int, start: int, n: int, workers: int = 0, streams: int = 4) -> list[list[str]]:
    plan = StreamPlan(ds.shards("train"), streams, seed=5, shuffle_buffer=100)
    collator = Collator(ds.manifest)
    loader = train_loader(plan, collator, 4, rank, world, start, workers, pin_memory=False)
    return [b.keys for b in itertools.islice(loader, n)]


def test_global_batches_do_not_depend_on_ranks_or_workers(ds):
    """Rank r of W takes global micro batch i * W + r: two ranks together see what one rank sees."""
    one = _batches(ds, 1, 0, 0, 12)
    r0, r1 = _batches(ds, 2, 0, 0, 6), _batches(ds, 2, 1, 0, 6)
    assert one == [b for pair in zip(r0, r1) for b in pair]
    assert _batches(ds, 2, 1, 0, 6, workers=2) == r1
    assert _batches(ds, 1, 0, 0, 12, workers=2) == one


@pytest.mark.parametrize("workers", [0, 2])
def test_a_cursor_resumes_the_exact_sequence(ds, workers):
    full = _batches(ds, 2, 1, 0, 30)
    assert _batches(ds, 2, 1, 17, 13, workers=workers) == full[17:]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_streams_must_divide_among_ranks_and_workers(ds):
    plan = StreamPlan(ds.shards("train"), 3, seed=0, shuffle_buffer=10)
    with pytest.raises(ValueError, match="multiple of the world size"):
        TrainBatches(plan, Collator(ds.manifest), 4, 0, 2)
    loader = train_loader(StreamPlan(ds.shards("train"), 2, 0, 10), Collator(ds.manifest), 4, 0, 1, 0, 0, False)
    assert next(iter(loader)).input_ids.shape[0] == 4
    with pytest.raises(Exception, match="data.num_workers"):
        next(iter(train_loader(StreamPlan(ds.shards("train"), 2, 0, 10), Collator(ds.manifest), 4, 0, 1, 0, 3,
                               False)))


def test_eval_batches_split_ranks_evenly(ds):
    collator = Collator(ds.manifest)
    n_val = ds.manifest["splits"]["val"]["examples"]
    parts = [eval_batches(ds, collator, 4, r, 3, limit=n_val) for r in range(3)]
    assert len({len(p) for p in parts}) == 1, "every rank runs the same number of forwards (ZeRO-3)"
    keys = [k for p in parts for b, w in p if w for k in b.keys]
    assert len(keys) == n_val == len(set(keys))
    assert eval_batches(ds, collator, 4, 0, 1, limit=5)[0][0].input_ids.shape[0] == 4


def test_a_rank_reads_only_the_val_shards_of_its_own_examples(ds, monkeypatch):
    """A rank's evaluation examples are a contiguous block of the chosen ones: it reads the shards holding them, not
    every val shard, which with many ranks each fetching from a bucket made the first evaluation slow."""
    from pretrain import data

    read, real = [], data.tar_samples
    monkeypatch.setattr(data, "tar_samples", lambda url, sha256=None: read.append(url) or real(url, sha256))
    collator = Collator(ds.manifest)
    shards = ds.shards("val")
    assert len(shards) >= 3
    world = len(shards)
    per_rank = []
    for r in range(world):
        read.clear()
        eval_batches(ds, collator, 4, r, world, limit=ds.manifest["splits"]["val"]["examples"])
        per_rank.append(len(read))
    assert max(per_rank) < len(shards) and sum(per_rank) <= 2 * len(shards) - 1, per_rank


def test_a_smaller_eval_set_is_spread_over_the_whole_split(ds):
    """Shards are in input-file order: `limit` examples are taken evenly across the split, not from its start."""
    from pretrain.data import tar_samples

    collator = Collator(ds.manifest)
    every = [s["__key__"] for url, _ in ds.shards("val") for s in tar_samples(url)]
    assert len(ds.shards("val")) >= 3
    limit = 6
    got = [k for b, w in eval_batches(ds, collator, 4, 0, 1, limit=limit) if w for k in b.keys]
    assert got == [every[i * len(every) // limit] for i in range(limit)]
    last_shard = {s["__key__"] for s in tar_samples(ds.shards("val")[-1][0])}
    assert set(got) & last_shard, "the last shard's examples are in it too"


def test_not_a_dataset_is_a_clear_error(ds, tmp_path):
    with pytest.raises(DatasetError, match="manifest.json is missing.*python -m data_prep run"):
        open_dataset(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        open_dataset(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"files": ["a.tar"]}')  # someone else's manifest
    with pytest.raises(DatasetError, match="format.name is not 'bert-pretraining-webdataset': it is not a manifest"):
        open_dataset(str(tmp_path))
    damaged = json.loads(json.dumps(ds.manifest))
    del damaged["tokenizer"]["vocab_size"]
    del damaged["splits"]["val"]["shards"][0]["sha256"]
    (tmp_path / "manifest.json").write_text(json.dumps(damaged))
    with pytest.raises(DatasetError, match="key tokenizer.vocab_size is missing; rebuild it with"):
        open_dataset(str(tmp_path))
    damaged["tokenizer"]["vocab_size"] = 8000
    (tmp_path / "manifest.json").write_text(json.dumps(damaged))
    with pytest.raises(DatasetError, match=r"splits.val.shards\[0\] lacks sha256"):
        open_dataset(str(tmp_path))
    newer = json.loads(json.dumps(ds.manifest))
    newer["format"]["version"] = 2  # (a dataset of a later format: its examples would be misread)
    (tmp_path / "manifest.json").write_text(json.dumps(newer))
    with pytest.raises(DatasetError, match="its format.version is 2; this bertforge reads version 1"):
        open_dataset(str(tmp_path))


def test_a_changed_shard_is_detected(ds, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(ds.root, copy)
    first = ds.manifest["splits"]["train"]["shards"][0]["name"]
    other = ds.manifest["splits"]["train"]["shards"][-1]["name"]
    shutil.copy(copy / other, copy / first)  # a shard with a different number of examples
    plan = StreamPlan(open_dataset(str(copy)).shards("train"), 1, seed=0, shuffle_buffer=10**6)
    with pytest.raises(DatasetError, match="python -m data_prep verify"):
        next(plan.examples(0))
    shutil.copy(ds.root + "/" + first, copy / first)
    with open(copy / first, "r+b") as f:  # the same size, other bytes: only the digest tells
        f.seek(2000)
        f.write(b"\xff" * 64)
    opened = open_dataset(str(copy))
    plan = StreamPlan(opened.shards("train"), 1, seed=0, shuffle_buffer=10**6, digests=opened.digests("train"))
    with pytest.raises(DatasetError, match=f"{copy / first}: cannot be read \\(its bytes differ from the sha256"):
        next(plan.examples(0))


def test_a_shard_that_cannot_be_read_is_named_and_a_failing_read_tried_again(tmp_path, monkeypatch):
    """A remote dataset is not listed shard by shard before a run: a shard gone since is named when a stream reaches
    it, a read the storage drops is tried again, and one that keeps failing is named."""
    from pretrain import data

    gone = data.Piece(str(tmp_path / "train" / "shard-000000-00000.tar"), 0, 1, 5)
    with pytest.raises(DatasetError, match=r"shard-000000-00000.tar: not found: the dataset lost this shard"):
        data.read_piece(gone)
    calls, slept = [], []
    monkeypatch.setattr(data.time, "sleep", slept.append)

    class PayloadError(Exception):  # (an HTTP client's dropped payload: not an OSError)
        pass

    def flaky(p):
        calls.append(p)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer") if len(calls) == 1 else PayloadError("cut short")
        return ["samples"]

    monkeypatch.setattr(data, "_read_piece", flaky)
    assert data.read_piece(gone) == ["samples"] and len(calls) == 3 and slept == [1, 2]
    def timing_out(p):
        raise TimeoutError("read timed out")

    monkeypatch.setattr(data, "_read_piece", timing_out)
    with pytest.raises(DatasetError, match=r"cannot be read after 3 tries \(TimeoutError: read timed out\)"):
        data.read_piece(gone)


def test_missing_names_each_absent_file(ds, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(ds.root, copy)
    assert open_dataset(str(copy)).missing() == []
    val = ds.manifest["splits"]["val"]["shards"][-1]["name"]
    (copy / val).unlink()
    shutil.rmtree(copy / "tokenizer")
    assert open_dataset(str(copy)).missing() == [ds.manifest["tokenizer"]["file"], val]


def test_a_remote_datasets_tokenizer_copy_follows_its_digest(tmp_path):
    """A run that reads a dataset from an object store keeps a copy of its tokenizer in its checkpoint directory;
    a copy left there by another dataset (same directory, another run) is replaced, not used."""
    import hashlib

    import fsspec

    from pretrain.data import Dataset

    def remote(name: str, content: bytes) -> Dataset:
        with fsspec.open(f"memory://{name}/tokenizer/spm.model", "wb") as f:
            f.write(content)
        sha = hashlib.sha256(content).hexdigest()
        return Dataset(f"memory://{name}", {"tokenizer": {"file": "tokenizer/spm.model", "sha256": sha}})

    first = remote("first", b"the first tokenizer")
    local = first.tokenizer_file(tmp_path)
    assert local.read_bytes() == b"the first tokenizer"
    second = remote("second", b"another dataset's tokenizer")
    assert second.tokenizer_file(tmp_path) == local and local.read_bytes() == b"another dataset's tokenizer"
    assert [p.name for p in local.parent.iterdir()] == ["spm.model"]  # no temporary file left behind
