"""Bad input: each kind is counted per file (with a line number) where the job can go on, and stops the job
with a clear message, a non-zero exit and no half-written dataset where it cannot.

Most tests read through `DocumentReader` directly (no Ray); the job-level ones (exit codes, report.json,
what is left in the output directory) run the CLI in a subprocess or `pipeline.run` on the session Ray.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
import re
import time
import tracemalloc
from pathlib import Path

import pytest

from conftest import make_document, run_cli, small_config, write_jsonl, write_txt
from data_prep.config import ReadConfig
from data_prep.configfile import ConfigError
from data_prep.sources import DocumentReader, FileReport, expand_inputs

DEFAULT_MAX_LINE = ReadConfig().max_line_bytes


def read(path: Path, text_field: str = "text", split: str = "auto",
         max_line_bytes: int = DEFAULT_MAX_LINE) -> tuple[list[list[str]], FileReport]:
    (source,) = expand_inputs([str(path)])
    reader = DocumentReader(source, text_field, split, max_line_bytes, 1)
    docs = list(reader)
    return docs, reader.report


def sample_lines(report: FileReport, issue: str) -> list[int | None]:
    return [s["line"] for s in report.samples if s["issue"] == issue]


def docs_of(rng_seed: int, n: int) -> list[list[str]]:
    rng = random.Random(rng_seed)
    return [make_document(rng, rng.randint(2, 6)) for _ in range(n)]


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(json.dumps(tree), encoding="utf-8")  # JSON is YAML
    return path


def visible_files(root: Path) -> list[str]:
    """Files a reader of the output would see (not under a hidden directory such as `.work/`)."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def assert_no_dataset(out: Path) -> None:
    assert not (out / "manifest.json").exists()
    assert not [p for p in visible_files(out) if p.endswith(".tar")], visible_files(out)


# 1. inputs that match no file ------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, words", [
    ("nothing-here/*.txt", "matched no files"),
    ("missing/corpus.txt", "no such file or directory"),
])
def test_inputs_matching_nothing_exit_2(tmp_path, pattern, words):
    spec = str(tmp_path / pattern)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", {"inputs": [spec], "output": str(out)})
    res = run_cli("run", str(cfg))
    assert res.returncode == 2, res.stderr
    assert "inputs[0]" in res.stderr and spec in res.stderr and words in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()


def test_second_input_matching_nothing_is_named(tmp_path, small_corpus, monkeypatch):
    with pytest.raises(ConfigError, match=r"inputs\[1\] '.*\*\.jsonl' matched no files$"):
        expand_inputs([str(small_corpus), str(tmp_path / "none" / "*.jsonl")])
    # a glob, like a directory, leaves out the files that are not corpora (and says which); none at all is an error
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("text\n")
    (tmp_path / "c" / "README.md").write_text("notes\n")
    skipped: list[str] = []
    assert [s.url for s in expand_inputs([str(tmp_path / "c" / "*")], skipped)] == [str(tmp_path / "c" / "a.txt")]
    assert skipped == [str(tmp_path / "c" / "README.md")]
    with pytest.raises(ConfigError, match=r"inputs\[0\] '.*R\*': the files it matches are no \.txt"):
        expand_inputs([str(tmp_path / "c" / "R*")])
    monkeypatch.chdir(tmp_path)  # a relative path: where it was looked for
    with pytest.raises(ConfigError, match=rf"inputs\[0\] 'corpus/demo': no such file or directory \(relative to the "
                                          rf"working directory {tmp_path}\)"):
        expand_inputs(["corpus/demo"])


