"""`python -m pretrain`: see `pretrain.cli`."""

from data_prep.entry import run_main

run_main("pretrain.cli")
