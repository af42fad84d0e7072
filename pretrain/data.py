"""Training and validation batches from a dataset's WebDataset shards, with an exact, seekable data cursor.

The order is defined without reference to ranks or loader workers, so a resumed run continues exactly
where it stopped and a run on 1 rank sees the same global batches as one on 2:

* The train split is cut into pieces: whole shards, or every k-th example of a shard when there are
  fewer shards than streams. Each epoch permutes the pieces with (seed, epoch) and deals them to `S`
  streams, the largest first, each to the stream with the fewest examples so far; a stream reads its
  pieces in the permuted order. (Shards differ in size, a unit's last one is partial: dealt
  round-robin, the streams of 20 units' shards differed by up to 70% in a test, so an epoch of steps
  repeated part of the smallest stream and left part of the largest unread.) A stream walks its
  pieces in groups of about `shuffle_buffer` examples and yields each group in an order drawn from
  (seed, epoch, stream, group). Streams are endless: each moves into its next epoch on its own, so
  no rank ever runs dry (no hang at an epoch end).
* Global micro batch k is the (k // S)-th batch of B examples of stream k % S. Rank r of W takes
  k = i * W + r for its i-th micro batch, so with accumulation the optimizer step t covers global
  micro batches [t * A * W, (t + 1) * A * W).
* The cursor is the number of micro batches each rank has consumed. Seeking is arithmetic over the
  manifest's example counts plus reading one group, never a replay of the run so far.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import math
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import fsspec
import msgpack
import numpy as np
import torch
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_prep import storage
from data_prep.dataset import MANIFEST, DatasetError, parse_manifest
from data_prep.shards import SAMPLE_EXT
from data_prep.tokenizer import sha256_file
from pretrain.batch import Batch, Collator

MAX_EMPTY_EPOCHS = 1000  # a stream whose pieces are all empty would otherwise spin forever


@dataclass(frozen=True)
class Dataset:
    """A finished dataset: where it is and what its manifest says."""

    root: str
    manifest: dict

    @property
    def id(self) -> str:
        return self.manifest["dataset_id"]

    def _entries(self, split: str) -> list[tuple[str, dict]]:
        """(url, manifest entry) of each shard of `split`, in manifest order."""
        return [(f"{self.root}/{s['name']}", s) for s in self.manifest["splits"][split]["shards"]]

    def shards(self, split: str) -> list[tuple[str, int]]:
        """(url, examples) of each shard of `split`, in manifest order."""
        return [(url, s["examples"]) for url, s in self._entries(split)]

    def digests(self, split: str) -> dict[str, str]:
        """The manifest's sha256 of each shard of `split`, by its url (as `shards` gives it)."""
        return {url: s["sha256"] for url, s in self._entries(split)}

    def missing(self) -> list[str]:
        """The files the manifest names (tokenizer, shards) that a local dataset lacks ([] for a remote one:
        listing a bucket costs more than a missing shard's error when it is read)."""
        if "://" in self.root:
            return []
        names = [self.manifest["tokenizer"]["file"]] + [s["name"] for split in self.manifest["splits"].values()
                                                        for s in split["shards"]]
        present: dict[str, set[str]] = {}  # one listing per directory, not a stat per shard (thousands, on NFS)
        for folder in {str(Path(n).parent) for n in names}:
            try:
                present[folder] = {e.name for e in os.scandir(Path(self.root, folder)) if e.is_file()}
            except OSError:
                present[folder] = set()
        return [n for n in names if Path(n).name not in present[str(Path(n).parent)]]

    def damage(self, key: str = "data.dataset") -> str | None:
        """What the dataset lacks, said as a reason to refuse it (`key`: how the user gave it); None: nothing."""
        missing = self.missing()
        if not missing:
            return None
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return (f"{key} '{self.root}' is damaged: {', '.join(missing[:3])}{more} missing; check it with "
                f"python -m data_prep verify {self.root}, and rebuild it with data_prep run")

    def tokenizer_file(self, cache_dir: str | Path) -> Path:
        """A local path to the dataset's tokenizer model (copied from a remote dataset into `cache_dir`)."""
        rel = self.manifest["tokenizer"]["file"]
        if "://" not in self.root:
            return Path(self.root) / rel
        local = Path(cache_dir) / "tokenizer" / Path(rel).name
        # (a copy from an earlier run in the same directory may be another dataset's: its digest tells)
        if not local.is_file() or sha256_file(local) != self.manifest["tokenizer"]["sha256"]:
            local.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=local.parent, delete=False) as tmp:
                try:
                    with fsspec.open(f"{self.root}/{rel}", "rb") as src:
                        tmp.write(src.read())
                except BaseException:
                    Path(tmp.name).unlink(missing_ok=True)
                    raise
            Path(tmp.name).replace(local)
        return local


