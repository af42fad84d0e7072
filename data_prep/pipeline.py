"""The data-prep job: Ray tasks over units of input files; the only module of `data_prep` that imports Ray.

Stages: (1) sample sentences across the corpus (one task per unit), (2) train the tokenizer on the
sample, (3) write shards (one task per unit), (4) tokenizer, report and, last, the manifest. Each
stage's results go to `.work/` atomically as they arrive, so a killed job rerun with the same config
picks up where it stopped and ends with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from data_prep import storage
from data_prep.config import DataPrepConfig, RayConfig
from data_prep.configfile import ConfigError
from data_prep.dataset import (
    DELETE_IT, MANIFEST, NOT_A_DATASET, OWNED_FILES, OWNED_IN, RECIPE_VERSION, REPORT, TOKENIZER_DIR, TOKENIZER_MODEL,
    WORK, DatasetError, build_manifest, build_report, older_recipe, parse_manifest, prepare_output, read_manifest,
    recipe_hash, refuse_foreign, unfinished_other, what_changed, work_recipe,
)
from data_prep.examples import doc_rng
from data_prep.ray_client import drain_worker_output, host_port, quiet_local_token_notice, use_cluster_token
from data_prep.shards import write_whole
from data_prep.sources import FORMATS, MAX_DOCUMENT_CHARS, Source, expand_inputs
from data_prep.tokenizer import load as load_tokenizer
from data_prep.tokenizer import model_type as tokenizer_model_type
from data_prep.tokenizer import MAX_TRAINING_SENTENCE_BYTES, TokenizerError, refuse_extra_control, sha256_file, train
from data_prep.worker import Unit, plan_units, sample_unit, write_json_atomic, write_unit

log = print  # progress and summaries go to stdout; warnings to stderr


class JobError(Exception):
    """A task failed for good (after its retries); the message names the unit and its files."""


class NoText(JobError):
    """No input file gave a sentence; the message says why, per file."""


def _check_reachable(address: str) -> None:
    """Fail fast on a host:port nothing listens on: Ray would retry it for many minutes, printing as it goes."""
    where = host_port(address)
    if where is None:
        return  # "auto" and the like: Ray's own lookup
    try:
        socket.create_connection(where, timeout=5).close()
    except OSError as e:
        raise ConfigError(f"cannot reach ray.address '{address}' ({e.strerror or e}): is a Ray head running there "
                          "(ray start --head), and is this its GCS port (6379 by default; ray:// takes the client "
                          "port, 10001)?") from None


@contextmanager
def ray_session(rc: RayConfig) -> Iterator[None]:
    """Join the Ray at `rc.address`, or start a local one for this job (reused if the caller already has one)."""
    if rc.address:
        use_cluster_token()
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    try:
        if rc.address:
            _check_reachable(rc.address)
            ray.init(address=rc.address, **kwargs)
        else:
            quiet_local_token_notice()
            ray.init(address="local", num_cpus=rc.num_cpus, **kwargs)  # never a cluster that happens to be running
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"ray.address='{rc.address}'" if rc.address else "a local Ray"
        raise ConfigError(f"cannot start or reach {where}: {e}") from None
    interrupted = False
    try:
        yield
    except KeyboardInterrupt:  # said before Ray shuts down: a reply still in flight can crash Ray's shutdown
        interrupted = True
        print(INTERRUPTED, file=sys.stderr, flush=True)
        raise Interrupted from None
    finally:
        try:
            if not interrupted:
                drain_worker_output()  # (the workers' last lines: warnings, or what led to an error)
        finally:
            ray.shutdown()


INTERRUPTED = "\ninterrupted: finished work is kept; run the same command again to resume"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during the job, already reported with INTERRUPTED."""