def test_an_object_store_without_credentials_is_named(tmp_path, monkeypatch, capsys):
    """(botocore refuses before any request is sent, so no endpoint has to exist.)"""
    import s3fs

    from data_prep.cli import main
    from data_prep.dataset import DatasetError
    from pretrain.data import open_dataset

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    advice = r"\(NoCredentialsError: .*; check the storage's credentials"
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(ConfigError, match=rf"inputs\[1\]: cannot read 's3://corpus/books/\*.txt' {advice}"):
            expand_inputs([str(write_txt(tmp_path / "a.txt", [["One sentence."]])), "s3://corpus/books/*.txt"])
        with pytest.raises(DatasetError, match=rf"data.dataset: cannot read 's3://corpus/ds/manifest.json' {advice}"):
            open_dataset("s3://corpus/ds")
        assert main(["inspect", "s3://corpus/ds"]) == 1
        assert re.search(rf"cannot read 's3://corpus/ds/manifest.json' {advice}", capsys.readouterr().err)
    finally:  # (a filesystem without credentials must not stay cached for later tests)
        s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(DatasetError, match=r"cannot read '.*manifest.json' \(IsADirectoryError[^;]*$"):
        (tmp_path / "ds" / "manifest.json").mkdir(parents=True)  # a local failure: no object-store advice
        open_dataset(str(tmp_path / "ds"))


def test_an_unreachable_ray_address_fails_fast():
    """(Checked before ray.init, which would retry for minutes; called directly, whether or not this test
    session's own Ray is up.)"""
    from conftest import free_port
    from data_prep.pipeline import _check_reachable

    t = time.monotonic()
    with pytest.raises(ConfigError, match=r"cannot reach ray.address '127.0.0.1:\d+' .*ray start --head"):
        _check_reachable(f"127.0.0.1:{free_port()}")
    assert time.monotonic() - t < 10
    _check_reachable("auto")  # Ray's own lookup: left to Ray


# 2, 3. empty and binary files ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, data", [
    ("empty.txt", b""),
    ("empty.jsonl", b""),
    ("empty.txt.gz", gzip.compress(b"", mtime=0)),   # not 0 bytes on disk, but nothing inside
    ("blank.txt", b"\n\n  \n\n"),
])
def test_empty_file(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    docs, rep = read(p)
    assert docs == []
    assert rep.issues == {"empty_file": 1}


def test_binary_file_skipped(tmp_path):
    rng = random.Random(3)
    data = bytes(rng.randrange(256) for _ in range(20000)) + b"\x00\x00" + b"Real text. Here.\n" * 10
    p = tmp_path / "x.txt"
    p.write_bytes(data)
    docs, rep = read(p)
    assert docs == []
    assert rep.issues == {"binary_file": 1}
    assert "skipped" in rep.samples[0]["detail"]
    text = "A line of real text. Here it goes on.\n" * 300
    p.write_bytes(text[:100].encode() + b"\x00" + text[100:].encode())  # a stray NUL: text with a control character
    docs, rep = read(p)
    assert len(docs) == 1 and rep.issues == {"control_chars": 1}, rep.issues
    p.write_bytes(b"\x00".join(line.encode() for line in text.splitlines(keepends=True)[:60]))  # NULs throughout
    assert read(p)[1].issues == {"binary_file": 1}
    p.write_bytes("Real text. Here.\n".encode("utf-16"))  # what Windows tools save as "Unicode"
    docs, rep = read(p)
    assert docs == [] and rep.issues == {"binary_file": 1}
    assert "UTF-16 text (its byte-order mark); file skipped: convert it to UTF-8" in rep.samples[0]["detail"]


# 4. invalid UTF-8 and control characters ---------------------------------------------------------------------

def test_invalid_utf8_line_counted_and_text_kept(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"First good line.\nSecond caf\xe9 line \xff\xfe here.\nThird good line.\n\nNext doc.\nMore.\n")
    docs, rep = read(p)
    assert docs == [["First good line.", "Second caf line  here.", "Third good line."], ["Next doc.", "More."]]
    assert rep.issues == {"invalid_utf8": 1}
    assert sample_lines(rep, "invalid_utf8") == [2]


def test_invalid_utf8_inside_jsonl_string_keeps_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "Caf\xe9 is open. It sells bread."}\n'
                  b'{"text": "A lone \\ud800 surrogate. Still text."}\n')
    docs, rep = read(p)
    assert [s.replace("  ", " ") for d in docs for s in d] == [
        "Caf is open.", "It sells bread.", "A lone surrogate.", "Still text."]
    assert rep.issues == {"invalid_utf8": 2}
    assert sample_lines(rep, "invalid_utf8") == [1, 2]
    "\n".join(s for d in docs for s in d).encode("utf-8")  # what the pipeline writes must be encodable


