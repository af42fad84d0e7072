"""Shard files: one msgpack member per example in plain POSIX tar, written under a temporary name and renamed.

Sample layout (what stock `webdataset.WebDataset(urls).decode()` yields per example, key `KEY.mp`):
    input_ids            list[int]  token ids as the model sees them: masks applied, no padding
    segment_b_start      int        index of segment B's first token (= len(input_ids) when there is no B)
    masked_lm_positions  list[int]  sorted positions of the prediction targets
    masked_lm_ids        list[int]  the original token ids at those positions
    next_sentence_label  int        1 when B is a random segment from another document (NSP datasets only)

The writer builds ustar headers itself rather than going through `tarfile`/`webdataset.TarWriter`:
with ~1.5 KB examples those cost 36-45 us per member on the dev machine, more than the whole budget
besides tokenization (~37 us per 128-token example); a prebuilt header template costs ~3 us.
The output is ordinary tar (GNU tar, `tarfile` and webdataset read it) with mtime 0, uid/gid 0 and
fixed names, so the same examples always give the same bytes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgpack

SAMPLE_EXT = "mp"
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


def tar_member(name: bytes, data: bytes) -> bytes:
    """One tar member (header + data + padding). `name` must be ASCII and at most 100 bytes."""
    size = b"%011o\0" % len(data)
    checksum = _HEADER_SUM + sum(name) + sum(size)
    header = b"".join((
        name, bytes(100 - len(name)), _HEADER[100:124], size, _HEADER[136:148],
        b"%06o\0 " % checksum, _HEADER[156:],
    ))
    pad = -len(data) % BLOCK
    return header + data + bytes(pad) if pad else header + data


_pack = msgpack.Packer().pack  # one Packer for the process: packb() builds a new one per call


def encode_sample(input_ids: list[int], b_start: int, positions: list[int], labels: list[int],
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

    A shard is visible under its final name only once complete (written as `.partial`, fsynced, renamed).
    """

    def __init__(self, root: Path, split: str, unit: int, per_shard: int):
        self.root, self.split, self.unit, self.per_shard = root, split, unit, per_shard
        (root / split).mkdir(parents=True, exist_ok=True)
        self.done: list[ShardInfo] = []
        self._f: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._examples = self._tokens = self._bytes = 0

    def _name(self) -> str:
        return f"{self.split}/shard-{self.unit:06d}-{len(self.done):05d}.tar"

    def add(self, payload: bytes, tokens: int) -> None:
        if self._f is None:
            self._f = open(self.root / (self._name() + PARTIAL_SUFFIX), "wb")
        key = b"%06d%05d%08d.%s" % (self.unit, len(self.done), self._examples, SAMPLE_EXT.encode())
        member = tar_member(key, payload)
        self._f.write(member)
        self._hash.update(member)
        self._examples += 1
        self._tokens += tokens
        self._bytes += len(member)
        if self._examples >= self.per_shard:
            self._finish()

    def _finish(self) -> None:
        assert self._f is not None
        trailer = bytes(2 * BLOCK)  # end-of-archive marker
        self._f.write(trailer)
        self._hash.update(trailer)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        name = self._name()
        os.replace(self.root / (name + PARTIAL_SUFFIX), self.root / name)
        self.done.append(ShardInfo(name, self._examples, self._tokens, self._hash.hexdigest(),
                                   self._bytes + len(trailer)))
        self._f, self._hash = None, hashlib.sha256()
        self._examples = self._tokens = self._bytes = 0

    def close(self) -> list[ShardInfo]:
        if self._f is not None:
            self._finish()
        return self.done


def decode_sample(data: bytes) -> dict:
    return msgpack.unpackb(data)


def google_features(sample: dict, max_seq_length: int, max_predictions: int) -> dict:
    """Rebuild Google BERT's padded features from one decoded sample (what `inspect --json` prints)."""
    ids = list(sample["input_ids"])
    n, b = len(ids), sample["segment_b_start"]
    pad = max_seq_length - n
    positions, labels = list(sample["masked_lm_positions"]), list(sample["masked_lm_ids"])
    m = max_predictions - len(positions)
    out = {
        "input_ids": ids + [0] * pad,
        "input_mask": [1] * n + [0] * pad,
        "segment_ids": [0] * b + [1] * (n - b) + [0] * pad,
        "masked_lm_positions": positions + [0] * m,
        "masked_lm_ids": labels + [0] * m,
        "masked_lm_weights": [1.0] * len(positions) + [0.0] * m,
    }
    if "next_sentence_label" in sample:
        out["next_sentence_label"] = sample["next_sentence_label"]
    return out
