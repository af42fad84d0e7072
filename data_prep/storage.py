"""Outputs at object-store URLs (s3://, gs://, az://, any fsspec filesystem), written the way local outputs are:
nothing half-written is ever visible as finished.

An object store has no rename, but one object appears whole or not at all. So outputs are made in a local
staging directory (or a worker's temporary one) and published one file per upload, the file that marks the
output finished (a dataset's manifest, a checkpoint's commit record, a fine-tune's summary) last. Credentials
and endpoints come from the usual environment of each filesystem (AWS_* for s3, GOOGLE_* for gs, ...).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterator


def is_remote(location: str | Path) -> bool:
    """True for a URL of a filesystem other than the local one (`file://` and plain paths are local)."""
    s = str(location)
    return "://" in s and not s.startswith("file://")


def local_form(location: str) -> str:
    """A location as the code opens it: `file:///x` -> `/x` and `~/x` -> under the home directory; the URL of
    any other filesystem unchanged."""
    if is_remote(location):
        return location
    return os.path.expanduser(location.removeprefix("file://"))


def unreadable(url: str, e: BaseException, doing: str = "read") -> str:
    """"cannot read URL (the error)" (or write: `doing`), with where to look when it is an object store's access
    that failed."""
    access = is_remote(url) and not isinstance(e, (FileNotFoundError, IsADirectoryError, UnicodeError, ValueError))
    hint = ("; check the storage's credentials and endpoint (e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_ENDPOINT_URL, or the machine's cloud identity)" if access else "")
    return f"cannot {doing} '{url}' ({type(e).__name__}: {e}){hint}"


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(url: str):
    """(fsspec filesystem, path within it) for `url`; a clear error when its driver package is missing.

    Listings are read afresh each time: other processes (other nodes) write the same prefixes.
    """
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        fs.invalidate_cache()
        return fs, path
    except ImportError as e:
        scheme = url.split("://", 1)[0]
        raise ImportError(f"'{url}': the {scheme}:// filesystem needs a package that is not installed ({e}); "
                          f"for s3:// install s3fs (pip install -e '.[s3]' in the project), for gs:// gcsfs") from None


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_text(url: str) -> str:
    fs, path = filesystem(url)
    return fs.cat_file(path).decode("utf-8")


def listing(url: str) -> dict[str, int]:
    """Every file under `url` by its path relative to it, with its size (empty when nothing is there)."""
    fs, path = filesystem(url)
    path = path.rstrip("/")
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return {}
    files = {name[len(path) + 1:].rstrip("/"): int(info.get("size") or 0) for name, info in found.items()
             if info.get("type") != "directory" and name.startswith(path + "/")}
    parents = {p.rsplit("/", 1)[0] for p in files if "/" in p}
    return {name: size for name, size in files.items() if name and name not in parents}  # no directory markers


def upload(local: str | Path, url: str) -> None:
    fs, path = filesystem(url)
    fs.put_file(str(local), path)


def download(url: str, local: str | Path) -> None:
    """Copy the file at `url` to `local` (written beside, then renamed: never seen half-written)."""
    fs, path = filesystem(url)
    target = Path(local)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        fs.get_file(path, str(tmp))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def upload_dir(local: str | Path, url: str, last: tuple[str, ...] = ()) -> list[str]:
    """Upload every file under `local` to the same relative paths under `url`; the names in `last` go after all
    others, in that order (the marker that makes the upload count as finished). Returns the relative paths."""
    root = Path(local)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    for name in [f for f in files if f not in last] + [f for f in last if f in files]:
        upload(root / name, join(url, name))
    return files


def download_dir(url: str, local: str | Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy every file under `url` into `local` (a file lands whole: written beside, then renamed)."""
    names = [n for n in listing(url) if n not in skip]
    root = Path(local).resolve()
    for name in names:
        target = (root / name).resolve()
        if not target.is_relative_to(root) or target == root:  # (a key with `..` in it, which buckets allow)
            raise OSError(f"{join(url, name)}: its name would place it outside {local}; refusing to copy it")
        download(join(url, name), target)
    return names


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def staging_dir(url: str, kind: str) -> Path:
    """A local directory that belongs to the output at `url` (the same one on every run on this machine, so an
    interrupted run resumes from it): under $BERTFORGE_STAGING, else the system's temporary directory."""
    return _staging_base() / f"{kind}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def _staging_base() -> Path:
    """$BERTFORGE_STAGING, else a folder of this user's own in the system's temporary directory, readable by no one
    else: staged checkpoints and tokenizers there are loaded as they are, and lock files written, so a shared
    folder would let another local user plant files or links in it."""
    given = os.environ.get("BERTFORGE_STAGING")
    if given:
        return Path(given)
    base = Path(tempfile.gettempdir()) / f"bertforge-staging-{os.getuid()}"
    try:
        base.mkdir(mode=0o700)
    except FileExistsError:
        st = os.lstat(base)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise OSError(f"{base} is not a private folder of yours (a link, a file, another user's, or open to "
                          "others): remove it, or set BERTFORGE_STAGING to a folder of your own") from None
    return base


def local_copy(url: str) -> str:
    """A local file with the content of `url` (a file the worker processes read, e.g. a tokenizer), fetched once
    per machine and content."""
    fs, path = filesystem(url)
    info = fs.info(path)
    key = hashlib.sha256(f"{url}|{info.get('size')}|{info.get('ETag') or info.get('mtime') or ''}".encode())
    target = staging_dir(url, "file") / f"{key.hexdigest()[:16]}-{Path(path).name}"
    if not target.is_file():
        download(url, target)
    return str(target)


def clear_local(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


SCRATCH = "scratch"  # in the staging area: the private directories of running processes
STALE_S = 60.0  # a scratch directory whose lock nobody holds this long after it was made is a dead process's


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A private directory for the block, removed after it. While it exists, its process holds a lock on it, so
    one that a killed process left behind (a force-cancelled Ray task never runs its cleanup) is removed by the
    next process that makes one on this machine."""
    parent = _staging_base() / SCRATCH
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # another user's staging area: the system's temporary directory, without the sweep
        path = Path(tempfile.mkdtemp(prefix=prefix))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
        return
    _sweep(parent)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        with open(path / ".lock", "w", encoding="utf-8") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (a new file: nobody else holds it)
            yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _sweep(parent: Path) -> None:
    """Remove the scratch directories in `parent` whose owner is gone (their lock is free)."""
    for lock_path in parent.glob("*/.lock"):
        try:
            if time.time() - lock_path.stat().st_mtime < STALE_S:
                continue  # (one being made: its owner may not hold the lock yet)
            with open(lock_path, "a", encoding="utf-8") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(lock_path.parent, ignore_errors=True)
        except OSError:  # held (BlockingIOError), or removed meanwhile by another sweeper
            continue


LOCKS = "locks"  # in the staging area: the lock files of outputs and checkpoint directories


class Busy(Exception):
    """Another process holds a lock; the message names it (its pid and host)."""


@contextlib.contextmanager
def exclusive(key: str, kind: str) -> Iterator[None]:
    """Hold this machine's lock named by (`kind`, `key`) for the block (a file in the staging area, never in an
    output); Busy when another process holds it. Where the staging area cannot be written (another user's), the
    block runs without the lock."""
    path = staging_dir(key, kind)
    path = path.parent / LOCKS / path.name  # (apart from the staged copies: a lock file stays, a few bytes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+", encoding="utf-8")
    except OSError:
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise Busy(f.read().strip() or "a process") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        yield
