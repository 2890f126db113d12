"""Leaderboard metric: seconds and peak memory per volume, ours against the official way.

Volumes are synthetic scroll chunks (``vesuvius_lab.synth``); the "prediction" is the label
perturbed the way a segmentation model errs: a thinned region, a thickened region, spurious blobs,
holes punched through sheets, a bridge between two neighbouring sheets, and output inside the
ignored region. Each measurement runs in a fresh subprocess. Peak memory is VmHWM of that process
(libraries included; ``idle_rss_mib`` is the same process before scoring). Wall seconds are the
ratio's basis; CPU seconds are reported too, since a machine shared with other work stretches wall
time (``load_average_after`` tells whether it was). ``--repeats`` measures each volume again,
alternating ours and the official way, and every figure is a median. ``parts`` and ``octants`` give
each side's median seconds per component (binarising, TopoScore with each octant's Betti matching,
SurfaceDice, VOI) and the official/ours ratio. ``--jobs 1`` is one core: one thread in numba,
OpenMP, OpenBLAS and MKL (the official way always runs so), checked as ``ours_threads``.

The baseline computes the same quantities the straightforward, official way: Betti-Matching-3D
(``compute_matching``, if the compiled module is importable, else our exact kernels) on each of the
8 octants of the full volume in turn, DeepMind's ``surface_distance`` on the full volume, and
skimage's ``variation_of_information`` on 26-connected components. Both must give the same score
(reported as ``max_abs_score_diff``).
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


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=320, help="edge of the cubic volumes for our implementation (default 320)")
    p.add_argument("--volumes", type=int, default=2, help="volumes measured (default 2)")
    p.add_argument("--baseline-size", type=int, default=None, help="edge for the baseline (default: --size)")
    p.add_argument("--baseline-volumes", type=int, default=1, help="volumes the baseline measures (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=None, help="threads for ours (default: all cores; 1: one core, one thread in every library)")
    p.add_argument("--repeats", type=int, default=1, help="measurements per volume, interleaved ours/official (default 1)")


# --- realistic prediction --------------------------------------------------------------------
def make_prediction(label: np.ndarray, seed: int) -> np.ndarray:
    """A plausible model output for ``label`` (uint8 0/1): the typical errors, deterministic in seed."""
    rng = np.random.default_rng([seed, 4242])
    sheets = label == 1
    pred = sheets.copy()
    shape = np.array(label.shape)
    ball = ndimage.generate_binary_structure(3, 1)

    def box(frac: float) -> tuple[slice, ...]:
        size = (shape * frac).astype(int)
        start = [int(rng.integers(0, max(n - s, 1))) for n, s in zip(shape, size, strict=True)]
        return tuple(slice(a, a + s) for a, s in zip(start, size, strict=True))

    thin = box(0.35)  # under-segmentation: sheets eroded in one region
    pred[thin] = ndimage.binary_erosion(sheets[thin], structure=ball) | (sheets[thin] & (rng.random(sheets[thin].shape) < 0.02))
    thick = box(0.35)  # over-segmentation: sheets grown in another
    pred[thick] |= ndimage.binary_dilation(sheets[thick], structure=ball)
    n_blobs = max(4, int(label.size / 80_000))

    def ball(c: np.ndarray, r: float) -> tuple[tuple[slice, ...], np.ndarray]:
        """The voxels within r of c, as a box around c and its mask (r < 4 voxels)."""
        box = tuple(slice(max(int(ci) - 4, 0), min(int(ci) + 5, int(n))) for ci, n in zip(c, shape, strict=True))
        grid = np.ogrid[box]
        return box, sum((g - ci) ** 2 for g, ci in zip(grid, c, strict=True)) <= r * r

    for _ in range(n_blobs):  # spurious debris blobs
        c = rng.integers(0, shape)
        box, inside = ball(c, rng.uniform(1.0, 3.0))
        pred[box] |= inside
    idx = np.argwhere(sheets)
    if len(idx):
        for c in idx[rng.integers(0, len(idx), size=max(3, n_blobs // 2))]:  # holes through sheets
            box, inside = ball(c, rng.uniform(1.5, 3.0))
            pred[box] &= ~inside
        # a bridge: a short thick segment from a sheet voxel along the axis to the next sheet
        for _ in range(2):
            c = idx[rng.integers(len(idx))]
            axis = int(rng.integers(3))
            line = [slice(max(int(v) - 1, 0), int(v) + 2) for v in c]
            line[axis] = slice(int(c[axis]), min(int(c[axis]) + 12, int(shape[axis])))
            pred[tuple(line)] = True
    pred |= ndimage.binary_erosion(label == 2, iterations=2) & (rng.random(label.shape) < 0.3)  # noise where ignored
    return pred.astype(np.uint8)


def make_case(size: int, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, label) for one synthetic volume of edge ``size``."""
    from vesuvius_lab.synth import make_volume, scroll_style

    _, label = make_volume((size, size, size), seed, index, scroll_style(seed, index % 4))
    return make_prediction(label, seed * 1000 + index), label