class Progress:
    """Bytes-weighted progress of a stage: a live bar on a terminal, a line every few seconds in a log."""

    def __init__(self, stage: str, total_bytes: int, units: int):
        self.stage, self.total, self.units = stage, max(1, total_bytes), units
        self.done_bytes = self.done_units = self.shards = 0
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=stage, dynamic_ncols=True)

    def update(self, unit_bytes: int, shards: int = 0) -> None:
        self.done_bytes += unit_bytes
        self.done_units += 1
        self.shards += shards
        if self.bar is not None:
            self.bar.update(unit_bytes)
            self.bar.set_postfix(units=f"{self.done_units}/{self.units}", shards=self.shards)
            return
        now = time.monotonic()
        if now - self.last >= 5 or self.done_units == self.units:
            self.last = now
            rate = self.done_bytes / max(1e-9, now - self.t0)
            eta = (self.total - self.done_bytes) / rate if rate else 0
            shards = f", {self.shards} shards" if self.shards else ""
            log(f"[{self.stage}] {self.done_units}/{self.units} units{shards}, "
                f"{rate / 1e6:.2f} MB/s, ETA {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_units(fn: Callable, units: list[Unit], args: tuple, rc: RayConfig, on_done: Callable,
               stage: str) -> None:
    """Run `fn(unit, *args)` as one Ray task per unit, with retries; `on_done(unit, result)` as each finishes."""
    import ray

    if not units:
        return
    task = ray.remote(fn).options(num_cpus=1, max_retries=rc.max_retries, retry_exceptions=True)
    arg_refs = tuple(ray.put(a) for a in args)
    pending = {task.remote(u, *arg_refs): u for u in units}
    progress = Progress(stage, sum(u.bytes for u in units), len(units))
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            unit = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                _keep_finished(pending, on_done)  # (units already done are not redone by the rerun)
                cause = getattr(e, "cause", None) or e
                files = ", ".join(s.url for s in unit.sources[:3]) + (" ..." if len(unit.sources) > 3 else "")
                raise JobError(
                    f"work unit {unit.index} ({files}) failed after {rc.max_retries} retries in stage "
                    f"'{stage}': {type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
                    "\nFinished units are kept: fix the cause and rerun the same command to continue."
                ) from None
            on_done(unit, result)
            progress.update(unit.bytes, len(result.get("shards", ())) if isinstance(result, dict) else 0)
    finally:
        progress.close()
        for ref in pending:
            ray.cancel(ref, force=True)


def _keep_finished(pending: dict, on_done: Callable) -> None:
    """Hand `on_done` the results of the tasks of `pending` that have finished (taking them out of it)."""
    import ray

    done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
    for ref in done:
        unit = pending.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError:
            continue
        on_done(unit, result)


def run(cfg: DataPrepConfig, overwrite: bool = False) -> dict:
    """Build the dataset described by `cfg`; returns the summary that is also printed.

    An `output` URL of an object store (s3://...) is built in a local staging directory, with each shard
    uploaded by the worker that wrote it; the tokenizer and report follow, and the manifest goes up last.
    One run at a time writes an output (on this machine: a second is refused while the first runs).
    """
    with sole_writer(cfg.output):
        try:
            return _run(cfg, overwrite)
        except OSError as e:  # a full disk, a permission, an upload refused: said in a line, not a traceback
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            raise JobError(f"{type(e).__name__}: {e.strerror or e}{where}; finished work is kept: fix the cause "
                           "and run the same command again to resume") from None


@contextmanager
def sole_writer(output: str) -> Iterator[None]:
    """Hold this machine's lock on `output` for the block; DatasetError when another process holds it. Two runs at
    once would clear or resume each other's work."""
    key = output.rstrip("/") if storage.is_remote(output) else str(Path(output).resolve())
    try:
        with storage.exclusive(key, "writer"):
            yield
    except storage.Busy as e:
        raise DatasetError(f"another data prep run ({e}) is writing '{output}' on this machine: wait for it to "
                           "finish (rerunning then resumes or skips it), or choose another output") from None


