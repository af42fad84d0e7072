"""Command line: `python -m pretrain train | evaluate | export | register | pull | finetune ...`."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
from pathlib import Path

from data_prep.configfile import ConfigError, load_config
from data_prep.dataset import DatasetError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports a process that SIGINT ended

_joined = {"group": False}  # whether this process has been a member of a process group (see `leave`)

TRAIN_HELP = """\
Pretrain a BERT encoder (MLM + NSP) with DeepSpeed ZeRO on a dataset built by `python -m data_prep`.

Runs the same as one process, under `torchrun --nproc_per_node N -m pretrain train ...` and under the
`deepspeed` launcher: gloo on CPU, NCCL on GPUs. Overrides follow the config file as KEY=VALUE or
--KEY VALUE; values are YAML, e.g.
  model.preset=mini train.max_steps=2000 train.global_batch_size=512 deepspeed.zero_stage=2

It resumes from the newest complete checkpoint in checkpoint.dir (resume=auto|must|never). SIGTERM or
Ctrl-C saves a checkpoint at the end of the current step and exits with status 143.
Every key and its default: see pretrain/config.py.
"""


FINETUNE_HELP = """\
Fine-tune a pretrained encoder for sequence classification (single texts or text pairs).

  python -m pretrain finetune configs/finetune/classify.yaml model=models:/my-bert@champion \\
      task.train=train.jsonl task.test=test.jsonl [--register my-classifier --alias champion]