# --- the two implementations -----------------------------------------------------------------
def ours(pred: np.ndarray, label: np.ndarray, jobs: int | None = None, timings: dict | None = None) -> dict:
    from vesuvius_lab.leaderboard import volume_score

    return volume_score(pred, label, jobs=jobs, timings=timings).as_dict()


def official_betti_module():
    """The compiled Betti-Matching-3D module (``betti_matching``) if one is importable, else None."""
    try:
        import betti_matching  # the official build

        return betti_matching
    except ImportError:
        pass
    try:
        import importlib.util

        spec = importlib.util.find_spec("topolosses")
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = Path(next(iter(spec.submodule_search_locations))) / "losses" / "betti_matching" / "src"
        for so in folder.glob("betti_matching*.so"):
            loader_spec = importlib.util.spec_from_file_location("betti_matching", so)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
            return module
    except Exception:  # noqa: BLE001 - a broken optional install just means: not available
        return None
    return None


def official(pred: np.ndarray, label: np.ndarray, timings: dict | None = None) -> dict:
    """The score computed the plain, official way (full volume, serial octants, reference libraries).

    ``timings`` receives the seconds of each part under the keys ``leaderboard.volume_score`` uses.
    """
    import cc3d
    import surface_distance as sd
    from skimage.metrics import variation_of_information

    from vesuvius_lab.leaderboard import ZERO_COUNTS, TopoCounts, combine, octant_slices

    clock = {"start": time.perf_counter()}
    octants: list[float] = []

    def lap(key: str) -> None:
        now = time.perf_counter()
        clock[key] = now - clock["start"]
        clock["start"] = now

    ignored = label == 2
    pr = np.where(ignored, 0, pred) != 0
    gt = np.where(ignored, 0, label) != 0
    lap("binarize")
    bm = official_betti_module()
    counts = ZERO_COUNTS
    for s in octant_slices(pr.shape):
        t0 = time.perf_counter()
        a, b = (~pr[s]).astype(np.uint8), (~gt[s]).astype(np.uint8)
        if bm is not None:
            r = bm.compute_matching(a, b)
            m = tuple(int(v) for v in r.num_matched)
            p = tuple(x + int(y) for x, y in zip(m, r.num_unmatched_input1, strict=True))
            g = tuple(x + int(y) for x, y in zip(m, r.num_unmatched_input2, strict=True))
        else:
            from vesuvius_lab._betti import match_counts

            m, p, g = match_counts(a == 0, b == 0, fast=False)
        counts = counts + TopoCounts(m, p, g)
        octants.append(time.perf_counter() - t0)
    topo = counts.score()
    lap("topo")
    if not gt.any() and not pr.any():
        sdice = 1.0
    elif gt.any() != pr.any():
        sdice = 0.0
    else:
        sdice = float(sd.compute_surface_dice_at_tolerance(sd.compute_surface_distances(gt, pr, (1.0, 1.0, 1.0)), 2.0))
    lap("surface_dice")
    if (gt | pr).any():
        gl = cc3d.connected_components(gt.astype(np.uint8), connectivity=26)
        pl = cc3d.connected_components(pr.astype(np.uint8), connectivity=26)
        union = (gl > 0) | (pl > 0)
        voi = float(sum(variation_of_information(gl[union], pl[union])))
    else:
        voi = 0.0
    lap("voi")
    if timings is not None:
        timings.update({k: v for k, v in clock.items() if k != "start"}, octants=octants)
    voi_sc = 1.0 / (1.0 + 0.3 * voi)
    return {"score": combine(topo, sdice, voi_sc), "topo": topo, "surface_dice": sdice, "voi_score": voi_sc}


