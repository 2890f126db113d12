"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates", section 3.3; Lightning's
``lr_find``): the config's real training step (model, losses, data, optimizer: ``training.engine``)
run for about 100 steps while the LR rises exponentially from ``min_lr`` to ``max_lr``.

The loss is smoothed as Lightning smooths it (a debiased EMA, here of beta 0.9); the test stops early when
the smoothed loss diverges (above 4x the best so far, or not finite). The suggestion is Lightning's
rule: the LR where the smoothed loss falls fastest (the steepest negative gradient against log LR,
the first 10 and the last point skipped). The model's weights, the optimizer's state and the RNG are
restored afterwards, so the engine is as it was.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from vesuvius_lab.config import Config, rewrite_config
from vesuvius_lab.training.engine import Engine, forward_backward, optimizer_update

MIN_LR, MAX_LR, STEPS = 1e-8, 1.0, 100  # Lightning's lr_find defaults
DIVERGENCE = 4.0  # stop once the smoothed loss is above this many times the best smoothed loss
BETA = 0.9  # the loss's smoothing: Lightning's 0.98 averages over ~50 steps, half of a 100-step test,
# which moves the steepest descent decades to the right; 0.9 averages over ~10 steps (under a decade)
SKIP_BEGIN, SKIP_END = 10, 1  # points the suggestion ignores: the noisy start, the blow-up at the end
RULE = (f"steepest descent: the LR where the smoothed loss falls fastest against log LR "
        f"(Lightning lr_find's rule; first {SKIP_BEGIN} and last {SKIP_END} points skipped)")


@dataclass
class RangeTest:
    """One range test: every step's LR, loss and smoothed loss, and what they suggest."""

    min_lr: float
    max_lr: float
    steps: int  # the steps planned; len(lrs) were run
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    suggested_lr: float | None = None
    suggested_index: int | None = None
    rule: str = RULE
    stopped_early: str | None = None  # why the test ended before max_lr (the loss diverged)
    seconds: float = 0.0
    device: str = ""
    config_lr: float | None = None  # optim.lr of the config tested, for comparison

    def to_dict(self) -> dict:
        """As JSON takes it: a loss that was not finite is null."""
        doc = asdict(self)
        for key in ("losses", "smoothed"):
            doc[key] = [x if math.isfinite(x) else None for x in doc[key]]
        return doc

    def summary(self) -> str:
        head = (f"suggested optim.lr {self.suggested_lr:.3g}" if self.suggested_lr is not None
                else "no suggestion: too few points before the loss diverged (raise the steps or lower min_lr)")
        ran = f"{len(self.lrs)} of {self.steps} steps, LR {self.min_lr:.1e} to {self.lrs[-1] if self.lrs else self.min_lr:.1e}"
        stop = f"; stopped early: {self.stopped_early}" if self.stopped_early else ""
        return f"{head} ({self.rule}); {ran} in {self.seconds:.0f} s on {self.device}{stop}"


def ramp_lr(i: int, steps: int, min_lr: float, max_lr: float) -> float:
    """The exponential ramp: min_lr at the first step, max_lr at the last."""
    return min_lr * (max_lr / min_lr) ** (i / max(steps - 1, 1))


def suggest(lrs: list[float], smoothed: list[float]) -> int | None:
    """Index of the steepest descent of ``smoothed`` against log LR (None: too few finite points)."""
    end = len(smoothed) - SKIP_END
    idx = [i for i in range(SKIP_BEGIN, end) if math.isfinite(smoothed[i])]
    if len(idx) < 2:
        return None
    gradient = np.gradient(np.array([smoothed[i] for i in idx]), np.log([lrs[i] for i in idx]))
    return idx[int(np.argmin(gradient))]


