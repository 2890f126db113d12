"""Topology-repair benchmark; same as `vesuvius-lab bench repair --json` (see vesuvius_lab/bench/repair.py)."""

import sys

from vesuvius_lab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "repair", "--json", *sys.argv[1:]]))
