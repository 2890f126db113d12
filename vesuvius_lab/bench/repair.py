"""Topology repair: seconds per volume on one core, against the plain post-processing in the same run.

Volumes are synthetic scroll chunks with the errors a model makes (``bench.metric.make_prediction``:
holes through sheets, bridges, debris, thinned and thickened regions), turned into probabilities;
the salt noise that bench puts inside the ignored region (it only costs the metric time there, a
model does not emit it) is left out.
Each measurement runs in a fresh process pinned to one core (numba and BLAS limited to one thread),
after an untimed warm-up on a small volume, so compiling is not counted. The baseline is the
post-processing without repair (threshold, small-component removal, cavity filling); the repair
adds the configured steps. Reported: CPU and wall seconds per volume (medians), the repair's own
seconds (repair minus baseline), per-step seconds, and the tunnels (Betti-1) and score before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

DEFAULT_REPAIR = ["plug_pinholes", "fill_sheet_holes", "plug_pinholes", "close_tunnels", "split_bridges",
                  "remove_small_components"]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=320, help="edge of the cubic volumes (default 320)")
    p.add_argument("--volumes", type=int, default=2, help="volumes measured (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repair", default=",".join(DEFAULT_REPAIR), help="comma-separated repair steps (default: all)")
    p.add_argument("--min-component-size", type=int, default=50)
    p.add_argument("--hole-window", type=int, default=32, help="postprocess.hole_window (default 32)")


_CHILD = r"""
import json, os, sys, time
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
import numpy as np
from vesuvius_lab.postprocess import PostprocessConfig, STEPS, binarize_probabilities
from vesuvius_lab.leaderboard import volume_score
from vesuvius_lab._betti import betti_numbers
path, cfg_json = sys.argv[1], sys.argv[2]
cfg = PostprocessConfig(**json.loads(cfg_json))
data = np.load(path)
prob, label = data["prob"], data["label"]

def run(prob, cfg, steps_s=None):
    mask = binarize_probabilities(prob, cfg)
    for step in cfg.steps():
        t0 = time.process_time()
        mask = STEPS[step](mask, prob, cfg)
        if steps_s is not None:
            steps_s.setdefault(step, 0.0)
            steps_s[step] += time.process_time() - t0
    return mask.astype(np.uint8)

run(prob[:48, :48, :48], cfg)  # compile (or load) the kernels: not timed
steps_s = {}
t0, c0 = time.perf_counter(), time.process_time()
mask = run(prob, cfg, steps_s)
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
ignored = label == 2
s = volume_score(mask, label, jobs=1)
tunnels = betti_numbers(np.where(ignored, 0, mask) != 0)[1]
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "steps_cpu_s": steps_s, "score": s.score, "topo": s.topo,
                  "surface_dice": s.surface_dice, "voi_score": s.voi_score, "tunnels": int(tunnels)}))
"""


def _measure(path: Path, cfg: dict) -> dict:
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path), json.dumps(cfg)], capture_output=True, text=True,
                          check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"repair measurement failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    from vesuvius_lab.bench.metric import make_case

    steps = [s for s in args.repair.split(",") if s]
    base_cfg = {"threshold": 0.5, "min_component_size": args.min_component_size, "close_holes": True}
    repair_cfg = {**base_cfg, "repair": steps, "hole_window": args.hole_window}
    from vesuvius_lab.postprocess import PostprocessConfig

    PostprocessConfig(**repair_cfg)  # a bad step name is one line before any work
    base_rows, repair_rows = [], []
    with tempfile.TemporaryDirectory(prefix="vlab-bench-repair-") as tmp:
        for k in range(args.volumes):
            pred, label = make_case(args.size, args.seed, k)
            pred[ndimage.binary_erosion(label == 2, iterations=2)] = 0
            rng = np.random.default_rng([args.seed, k, 77])
            prob = np.clip(np.where(pred > 0, 0.8, 0.2) + rng.normal(0, 0.05, pred.shape), 0, 1).astype(np.float32)
            path = Path(tmp) / f"case_{k}.npz"
            np.savez(path, prob=prob, label=label)
            base_rows.append(_measure(path, base_cfg))
            repair_rows.append(_measure(path, repair_cfg))

    def median(rows: list[dict], key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 3)

    base_cpu, repair_cpu = median(base_rows, "cpu_seconds"), median(repair_rows, "cpu_seconds")
    return {
        "size": args.size,
        "volumes": args.volumes,
        "repair": steps,
        "hole_window": args.hole_window,
        "cores_used": 1,
        "baseline_cpu_seconds_per_volume": base_cpu,
        "baseline_seconds_per_volume": median(base_rows, "seconds"),
        "repair_cpu_seconds_per_volume": repair_cpu,
        "repair_seconds_per_volume": median(repair_rows, "seconds"),
        "repair_only_cpu_seconds_per_volume": round(repair_cpu - base_cpu, 3),
        "ratio_to_baseline": round(repair_cpu / base_cpu, 2) if base_cpu else None,
        "steps_cpu_seconds": {s: round(statistics.median(r["steps_cpu_s"].get(s, 0.0) for r in repair_rows), 3)
                              for s in repair_rows[0]["steps_cpu_s"]},
        "tunnels_before": [r["tunnels"] for r in base_rows],
        "tunnels_after": [r["tunnels"] for r in repair_rows],
        "score_before": [round(r["score"], 4) for r in base_rows],
        "score_after": [round(r["score"], 4) for r in repair_rows],
        "topo_before": [round(r["topo"], 4) for r in base_rows],
        "topo_after": [round(r["topo"], 4) for r in repair_rows],
        "load_average_after": round(os.getloadavg()[0], 2),  # above the cores: others shared the machine
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