def run_range_test(engine: Engine, batches: Iterator[dict], min_lr: float = MIN_LR, max_lr: float = MAX_LR,
                   steps: int = STEPS, divergence: float = DIVERGENCE,
                   on_step: Callable[[int, int], None] | None = None) -> RangeTest:
    """The range test on ``engine`` (its weights, optimizer and RNG restored afterwards)."""
    t0 = time.perf_counter()
    saved = (copy.deepcopy(engine.raw_model.state_dict()), copy.deepcopy(engine.optimizer.state_dict()),
             copy.deepcopy(engine.scaler.state_dict()), torch.get_rng_state(),
             copy.deepcopy(engine.ema.state_dict()) if engine.ema is not None else None)
    result = RangeTest(min_lr, max_lr, steps, device=str(engine.device))
    average, best = 0.0, math.inf
    try:
        engine.raw_model.train()
        for i in range(steps):
            lr = ramp_lr(i, steps, min_lr, max_lr)
            engine.set_lr(lr)
            fb = forward_backward(engine, batches, i)
            optimizer_update(engine, fb.finite)
            average = BETA * average + (1 - BETA) * fb.loss
            smooth = average / (1 - BETA ** (i + 1)) if fb.finite else math.inf
            result.lrs.append(lr)
            result.losses.append(fb.loss if fb.finite else math.nan)
            result.smoothed.append(smooth)
            if on_step:
                on_step(i + 1, steps)
            if not math.isfinite(smooth):
                result.stopped_early = f"the loss was not finite at LR {lr:.3g}"
                break
            if i > 0 and smooth > divergence * best:
                result.stopped_early = (f"the smoothed loss {smooth:.3g} passed {divergence:g}x its best "
                                        f"{best:.3g} at LR {lr:.3g}")
                break
            best = min(best, smooth)
    finally:
        model, optimizer, scaler, rng, ema = saved
        engine.raw_model.load_state_dict(model)
        engine.optimizer.load_state_dict(optimizer)
        engine.scaler.load_state_dict(scaler)
        torch.set_rng_state(rng)
        if ema is not None:
            engine.ema.load_state_dict(ema)
        engine.optimizer.zero_grad(set_to_none=True)
    result.suggested_index = suggest(result.lrs, result.smoothed)
    if result.suggested_index is not None:
        result.suggested_lr = result.lrs[result.suggested_index]
    result.seconds = time.perf_counter() - t0
    return result


def lr_range_test(config: Config, min_lr: float = MIN_LR, max_lr: float = MAX_LR, steps: int = STEPS,
                  divergence: float = DIVERGENCE, progress: bool = True,
                  on_step: Callable[[int, int], None] | None = None) -> RangeTest:
    """The range test on the config's own step: its data (prepared as training prepares it), loader,
    model, losses and optimizer, built as the planner builds them to time a batch size."""
    from vesuvius_lab.data import open_data, prepare_demo_data
    from vesuvius_lab.device import default_device
    from vesuvius_lab.loader import build_loader
    from vesuvius_lab.training.engine import build_engine

    t0 = time.perf_counter()
    device = default_device(0)
    prepare_demo_data(config, progress)
    data = open_data(config)
    data.prepare(config, progress=progress)
    cfg = replace(config, training=replace(config.training, train_iterations_per_epoch=steps, patches_per_volume=None,
                                           persistent_workers=False))
    dataset = data.patch_dataset(cfg)
    engine = build_engine(cfg, dataset, device)
    batches = iter(build_loader(dataset, cfg, num_steps=steps))
    bar = tqdm(total=steps, desc="LR range test", unit="step", disable=not progress)

    def step_done(done: int, total: int) -> None:
        bar.update(done - bar.n)
        if on_step:
            on_step(done, total)

    try:
        result = run_range_test(engine, batches, min_lr, max_lr, steps, divergence, step_done)
    finally:
        del batches  # the data workers end now
        bar.close()
    result.seconds, result.config_lr = time.perf_counter() - t0, config.optim.lr
    return result


def range_figure(result: RangeTest) -> Figure:
    """The smoothed loss (and the raw one, faint) against the LR on a log axis, the suggestion marked
    and the rule that chose it named."""
    fig = Figure(figsize=(8, 3.6), dpi=72, layout="constrained")
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="gray", lw=0.8, alpha=0.4, label="loss")
    ax.plot(result.lrs, result.smoothed, color="black", lw=2, label="smoothed loss")
    if result.suggested_lr is not None:
        ax.axvline(result.suggested_lr, color="tab:red", ls="--",
                   label=f"suggested {result.suggested_lr:.3g} (steepest descent)")
        ax.plot([result.suggested_lr], [result.smoothed[result.suggested_index]], "o", color="tab:red")
    if result.config_lr:
        ax.axvline(result.config_lr, color="tab:blue", ls=":", label=f"config's optim.lr {result.config_lr:.3g}")
    finite = [s for s in result.smoothed if math.isfinite(s)]
    if finite:  # the blow-up at the end would flatten the part that matters
        low, high = min(finite), min(max(finite), DIVERGENCE * min(finite))
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low) + 1e-9)
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss",
           title="LR range test" + (" (stopped early: the loss diverged)" if result.stopped_early else ""))
    ax.text(0.01, 0.02, f"rule: {result.rule}", transform=ax.transAxes, fontsize=7, va="bottom")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return fig


def lr_change(lr: float) -> dict:
    """The config change that applies ``lr`` (three significant digits: what the plot shows)."""
    return {"optim": {"lr": float(f"{lr:.3g}")}}


def apply_lr(config_path: str | Path, lr: float, out: str | Path) -> None:
    """Write the config to ``out`` with ``optim.lr`` set to ``lr`` (the other keys as written)."""
    rewrite_config(config_path, out, lr_change(lr))
