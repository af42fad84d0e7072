"""Shard files: one msgpack member per example in plain POSIX tar, written under a temporary name and renamed.

Sample layout (what stock `webdataset.WebDataset(urls).decode()` yields per example, key `KEY.mp`);
arrays are raw little-endian bytes for `numpy.frombuffer`, token ids in the manifest's
`examples.token_dtype` (`<u2` up to 65,536 pieces, else `<i4`), positions in `<u2`:
    input_ids            bytes  token ids as the model sees them: masks applied, no padding
    segment_b_start      int    index of segment B's first token (= len(input_ids) when there is no B)
    masked_lm_positions  bytes  sorted positions of the prediction targets
    masked_lm_ids        bytes  the original token ids at those positions
    next_sentence_label  int    1 when B is a random segment from another document (NSP datasets only)
Binary arrays rather than msgpack lists: 2 bytes a token instead of ~2.7, ~1 us to pack instead of ~7,
and zero-copy numpy on the reading side.

The writer builds ustar headers itself rather than going through `tarfile`/`webdataset.TarWriter`:
with ~1.5 KB examples those cost 36-45 us per member on the dev machine, more than the whole budget
besides tokenization (~37 us per 128-token example); a prebuilt header template costs ~3 us.
The output is ordinary tar (GNU tar, `tarfile` and webdataset read it) with mtime 0, uid/gid 0 and
fixed names, so the same examples always give the same bytes.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgpack
import numpy as np

SAMPLE_EXT = "mp"
POSITION_DTYPE = np.dtype("<u2")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest little-endian type that holds every token id."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")
BLOCK = 512
PARTIAL_SUFFIX = ".partial"

_HEADER = bytearray(BLOCK)
_HEADER[100:108] = b"0000644\0"           # mode
_HEADER[108:116] = b"0000000\0"           # uid
_HEADER[116:124] = b"0000000\0"           # gid
_HEADER[136:148] = b"00000000000\0"       # mtime 0: reruns are byte-identical
_HEADER[148:156] = b"        "            # checksum field counts as spaces while summing
_HEADER[156:157] = b"0"                   # regular file
_HEADER[257:265] = b"ustar\x0000"         # POSIX ustar magic + version
_HEADER_SUM = sum(_HEADER)
_HEADER = bytes(_HEADER)


_MID = _HEADER[100:124]    # mode, uid, gid
_MTIME = _HEADER[136:148]
_TAIL = _HEADER[156:]      # type flag, link name, magic, owner, ...
_ZEROS = bytes(BLOCK)


def tar_member(name: bytes, data: bytes) -> bytes:
    """One tar member (header + data + padding). `name` must be ASCII and at most 100 bytes."""
    size = b"%011o\0" % len(data)
    checksum = _HEADER_SUM + sum(name) + sum(size)
    pad = -len(data) % BLOCK
    return b"".join((name, _ZEROS[:100 - len(name)], _MID, size, _MTIME, b"%06o\0 " % checksum, _TAIL,
                     data, _ZEROS[:pad]))


_pack = msgpack.Packer().pack  # one Packer for the process: packb() builds a new one per call


def encode_sample(input_ids: bytes, b_start: int, positions: bytes, labels: bytes,
                  next_sentence_label: int | None) -> bytes:
    sample = {
        "input_ids": input_ids,
        "segment_b_start": b_start,
        "masked_lm_positions": positions,
        "masked_lm_ids": labels,
    }
    if next_sentence_label is not None:
        sample["next_sentence_label"] = next_sentence_label
    return _pack(sample)


@dataclass
class ShardInfo:
    name: str       # relative to the dataset directory, e.g. "train/shard-000003-00001.tar"
    examples: int
    tokens: int
    sha256: str
    bytes: int


class ShardWriter:
    """Writes `shard-UUUUUU-KKKKK.tar` files of `per_shard` examples for one unit and split.

    A shard is visible under its final name only once complete (written as `.partial`, fsynced, renamed);
    `close()` returns once all of them are.
    """

    def __init__(self, root: Path, split: str, unit: int, per_shard: int):
        self.root, self.split, self.unit, self.per_shard = root, split, unit, per_shard
        (root / split).mkdir(parents=True, exist_ok=True)
        self.done: list[ShardInfo] = []
        self._members: list[bytes] = []  # members of the open shard not yet written (flushed every ~1 MB)
        self._pending = 0
        self._f: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._examples = self._tokens = self._bytes = 0
        self._syncer = ThreadPoolExecutor(max_workers=1)
        self._sync: list[Future] = []

    def _name(self) -> str:
        return f"{self.split}/shard-{self.unit:06d}-{len(self.done):05d}.tar"

    def add_many(self, payloads: list[bytes], tokens: list[int]) -> None:
        """Append examples in order, closing a shard each `per_shard` examples."""
        i = 0
        while i < len(payloads):
            take = min(len(payloads) - i, self.per_shard - self._examples)
            prefix = b"%06d%05d" % (self.unit, len(self.done))
            first = self._examples
            members = [tar_member(prefix + b"%08d.mp" % (first + j), payloads[i + j]) for j in range(take)]
            self._members += members
            self._pending += sum(map(len, members))
            self._examples += take
            self._tokens += sum(tokens[i:i + take])
            i += take
            if self._pending >= 1 << 20:
                self._flush()
            if self._examples >= self.per_shard:
                self._finish()

    def _flush(self) -> None:
        # One write and one hash update per ~1 MB rather than per member (~2 us an example saved).
        if self._f is None:
            self._f = open(self.root / (self._name() + PARTIAL_SUFFIX), "wb")
        data = b"".join(self._members)
        self._f.write(data)
        self._hash.update(data)
        self._bytes += len(data)
        self._members, self._pending = [], 0

    def _finish(self) -> None:
        self._members.append(bytes(2 * BLOCK))  # end-of-archive marker
        self._flush()
        assert self._f is not None
        self._f.flush()
        name = self._name()
        # fsync + rename in the background: the disk wait (up to ~0.2 s a shard on the dev VM) overlaps
        # the next shard's work; close() waits, so the caller only records shards that are durable.
        self._sync.append(self._syncer.submit(_commit, self._f, self.root / (name + PARTIAL_SUFFIX), self.root / name))
        self.done.append(ShardInfo(name, self._examples, self._tokens, self._hash.hexdigest(), self._bytes))
        self._f, self._hash = None, hashlib.sha256()
        self._examples = self._tokens = self._bytes = 0

    def close(self) -> list[ShardInfo]:
        """Finish the open shard and wait until every shard is on disk under its final name."""
        if self._examples:
            self._finish()
        for job in self._sync:
            job.result()
        self._syncer.shutdown()
        return self.done


    def abort(self) -> None:
        """After a failure: wait for background commits, drop the open shard's partial file."""
        for job in self._sync:
            try:
                job.result()
            except Exception:
                pass
        self._syncer.shutdown()
        if self._f is not None:
            self._f.close()
            (self.root / (self._name() + PARTIAL_SUFFIX)).unlink(missing_ok=True)
            self._f = None