def tar_samples(url: str, sha256: str | None = None) -> Iterator[dict]:
    """The samples of one shard (a path or any fsspec URL: s3://, gs://, https://), by webdataset's tar reader.

    With `sha256` (the manifest's), the shard's bytes are hashed as they stream by and checked at its end (read to
    the end for it, however many samples were taken): bytes changed since it was written are refused, naming it,
    before the generator ends, and also where they made the tar reader fail. A caller acts on the samples only
    once the generator is exhausted (`read_piece`, `eval_batches`). At about 1 GB/s per core, hashing costs little
    beside the training it feeds."""
    with fsspec.open(url, "rb") as f:
        stream = _Hashing(f) if sha256 else f
        changed = DatasetError(f"{url}: cannot be read (its bytes differ from the sha256 the manifest recorded: the "
                               f"file changed after it was written); {CHECK_IT}")
        failed = None
        try:
            yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
        except Exception as e:  # (checked first: the damage, not what it made the tar reader say)
            failed = e
        if sha256 and stream.rest() != sha256:
            raise changed from None
        if failed:
            raise failed


class _Hashing(io.RawIOBase):
    """A read-only stream that hashes what passes through it; `rest()` reads what is left and gives the digest."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        b[:len(data)] = data
        self.h.update(data)
        return len(data)

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        return data

    def rest(self) -> str:
        while self.read(1 << 20):
            pass
        return self.h.hexdigest()


CHECK_IT = "check the dataset with `python -m data_prep verify`, and rebuild it with data_prep run"


def _exists(url: str) -> bool:
    """Whether the file at `url` (a path or fsspec URL) can be seen from here (False where it cannot be asked)."""
    try:
        return storage.exists(url)
    except Exception:  # noqa: BLE001 (credentials, a driver missing: no hint then)
        return False


def open_dataset(location: str) -> Dataset:
    """Read the manifest of the dataset at `location` (directory or URL); a clear error when it is not one."""
    root = location.rstrip("/")
    try:
        with fsspec.open(f"{root}/{MANIFEST}", "rt", encoding="utf-8") as f:
            text = f.read()
    except NotADirectoryError:
        hint = f"; give the directory that holds it ({Path(root).parent})" if root.endswith(MANIFEST) else ""
        raise DatasetError(f"data.dataset: '{location}' is a file, not a dataset directory{hint}") from None
    except FileNotFoundError:
        parent = root.rsplit("/", 1)[0] if "/" in root else ""
        inside = parent and not parent.endswith(":/") and _exists(f"{parent}/{MANIFEST}")  # (its train/, say)
        raise DatasetError(f"data.dataset: '{location}' is not a finished dataset ({MANIFEST} is missing); "
                           + (f"give the dataset directory that holds it: data.dataset={parent}" if inside else
                              "build one with `python -m data_prep run CONFIG`")) from None
    except Exception as e:  # noqa: BLE001 (permissions; an object store's credentials, endpoint, bucket)
        raise DatasetError(f"data.dataset: {storage.unreadable(f'{root}/{MANIFEST}', e)}") from None
    try:
        manifest = parse_manifest(text, f"{root}/{MANIFEST}")
    except DatasetError as e:
        raise DatasetError(f"data.dataset: {e}; rebuild it with `python -m data_prep run CONFIG`") from None
    if "://" not in root and (Path(root) / "config.yaml").is_file() and any(Path(root).glob("step-*")):
        raise DatasetError(f"data.dataset: '{location}' is a pretraining checkpoint directory (it keeps a copy of its "
                           f"dataset's manifest), not a dataset{_trained_on(Path(root) / 'config.yaml')}")
    if not manifest["splits"]["train"]["examples"]:
        raise DatasetError(f"data.dataset: '{location}' has no training examples")
    return Dataset(root, manifest)


def _trained_on(config: Path) -> str:
    """"; its run read data.dataset=X" from a checkpoint directory's config.yaml (empty if it cannot say)."""
    import yaml

    try:
        return f"; its run read data.dataset={yaml.safe_load(config.read_text())['data']['dataset']}"
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return ""


@dataclass(frozen=True)
class Piece:
    url: str
    part: int      # this piece holds examples part, part + parts, part + 2 * parts, ... of the shard
    parts: int
    count: int
    sha256: str | None = None  # the shard's, checked as it is read


# How an epoch's pieces go to the streams. Checkpoints whose cursor names no deal were dealt round-robin, and a run
# resumed from one keeps that order.
DEALS = ("balanced", "round-robin")


