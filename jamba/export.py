"""`python -m jamba.export`: the old name of `python -m train.export` (checkpoint -> transformers folder).

The export reads trainer checkpoints through train/, so it lives there; this module only keeps the old
command working and is never imported by the model code."""

import sys

if __name__ == "__main__":
    from train.export import main

    sys.exit(main(prog="jamba.export"))
