"""Input-pipeline throughput per core and peak RSS per worker: ours, nnU-Net v2's augmentation, MONAI.

Each pipeline runs in its own single-threaded child process (one data worker, one core) over the
same synthetic 320^3 volumes; the runs interleave (ours, nnU-Net, MONAI, ours, ...) and each figure
is the median over ``--repeats``, each ratio the median of the same-repeat ratios.

- ours: ``configs/nnunet_aug.yaml`` (nnU-Net's probabilities and ranges in our keys): cached
  targets, index-addressed sampling, source-box reads, one resampling pass of image, label,
  skeleton and distance. ``ours_crop_only``: the same draws with ``augment.where: device``, i.e.
  what a worker does when the training device augments the batch.
- nnunet: nnU-Net v2's 3D training transforms (``nnunet_transforms``), composed from
  ``batchgeneratorsv2`` as nnUNetTrainer.get_training_transforms does, fed the crops ours draws
  (same volume, same centre), read at nnU-Net's enlarged initial patch size from its unpacked
  dataset format (a z-scored float32 image and an int16 segmentation in ``.npy`` files, memory-mapped).
  Its deep-supervision target downsampling is left out (ours does that in the loss, on the device);
  nnU-Net computes no skeleton or distance, ours does: both favour the baseline.
- monai: the same per-patch work the MONAI way: RandCropByPosNegLabeld, RandAffined,
  Rand3DElasticd, flips and intensity transforms, then the skeleton and scipy EDT of every patch (as
  the run this product replaces did), its volumes already decoded in RAM.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PATCHES = {"128x128x128": (128, 128, 128), "72x136x136": (72, 136, 136)}
KINDS = ("ours", "ours_crop_only", "nnunet", "monai")
CONFIG = "configs/nnunet_aug.yaml"  # ours, at nnU-Net's probabilities
# nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size, 3D without dummy 2D
NNUNET_ROTATION = math.radians(30)
NNUNET_INITIAL_SCALE = 0.85  # the scale its loader's crop is enlarged for (nnU-Net's own todo: not the 0.7 it scales by)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=int, default=30,
                   help="timed patches per run for ours and nnU-Net, the same draws (default 30)")
    p.add_argument("--baseline-samples", type=int, default=6, help="timed patches per run for MONAI (default 6)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of every pipeline (default 3)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--shape", type=int, default=320, help="volume edge of the synthetic data (default 320)")
    p.add_argument("--volumes", type=int, default=2)
    p.add_argument("--patches", default=",".join(PATCHES), help="comma-separated patch sizes ZxYxX")
    p.add_argument("--config", type=Path, default=Path(CONFIG), help=f"ours' augmentation (default {CONFIG})")
    p.add_argument("--pipelines", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")


def bench_records(shape: int, volumes: int):
    """Synthetic volumes for benchmarking, written once under the cache directory and reused."""
    from vesuvius_lab.cache import default_cache_dir
    from vesuvius_lab.layout import discover
    from vesuvius_lab.synth import MARKER, synth

    root = default_cache_dir() / "bench" / f"synth{shape}x{volumes}"
    if not (root / MARKER).is_file():
        synth(root, volumes=volumes, shape=(shape,) * 3, seed=11, scrolls=min(volumes, 4), test_volumes=0, overwrite=True)
    return discover(root)[0]


def _config(path: Path, patch, crop_only: bool = False):
    from dataclasses import replace

    from vesuvius_lab.config import load_config

    config = load_config(path, [f"data.patch_size=[{','.join(map(str, patch))}]"])
    return replace(config,
                   augment=replace(config.augment, where="device" if crop_only else "worker"),
                   training=replace(config.training, train_batch_size=1, train_iterations_per_epoch=10**6))


def _dataset(config, records):
    from vesuvius_lab.cache import VolumeCache
    from vesuvius_lab.data import patch_dataset

    return patch_dataset(config, records, VolumeCache())


def nnunet_initial_patch(patch) -> tuple[int, ...]:
    """The box nnU-Net's 3D loader reads so that rotation and scaling find data (nnunetv2's
    get_patch_size: the patch's edge vector rotated by the largest angle about each axis in turn, as
    batchgenerators' rotate_coords_3d multiplies (row vector times matrix), the largest extent per
    axis over the scale 0.85)."""
    c, s = math.cos(NNUNET_ROTATION), math.sin(NNUNET_ROTATION)
    rotations = (
        np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    )
    edges = np.asarray(patch, dtype=float)
    extent = np.max(np.abs(np.stack([edges] + [edges @ r for r in rotations])), axis=0)
    return tuple(int(v) for v in extent / NNUNET_INITIAL_SCALE)  # truncated, as nnU-Net's astype(int)


def nnunet_transforms(patch):
    """nnU-Net v2's default 3D training transforms (nnUNetTrainer.get_training_transforms for an
    isotropic patch: no dummy 2D, mirroring on all axes, no cascade, no regions, no mask), without the
    deep-supervision downsampling; every value is nnU-Net's own."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

    def gamma(invert: int, p: float):
        return RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=invert,
                                              synchronize_channels=False, p_per_channel=1, p_retain_stats=1),
                               apply_probability=p)

    return ComposeTransforms([
        SpatialTransform(list(patch), patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                         p_rotation=0.2, rotation=(-NNUNET_ROTATION, NNUNET_ROTATION), p_scaling=0.2,
                         scaling=(0.7, 1.4), p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5, benchmark=True),
                        apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=None,
                                                       allowed_channels=None, p_per_channel=0.5),
                        apply_probability=0.25),
        gamma(invert=1, p=0.1),
        gamma(invert=0, p=0.3),
        MirrorTransform(allowed_axes=(0, 1, 2)),
        RemoveLabelTansform(-1, 0),
    ])