def _run(cfg: DataPrepConfig, overwrite: bool) -> dict:
    t0 = time.monotonic()
    capped = masking_cap(cfg)
    if capped:
        print(f"warning: {capped}", file=sys.stderr)
    remote = cfg.output.rstrip("/") if storage.is_remote(cfg.output) else None
    root = storage.staging_dir(remote, "dataset") if remote else Path(cfg.output)
    others: list[str] = []
    sources = _outside(expand_inputs(cfg.inputs, others), cfg.output)  # input problems surface before Ray starts
    others = [p for p in others if not _inside(p, cfg.output)]
    if others:
        print(f"note: {len(others)} files in the input directories or globs are not {'/'.join(FORMATS)} files "
              f"(optionally compressed) and are not read, e.g. {', '.join(others[:3])}", file=sys.stderr)
    given_tok = tok_file = None
    if cfg.tokenizer.path:
        tok_file = cfg.tokenizer.path
        if storage.is_remote(tok_file):  # (read here, in this process, as a local copy)
            try:
                tok_file = storage.local_copy(tok_file)
            except Exception as e:  # noqa: BLE001 (not there, credentials, endpoint: say where)
                raise ConfigError(f"tokenizer.path: {storage.unreadable(cfg.tokenizer.path, e)}") from None
        key = f"tokenizer.path ({cfg.tokenizer.path})" if tok_file != cfg.tokenizer.path else "tokenizer.path"
        refuse_extra_control(load_tokenizer(tok_file, key=key), tok_file, key)
        given_tok = sha256_file(tok_file)
        unused = sorted(f"tokenizer.{k}" for k in cfg.tokenizer.model_fields_set - {"path", "threads"})
        if unused:
            print(f"warning: {', '.join(unused)} train a tokenizer, and tokenizer.path gives one: they are not used "
                  f"(the model at {cfg.tokenizer.path} decides; the manifest's tokenizer section says what it is)",
                  file=sys.stderr)
    cfg, sources = _as_first_spelt(cfg, sources, remote or root)
    recipe = recipe_hash(cfg, sources, given_tok)
    def changed(manifest: dict) -> str:
        return what_changed(manifest, cfg, sources)

    state = (_prepare_remote(remote, root, recipe, overwrite, changed) if remote
             else prepare_output(root, recipe, overwrite, changed))
    if state == "complete":
        log(f"'{cfg.output}' already holds this dataset (same config, same input file paths and sizes); nothing to "
            "do.")
        if not remote:
            return summarize(root, time.monotonic() - t0, sources_bytes=None)
        root.mkdir(parents=True, exist_ok=True)
        for name in (MANIFEST, REPORT):
            (root / name).write_text(storage.read_text(storage.join(remote, name)), encoding="utf-8")
        summary = summarize(root, time.monotonic() - t0, sources_bytes=None, shown=remote)
        storage.clear_local(root)
        return summary
    work = root / WORK
    units = plan_units(sources, cfg.shards.group_bytes)
    total = sum(u.bytes for u in units)
    stages: dict[str, float] = {}
    records = []
    made = 0  # input bytes this run made shards of (a resumed run's rate counts only those)
    if state != "published":
        try:
            (work / "units").mkdir(parents=True, exist_ok=True)
            (work / "sample").mkdir(exist_ok=True)
            if state == "fresh":
                write_json_atomic(work / "config.json",
                                  {"recipe_hash": recipe, "recipe_version": RECIPE_VERSION,
                                   "config": cfg.model_dump(mode="json")})
        except OSError as e:
            if state == "fresh":  # (a half-made .work would make the rerun take the output for someone else's)
                shutil.rmtree(work, ignore_errors=True)
            raise DatasetError(f"cannot write to output '{root}': {e.strerror or e}") from None
        if state == "fresh" and remote:
            try:
                storage.upload(work / "config.json", storage.join(remote, WORK_CONFIG))
            except Exception as e:  # noqa: BLE001 (credentials, endpoint, permissions: the URL is named)
                where = storage.join(remote, WORK_CONFIG)
                raise DatasetError(f"output: {storage.unreadable(where, e, 'write')}") from None
        if state == "resume":
            log(f"resuming the unfinished dataset in '{cfg.output}'")
        unknown = [s.url for s in sources if s.size < 0]
        if unknown:
            print(f"warning: {len(unknown)} inputs report no size (e.g. {unknown[0]}); each becomes a work unit "
                  "of its own and counts as shards.group_bytes for sampling", file=sys.stderr)
        log(f"{len(sources)} input files, {total / 1e6:.1f} MB, {len(units)} work units -> '{cfg.output}'")
        tok = work / TOKENIZER_MODEL
        with ray_session(cfg.ray):
            stages["start"] = time.monotonic() - t0
            if not tok.is_file():
                if tok_file:
                    _copy_durably(Path(tok_file), tok)
                else:
                    try:
                        _train_tokenizer(cfg, units, total, work, tok)
                    except (TokenizerError, NoText):  # (the config must change: nothing here could be reused)
                        if state == "fresh":
                            _discard(root, remote)
                        raise
            stages["tokenizer"] = time.monotonic() - t0 - sum(stages.values())
            todo = [u for u in units if not (work / "units" / f"unit-{u.index:06d}.json").is_file()]
            if len(todo) < len(units):
                log(f"{len(units) - len(todo)} of {len(units)} units already written; skipping them")
            # (absolute: workers run in the directory their Ray node was started in, not in this one)
            worker_tok, out = str(tok.resolve()), str(root.resolve())
            if remote:  # workers on any node read the tokenizer from, and write shards to, the object store
                worker_tok, out = storage.join(remote, WORK, TOKENIZER_MODEL), remote
                storage.upload(tok, worker_tok)

            def unit_done(unit: Unit, record: dict) -> None:
                path = work / "units" / f"unit-{unit.index:06d}.json"
                write_json_atomic(path, record)
                if remote:  # (after its shards, which its worker uploaded)
                    storage.upload(path, storage.join(remote, WORK, "units", path.name))

            made = sum(u.bytes for u in todo)
            _run_units(write_unit, todo, (cfg, worker_tok, out), cfg.ray, unit_done, "shards")
            stages["shards"] = time.monotonic() - t0 - sum(stages.values())
        records = [json.loads((work / "units" / f"unit-{u.index:06d}.json").read_text()) for u in units]
        _finish(root, cfg, sources, tok, records, recipe)
    if remote:
        storage.upload_dir(root, remote, last=(MANIFEST,))
        storage.remove(storage.join(remote, WORK))
    summary = summarize(root, time.monotonic() - t0, sources_bytes=made, shown=remote)
    summary["stage_seconds"] = {k: round(v, 2) for k, v in stages.items()}
    summary["task_seconds"] = round(sum(r.get("seconds", 0.0) for r in records), 2)
    if remote:
        storage.clear_local(root)
    return summary


