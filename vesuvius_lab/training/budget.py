"""The time budget: a run that ends by its deadline with its schedule complete, and the forecast.

``training.time_budget_hours`` is the wall time the whole command may take, from its process start
(imports, data preparation, worker start-up, validation and checkpoints included). The trainer
measures as it runs (the time of a step, of a validation, of a checkpoint) and, when the forecast
end drifts from the aim (at an epoch end, or mid-epoch when it drifts far), re-plans the rest of
the run: steps per epoch stay, the number of epochs and the length of the last one change, and the
LR decay is spread over the remaining progress from the current LR (``engine.decay_progress``), so
warm-up and decay finish at the new total and the LR never jumps. The final validation and the
final checkpoint land before the deadline.

Each plan is a ``plan`` record in metrics.jsonl (its reason, the new total, the forecast end with a
band, the per-epoch forecast) and its state is in every checkpoint: a resumed run continues its plan
and re-plans for the downtime. Without a budget the same forecast is written at each epoch end, and
the step count and the LR stay exactly as configured.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import psutil
import torch

from vesuvius_lab.config import Config
from vesuvius_lab.errors import ConfigError
from vesuvius_lab.training.engine import decay_progress, lr_at

PLAN = "plan"  # the kind of the plan records in metrics.jsonl
EXIT_S = 0.5  # after the final checkpoint: the last status, the data workers' shutdown, the interpreter's exit
# (measured 0.1 s on the demo with a CPU-bound competitor; 1.5 s ended 2-minute runs 1.4 s early)
WINDOW = 30  # recent steps that set the step time
MIN_SAMPLES = 5  # steps measured before the first measured plan


def margin_s(budget_s: float) -> float:
    """How far before the deadline the run aims to end: room for the spread of the last steps, the
    last validation and the exit, which on a shared machine run long more often than short. 3 %
    puts the aim 2 % above the 95 % a researcher still counts as using the budget."""
    return min(0.03 * budget_s, 600.0)


def tolerance_s(budget_s: float, remaining_s: float, epoch_end: bool) -> float:
    """Forecast drift that triggers a re-plan: 1 % of the budget at an epoch end; mid-epoch also
    5 % of the time left, so step-time noise far from the end re-plans nothing."""
    tol = 0.01 * budget_s
    return tol if epoch_end else max(tol, 0.05 * remaining_s)


def parse_duration(text: str) -> float:
    """'6h', '90m', '1h30m', '45s' or a bare number of hours -> hours."""
    raw = text.strip().lower()
    try:
        return float(raw)
    except ValueError:
        pass
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s)?", raw)
    if not raw or parts is None:
        raise ConfigError(f"--budget {text!r}: expected a duration such as 6h, 90m, 1h30m or 45s")
    h, m, sec = (float(x) if x else 0.0 for x in parts.groups())
    return h + m / 60 + sec / 3600


def command_start() -> float:
    """When this command started (wall clock): this process, or torchrun's launcher over the ranks."""
    me = psutil.Process()
    if "TORCHELASTIC_RUN_ID" in os.environ and me.parent() is not None:
        return me.parent().create_time()
    return me.create_time()


@dataclass
class Costs:
    """What the rest of a run costs, in seconds; measured as the run goes."""

    step_s: float  # one optimizer step with its log line (mean of the recent steps)
    val_s: float  # one validation pass
    checkpoint_s: float  # one checkpoint (last.pt, and best.pt when it improved)
    step_spread_s: float = 0.0  # interquartile range of the recent step times: the forecast's band
    exit_s: float = EXIT_S


