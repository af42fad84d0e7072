"""How the command lines end: `python -m data_prep`, `python -m pretrain` and `python -m cluster` exit through
`run_main`; the console scripts (`bert-data-prep`, `bert-pretrain`, `bert-cluster`) are those `python -m` commands."""

from __future__ import annotations

import importlib
import os
import select
import sys
import traceback
from typing import NoReturn


def run_main(cli: str) -> NoReturn:
    """Import module `cli` and end the process with its `main()`'s status, through the module's own `leave(status)`
    where it has one. Output cut off by its reader (`| head`) is not an error; Ctrl-C ends it with one line, while the
    libraries load too; a bug is reported as Python reports one, and leaves the same way as any other ending."""
    leave = sys.exit  # (until the module is loaded, no process group can have been joined)
    try:
        module = importlib.import_module(cli)
        leave = getattr(module, "leave", sys.exit)
        status = module.main()
        sys.stdout.flush()
    except BrokenPipeError:
        if not _reader_gone():  # a pipe or socket of the command's own work: an error like any other
            traceback.print_exc()
            status = 1
        else:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python flushes stdout again at exit)
            status = 0
    except KeyboardInterrupt:  # Ctrl-C before a command's own handling (e.g. while the libraries load): one line
        print("interrupted", file=sys.stderr, flush=True)
        status = 130  # as a shell reports a process that SIGINT ended
    except Exception:
        traceback.print_exc()
        status = 1
    leave(status)


def _reader_gone() -> bool:
    """Whether standard output's reader has closed its end (`| head` has read enough)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError):
        return False


def _as_module(name: str) -> NoReturn:
    """Run package `name` as `python -m NAME` runs it (its `__main__` ends the process)."""
    import runpy

    runpy.run_module(name, run_name="__main__", alter_sys=True)
    sys.exit(0)


def data_prep_command() -> NoReturn:
    """`bert-data-prep`: `python -m data_prep`."""
    _as_module("data_prep")


def pretrain_command() -> NoReturn:
    """`bert-pretrain`: `python -m pretrain`."""
    _as_module("pretrain")


def cluster_command() -> NoReturn:
    """`bert-cluster`: `python -m cluster`."""
    _as_module("cluster")
