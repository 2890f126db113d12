"""Live-prediction cost benchmark; same as `vesuvius-lab bench live --json` (see vesuvius_lab/bench/live_prediction.py)."""

import sys

from vesuvius_lab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "live", "--json", *sys.argv[1:]]))