# --- measurement in a fresh process ----------------------------------------------------------
# One core means one thread in every library the scoring may touch; set before numpy loads them.
ONE_THREAD_ENV = {k: "1" for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
PARTS = ("binarize", "topo", "surface_dice", "voi")

_CHILD = r"""
import json, os, sys, time
import numpy as np
from vesuvius_lab.bench import metric
which, path, jobs = sys.argv[1], sys.argv[2], sys.argv[3]
if "torch" in sys.modules and jobs == "1":
    sys.modules["torch"].set_num_threads(1)

def status(key):  # VmHWM: peak RSS of this process image (ru_maxrss would include the parent's fork)
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))

data = np.load(path)
pred, label = data["pred"], data["label"]
if which == "ours":
    from vesuvius_lab.leaderboard import warm_up
    warm_up()  # load every compiled kernel once, as a validation loop has
idle = status("VmHWM") / 1024
timings = {}
t0, c0 = time.perf_counter(), os.times()
if which == "ours":
    out = metric.ours(pred, label, jobs=None if jobs == "-" else int(jobs), timings=timings)
else:
    out = metric.official(pred, label, timings)
seconds, c1 = time.perf_counter() - t0, os.times()
cpu = (c1.user - c0.user) + (c1.system - c0.system)
print(json.dumps({"result": out, "seconds": seconds, "cpu_seconds": cpu, "parts": timings,
                  "threads": status("Threads"), "peak_rss_mib": status("VmHWM") / 1024, "idle_rss_mib": idle}))
"""


def _measure(which: str, path: Path, jobs: int | None) -> dict:
    env = dict(os.environ, **ONE_THREAD_ENV) if which == "official" or jobs == 1 else None
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, which, str(path), "-" if jobs is None else str(jobs)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{which} measurement failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    size = args.size
    base_size = args.baseline_size or size
    ours_rows: dict[int, list[dict]] = {k: [] for k in range(args.volumes)}
    base_rows: dict[int, list[dict]] = {k: [] for k in range(args.baseline_volumes)}
    with tempfile.TemporaryDirectory(prefix="vlab-bench-metric-") as tmp:
        cases = {}
        for k in range(max(args.volumes, args.baseline_volumes)):
            for edge in {size, base_size}:
                if (edge, k) in cases:
                    continue
                pred, label = make_case(edge, args.seed, k)
                path = Path(tmp) / f"case_{edge}_{k}.npz"
                np.savez(path, pred=pred, label=label)
                cases[(edge, k)] = path
        for _ in range(args.repeats):  # interleaved: a load spike hits both sides alike
            for k in range(max(args.volumes, args.baseline_volumes)):
                if k < args.volumes:
                    ours_rows[k].append(_measure("ours", cases[(size, k)], args.jobs))
                if k < args.baseline_volumes:
                    base_rows[k].append(_measure("official", cases[(base_size, k)], None))
    ours_all = [r for rows in ours_rows.values() for r in rows]
    base_all = [r for rows in base_rows.values() for r in rows]
    diffs = [abs(b["result"]["score"] - o["result"]["score"])
             for k in base_rows if base_size == size and k in ours_rows for b in base_rows[k] for o in ours_rows[k]]
    ours_s = statistics.median(r["seconds"] for r in ours_all)
    base_s = statistics.median(r["seconds"] for r in base_all)
    # per-voxel scaling when the baseline ran on a smaller volume
    scale = (size / base_size) ** 3
    base_per_volume = base_s * scale
    # the parts compare the volumes both sides measured (all of them, scaled, at different sizes)
    paired = [r for k in base_rows if k in ours_rows for r in ours_rows[k]] if base_size == size else ours_all
    result = {
        "size": size,
        "volumes": args.volumes,
        "repeats": args.repeats,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "jobs": args.jobs,
        "ours_threads": max(r["threads"] for r in ours_all),
        "ours_seconds_per_volume": _sig(ours_s),
        "ours_cpu_seconds_per_volume": round(statistics.median(r["cpu_seconds"] for r in ours_all), 3),
        "ours_peak_rss_mib": round(max(r["peak_rss_mib"] for r in ours_all), 1),
        "ours_idle_rss_mib": round(max(r["idle_rss_mib"] for r in ours_all), 1),
        "baseline_size": base_size,
        "baseline_volumes": args.baseline_volumes,
        "baseline_engine": "betti_matching" if official_betti_module() is not None else "vesuvius_lab._betti (plain sweeps)",
        "baseline_threads": max(r["threads"] for r in base_all),
        "baseline_seconds_per_volume": _sig(base_s),
        "baseline_cpu_seconds_per_volume": round(statistics.median(r["cpu_seconds"] for r in base_all), 3),
        "baseline_peak_rss_mib": round(max(r["peak_rss_mib"] for r in base_all), 1),
        "baseline_seconds_scaled_to_size": _sig(base_per_volume),
        "speedup": round(base_per_volume / ours_s, 2),
        # CPU seconds: the same ratio less stretched by other work on a shared machine
        "speedup_cpu": round(statistics.median(r["cpu_seconds"] for r in base_all) * scale
                             / max(statistics.median(r["cpu_seconds"] for r in ours_all), 1e-9), 2),
        "parts": {part: _compare([r["parts"][part] for r in paired], [r["parts"][part] * scale for r in base_all])
                  for part in PARTS},
        "octants": [_compare([r["parts"]["octants"][i] for r in paired], [r["parts"]["octants"][i] * scale for r in base_all])
                    for i in range(min(len(r["parts"]["octants"]) for r in paired + base_all))],
        "ours_scores": [round(rows[0]["result"]["score"], 6) for rows in ours_rows.values()],
        "max_abs_score_diff": max(diffs) if diffs else None,
        "load_average_after": round(os.getloadavg()[0], 2),  # > cores: others shared the machine
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return result


def _compare(ours_s: list[float], official_s: list[float]) -> dict:
    """Median seconds of one part on each side and the official/ours ratio of the medians."""
    a, b = statistics.median(ours_s), statistics.median(official_s)
    return {"ours_s": _sig(a), "official_s": _sig(b), "ratio": round(b / a, 2) if a > 0 else None}


def _sig(seconds: float) -> float:
    """Four significant digits: a tiny volume's milliseconds keep the precision its ratio needs."""
    return float(f"{seconds:.4g}")
