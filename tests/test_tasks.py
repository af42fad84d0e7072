"""Fine-tuning inputs without a model: task files, labels, splits, metrics; the transformers tokenizer."""

from __future__ import annotations

import gzip
import io
import json
import random

import pytest
import torch
from conftest import make_document

from pretrain.config import TaskConfig
from pretrain.tasks import TaskError, label_index, label_names, read_rows, read_splits, scores, stratified_split


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rows_from_jsonl_csv_tsv_and_gzip(tmp_path):
    cfg = TaskConfig(train="x", text_pair_field="b")
    rows = [{"text": f"a{i}", "b": f"b{i}", "label": i % 3} for i in range(5)]
    got = read_rows(_jsonl(tmp_path / "t.jsonl", rows), cfg)
    assert got.texts[1] == "a1" and got.pairs[1] == "b1" and got.labels == [0, 1, 2, 0, 1]
    assert got.where[0].endswith("t.jsonl:1")
    (tmp_path / "t.csv").write_text('text,b,label\n"a, quoted",second,yes\nplain,other,no\n')
    got = read_rows(str(tmp_path / "t.csv"), cfg)
    assert got.texts == ["a, quoted", "plain"] and got.labels == ["yes", "no"] and got.where[1].endswith("t.csv:3")
    with gzip.open(tmp_path / "t.tsv.gz", "wt") as f:
        f.write("text\tb\tlabel\nx\ty\t1\n")
    assert read_rows(str(tmp_path / "t.tsv.gz"), cfg).pairs == ["y"]
    from data_prep.sources import zstd

    (tmp_path / "t.jsonl.zst").write_bytes(zstd().compress((tmp_path / "t.jsonl").read_bytes()))
    got = read_rows(str(tmp_path / "t.jsonl.zst"), cfg)
    assert got.texts == [f"a{i}" for i in range(5)] and got.where[4].endswith("t.jsonl.zst:5")
    (tmp_path / "cut.jsonl.zst").write_bytes((tmp_path / "t.jsonl.zst").read_bytes()[:-8])
    with pytest.raises(TaskError, match="cut.jsonl.zst"):  # a truncated file is an error, not fewer rows
        read_rows(str(tmp_path / "cut.jsonl.zst"), cfg)
    long = "word " * 100_000  # a long document (500 kB: past csv's default 128 KiB field limit)
    (tmp_path / "long.csv").write_text(f'text,b,label\n"{long}",x,yes\n')
    assert read_rows(str(tmp_path / "long.csv"), cfg).texts == [long]
    (tmp_path / "open.csv").write_text('text,b,label\nfine,x,yes\n"never closed,x,no\n' + long * 40)
    with pytest.raises(TaskError, match=r"open.csv, after line 2: field larger than field limit .*closing quote"):
        read_rows(str(tmp_path / "open.csv"), cfg)


def test_labels_are_ordered_stably_and_unknown_ones_are_named(tmp_path):
    cfg = TaskConfig(train="x")
    train = read_rows(_jsonl(tmp_path / "a.jsonl", [{"text": "t", "label": v} for v in ("10", "2", "neg", "2")]), cfg)
    names = label_names(train)
    assert names == ["2", "10", "neg"]  # integers numerically, then names
    assert label_index(train, names, "a.jsonl") == [1, 0, 2, 0]
    odd = read_rows(_jsonl(tmp_path / "d.jsonl", [{"text": "t", "label": v} for v in ("²", "3", "-1")]), cfg)
    assert label_names(odd) == ["-1", "3", "²"]  # (a superscript digit is a name, not a number)
    test = read_rows(_jsonl(tmp_path / "b.jsonl", [{"text": "t", "label": "2"}, {"text": "t", "label": "pos"}]), cfg)
    with pytest.raises(TaskError, match=r"b.jsonl:2: label 'pos' does not occur in a.jsonl"):
        label_index(test, names, "a.jsonl")
    single = read_rows(_jsonl(tmp_path / "c.jsonl", [{"text": "t", "label": 1}] * 3), cfg)
    with pytest.raises(TaskError, match="single label"):
        label_names(single)
    # read_splits gives every split its class ids, in the training file's numbering; a subset keeps them
    cfg = TaskConfig(train=str(tmp_path / "a.jsonl"), validation=_jsonl(tmp_path / "v.jsonl", [
        {"text": "t", "label": "neg"}, {"text": "t", "label": 10}]))
    names, train, val, test = read_splits(cfg)
    assert (names, train.ids, val.ids, test) == (["2", "10", "neg"], [1, 0, 2, 0], [2, 1], None)
    assert train.subset([2, 3], "part").ids == [2, 0]
    with pytest.raises(TaskError, match=r"b.jsonl:2: label 'pos' does not occur in .*a.jsonl"):
        read_splits(cfg.model_copy(update={"test": str(tmp_path / "b.jsonl")}))


