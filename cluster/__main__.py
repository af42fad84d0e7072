"""`python -m cluster`: see `cluster.cli`."""

from data_prep.entry import run_main

run_main("cluster.cli")
