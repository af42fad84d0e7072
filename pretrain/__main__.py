import traceback

from pretrain.cli import leave, main

try:
    status = main()
except Exception:  # a bug: reported as Python would report it, then out the same way as any other ending
    traceback.print_exc()
    status = 1
leave(status)
