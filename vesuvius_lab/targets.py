"""Targets for the topology-aware losses, computed once per volume and cached (never per patch).

- ``skeleton``: the medial surface of label 1. 3D skeletonization collapses a sheet to curves, so
  the volume is sliced across the sheets and each slice's sheet cross-sections are thinned to
  their centre lines; stacked, those lines form the sheet's medial surface.
- ``distance``: signed distance to the label-1 boundary (negative inside, positive outside),
  clipped to +-DISTANCE_CLIP, from the ``edt`` package (~13x faster than scipy here); stored as
  int8 quarter-voxel steps (error <= 1/8 voxel, 1 byte instead of 2) and read back as float32.
- ``fg_points``: a deterministic subsample of label-1 voxel locations for foreground draws.

``prepare`` builds the cache entries and targets of many records in parallel processes with one
progress bar; ``vesuvius-lab cache build``, training and the planner all go through it. Each
record is complete (atomically) or absent, so a killed preparation resumes where it stopped.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
import edt
import numpy as np
from skimage.morphology import skeletonize

from vesuvius_lab.cache import CachedVolume, ChunkedArray, VolumeCache
from vesuvius_lab.errors import DataError, VLabError
from vesuvius_lab.layout import Record

TARGETS_VERSION = "2"
DISTANCE_CLIP = 16.0
DISTANCE_STEPS = 4  # stored per voxel: +-16 voxels are +-64 in int8
DEFAULT_S_PER_GVOXEL = 119.0  # measured: 3.9 s per 320^3 volume in one process (decode, cache, targets)
RATE_FILE = "prepare_rate.json"


def slicing_axis(fg: np.ndarray) -> int:
    """The axis most parallel to the sheets: slices across it cut through the sheets.

    Sheets are crossed most often along their normal; the axis with the fewest 0->1 transitions
    is the one that lies most within the sheet planes.
    """
    crossings = [int(np.count_nonzero(np.diff(fg, axis=a) > 0)) for a in range(3)]
    return int(np.argmin(crossings))


def medial_surface(label: np.ndarray) -> np.ndarray:
    """uint8 medial surface of label 1, by per-slice 2D skeletonization across the sheets."""
    fg = np.asarray(label) == 1
    out = np.zeros(fg.shape, dtype=np.uint8)
    if not fg.any():
        return out
    axis = slicing_axis(fg.view(np.uint8))
    fg_t, out_t = np.moveaxis(fg, axis, 0), np.moveaxis(out, axis, 0)
    for i in range(fg_t.shape[0]):
        if fg_t[i].any():
            out_t[i] = skeletonize(fg_t[i])
    return out


def signed_distance(label: np.ndarray) -> np.ndarray:
    """float16 signed distance to the label-1 surface: negative inside, positive outside, clipped."""
    fg = np.ascontiguousarray(np.asarray(label) == 1)
    if not fg.any():
        return np.full(fg.shape, DISTANCE_CLIP, dtype=np.float16)
    dist = -edt.sdf(fg.view(np.uint8), parallel=1)
    return np.clip(dist, -DISTANCE_CLIP, DISTANCE_CLIP).astype(np.float16)


def fg_points(label: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    """Up to ``max_points`` label-1 voxel coordinates (int32, (N, 3)), deterministic."""
    coords = np.argwhere(np.asarray(label) == 1).astype(np.int32)
    if len(coords) > max_points:
        keep = np.random.default_rng(seed).choice(len(coords), size=max_points, replace=False)
        coords = coords[np.sort(keep)]
    return coords.reshape(-1, 3)


def quantize_distance(distance: np.ndarray) -> np.ndarray:
    """int8 quarter-voxel steps of a clipped signed distance."""
    return np.round(np.asarray(distance, dtype=np.float32) * DISTANCE_STEPS).astype(np.int8)


class Dequantized:
    """A stored int8 distance read as float32 voxels (exact quarter steps; every consumer computes
    in float32, and numpy's float16 conversions cost 10x a float32 one): slicing decodes only the slice."""

    ndim = 3
    dtype = np.dtype(np.float32)

    def __init__(self, steps: ChunkedArray | np.ndarray):
        self.steps = steps
        self.shape = tuple(steps.shape)

    def __getitem__(self, key) -> np.ndarray:
        return np.asarray(self.steps[key], dtype=np.float32) * np.float32(1 / DISTANCE_STEPS)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.asarray(self.steps, dtype=np.float32) * np.float32(1 / DISTANCE_STEPS)
        return out if dtype is None else out.astype(dtype, copy=False)


@dataclass(frozen=True)
class VolumeTargets:
    volume: CachedVolume
    skeleton: ChunkedArray  # uint8 0/1
    distance: Dequantized  # float32 voxels, clipped
    fg_points: np.ndarray


def _version() -> str:
    return f"{TARGETS_VERSION}-clip{DISTANCE_CLIP}-steps{DISTANCE_STEPS}"


def load_targets(cache: VolumeCache, volume: CachedVolume, max_fg_points: int) -> VolumeTargets:
    """The volume's cached targets, computed on first use and whenever the volume changes."""
    labels: list[np.ndarray] = []

    def label(v: CachedVolume) -> np.ndarray:  # decoded once for all three targets
        if not labels:
            labels.append(np.asarray(v.label))
        return labels[0]

    version = _version()
    return VolumeTargets(
        volume=volume,
        skeleton=cache.derived(volume, "skeleton", version, lambda v: medial_surface(label(v))),
        distance=Dequantized(cache.derived(volume, "distance", version, lambda v: quantize_distance(signed_distance(label(v))), kind="distance")),
        fg_points=cache.derived(volume, f"fg_points{max_fg_points}", version, lambda v: fg_points(label(v), max_fg_points)),
    )


# --- preparation: cache entries and targets of many records ---------------------------------------
def is_prepared(cache: VolumeCache, record: Record, max_fg_points: int | None) -> bool:
    """True when the record's cache entry (and, with ``max_fg_points``, its targets) are fresh."""
    if not cache.is_fresh(record):
        return False
    if max_fg_points is None:
        return True
    folder, meta = cache.folder(record), cache.meta(record)
    want = {"checksum": meta["checksum"], "version": _version()}
    for name in ("skeleton", "distance", f"fg_points{max_fg_points}"):
        try:
            if json.loads((folder / f"{name}.json").read_text()) != want:
                return False
        except (OSError, ValueError):
            return False
    return True


def _single_threaded() -> None:
    """A preparation process uses one core: the parallelism is the processes."""
    import zarr
    from numcodecs import blosc

    blosc.set_nthreads(1)
    zarr.config.set({"threading.max_workers": 1})


def prepare_one(cache_dir: str, record: Record, max_fg_points: int | None) -> dict:
    """Build one record's cache entry (and targets); returns its id, voxels and seconds, or its
    problems (so a bad record never stops the others)."""
    t0, c0 = time.perf_counter(), time.process_time()
    cache = VolumeCache(cache_dir, chunk_cache_mb=0)
    try:
        volume = cache.load(record)
        if max_fg_points is not None:
            load_targets(cache, volume, max_fg_points)
    except VLabError as exc:
        return {"id": record.id, "problems": exc.lines}
    return {"id": record.id, "voxels": int(np.prod(volume.image.shape)), "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0}


@dataclass
class PrepareReport:
    todo: int
    total: int
    voxels: int  # of the records to prepare
    jobs: int
    estimate_s: float
    seconds: float = 0.0
    done: list[dict] = field(default_factory=list)

    @property
    def message(self) -> str:
        if not self.todo:
            return f"cache: all {self.total} volumes prepared"
        return (f"cache: {self.todo} of {self.total} volumes to prepare ({self.voxels / 1e9:.2f} G voxels), "
                f"about {_duration(self.estimate_s)} with {self.jobs} job{'s' if self.jobs > 1 else ''}")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _voxels(cache: VolumeCache, record: Record) -> int:
    from vesuvius_lab.io import volume_info

    try:
        shape, _ = volume_info(record.image, record.image_ref)
    except VLabError:
        return 0
    return int(np.prod(shape))


def seconds_per_gvoxel(cache: VolumeCache) -> float:
    """Preparation seconds per G voxels in one process, as last measured on this cache (or the default)."""
    try:
        return float(json.loads((cache.root / RATE_FILE).read_text())["s_per_gvoxel"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_S_PER_GVOXEL


def plan_preparation(cache: VolumeCache, records: Sequence[Record], max_fg_points: int | None,
                     jobs: int | None = None, plain: Sequence[Record] = ()) -> tuple[list[tuple[Record, int | None]], PrepareReport]:
    """The (record, max_fg_points) still to prepare and how long that will take (from the last
    measured rate); ``plain`` records need their cache entry only (validation volumes)."""
    wanted = [(r, max_fg_points) for r in records] + [(r, None) for r in plain]
    todo = [(r, m) for r, m in wanted if not is_prepared(cache, r, m)]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo) or 1))
    voxels = sum(_voxels(cache, r) for r, _ in todo)
    estimate = seconds_per_gvoxel(cache) * voxels / 1e9 / jobs  # the jobs share the records
    return todo, PrepareReport(len(todo), len(wanted), voxels, jobs, estimate)


def prepare(
    cache: VolumeCache,
    records: Sequence[Record],
    max_fg_points: int | None,
    jobs: int | None = None,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    plain: Sequence[Record] = (),
    processes: bool | None = None,
) -> PrepareReport:
    """Build every record's cache entry and targets (``plain`` records: the entry only) with
    ``jobs`` processes (default: all cores), one progress bar; already prepared records are
    skipped, so a killed preparation resumes. Raises DataError with every bad record's problems
    after the others are done. ``processes=True`` uses a process even for one job."""
    from tqdm.auto import tqdm

    todo, report = plan_preparation(cache, records, max_fg_points, jobs, plain)
    (say or (lambda m: None))(report.message)
    if progress and todo:
        tqdm.write(report.message)
    if not todo:
        return report
    t0, problems = time.perf_counter(), []
    bar = tqdm(total=len(todo), desc="prepare", unit="vol", disable=not progress)
    if report.jobs == 1 and not processes:
        results = (prepare_one(str(cache.root), r, m) for r, m in todo)
        pool = None
    else:
        pool = ProcessPoolExecutor(report.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_single_threaded)
        results = (f.result() for f in as_completed([pool.submit(prepare_one, str(cache.root), r, m) for r, m in todo]))
    try:
        for result in results:
            bar.update(1)
            if "problems" in result:
                problems.extend(result["problems"])
            else:
                report.done.append(result)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    report.seconds = time.perf_counter() - t0
    _record_rate(cache, report.done)
    if problems:
        raise DataError(problems)
    return report


def _record_rate(cache: VolumeCache, done: list[dict]) -> None:
    """Keep the measured one-process rate, so the next estimate is this machine's."""
    from vesuvius_lab.io import atomic_write_text

    rates = sorted(d["seconds"] / d["voxels"] * 1e9 for d in done if d.get("voxels"))
    if rates:
        atomic_write_text(cache.root / RATE_FILE, json.dumps({"s_per_gvoxel": rates[len(rates) // 2]}))
