"""Peak memory of one data-prep work unit on a .txt corpus without blank lines (one document per file, as
sentence-per-line corpora such as WMT's news.*.shuffled are), with and without the document and pool caps.

    python tests/benchmarks/long_documents.py [--mb 20] [--json out.json]

Each measurement is `data_prep.worker.write_unit` on one file in a fresh process (its own peak RSS, so the
measurements do not share a high-water mark): --mb and twice --mb of text, with the caps as they are
(`sources.MAX_DOCUMENT_CHARS`, `worker.MAX_POOL_CHARS`) and with both raised out of reach (the file is then
one document and one pool, as before the caps). The text is sentences of the standard library's docstrings
drawn at random; the tokenizer (8,000 pieces) is trained on them first (not timed).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_prep.config import DataPrepConfig, TokenizerConfig  # noqa: E402
from data_prep.demo_corpus import stdlib_documents  # noqa: E402
from data_prep.segment import split_sentences  # noqa: E402
from data_prep.sources import Source  # noqa: E402
from data_prep.tokenizer import train  # noqa: E402
from data_prep.worker import Unit  # noqa: E402

def text_sentences() -> list[str]:
    """The sentences of the standard library's docstrings (as the demo corpus has them)."""
    return [s for _, text in stdlib_documents(10**9) for p in text.split("\n") for s in split_sentences(p)]


def sentences(pool: list[str], rng: random.Random, chars: int):
    made = 0
    while made < chars:
        s = pool[rng.randrange(len(pool))]
        made += len(s) + 1
        yield s


def unit_peak(path: str, tok: str, out: str, capped: bool, q) -> None:
    from data_prep import sources, worker

    if not capped:
        sources.MAX_DOCUMENT_CHARS = worker.MAX_POOL_CHARS = 1 << 62
    cfg = DataPrepConfig.model_validate({"inputs": [path], "output": out, "val_fraction": 0.0})
    t0 = time.perf_counter()
    record = worker.write_unit(Unit(0, (Source(path, Path(path).stat().st_size, "txt", None),)), cfg, tok, out)
    q.put({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "seconds": round(time.perf_counter() - t0, 1), "documents": record["counts"]["documents"],
           "examples": sum(s["examples"] for s in record["shards"]),
           "long_document": sum(f["issues"].get("long_document", 0) for f in record["files"])})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20.0, help="text of the smaller file, in MB (the larger is twice)")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="long-docs-"))
    files, pool = {}, text_sentences()
    for scale in (1, 2):
        path = work / f"corpus-{scale}.txt"
        with path.open("w") as f:
            for s in sentences(pool, random.Random(scale), int(args.mb * scale * 1e6)):
                f.write(s + "\n")
        files[scale] = path
    tok = work / "spm.model"
    train(sentences(pool, random.Random(0), 5_000_000), TokenizerConfig(vocab_size=8000, threads=2), tok)
    ctx = mp.get_context("spawn")
    rows = []
    for capped in (False, True):
        for scale, path in files.items():
            q = ctx.Queue()
            p = ctx.Process(target=unit_peak, args=(str(path), str(tok), str(work / f"out-{capped}-{scale}"),
                                                    capped, q))
            p.start()
            row = q.get()
            p.join()
            rows.append({"caps": "on" if capped else "off", "text_mb": args.mb * scale, **row})
            print(rows[-1], flush=True)
    print("\n| caps | text | documents | long_document cuts | examples | peak RSS | time |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['caps']} | {r['text_mb']:g} MB | {r['documents']} | {r['long_document']} | {r['examples']:,} "
              f"| {r['peak_rss_mb']:.0f} MB | {r['seconds']} s |")
    by = {(r["caps"], r["text_mb"]): r["peak_rss_mb"] for r in rows}
    for caps in ("off", "on"):
        print(f"caps {caps}: peak RSS grows {by[(caps, 2 * args.mb)] / by[(caps, args.mb)]:.2f}x "
              f"for twice the text")
    print(f"at {2 * args.mb:g} MB: caps on / off = {by[('on', 2 * args.mb)] / by[('off', 2 * args.mb)]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": platform.platform(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
