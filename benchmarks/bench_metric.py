"""Leaderboard-metric benchmark; same as `vesuvius-lab bench metric --json` (see vesuvius_lab/bench/metric.py)."""

import sys

from vesuvius_lab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "metric", "--json", *sys.argv[1:]]))
