#!/usr/bin/env python
"""FKD-compatible entry point: ``python train.py [FKD's flags] DATA`` == ``fkd-dali train ...``."""

import sys

from fkd_dali.cli import main

if __name__ == "__main__":
    sys.exit(main(["train"] + sys.argv[1:]))
