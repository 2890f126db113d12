"""Input-pipeline benchmark; same as `vesuvius-lab bench data --json` (see vesuvius_lab/bench/input_pipeline.py)."""

import sys

from vesuvius_lab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "data", "--json", *sys.argv[1:]]))
