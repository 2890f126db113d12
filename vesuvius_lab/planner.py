"""Steps per epoch and batch size from timings measured on this machine.

Steps per epoch guessed from a few timed steps are far off: the real model, losses, data pipeline
and config are timed for each candidate batch size (warm-up, then N
steps split into data wait and compute), one validation pass and one checkpoint are timed, and the
plan follows: the batch size with the best samples/s inside a memory headroom, steps per epoch for
a target epoch duration, epochs for a budget, coverage, validation cadence, a forecast of the wall
time, three presets (conservative, aggressive, time-constrained), and a warning for each pitfall.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

from vesuvius_lab.config import Config, rewrite_config
from vesuvius_lab.data import Data, epoch_layout, open_data, prepare_demo_data
from vesuvius_lab.device import default_device, memory_capacity_mb, memory_mb
from vesuvius_lab.evaluate import score_records
from vesuvius_lab.io import atomic_write_text
from vesuvius_lab.leaderboard import warm_up as metrics_warm_up
from vesuvius_lab.loader import build_loader
from vesuvius_lab.sampling import Coverage
from vesuvius_lab.timefmt import format_duration
from vesuvius_lab.training.budget import (
    Costs, command_start, epoch_forecast_s, fit_plan, forecast_band_s, margin_s, remaining_s,
)
from vesuvius_lab.training.distributed import Distributed, setup_distributed
from vesuvius_lab.training.engine import build_engine, forward_backward, optimizer_update
from vesuvius_lab.training.pace import DATA_BOUND
from vesuvius_lab.training.run_dir import save_checkpoint
from vesuvius_lab.training.schedule import Schedule

COVERAGE_MIN, EPOCH_MAX_H = 0.5, 12.0
WAIT_SHARE = 0.05  # the data wait a worker count must keep under, as a share of the step


@dataclass
class BatchTiming:
    """N timed optimizer steps at one per-rank batch size (the slowest rank's times)."""

    batch_size: int  # per rank and micro-batch (training.train_batch_size)
    step_s: float = math.nan  # mean: an epoch is a sum of steps
    step_median_s: float = math.nan
    data_wait_s: float = math.nan
    compute_s: float = math.nan
    step_spread_s: float = math.nan  # interquartile range of the step time
    samples_per_s: float = math.nan  # over all ranks and micro-batches
    peak_memory_mb: float = math.nan
    first_batch_s: float = math.nan  # worker start-up and first batch: paid once per run
    out_of_memory: bool = False
    timed_steps: int = 0  # steps behind these numbers (fewer than asked when a step outlasts max_seconds)


@dataclass
class WorkerTiming:
    """The data loader alone (no model) with this many workers per rank, in its steady state."""

    workers: int
    batch_s: float  # seconds between micro-batches delivered (the slowest rank)
    step_data_s: float  # one optimizer step's micro-batches on one rank: optim.accumulate x batch_s
    compute_s: float  # the measured compute of a step, what the loader must keep up with
    wait_share: float  # the data wait this count leaves, as a share of the step

    @property
    def keeps_up(self) -> bool:
        return self.wait_share < WAIT_SHARE


@dataclass
class Measurements:
    device: str
    timings: list[BatchTiming]
    val_s: float  # one validation pass over the validation split
    checkpoint_s: float
    memory_capacity_mb: float
    train_records: int
    val_records: int
    unique_patches: int
    workers: int
    seconds: float = 0.0  # how long measuring took
    world_size: int = 1  # ranks that were measured side by side (torchrun)
    worker_timings: list[WorkerTiming] = field(default_factory=list)  # 1, 2, ... workers per rank
    cores: int = 0  # CPU cores this process may use
    startup_s: float = 0.0  # a training command's start: its imports and the data preparation


@dataclass
class Preset:
    name: str
    train_iterations_per_epoch: int
    max_epochs: int
    forecast_epoch_s: float
    coverage: float
    reason: str


@dataclass
class Plan:
    train_batch_size: int  # per rank and micro-batch, as the config key
    global_batch: int  # samples per optimizer step: batch x ranks x optim.accumulate
    train_iterations_per_epoch: int  # optimizer steps
    max_epochs: int
    val_every_epochs: int
    samples_per_epoch: int
    coverage: float
    forecast_epoch_s: float  # a typical epoch: steps, validation and checkpoints
    forecast_first_epoch_s: float  # plus worker start-up
    forecast_run_s: float
    target_epoch_s: float
    explanation: list[str]
    warnings: list[str]
    presets: list[Preset]
    measurements: Measurements
    lr_note: str = ""
    workers: int | None = None  # the measured recommendation (training.workers); None: not measured
    workers_note: str = ""
    budget_hours: float | None = None  # training.time_budget_hours: the run is planned to end inside it
    total_steps: int = 0
    last_epoch_steps: int = 0  # a budget's last epoch takes the time left: longer or shorter
    forecast_last_epoch_s: float = 0.0
    forecast_band_s: float = 0.0  # the spread of the run's end (step-time spread, validation)

    def to_dict(self) -> dict:
        return asdict(self)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(exc).lower()


def _layout_for(config: Config, m: Measurements, batch_size: int, steps: int):
    """The trainer's epoch arithmetic for this batch size and step count."""
    cfg = replace(config, training=replace(config.training, train_batch_size=batch_size,
                                           train_iterations_per_epoch=steps, patches_per_volume=None))
    return epoch_layout(cfg, max(m.train_records, 1), m.world_size)


def time_batch_size(config: Config, data: Data, batch_size: int, device: torch.device, warmup: int, steps: int,
                    ddp: Distributed | None = None, deadline: float | None = None) -> BatchTiming:
    """Time the real training step (every rank at once under torchrun) with the configured loader.

    Past ``deadline`` (a ``perf_counter`` time) it stops once one step after the first is timed: a
    128^3 residual U-Net takes minutes per step on a laptop CPU."""
    ddp = ddp or Distributed()
    cfg = replace(config, training=replace(config.training, train_batch_size=batch_size,
                                           train_iterations_per_epoch=warmup + steps, persistent_workers=False))
    timing = BatchTiming(batch_size)
    dataset = data.patch_dataset(cfg, world_size=ddp.world)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        engine = build_engine(cfg, dataset, device, ddp.world, ddp.local_rank)
        batches = iter(build_loader(dataset, cfg, rank=ddp.rank, num_steps=warmup + steps))
        totals, waits, late = [], [], False
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            fb = forward_backward(engine, batches, i)
            optimizer_update(engine, fb.finite)
            elapsed = time.perf_counter() - t0
            if i == 0:
                timing.first_batch_s = fb.data_wait_s
            if i >= warmup or (late and i >= 1):  # the first step (worker start-up) is never timed
                totals.append(elapsed)
                waits.append(fb.data_wait_s)
            (late,) = ddp.broadcast([deadline is not None and time.perf_counter() > deadline])
            if late and totals:
                break
        del batches
    except RuntimeError as exc:
        if not _is_oom(exc):
            raise
        timing.out_of_memory = True
        return timing
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # every rank waits for the slowest at each step's gradient sync: its times are the step's
    ranks = ddp.gather((totals, waits, memory_mb(device)))
    totals = [max(r[0][i] for r in ranks) for i in range(len(totals))]
    waits = [max(r[1][i] for r in ranks) for i in range(len(waits))]
    q = statistics.quantiles(totals, n=4) if len(totals) > 1 else [totals[0]] * 3
    timing.step_s = statistics.fmean(totals)
    timing.step_median_s = statistics.median(totals)
    timing.data_wait_s = statistics.median(waits)
    timing.compute_s = statistics.median(t - w for t, w in zip(totals, waits, strict=True))
    timing.step_spread_s = q[2] - q[0]
    timing.samples_per_s = dataset.layout.global_batch / timing.step_s
    timing.peak_memory_mb = max(r[2] for r in ranks)
    timing.timed_steps = len(totals)
    return timing


def startup_seconds(data_s: float) -> float:
    """What a training command spends before its first step: its imports and the data preparation
    (``data_s``). A fresh ``plan`` process has just paid both; a long-lived one (a notebook's
    kernel) times the imports in a fresh interpreter."""
    age = time.time() - command_start()
    if age < data_s + 120:
        return age
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import vesuvius_lab.training.loop"], check=False, capture_output=True)
    return time.perf_counter() - t0 + data_s


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def time_workers(config: Config, data: Data, batch_size: int, compute_s: float, ddp: Distributed | None = None,
                 batches: int = 8, max_seconds: float = 30.0) -> list[WorkerTiming]:
    """Time the data loader alone with 1, 2, ... workers per rank (up to the cores each rank has),
    every rank at once as in training, against the measured compute time of a step; stops at the
    first count whose data wait stays under 5 % of the step (the smallest that keeps up)."""
    ddp = ddp or Distributed()
    most = max(1, usable_cores() // ddp.world)
    accumulate = config.optim.accumulate
    out: list[WorkerTiming] = []
    started = time.perf_counter()
    for workers in range(1, most + 1):
        count = max(batches, 2 * workers + 2)
        cfg = replace(config, training=replace(config.training, train_batch_size=batch_size, workers=workers,
                                               persistent_workers=False))
        dataset = data.patch_dataset(cfg, world_size=ddp.world)
        loader = iter(build_loader(dataset, cfg, rank=ddp.rank, num_steps=(count + 1 + workers) // accumulate + 1))
        for _ in range(workers):  # start-up: every worker delivers its first batch (paid once per run)
            next(loader)
        t0 = time.perf_counter()
        for _ in range(count):
            next(loader)
        mine = (time.perf_counter() - t0) / count
        del loader
        batch_s = max(ddp.gather(mine))  # every rank's loader feeds the same synchronized step
        step_data_s = accumulate * batch_s
        wait = max(0.0, step_data_s - compute_s)
        out.append(WorkerTiming(workers, batch_s, step_data_s, compute_s, wait / (compute_s + wait)))
        (stop,) = ddp.broadcast([out[-1].keeps_up or time.perf_counter() - started > max_seconds])
        if stop:
            break
    return out


def recommend_workers(m: Measurements, config: Config) -> tuple[int | None, str]:
    """The smallest worker count that keeps data wait under 5 % of the step, in words; or how far
    the CPU is from keeping up."""
    timings = m.worker_timings
    if not timings:
        return None, ""
    per = f"per rank ({m.world_size} ranks on {m.cores} cores) " if m.world_size > 1 else ""
    acc = f"{config.optim.accumulate} micro-batches" if config.optim.accumulate > 1 else "its micro-batch"
    tried = ", ".join(f"{t.workers}: {t.batch_s:.3f} s/batch ({t.wait_share:.0%} wait)" for t in timings)
    good = next((t for t in timings if t.keeps_up), None)
    if good is not None:
        return good.workers, (
            f"Workers: {good.workers} {per}keep{'s' if good.workers == 1 else ''} the model fed: the loader alone "
            f"delivers a step's data ({acc}) in {good.step_data_s:.3f} s against {good.compute_s:.3f} s of compute, "
            f"a data wait of {good.wait_share:.0%} (< {WAIT_SHARE:.0%}); measured {tried}.")
    best = min(timings, key=lambda t: t.step_data_s)
    speedup = best.step_data_s / max(best.compute_s, 1e-9)
    return best.workers, (
        f"The CPU cannot keep up: even {best.workers} workers {per}deliver a step's data in {best.step_data_s:.3f} s "
        f"against {best.compute_s:.3f} s of compute, so {best.wait_share:.0%} of each step would wait for data "
        f"(the loader would need {speedup:.1f}x its speed); measured {tried}. "
        + ("augment.where: device would help: the workers then only crop, and the device augments the batch."
           if config.augment.where != "device" else "Augmentation is already on the device: fewer or smaller "
           "patches per step, or a machine with more cores, would help."))


def measure(
    config: Config,
    batch_sizes: list[int] | None = None,
    warmup: int = 2,
    steps: int = 8,
    memory_cap_mb: float | None = None,
    progress: bool = True,
    max_seconds: float = 90.0,
    on_progress: Callable[[int, int, str], None] | None = None,
    size_workers: bool = True,
) -> Measurements:
    """Time each candidate batch size (1, 2, 4, ... until out of memory, the memory cap, a doubling
    that gains under 5 % samples/s, or a next size that would not fit in ``max_seconds``), re-time
    the best one, time the data loader alone at 1, 2, ... workers against its compute
    (``size_workers``), then time a validation pass and a checkpoint. The sweep keeps to
    ``max_seconds`` even when one step outlasts it: a step is timed once after the first, the re-time
    is skipped, and validation is forecast from the volumes timed by then. Listed ``batch_sizes`` are
    timed in full.

    Under torchrun every rank times its own share of each step side by side, as training runs it.
    ``on_progress(done, total, message)`` is called as each part finishes (a widget's progress bar);
    ``total`` shrinks when the sweep stops early."""
    started = time.perf_counter()
    ddp = setup_distributed()
    device = default_device(ddp.local_rank)
    if ddp.master:
        prepare_demo_data(config, progress)
    ddp.barrier()
    data = open_data(config)
    if ddp.master:
        data.prepare(config, progress=progress)  # cache (+ training targets) of every record, as training does first
    ddp.barrier()
    startup_s = startup_seconds(time.perf_counter() - started)
    capacity = memory_cap_mb or memory_capacity_mb(device)
    candidates = batch_sizes or [2**i for i in range(8)]
    timings: list[BatchTiming] = []
    report = on_progress or (lambda done, total, message: None)
    report(0, len(candidates) + 2, "measuring batch sizes")
    deadline = started + max_seconds if batch_sizes is None else None  # the sweep's budget; listed sizes are timed in full
    bar = tqdm(candidates, desc="plan: batch sizes", unit="size", disable=not (progress and ddp.master))
    last_cost = 0.0
    for b in bar:
        # the next size costs about twice the last one: stop before it would overrun the time budget
        (overrun,) = ddp.broadcast([batch_sizes is None and bool(timings)
                                    and time.perf_counter() - started + 2 * last_cost > max_seconds])
        if overrun:
            break
        bar.set_postfix(batch=b)
        t0 = time.perf_counter()
        t = time_batch_size(config, data, b, device, warmup, steps, ddp, deadline=deadline)
        last_cost = time.perf_counter() - t0
        timings.append(t)
        report(len(timings), len(candidates) + 2, f"batch size {b}: " + (
            "out of memory" if t.out_of_memory else f"{t.samples_per_s:.2f} samples/s, {t.peak_memory_mb:.0f} MB"))
        if t.out_of_memory or t.peak_memory_mb > capacity:
            break
        earlier = [x.samples_per_s for x in timings[:-1] if not x.out_of_memory]
        if batch_sizes is None and earlier and t.samples_per_s < 1.05 * max(earlier):
            break  # a doubling without 5 % more throughput: larger batches will not pay
    total = len(timings) + 2
    usable = [t for t in timings if not t.out_of_memory and t.peak_memory_mb <= capacity]
    (room,) = ddp.broadcast([deadline is None or time.perf_counter() - started + 2 * last_cost <= max_seconds])
    if usable and room:  # the sweep's few steps pick the size; a longer run of that size sets the forecast
        best = max(usable, key=lambda t: t.samples_per_s)
        confirmed = time_batch_size(config, data, best.batch_size, device, warmup, 2 * steps, ddp,
                                    deadline=deadline)
        if not confirmed.out_of_memory:
            timings[timings.index(best)] = confirmed
    worker_timings: list[WorkerTiming] = []
    if usable and size_workers:
        best = max((t for t in timings if not t.out_of_memory and t.peak_memory_mb <= capacity),
                   key=lambda t: t.samples_per_s)
        worker_timings = time_workers(config, data, best.batch_size, best.compute_s, ddp)
    report(total - 1, total, "confirmed the best batch size and sized the workers; timing validation and a checkpoint")
    val_s = checkpoint_s = 0.0
    if ddp.master:  # as in training: rank 0 validates and writes checkpoints while the others wait
        engine = build_engine(config, data.patch_dataset(config), device)
        if data.val and config.training.val_every_epochs:
            metrics_warm_up()  # as training does before its first epoch
            val_s = _time_validation(engine.model, data.val[: config.val.max_volumes], config, data, device,
                                     deadline)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            save_checkpoint(Path(tmp) / "c.pt", {"model": engine.model.state_dict(), "optimizer": engine.optimizer.state_dict()})
            checkpoint_s = time.perf_counter() - t0
    val_s, checkpoint_s = ddp.broadcast([val_s, checkpoint_s])
    report(total, total, "done")
    ddp.close()
    return Measurements(
        device=str(device), timings=timings, val_s=val_s, checkpoint_s=checkpoint_s, memory_capacity_mb=capacity,
        train_records=len(data.train), val_records=len(data.val), unique_patches=data.unique_patches(config.data.patch_size),
        workers=config.training.workers, seconds=time.perf_counter() - started, world_size=ddp.world,
        worker_timings=worker_timings, cores=usable_cores(), startup_s=startup_s,
    )


def _time_validation(model: torch.nn.Module, records: list, config: Config, data: Data, device: torch.device,
                     deadline: float | None) -> float:
    """Seconds of one validation pass; past ``deadline`` the volumes left are forecast from those timed."""
    t0 = time.perf_counter()
    for done, record in enumerate(records, start=1):
        score_records(model, [record], config, data.cache, device)
        if deadline is not None and time.perf_counter() > deadline and done < len(records):
            return (time.perf_counter() - t0) / done * len(records)
    return time.perf_counter() - t0


def epoch_seconds(steps: int, t: BatchTiming, m: Measurements, config: Config, val_every: int) -> float:
    """A whole epoch of ``steps`` steps (the first of a run), its validation when ``val_every``."""
    one = Schedule(steps, steps, 0, checkpoint_every=config.training.checkpoint_every_steps)
    return epoch_forecast_s(one, 0, steps, Costs(t.step_s, m.val_s, m.checkpoint_s), bool(val_every))


def recommend(
    m: Measurements,
    config: Config,
    target_epoch_minutes: float = 60.0,
    budget_hours: float | None = None,
    headroom: float = 0.85,
    coverage_target: float | None = None,
) -> Plan:
    """Turn measurements into a plan, with reasons and warnings in a researcher's words.

    The epoch length follows the time target; ``coverage_target`` (share of the unique patch
    positions an epoch should see, default a 50 % floor) sets when coverage is
    called too low and adds a preset that reaches it."""
    usable = [t for t in m.timings if not t.out_of_memory and t.peak_memory_mb <= headroom * m.memory_capacity_mb]
    if not usable:
        raise RuntimeError("no batch size fits in memory; reduce data.patch_size or model.features")
    best = max(usable, key=lambda t: (round(t.samples_per_s, 6), -t.batch_size))
    target_s = target_epoch_minutes * 60
    val_every = config.training.val_every_epochs
    overhead = m.val_s + m.checkpoint_s
    steps = max(1, int((target_s - overhead) // best.step_s))
    if config.training.checkpoint_every_steps:  # checkpoints inside the epoch cost time too
        while steps > 1 and epoch_seconds(steps, best, m, config, val_every) > target_s:
            steps -= 1
    epoch_s = epoch_seconds(steps, best, m, config, val_every)
    # Validation should not eat more than a quarter of the training time.
    if val_every and m.val_s > 0.25 * max(epoch_s - m.val_s, 1e-9):
        val_every = max(val_every, math.ceil(m.val_s / (0.25 * (epoch_s - m.val_s))))
        epoch_s = epoch_seconds(steps, best, m, config, 1) - m.val_s + m.val_s / val_every
    layout = _layout_for(config, m, best.batch_size, steps)
    samples = layout.samples_per_epoch
    coverage = Coverage(samples, m.unique_patches).ratio
    first_epoch_s = epoch_s + best.first_batch_s
    # the whole command as the trainer plans it (training/budget.py): start-up, whole epochs, and with a
    # budget a last epoch that takes the time left before the aim
    costs = Costs(best.step_s, m.val_s, m.checkpoint_s, best.step_spread_s)
    planned = replace(config.training, val_every_epochs=val_every, time_budget_hours=budget_hours)
    schedule = Schedule.from_config(replace(config, training=planned), steps, bool(m.val_records))
    lead = m.startup_s + best.first_batch_s
    if budget_hours:
        budget_s = budget_hours * 3600
        total, last = fit_plan(0, 0, budget_s - margin_s(budget_s) - lead, costs, schedule)
        schedule = schedule.replanned(total, last, None)
    total, last = schedule.total, schedule.last_start
    epochs = last // steps + 1
    run_s = lead + remaining_s(0, schedule, costs)
    band = forecast_band_s(0, schedule, costs)
    last_epoch_s = epoch_forecast_s(schedule, last, total, costs, bool(val_every))

    explanation = [
        f"Batch size {best.batch_size}: {best.samples_per_s:.2f} samples/s, the best of "
        + ", ".join(f"{t.batch_size} ({t.samples_per_s:.2f}/s)" for t in usable)
        + f", within {headroom:.0%} of {m.memory_capacity_mb / 1024:.1f} GiB ({best.peak_memory_mb:.0f} MB peak).",
        f"A step takes {best.step_s:.3f} s on average over {best.timed_steps} timed steps, the step time this plan uses "
        f"(an epoch is a sum of steps; median {best.step_median_s:.3f} s, spread {best.step_spread_s:.3f} s): "
        f"{best.compute_s:.3f} s compute and {best.data_wait_s:.3f} s waiting for data (medians).",
        f"{steps} steps fill a {target_epoch_minutes:g}-minute epoch after validation ({m.val_s:.1f} s) "
        f"and checkpoints ({m.checkpoint_s:.2f} s each): {samples} samples per epoch, "
        f"{layout.global_batch} per step ({best.batch_size} x {layout.world_size} ranks x {layout.accumulate} accumulated).",
        f"Coverage: {samples} samples over {m.unique_patches} unique patch positions = {coverage:.0%} per epoch"
        " (50-100 % per epoch is the usual aim).",
        f"Forecast: {format_duration(epoch_s)} per epoch ({format_duration(first_epoch_s)} for the first, with worker start-up),"
        f" {epochs} epochs = {run_s / 3600:.2f} h" + (f" within the {budget_hours:g} h budget." if budget_hours else "."),
    ]
    if budget_hours and total - last != steps:
        explanation.append(f"With the {budget_hours:g} h budget the last epoch takes the time left: {total - last} steps "
                           f"instead of {steps}; the trainer re-plans it at each epoch end as it measures.")
    configured = epoch_layout(config, max(m.train_records, 1), m.world_size)
    if configured.steps != steps:
        explanation.append(f"As configured now an epoch is {configured.steps} steps" + (
            f" (a full pass: {config.training.patches_per_volume} patches x {m.train_records} volumes"
            f" / {configured.global_batch} per step)" if configured.full_pass else "")
            + f"; the plan sets training.train_iterations_per_epoch to {steps}.")
    warnings = []
    wanted = COVERAGE_MIN if coverage_target is None else coverage_target
    if coverage < wanted:
        warnings.append(f"Too few steps: an epoch covers {coverage:.0%} of the unique patches (< {wanted:.0%}); "
                        "lengthen the epoch or raise the batch size if memory allows.")
    if epoch_s > EPOCH_MAX_H * 3600:
        warnings.append(f"Too many steps: an epoch lasts {epoch_s / 3600:.1f} h (> {EPOCH_MAX_H:g} h); "
                        "progress is hard to watch and validation is rare. Shorten the target epoch.")
    workers, workers_note = recommend_workers(m, config)
    if workers_note:
        explanation.append(workers_note)
    share = best.data_wait_s / best.step_s if best.step_s else 0.0
    if share > DATA_BOUND and workers is not None and workers != m.workers:
        warnings.append(f"Data-bound: {share:.0%} of each step waits for data (> 20 %) with {m.workers} workers; "
                        f"set training.workers to {workers} (measured above).")
    elif share > DATA_BOUND:
        need = min(psutil.cpu_count() or 1, max(m.workers + 1, math.ceil(max(m.workers, 1) * best.step_s / max(best.compute_s, 1e-9))))
        warnings.append(f"Data-bound: {share:.0%} of each step waits for data (> 20 %); about {need} workers "
                        f"(training.workers, now {m.workers}) would keep the model fed, or set augment.where: device on a GPU.")
    if coverage > 2.0:
        explanation.append(f"Each epoch revisits every patch position about {coverage:.0f} times (diminishing returns "
                           "per epoch): shorter epochs would validate more often for the same total steps.")
    if steps < 20:
        warnings.append(f"Only {steps} steps per epoch: per-epoch numbers will be noisy; consider a longer epoch.")
    total_steps = total
    lr_note = (f"The LR schedule is step-based: {config.optim.schedule} decay over {total_steps} steps "
               f"({epochs} epochs x {steps}" + (f", the last {total - last}" if total - last != steps else "")
               + "); changing steps per epoch changes only how often you validate, "
               "not the shape of the curve for the same total steps.")
    if config.optim.warmup_steps > 0.1 * total_steps:
        warnings.append(f"Warm-up ({config.optim.warmup_steps} steps) is over 10 % of the run ({total_steps} steps); "
                        "reduce optim.warmup_steps.")
    if val_every != config.training.val_every_epochs:
        explanation.append(f"Validation every {val_every} epochs keeps it under a quarter of the training time.")

    def preset(name: str, s: int, e: int, reason: str) -> Preset:
        s = max(1, s)
        return Preset(name, s, e, epoch_seconds(s, best, m, config, val_every),
                      Coverage(s * layout.global_batch, m.unique_patches).ratio, reason)

    def same_total(s: int) -> int:
        """Epochs that keep the recommendation's total steps at ``s`` steps per epoch."""
        return max(1, round(total_steps / max(1, s)))

    presets = [
        preset("Conservative", steps, epochs, "the recommendation: the target epoch length, coverage as measured"),
        preset("Aggressive", int(steps * 1.5), epochs,
               "50 % more steps per epoch: more coverage, longer epochs, rarer validation"),
        preset("Time-constrained", int(steps * 0.75), same_total(int(steps * 0.75)),
               "25 % fewer steps and more epochs: faster feedback, same total steps"),
    ]
    if coverage_target and m.unique_patches:
        s = math.ceil(coverage_target * m.unique_patches / layout.global_batch)
        presets.append(preset(f"Coverage {coverage_target:.0%}", s, same_total(s),
                              f"{s} steps reach the coverage target; the same total steps over {same_total(s)} epochs"))
    return Plan(
        train_batch_size=best.batch_size, global_batch=layout.global_batch, train_iterations_per_epoch=steps,
        max_epochs=epochs,
        val_every_epochs=val_every, samples_per_epoch=samples, coverage=coverage,
        forecast_epoch_s=epoch_s, forecast_first_epoch_s=first_epoch_s, forecast_run_s=run_s,
        target_epoch_s=target_s, explanation=explanation, warnings=warnings, presets=presets,
        measurements=m, lr_note=lr_note, workers=workers, workers_note=workers_note,
        budget_hours=budget_hours, total_steps=total, last_epoch_steps=total - last,
        forecast_last_epoch_s=last_epoch_s, forecast_band_s=band,
    )


def save_plan(plan: Plan, path: str | Path) -> Path:
    """plan.json: the plan with its measurements (``read_plan`` reads it back), written whole or not at all."""
    atomic_write_text(path, json.dumps(plan.to_dict(), indent=1))
    return Path(path)


def read_plan(path: str | Path) -> Plan:
    """A plan saved by ``save_plan`` (``vesuvius-lab plan``, notebook 03's Measure), with its measurements."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    m = dict(doc["measurements"])
    m["timings"] = [BatchTiming(**t) for t in m["timings"]]
    m["worker_timings"] = [WorkerTiming(**t) for t in m.get("worker_timings", [])]
    doc["measurements"] = Measurements(**m)
    doc["presets"] = [Preset(**p) for p in doc["presets"]]
    return Plan(**{k: math.nan if v is None else v for k, v in doc.items()})


def forecast_lines(plan: Plan, now: float | None = None) -> list[str]:
    """The forecast of the whole command, as the trainer plans it and notebook 04 draws it: the end
    (with its band) after the start, and against the budget."""
    now = time.time() if now is None else now
    end = now + plan.forecast_run_s
    epochs = (f"{plan.max_epochs - 1} epochs of {plan.train_iterations_per_epoch} steps and a last one of "
              f"{plan.last_epoch_steps}" if plan.last_epoch_steps != plan.train_iterations_per_epoch
              else f"{plan.max_epochs} epochs of {plan.train_iterations_per_epoch} steps")
    lines = [f"Forecast end: {format_duration(plan.forecast_run_s)} after the start (± {format_duration(plan.forecast_band_s)}), "
             f"{time.strftime('%H:%M', time.localtime(end))} if started now: start-up "
             f"{format_duration(plan.measurements.startup_s)}, {epochs} ({plan.total_steps} steps), "
             f"{format_duration(plan.forecast_epoch_s)} per epoch"
             + (f", {format_duration(plan.forecast_last_epoch_s)} the last" if plan.last_epoch_steps != plan.train_iterations_per_epoch else "")
             + ", the final validation and checkpoint included."]
    if plan.budget_hours:
        budget_s = plan.budget_hours * 3600
        lines.append(f"Budget {format_duration(budget_s)} (training.time_budget_hours={plan.budget_hours:g}): the forecast ends "
                     f"{format_duration(budget_s - plan.forecast_run_s)} before the deadline; the trainer measures as it "
                     "runs and re-plans the remaining epochs so that the run ends inside it.")
    return lines


def apply_plan(config_path: str | Path, plan: Plan, out: str | Path) -> None:
    """Write the config to ``out`` with the plan's training keys set; the other keys stay as the
    user wrote them, relative paths rebased so that they reach the same files from ``out``."""
    rewrite_config(config_path, out, {"training": plan_keys(plan)})


def plan_keys(plan: Plan) -> dict:
    """The training keys a plan sets."""
    keys = {"train_batch_size": plan.train_batch_size, "train_iterations_per_epoch": plan.train_iterations_per_epoch,
            "max_epochs": plan.max_epochs, "val_every_epochs": plan.val_every_epochs, "patches_per_volume": None}
    if plan.workers is not None:
        keys["workers"] = plan.workers
    if plan.budget_hours:
        keys["time_budget_hours"] = plan.budget_hours
    return keys
