"""Command line of data prep: `run`, `inspect`, `verify`, `demo-corpus`, `demo-task`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_prep.config import NUM_SPECIAL
from data_prep.configfile import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

RUN_HELP = """\
Build a dataset: train a sentencepiece tokenizer on the corpus and write WebDataset shards of
BERT MLM/NSP examples, as Ray tasks (a local Ray unless ray.address is set).

Overrides follow the config file as KEY=VALUE or --KEY VALUE; values are YAML, e.g.
  inputs='["corpus/*.jsonl","more/"]' output=data/mine examples.nsp=false tokenizer.vocab_size=16000

A rerun with the same config resumes and skips finished work; a different dataset already in the
output directory is refused unless --overwrite. Every key and its default: see data_prep/config.py.
"""


def _positive_mb(text: str) -> float:
    try:
        mb = float(text)
    except ValueError:
        mb = 0.0
    if not 0 < mb < 1e6:
        raise argparse.ArgumentTypeError(f"give a size in MB above 0, not {text!r}")
    return mb


def _even_rows(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 2 or n % 2:
        raise argparse.ArgumentTypeError(f"give an even number of rows, 2 or more (half of each class), not {text!r}")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Corpus -> sentencepiece tokenizer -> WebDataset shards of BERT pretraining examples.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="build a dataset from a config", description=RUN_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--overwrite", action="store_true",
                     help="replace a different dataset already in the output directory (also accepted after CONFIG)")
    run.add_argument("config", help="YAML config file (e.g. configs/data_prep/quickstart.yaml)")
    run.add_argument("overrides", nargs=argparse.REMAINDER, help="KEY=VALUE or --KEY VALUE overrides (optional)")
    ins = sub.add_parser("inspect", help="print a dataset's summary and decoded examples")
    ins.add_argument("dataset", help="dataset directory (holding manifest.json)")
    ins.add_argument("-n", type=int, default=3, help="examples to show (default 3)")
    ins.add_argument("--split", default="train", choices=["train", "val"], help="which split's examples to show "
                                                                             "(default train)")
    ins.add_argument("--json", action="store_true",
                     help="one JSON object per example with Google BERT's feature names")
    ver = sub.add_parser("verify", help="re-hash every shard against the manifest",
                         description="Check that every file the manifest names is there with its size and sha256 "
                                     "(shards, tokenizer); exits 1 naming each one that is missing or differs.")
    ver.add_argument("dataset", help="dataset directory (holding manifest.json)")
    demo = sub.add_parser("demo-corpus", help="write a small corpus made from Python's own documentation")
    demo.add_argument("out", help="directory to write it to")
    demo.add_argument("--mb", type=_positive_mb, default=None,
                      help="approximate size of the docstring part in MB (default 4; at most what this Python's "
                           "standard library holds: about 1.6 MB)")
    task = sub.add_parser("demo-task", help="write a small classification task made from the demo corpus",
                          description="train.jsonl and test.jsonl of {text, label} rows: is a sentence of the demo "
                                      "corpus from a docstring or from the language reference? The task that "
                                      "configs/finetune/classify.yaml and the quickstart job fine-tune on.")
    task.add_argument("out", help="directory to write it to (e.g. data/task)")
    task.add_argument("--corpus", default="corpus/demo", help="the demo corpus (default: corpus/demo)")
    task.add_argument("--train", type=_even_rows, default=2000,
                      help="training rows, half of each class: an even number (default: 2000)")
    task.add_argument("--test", type=_even_rows, default=1000, help="test rows, half of each class (default: 1000)")
    task.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run" and {"-h", "--help"} & set(args.overrides):  # (after CONFIG, where REMAINDER took it)
        _parser().parse_args(["run", "--help"])
    if getattr(args, "dataset", None):
        from data_prep.storage import local_form

        args.dataset = local_form(args.dataset)  # file:///x is the directory /x
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "verify":
            return _verify(args)
        if args.command == "demo-task":
            from data_prep.demo_corpus import write_demo_task

            try:
                paths = write_demo_task(args.corpus, args.out, args.train, args.test, args.seed)
            except FileNotFoundError as e:
                print(f"error: {e.filename} is missing: write the demo corpus first (python -m data_prep demo-corpus "
                      f"{args.corpus})", file=sys.stderr)
                return EXIT_USAGE
            except (ValueError, OSError) as e:
                print(f"error: {e}", file=sys.stderr)
                return EXIT_USAGE
            for path in paths:
                print(f"wrote {path} ({sum(1 for _ in path.open())} rows)")
            return EXIT_OK
        if args.command == "demo-corpus":
            from data_prep.demo_corpus import write_demo_corpus

            try:
                paths = write_demo_corpus(args.out, args.mb or 4.0)
                for path in paths:
                    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
                if args.mb and paths[0].stat().st_size < 0.9 * args.mb * 1e6:
                    print(f"(that is every docstring of this Python's standard library: --mb {args.mb:g} asks for "
                          "more than there is)")
            except OSError as e:
                print(f"error: cannot write the demo corpus to '{args.out}' ({e.strerror or e}: "
                      f"{e.filename or args.out}); give a directory that can be written to", file=sys.stderr)
                return EXIT_USAGE
            return EXIT_OK
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        if args.command != "run":
            raise
        from data_prep.pipeline import INTERRUPTED, Interrupted

        if not isinstance(e, Interrupted):
            print(INTERRUPTED, file=sys.stderr)
        return 130
    return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    from data_prep.config import DataPrepConfig
    from data_prep.configfile import load_config

    overrides = list(args.overrides)
    overwrite = args.overwrite or "--overwrite" in overrides
    overrides = [o for o in overrides if o != "--overwrite"]
    cfg = load_config(DataPrepConfig, args.config, overrides)  # everything is checked before any work
    from data_prep.dataset import DatasetError
    from data_prep.pipeline import JobError, run
    from data_prep.tokenizer import TokenizerError

    try:
        run(cfg, overwrite=overwrite)
    except (DatasetError, TokenizerError, JobError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, DatasetError) else EXIT_FAILED
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    from data_prep import storage

    if not storage.is_remote(args.dataset):
        return _inspect_local(args, args.dataset)
    import tempfile

    from data_prep.dataset import MANIFEST, DatasetError, parse_manifest

    url = args.dataset.rstrip("/")
    with tempfile.TemporaryDirectory() as local:  # the manifest, tokenizer and the shards the examples need
        try:
            text = storage.read_text(storage.join(url, MANIFEST))
        except FileNotFoundError:
            print(f"error: '{url}' is not a finished dataset: {MANIFEST} is missing", file=sys.stderr)
            return EXIT_USAGE
        except Exception as e:  # noqa: BLE001 (credentials, endpoint, bucket: say where, not a traceback)
            print(f"error: {storage.unreadable(storage.join(url, MANIFEST), e)}", file=sys.stderr)
            return EXIT_FAILED
        try:
            m = parse_manifest(text, storage.join(url, MANIFEST))
        except DatasetError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        (Path(local) / MANIFEST).write_text(text)
        wanted, have = [m["tokenizer"]["file"]], 0
        for shard in m["splits"].get(args.split, {}).get("shards", []):
            if have >= args.n:
                break
            wanted.append(shard["name"])
            have += shard["examples"]
        for name in wanted:
            try:
                storage.download(storage.join(url, name), Path(local) / name)
            except Exception as e:  # noqa: BLE001 (a missing or forbidden object: name it)
                print(f"error: {storage.unreadable(storage.join(url, name), e)}; check the whole dataset with "
                      "`python -m data_prep verify` on a copy", file=sys.stderr)
                return EXIT_FAILED
        return _inspect_local(args, local, shown=url, shards=len(wanted) - 1)


def _inspect_local(args: argparse.Namespace, dataset: str, shown: str | None = None, shards: int | None = None) -> int:
    import webdataset as wds

    from data_prep.dataset import DatasetError, read_manifest
    from data_prep.shards import decode_sample
    from data_prep.tokenizer import load as load_tokenizer

    try:
        m = read_manifest(dataset)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    root = Path(dataset)
    sp = load_tokenizer(root / m["tokenizer"]["file"], key="manifest tokenizer.file")
    ex = m["examples"]
    if not args.json:
        print(f"dataset {shown or root}  id {m['dataset_id']}  format {m['format']['name']} "
              f"v{m['format']['version']}")
        print(f"tokenizer {m['tokenizer']['model_type']}, vocab {m['tokenizer']['vocab_size']}, "
              f"sha256 {m['tokenizer']['sha256'][:12]}")
        print(f"examples: max_seq_length {ex['max_seq_length']}, nsp {ex['nsp']}, "
              f"whole_word_mask {ex['whole_word_mask']}")
        for split, info in m["splits"].items():
            print(f"  {split}: {info['examples']:,} examples, {info['tokens']:,} tokens, {len(info['shards'])} shards")
    shards = [str(root / s["name"]) for s in m["splits"][args.split]["shards"]][:shards]
    if not shards or args.n <= 0:
        return EXIT_OK
    left = args.n
    for url in shards:  # one at a time, so that a shard that cannot be read is named
        # (the `.mp` member only: a bare decode() would unpickle `.pyd` and `.pth` members too)
        samples = iter(wds.WebDataset([url], shardshuffle=False, empty_check=False).decode(only=["mp"]))
        while left > 0:
            try:
                sample = next(samples, None)
                if sample is None:
                    break
                s = decode_sample(sample["mp"], ex["token_dtype"])
            except Exception as e:  # noqa: BLE001 (tar, msgpack or numpy errors of a damaged file)
                e = e.__cause__ or e  # webdataset's DecodingError carries no text of its own
                name = Path(url).relative_to(root) if Path(url).is_relative_to(root) else url
                print(f"error: shard {name} of {shown or root} cannot be read ({type(e).__name__}: {e}); check the "
                      f"whole dataset with `python -m data_prep verify {shown or root}`", file=sys.stderr)
                return EXIT_FAILED
            _show_sample(args, sp, ex, sample["__key__"], s)
            left -= 1
        if left <= 0:
            break
    return EXIT_OK


def _show_sample(args: argparse.Namespace, sp, ex: dict, key: str, s: dict) -> None:
    from data_prep.shards import google_features

    text = _pieces_text(sp, s["input_ids"].tolist())
    if args.json:
        feats = google_features(s, ex["max_seq_length"], ex["max_predictions_per_seq"])
        feats.update(key=key, text=text, masked_lm_tokens=[sp.IdToPiece(t) for t in s["masked_lm_ids"].tolist()])
        print(json.dumps(feats))
    else:
        label = s.get("next_sentence_label")
        nsp = "" if label is None else f"  next_sentence_label={label} ({'random' if label else 'actual'} next)"
        print(f"\n[{key}] {len(s['input_ids'])} tokens{nsp}\n  {text}")
        print("  targets: " + ", ".join(f"{p}:{sp.IdToPiece(t)}" for p, t in
                                        zip(s["masked_lm_positions"].tolist(), s["masked_lm_ids"].tolist())))


def _pieces_text(sp, ids: list[int]) -> str:
    """Pieces joined back into text, special tokens kept visible (`[MASK]`, `[SEP]`)."""
    return "".join(f" {sp.IdToPiece(t)} " if t < NUM_SPECIAL else sp.IdToPiece(t).replace("\u2581", " ") for t in ids).strip()


def _verify(args: argparse.Namespace) -> int:
    from data_prep import storage
    from data_prep.dataset import DatasetError, verify

    if storage.is_remote(args.dataset):
        print(f"error: verify re-hashes every shard of a local copy: copy '{args.dataset}' first (e.g. aws s3 sync "
              "URL DIR, gsutil -m rsync -r URL DIR), then verify DIR", file=sys.stderr)
        return EXIT_USAGE
    try:
        problems = verify(args.dataset)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for p in problems:
        print(f"BAD  {p}")
    print(f"{'OK' if not problems else 'FAILED'}: {args.dataset} ({len(problems)} problems)")
    if problems:  # (a rerun of the same config finds the dataset finished: it does not look at the bytes again)
        print("to repair it: delete the files the manifest does not name; for a damaged or missing shard or "
              "tokenizer, copy the dataset again if this is a copy, else build it again with the config that made "
              "it (in its manifest.json) and --overwrite")
    return EXIT_OK if not problems else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
