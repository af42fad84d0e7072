"""Checkpoints that are either whole or invisible: a commit protocol over DeepSpeed's save, keep-N, verified load.

Layout under `checkpoint.dir`:

    step-00000500/              a committed checkpoint (only complete ones carry this name)
        <DeepSpeed's files>     model, optimizer and LR-schedule state (ZeRO partitions per rank; pickles, loaded
                                weights-only: tensors, plain values and three DeepSpeed classes, never code)
        rank-00000.pt ...       each rank's RNG states (tensors and ints: loaded with weights_only=True)
        client.json             step, data cursor, config, dataset id, MLflow run id
        commit.json             every file of the checkpoint with its size and sha256, written last
    step-00000600.partial/      a save in progress (or one a crash interrupted): never loaded

A save goes to `<tag>.partial`; when every rank has written its part, rank 0 syncs the files, writes
`commit.json` and renames the directory. A checkpoint whose files no longer match `commit.json` (their
sizes when it is listed, their sha256 before it is loaded: bytes changed in place) is skipped with a
warning, and the next newest is loaded instead.

Cluster jobs whose storage is an object store upload every checkpoint (cluster/launch.py):

    URL/step-00000500/          every rank's files of one checkpoint
        run/                    copies of the run's metrics.jsonl, manifest.json and tokenizer/spm.model
        complete.json           every file with its size, uploaded last: the marker of a usable checkpoint

`fetch` turns one back into a local checkpoint directory that export, registration and resume read.

Only `save` and `load` need torch, and import it: the layout's readers serve commands that load no weights
(`pretrain pull`, a refused registration) without its seconds of import.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path

from data_prep import storage
from data_prep.shards import fsync_dir, write_whole
from data_prep.tokenizer import sha256_file
from data_prep.worker import write_json_atomic
from pretrain.tracking import METRICS_FILE

PREFIX = "step-"
PARTIAL = ".partial"
COMMIT = "commit.json"
CLIENT = "client.json"
COMPLETE = "complete.json"  # in an uploaded checkpoint: every rank's files are there (written last, by rank 0)
RUN_DIR = "run"  # in an uploaded checkpoint: copies of the run's own files from checkpoint.dir
RUN_FILES = (METRICS_FILE, "manifest.json", "tokenizer/spm.model")
_ERROR = "\0error"  # (a key no file has: a rank's failure, in the digests it shares)


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from as asked; the message says what to do."""


def tag(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def rng_state() -> dict:
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, directory: str | Path, step: int, client: dict, keep: int) -> Path:
    """Write a checkpoint of `step` from every rank (a collective call) and commit it; returns its path."""
    import torch
    import torch.distributed as dist

    root = Path(directory)
    rank = dist.get_rank()
    partial = root / (tag(step) + PARTIAL)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=partial.name, client_state={"client": client}, save_latest=False)
    partial.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), partial / f"rank-{rank:05d}.pt")
    dist.barrier()
    # The files' digests, a share for each rank (rank 0 hashes whatever it sees that no other rank could). An error
    # on any rank travels in its share, so that every rank still takes part in each collective.
    world = dist.get_world_size()
    names: list = [[]]
    if rank == 0:
        with contextlib.suppress(OSError):  # (unlistable: _commit, listing again, reports it)
            names = [sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())]
    dist.broadcast_object_list(names, src=0)
    try:
        share = _digests(partial, [n for n in names[0][rank::world] if (partial / n).is_file()])
    except OSError as e:
        share = {_ERROR: f"rank {rank} could not read its share of the files: {e}"}
    shares: list = [None] * world
    dist.all_gather_object(shares, share)
    final = root / tag(step)
    failure = [None]
    if rank == 0:
        try:
            errors = [s[_ERROR] for s in shares if _ERROR in s]
            if errors:
                raise OSError("; ".join(errors[:3]))
            _commit(partial, final, client, step, world, {k: v for got in shares for k, v in got.items()})
            prune(root, keep, step)
        except Exception as e:  # noqa: BLE001 (every rank must hear of it, or the others would wait at the next
            failure = [f"committing checkpoint {final} failed: {type(e).__name__}: {e}"]  # collective)
    dist.broadcast_object_list(failure, src=0)
    if failure[0]:
        raise CheckpointError(failure[0])
    return final


def _digests(directory: Path, names: list[str]) -> dict[str, str]:
    """sha256 of the files `names` under `directory`, several at once (hashlib releases the GIL); the files were
    just written, so they are read back from the page cache (~1.6 GB/s per thread on the 2-core VM)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda n: sha256_file(directory / n), names)))


def _commit(partial: Path, final: Path, client: dict, step: int, world: int, digests: dict[str, str]) -> None:
    write_json_atomic(partial / CLIENT, client)
    files = {}
    for p in sorted(partial.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[str(p.relative_to(partial))] = p.stat().st_size
    digests = {**{n: d for n, d in digests.items() if n in files},
               **_digests(partial, sorted(set(files) - set(digests)))}  # (client.json, and any no rank could see)
    write_json_atomic(partial / COMMIT, {"step": step, "world_size": world, "files": files, "sha256": digests})
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    fsync_dir(final.parent)


def is_tag(name: str) -> bool:
    """A checkpoint's own name (`tag`), not a copy's beside it (`step-00000500.bak`, `step-00000500-good`)."""
    return re.fullmatch(rf"{PREFIX}[0-9]{{8,}}", name) is not None


def committed(root: Path) -> list[Path]:
    """Committed checkpoint directories, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_tag(p.name)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def prune(root: Path, keep: int, current: int) -> None:
    """Keep the newest `keep` checkpoints up to step `current`; delete the rest and unfinished saves.

    Checkpoints after `current` were skipped as damaged when this run resumed from an older one: the
    run has moved past them, and they would otherwise crowd out its new checkpoints.
    """
    mine = []
    for p in committed(root):
        if int(p.name[len(PREFIX):]) > current:
            shutil.rmtree(p, ignore_errors=True)
        else:
            mine.append(p)
    for p in mine[keep:]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(PREFIX + "*" + PARTIAL):
        shutil.rmtree(p, ignore_errors=True)