class StreamPlan:
    """The endless, seekable example streams of one split (see the module docstring)."""

    def __init__(self, shards: list[tuple[str, int]], streams: int, seed: int, shuffle_buffer: int,
                 deal: str = "balanced", digests: dict[str, str] | None = None):
        if deal not in DEALS:
            raise ValueError(f"deal must be one of {DEALS}, not {deal!r}")
        parts = max(1, math.ceil(streams / len(shards)))
        sha = digests or {}
        self.pieces = [Piece(url, j, parts, len(range(j, n, parts)), sha.get(url)) for url, n in shards
                       for j in range(parts)]
        self.streams, self.seed, self.deal = streams, seed, deal
        mean = sum(p.count for p in self.pieces) / len(self.pieces)
        self.group_pieces = max(1, math.ceil(shuffle_buffer / max(mean, 1)))
        self._dealt: tuple[int, list[list[int]]] | None = None  # the last epoch's deal

    def dealt(self, epoch: int) -> list[list[int]]:
        """Each stream's pieces (indices) in epoch `epoch`, in the order it reads them."""
        if self._dealt is None or self._dealt[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0x5EED])
            order = rng.permutation(len(self.pieces)).tolist()
            if self.deal == "round-robin":
                out = [order[s::self.streams] for s in range(self.streams)]
            else:  # the largest pieces first, each to the stream with the fewest examples so far; a stream then
                # reads its pieces in the epoch's order (ties of size go by that order, ties of load by a drawn one)
                rank = {i: r for r, i in enumerate(order)}
                out = [[] for _ in range(self.streams)]
                loads = [(0, tie, s) for s, tie in enumerate(rng.permutation(self.streams).tolist())]
                heapq.heapify(loads)
                for i in sorted(order, key=lambda i: (-self.pieces[i].count, rank[i])):
                    load, tie, s = heapq.heappop(loads)
                    out[s].append(i)
                    heapq.heappush(loads, (load + self.pieces[i].count, tie, s))
                out = [sorted(mine, key=rank.__getitem__) for mine in out]
            self._dealt = (epoch, out)
        return self._dealt[1]

    def groups(self, stream: int, epoch: int) -> list[list[Piece]]:
        mine = [self.pieces[i] for i in self.dealt(epoch)[stream]]
        g = self.group_pieces
        return [mine[i:i + g] for i in range(0, len(mine), g)]

    def examples(self, stream: int, start: int = 0) -> Iterator[tuple[int, dict]]:
        """(epoch, raw sample) of `stream` from its `start`-th example on, forever."""
        epoch, pos, empty = 0, start, 0
        while True:
            groups = self.groups(stream, epoch)
            total = sum(p.count for g in groups for p in g)
            empty = empty + 1 if total == 0 else 0
            if empty > MAX_EMPTY_EPOCHS:
                raise DatasetError(f"stream {stream} has no examples: use fewer data.streams")
            if pos >= total:
                pos -= total
                epoch += 1
                continue
            for gi, group in enumerate(groups):
                n = sum(p.count for p in group)
                if pos >= n:
                    pos -= n
                    continue
                samples = [s for p in group for s in read_piece(p)]
                order = np.random.default_rng([self.seed, epoch, stream, gi, 0x5EED]).permutation(n)
                for k in order[pos:]:
                    yield epoch, samples[k]
                pos = 0
            epoch += 1


READ_TRIES = 3  # a shard's read, where the storage fails on its own (a dropped connection, a throttled request)


def read_piece(p: Piece) -> list[dict]:
    """The samples of one piece, as {"__key__", "mp": raw bytes}, read with webdataset's tar reader; a storage
    error is tried again (READ_TRIES in all), a missing shard or a refused read named at once."""
    for attempt in range(READ_TRIES):
        try:
            return _read_piece(p)
        except FileNotFoundError:
            raise DatasetError(f"{p.url}: not found: the dataset lost this shard after it was written; {CHECK_IT}") \
                from None
        except PermissionError as e:
            raise DatasetError(f"{p.url}: cannot be read ({e}); check the storage's credentials") from None
        except DatasetError:
            raise
        except Exception as e:  # noqa: BLE001 (the storage's own: OSError, or an HTTP client's dropped payload or 5xx)
            if attempt == READ_TRIES - 1:
                raise DatasetError(f"{p.url}: cannot be read after {READ_TRIES} tries ({type(e).__name__}: {e})") \
                    from None
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


