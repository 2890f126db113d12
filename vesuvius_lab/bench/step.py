"""The training step of each recipe in fp32, bf16 and fp16, the same on CPU and GPU: seconds, memory, data wait.

For each ``--config`` (a recipe) at its own patch size and batch size, the real step (forward, the
recipe's loss terms, backward, optimizer update and EMA: ``training.engine``) runs with the recipe's
data loader over the bench's synthetic volumes, once per precision (fp32 is the in-run baseline;
bf16 and fp16 where the device computes in them under autocast, else "unsupported"; on the CPU
too, which training does not do). Each precision reports the median of ``--steps`` timed steps
after ``--warmup``, the peak memory of its run (the CUDA allocator's peak on a GPU; on the CPU the
process's peak RSS, reset at the run's start, data workers not counted) and the share of the step
spent waiting for data with the recipe's workers. Then: whether each AMP loss agrees with fp32's on
the same batch and the same initial weights (step 0, where every-N-steps terms run) within ``TOLERANCE``,
and the loader alone with augmentation in the workers against batched on the device
(``augment.where``), patches/s delivered to the device. Every precision starts from the same seeded
weights and draws the same batches.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from vesuvius_lab.augment import apply_batch
from vesuvius_lab.bench.input_pipeline import bench_records, peak_rss_mb
from vesuvius_lab.cache import VolumeCache
from vesuvius_lab.config import Config, load_config
from vesuvius_lab.data import patch_dataset
from vesuvius_lab.device import autocast_supported, default_device, memory_mb
from vesuvius_lab.loader import build_loader
from vesuvius_lab.losses import TERMS
from vesuvius_lab.model import build_model, parameter_count
from vesuvius_lab.training.engine import build_engine, forward_backward, optimizer_update

RECIPES = ("configs/exp001_full.yaml", "configs/kaggle_resenc_128.yaml")  # the README's recipes
PRECISIONS = ("fp32", "bf16", "fp16")
# |loss_amp - loss_fp32| <= TOLERANCE * |loss_fp32|: bf16 keeps 8 significant bits (a relative step
# of 3.9e-3), fp16 11 (4.9e-4); a loss summed over every voxel of the batch gets 10-20 such steps
TOLERANCE = {"bf16": 5e-2, "fp16": 1e-2}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, action="append",
                   help=f"a recipe's run config; repeat for several (default: {' and '.join(RECIPES)})")
    p.add_argument("--patch", type=int, nargs="+", metavar="N",
                   help="patch size for every config instead of its own (one edge, or Z Y X)")
    p.add_argument("--batch-sizes", help="comma-separated batch sizes (default: each config's train_batch_size)")
    p.add_argument("--precisions", default=",".join(PRECISIONS),
                   help="comma-separated, fp32 (the baseline) first (default fp32,bf16,fp16; a CPU's fp16 is slow)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per precision (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first, at least 1 (default 2)")
    p.add_argument("--augment-batches", type=int, default=6, help="timed loader batches per augment.where (default 6)")
    p.add_argument("--shape", type=int, default=160, help="edge of the synthetic volumes (default 160)")
    p.add_argument("--volumes", type=int, default=2, help="synthetic volumes (default 2)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides for every config")


def _reset_peak(device: torch.device) -> float:
    """Start a run's memory peak; returns the memory held at its start (MB)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS
    return peak_rss_mb()


def _peak_mb(device: torch.device) -> float:
    return memory_mb(device) if device.type == "cuda" else peak_rss_mb()