def problems(path: Path) -> list[str]:
    """Why the checkpoint at `path` cannot be loaded (empty: it can)."""
    commit = path / COMMIT
    if not commit.is_file():
        return [f"{COMMIT} is missing"]
    try:
        record = json.loads(commit.read_text())
    except ValueError:
        return [f"{COMMIT} is not valid JSON"]
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return [f"{COMMIT} has no file list"]
    out = []
    for name, size in record["files"].items():
        p = path / name
        if not p.is_file():
            out.append(f"{name} is missing")
        elif p.stat().st_size != size:
            out.append(f"{name} has {p.stat().st_size} bytes, {size} were written")
    return out


def altered(path: Path) -> list[str]:
    """The files of the committed checkpoint at `path` whose bytes differ from the sha256 its commit recorded
    (checkpoints committed before digests were recorded have none to differ from)."""
    digests = json.loads((path / COMMIT).read_text()).get("sha256") or {}
    now = _digests(path, [name for name in digests if (path / name).is_file()])
    return [f"{name} differs from its sha256" for name, sha in digests.items() if now.get(name) != sha]


def choose(directory: str | Path, world: int, warn) -> list[Path]:
    """Loadable checkpoints, newest first; each damaged newer one is reported through `warn`.

    Raises when checkpoints exist but none can be used: starting afresh would silently drop them.
    """
    found = committed(Path(directory))
    good = []
    for p in found:
        why = problems(p)
        if why:
            warn(f"checkpoint {p} is incomplete or damaged ({'; '.join(why[:3])}); trying an older one")
            continue
        written_by = json.loads((p / COMMIT).read_text()).get("world_size")
        if written_by != world:
            raise CheckpointError(
                f"checkpoint {p} was written by {written_by} ranks and this run has {world}: resume with "
                f"{written_by} processes (or convert it with DeepSpeed's universal checkpoint tools)")
        good.append(p)
    if found and not good:
        raise CheckpointError(f"none of the {len(found)} checkpoints in '{directory}' is complete; move them away "
                              "to start afresh there")
    return good


def read_client(path: str | Path) -> dict:
    """The client record of the committed checkpoint at `path`: a directory, or an uploaded checkpoint's URL."""
    if storage.is_remote(path):
        return json.loads(storage.read_text(storage.join(str(path), CLIENT)))
    return json.loads((Path(path) / CLIENT).read_text())


def load(engine, path: Path) -> None:
    """Load the DeepSpeed state and this rank's RNG state from the committed checkpoint at `path`."""
    import torch
    import torch.distributed as dist

    from pretrain.engine import weights_only_loading

    with weights_only_loading(path):
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed loaded nothing from {path}")
    rank_file = path / f"rank-{dist.get_rank():05d}.pt"
    set_rng_state(torch.load(rank_file, weights_only=True))


def uploaded(remote: str) -> list[str]:
    """Tags (step-NNNNNNNN) of the complete checkpoints uploaded under `remote`, newest first."""
    fs, path = storage.filesystem(remote)
    try:
        found = fs.glob(f"{path.rstrip('/')}/{PREFIX}*/{COMPLETE}")
    except FileNotFoundError:
        return []
    tags = [t for t in (f.rstrip("/").split("/")[-2] for f in found) if is_tag(t)]
    return sorted(tags, key=lambda t: int(t[len(PREFIX):]), reverse=True)


def fetch(url: str, local: Path) -> Path:
    """Download the uploaded checkpoint at `url` into `local/<tag>` (unless already there) and put the run's
    files it carries (metrics, dataset manifest, tokenizer) back in `local`, as pretrain left them."""
    tag = url.rstrip("/").rsplit("/", 1)[1]
    target = local / tag
    if not _holds_all(target):
        fetching = local / (tag + ".download")
        shutil.rmtree(fetching, ignore_errors=True)
        storage.download_dir(url, fetching)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(fetching, target)
    for name in RUN_FILES:
        if (target / RUN_DIR / name).is_file() and not (local / name).is_file():
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            # (whole or absent: a later fetch does not copy it again)
            write_whole(local / name, lambda tmp, src=target / RUN_DIR / name: shutil.copyfile(src, tmp))
    return target


def _holds_all(step_dir: Path) -> bool:
    """Whether a local checkpoint directory holds every rank's files (as its uploaded copy does), not only the
    part the rank that wrote it made."""
    try:
        files = json.loads((step_dir / COMPLETE).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((step_dir / name).is_file() and (step_dir / name).stat().st_size == size for name, size in files.items())
