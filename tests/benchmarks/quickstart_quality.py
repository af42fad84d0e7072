"""What the quickstart's pretraining buys downstream, against a randomly initialised BERT of the same shape.

    python tests/benchmarks/quickstart_quality.py [--model models:/quickstart-bert@champion] [--seeds 3]

Run it after the quickstart job (README), from the directory that holds its `mlflow.db` (or with
MLFLOW_TRACKING_URI set). The task is built from the demo corpus the model was pretrained on: is a
sentence from a standard-library docstring (`stdlib_docstrings.jsonl`) or from a help topic of the
language reference (`pydoc_topics.txt`)? Balanced, disjoint train and test sets of whole sentences
(`python -m data_prep demo-task` writes the same task).

Two measures, each for the pretrained model and for `init=random` (same architecture and tokenizer):
- fine-tuning: `python -m pretrain finetune` end to end, test accuracy, one run per seed;
- linear probe: a logistic regression on the frozen encoder's mean-pooled sentence vectors.

Prints one table (mean and spread over the seeds) and the pretrained/random ratio of each measure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def write_task(corpus: Path, out: Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path]:
    from data_prep.demo_corpus import write_demo_task

    try:
        train, test = write_demo_task(corpus, out, n_train, n_test, seed)
    except ValueError as e:
        sys.exit(str(e))
    return train, test


def finetune(model: str, init: str, train: Path, test: Path, seed: int, out: Path, args) -> float:
    cmd = [sys.executable, "-m", "pretrain", "finetune", str(ROOT / "configs/finetune/classify.yaml"),
           f"model={model}", f"init={init}", f"task.train={train}", f"task.test={test}", f"seed={seed}",
           f"output={out}", f"train.epochs={args.epochs}", f"train.max_seq_length={args.max_seq_length}",
           f"train.lr={args.lr}", "mlflow.enabled=false"]
    proc = subprocess.run(cmd, cwd=Path.cwd(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"finetune failed ({init}, seed {seed}):\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())["metrics"]["test_accuracy"]


def probe(model_dir: Path, init: str, train: Path, test: Path, seed: int, max_len: int) -> float:
    """Test accuracy of a logistic regression on frozen mean-pooled vectors (standardised, L2-regularised)."""
    import sentencepiece as spm
    import torch

    from pretrain.export import load_model
    from pretrain.model import BertForPretraining
    from pretrain.text import embed

    model, _ = load_model(model_dir)
    if init == "random":
        torch.manual_seed(seed)
        model = BertForPretraining(model.config).eval()
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer" / "spm.model"))
    data = {}
    for name, path in (("train", train), ("test", test)):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        with torch.no_grad():
            x = torch.from_numpy(embed(model, sp, [r["text"] for r in rows], max_len, pooling="mean"))
        data[name] = (x, torch.tensor([r["label"] == "docstring" for r in rows], dtype=torch.float32))
    mean, std = data["train"][0].mean(0), data["train"][0].std(0) + 1e-6
    x, y = (data["train"][0] - mean) / std, data["train"][1]
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    xt, yt = (data["test"][0] - mean) / std, data["test"][1]
    with torch.no_grad():
        return float(((xt @ w + b > 0).float() == yt).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models:/quickstart-bert@champion", help="the pretrained model: a "
                   "models:/ URI, a model directory or a checkpoint (default %(default)s)")
    p.add_argument("--corpus", default=str(ROOT / "corpus" / "demo"), help="the demo corpus (default %(default)s)")
    p.add_argument("--train", type=int, default=2000, help="training sentences (default %(default)s)")
    p.add_argument("--test", type=int, default=1000, help="test sentences (default %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning runs per init (default %(default)s)")
    p.add_argument("--epochs", type=int, default=5, help="(default %(default)s)")
    p.add_argument("--lr", type=float, default=3e-4, help="BERT-tiny's; 1e-4 and 3 epochs left both inits "
                   "0.2 lower (default %(default)s)")
    p.add_argument("--max-seq-length", type=int, default=64)
    args = p.parse_args()

    from pretrain.config import MlflowConfig
    from pretrain.export import resolve_model
    from pretrain.tracking import tracking_uri

    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        tmp = Path(tmp)
        train, test = write_task(Path(args.corpus), tmp, args.train, args.test, seed=0)
        model_dir, _ = resolve_model(args.model, tmp / "model", tracking_uri(MlflowConfig()))
        for seed in range(args.seeds):
            for init in ("pretrained", "random"):  # alternated, so both see the same machine
                acc = finetune(str(model_dir), init, train, test, seed, tmp / f"ft-{init}-{seed}", args)
                results.setdefault(("fine-tuned", init), []).append(acc)
                if init == "random" or seed == 0:  # (the pretrained encoder's probe is the same every seed)
                    results.setdefault(("linear probe", init), []).append(
                        probe(model_dir, init, train, test, seed, args.max_seq_length))
                print(f"seed {seed} {init:>10}: fine-tuned {acc:.3f}, probe {results[('linear probe', init)][-1]:.3f}",
                      flush=True)

    print(f"\n{args.model}: docstring-or-reference task, {args.train} train / {args.test} test sentences, "
          f"{args.seeds} seeds")
    print(f"{'measure':<14}{'pretrained':>20}{'random init':>20}{'ratio':>8}")
    for measure in ("fine-tuned", "linear probe"):
        cells, means = [], []
        for init in ("pretrained", "random"):
            xs = results[(measure, init)]
            means.append(statistics.mean(xs))
            cells.append(f"{means[-1]:.3f} ({min(xs):.3f}-{max(xs):.3f})")
        print(f"{measure:<14}{cells[0]:>20}{cells[1]:>20}{means[0] / means[1]:>8.2f}")


if __name__ == "__main__":
    main()
