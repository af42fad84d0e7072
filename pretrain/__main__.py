"""`python -m pretrain`: see `pretrain.cli`."""

import sys
import traceback

leave = sys.exit  # (until the command line is loaded, no process group can have been joined)
try:
    from pretrain.cli import leave, main

    status = main()
except KeyboardInterrupt:  # Ctrl-C before a command's own handling (e.g. while the libraries load): one line
    print("interrupted", file=sys.stderr, flush=True)
    status = 130  # (pretrain.cli.EXIT_INTERRUPTED: it may not be loaded yet)
except Exception:  # a bug: reported as Python would report it, then out the same way as any other ending
    traceback.print_exc()
    status = 1
leave(status)
