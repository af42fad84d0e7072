"""Find input files and stream them as documents (lists of clean sentences), counting every bad input per file."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

import fsspec

from data_prep.configfile import ConfigError
from data_prep.segment import split_sentences
from data_prep.storage import unreadable

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
_GLOB_CHARS = set("*?[")
# C0/C1 control characters except tab, newline and carriage return: counted and replaced by a space. (This class and
# the next are in pretrain/hf_compat.py's tokenizer too.)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Invisible marks that carry no text (BOM, zero-width space, U+FFFD left by a bad decode): dropped.
_INVISIBLE = re.compile(r"[\ufeff\u200b\ufffd]")
# Lone UTF-16 surrogates (only reachable through JSON "\ud800" escapes): they cannot be encoded as UTF-8.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_HEAD_BYTES = 8192
MAX_ISSUE_SAMPLES = 5
# A longer document is cut into parts of this many characters or a sentence more (each part a document of its own,
# counted as long_document): a .txt file without blank lines is one document, and a worker holds a pool of whole
# documents, about 20 bytes of memory per character once encoded.
MAX_DOCUMENT_CHARS = 1_000_000


@dataclass(frozen=True)
class Source:
    """One input file: where it is, how big it is on disk, and how to decode it."""

    url: str
    size: int  # bytes on disk; -1 when the store does not say
    fmt: str  # txt | jsonl | parquet
    compression: str | None


@dataclass
class FileReport:
    """What reading one file found: counts of documents and of each kind of bad input, with a few line numbers."""

    path: str
    bytes: int
    documents: int = 0
    sentences: int = 0
    issues: Counter = field(default_factory=Counter)
    samples: list = field(default_factory=list)

    def flag(self, issue: str, line: int | None = None, detail: str = "") -> None:
        self.issues[issue] += 1
        if self.issues[issue] <= MAX_ISSUE_SAMPLES:  # the first few of each kind
            self.samples.append({"issue": issue, "line": line, "detail": detail[:200]})

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "bytes": self.bytes,
            "documents": self.documents,
            "sentences": self.sentences,
            "issues": dict(sorted(self.issues.items())),
            "issue_samples": self.samples,
        }


def detect_format(name: str) -> tuple[str, str | None] | None:
    """`a.jsonl.zst` -> ("jsonl", "zstd"); None when the extension is not supported."""
    lower = name.lower()
    compression = None
    for ext, comp in COMPRESSIONS.items():
        if lower.endswith(ext):
            compression, lower = comp, lower[: -len(ext)]
            break
    for ext, fmt in FORMATS.items():
        if lower.endswith(ext):
            return fmt, compression
    return None


def _relative_to(spec: str) -> str:
    """For a relative local path: where it was looked for (a config run from another directory)."""
    return "" if "://" in spec or Path(spec).is_absolute() else f" (relative to the working directory {Path.cwd()})"


def _supported_list() -> str:
    return f"{'/'.join(FORMATS)}, optionally with {'/'.join(COMPRESSIONS)}"


def expand_inputs(inputs: list[str], skipped: list[str] | None = None) -> list[Source]:
    """Resolve paths, directories (recursive), globs and fsspec URLs into a sorted, de-duplicated file list.

    Files of a directory that are not inputs (other extensions) are left out, and appended to `skipped`."""
    found: dict[str, Source] = {}
    for i, spec in enumerate(inputs):
        key = f"inputs[{i}]"
        try:
            fs, path = fsspec.core.url_to_fs(spec)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"{key} '{spec}': cannot open this location ({e})") from None
        try:
            for source in _expand(key, spec, fs, path, skipped if skipped is not None else []):
                found[source.url] = source
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 (credentials, endpoint, bucket, permissions: say where)
            raise ConfigError(f"{key}: {unreadable(spec, e)}") from None
    return [found[k] for k in sorted(found)]


def _expand(key: str, spec: str, fs, path: str, skipped: list[str]) -> Iterator[Source]:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    local = protocol in ("file", "local")

    def url(p: str) -> str:
        return p if local else fs.unstrip_protocol(p)

    if _GLOB_CHARS & set(path) or fs.isdir(path):  # (a glob, like a directory, leaves other files out)
        globbed = bool(_GLOB_CHARS & set(path))
        every = sorted(p for p in fs.glob(path) if not fs.isdir(p)) if globbed else sorted(fs.find(path))
        matches = [p for p in every if detect_format(p)]
        skipped += [url(p) for p in every if not detect_format(p)]
        explicit = False
        if not matches and (every or not globbed):
            raise ConfigError(f"{key} '{spec}': the {'files it matches are' if globbed else 'directory holds'} "
                              f"no {_supported_list()} files")
    elif fs.exists(path):
        matches, explicit = [path], True
    else:
        raise ConfigError(f"{key} '{spec}': no such file or directory{_relative_to(spec)}")
    if not matches:
        raise ConfigError(f"{key} '{spec}' matched no files{_relative_to(spec)}")
    for p in matches:
        kind = detect_format(p)
        if kind is None:
            if explicit:
                raise ConfigError(f"{key}: '{url(p)}' has an unsupported extension; expected {_supported_list()}")
            continue
        size = fs.size(p)
        yield Source(url(p), -1 if size is None else int(size), kind[0], kind[1])


def _to_str(raw: bytes, lineno: int, report: FileReport) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        report.flag("invalid_utf8", lineno, f"byte {e.start}: {raw[e.start:e.start + 4]!r}")
        return raw.decode("utf-8", "replace")


def _clean(text: str, lineno: int, report: FileReport) -> str:
    text = text.strip()
    if text.isprintable() and "\ufffd" not in text:
        return text  # the common case, checked in C: no control, format or surrogate characters
    if _SURROGATE.search(text):
        report.flag("invalid_utf8", lineno, "lone UTF-16 surrogate escape")
        text = _SURROGATE.sub("", text)
    if _CONTROL.search(text):
        report.flag("control_chars", lineno)
        text = _CONTROL.sub(" ", text)
    if _INVISIBLE.search(text):
        text = _INVISIBLE.sub("", text)
    return text.strip()


def plain_text(text: str) -> str:
    """`text` cleaned as a corpus's text is, without counting: what fine-tuning and inference give the tokenizer, so
    that a model sees text as it was pretrained on it."""
    if text.isprintable() and "\ufffd" not in text:
        return text
    return _INVISIBLE.sub("", _CONTROL.sub(" ", _SURROGATE.sub("", text)))


_BLOCK = 1 << 20


def _flag_too_long(report: FileReport, line: int, n: int, max_bytes: int) -> None:
    """Report line (or parquet row) `line` of `n` bytes as over read.max_line_bytes: skipped."""
    report.flag("line_too_long", line, f"{n} bytes (read.max_line_bytes={max_bytes})")


def _line_blocks(f: IO[bytes], max_bytes: int, report: FileReport,
                 at: list[int]) -> Iterator[tuple[int, list[str | None]]]:
    """Yield (number of the block's first line, its lines decoded); an over-long line is None.

    Reads blocks of up to 1 MiB and splits/decodes them whole (C loops, ~3x faster than `readline`);
    an over-long line is skipped in bounded memory. `at[0]` holds the number of the line being read, so
    a failure can name it.
    """
    # read1: whatever one decompression step yields, so a truncated archive gives up its readable part.
    read = getattr(f, "read1", f.read)
    lineno = 0
    carry: list[bytes] = []  # an unfinished line as chunks: no re-copy per block on a long line
    carry_len = 0
    skipped = -1  # >= 0 while dropping the rest of an over-long line

    def too_long(n: int, line: int) -> None:
        _flag_too_long(report, line, n, max_bytes)

    while True:
        at[0] = lineno + 1
        block = read(_BLOCK)
        if not block:
            break
        if skipped >= 0:
            nl = block.find(b"\n")
            if nl < 0:
                skipped += len(block)
                continue
            too_long(skipped + nl, lineno)
            skipped, block = -1, block[nl + 1:]
        last = block.rfind(b"\n")
        if last < 0:
            carry.append(block)
            carry_len += len(block)
        else:
            buf = b"".join((*carry, block)) if carry else block
            last += len(buf) - len(block)
            raws = buf[:last].split(b"\n")
            carry = [buf[last + 1:]]
            carry_len = len(carry[0])
            lines: list[str | None] = _decode_lines(raws, max_bytes, lineno, report)
            if max(map(len, raws)) > max_bytes:
                for i, raw in enumerate(raws):
                    if len(raw) > max_bytes:
                        too_long(len(raw), lineno + i + 1)
                        lines[i] = None
            at[0] = lineno + 1
            yield lineno + 1, lines
            lineno += len(raws)
        if carry_len > max_bytes:
            lineno += 1
            skipped, carry, carry_len = carry_len, [], 0
            yield lineno, [None]
    rest = b"".join(carry)
    if skipped >= 0:
        too_long(skipped, lineno)
    elif rest:
        at[0] = lineno + 1
        if len(rest) > max_bytes:
            too_long(len(rest), lineno + 1)
            yield lineno + 1, [None]
        else:
            yield lineno + 1, _decode_lines([rest], max_bytes, lineno, report)


def _lines(f: IO[bytes], max_bytes: int, report: FileReport, at: list[int]) -> Iterator[tuple[int, str | None]]:
    """(line number, decoded line or None when over-long), one at a time."""
    for first, lines in _line_blocks(f, max_bytes, report, at):
        for i, line in enumerate(lines):
            at[0] = first + i
            yield first + i, line


def _decode_lines(raws: list[bytes], max_bytes: int, first: int, report: FileReport) -> list[str]:
    """Decode a block's lines in one call; only a block with bad bytes is decoded line by line."""
    try:
        return b"\n".join(raws).decode("utf-8").split("\n")
    except UnicodeDecodeError:
        return [_to_str(raw, first + i + 1, report) if len(raw) <= max_bytes else "" for i, raw in enumerate(raws)]


def _cut(sentences: list[str]) -> tuple[list[list[str]], list[str]]:
    """A long document's whole parts (each the shortest run of its sentences that reaches MAX_DOCUMENT_CHARS) and
    what is left after them: the same parts whether cut at once or as the document grows."""
    parts, begin, chars = [], 0, 0
    for i, sentence in enumerate(sentences):
        chars += len(sentence)
        if chars >= MAX_DOCUMENT_CHARS:
            parts.append(sentences[begin:i + 1])
            begin, chars = i + 1, 0
    return parts, sentences[begin:]


class DocumentReader:
    """Streams one source as documents; every problem becomes a count in `report`, never an exception."""

    def __init__(self, source: Source, text_field: str, split_mode: str, max_line_bytes: int, min_chars: int):
        self.source = source
        self.text_field = text_field
        self.max_line_bytes = max_line_bytes
        self.min_chars = min_chars
        self.segment = split_mode == "always" or (split_mode == "auto" and source.fmt != "txt")
        self.report = FileReport(source.url, source.size)
        self._at = [0]  # line (or parquet row) being read: where a read error happened

    def __iter__(self) -> Iterator[list[str]]:
        rep = self.report
        if self.source.size == 0 and "://" not in self.source.url:  # remote stores may not report sizes
            rep.flag("empty_file")
            return
        self._at[0] = 0
        try:
            is_zstd = self.source.compression == "zstd"
            with fsspec.open(self.source.url, "rb", compression=None if is_zstd else self.source.compression) as raw, \
                    (zstd_reader(raw) if is_zstd else contextlib.nullcontext(raw)) as raw:
                f = raw if hasattr(raw, "peek") else io.BufferedReader(raw, 1 << 16)
                head = f.peek(_HEAD_BYTES)[:_HEAD_BYTES]
                if not head:
                    rep.flag("empty_file")
                    return
                if self.source.fmt != "parquet" and head[:2] in (b"\xff\xfe", b"\xfe\xff"):
                    rep.flag("binary_file", 1, "UTF-16 text (its byte-order mark); file skipped: convert it to UTF-8 "
                                               "(e.g. iconv -f UTF-16 -t UTF-8)")
                    return
                if self.source.fmt != "parquet" and _looks_binary(head):
                    rep.flag("binary_file", 1, "many NUL bytes or mostly non-UTF-8 in the first 8 KiB; file skipped")
                    return
                if self.source.fmt == "parquet":
                    yield from self._parquet(f)
                else:
                    for _, doc in self._txt(f) if self.source.fmt == "txt" else self._jsonl(f):
                        yield doc
        except Exception as e:
            if _environmental(e):
                raise  # a network or disk failure, not the file's fault: the task fails and Ray retries it
            # Damaged bytes (a truncated or corrupt archive) end this file, not the job.
            line = self._at[0] or None
            where = f" at {'row' if self.source.fmt == 'parquet' else 'line'} {line}" if line else ""
            rep.flag("read_error", line,
                     f"{type(e).__name__}{where}: {e}; documents read before it are kept, the rest of the file is not")
        if rep.documents == 0 and not rep.issues:
            rep.flag("empty_file")

    def _emit(self, sentences: list[str], lineno: int) -> Iterator[list[str]]:
        """The document of these sentences (a long one in parts), counted; none where no sentence is kept."""
        kept = [s for s in sentences if len(s) >= self.min_chars]
        if not kept:
            self.report.flag("empty_document", lineno, "no text" if not sentences else
                             f"no sentence of read.min_sentence_chars={self.min_chars} characters or more")
            return
        parts, rest = _cut(kept) if sum(map(len, kept)) >= MAX_DOCUMENT_CHARS else ([], kept)
        for _ in parts:
            self.report.flag("long_document", lineno, f"a part of {MAX_DOCUMENT_CHARS:,} characters (or a sentence "
                                                      "more) cut off as a document of its own")
        for part in parts + ([rest] if rest else []):
            self.report.documents += 1
            self.report.sentences += len(part)
            if len(part) == 1:
                self.report.flag("single_sentence_document", lineno)
            yield part

    def _sentences(self, text: str) -> list[str]:
        if not self.segment:
            return [text] if text else []
        return split_sentences(text)

    def _txt(self, f: IO[bytes]) -> Iterator[tuple[int, list[str]]]:
        doc: list[str] = []
        chars = 0  # in `doc`: a long one is cut as it grows, so that reading it takes bounded memory too
        start = 1
        for first, lines in _line_blocks(f, self.max_line_bytes, self.report, self._at):
            joined = "" if self.segment or None in lines else "".join(lines)
            if joined and joined.isprintable() and "\ufffd" not in joined:
                # Fast path, a block at a time: clean text, one sentence per line, documents between blanks.
                texts = list(map(str.strip, lines))
                prev = 0
                for blank in [i for i, t in enumerate(texts) if not t]:
                    if not doc:
                        start = first + prev
                    doc.extend(texts[prev:blank])
                    if doc:
                        for out in self._emit(doc, start):
                            yield first + blank, out
                        doc, chars = [], 0
                    prev = blank + 1
                if prev < len(texts):
                    if not doc:
                        start = first + prev
                    doc.extend(texts[prev:])
                    chars += sum(map(len, texts[prev:]))
                    if chars >= MAX_DOCUMENT_CHARS:
                        doc, chars, start = yield from self._grown(doc, start, first + len(texts) - 1)
                continue
            for i, line in enumerate(lines):
                if line is None:
                    continue
                lineno = first + i
                self._at[0] = lineno
                text = _clean(line, lineno, self.report)
                if text:
                    if not doc:
                        start = lineno
                    sentences = self._sentences(text)
                    doc.extend(sentences)
                    chars += sum(map(len, sentences))
                    if chars >= MAX_DOCUMENT_CHARS:
                        doc, chars, start = yield from self._grown(doc, start, lineno)
                elif doc:
                    for out in self._emit(doc, start):
                        yield lineno, out
                    doc, chars = [], 0
        if doc:
            for out in self._emit(doc, start):
                yield start, out

    def _grown(self, doc: list[str], start: int, lineno: int):
        """The whole parts of a document still being read, emitted; returns what is left, its size and line."""
        parts, rest = _cut(doc)
        for part in parts:
            for out in self._emit(part, start):
                yield lineno, out
        return rest, sum(map(len, rest)), lineno

    def _jsonl(self, f: IO[bytes]) -> Iterator[tuple[int, list[str]]]:
        for lineno, line in _lines(f, self.max_line_bytes, self.report, self._at):
            if line is None or not line.strip():
                continue
            # Lines arrive decoded: one bad byte inside a string is invalid_utf8, not a lost line.
            if lineno == 1:
                line = line.lstrip("\ufeff")
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
                self.report.flag("bad_json", lineno, str(e))
                continue
            if not isinstance(obj, dict):  # (no field name helps: the line is not a record)
                self.report.flag("not_text", lineno, f"the line is a JSON {_json_kind(obj)}, not an object with a "
                                                     f"'{self.text_field}' field")
                continue
            if self.text_field not in obj:
                self.report.flag("missing_field", lineno, f"no '{self.text_field}' (set text_field)")
                continue
            text = obj[self.text_field]
            if text is None:
                self.report.flag("not_text", lineno, f"'{self.text_field}' is null")
                continue
            if not isinstance(text, str):
                self.report.flag("not_text", lineno, f"'{self.text_field}' is a {type(text).__name__}")
                continue
            for out in self._emit(self._paragraphs(_clean(text, lineno, self.report)), lineno):
                yield lineno, out

    def _paragraphs(self, text: str) -> list[str]:
        out: list[str] = []
        for para in text.split("\n"):
            para = para.strip()
            if para:
                out.extend(self._sentences(para) if self.segment else [para])
        return out

    def _parquet(self, f: IO[bytes]) -> Iterator[list[str]]:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        with tempfile.TemporaryFile() as spool:
            if self.source.compression:  # parquet needs a seekable file: spool the decompressed bytes to disk
                shutil.copyfileobj(f, spool, 1 << 20)
                spool.seek(0)
                f = spool
            pf = pq.ParquetFile(f)
            if self.text_field not in pf.schema_arrow.names:
                self.report.flag("missing_field", None, f"no column '{self.text_field}' (set text_field); file skipped")
                return
            row = 0
            for batch in pf.iter_batches(batch_size=256, columns=[self.text_field]):
                column = batch.column(0)
                too_long: dict[int, int] = {}  # a row over read.max_line_bytes, as a line: left in Arrow, never copied
                if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                    sizes = pc.binary_length(column)
                    over = pc.greater(sizes, self.max_line_bytes)
                    if pc.any(over).as_py():
                        too_long = {int(i): sizes[int(i)].as_py() for i in pc.indices_nonzero(over).to_pylist()}
                        column = pc.if_else(over, pa.scalar(None, column.type), column)
                for i, text in enumerate(column.to_pylist()):
                    row += 1
                    self._at[0] = row
                    if i in too_long:
                        _flag_too_long(self.report, row, too_long[i], self.max_line_bytes)
                        continue
                    if text is None:
                        self.report.flag("not_text", row, f"'{self.text_field}' is null")
                        continue
                    if not isinstance(text, str):
                        self.report.flag("not_text", row, f"a {type(text).__name__}")
                        continue
                    yield from self._emit(self._paragraphs(_clean(text, row, self.report)), row)


def zstd():
    """The standard library's zstd module (Python 3.14), or its backport before."""
    if sys.version_info >= (3, 14):
        from compression import zstd as module
    else:
        from backports import zstd as module
    return module


def zstd_reader(raw: IO[bytes]) -> IO[bytes]:
    """A reader of zstd frames that, like gzip's, bz2's and lzma's, raises EOFError where the file ends inside a
    frame (a truncated file); zstandard's stream reader, which fsspec may choose, ends there silently."""
    return zstd().ZstdFile(raw)


def _environmental(e: BaseException) -> bool:
    """True for failures of the machine or network (worth a retry), False for defects of the file's bytes.

    Decompressors report damage as EOFError, ValueError or an OSError without errno (bz2, BadGzipFile);
    the OS and the remote filesystems set errno or raise their own connection/timeout types.
    """
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    if isinstance(e, OSError) and e.errno is not None:
        return True
    return type(e).__module__.split(".")[0] in ("aiohttp", "botocore", "fsspec", "s3fs", "gcsfs", "adlfs")


def _json_kind(value: object) -> str:
    return {str: "string", list: "array", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def _looks_binary(head: bytes) -> bool:
    """Binary data: NUL bytes beyond a stray few (one in text is a control character, replaced), or mostly bytes
    that are not UTF-8."""
    if head.count(b"\x00") > max(8, len(head) // 100):
        return True
    text = head.decode("utf-8", "replace")
    return text.count("\ufffd") > max(8, len(text) // 10)
