"""`python -m data_prep`: see `data_prep.cli`."""

from data_prep.entry import run_main


def main() -> int:
    from data_prep.cli import main  # (inside run_main: Ctrl-C while it loads is answered as any other)

    return main()


run_main(main)
