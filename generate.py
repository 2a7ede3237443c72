#!/usr/bin/env python
"""FKD-compatible entry point: ``python generate.py [FKD's flags] DATA`` == ``fkd-dali generate ...``."""

import sys

from fkd_dali.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate"] + sys.argv[1:]))