def _read_piece(p: Piece) -> list[dict]:
    out = []
    try:
        for i, s in enumerate(tar_samples(p.url, p.sha256)):
            if i % p.parts == p.part:
                out.append({"__key__": s["__key__"], SAMPLE_EXT: s[SAMPLE_EXT]})
    except (tarfile.TarError, EOFError, KeyError) as e:  # a truncated or damaged shard (KeyError: a member missing)
        raise DatasetError(f"{p.url}: cannot be read ({type(e).__name__}: {e}); {CHECK_IT}") from None
    if len(out) != p.count:
        raise DatasetError(f"{p.url}: holds a different number of examples than its manifest says; the dataset "
                           "changed after it was written (check it with `python -m data_prep verify`)")
    return out


def decoded(sample: dict) -> dict:
    return {"__key__": sample["__key__"], SAMPLE_EXT: msgpack.unpackb(sample[SAMPLE_EXT])}


class TrainBatches(torch.utils.data.IterableDataset):
    """Rank `rank`'s micro batches from its `start`-th on; splits itself across DataLoader workers."""

    def __init__(self, plan: StreamPlan, collator: Collator, micro_batch: int, rank: int, world: int, start: int = 0):
        self.plan, self.collator, self.micro_batch = plan, collator, micro_batch
        self.rank, self.world, self.start = rank, world, start
        if plan.streams % world:
            raise ValueError(f"data.streams ({plan.streams}) must be a multiple of the world size ({world})")

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        per_rank = self.plan.streams // self.world
        if per_rank % workers:
            raise ValueError(f"data.streams ({self.plan.streams}) must be a multiple of world size x "
                             f"data.num_workers ({self.world} x {workers})")
        # DataLoader hands out worker outputs round-robin from worker 0, so worker w serves start + w, + 2w...
        streams: dict[int, Iterator[tuple[int, dict]]] = {}
        i = self.start + wid
        while True:
            j = i % per_rank
            s = self.rank + self.world * j
            if s not in streams:
                streams[s] = self.plan.examples(s, (i // per_rank) * self.micro_batch)
            taken = [next(streams[s]) for _ in range(self.micro_batch)]
            yield self.collator([decoded(x) for _, x in taken], [e for e, _ in taken])
            i += workers


def train_loader(plan: StreamPlan, collator: Collator, micro_batch: int, rank: int, world: int, start: int,
                 num_workers: int, pin_memory: bool, worker_init_fn=None) -> torch.utils.data.DataLoader:
    ds = TrainBatches(plan, collator, micro_batch, rank, world, start)
    # Its own generator: starting a DataLoader draws a seed, which must not shift the training RNG (dropout)
    # between a run and its resumption. The batches themselves use no RNG state at all.
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                       prefetch_factor=4 if num_workers else None, worker_init_fn=worker_init_fn,
                                       generator=torch.Generator().manual_seed(0))


def eval_batches(dataset: Dataset, collator: Collator, micro_batch: int, rank: int, world: int,
                 limit: int, split: str = "val") -> list[tuple[Batch, float]]:
    """This rank's share of `limit` examples of `split` spread evenly over the whole split (shards are in input-file
    order: the first `limit` would come from the first files only), as (batch, weight); every rank gets as many
    batches.

    A rank's share is a contiguous block of the chosen examples, so it reads only the shards that hold its block
    (with many ranks and a remote split, each would otherwise fetch nearly every val shard). Ranks must run the same
    number of forwards (ZeRO-3 gathers parameters inside forward), so a rank with fewer examples repeats a batch of
    one example (its own first, or the split's first chosen one) with weight 0.
    """
    shards, digests = dataset.shards(split), dataset.digests(split)
    total = sum(n for _, n in shards)
    chosen = sorted({i * total // limit for i in range(limit)}) if limit < total else list(range(total))
    block = chosen[rank * len(chosen) // world:(rank + 1) * len(chosen) // world]
    wanted = block or chosen[:1]  # (a rank without examples reads the first: its weight-0 batches' example)
    mine, first = [], []
    start = 0  # the split's index of the shard's first example
    want = iter(wanted)
    nxt = next(want, None)
    for url, n in shards:
        if nxt is None:
            break
        if nxt >= start + n:  # none wanted from this shard: not read
            start += n
            continue
        taken = []  # (decoded once the shard has been read to its end and its digest checked)
        for i, s in enumerate(tar_samples(url, digests[url]), start):
            if i == nxt:
                taken.append({"__key__": s["__key__"], SAMPLE_EXT: s[SAMPLE_EXT]})
                nxt = next(want, None)
        for raw in taken:
            x = decoded(raw)
            first = first or [x]
            if block:
                mine.append(x)
        start += n
    n_batches = math.ceil(math.ceil(len(chosen) / world) / micro_batch) if chosen else 0
    out = [(collator(mine[i:i + micro_batch]), 1.0) for i in range(0, len(mine), micro_batch)]
    while len(out) < n_batches:
        out.append((collator(first), 0.0))
    return out