def crop_plan(config_path: Path, records, patch, count: int) -> list[tuple[int, list[float]]]:
    """(volume index, patch centre in volume voxels) of ours' first ``count`` draws, for nnU-Net to crop."""
    ds = _dataset(_config(config_path, patch), records)
    ds.prepare(progress=False)
    plan = []
    for g in range(count):
        s = ds.draw(g)
        centre = (s["centre"] + s["box_origin"]).tolist()
        plan.append((int(s["volume_index"]), centre))
    return plan


def nnunet_volumes(records) -> list[Path]:
    """Each volume in nnU-Net's unpacked format, written once: ``{id}.npy`` (1, Z, Y, X) float32 z-scored
    and ``{id}_seg.npy`` (1, Z, Y, X) int16."""
    from vesuvius_lab.cache import VolumeCache, default_cache_dir

    root = default_cache_dir() / "bench" / "nnunet"
    root.mkdir(parents=True, exist_ok=True)
    out = []
    cache = VolumeCache()
    for r in records:
        path = root / f"{r.id}.npy"
        seg = root / f"{r.id}_seg.npy"
        if not (path.is_file() and seg.is_file()):
            v = cache.load(r)
            image = np.asarray(v.image, dtype=np.float32)
            image = (image - image.mean()) / max(float(image.std()), 1e-8)
            for target, array in ((path, image), (seg, np.asarray(v.label, dtype=np.int16))):
                tmp = target.with_suffix(".tmp.npy")
                np.save(tmp, array[None])
                tmp.replace(target)
        out.append(path)
    return out


def _ours(args, records, patch, crop_only: bool = False):
    from vesuvius_lab.augment import warm_up

    ds = _dataset(_config(args.config, patch, crop_only), records)
    t0 = time.perf_counter()
    ds.prepare(progress=False)
    warm_up()  # a worker's one-off kernel load, whether or not the warm-up draws transform a patch
    return (lambda g: ds[g]), {"targets_prepare_s": time.perf_counter() - t0}


def _nnunet(args, records, patch):
    """nnU-Net's loader per sample: the initial-patch box around ours' centre from the memory-mapped
    arrays (image padded with 0, segmentation with -1, as nnU-Net pads), then its transforms."""
    import torch

    from vesuvius_lab.augment import read_box

    plan = json.loads(Path(args.crops).read_text())
    arrays = [(np.load(p, mmap_mode="r")[0], np.load(p.with_name(p.stem + "_seg.npy"), mmap_mode="r")[0])
              for p in nnunet_volumes(records)]
    initial = np.asarray(nnunet_initial_patch(patch))
    transforms = nnunet_transforms(patch)
    np.random.seed(0)
    torch.manual_seed(0)

    def one(g):
        vi, centre = plan[g]
        image, seg = arrays[vi]
        lo = np.floor(np.asarray(centre) - (initial - 1) / 2).astype(int)
        with torch.no_grad():
            data = torch.from_numpy(read_box(image, lo, lo + initial, 0)[None]).float()
            segmentation = torch.from_numpy(read_box(seg, lo, lo + initial, -1)[None]).to(torch.int16)
            return transforms(image=data, segmentation=segmentation)

    return one, {"initial_patch": initial.tolist()}


def _monai(args, records, patch):
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


def make_pipeline(kind: str, args, records, patch):
    """(sample g -> one augmented patch, extra figures) for one pipeline, ready to time."""
    if kind in ("ours", "ours_crop_only"):
        return _ours(args, records, patch, crop_only=kind == "ours_crop_only")
    return {"nnunet": _nnunet, "monai": _monai}[kind](args, records, patch)


def child(kind: str, patch: tuple[int, int, int], n: int, args) -> dict:
    """Run one pipeline in this process, single-threaded, and measure it."""
    import torch

    torch.set_num_threads(1)
    fn, extra = make_pipeline(kind, args, bench_records(args.shape, args.volumes), patch)
    for g in range(args.warmup):
        fn(g)
    times = []
    for g in range(args.warmup, args.warmup + n):
        t0 = time.perf_counter()
        fn(g)
        times.append(time.perf_counter() - t0)
    return {"patches_per_s": n / sum(times), "median_s": statistics.median(times), "samples": n,
            "peak_rss_mb": peak_rss_mb(), **extra}