def _as_first_spelt(cfg: DataPrepConfig, sources: list[Source], output: str | Path
                    ) -> tuple[DataPrepConfig, list[Source]]:
    """`cfg` and `sources` as the dataset (finished or not) at `output` spelt its inputs, where they name the same
    files (the same real paths and sizes): `~/corpus` then `/home/me/corpus`, `../corpus` then its absolute path,
    is the same dataset. (The stored spelling is expanded from the working directory: a relative one given from
    another directory is not recognised.)"""
    stored = None
    for name in (MANIFEST, WORK_CONFIG):
        try:  # (storage reads a local path as it reads a URL)
            tree = json.loads(storage.read_text(storage.join(str(output), name)))
            stored = (tree.get("config") or {}).get("inputs")
        except Exception:  # noqa: BLE001 (none there, or unreadable: the output's own checks say why, later)
            continue
        break
    if not isinstance(stored, list) or stored == cfg.inputs:
        return cfg, sources
    try:
        theirs = _outside(expand_inputs(stored), str(output), quiet=True)
    except ConfigError:
        return cfg, sources

    def real(found: list[Source]) -> list[tuple[str, int]]:
        return [(s.url if "://" in s.url else os.path.realpath(s.url), s.size) for s in found]

    if sorted(real(theirs)) != sorted(real(sources)):
        return cfg, sources
    print(f"note: inputs {cfg.inputs} name the same files as {stored}, as the dataset at '{output}' has them",
          file=sys.stderr)
    return cfg.model_copy(update={"inputs": list(stored)}), theirs


def _inside(url: str, output: str) -> bool:
    """Whether `url` is one of the dataset's own files at `output` (its folders, its work in progress)."""
    if storage.is_remote(output):
        prefix = output.rstrip("/") + "/"
        rel = url[len(prefix):] if url.startswith(prefix) else None
    elif "://" in url:
        rel = None
    else:
        path, out = Path(url).resolve(), Path(output).resolve()
        rel = path.relative_to(out).as_posix() if path.is_relative_to(out) else None
    return rel is not None and rel.split("/", 1)[0] in (*OWNED_FILES, *OWNED_IN, WORK)


def _outside(sources: list[Source], output: str, quiet: bool = False) -> list[Source]:
    """The inputs less the dataset's own files (an output directory within an input directory): its shards,
    tokenizer and work in progress are not its corpus. Other files under the output are inputs like any."""
    keep = [s for s in sources if not _inside(s.url, output)]
    if len(keep) < len(sources) and not quiet:
        if not keep:
            raise ConfigError(f"inputs: every input file is one of the dataset's own at '{output}'; give the "
                              "corpus's own files or directories")
        print(f"note: {len(sources) - len(keep)} files of the dataset at '{output}' (its folders, its work in "
              "progress) are not read as inputs", file=sys.stderr)
    return keep