def _commit(f: BinaryIO, partial: Path, final: Path) -> None:
    try:
        os.fsync(f.fileno())
        f.close()
        os.replace(partial, final)
    except BaseException:  # (a full disk: the shard is not finished, and no half of it stays)
        f.close()
        partial.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def write_whole(path: Path, write) -> None:
    """Put a file at `path` whole or not at all: `write(tmp)` fills PATH.partial, which is synced, renamed into
    place, and the rename synced."""
    tmp = path.with_name(path.name + ".partial")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # (a full disk: nothing half-written is left beside the file)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the directory entry, not just the file's bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def decode_sample(sample: dict, dtype: str | np.dtype) -> dict:
    """A decoded `.mp` member with its byte arrays turned into numpy arrays."""
    out = dict(sample)
    out["input_ids"] = np.frombuffer(sample["input_ids"], dtype)
    out["masked_lm_positions"] = np.frombuffer(sample["masked_lm_positions"], POSITION_DTYPE)
    out["masked_lm_ids"] = np.frombuffer(sample["masked_lm_ids"], dtype)
    return out


def google_features(sample: dict, max_seq_length: int, max_predictions: int) -> dict:
    """Google BERT's padded features (lists) from a `decode_sample` result; what `inspect --json` prints."""
    ids = sample["input_ids"].tolist()
    n, b = len(ids), sample["segment_b_start"]
    pad = max_seq_length - n
    positions, labels = sample["masked_lm_positions"].tolist(), sample["masked_lm_ids"].tolist()
    m = max_predictions - len(positions)
    out = {
        "input_ids": ids + [0] * pad,
        "input_mask": [1] * n + [0] * pad,
        "segment_ids": [0] * b + [1] * (n - b) + [0] * pad,
        "masked_lm_positions": positions + [0] * m,
        "masked_lm_ids": labels + [0] * m,
        "masked_lm_weights": [1.0] * len(positions) + [0.0] * m,
    }
    out["next_sentence_labels"] = sample.get("next_sentence_label", 0)  # (Google's name; 0 without NSP, as there)
    return out
