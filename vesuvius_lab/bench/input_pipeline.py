"""Input-pipeline throughput: patches/s and peak RSS per worker, ours vs an idiomatic MONAI pipeline.

Each pipeline runs in its own single-threaded child process (one data worker) over the same
synthetic 320^3 volumes, decoded and cached once. Ours: cached targets, index-addressed sampling,
source-box reads and one resampling pass. Baseline, the same per-patch work the MONAI way:
RandCropByPosNegLabeld, RandAffined, Rand3DElasticd, flips and intensity transforms, then the
skeleton and scipy EDT of every patch (as the run this product replaces did). The baseline gets
its volumes already decoded in RAM, which favours it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PATCHES = {"128x128x128": (128, 128, 128), "72x136x136": (72, 136, 136)}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=int, default=40, help="timed patches per pipeline for ours (default 40)")
    p.add_argument("--baseline-samples", type=int, default=10, help="timed patches for the baseline (default 10)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--shape", type=int, default=320, help="volume edge of the synthetic data (default 320)")
    p.add_argument("--volumes", type=int, default=2)
    p.add_argument("--patches", default=",".join(PATCHES), help="comma-separated patch sizes ZxYxX")


def bench_records(shape: int, volumes: int):
    """Synthetic volumes for benchmarking, written once under the cache directory and reused."""
    from vesuvius_lab.cache import default_cache_dir
    from vesuvius_lab.layout import discover
    from vesuvius_lab.synth import MARKER, synth

    root = default_cache_dir() / "bench" / f"synth{shape}x{volumes}"
    if not (root / MARKER).is_file():
        synth(root, volumes=volumes, shape=(shape,) * 3, seed=11, scrolls=min(volumes, 4), test_volumes=0, overwrite=True)
    return discover(root)[0]


def _ours(records, patch, n, warmup):
    from vesuvius_lab.cache import VolumeCache
    from vesuvius_lab.config import Config, DataConfig, TrainingConfig
    from vesuvius_lab.data import patch_dataset

    config = Config(data=DataConfig(patch_size=list(patch)),
                    training=TrainingConfig(train_batch_size=1, train_iterations_per_epoch=10**6, seed=0))
    ds = patch_dataset(config, records, VolumeCache())
    t0 = time.perf_counter()
    ds.prepare(progress=False)
    prepare_s = time.perf_counter() - t0
    return (lambda g: ds[g]), {"targets_prepare_s": prepare_s}


def _baseline(records, patch, n, warmup):
    import numpy as np
    from monai.transforms import (
        Compose,
        MapTransform,
        Rand3DElasticd,
        RandAdjustContrastd,
        RandAffined,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
    )
    from scipy import ndimage

    from vesuvius_lab.cache import VolumeCache
    from vesuvius_lab.targets import medial_surface

    class PatchTargets(MapTransform):
        """Per-patch skeleton and signed distance, computed from the augmented label."""

        def __call__(self, data):
            d = dict(data)
            label = np.asarray(d["label"])[0]
            fg = label == 1
            d["skeleton"] = medial_surface(label)
            d["distance"] = ndimage.distance_transform_edt(~fg) - ndimage.distance_transform_edt(fg)
            return d

    keys = ["image", "label"]
    pipeline = Compose([
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=patch, pos=0.33, neg=0.67, num_samples=1),
        RandAffined(keys, prob=0.36, rotate_range=(np.pi / 6,) * 3, scale_range=(0.2,) * 3,
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        Rand3DElasticd(keys, sigma_range=(5, 8), magnitude_range=(50, 150), prob=0.2,
                       mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.5, spatial_axis=2),
        RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
        RandScaleIntensityd("image", factors=0.25, prob=0.15),
        RandGaussianNoised("image", prob=0.15, std=0.05),
        RandGaussianSmoothd("image", prob=0.1, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        PatchTargets(keys),
    ])
    pipeline.set_random_state(seed=0)
    cache = VolumeCache()
    volumes = []
    for r in records:
        v = cache.load(r)
        volumes.append({"image": np.asarray(v.image, dtype=np.float32)[None] / 255, "label": np.array(v.label)[None]})

    def one(g):
        return pipeline(volumes[g % len(volumes)])[0]

    return one, {}


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM): unlike ru_maxrss, it is not inherited across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(kind: str, patch: tuple[int, int, int], n: int, warmup: int, shape: int, volumes: int) -> dict:
    """Run one pipeline in this process, single-threaded, and measure it."""
    import torch

    torch.set_num_threads(1)
    records = bench_records(shape, volumes)
    make = _ours if kind == "ours" else _baseline
    fn, extra = make(records, patch, n, warmup)
    for g in range(warmup):
        fn(g)
    times = []
    for g in range(warmup, warmup + n):
        t0 = time.perf_counter()
        fn(g)
        times.append(time.perf_counter() - t0)
    return {
        "patches_per_s": n / sum(times),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "samples": n,
        "peak_rss_mb": peak_rss_mb(),
        **extra,
    }


def _spawn(kind, patch, n, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "vesuvius_lab.bench.input_pipeline", kind, "x".join(map(str, patch)),
           str(n), str(args.warmup), str(args.shape), str(args.volumes)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench child {kind} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    bench_records(args.shape, args.volumes)  # synthesize once, before any timing
    patches = [tuple(int(v) for v in p.split("x")) for p in args.patches.split(",")]
    results = {}
    jobs = [(p, kind) for p in patches for kind in ("ours", "baseline")]
    for patch, kind in tqdm(jobs, desc="bench data", unit="run"):
        n = args.samples if kind == "ours" else args.baseline_samples
        results.setdefault("x".join(map(str, patch)), {})[kind] = _spawn(kind, patch, n, args)
    for r in results.values():
        r["ratio"] = r["ours"]["patches_per_s"] / r["baseline"]["patches_per_s"]
    headline = results.get("128x128x128") or next(iter(results.values()))
    return {
        "ours_patches_per_s": round(headline["ours"]["patches_per_s"], 3),
        "baseline_patches_per_s": round(headline["baseline"]["patches_per_s"], 3),
        "ratio": round(headline["ratio"], 2),
        "volume_shape": [args.shape] * 3,
        "per_worker": "one single-threaded process per pipeline; patches/s = timed patches / their total seconds",
        "by_patch": results,
    }


if __name__ == "__main__":
    kind, patch, n, warmup, shape, volumes = sys.argv[1:7]
    out = child(kind, tuple(int(v) for v in patch.split("x")), int(n), int(warmup), int(shape), int(volumes))
    print(json.dumps(out))