`model` is models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH, a model directory or a pretraining
checkpoint; init=random trains the same architecture from scratch (a baseline). Rows come from jsonl or
csv/tsv (task.text_field, task.text_pair_field, task.label_field); string labels are mapped to ids and the
mapping is saved with the model. The best validation checkpoint is kept in OUTPUT/model and scored on
task.test (test_accuracy, test_macro_f1). The MLflow run is tagged with the source model's name, version
and run. deepspeed.enabled=true trains under DeepSpeed ZeRO (several processes: torchrun or deepspeed).
Every key and its default: see FinetuneConfig in pretrain/config.py.
"""


OUT_HELP = "directory to write (an earlier model directory there is replaced; a directory holding anything else " \
           "is refused)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain",
                                description="Pretrain BERT (MLM + NSP) with DeepSpeed ZeRO from WebDataset shards.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tr = sub.add_parser("train", help="train (or resume) from a config", description=TRAIN_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("config", help="YAML config file (e.g. configs/pretrain/quickstart.yaml)")
    tr.add_argument("overrides", nargs=argparse.REMAINDER, help="KEY=VALUE or --KEY VALUE overrides")
    ev = sub.add_parser("evaluate", help="a pretrained model's masked-LM and NSP figures on a dataset's split",
                        description="Masked-token loss, perplexity and accuracy (and NSP's, where the dataset has "
                                    "NSP) of a pretrained encoder on examples spread evenly over a dataset's split: "
                                    "the measure pretraining's evaluations log, for comparing models on one held-out "
                                    "set. The dataset must be built with the model's tokenizer.")
    ev.add_argument("source", metavar="SOURCE",
                    help="a committed checkpoint or checkpoint.dir (its newest), a model directory, "
                         "models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH")
    ev.add_argument("--dataset", required=True, help="a dataset from python -m data_prep run (a directory or URL)")
    ev.add_argument("--split", choices=["val", "train"], default="val", help="default: val")
    ev.add_argument("--examples", type=_positive, default=None,
                    help="examples to evaluate on, spread evenly over the split (default: as many as the model's "
                         "pretraining run evaluated on, on its own dataset's val split, else 2000; fewer if the "
                         "split is smaller)")
    ev.add_argument("--batch-size", type=_positive, default=32, help="sequences per forward pass (default 32)")
    ev.add_argument("--device", default="auto", help="auto (a GPU if there is one, else cpu), cpu, cuda or cuda:N")
    ev.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto (default): bf16 autocast on a GPU that has it, else fp32")
    ev.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    ev.add_argument("--tracking-uri", default="", help="for models:/ and runs:/ sources (default: "
                                                       "$MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    ex = sub.add_parser("export", help="a checkpoint or registered model -> a model directory, ours or transformers'",
                        description="--format native (default): consolidate a DeepSpeed checkpoint of any ZeRO stage "
                                    "into a model directory (model.safetensors, config.json, tokenizer/, dataset.json, "
                                    "training.json, checksums.json). --format hf: a directory transformers loads with "
                                    "AutoModel / BertForPreTraining (fine-tuned: BertForSequenceClassification) and "
                                    "AutoTokenizer .from_pretrained(DIR); needs transformers: pip install -e '.[hf]'.")
    ex.add_argument("source", metavar="SOURCE",
                    help="a committed checkpoint or checkpoint.dir (its newest; also the object-store URL a "
                         "cluster job uploads them to), a model directory, models:/NAME@ALIAS, models:/NAME/VERSION "
                         "or runs:/RUN_ID/PATH")
    ex.add_argument("--out", required=True, help=OUT_HELP)
    ex.add_argument("--format", choices=["native", "hf"], default="native", help="native (default) or hf")
    ex.add_argument("--tracking-uri", default="", help="for models:/ and runs:/ sources (default: "
                                                       "$MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    rg = sub.add_parser("register", help="export a checkpoint and register it in the MLflow Model Registry",
                        description="Export (if needed), upload as an MLflow pyfunc model (texts -> embeddings), "
                                    "verify the upload, register a version, then set the alias. Rerunning after a "
                                    "failure completes the registration.")
    src = rg.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a committed checkpoint or a checkpoint.dir (its newest), a path or the "
                                          "object-store URL a cluster job uploads them to")
    src.add_argument("--run", help="an MLflow run id of `pretrain train` (its checkpoint.dir, newest checkpoint)")
    src.add_argument("--model", help="a model directory: from `pretrain export` or `pretrain finetune` (OUTPUT/model)")
    rg.add_argument("--name", required=True, help="registered model name")
    rg.add_argument("--alias", help="alias to point at the new version (e.g. champion)")
    rg.add_argument("--pooling", default="cls", choices=["cls", "mean"], help="sentence embedding pooling")
    rg.add_argument("--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db")
    ft = sub.add_parser("finetune", help="fine-tune a registered or exported model for text classification",
                        description=FINETUNE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ft.add_argument("config", help="YAML config file (e.g. configs/finetune/classify.yaml)")
    ft.add_argument("overrides", nargs=argparse.REMAINDER,
                    help="KEY=VALUE or --KEY VALUE overrides; --register NAME [--alias ALIAS] registers the result")
    pl = sub.add_parser("pull", help="download a registered model version and verify its checksums")
    pl.add_argument("model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH")
    pl.add_argument("--out", required=True, help=OUT_HELP)
    pl.add_argument("--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db")
    return p


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return n


def _drop_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N; the rank comes from the environment instead."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--local_rank", "--local-rank"):
            skip = True
        elif not a.startswith(("--local_rank=", "--local-rank=")):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_drop_launcher_args(sys.argv[1:] if argv is None else argv))
    if {"-h", "--help"} & set(getattr(args, "overrides", None) or ()):  # (after CONFIG, where REMAINDER took it)
        _parser().parse_args([args.command, "--help"])
    if args.command == "export":
        return _export(args)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command in ("register", "pull"):
        return _registry(args)
    if args.command == "finetune":
        return _finetune(args)
    from pretrain.config import PretrainConfig

    def job():
        from pretrain.checkpoint import CheckpointError
        from pretrain.train import NumericsError, train

        return train, (CheckpointError, DatasetError, NumericsError)

    summary = _run(PretrainConfig, args.config, args.overrides, job)
    if isinstance(summary, int):
        return summary
    from pretrain.train import EXIT_PREEMPTED

    return EXIT_PREEMPTED if summary["preempted"] else EXIT_OK


def _run(schema, config: str, overrides: list[str], job, interrupted=None) -> dict | int:
    """Validate the config, run the job on it, and leave no process group behind: its summary, or an exit status
    after printing the error (a bad config: usage; the job's own errors or a setup problem: failed).

    `job()` imports the job and returns it with the errors it reports: torch and DeepSpeed load only once the
    config is known to be good, so a bad one is reported at once. Ctrl-C ends it with one line: what is left, as
    the function `interrupted(cfg)` gave before the run says it then."""
    try:
        cfg = load_config(schema, config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    left = interrupted(cfg) if interrupted else None
    import torch.distributed as dist

    from pretrain.engine import SetupError

    run, errors = job()
    try:
        return run(cfg)
    except (SetupError, *errors) as e:
        print(f"error: {_own_words(e)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"interrupted{': ' + left() if left else ''}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        if dist.is_initialized():
            _joined["group"] = True
            dist.destroy_process_group()


def _own_words(e: BaseException) -> str:
    """An error's message; for one a DataLoader worker raised, without torch's wrapping ("Caught X in DataLoader
    worker process N. Original Traceback ..."): the message is the traceback's last line."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def leave(status: int) -> None:
    """End the process with `status`.

    A process that was in a process group skips the interpreter's finalization (its exit handlers still run, and
    its output is flushed): gloo's worker threads free the tensors of a finished collective on their own time, and
    one that does so once finalization has begun cannot take the GIL and aborts the process ("terminate called
    without an active exception", SIGABRT) after a run that succeeded. Destroying the process group does not stop
    those threads while DeepSpeed still holds a reference to it."""
    if not _joined["group"]:
        sys.exit(status)
    atexit._run_exitfuncs()  # (atexit has no public way to run the handlers before os._exit)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _export(args) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    from data_prep.storage import is_remote
    from pretrain.config import MlflowConfig
    from pretrain.export import URI_SCHEMES, ExportError, check_model_dir, check_out, export, publish, resolve_model
    from pretrain.tracking import tracking_uri

    source, out = args.source, Path(args.out)
    is_checkpoint = not source.startswith(URI_SCHEMES) and ("://" not in source or is_remote(source)) and not any(
        (Path(source) / name).is_file() for name in ("config.json", "MLmodel"))
    try:
        check_out(out)
        if args.format == "native" and is_checkpoint:
            out = export(source, out)
            training = json.loads((out / "training.json").read_text())
            print(f"exported step {training['step']} of {training['checkpoint']} to {out}")
            return EXIT_OK
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="export-", dir=out.resolve().parent) as scratch:
            model_dir, _ = resolve_model(source, Path(scratch) / "model", tracking_uri(MlflowConfig(
                tracking_uri=args.tracking_uri)))
            if args.format == "hf":
                from pretrain.hf_compat import export_hf

                export_hf(model_dir, out)
            else:
                check_model_dir(model_dir)  # (what is copied must load: not a transformers export, not damaged)
                tmp = out.with_name(out.name + ".partial")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(model_dir, tmp)
                publish(tmp, out)
    except (ExportError, ImportError, OSError, KeyError, ValueError) as e:  # a damaged source, an unwritable --out
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    how = "transformers" if args.format == "hf" else "model"
    print(f"exported {source} to {out} ({how} directory)")
    if args.format == "hf":
        classifier = "BertForSequenceClassification" in json.loads((out / "config.json").read_text()).get(
            "architectures", [])
        auto = "AutoModelForSequenceClassification" if classifier else "AutoModel"
        print(f"load it: transformers.{auto}.from_pretrained('{out}'), AutoTokenizer.from_pretrained('{out}')")
    return EXIT_OK


def _evaluate(args) -> int:
    from pathlib import Path

    from data_prep.worker import write_json_atomic
    from pretrain.config import MlflowConfig
    from pretrain.evaluation import EvaluationError, ExportError, evaluate_model, summary_lines
    from pretrain.tracking import RegistryError, tracking_uri

    if args.json and not Path(args.json).absolute().parent.is_dir():  # (said before the figures are computed)
        print(f"error: --json {args.json}: the directory {Path(args.json).absolute().parent} does not exist",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        result = evaluate_model(args.source, args.dataset, tracking_uri(MlflowConfig(tracking_uri=args.tracking_uri)),
                                args.split, args.examples, args.batch_size, args.device, args.precision)
    except (EvaluationError, ExportError, RegistryError, DatasetError, OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print("\n".join(summary_lines(result)))
    if args.json:
        write_json_atomic(Path(args.json), result)
        print(f"figures written to {args.json}")
    return EXIT_OK


def _finetune(args) -> int:
    import difflib

    from pretrain.config import FinetuneConfig

    overrides, register, alias, i = [], None, None, 0
    rest = list(args.overrides)
    while i < len(rest):  # --register NAME and --alias ALIAS are spelled as flags; the rest are config overrides
        a = rest[i]
        flag, _, value = a.partition("=")
        if flag in ("--register", "--alias"):
            if not value:
                if i + 1 >= len(rest):
                    print(f"error: {flag} needs a value", file=sys.stderr)
                    return EXIT_USAGE
                value, i = rest[i + 1], i + 1
            register, alias = (value, alias) if flag == "--register" else (register, value)
        elif flag.startswith("--") and "." not in flag and flag[2:] not in FinetuneConfig.model_fields and (
                close := difflib.get_close_matches(flag, ["--register", "--alias"], n=1)):
            print(f"error: unknown option {flag}; did you mean {close[0]}?", file=sys.stderr)
            return EXIT_USAGE
        else:
            overrides.append(a)
        i += 1
    if register:
        overrides.append(f"registry.name={json.dumps(register)}")
    if alias:
        overrides.append(f"registry.alias={json.dumps(alias)}")

    def job():
        from pretrain.export import ExportError
        from pretrain.finetune import FinetuneError, finetune
        from pretrain.tasks import TaskError

        return finetune, (FinetuneError, TaskError, ExportError)

    def left(cfg):
        """What OUTPUT/model will hold at a Ctrl-C: this run's best model so far, an earlier run's, or none (said
        by rank 0, the one that writes it; a save replaces training.json, so its inode and mtime tell)."""
        model = Path(cfg.output) / "model"
        rest = "only a finished run writes summary.json there. Rerun to fine-tune again from the start"

        def stamp() -> tuple[int, int] | None:
            try:
                st = (model / "training.json").stat()
            except OSError:
                return None
            return st.st_ino, st.st_mtime_ns

        before = stamp()

        def now() -> str:
            if os.environ.get("RANK", "0") != "0":
                return "rank 0 says what the output holds"
            current = stamp()
            if current is None:
                return f"no model was written to {model}; {rest}"
            if current == before:
                return f"{model} holds an earlier run's model (this run had not written one yet); {rest}"
            try:
                step = json.loads((model / "training.json").read_text())["step"]
            except (OSError, ValueError, KeyError):
                step = "?"
            return f"{model} holds this run's best model so far (of step {step}); {rest}"

        return now

    summary = _run(FinetuneConfig, args.config, overrides, job, interrupted=left)
    if isinstance(summary, int):
        return summary
    return EXIT_FAILED if summary.get("register_error") else EXIT_OK


def _registry(args) -> int:
    from pathlib import Path

    from pretrain.config import MlflowConfig, registry_name_problem
    from pretrain.export import ExportError, check_out
    from pretrain.tracking import (
        RegistryError,
        model_files,
        pull,
        register,
        register_checkpoint,
        run_checkpoint_dir,
        tracking_uri,
    )

    uri = tracking_uri(MlflowConfig(tracking_uri=args.tracking_uri))
    try:
        if args.command == "pull":
            if not args.model_uri.startswith(("models:/", "runs:/")) and "://" not in args.model_uri:
                print(f"error: '{args.model_uri}' is not a model URI: write models:/{args.model_uri} (a registered "
                      "model's NAME@ALIAS or NAME/VERSION), or runs:/RUN_ID/PATH", file=sys.stderr)
                return EXIT_USAGE
            check_out(args.out)
            out = pull(args.model_uri, args.out, uri)
            print(f"pulled {args.model_uri} to {out} (verified); model files in {model_files(out)}")
            return EXIT_OK
        problem = registry_name_problem(args.name, args.alias)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_USAGE
        if args.model:
            source = args.model
            v = register(model_files(Path(source)), args.name, args.alias, uri, args.pooling)
            from pretrain.finetune import SUMMARY, record_registration

            if record_registration(model_files(Path(source)), v, args.alias):
                print(f"{Path(source).parent / SUMMARY} records the version (its fine-tune's registration had failed)")
        else:
            v = register_checkpoint(args.checkpoint or run_checkpoint_dir(args.run, uri), args.name, args.alias, uri,
                                    args.pooling)
            source = v["checkpoint"]
    except (ExportError, RegistryError, OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    from pretrain.tracking import alias_words

    done = "was registered already" if v.get("reused") else "registered"
    print(f"{alias_words(v, args.alias)} {done} from {source} (run {v['run_id']})\n"
          f"use it: mlflow.pyfunc.load_model('models:/{v['name']}/{v['version']}'), or "
          f"python -m pretrain pull models:/{v['name']}/{v['version']} --out DIR")
    return EXIT_OK