def test_control_chars_counted_and_replaced(tmp_path):
    p = tmp_path / "ctl.txt"
    p.write_bytes(b"Clean line one.\nBell\x07here and escape\x1b[0m too.\nform\x0cfeed.\n")
    docs, rep = read(p)
    assert docs == [["Clean line one.", "Bell here and escape [0m too.", "form feed."]]
    assert rep.issues == {"control_chars": 2}
    assert sample_lines(rep, "control_chars") == [2, 3]


# 5. truncated compressed file --------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", [".gz", ".bz2", ".xz", ".zst"])
def test_truncated_compressed_file_keeps_what_was_read(tmp_path, ext):
    docs = docs_of(11, 600)
    plain = write_txt(tmp_path / "full.txt", docs)
    data = COMPRESSORS[ext](plain.read_bytes())
    cut = tmp_path / f"cut.txt{ext}"
    cut.write_bytes(data[: len(data) * 2 // 3])

    got, rep = read(cut)
    again, rep2 = read(cut)
    assert got == again and rep.to_json() == rep2.to_json()  # deterministic
    assert rep.issues["read_error"] == 1
    assert set(rep.issues) <= {"read_error", "single_sentence_document"}
    assert 0 < len(got) < len(docs)
    assert got == docs[: len(got)]  # only whole documents from before the cut
    (sample,) = [s for s in rep.samples if s["issue"] == "read_error"]
    n_lines = sum(len(d) + 1 for d in got)
    assert sample["line"] is not None and sample["line"] > n_lines
    assert f"line {sample['line']}" in sample["detail"] and "EOFError" in sample["detail"]


@pytest.mark.parametrize("ext", [".gz", ".bz2", ".xz", ".zst"])
def test_a_file_that_is_not_what_its_extension_says_is_a_read_error(tmp_path, ext):
    """Bytes that are no archive of the kind named (or an archive cut within its first block) are a read error,
    not an empty file."""
    small = COMPRESSORS[ext](b"One sentence.\nAnother one.\n" * 3)
    for name, data in {"junk": b"not compressed at all\n" * 50, "short": small[: len(small) // 2]}.items():
        path = tmp_path / f"{name}.txt{ext}"
        path.write_bytes(data)
        got, rep = read(path)
        assert got == [] and rep.issues == {"read_error": 1}, (name, rep.to_json())


# 6. bad JSON lines ---------------------------------------------------------------------------------------------

def test_jsonl_bad_lines(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_text(
        '{"text": "Good one. Two sentences."}\n'
        '{"text": "unterminated\n'
        '{"body": "no text field here."}\n'
        '{"text": 42}\n'
        '\n'
        '["a", "list"]\n'
        '{"text": null}\n'
        '{"text": "Last good. Also two."}\n'
        + "[" * 100_000 + "\n",
        encoding="utf-8",
    )
    docs, rep = read(p)
    assert docs == [["Good one.", "Two sentences."], ["Last good.", "Also two."]]
    # (a null text or a line that is no record is not a field name to change: not_text, not missing_field)
    assert rep.issues == {"bad_json": 2, "missing_field": 1, "not_text": 3}
    assert rep.documents == 2 and rep.sentences == 4
    by_issue = {}
    for s in rep.samples:
        by_issue.setdefault(s["issue"], []).append(s["line"])
    assert by_issue == {"bad_json": [2, 9], "missing_field": [3], "not_text": [4, 6, 7]}
    details = {s["line"]: s["detail"] for s in rep.samples}
    assert "'text'" in details[3] and "int" in details[4] and "set text_field" not in details[6] + details[7]
    assert details[6] == "the line is a JSON array, not an object with a 'text' field"
    assert details[7] == "'text' is null"


def test_jsonl_other_text_field(tmp_path):
    p = write_jsonl(tmp_path / "b.jsonl", [["Alpha one.", "Beta two."]], field="body")
    docs, rep = read(p, text_field="body")
    assert docs == [["Alpha one.", "Beta two."]] and not rep.issues
    docs, rep = read(p)
    assert docs == [] and rep.issues == {"missing_field": 1}
    assert "'text'" in rep.samples[0]["detail"] and "text_field" in rep.samples[0]["detail"]


# 7. a 100 MB line -----------------------------------------------------------------------------------------------

def test_100mb_line_is_skipped_in_bounded_memory(tmp_path):
    p = tmp_path / "huge.txt"
    chunk = b"word " * (1 << 18)  # 1.25 MiB, written again and again: the line is never in memory
    total = 100 * 10**6
    with open(p, "wb") as f:
        f.write(b"Before the long line.\nStill before.\n\n")
        written = 0
        while written < total:
            n = min(len(chunk), total - written)
            f.write(chunk[:n] if n < len(chunk) else chunk)
            written += n
        f.write(b"\nAfter the long line.\nAnd one more.\n\nLast doc here.\nEnd.\n")
    del chunk

    tracemalloc.start()
    try:
        docs, rep = read(p)  # default read.max_line_bytes (4 MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB while reading a 100 MB line"
    assert rep.issues == {"line_too_long": 1}
    assert sample_lines(rep, "line_too_long") == [4]
    assert f"{total} bytes" in rep.samples[0]["detail"] and "read.max_line_bytes" in rep.samples[0]["detail"]
    assert docs == [["Before the long line.", "Still before."],
                    ["After the long line.", "And one more."],
                    ["Last doc here.", "End."]]


def test_line_limit_boundary(tmp_path):
    p = tmp_path / "edge.jsonl"
    limit = 1024
    ok = json.dumps({"text": "a" * (limit - 20)}).encode()
    ok += b" " * (limit - len(ok))  # exactly `limit` bytes before the newline: allowed
    long = json.dumps({"text": "b" * limit}).encode()
    p.write_bytes(ok + b"\n" + long + b"\n" + b'{"text": "Tail. End."}')  # last line has no newline
    docs, rep = read(p, max_line_bytes=limit)
    assert docs == [["a" * (limit - 20)], ["Tail.", "End."]]
    assert rep.issues == {"line_too_long": 1, "single_sentence_document": 1}
    assert sample_lines(rep, "line_too_long") == [2]


# 8. a one-sentence document ---------------------------------------------------------------------------------------

def test_single_sentence_document_counted_and_used(tmp_path):
    p = write_txt(tmp_path / "s.txt", [["Alpha one.", "Alpha two."], ["Only sentence here."], ["B one.", "B two."]])
    docs, rep = read(p)
    assert docs == [["Alpha one.", "Alpha two."], ["Only sentence here."], ["B one.", "B two."]]
    assert rep.issues == {"single_sentence_document": 1}
    assert sample_lines(rep, "single_sentence_document") == [4]
    assert rep.documents == 3 and rep.sentences == 5


@pytest.mark.parametrize("block", [1 << 20, 97])
def test_a_long_document_is_cut_into_documents_alike_by_every_reader(tmp_path, monkeypatch, block):
    """A document of more than MAX_DOCUMENT_CHARS (a .txt file without blank lines) becomes documents: each the
    shortest run of sentences that reaches the limit, the rest last. The same parts from the .txt fast path
    (clean blocks), its slow path (a control character in the text), any read size, and a .jsonl record."""
    from data_prep import sources

    monkeypatch.setattr(sources, "MAX_DOCUMENT_CHARS", 300)
    monkeypatch.setattr(sources, "_BLOCK", block)
    long, short = make_document(random.Random(5), 60), ["Short one.", "Two."]
    expected, part = [], []
    for sentence in long:
        part.append(sentence)
        if sum(map(len, part)) >= 300:
            expected.append(part)
            part = []
    expected += [part, short] if part else [short]
    assert len(expected) >= 8
    dirty = [long[0], long[1].replace(" ", "\x07", 1), *long[2:]]  # (replaced by a space: the same lengths)
    for path in (write_txt(tmp_path / "a.txt", [long, short]), write_txt(tmp_path / "b.txt", [dirty, short]),
                 tmp_path / "c.jsonl"):
        if path.suffix == ".jsonl":  # (a record's lines are its sentences where split_sentences=never)
            path.write_text("".join(json.dumps({"text": "\n".join(d)}) + "\n" for d in (long, short)))
        docs, rep = read(path, split="never")
        assert docs == expected, path.name
        assert rep.documents == len(expected) and rep.sentences == len(long) + 2
        assert rep.issues["long_document"] == sum(sum(map(len, d)) >= 300 for d in expected), path.name


# compressed variants and parquet ----------------------------------------------------------------------------------

def _zstd(data: bytes) -> bytes:
    from data_prep.sources import zstd

    return zstd().compress(data)


COMPRESSORS = {".gz": gzip.compress, ".bz2": lambda data: bz2.compress(data, 1),  # (100 kB blocks: a cut keeps some)
               ".xz": lzma.compress, ".zst": _zstd}


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
@pytest.mark.parametrize("ext", list(COMPRESSORS))
def test_compressed_reads_like_plain(tmp_path, fmt, ext):
    docs = docs_of(5, 400)  # ~100 KB: several decompression buffers
    plain = (write_txt if fmt == "txt" else write_jsonl)(tmp_path / f"c.{fmt}", docs)
    packed = tmp_path / f"c.{fmt}{ext}"
    packed.write_bytes(COMPRESSORS[ext](plain.read_bytes()))
    want, want_rep = read(plain)
    got, rep = read(packed)
    assert len(want) == 400
    assert got == want
    assert (rep.documents, rep.sentences, rep.issues) == (want_rep.documents, want_rep.sentences, want_rep.issues)


def _parquet(path: Path, texts: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(texts))), "text": pa.array(texts, pa.string())}), path)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_parquet_with_null_row(tmp_path, compress):
    p = _parquet(tmp_path / "t.parquet", ["First doc. Has two.", None, "Third\x07row. Also two.", ""])
    if compress:
        gz = tmp_path / "t.parquet.gz"
        gz.write_bytes(gzip.compress(p.read_bytes()))
        p.unlink()
        p = gz
    docs, rep = read(p)
    assert docs == [["First doc.", "Has two."], ["Third row.", "Also two."]]
    assert rep.issues == {"not_text": 1, "control_chars": 1, "empty_document": 1}
    assert sample_lines(rep, "not_text") == [2] and sample_lines(rep, "control_chars") == [3]
    assert sample_lines(rep, "empty_document") == [4]


def test_empty_documents_are_counted_and_an_empty_table_is_an_empty_file(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text('{"text": "A doc. Two."}\n{"text": ""}\n{"text": "   \\n  "}\n', encoding="utf-8")
    docs, rep = read(p)
    assert docs == [["A doc.", "Two."]] and rep.issues == {"empty_document": 2}
    assert sample_lines(rep, "empty_document") == [2, 3]
    p.write_text('{"text": ""}\n{"text": " "}\n', encoding="utf-8")
    assert read(p)[1].issues == {"empty_document": 2}  # texts that are all empty: not an empty file
    assert read(_parquet(tmp_path / "none.parquet", []))[1].issues == {"empty_file": 1}
    assert read(_parquet(tmp_path / "blank.parquet", ["", " "]))[1].issues == {"empty_document": 2}


def test_the_first_lines_of_each_kind_of_issue_are_kept(tmp_path):
    """Many issues of one kind do not hide the line numbers of another."""
    p = tmp_path / "m.jsonl"
    lines = [json.dumps({"text": f"Only sentence {i}."}) for i in range(8)]
    p.write_text("\n".join([*lines, "{broken", json.dumps({"txt": "x"}), json.dumps({"text": 3})]) + "\n")
    _, rep = read(p)
    assert rep.issues == {"single_sentence_document": 8, "bad_json": 1, "missing_field": 1, "not_text": 1}
    assert sample_lines(rep, "single_sentence_document") == [1, 2, 3, 4, 5]
    assert (sample_lines(rep, "bad_json"), sample_lines(rep, "missing_field"), sample_lines(rep, "not_text")) == \
        ([9], [10], [11])


def test_a_parquet_row_over_the_line_limit_is_skipped_as_a_long_line(tmp_path):
    """read.max_line_bytes holds for parquet rows too: the row is reported (its row number and size) and skipped
    before it is turned into a Python string; the rows around it are read."""
    p = _parquet(tmp_path / "t.parquet", ["First doc. Has two.", "x" * 5000, "Third row. Also two."])
    docs, rep = read(p, max_line_bytes=1024)
    assert docs == [["First doc.", "Has two."], ["Third row.", "Also two."]]
    assert rep.issues == {"line_too_long": 1} and sample_lines(rep, "line_too_long") == [2]
    assert "5000 bytes (read.max_line_bytes=1024)" in rep.samples[0]["detail"]


def test_parquet_without_the_column(tmp_path):
    p = _parquet(tmp_path / "t.parquet", ["A. B."])
    docs, rep = read(p, text_field="body")
    assert docs == [] and rep.issues == {"missing_field": 1}
    assert "'body'" in rep.samples[0]["detail"]


# 10. config errors -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["command_line_typo", "yaml_typo", "bad_choice"])
def test_config_errors_exit_2(tmp_path, small_corpus, case):
    out = tmp_path / "out"
    tree = {"inputs": [str(small_corpus)], "output": str(out)}
    overrides: list[str] = []
    if case == "command_line_typo":
        overrides = ["examples.masked_lm_prb=0.2"]
    elif case == "yaml_typo":
        tree["examples"] = {"masked_lm_prb": 0.2}
    else:
        overrides = ["tokenizer.model_type=wordpiece"]
    cfg = write_config(tmp_path / "cfg.yaml", tree)
    res = run_cli("run", str(cfg), *overrides)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    err = res.stderr
    if case == "bad_choice":
        assert "tokenizer.model_type" in err and "command line" in err
        assert "'unigram'" in err and "'bpe'" in err and "wordpiece" in err
    else:
        assert "examples.masked_lm_prb" in err
        assert ("command line" if case == "command_line_typo" else str(cfg)) in err
        assert "did you mean 'examples.masked_lm_prob'" in err
    assert not out.exists()


# 9 and the job as a whole (Ray) -----------------------------------------------------------------------------------

def test_corpus_too_small_for_vocab_fails_cleanly(tmp_path, ray_local, capsys):
    from data_prep.cli import main

    corpus = tmp_path / "tiny"
    corpus.mkdir()
    write_txt(corpus / "t.txt", docs_of(1, 4))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", {
        "inputs": [str(corpus)], "output": str(out),
        "tokenizer": {"vocab_size": 30000, "sample_sentences": 1000, "threads": 1},
        "ray": {"num_cpus": 2},
    })
    rc = main(["run", str(cfg)])
    err = capsys.readouterr().err
    assert rc != 0
    m = re.search(r"tokenizer\.vocab_size=30000 is too large.*Set tokenizer\.vocab_size=(\d+) or lower", err)
    assert m, err
    suggested = int(m.group(1))
    assert 10 < suggested < 30000
    assert not out.exists(), "a fresh run that failed before its first shard leaves nothing behind"

    # the suggested maximum works, in the same directory
    rc = main(["run", str(cfg), f"tokenizer.vocab_size={suggested}"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "manifest.json").is_file()


def test_a_corpus_with_no_readable_text_names_each_files_reason(tmp_path, ray_local, capsys):
    """Nothing to train a tokenizer on: the error says, per file, why nothing was read (not sentencepiece's
    internal complaint about an empty sample)."""
    from data_prep.cli import main

    corpus = tmp_path / "c"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [[f"Sentence {i} is here.", "And one more."] for i in range(20)], field="content")
    (corpus / "b.txt").write_bytes(bytes(range(256)) * 40)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", {"inputs": [str(corpus)], "output": str(out), "ray": {"num_cpus": 2}})
    assert main(["run", str(cfg)]) != 0
    err = capsys.readouterr().err
    assert "no text was read from the 2 input file(s):" in err, err
    assert f"{corpus / 'a.jsonl'}: 20 x missing_field (first at line 1: no 'text' (set text_field))" in err, err
    assert f"{corpus / 'b.txt'}: 1 x binary_file" in err and "text_field (now 'text')" in err, err
    assert "sentencepiece" not in err
    assert not out.exists()