@pytest.mark.parametrize("name, content, message", [
    ("x.jsonl", '{"text": "a", "label": 1}\n{"txt": "b", "label": 1}\n',
     r"x.jsonl:2: no field 'text' .*task.text_field"),
    ("x.jsonl", '{"text": "a", "label": 1}\nnot json\n', r"x.jsonl:2: not a JSON object"),
    ("x.jsonl", '{"text": 5, "label": 1}\n', r"x.jsonl:1: field 'text' is int, not text"),
    ("x.jsonl", '{"text": "a", "label": null}\n', r"x.jsonl:1: label None"),
    ("x.jsonl", '\n\n', r"holds no rows"),
    ("x.jsonl", '{"text": "a", "label": true}\n', r"x.jsonl:1: label True .* is not a class name or integer"),
    ("x.jsonl", '{"text": "a", "label": "pos"}\n{"text": "  ", "label": "pos"}\n',
     r"x.jsonl:2: field 'text' is empty"),
    ("x.jsonl", '{"text": "a", "label": " pos"}\n', r"x.jsonl:1: label ' pos' .* has spaces around it"),
    ("x.csv", 'text,label\nHello, world,greeting\n',
     r"x.csv:2: 3 fields where the header has 2 \(text, label\); check the row's commas \(quote a field that "
     r"holds one\)"),
    ("x.csv", 'text,label\nno label here\n', r"x.csv:2: 1 fields where the header has 2"),
    ("x.tsv", 'text\tlabel\na\tpos\nb\tneg\textra\n',
     r"x.tsv:3: 3 fields where the header has 2 .*check the row's tabs"),
    ("x.json", '[{"text": "a", "label": 1}, 7]', r"x.json\[item 2\]: a int, not a JSON object"),
])
def test_bad_rows_name_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(TaskError, match=message):
        read_rows(str(tmp_path / name), TaskConfig(train="x"))


def test_a_test_file_without_labels_is_told_its_rows_need_them(tmp_path):
    (tmp_path / "t.csv").write_text("text\nhello there\n")
    cfg = TaskConfig(train="x", label_field="language")
    with pytest.raises(TaskError, match=r"t.csv:2: no field 'language' \(the row has: text\); task.test's rows are "
                                        r"scored against their labels: give each its label in a field 'language' "
                                        r"\(task.label_field, as in the training file\), or task.test=null for none$"):
        read_rows(str(tmp_path / "t.csv"), cfg, "task.test")
    with pytest.raises(TaskError, match=r"t.csv:2: no field 'language' .*; set task.label_field to the right name$"):
        read_rows(str(tmp_path / "t.csv"), cfg)  # (the training file: the field's name, most likely)


def test_an_empty_task_file_is_named_by_its_key(tmp_path):
    """An empty validation file names its config key and how to go without one (the train file has no such way)."""
    (tmp_path / "val.jsonl").write_text("\n")
    with pytest.raises(TaskError, match=r"^task.validation: task file .*val.jsonl holds no rows \(set task.validation "
                                        r"to a file with rows, or task.validation=null for none\)$"):
        read_rows(str(tmp_path / "val.jsonl"), TaskConfig(train="x"), "task.validation")
    with pytest.raises(TaskError, match=r"^task.train: .* holds no rows \(set task.train to a file with rows\)$"):
        read_rows(str(tmp_path / "val.jsonl"), TaskConfig(train="x"))


def test_a_quote_in_tsv_is_text_and_a_json_file_may_hold_one_array(tmp_path):
    """Tab-separated files are read without quoting: a stray quote cannot swallow the rows after it."""
    (tmp_path / "q.tsv").write_text('text\tlabel\n"quoted at the start\tpos\nplain\tneg\nthird "one\tpos\n')
    got = read_rows(str(tmp_path / "q.tsv"), TaskConfig(train="x"))
    assert got.texts == ['"quoted at the start', "plain", 'third "one'] and got.labels == ["pos", "neg", "pos"]
    (tmp_path / "a.json").write_text(json.dumps([{"text": "a", "label": 1}, {"text": "b", "label": 0}], indent=2))
    got = read_rows(str(tmp_path / "a.json"), TaskConfig(train="x"))
    assert got.texts == ["a", "b"] and got.labels == [1, 0] and got.where[1].endswith("a.json[item 2]")


