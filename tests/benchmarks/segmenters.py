"""Benchmark sentence segmenters (blingfire, sentencex, pysbd, syntok) for speed and boundary quality."""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
import time
import warnings

# --- segmenters: each maps a paragraph to a list of sentence strings -------------------------


def _blingfire():
    import blingfire

    # blingfire turns input newlines into spaces and uses "\n" as its only output separator.
    return lambda text: blingfire.text_to_sentences(text).split("\n")


def _sentencex():
    import sentencex

    # Yields whitespace-only pieces (e.g. "\n\n") between blocks; drop them.
    return lambda text: [s for s in sentencex.segment("en", text) if s.strip()]


def _pysbd():
    import pysbd

    seg = pysbd.Segmenter(language="en", clean=False)  # clean=True rewrites the text
    return seg.segment


def _syntok():
    import syntok.segmenter as segmenter

    # Tokens carry their leading whitespace in .spacing; analyze() also splits on blank lines.
    def split(text):
        return ["".join(t.spacing + t.value for t in sent) for para in segmenter.analyze(text) for sent in para]

    return split


SEGMENTERS = {"blingfire": _blingfire, "sentencex": _sentencex, "pysbd": _pysbd, "syntok": _syntok}

# --- gold set: (sentences, separator); the paragraph is separator.join(sentences) -----------

GOLD = [
    (["Dr. Patel reviewed the draft on Monday.", "She sent it back with notes."], " "),
    (["The firm moved its office to the U.S. last spring.", "Rent went up sharply."], " "),
    (["Bring something warm, e.g. a jacket or a scarf.", "The hall is cold at night."], " "),
    (["Use the short form, i.e. the one without a header.", "It saves a page."], " "),
    (["We sell pens, paper, clips, etc. at the front desk.", "Ask the clerk for help."], " "),
    (["Mr. and Mrs. Okafor arrived early.", "Their son came later."], " "),
    (["Prof. Lindqvist teaches on Tuesdays.", "Her office is on the third floor."], " "),
    (["The rate rose to 3.75 percent in May.", "Analysts had expected less."], " "),
    (["Upgrade to Python 3.11.7 before Friday.", "Older builds will stop working."], " "),
    (["The pole is 2.5 m tall.", "It weighs about 4.2 kg."], " "),
    (["He paused and said nothing...", "Then he left the room."], " "),
    (["We tried again... and again, without luck.", "Then we asked for help."], " "),
    (['She said, "The train is late."', "Nobody was surprised."], " "),
    (["The result was clear (see the table above.)", "We kept the old plan."], " "),
    (["The test passed (after three retries).", "We marked it as flaky."], " "),
    (["Are you coming to the meeting?", "It starts at noon."], " "),
    (["That was amazing!", "Let us do it again next week."], " "),
    (["Why did the build fail?", "Nobody knew!", "We reverted the change."], " "),
    (["Open config.yaml in your editor.", "Change the port to 8080."], " "),
    (["Visit https://example.org/docs/index.html for details.", "The page lists every option."], " "),
    (["Send questions to help@example.com by noon.", "Replies come within a day."], " "),
    (["The archive data.tar.gz is large.", "Download it over a fast link."], " "),
    (["You will need three things:", "- a working compiler", "- a shell", "- some patience"], "\n"),
    (["1. Clone the repository.", "2. Install the requirements.", "3. Run the tests."], "\n"),
    (["the log ended abruptly.", "no error was recorded."], " "),
    (["see the appendix for more.", "it covers edge cases."], " "),
    (["The service restarted at midnight", "Nobody noticed the outage"], "\n"),
    (["This paragraph has no final punctuation"], " "),
    (["First we measured the baseline.", "Then we changed one variable at a time"], " "),
    (["The meeting is at 10 a.m. on Friday.", "Please be on time."], " "),
    (["St. Louis is on the Mississippi.", "Memphis is further south."], " "),
    (["The invoice no. 4471 was paid.", "A receipt was emailed."], " "),
    (["See Fig. 3 for the full curve.", "The peak is near the centre."], " "),
    (["The package was sent via U.P.S. on Tuesday.", "It should arrive soon."], " "),
    (["Gen. Alvarez retired in 2019.", "He now writes history books."], " "),
    (["Version 2.0 fixed the leak.", "Version 2.1 added a cache."], " "),
    (["Call me at 555.0142 tomorrow.", "I will be home after six."], " "),
    (["What a day?!", "I need some rest."], " "),
    (['"Stop right there!" she shouted.', "The dog froze."], " "),
    (["Pay attention to the warning.", "Ignoring it (as many do) can corrupt the index.", "Back up first."], " "),
]


