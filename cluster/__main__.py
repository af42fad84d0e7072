"""`python -m cluster`: see `cluster.cli`."""

from cluster.cli import main
from data_prep.entry import run_main

run_main(main)