def test_files_saved_by_spreadsheets(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark (read as UTF-8); its other CSVs are not UTF-8 (named)."""
    (tmp_path / "bom.csv").write_bytes("text,label\ncafé au lait,1\nthé,0\n".encode("utf-8-sig"))
    got = read_rows(str(tmp_path / "bom.csv"), TaskConfig(train="x"))
    assert got.texts == ["café au lait", "thé"] and got.labels == ["1", "0"]
    (tmp_path / "latin1.csv").write_bytes("text,label\ntea,0\ncafé au lait,1\n".encode("cp1252"))
    with pytest.raises(TaskError, match=r"latin1.csv:3: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        read_rows(str(tmp_path / "latin1.csv"), TaskConfig(train="x"))
    rows = "".join(f'{{"text": "row {i}", "label": 1}}\n' for i in range(3000)) + '{"text": "caf\xe9", "label": 0}\n'
    with gzip.open(tmp_path / "late.jsonl.gz", "wb") as f:  # far past the first block the reader decodes
        f.write(rows.encode("latin-1"))
    with pytest.raises(TaskError, match=r"late.jsonl.gz:3001: not UTF-8 text \(byte 0xe9\)"):
        read_rows(str(tmp_path / "late.jsonl.gz"), TaskConfig(train="x"))


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "x.txt").write_text("a\n")
    with pytest.raises(TaskError, match="unknown format"):
        read_rows(str(tmp_path / "x.txt"), TaskConfig(train="x"))
    with pytest.raises(TaskError, match=r"^task.train: cannot open task file .*missing.jsonl: .*\(set task.train to "
                                        r"the file\)$"):
        read_rows(str(tmp_path / "missing.jsonl"), TaskConfig(train="x"))
    with pytest.raises(TaskError, match=r"^task.test: cannot open task file .*\(set task.test to the file, or "
                                        r"task.test=null for none\)$"):
        read_rows(str(tmp_path / "missing.jsonl"), TaskConfig(train="x"), "task.test")


def test_stratified_split_keeps_every_class_in_both_parts():
    y = [0] * 20 + [1] * 5 + [2] * 2
    keep, held = stratified_split(y, 0.2, seed=1)
    assert sorted(keep + held) == list(range(27)) and not set(keep) & set(held)
    assert [sum(y[i] == c for i in held) for c in range(3)] == [4, 1, 1]
    assert stratified_split(y, 0.2, seed=1) == (keep, held)


def test_accuracy_and_macro_f1_match_their_definitions():
    # true 0: 3 right, 1 as class 1; true 1: 2 right; class 2 is never true nor predicted
    confusion = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    s = scores(confusion)
    assert s["accuracy"] == pytest.approx(5 / 6)
    f1_0, f1_1 = 2 * 3 / (2 * 3 + 1), 2 * 2 / (2 * 2 + 1)
    assert s["macro_f1"] == pytest.approx((f1_0 + f1_1) / 2)


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_the_transformers_tokenizer_gives_our_ids(tmp_path, model_type):
    pytest.importorskip("transformers")
    import sentencepiece as spm

    from pretrain.hf_compat import fast_tokenizer
    from pretrain.text import encode

    rng = random.Random(3)
    sentences = [s for _ in range(300) for s in make_document(rng, 5)] + ["Déjà vu café 12345 naïve ﬁne Ｆｕｌｌ"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=150, model_type=model_type, pad_id=0,
        unk_id=1, bos_id=-1, eos_id=-1, pad_piece="[PAD]", unk_piece="[UNK]",
        control_symbols=["[CLS]", "[SEP]", "[MASK]"], split_digits=True, normalization_rule_name="nmt_nfkc",
        minloglevel=2)
    (tmp_path / "spm.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    fast_tokenizer(tmp_path / "spm.model", 512).save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    texts = sentences[:100] + ["  leading and   inner  spaces  ", "tabs\tand\nnewlines", "Digits 2024 and 3.14",
                               "ünïcödé Ｆｕｌｌ ﬁ", "emoji 🙂 and 日本語", "", "x",
                               # a special piece spelt out is that token for both (as transformers reads it)
                               "premise [SEP] hypothesis", "[CLS]x[MASK] y [PAD]  [UNK]", "[SEP]", "[ SEP] [sep]",
                               # cleaned as pretraining's corpus was: control characters are spaces, marks go
                               "bell\x07inside", "zero\u200bwidth\ufeff and\x7f\x85 more", "\x00"]
    for t in texts:
        assert hf(t)["input_ids"] == encode(sp, [t], 512)[0][0].tolist(), repr(t)
    assert encode(sp, ["bell\x07inside", "zero\u200bwidth"], 512)[0].tolist() == \
        encode(sp, ["bell inside", "zerowidth"], 512)[0].tolist()
    ids, types, mask = encode(sp, texts[:40], 512, texts[40:80])
    enc = hf(texts[:40], texts[40:80], padding=True, return_tensors="pt")
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["token_type_ids"], types)
    assert torch.equal(enc["attention_mask"], mask)
    # truncation of single texts and of pairs of every relation of lengths (equal ones too), odd and even room
    a, b = texts[:100], texts[1:101] + texts[:3]
    for max_len in (7, 8, 16, 25):
        ids, types, mask = encode(sp, a, max_len, b[:100])
        enc = hf(a, b[:100], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["token_type_ids"], types), max_len
        assert torch.equal(enc["attention_mask"], mask)
        single = hf(a, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        assert torch.equal(single["input_ids"], encode(sp, a, max_len)[0])


def test_the_demo_task_is_balanced_disjoint_and_readable(tmp_path):
    """`data_prep demo-task`: two classes of whole sentences from the demo corpus, half each, no sentence in both
    files; without the corpus, a one-line error that says how to make it."""
    import subprocess
    import sys

    from conftest import REPO

    from data_prep.demo_corpus import write_demo_corpus, write_demo_task

    missing = subprocess.run([sys.executable, "-m", "data_prep", "demo-task", str(tmp_path / "task"), "--corpus",
                              str(tmp_path / "nowhere")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "write the demo corpus first (python -m data_prep demo-corpus" in \
        missing.stderr, missing.stderr
    for args, said in ((["demo-task", "t", "--train", "3"], "argument --train: give an even number of rows, 2 or more"),
                       (["demo-task", "t", "--test", "0"], "argument --test: give an even number of rows"),
                       (["demo-corpus", "c", "--mb", "-1"], "argument --mb: give a size in MB above 0, not '-1'")):
        bad = subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=tmp_path, capture_output=True, text=True,
                             timeout=60)
        assert bad.returncode == 2 and said in bad.stderr and not (tmp_path / args[1]).exists(), bad.stderr
    write_demo_corpus(tmp_path / "corpus", max_mb=0.3)
    train, test = write_demo_task(tmp_path / "corpus", tmp_path / "task", n_train=40, n_test=20, seed=3)
    cfg = TaskConfig(train=str(train))
    rows = {split: read_rows(str(path), cfg) for split, path in (("train", train), ("test", test))}
    assert sorted(rows["train"].labels) == ["docstring"] * 20 + ["reference"] * 20
    assert sorted(rows["test"].labels) == ["docstring"] * 10 + ["reference"] * 10
    assert not set(rows["train"].texts) & set(rows["test"].texts)
    from data_prep.demo_corpus import demo_sentences

    every = [t for texts in demo_sentences(tmp_path / "corpus").values() for t in texts]
    assert not [t for t in every if "----" in t or "====" in t or "| |" in t], "no table or heading markup"
    with (tmp_path / "corpus" / "pydoc_topics.txt").open("a") as topics:  # a table's row, without the filter kept
        topics.write("Operator precedence | | +------+------+ in a table\n")
    assert "Operator precedence | | +------+------+ in a table" not in demo_sentences(tmp_path / "corpus")["reference"]
    assert write_demo_task(tmp_path / "corpus", tmp_path / "again", n_train=40, n_test=20, seed=3)[0].read_text() \
        == train.read_text(), "the same task every time"
    with pytest.raises(ValueError, match=r"has \d+ docstring sentences; ask for at most \d+ rows in all"):
        write_demo_task(tmp_path / "corpus", tmp_path / "big", n_train=10**6, n_test=10)