@dataclass
class Cadence:
    """Where the epoch ends, validations and checkpoints fall."""

    steps_per_epoch: int
    val_every: int  # 0: no validation (none configured, or no validation volumes)
    checkpoint_every: int  # 0: at epoch ends only
    final_val: bool = True  # the last epoch always validates (a budget run)

    def validates(self, step: int, final: bool, last_start: int | None = None) -> bool:
        """Whether the epoch ending at ``step`` validates (as ``loop.end_of_epoch`` decides): when due
        by ``val_every``, and the final one of a budget run."""
        every, e = self.val_every, self.steps_per_epoch
        if not every:
            return False
        if final and self.final_val:
            return True
        epoch = (last_start // e if last_start is not None and step > last_start else (step - 1) // e)
        return (epoch + 1) % every == 0


def _multiples(n: int, after: int, before: int) -> int:
    """Multiples of ``n`` in the open interval (after, before)."""
    return max(0, (before - 1) // n - after // n) if n > 0 else 0


def remaining_s(step: int, total: int, last_start: int, costs: Costs, cadence: Cadence,
                val_scale: float = 1.0) -> float:
    """Seconds from just after ``step`` (its epoch-end work done) to the exit of a run whose last
    epoch runs from ``last_start`` to ``total``: the steps, the epoch ends before it (validation
    when due, a checkpoint), the periodic checkpoints, the final epoch end and the exit."""
    if total <= step:
        return costs.exit_s
    e, c, every = cadence.steps_per_epoch, cadence.checkpoint_every, cadence.val_every
    upto = last_start + 1 if last_start > step else step + 1  # epoch ends in (step, last_start]
    ends = _multiples(e, step, upto)
    vals = _multiples(e * every, step, upto) if every else 0
    final_val = cadence.validates(total, final=True, last_start=last_start)
    periodic = _multiples(c, step, total) - (_multiples(math.lcm(c, e), step, upto) if c else 0)
    return ((total - step) * costs.step_s + (vals + final_val) * costs.val_s * val_scale
            + (ends + periodic + 1) * costs.checkpoint_s + costs.exit_s)


def _fit_total(step: int, last_start: int, available_s: float, costs: Costs, cadence: Cadence,
               val_scale: float) -> int:
    """The largest total (at least one step into the last epoch) whose rest fits in ``available_s``."""
    lo = max(step, last_start) + 1
    hi = lo + 1 + int(max(available_s, 0.0) / max(costs.step_s, 1e-6))
    while lo < hi:  # the rest grows with the total
        mid = (lo + hi + 1) // 2
        if remaining_s(step, mid, last_start, costs, cadence, val_scale) <= available_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_plan(step: int, epoch_start: int, available_s: float, costs: Costs, cadence: Cadence,
             val_scale: float = 1.0) -> tuple[int, int]:
    """(total, last_start): as many whole epochs as fit with their validations, then a last epoch
    that takes the time left, at least half an epoch long (shorter only when the epoch running now
    must be the last). ``epoch_start`` is where the epoch of the next step began."""
    e = cadence.steps_per_epoch
    least = max(1, e // 2)
    best = (_fit_total(step, epoch_start, available_s, costs, cadence, val_scale), epoch_start)
    last = max(step, epoch_start) // e * e  # epoch ends still to come: multiples of e after this step
    while True:  # one more whole epoch before the last, while the last keeps half an epoch or more
        last += e
        total = _fit_total(step, last, available_s, costs, cadence, val_scale)
        fits = remaining_s(step, total, last, costs, cadence, val_scale) <= available_s
        if not fits or total - last < least:
            return best
        best = (total, last)


def epoch_forecast_s(steps: int, costs: Costs, cadence: Cadence, validates: bool, val_scale: float = 1.0) -> float:
    """One epoch of ``steps`` steps: the steps, its periodic checkpoints, validation, the epoch-end checkpoint."""
    periodic = (steps - 1) // cadence.checkpoint_every if cadence.checkpoint_every else 0
    return steps * costs.step_s + (periodic + 1) * costs.checkpoint_s + (costs.val_s * val_scale if validates else 0.0)


def format_clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def format_span(seconds: float) -> str:
    seconds = int(round(abs(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _windows(shape: tuple[int, ...], patch: list[int], overlap: float) -> int:
    """Sliding windows over a volume, as MONAI's sliding_window_inference lays them out."""
    count = 1
    for size, p in zip(shape, patch, strict=True):
        step = max(1, int(p * (1 - overlap)))
        count *= math.ceil(max(size - p, 0) / step) + 1
    return count


def probe_validation_s(model: torch.nn.Module, volume, shapes: list[tuple[int, ...]], config: Config,
                       device: torch.device) -> float:
    """A guess of one validation pass before one is timed: validation's own code (sliding-window
    inference, post-processing, the leaderboard score, with their threads) on a corner of the first
    validation volume, one and a half patches wide, scaled by the windows and voxels of the whole
    validation set. It runs under the load of the moment, as the validation will; no RNG is drawn
    and no state is changed, so the run trains exactly as it would without it."""
    from vesuvius_lab.inference import predict_volume
    from vesuvius_lab.leaderboard import volume_score

    patch, overlap = config.data.patch_size, config.val.overlap
    corner = tuple(slice(0, min(n, math.ceil(1.5 * p))) for n, p in zip(volume.image.shape, patch, strict=True))
    image, label = np.asarray(volume.image[corner]), np.asarray(volume.label[corner])
    t0 = time.perf_counter()
    mask = predict_volume(model, image, config, device).mask
    t1 = time.perf_counter()
    volume_score(mask, label)
    t2 = time.perf_counter()
    windows = sum(_windows(tuple(shape), patch, overlap) for shape in shapes) / _windows(image.shape, patch, overlap)
    voxels = sum(math.prod(shape) for shape in shapes) / image.size
    return (t1 - t0) * windows + (t2 - t1) * voxels


class RunBudget:
    """The plan the loop follows: its total, its LR anchor, its costs; re-planned against the clock.

    ``budget_s`` None: forecast only (the total and the LR stay as configured)."""

    def __init__(self, config: Config, cadence: Cadence, total: int, start: float, budget_s: float | None,
                 costs: Costs | None = None, anchor: tuple[int, float] | None = None, replans: int = 0,
                 step_at_val: float | None = None, last_start: int | None = None):
        self.optim, self.cadence, self.total, self.start = config.optim, cadence, total, start
        e = cadence.steps_per_epoch
        self.last_start = last_start if last_start is not None else max(0, (total - 1) // e * e)
        self.budget_s, self.costs, self.anchor, self.replans = budget_s, costs, anchor, replans
        self.step_at_val = step_at_val  # the step time when the last validation was measured
        self.recent: deque[float] = deque(maxlen=WINDOW)
        self.planned: Costs | None = costs  # the costs the current plan assumed
        self.mark = time.time()
        self.checkpoint_spent = 0.0
        self.checkpoint_seen = 0.0  # the last checkpoint's time, before the first costs exist
        self.fresh = True  # the first step after a (re)start holds the workers' start-up
        self.must_plan = False  # the first measurements are in: the first measured plan is due
        self.resumed: str | None = None  # why the next re-plan happens, after a resume
        self.probe: Callable[[], float] | None = None  # a validation pass before one is timed (``guess_validation``)
        self.ddp = None
        self.val_timed = False  # a validation of this run has been timed
        self.reprobed = False  # the probe was taken again just before the final validation

    # -- setup --
    @classmethod
    def begin(cls, config: Config, steps_per_epoch: int, has_val: bool, saved: dict | None, start: float,
              now: float | None = None) -> RunBudget:
        """The plan of a fresh run (costs still unknown), or the plan a checkpoint continues."""
        t = config.training
        budget_s = t.time_budget_hours * 3600 if t.time_budget_hours else None
        cadence = Cadence(steps_per_epoch, t.val_every_epochs if has_val else 0, t.checkpoint_every_steps,
                          final_val=budget_s is not None)
        configured = t.max_epochs * steps_per_epoch
        if not saved or budget_s is None:
            return cls(config, cadence, configured, start, budget_s)
        # a resume: the deadline stays where the run's first command set it (downtime is spent)
        first_start = saved.get("start", start)
        costs = Costs(**saved["costs"]) if saved.get("costs") else None
        anchor = tuple(saved["anchor"]) if saved.get("anchor") else None
        b = cls(config, cadence, int(saved["total"]), first_start, budget_s, costs, anchor,
                int(saved.get("replans", 0)), saved.get("step_at_val"), saved.get("last_start"))
        now = time.time() if now is None else now
        if now > b.deadline:
            raise ConfigError(f"training.time_budget_hours: the budget of this run ended at {format_clock(b.deadline)} "
                              f"({format_span(now - b.deadline)} ago); raise it to continue")
        down = start - float(saved.get("saved_at", start))
        b.resumed = f"resumed after {format_span(max(down, 0.0))} of downtime and {format_span(now - start)} of start-up"
        return b

    def guess_validation(self, model: torch.nn.Module, data, config: Config, device: torch.device, ddp) -> None:
        """Before the first validation is timed, a budget run plans with a probe of it, taken with
        the first measured steps (the same load on the machine) by rank 0 and shared."""
        if not (self.active and self.cadence.val_every and self.costs is None):
            return
        volumes = [data.cache.load(r) for r in data.val[: config.val.max_volumes]] if ddp.master else []

        def probe() -> float:
            guess = probe_validation_s(model, volumes[0], [v.image.shape for v in volumes], config, device) if ddp.master else 0.0
            (guess,) = ddp.broadcast([guess])
            return guess

        self.probe, self.ddp = probe, ddp

    @property
    def active(self) -> bool:
        """Whether the clock sets the run's length (a budget is set)."""
        return self.budget_s is not None

    @property
    def deadline(self) -> float:
        return self.start + (self.budget_s or math.inf)

    @property
    def aim(self) -> float:
        return self.deadline - margin_s(self.budget_s or 0.0)

    def lr(self, step: int) -> float:
        return lr_at(step, self.total, self.optim, self.anchor)

    def epoch_of(self, step: int) -> int:
        """The epoch of the step with index ``step`` (0-based): the last one may be longer or shorter."""
        e = self.cadence.steps_per_epoch
        return step // e if step < self.last_start else self.last_start // e

    def epoch_end(self, done: int) -> bool:
        """Whether ``done`` steps close an epoch."""
        return done == self.total or (done <= self.last_start and done % self.cadence.steps_per_epoch == 0)

    def timed(self, write: Callable[..., None]) -> Callable[..., None]:
        """``write`` (the checkpoint) with its time measured: a cost of its own, not a step's."""
        def timed_write(*args, **kwargs) -> None:
            t0 = time.time()
            try:
                write(*args, **kwargs)
            finally:
                spent = time.time() - t0
                self.checkpoint_spent += spent
                c = self.costs
                if c is not None:
                    c.checkpoint_s = 0.7 * c.checkpoint_s + 0.3 * spent
                self.checkpoint_seen = spent
        return timed_write

    def state_dict(self, step: int) -> dict:
        """What a checkpoint keeps: the plan and its costs, and when it was written."""
        return {"budget_s": self.budget_s, "start": self.start, "total": self.total, "last_start": self.last_start,
                "anchor": list(self.anchor) if self.anchor else None, "replans": self.replans,
                "costs": asdict(self.costs) if self.costs else None, "step_at_val": self.step_at_val,
                "saved_at": time.time(), "step": step}

    # -- the loop's one call per step --
    def after_step(self, step: int, step_s: float, epoch_end: bool, final: bool) -> dict | None:
        """Measure the iteration that just ended (``step`` steps done, its epoch-end work included);
        re-plan when the forecast has drifted. Returns the ``plan`` record to log (None: the plan holds)."""
        now = time.time()
        validated = epoch_end and self.cadence.validates(step, final, self.last_start)
        wall, self.mark = now - self.mark, now
        rest = wall - self.checkpoint_spent
        self.checkpoint_spent = 0.0
        if self.fresh:  # the first step after a (re)start: worker start-up, not a step's cost
            self.fresh = False
            seen = step_s
        else:
            seen = step_s if validated else rest
            self.recent.append(seen)
        if validated:
            val_s = max(rest - step_s, 0.0)
            self.val_timed = True
            if self.costs is None:
                self.costs = Costs(step_s=seen, val_s=val_s, checkpoint_s=self.checkpoint_seen)
                self.must_plan = True
            else:
                self.costs.val_s = val_s
            self.step_at_val = self._step_time()
        if self.costs is None and len(self.recent) >= MIN_SAMPLES:  # first measurement; validation not yet
            tau = self._step_time()
            val_guess = self.probe() if self.probe and self.cadence.val_every else 0.0
            self.mark = time.time()  # the probe is no step's cost
            self.costs = Costs(tau, val_guess, self.checkpoint_seen)
            self.step_at_val = tau if val_guess else None  # the guess scales with the load, as a timed one
            self.must_plan = True
        if self.costs is None:
            return None
        if self.recent:
            self.costs.step_s = self._step_time()
            self.costs.step_spread_s = self._spread()
        if step >= self.total:
            return None
        if not self.active:  # forecast only: at the first measurements and at each epoch end
            first, self.must_plan = self.must_plan, False
            return self._record(step, now, "forecast") if epoch_end or first else None
        self._reprobe(step)
        forecast = now + remaining_s(step, self.total, self.last_start, self.costs, self.cadence, self._val_scale())
        drift = forecast - self.aim
        if self.must_plan:
            reason = "first measurements" + (" (validation not timed yet: probed)" if self.probe else "")
        elif abs(drift) > tolerance_s(self.budget_s, self.aim - now, epoch_end) and (
                self.resumed or len(self.recent) >= MIN_SAMPLES):
            reason = self.resumed or self._why(drift)
        else:
            return None
        first = self.must_plan or self.resumed
        self.must_plan, self.resumed = False, None
        if validated and remaining_s(step, step + 1, step, self.costs, self.cadence) > self.aim - now:
            # not even one more step and a final validation fit: the validation just done is the final one
            self.total, self.last_start = step, min(self.last_start, step)
            self.replans += 1
            return self._record(step, now, reason + "; no time for one more step and a final validation: the run ends here")
        changed = self._replan(step, now)
        return self._record(step, now, reason) if changed or first else None

    def sync(self, ddp) -> int:
        """Every rank follows rank 0's plan (the total and the LR anchor); returns the total."""
        if self.active and ddp.world > 1:
            self.total, self.last_start, self.anchor = ddp.broadcast([self.total, self.last_start, self.anchor])
        return self.total

    # -- inside --
    def _reprobe(self, step: int) -> None:
        """A validation never timed in this run is probed again when the final one is near (its steps
        left take less than it): the load may have changed since the first probe, and a validation
        slows down with it more than a step does (its threads, its metric)."""
        if not self.probe or self.val_timed or self.reprobed:
            return
        near = (self.total - step) * self.costs.step_s <= max(30.0, self.costs.val_s * self._val_scale())
        (near,) = self.ddp.broadcast([near])  # rank 0 decides: every rank joins the probe's broadcast
        if near:
            self.reprobed = True
            self.costs.val_s, self.step_at_val = self.probe(), self.costs.step_s
            self.mark = time.time()  # the probe is no step's cost

    def _step_time(self) -> float:
        """Mean of the recent steps (the rest of the run is a sum of steps, hiccups of the machine
        included): the last 30, or fewer (at least 5) when they span more than 5 % of the budget, so
        a machine that slows down mid-run shows within a short time."""
        horizon = 0.05 * (self.budget_s or 1200.0)
        newest, spent = [], 0.0
        for t in reversed(self.recent):
            if len(newest) >= MIN_SAMPLES and spent >= horizon:
                break
            newest.append(t)
            spent += t
        return statistics.fmean(newest)

    def _spread(self) -> float:
        if len(self.recent) < 4:
            return 0.0
        q = statistics.quantiles(self.recent, n=4)
        return q[2] - q[0]

    def _val_scale(self) -> float:
        """A validation slows down as steps do (the same machine, the same load)."""
        if not self.step_at_val or not self.costs:
            return 1.0
        return min(3.0, max(0.5, self.costs.step_s / self.step_at_val))

    def _why(self, drift: float) -> str:
        """The reason for a re-plan, in a researcher's words: what changed most since the last plan."""
        p, c = self.planned, self.costs
        later = "later" if drift > 0 else "earlier"
        if p is None:
            return f"the forecast end moved {format_span(drift)} {later}"
        step = (c.step_s - p.step_s) / max(p.step_s, 1e-9)
        val = (c.val_s * self._val_scale() - p.val_s) / max(p.val_s, 1e-9) if p.val_s else 0.0
        if abs(val) > abs(step) and abs(val) > 0.05:
            what = f"validation {'slower' if val > 0 else 'faster'} ({c.val_s * self._val_scale():.1f} s, planned {p.val_s:.1f} s)"
        elif abs(step) > 0.02:
            what = f"steps {'slower' if step > 0 else 'faster'} ({c.step_s:.3f} s, planned {p.step_s:.3f} s)"
        else:
            what = "checkpoints and logging took other times than planned"
        return f"{what}: the forecast end moved {format_span(drift)} {later}"

    def _replan(self, step: int, now: float) -> bool:
        """The largest total that ends by the aim; the decay anchored where the LR is now."""
        e = self.cadence.steps_per_epoch
        epoch_start = self.last_start if step >= self.last_start else step // e * e
        total, last = fit_plan(step, epoch_start, self.aim - now, self.costs, self.cadence, self._val_scale())
        if (total, last) == (self.total, self.last_start):
            return False
        # the decay goes on from the LR of the last step run (index step - 1), over the steps left
        at = max(step - 1, self.optim.warmup_steps)
        done = decay_progress(at, self.total, self.optim, self.anchor) if step - 1 >= self.optim.warmup_steps else 0.0
        self.anchor, self.total, self.last_start = (at, done), total, last
        self.replans += 1
        return True

    def _record(self, step: int, now: float, reason: str) -> dict:
        c, cad, scale = self.costs, self.cadence, self._val_scale()
        self.planned = replace(c, val_s=c.val_s * scale)
        left, e, last = self.total - step, cad.steps_per_epoch, self.last_start
        upto = last + 1 if last > step else step + 1
        rest = remaining_s(step, self.total, last, c, cad, scale)
        vals_left = _multiples(e * cad.val_every, step, upto) + 1 if cad.val_every and left else 0
        band = left * c.step_spread_s / 2 + 0.1 * c.val_s * scale * vals_left
        last_steps = self.total - last
        return {
            "kind": PLAN, "step": step, "reason": reason, "total_steps": self.total,
            "epochs": last // e + 1, "steps_per_epoch": e, "last_epoch_start": last, "last_epoch_steps": last_steps,
            "epochs_left": _multiples(e, step, upto) + 1 if left else 0, "replans": self.replans,
            "anchor_step": self.anchor[0] if self.anchor else None,
            "anchor_progress": self.anchor[1] if self.anchor else None,
            "time": now, "start": self.start, "elapsed_s": now - self.start,
            "budget_s": self.budget_s, "deadline": self.deadline if self.active else None,
            "aim": self.aim if self.active else None,
            "forecast_end": now + rest, "forecast_band_s": band,
            "step_s": c.step_s, "val_s": c.val_s * scale, "checkpoint_s": c.checkpoint_s,
            "forecast_epoch_s": epoch_forecast_s(e, c, cad, bool(cad.val_every), scale),
            "forecast_last_epoch_s": epoch_forecast_s(last_steps, c, cad, bool(cad.val_every), scale),
        }

    def closing_note(self, step: int) -> str:
        """The end against the budget, for the closing message."""
        if not self.active:
            return ""
        now = time.time()
        early = self.deadline - now
        return (f"; budget {format_span(self.budget_s)}: ended after {format_span(now - self.start)} "
                f"({format_span(early)} {'before' if early >= 0 else 'after'} the deadline {format_clock(self.deadline)}), "
                f"{self.replans} re-plans, LR {self.lr(step - 1):.3g} at the last step")