def _spawn(kind, patch, n, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "vesuvius_lab.bench.input_pipeline", kind, "x".join(map(str, patch)), str(n),
           json.dumps({k: str(v) for k, v in vars(args).items() if k in CHILD_ARGS})]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench child {kind} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


CHILD_ARGS = {"warmup": int, "shape": int, "volumes": int, "config": Path, "crops": str}


def _median_run(runs: list[dict]) -> dict:
    """Medians over the repeats, and each repeat's patches/s."""
    out = {"patches_per_s_per_core": round(statistics.median(r["patches_per_s"] for r in runs), 3),
           "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in runs), 1),
           "median_s_per_patch": round(statistics.median(r["median_s"] for r in runs), 4),
           "repeats": [round(r["patches_per_s"], 3) for r in runs], "samples_per_repeat": runs[0]["samples"]}
    out.update({k: v for k, v in runs[0].items() if k in ("initial_patch",)})
    return out


def run(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    from vesuvius_lab.config import load_config
    from vesuvius_lab.errors import VLabError

    kinds = [k.strip() for k in args.pipelines.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or "ours" not in kinds:
        raise VLabError(f"--pipelines: {', '.join(unknown) or 'ours missing'} (choose among {', '.join(KINDS)}, with ours)")
    if "nnunet" in kinds and importlib.util.find_spec("batchgeneratorsv2") is None:
        raise VLabError("bench data: batchgeneratorsv2 (nnU-Net v2's augmentation) is not installed: `make install` "
                        "installs pyproject's bench extra with --no-deps; or leave nnunet out of --pipelines")
    args.config = args.config.resolve()
    load_config(args.config)  # the config's problems before any timing
    records = bench_records(args.shape, args.volumes)  # synthesize once, before any timing
    patches = [tuple(int(v) for v in p.split("x")) for p in args.patches.split(",")]
    if "nnunet" in kinds:
        nnunet_volumes(records)
    runs: dict[tuple, dict[str, list[dict]]] = {p: {k: [] for k in kinds} for p in patches}
    with tempfile.TemporaryDirectory() as tmp:
        crops = {}
        for patch in patches:
            crops[patch] = Path(tmp) / f"{'x'.join(map(str, patch))}.json"
            crops[patch].write_text(json.dumps(crop_plan(args.config, records, patch, args.warmup + args.samples)))
        jobs = [(r, p, k) for r in range(args.repeats) for p in patches for k in kinds]  # interleaved
        for _, patch, kind in tqdm(jobs, desc="bench data", unit="run"):
            n = args.baseline_samples if kind == "monai" else args.samples
            args.crops = str(crops[patch])
            runs[patch][kind].append(_spawn(kind, patch, n, args))
    by_patch = {}
    for patch, per_kind in runs.items():
        entry = {kind: _median_run(rs) for kind, rs in per_kind.items()}
        ours = per_kind["ours"]
        entry["ratios"] = {
            f"ours_vs_{kind}": round(statistics.median(
                a["patches_per_s"] / b["patches_per_s"] for a, b in zip(ours, per_kind[kind], strict=True)), 2)
            for kind in kinds if kind in ("nnunet", "monai")}
        if "ours_crop_only" in kinds and "nnunet" in kinds:
            entry["ratios"]["ours_crop_only_vs_nnunet"] = round(statistics.median(
                a["patches_per_s"] / b["patches_per_s"]
                for a, b in zip(per_kind["ours_crop_only"], per_kind["nnunet"], strict=True)), 2)
        by_patch["x".join(map(str, patch))] = entry
    headline_key = "128x128x128" if "128x128x128" in by_patch else next(iter(by_patch))
    headline = by_patch[headline_key]
    return {
        "patch": headline_key,
        **{f"{kind}_patches_per_s_per_core": headline[kind]["patches_per_s_per_core"] for kind in kinds},
        **headline["ratios"],
        "config": str(args.config),
        "volume_shape": [args.shape] * 3,
        "repeats": args.repeats,
        "per_core": ("one single-threaded process per pipeline and run (one data worker on one core); patches/s = "
                     "timed patches / their seconds, the median over interleaved repeats; ratios: the median of "
                     "the same-repeat ratios"),
        "by_patch": by_patch,
    }


if __name__ == "__main__":
    kind, patch, n, raw = sys.argv[1:5]
    ns = argparse.Namespace(**{k: CHILD_ARGS[k](v) for k, v in json.loads(raw).items()})
    print(json.dumps(child(kind, tuple(int(v) for v in patch.split("x")), int(n), ns)))
