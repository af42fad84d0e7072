"""CPU training throughput of our BERT against transformers' BertForPreTraining, side by side in one run.

    python tests/benchmarks/cpu_model_throughput.py [--preset mini] [--seq 128] [--batch 32] [--steps 8]

Both models get the same config, the same batches (15% of real tokens masked, lengths --min-fill..100% of
--seq: 0.8 gives ~10% padding), the same threads, and a plain PyTorch loop: forward, loss (MLM + NSP),
backward, AdamW step. transformers' model computes MLM logits at every position (its API), ours only at the
masked ones. Ours runs twice: unpadded (the training default) and on the padded layout. Rounds alternate
(the dev VM's speed drifts); each side's best round is reported, and the ratios of sequences/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain.hf_compat import hf_config_fields  # noqa: E402
from pretrain.model import BertForPretraining, pretraining_loss  # noqa: E402
from pretrain.presets import preset  # noqa: E402


def make_batches(vocab: int, n: int, batch: int, seq: int, seed: int = 0, min_fill: float = 0.8) -> list[dict]:
    """Batches with lengths from `min_fill` x seq to seq (min_fill 0.8: ~10% padding), 15% of real tokens masked."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(int(seq * min_fill), seq + 1, (batch,), generator=g)
        mask = (torch.arange(seq)[None] < lengths[:, None]).long()
        ids = torch.randint(5, vocab, (batch, seq), generator=g) * mask
        types = ((torch.arange(seq)[None] >= (lengths // 2)[:, None]) & mask.bool()).long()
        chosen = (torch.rand(batch, seq, generator=g) < 0.15) & mask.bool()
        chosen[:, 0] = False
        positions = chosen.view(-1).nonzero().squeeze(1)
        labels_full = torch.full((batch, seq), -100)
        labels_full[chosen] = ids[chosen]
        out.append(dict(ids=ids, types=types, mask=mask, positions=positions, labels=ids.view(-1)[positions],
                        labels_full=labels_full, nsp=torch.randint(0, 2, (batch,), generator=g)))
    return out


def ours_step(model, opt, b):
    mlm, nsp = model(b["ids"], b["types"], b["mask"], b["positions"])
    loss, _, _ = pretraining_loss(mlm, b["labels"], nsp, b["nsp"])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def hf_step(model, opt, b):
    out = model(input_ids=b["ids"], token_type_ids=b["types"], attention_mask=b["mask"])
    V = out.prediction_logits.shape[-1]
    loss = F.cross_entropy(out.prediction_logits.view(-1, V), b["labels_full"].view(-1), ignore_index=-100) \
        + F.cross_entropy(out.seq_relationship_logits, b["nsp"])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def timed(step, model, opt, batches) -> float:
    step(model, opt, batches[0])  # warm-up
    t = time.perf_counter()
    for b in batches[1:]:
        step(model, opt, b)
    return time.perf_counter() - t


def report(res: dict, json_path: str | None) -> None:
    """Print the figures as a Markdown table (for RESULTS.md); also as JSON to `json_path` when given."""
    print("\n| figure | value |\n|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v} |")
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--min-fill", type=float, default=0.8, help="shortest sequence as a share of --seq")
    ap.add_argument("--json")
    args = ap.parse_args()
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = preset(args.preset, args.vocab, dropout=0.1, attention_dropout=0.1)
    ours = BertForPretraining(c, unpad=True).train()
    padded = BertForPretraining(c).train()
    padded.load_state_dict(ours.state_dict())
    theirs = transformers.BertForPreTraining(
        transformers.BertConfig(**hf_config_fields(c), attn_implementation="sdpa")).train()
    runs = {"ours": (ours_step, ours), "ours_padded": (ours_step, padded), "transformers": (hf_step, theirs)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (_, m) in runs.items()}
    batches = make_batches(c.vocab_size, args.steps + 1, args.batch, args.seq, min_fill=args.min_fill)
    best = {k: float("inf") for k in runs}
    for r in range(args.rounds):
        for k, (step, model) in runs.items():
            best[k] = min(best[k], timed(step, model, opts[k], batches))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f}s" for k, v in best.items()) + " (best so far)", flush=True)
    seqs = args.steps * args.batch
    padding = 1 - sum(int(b["mask"].sum()) for b in batches[1:]) / (seqs * args.seq)
    res = {
        "preset": args.preset, "seq": args.seq, "batch": args.batch, "threads": args.threads,
        "padding": round(padding, 3), "torch": torch.__version__, "transformers": transformers.__version__,
        **{f"{k}_seq_per_s": round(seqs / v, 1) for k, v in best.items()},
        "speedup": round(best["transformers"] / best["ours"], 2),
        "unpadded_vs_padded": round(best["ours_padded"] / best["ours"], 2),
    }
    report(res, args.json)


if __name__ == "__main__":
    main()
