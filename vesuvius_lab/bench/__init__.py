"""Benchmarks behind ``vesuvius-lab bench NAME``: each compares against a baseline in the same run.

A benchmark module exposes ``add_args(parser)`` and ``run(args) -> dict``; the CLI prints the dict
as JSON with ``--json`` and as readable lines otherwise. Machines are noisy: report medians and ratios.
"""

from __future__ import annotations

import importlib

# name -> module path; each module has add_args(parser) and run(args)
BENCHES: dict[str, str] = {
    "data": "vesuvius_lab.bench.input_pipeline",
    "losses": "vesuvius_lab.bench.losses",
    "metric": "vesuvius_lab.bench.metric",
    "live": "vesuvius_lab.bench.live_prediction",
    "repair": "vesuvius_lab.bench.repair",
    "scale": "vesuvius_lab.bench.scale",
    "step": "vesuvius_lab.bench.step",
}


def load(name: str):
    return importlib.import_module(BENCHES[name])