def _prepare_remote(remote: str, staging: Path, recipe: str, overwrite: bool, changed=None) -> str:
    """As `prepare_output` for a dataset at an object-store URL: 'complete', 'published' (finished in `staging`,
    not yet uploaded), 'resume' or 'fresh'. An unfinished dataset keeps its state (work config, tokenizer, the
    finished units' records) both in `staging` and at the URL, so any machine can resume it."""
    try:
        found = storage.listing(remote)
    except Exception as e:  # credentials, endpoint, bucket: say where, not a traceback
        raise DatasetError(f"output: {storage.unreadable(remote, e)}") from None
    if MANIFEST in found and not overwrite:
        where = storage.join(remote, MANIFEST)
        try:
            manifest = parse_manifest(storage.read_text(where), where)
        except DatasetError as e:
            raise DatasetError(f"{e}; pass --overwrite to replace the dataset there", DELETE_IT) from None
        except Exception as e:  # noqa: BLE001 (as above)
            raise DatasetError(f"output: {storage.unreadable(where, e)}") from None
        if manifest["recipe_hash"] == recipe:
            if any(n.startswith(f"{WORK}/") for n in found):  # left over if a finished run was killed while tidying
                storage.remove(storage.join(remote, WORK))
            return "complete"
        diff = (changed(manifest) if changed else "") or "its config or its input files differ from this run's"
        raise DatasetError(f"'{remote}' already holds a different dataset ({diff}). Choose another output, or pass "
                           "--overwrite to replace it.", DELETE_IT)
    strangers = sorted({n.split("/", 1)[0] for n in found} - {*OWNED_FILES, *OWNED_IN, WORK})
    if strangers and not overwrite:
        raise DatasetError(f"'{remote}' is not empty and is not a dataset (holds {', '.join(strangers[:5])}). "
                           "Choose an empty or new output, or pass --overwrite.", NOT_A_DATASET)
    if not overwrite:  # (as a local output: the dataset's folders hold its own files only)
        refuse_foreign(remote, list(found))
    if overwrite:
        refuse_foreign(remote, list(found))  # past it, the dataset's folders hold nothing else
        for name in (*OWNED_FILES, *OWNED_IN, WORK):  # the manifest first: the old dataset stops existing at once
            storage.remove(storage.join(remote, name))
        found = {}
    # The unfinished state at the URL is the one that counts (the staging copy is this machine's cache of it):
    # a rerun on another machine resumes from it, and a copy here of another run's is never trusted.
    theirs = _recipe_of(storage.join(remote, WORK_CONFIG)) if WORK_CONFIG in found else None
    if theirs not in (None, recipe):
        if any(n.startswith(f"{WORK}/units/") for n in found):
            raise unfinished_other(remote)
        refuse_foreign(remote, list(found))  # (the dataset's folders there may hold files of the user's own)
        for name in (*OWNED_IN, WORK):  # nothing finished yet: start over, stray shards too
            storage.remove(storage.join(remote, name))
    if theirs is None or _recipe_of(staging / WORK_CONFIG) not in (None, theirs):
        # Another run's copy, not the one the URL knows; or the URL holds no unfinished state (it was deleted, or
        # never got past the work config): records or a manifest here would name shards that are not there.
        storage.clear_local(staging)
    try:
        state = prepare_output(staging, recipe, overwrite)
    except DatasetError as e:  # (the conflict is in the staging copy on this machine, not at the URL)
        raise DatasetError(str(e), e.in_a_job and e.in_a_job.replace("{output}", str(staging))) from None
    if theirs == recipe and state != "complete":  # what the URL has and this machine lacks (tokenizer, records)
        for name in found:
            if _resume_state(name) and not (staging / name).exists():
                storage.download(storage.join(remote, name), staging / name)
        state = "resume" if state == "fresh" else state
    return "published" if state == "complete" else state


WORK_CONFIG = f"{WORK}/config.json"


def _resume_state(name: str) -> bool:
    """Whether the file `name` (relative to the output) is resume state kept at the URL: the work config, the
    tokenizer, a finished unit's record."""
    return name.startswith(f"{WORK}/units/") or name in (WORK_CONFIG, f"{WORK}/{TOKENIZER_MODEL}")


