"""Real scale: preparation seconds with 1 and all jobs, cache bytes against TIFF bytes, patches/s
from the chunked cache against the earlier .npy memmaps, predict seconds; extrapolated to Kaggle.

For each N in ``--volumes``, N synthetic volumes (written once under the cache directory and
reused) are prepared into a fresh cache with one process and with ``--jobs`` processes (the
``cache build`` code), ``--repeats`` times each (medians); each run starts its processes (imports:
a few seconds), which weighs on the speedup at small N and is amortised over a real dataset, so
the 2-vs-1-job ratio is read at the largest N. CPU seconds per volume are reported too: a busy
machine shows as wall seconds far above them (and the load averages before and after). Patches/s at ``--patch`` come from
single-threaded child processes, one data worker each, alternating ours and the baseline:
ours reads the compressed chunked cache through its bounded chunk cache; the baseline reads the
same arrays as the .npy memmaps the cache held before (image, label, skeleton uint8, distance
float16), through the same sampler and augmentation. ``predict`` times ``predict_volume`` (what
``predict`` runs on a Kaggle volume) on one volume with the default model. The Kaggle line scales the per-voxel
figures to 786 volumes of 320³-ish chunks (``--kaggle-gvoxels``, 26 GB of LZW TIFFs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KAGGLE_VOLUMES = 786
KAGGLE_TIFF_GB = 26.0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--volumes", default="2,4", help="comma-separated dataset sizes N (default 2,4; the issue's: 2,4,8)")
    p.add_argument("--shape", type=int, default=320, help="volume edge (default 320)")
    p.add_argument("--jobs", type=int, default=None, help="preparation processes for the parallel run (default: all cores)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each preparation and patch measurement (medians; default 1)")
    p.add_argument("--patch", type=int, default=128, help="patch edge for patches/s and predict (default 128)")
    p.add_argument("--samples", type=int, default=30, help="timed patches per child (default 30)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--chunk-cache-mb", type=float, default=256,
                   help="decoded chunks each worker keeps (default 256, as data.chunk_cache_mb; 0: every read decodes)")
    p.add_argument("--no-predict", action="store_true", help="skip the predict timing")
    p.add_argument("--kaggle-gvoxels", type=float, default=25.0, help="voxels of the Kaggle training set, in G (default 25)")


def bench_records(shape: int, volumes: int):
    """N synthetic volumes, written once under the cache directory and reused; a complete larger
    set serves a smaller N with its first records."""
    from vesuvius_lab.bench.input_pipeline import bench_records as records
    from vesuvius_lab.cache import default_cache_dir
    from vesuvius_lab.layout import discover
    from vesuvius_lab.synth import MARKER

    bench = default_cache_dir() / "bench"
    sizes = sorted(int(p.name.split("x")[-1]) for p in bench.glob(f"synth{shape}x*") if (p / MARKER).is_file()) \
        if bench.is_dir() else []
    larger = [m for m in sizes if m >= volumes]
    if larger:
        return discover(bench / f"synth{shape}x{larger[0]}")[0][:volumes]
    root = bench / f"synth{shape}x{volumes}"
    if root.is_dir() and not (root / MARKER).is_file():
        shutil.rmtree(root)  # a synthesis killed part-way (ours: the bench's own folder)
    return records(shape, volumes)


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _prepare_once(records, jobs: int, cache_dir: Path) -> tuple[float, float]:
    """Wall seconds of a fresh preparation, and the CPU seconds its processes spent per volume."""
    from vesuvius_lab.cache import VolumeCache
    from vesuvius_lab.targets import prepare

    shutil.rmtree(cache_dir, ignore_errors=True)
    t0 = time.perf_counter()
    report = prepare(VolumeCache(cache_dir), records, 20000, jobs=jobs, progress=False, processes=True)
    return time.perf_counter() - t0, statistics.fmean(d["cpu_seconds"] for d in report.done)


def write_memmaps(cache_dir: Path, records, out: Path) -> Path:
    """The same volumes and targets in the earlier cache layout (.npy: uint8 image, label and
    skeleton, float16 distance) for the baseline; returns the folder."""
    import numpy as np

    from vesuvius_lab.cache import VolumeCache
    from vesuvius_lab.targets import load_targets

    cache = VolumeCache(cache_dir)
    for r in records:
        folder = out / r.id
        if (folder / "done").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        vol = cache.load(r)
        t = load_targets(cache, vol, 20000)
        for name, arr in (("image", vol.image), ("label", vol.label), ("skeleton", t.skeleton), ("distance", t.distance)):
            np.save(folder / f"{name}.npy", np.asarray(arr).astype(np.float16 if name == "distance" else np.uint8))
        (folder / "done").write_text("")
    return out


def _dataset(kind: str, records, patch: int, cache_dir: Path, npy: Path, chunk_cache_mb: float = 256):
    import numpy as np

    from vesuvius_lab.cache import CachedVolume, VolumeCache
    from vesuvius_lab.config import Config, DataConfig, TrainingConfig
    from vesuvius_lab.data import patch_dataset
    from vesuvius_lab.sampling import PatchDataset
    from vesuvius_lab.targets import VolumeTargets, load_targets

    config = Config(data=DataConfig(patch_size=[patch] * 3),
                    training=TrainingConfig(train_batch_size=1, train_iterations_per_epoch=10**6, seed=0))
    ds = patch_dataset(config, records, VolumeCache(cache_dir, chunk_cache_mb))
    if kind == "ours":
        return ds

    class MemmapDataset(PatchDataset):
        def volume(self, i: int) -> VolumeTargets:
            if i not in self._volumes:
                r = self.records[i]
                load = lambda name: np.load(npy / r.id / f"{name}.npy", mmap_mode="r")  # noqa: E731
                fg = load_targets(self.cache, self.cache.load(r), self.sampler.fg_points).fg_points
                vol = CachedVolume(r, load("image"), load("label"), "", npy / r.id)
                self._volumes[i] = VolumeTargets(vol, load("skeleton"), load("distance"), fg)
            return self._volumes[i]

    base = MemmapDataset(ds.records, ds.cache, ds.patch, ds.layout, ds.sampler, ds.augment, ds.seed)
    return base


def child(kind: str, patch: int, n: int, warmup: int, shape: int, volumes: int, cache_dir: str, npy: str,
          chunk_cache_mb: float = 256) -> dict:
    """patches/s of one single-threaded worker over the first ``volumes`` records."""
    import torch

    from vesuvius_lab.bench.input_pipeline import peak_rss_mb

    torch.set_num_threads(1)
    records = bench_records(shape, volumes)
    ds = _dataset(kind, records, patch, Path(cache_dir), Path(npy), chunk_cache_mb)
    for g in range(warmup):
        ds[g]
    times = []
    for g in range(warmup, warmup + n):
        t0 = time.perf_counter()
        ds[g]
        times.append(time.perf_counter() - t0)
    out = {"patches_per_s": n / sum(times), "median_s": statistics.median(times), "peak_rss_mb": peak_rss_mb()}
    if kind == "ours":
        c = ds.cache.chunks
        out["chunk_cache_hit_rate"] = c.hits / max(1, c.hits + c.misses)
    return out


def _spawn(kind: str, args, volumes: int, cache_dir: Path, npy: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "vesuvius_lab.bench.scale", kind, str(args.patch), str(args.samples), str(args.warmup),
           str(args.shape), str(volumes), str(cache_dir), str(npy), str(args.chunk_cache_mb)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench child {kind} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _predict_seconds(records, patch: int) -> dict:
    """``predict_volume`` on one volume, as ``predict`` runs a Kaggle volume (the default model,
    untrained: the time is the same)."""
    import torch

    from vesuvius_lab.config import Config, DataConfig
    from vesuvius_lab.inference import predict_volume
    from vesuvius_lab.io import read_volume
    from vesuvius_lab.model import build_model

    config = Config(data=DataConfig(patch_size=[patch] * 3))
    model = build_model(config.model).eval()
    image = read_volume(records[0].image)
    t0 = time.perf_counter()
    predict_volume(model, image, config, torch.device("cpu"))
    return {"predict_s_per_volume": round(time.perf_counter() - t0, 2), "model_features": config.model.features,
            "patch": [patch] * 3, "torch_threads": torch.get_num_threads()}


def run(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    sizes = sorted({int(v) for v in args.volumes.split(",")})
    jobs = args.jobs or os.cpu_count() or 1
    all_records = bench_records(args.shape, max(sizes))  # synthesised once, before any timing
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=all_records[0].image.parent.parent.parent))
    result: dict = {"volume_shape": [args.shape] * 3, "jobs": jobs, "cores": os.cpu_count(), "repeats": args.repeats,
                    "load_average_before": list(os.getloadavg()), "by_volumes": {}}
    try:
        bar = tqdm(total=len(sizes) * args.repeats * 2, desc="bench scale: prepare", unit="run")
        for n in sizes:
            records = all_records[:n]
            one, many, cpu_one, cpu_many = [], [], [], []
            for _ in range(args.repeats):
                wall, cpu = _prepare_once(records, 1, work / "one")
                one.append(wall), cpu_one.append(cpu)
                bar.update(1)
                wall, cpu = _prepare_once(records, jobs, work / "many")
                many.append(wall), cpu_many.append(cpu)
                bar.update(1)
            tiff = sum(r.image.stat().st_size + r.label.stat().st_size for r in records)
            cache_bytes = _du(work / "many") - sum(f.stat().st_size for f in (work / "many").glob("*.json"))
            result["by_volumes"][str(n)] = {
                "prepare_s_per_volume_1_job": round(statistics.median(one) / n, 2),
                f"prepare_s_per_volume_{jobs}_jobs": round(statistics.median(many) / n, 2),
                "prepare_speedup": round(statistics.median(one) / statistics.median(many), 2),
                # CPU seconds per volume in its process: equal with 1 and N jobs when the work
                # parallelises cleanly; a busy machine shows in wall/CPU > 1 (see the load averages)
                "prepare_cpu_s_per_volume_1_job": round(statistics.median(cpu_one), 2),
                f"prepare_cpu_s_per_volume_{jobs}_jobs": round(statistics.median(cpu_many), 2),
                "cache_bytes": cache_bytes,
                "tiff_bytes": tiff,
                "cache_over_tiff": round(cache_bytes / tiff, 3),
            }
        bar.close()
        n = max(sizes)
        npy = write_memmaps(work / "many", all_records, work / "npy")
        npy_bytes = _du(npy)
        os.sync()  # the memmaps' writeback would slow whichever child runs first
        runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
        for i in tqdm(range(args.repeats), desc="bench scale: patches", unit="run"):
            for kind in ("ours", "baseline") if i % 2 == 0 else ("baseline", "ours"):  # neither always first
                runs[kind].append(_spawn(kind, args, n, work / "many", npy))
        ours, base = runs["ours"], runs["baseline"]
        med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
        result["patches"] = {
            "patch": [args.patch] * 3,
            "volumes": n,
            "ours_patches_per_s": round(med(ours, "patches_per_s"), 3),
            "memmap_patches_per_s": round(med(base, "patches_per_s"), 3),
            "ratio": round(med(ours, "patches_per_s") / med(base, "patches_per_s"), 3),
            "ours_peak_rss_mb_per_worker": round(med(ours, "peak_rss_mb"), 1),
            "memmap_peak_rss_mb_per_worker": round(med(base, "peak_rss_mb"), 1),
            "chunk_cache_mb": args.chunk_cache_mb,
            "chunk_cache_hit_rate": round(med(ours, "chunk_cache_hit_rate"), 3),
            "npy_cache_bytes": npy_bytes,
            "runs": {"ours": ours, "memmap": base},
        }
        if not args.no_predict:
            result["predict"] = _predict_seconds(all_records, args.patch)
        biggest = result["by_volumes"][str(n)]
        gvox = args.shape**3 * n / 1e9
        per_gvox_one = biggest["prepare_s_per_volume_1_job"] * n / gvox
        per_gvox_many = biggest[f"prepare_s_per_volume_{jobs}_jobs"] * n / gvox
        result["kaggle_extrapolation"] = {
            "volumes": KAGGLE_VOLUMES,
            "gvoxels": args.kaggle_gvoxels,
            "prepare_min_1_job": round(per_gvox_one * args.kaggle_gvoxels / 60, 1),
            f"prepare_min_{jobs}_jobs": round(per_gvox_many * args.kaggle_gvoxels / 60, 1),
            "cache_gb": round(biggest["cache_over_tiff"] * KAGGLE_TIFF_GB, 1),
            "npy_cache_gb": round(npy_bytes / (args.shape**3 * n) * args.kaggle_gvoxels, 1),
            "tiff_gb": KAGGLE_TIFF_GB,
        }
        if "predict" in result:
            result["kaggle_extrapolation"]["predict_h"] = round(
                result["predict"]["predict_s_per_volume"] / args.shape**3 * args.kaggle_gvoxels * 1e9 / 3600, 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_average_after"] = list(os.getloadavg())
    return result


if __name__ == "__main__":
    kind, patch, n, warmup, shape, volumes, cache_dir, npy, *mb = sys.argv[1:10]
    print(json.dumps(child(kind, int(patch), int(n), int(warmup), int(shape), int(volumes), cache_dir, npy, float(*mb or [256]))))