def test_job_counts_bad_input_per_file(tmp_path, small_corpus, ray_local):
    from data_prep.pipeline import run

    c = small_corpus
    (c / "empty.txt").write_bytes(b"")
    (c / "x.txt").write_bytes(bytes(range(256)) * 40)
    write_txt(c / "single.txt", [["Just one sentence in this document."], ["Two here. ", "Second one."]])
    (c / "utf8.txt").write_bytes(b"Good line.\nBad \xff byte line.\n")
    full = write_txt(tmp_path / "full.txt", docs_of(2, 400))
    data = gzip.compress(full.read_bytes())
    (c / "trunc.txt.gz").write_bytes(data[: len(data) * 2 // 3])
    (c / "bad.jsonl").write_text('{"text": "Fine. Fine too."}\nnot json\n{"x": 1}\n{"text": [1]}\n',
                                 encoding="utf-8")
    out = tmp_path / "out"
    summary = run(small_config(c, out))

    report = json.loads((out / "report.json").read_text())
    files = {Path(f["path"]).name: f for f in report["files"]}
    assert sorted(files) == sorted(p.name for p in c.iterdir())
    assert files["empty.txt"]["issues"] == {"empty_file": 1}
    assert files["x.txt"]["issues"] == {"binary_file": 1} and files["x.txt"]["documents"] == 0
    assert files["single.txt"]["issues"] == {"single_sentence_document": 1}
    assert files["single.txt"]["documents"] == 2
    assert files["utf8.txt"]["issues"] == {"invalid_utf8": 1}
    assert files["utf8.txt"]["issue_samples"][0]["line"] == 2
    assert files["trunc.txt.gz"]["issues"]["read_error"] == 1 and files["trunc.txt.gz"]["documents"] > 0
    assert files["bad.jsonl"]["issues"] == {"bad_json": 1, "missing_field": 1, "not_text": 1}
    assert [s["line"] for s in files["bad.jsonl"]["issue_samples"]] == [2, 3, 4]

    totals: dict = {}
    for f in report["files"]:
        for k, v in f["issues"].items():
            totals[k] = totals.get(k, 0) + v
    assert report["bad_input"] == totals == summary["bad_input"]
    assert report["documents"] == sum(f["documents"] for f in report["files"])
    # the same documents the readers give on their own
    expected_docs = sum(read(p)[1].documents for p in c.iterdir())
    assert report["documents"] == expected_docs

    manifest = json.loads((out / "manifest.json").read_text())
    listed = {s["name"] for sp in manifest["splits"].values() for s in sp["shards"]}
    assert listed and {p for p in visible_files(out) if p.endswith(".tar")} == listed
    assert not (out / ".work").exists()