def boundaries(sentences):
    """Boundary = count of non-space chars before it, so whitespace handling cannot matter."""
    out, pos = set(), 0
    for s in sentences[:-1]:
        pos += len(re.sub(r"\s+", "", s))
        out.add(pos)
    return out


def score(split):
    tp = fp = fn = exact = 0
    for sents, sep in GOLD:
        gold = boundaries(sents)
        pred = boundaries([s for s in split(sep.join(sents)) if s.strip()])
        tp, fp, fn = tp + len(gold & pred), fp + len(pred - gold), fn + len(gold - pred)
        exact += gold == pred
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "exact": exact / len(GOLD)}


# --- speed corpus: prose paragraphs from the stdlib's own docs --------------------------------


def _doc_texts():
    from pydoc_data.topics import topics

    yield from topics.values()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod in sorted(sys.stdlib_module_names):  # Python >= 3.10
            if mod.startswith(("_", "test", "idlelib", "tkinter", "turtle", "antigravity", "this")):
                continue  # private/test/GUI modules print, open windows or have no prose
            try:
                module = importlib.import_module(mod)
            except Exception:  # noqa: BLE001 - some modules fail to import on this platform
                continue
            # Public classes/functions add far more prose than module docstrings alone.
            objs = [module] + [v for k, v in vars(module).items() if not k.startswith("_") and callable(v)]
            for obj in objs:
                doc = inspect.getdoc(obj) if getattr(obj, "__module__", mod) == mod or obj is module else None
                if doc:
                    yield doc


def build_corpus(mb):
    """Unwrap prose blocks (indented code/grammar skipped), then repeat to ~mb megabytes."""
    paras = []
    for text in _doc_texts():
        for block in re.split(r"\n\s*\n", text):
            lines = block.splitlines()
            if not lines or any(ln.startswith((" ", "\t", ">>>", "*", "=", "-")) for ln in lines):
                continue
            para = " ".join(ln.strip() for ln in lines)
            if len(para) >= 80 and para.count(". ") >= 1:  # keep multi-sentence prose only
                paras.append(para)
    size = sum(len(p.encode()) for p in paras)
    reps = max(1, round(mb * 1e6 / size))
    return paras * reps


def bench_speed(split, paras):
    nbytes = sum(len(p.encode()) for p in paras)
    t0 = time.perf_counter()
    n = sum(len(split(p)) for p in paras)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "mb_per_s": nbytes / 1e6 / dt, "sentences_per_s": n / dt, "sentences": n}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=float, default=5.0, help="corpus size in megabytes")
    ap.add_argument("--json", help="write results to this path")
    args = ap.parse_args(argv)

    paras = build_corpus(args.mb)
    nbytes = sum(len(p.encode()) for p in paras)
    print(f"corpus: {len(paras)} paragraphs, {nbytes / 1e6:.2f} MB; gold: {len(GOLD)} paragraphs", file=sys.stderr)

    results = {}
    for name, factory in SEGMENTERS.items():
        split = factory()
        split("Warm up. Load models.")  # exclude lazy initialisation from the timing
        results[name] = {**bench_speed(split, paras), **score(split)}
        print(f"  {name}: {results[name]['seconds']:.1f}s", file=sys.stderr)

    fastest = max(r["mb_per_s"] for r in results.values())
    hdr = f"{'segmenter':<10} {'MB/s':>8} {'sent/s':>10} {'vs best':>8} {'P':>6} {'R':>6} {'F1':>6} {'exact':>6}"
    print(hdr)
    print("-" * len(hdr))
    for name, r in sorted(results.items(), key=lambda kv: -kv[1]["mb_per_s"]):
        r["ratio_vs_fastest"] = r["mb_per_s"] / fastest
        print(
            f"{name:<10} {r['mb_per_s']:>8.2f} {r['sentences_per_s']:>10,.0f} {r['ratio_vs_fastest']:>7.3f}x"
            f" {r['precision']:>6.3f} {r['recall']:>6.3f} {r['f1']:>6.3f} {r['exact']:>6.3f}"
        )
    if args.json:
        meta = {"corpus_mb": nbytes / 1e6, "corpus_paragraphs": len(paras), "gold_paragraphs": len(GOLD)}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
