"""Training-step benchmark; same as `vesuvius-lab bench step --json` (see vesuvius_lab/bench/step.py)."""

import sys

from vesuvius_lab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "step", "--json", *sys.argv[1:]]))