def time_steps(cfg: Config, records, cache: VolumeCache, device: torch.device, amp: str, warmup: int,
               steps: int) -> dict:
    """``warmup`` + ``steps`` real steps in precision ``amp`` with the config's loader; the medians."""
    cfg = replace(cfg, training=replace(cfg.training, train_iterations_per_epoch=warmup + steps,
                                        persistent_workers=False))
    dataset = patch_dataset(cfg, records, cache)
    start_mb = _reset_peak(device)
    engine = build_engine(cfg, dataset, device, amp="off" if amp == "fp32" else amp)
    batches = iter(build_loader(dataset, cfg, num_steps=warmup + steps))
    totals, waits, losses = [], [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        fb = forward_backward(engine, batches, i)
        optimizer_update(engine, fb.finite)
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            totals.append(elapsed)
            waits.append(fb.data_wait_s)
            losses.append(fb.loss)
    del batches
    step = statistics.median(totals)
    return {
        "median_s": step,
        "compute_median_s": statistics.median(t - w for t, w in zip(totals, waits, strict=True)),
        "data_wait_share": sum(waits) / sum(totals),
        "samples_per_s": cfg.training.train_batch_size * cfg.optim.accumulate / step,
        "peak_memory_mb": _peak_mb(device),
        "memory_at_start_mb": start_mb,
        "timed_steps": len(totals),
        "losses_finite": all(math.isfinite(v) for v in losses),
    }


def loss_agreement(cfg: Config, records, cache: VolumeCache, device: torch.device, precisions: list[str]) -> dict:
    """Step 0's loss in each precision on one batch with the same initial weights (no update)."""
    dataset = patch_dataset(replace(cfg, training=replace(cfg.training, train_iterations_per_epoch=1)), records, cache)
    batch = next(iter(build_loader(dataset, replace(cfg, training=replace(cfg.training, workers=0)), num_steps=1)))
    out: dict = {}
    for amp in precisions:
        engine = build_engine(cfg, dataset, device, amp="off" if amp == "fp32" else amp)  # seeded: same weights
        torch.manual_seed(0)  # the same device augmentation of the batch
        fb = forward_backward(engine, iter([batch]), 0)
        out[amp] = {"loss": fb.loss, "terms": {k: float(v) for k, v in fb.terms.items()}}
    base = out["fp32"]["loss"]
    for amp in precisions[1:]:
        rel = abs(out[amp]["loss"] - base) / max(abs(base), 1e-12)
        out[amp].update(relative_difference=rel, tolerance=TOLERANCE[amp], agrees=rel <= TOLERANCE[amp])
    return out


def augment_throughput(cfg: Config, records, cache: VolumeCache, device: torch.device, count: int) -> dict:
    """The loader alone (the config's workers) delivering batches ready for the model, augmented in
    the workers or batched on the device; patches/s after each worker's first batch."""
    out: dict = {}
    workers = max(0, cfg.training.workers)
    for where in ("worker", "device"):
        c = replace(cfg, augment=replace(cfg.augment, where=where),
                    training=replace(cfg.training, persistent_workers=False))
        dataset = patch_dataset(c, records, cache)
        loader = iter(build_loader(dataset, c, num_steps=count + max(1, workers)))

        def deliver() -> float:
            """One batch on the device, ready for the model; returns the seconds spent augmenting there."""
            batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
            if not dataset.device_augment:
                return 0.0
            t1 = time.perf_counter()
            apply_batch(batch, dataset.patch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - t1

        for _ in range(max(1, workers)):  # start-up (each worker's first batch, the device's first call): untimed
            deliver()
        t0 = time.perf_counter()
        on_device = sum(deliver() for _ in range(count))
        seconds = time.perf_counter() - t0
        del loader
        out[where] = {"patches_per_s": count * c.training.train_batch_size / seconds,
                      "device_s_per_batch": on_device / count}
    out["device_vs_worker"] = round(out["device"]["patches_per_s"] / out["worker"]["patches_per_s"], 3)
    out.update(workers=workers, batches=count)
    return out


def bench_config(path: Path, overrides: list[str], batch_size: int | None, precisions: list[str], records,
                 cache: VolumeCache, device: torch.device, args: argparse.Namespace) -> dict:
    cfg = load_config(path, overrides)
    if batch_size is not None:
        cfg = replace(cfg, training=replace(cfg.training, train_batch_size=batch_size))
    patch_dataset(cfg, records, cache).prepare(progress=False)  # its targets (fg_points) before any timing
    supported = [p for p in precisions if autocast_supported("off" if p == "fp32" else p, device)]
    steps: dict = {}
    for amp in precisions:
        steps[amp] = time_steps(cfg, records, cache, device, amp, args.warmup, args.steps) \
            if amp in supported else "unsupported"
    fp32 = steps["fp32"]
    for amp in supported[1:]:
        steps[amp].update(speedup_vs_fp32=round(fp32["median_s"] / steps[amp]["median_s"], 3),
                          memory_vs_fp32=round(steps[amp]["peak_memory_mb"] / fp32["peak_memory_mb"], 3))
    agreement = loss_agreement(cfg, records, cache, device, supported)
    return {
        "config": str(path),
        "patch": list(cfg.data.patch_size),
        "batch_size": cfg.training.train_batch_size,
        "accumulate": cfg.optim.accumulate,
        "workers": cfg.training.workers,
        "augment_where": cfg.augment.where,
        "model": cfg.model.arch,
        "parameters": parameter_count(build_model(cfg.model, cfg.data.patch_size)),
        "loss_terms": [t for t in TERMS if getattr(cfg.loss, t) > 0],
        "configured_amp": cfg.optim.amp,
        "steps": steps,
        "loss_agreement": {**agreement, **{p: "unsupported" for p in precisions if p not in supported}},
        "augmentation": augment_throughput(cfg, records, cache, device, args.augment_batches),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def run(args: argparse.Namespace) -> dict:
    from vesuvius_lab.errors import ConfigError

    if args.warmup < 1 or args.steps < 1 or args.augment_batches < 1:
        raise ConfigError("bench step: --warmup, --steps and --augment-batches must be at least 1")
    configs = args.config or [Path(p) for p in RECIPES]
    overrides = list(args.overrides)
    if args.patch:
        if len(args.patch) not in (1, 3):
            raise ConfigError("bench step: --patch takes one edge or Z Y X")
        overrides.append(f"data.patch_size={list(args.patch) * (3 // len(args.patch))}")
    precisions = [p.strip() for p in args.precisions.split(",")]
    if precisions[0] != "fp32" or not set(precisions) <= set(PRECISIONS) or len(set(precisions)) < len(precisions):
        raise ConfigError(f"bench step: --precisions {args.precisions}: fp32 first, then any of bf16, fp16")
    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [None]
    for path in configs:
        load_config(path, overrides)  # every config's problems before any timing
    device = default_device()
    records = bench_records(args.shape, args.volumes)
    cache = VolumeCache()
    results = [bench_config(path, overrides, b, precisions, records, cache, device, args)
               for path in configs for b in sizes]
    return {
        "device": _device_name(device),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "baseline": "fp32 in the same run; speedup_vs_fp32 = fp32 median_s / the precision's median_s, "
                    "memory_vs_fp32 = the precision's peak_memory_mb / fp32's",
        "peak_memory": "torch.cuda.max_memory_allocated over the run" if device.type == "cuda" else
                       "the process's peak RSS (VmHWM) over the run, reset at its start (memory_at_start_mb was "
                       "held then); data workers not counted",
        "tolerance": {**TOLERANCE, "rule": "agrees: |loss - fp32 loss| <= tolerance * |fp32 loss|, step 0, "
                                           "same batch, same initial weights"},
        "data": {"synthetic_volumes": args.volumes, "shape": [args.shape] * 3},
        "warmup": args.warmup,
        "runs": results,
    }