def _recipe_of(work_config: str | Path) -> str | None:
    """The recipe hash an unfinished dataset's work config (a path or URL) records ('' when it is damaged; None: no
    such file)."""
    try:
        text = storage.read_text(str(work_config))
    except FileNotFoundError:
        return None
    except UnicodeError:
        return ""
    except Exception as e:  # noqa: BLE001 (credentials, endpoint: listed, yet not readable; said, not a traceback)
        raise DatasetError(f"output: {storage.unreadable(str(work_config), e)}") from None
    try:
        return work_recipe(json.loads(text))
    except ValueError:
        return ""


# The first sampling pass asks each unit for this much more than its share of the corpus's bytes: a unit whose
# bytes under-state its sentences by less than that needs no second read (its extra is left out at random).
OVERSAMPLE = 1.25


def _train_tokenizer(cfg: DataPrepConfig, units: list[Unit], total: int, work: Path, tok: Path) -> None:
    """Train the tokenizer on tokenizer.sample_sentences sentences drawn across the corpus, each unit giving its
    share of the corpus's sentences. Shares are first guessed from bytes on disk, which compressed files
    under-state (and skipped long lines over-state): a unit whose sample falls short of its share, counted once
    every unit has been read, is sampled again for exactly that (every sentence, when the corpus has fewer than
    the budget)."""
    sample_dir = work / "sample"
    budget = cfg.tokenizer.sample_sentences

    def path(u: Unit) -> Path:
        return sample_dir / f"unit-{u.index:06d}.txt"

    def save(unit: Unit, sample: dict) -> None:
        if sample["empty"]:  # why its files gave no sentence (the error's words if none of the corpus's did)
            write_json_atomic(path(unit).with_suffix(".empty.json"), sample["empty"])
        text = "".join(s.replace("\n", " ").replace("\r", " ") + "\n" for s in sample["sentences"])  # a line each
        write_whole(path(unit), lambda tmp: tmp.write_text(text, encoding="utf-8"))
        # last: the counts say the unit is sampled (a run stopped before them samples it again)
        write_json_atomic(path(unit).with_suffix(".json"), {"seen": sample["seen"], "kept": len(sample["sentences"])})

    todo = [u for u in units if not path(u).with_suffix(".json").is_file()]
    guess = {u.index: max(1, math.ceil(OVERSAMPLE * budget * u.bytes / max(1, total))) for u in todo}
    _run_units(sample_unit, todo, (cfg, guess), cfg.ray, save, "sample")
    if not any(path(u).stat().st_size for u in units):
        why = [w for f in sorted(sample_dir.glob("*.empty.json")) for w in json.loads(f.read_text())]
        files = sum(len(u.sources) for u in units)
        raise NoText(f"no text was read from the {files} input file(s):\n  " + "\n  ".join(why[:10])
                       + (f"\n  ... and {len(why) - 10} more" if len(why) > 10 else "")
                       + f"\nCheck the inputs' format and text_field (now '{cfg.text_field}').")
    counts = {u.index: json.loads(path(u).with_suffix(".json").read_text()) for u in units}
    share = _sample_shares({i: c["seen"] for i, c in counts.items()}, budget)
    short = [u for u in units if counts[u.index]["kept"] < share[u.index]]
    if short:
        log(f"[tokenizer] {len(short)} of {len(units)} work units hold more sentences than their bytes suggested "
            "(compressed files, say): sampling them again for their share", flush=True)
        _run_units(sample_unit, short, (cfg, {u.index: share[u.index] for u in short}), cfg.ray, save, "sample")
        counts.update({u.index: json.loads(path(u).with_suffix(".json").read_text()) for u in short})

    def sentences() -> Iterator[str]:
        for u in units:
            kept, want = counts[u.index]["kept"], share[u.index]
            # (the first pass's extra left out at random, as a pure function of the seed and the unit)
            keep = set(doc_rng(cfg.seed, u.index, -2, -1).sample(range(kept), want)) if kept > want else None
            with open(path(u), encoding="utf-8", newline="\n") as f:
                yield from (line.rstrip("\n") for i, line in enumerate(f) if keep is None or i in keep)

    t = time.monotonic()
    corpus = sum(c["seen"] for c in counts.values())
    log(f"[tokenizer] training a {cfg.tokenizer.model_type} model, vocab {cfg.tokenizer.vocab_size}", flush=True)
    trained = train(sentences(), cfg.tokenizer, tok, corpus_sentences=corpus)
    log(f"[tokenizer] done in {time.monotonic() - t:.1f}s, on {trained['sentences']:,} of the corpus's {corpus:,} "
        f"sentences; sha256 {sha256_file(tok)[:12]}", flush=True)
    if trained["too_long"] > 0.01 * trained["sentences"]:
        print(f"warning: {trained['too_long']:,} of the {trained['sentences']:,} sampled sentences are longer than "
              f"{MAX_TRAINING_SENTENCE_BYTES} bytes and did not train the tokenizer: if the corpus's lines are "
              "paragraphs, set read.split_sentences=always", file=sys.stderr)


