"""How the command lines end: `python -m data_prep` and `python -m cluster` exit through `run_main`."""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn


def run_main(main: Callable[[], int]) -> NoReturn:
    """Exit with `main()`'s status; output cut off by its reader (`| head`) is not an error."""
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python flushes stdout again at exit)
        status = 0
    sys.exit(status)
