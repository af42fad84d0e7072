"""Data-prep speed and memory: shard creation vs bare sentencepiece encoding, peak RSS vs corpus size, read-back rate.

    python tests/benchmarks/data_prep_bench.py [--mb 24] [--cpus N] [--json out.json]

1. Throughput: the real job (local Ray, N CPUs, an existing tokenizer so only shard creation is timed)
   against sentencepiece's batched encode of the same sentences in N processes, one thread each, in the
   same run, interleaved over --rounds rounds (best of each side: the dev VMs are noisy). Reported per
   core; the goal is a ratio of at least 0.5. Two views: the shard stage's wall time (scheduling and
   stragglers included) and the tasks' own busy time.
2. Memory: peak RSS of the whole process tree (driver + Ray's processes) for the corpus and for twice
   the corpus, on the same warm Ray; the goal is less than 20% growth.
3. Read-back: stock `webdataset.WebDataset(urls).decode()` in one process; the goal is 10,000 examples/s.
The corpus is built at run time from the Python standard library's docstrings (data_prep.demo_corpus),
re-ordered so that documents differ, in Google's .txt format (no sentence splitting inside the timing).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_prep.config import DataPrepConfig  # noqa: E402
from data_prep.demo_corpus import stdlib_documents  # noqa: E402
from data_prep.segment import split_sentences  # noqa: E402


def build_corpus(out: Path, mb: float, seed: int) -> int:
    """Google-format .txt files of about `mb` MB: stdlib docstring documents, rotated and re-sampled."""
    docs = [[s for p in text.split("\n") for s in split_sentences(p)] for _, text in stdlib_documents(10**9)]
    docs = [d for d in docs if len(d) >= 2]
    rng = random.Random(seed)
    out.mkdir(parents=True)
    size, part = 0, 0
    while size < mb * 1e6:
        with open(out / f"part{part:04d}.txt", "w", encoding="utf-8") as f:
            for _ in range(200):
                d = docs[rng.randrange(len(docs))]
                k = rng.randrange(len(d))
                text = "\n".join(d[k:] + d[:k]) + "\n\n"
                f.write(text)
                size += len(text.encode())
        part += 1
    return size


def _encode_worker(args: tuple[str, list[str]]) -> tuple[int, float]:
    import sentencepiece as spm

    model, lines = args
    sp = spm.SentencePieceProcessor(model_file=model)
    t = time.perf_counter()
    ids = sp.Encode(lines, num_threads=1)
    return sum(map(len, ids)), time.perf_counter() - t


def bare_encode(model: str, corpus: Path, cpus: int) -> dict:
    """Encode every sentence of the corpus in `cpus` processes; tokens/s over the slowest process's time."""
    lines = [ln for p in sorted(corpus.glob("*.txt")) for ln in p.read_text(encoding="utf-8").split("\n") if ln]
    parts = [(model, lines[i::cpus]) for i in range(cpus)]
    with mp.get_context("spawn").Pool(cpus) as pool:
        results = pool.map(_encode_worker, parts)
    tokens = sum(r[0] for r in results)
    seconds = max(r[1] for r in results)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


class PeakRSS:
    """Samples the RSS of this process and all its descendants (Ray's workers) every 50 ms."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run_job(corpus: Path, out: Path, model: str, cpus: int) -> tuple[dict, int]:
    from data_prep.pipeline import run

    shutil.rmtree(out, ignore_errors=True)
    cfg = DataPrepConfig(
        inputs=[str(corpus)], output=str(out), tokenizer={"path": model},
        examples={"dupe_factor": 1}, shards={"group_bytes": 4 * 2**20}, ray={"num_cpus": cpus},
    )
    with PeakRSS() as rss:
        summary = run(cfg)
    return summary, rss.peak


def read_back(out: Path) -> dict:
    import webdataset as wds

    m = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["name"]) for s in m["splits"]["train"]["shards"]]
    t = time.perf_counter()
    n = sum(1 for _ in wds.WebDataset(urls, shardshuffle=False).decode())
    dt = time.perf_counter() - t
    return {"examples": n, "seconds": dt, "examples_per_s": n / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=24.0, help="corpus size in MB (default 24)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="cores for both sides (default: all)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each side; best of each (default 3)")
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--keep", help="keep the work directory here instead of a temporary one")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="dp-bench-"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        small, big = work / "corpus1x", work / "corpus2x"
        size1 = build_corpus(small, args.mb, seed=1)
        size2 = size1 + build_corpus(big / "b", args.mb, seed=2)
        shutil.copytree(small, big / "a")
        print(f"corpus {size1 / 1e6:.1f} MB (and {size2 / 1e6:.1f} MB for the memory check), {args.cpus} CPUs")

        from data_prep.tokenizer import train
        from data_prep.config import TokenizerConfig

        model = work / "spm.model"
        sentences = (ln for p in sorted(small.glob("*.txt"))[:4] for ln in p.read_text().split("\n") if ln)
        train(sentences, TokenizerConfig(vocab_size=8000), model)

        import ray

        # One Ray for every round: rounds after the first see warm workers, as a long job does.
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
        rounds = []
        for r in range(args.rounds):  # interleaved, so both sides see the same machine weather
            bare = bare_encode(str(model), small, args.cpus)
            job, peak = run_job(small, work / "ds1", str(model), args.cpus)
            rounds.append((bare, job, peak))
            print(f"round {r + 1}: bare encode {bare['tokens_per_s'] / args.cpus / 1e6:.2f}M tok/s/core, "
                  f"shard stage {job['stage_seconds']['shards']:.2f}s", flush=True)
        job2, peak2 = run_job(big, work / "ds2", str(model), args.cpus)
        reading = read_back(work / "ds1")
        ray.shutdown()

        job1 = min((j for _, j, _ in rounds), key=lambda j: j["stage_seconds"]["shards"])
        cold = rounds[0][1]
        bare = max((b for b, _, _ in rounds), key=lambda b: b["tokens_per_s"])
        peak1 = max(p for _, _, p in rounds[1:]) if len(rounds) > 1 else rounds[0][2]
        shard_s = job1["stage_seconds"]["shards"]
        tokens = job1["tokens"]
        res = {
            "machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
            "cpus": args.cpus,
            "corpus_mb": round(size1 / 1e6, 1),
            "document_tokens": tokens,
            "examples": sum(job1["examples"].values()),
            "rounds": args.rounds,
            "shards_stage_s_best": shard_s,
            "shards_stage_s_first_round": cold["stage_seconds"]["shards"],
            "pipeline_mb_per_s_per_core": round(size1 / 1e6 / shard_s / args.cpus, 2),
            "pipeline_tokens_per_s_per_core": round(tokens / shard_s / args.cpus),
            "bare_encode_tokens_per_s_per_core": round(bare["tokens_per_s"] / args.cpus),
            "ratio_pipeline_to_bare_encode": round(tokens / shard_s / bare["tokens_per_s"], 3),
            # The same work as seen by the tasks themselves: Ray's worker start-up and scheduling left out.
            "task_tokens_per_s_per_core": round(tokens / job1["task_seconds"]),
            "ratio_tasks_to_bare_encode": round(tokens / job1["task_seconds"] / (bare["tokens_per_s"] / args.cpus), 3),
            "peak_rss_mb_1x": round(peak1 / 2**20),
            "peak_rss_mb_2x": round(peak2 / 2**20),
            "peak_rss_growth": round(peak2 / peak1 - 1, 3),
            "read_examples_per_s_one_process": round(reading["examples_per_s"]),
        }
        print("\n| figure | value |\n|---|---|")
        for k, v in res.items():
            print(f"| {k} | {v} |")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
