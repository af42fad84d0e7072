"""`python -m data_prep`: see `data_prep.cli`."""

from data_prep.entry import run_main

run_main("data_prep.cli")