def _sample_shares(seen: dict[int, int], budget: int) -> dict[int, int]:
    """How many sentences each unit gives the tokenizer's sample: all of them when the corpus has no more than
    `budget`, else shares of `budget` in proportion to the units' sentences (largest remainders rounded up, so
    that they add up to `budget`)."""
    corpus = sum(seen.values())
    if corpus <= budget:
        return dict(seen)
    share, left = {}, {}
    for i, n in seen.items():
        share[i], left[i] = divmod(budget * n, corpus)
    for i in sorted(left, key=lambda i: (-left[i], i))[:budget - sum(share.values())]:
        share[i] += 1
    return share


def _discard(root: Path, remote: str | None) -> None:
    """Remove what a fresh run that failed before its first shard wrote: its work directory (here, and at the URL
    of a remote output) and the output directory itself when that is left empty."""
    shutil.rmtree(root / WORK, ignore_errors=True)
    if remote:
        storage.remove(storage.join(remote, WORK))
    with contextlib.suppress(OSError):
        root.rmdir()  # (only an empty one)


def _copy_durably(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` whole (the records written after it rely on it)."""
    write_whole(dst, lambda tmp: shutil.copyfile(src, tmp))


def _finish(root: Path, cfg: DataPrepConfig, sources, tok: Path, records: list[dict], recipe: str) -> None:
    tdir = root / TOKENIZER_DIR
    tdir.mkdir(exist_ok=True)
    sp = load_tokenizer(tok)
    vocab = "".join(f"{sp.IdToPiece(i)}\t{sp.GetScore(i)}\n" for i in range(sp.GetPieceSize()))
    (tdir / "spm.vocab.partial").write_text(vocab, encoding="utf-8")
    os.replace(tdir / "spm.vocab.partial", tdir / "spm.vocab")
    _copy_durably(tok, tdir / TOKENIZER_MODEL)
    write_json_atomic(root / REPORT, build_report(records))
    write_json_atomic(root / MANIFEST, build_manifest(cfg, sources, sha256_file(tok), sp.GetPieceSize(), records,
                                                      recipe, tokenizer_model_type(tok)))
    shutil.rmtree(root / WORK, ignore_errors=True)


def summarize(root: Path, seconds: float, sources_bytes: int | None, shown: str | None = None) -> dict:
    """Print and return the end-of-job summary of the dataset in `root` (published at `shown`, if given)."""
    manifest = read_manifest(root)
    note = older_recipe(manifest)  # (a finished dataset found as it was, made by an older data_prep)
    if note:
        print(note, file=sys.stderr)
    report = json.loads((root / REPORT).read_text(encoding="utf-8"))
    splits = manifest["splits"]
    summary = {
        "dataset": shown or str(root),
        "dataset_id": manifest["dataset_id"],
        "documents": report["documents"],
        "sentences": report["sentences"],
        "tokens": report["tokens"],
        "examples": {k: v["examples"] for k, v in splits.items()},
        "shards": {k: len(v["shards"]) for k, v in splits.items()},
        "nsp_random_next_fraction": report["nsp"]["random_next_fraction"],
        "truncation_rate": report["truncation_rate"],
        "bad_input": report["bad_input"],
        "seconds": round(seconds, 1),
    }
    log("\n== data prep summary ==")
    log(f"dataset      {summary['dataset']}  (id {summary['dataset_id']})")
    log(f"read         {summary['documents']:,} documents, {summary['sentences']:,} sentences, "
        f"{summary['tokens']:,} tokens")
    log("examples     " + ", ".join(f"{k} {v:,} in {summary['shards'][k]} shards" for k, v in summary["examples"].items()))
    if summary["nsp_random_next_fraction"] is not None:
        log(f"NSP          {summary['nsp_random_next_fraction']:.1%} random next; "
            f"truncated {summary['truncation_rate']:.1%}")
    bad = ", ".join(f"{k} {v}" for k, v in summary["bad_input"].items()) or "none"
    log(f"bad input    {bad}  (per file in {storage.join(shown, REPORT) if shown else root / REPORT})")
    if sources_bytes is not None:  # (None: a finished dataset found, not made)
        rate = f", {sources_bytes / 1e6 / max(seconds, 1e-9):.2f} MB/s" if sources_bytes else ""
        log(f"time         {seconds:.1f}s{rate}")
    for line in advice(manifest["config"], report):
        print(f"warning: {line}", file=sys.stderr)
    log(f"next         python -m data_prep inspect {summary['dataset']} -n 2")
    return summary


def advice(config: dict, report: dict) -> list[str]:
    """What a finished dataset's figures say about its config (a field name that most files lack, sentences not
    split, an empty val split): each with the key to change."""
    out = []
    docs, bad = report["documents"], report["bad_input"]
    missing = bad.get("missing_field", 0)
    if missing:
        out.append(f"{missing:,} records have no '{config['text_field']}' field and were skipped (their files are "
                   "named in report.json): set text_field to the field that holds their text")
    cut = bad.get("long_document", 0)
    if cut:
        out.append(f"{cut:,} parts of {MAX_DOCUMENT_CHARS:,} characters were cut from longer documents (a .txt "
                   "document runs to the next blank line; report.json names the files): if those files hold many "
                   "documents, separate them with blank lines or give them as .jsonl records")
    single = bad.get("single_sentence_document", 0)
    if config["examples"].get("nsp", True) and docs and single > 0.3 * docs and \
            config["read"]["split_sentences"] != "always":
        out.append(f"{single:,} of {docs:,} documents are a single sentence, which gives no NSP pair of its own; "
                   "if they are running text (e.g. .txt files of one document each, its sentences on shared lines), "
                   "set read.split_sentences=always")
    length = config["examples"]["max_seq_length"]
    per_sentence = report["tokens"] / max(report["sentences"], 1)
    if per_sentence > length / 2 and config["read"]["split_sentences"] != "always":
        made = sum(report["example_tokens"].values()) / max(config["examples"].get("dupe_factor", 1), 1)
        out.append(f"the corpus's sentences average {per_sentence:,.0f} tokens, over half of "
                   f"examples.max_seq_length={length}: an example holds one or two and cuts the rest (its examples "
                   f"keep {min(1.0, made / max(report['tokens'], 1)):.0%} of the text; truncated "
                   f"{report['truncation_rate']:.0%}). If the lines are paragraphs or whole documents, set "
                   "read.split_sentences=always")
    elif sum(report["examples"].values()):
        mean = sum(report["example_tokens"].values()) / sum(report["examples"].values())
        if mean < length / 2:
            out.append(f"examples average {mean:,.0f} tokens of examples.max_seq_length={length}: the documents are "
                       "short, and an example never spans two. With train.unpad (the default) their padding costs "
                       "no compute, but a step holds fewer tokens than its batch size suggests: raise "
                       "train.global_batch_size to match, or lower examples.max_seq_length")
    if not report["examples"].get("train"):
        out.append(f"the train split is empty: there is nothing to pretrain on; lower val_fraction (now "
                   f"{config['val_fraction']:g}) or add documents")
    elif config["val_fraction"] > 0 and not report["examples"].get("val"):
        out.append(f"the val split is empty: val_fraction={config['val_fraction']:g} of {docs:,} documents drew "
                   "none (each document is drawn on its own); " +
                   (f"raise it to {20 / docs:.2g} or more for a val split to evaluate on" if docs >= 100 else
                    f"{docs:,} documents are too few to spare some for evaluation: add documents"))
    return out


def masking_cap(cfg: DataPrepConfig) -> str | None:
    """A max_predictions_per_seq that caps the share of tokens predicted below masked_lm_prob (said before the
    run: every long example would be masked less than the config says)."""
    e = cfg.examples
    wanted = round(e.max_seq_length * e.masked_lm_prob)
    if wanted <= e.max_predictions_per_seq:
        return None
    return (f"examples.max_predictions_per_seq={e.max_predictions_per_seq} caps full-length examples at "
            f"{e.max_predictions_per_seq / e.max_seq_length:.1%} of their tokens predicted, below "
            f"examples.masked_lm_prob={e.masked_lm_prob:g}: set it to {wanted} (Google's recipe: 20 at 128, 80 at 512)")
