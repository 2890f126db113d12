"""The time budget: a run that ends by its deadline with its schedule complete, and the forecast.

``training.time_budget_hours`` is the wall time the whole command may take, from its process start
(imports, data preparation, worker start-up, validation and checkpoints included). The trainer
measures as it runs (the time of a step, of a validation, of a checkpoint) and, when the forecast
end drifts from the aim (at an epoch end, or mid-epoch when it drifts far), re-plans the rest of
the run: steps per epoch stay, the number of epochs and the length of the last one change, and the
LR decay is spread over the remaining progress from the current LR (``schedule.decay_progress``), so
warm-up and decay finish at the new total and the LR never jumps. The final validation and the
final checkpoint land before the deadline.

The plan is a ``schedule.Schedule``, which this module only measures against and replaces.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import numpy as np
import psutil
import torch

from vesuvius_lab.config import Config
from vesuvius_lab.errors import ConfigError
from vesuvius_lab.timefmt import format_clock, format_duration
from vesuvius_lab.training.schedule import Schedule, decay_progress

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


def remaining_s(step: int, schedule: Schedule, costs: Costs, val_scale: float = 1.0) -> float:
    """Seconds from just after ``step`` (its epoch-end work done) to the exit of the run that
    ``schedule`` lays out: the steps, the validations, the checkpoints and the exit."""
    total = schedule.total
    if total <= step:
        return costs.exit_s
    vals, checkpoints = schedule.count_validations(step, total), schedule.count_checkpoints(step, total)
    return (total - step) * costs.step_s + vals * costs.val_s * val_scale + checkpoints * costs.checkpoint_s + costs.exit_s


def _fit_total(step: int, last_start: int, available_s: float, costs: Costs, schedule: Schedule,
               val_scale: float) -> int:
    """The largest total (at least one step into the last epoch) whose rest fits in ``available_s``."""
    lo = max(step, last_start) + 1
    hi = lo + 1 + int(max(available_s, 0.0) / max(costs.step_s, 1e-6))
    while lo < hi:  # the rest grows with the total
        mid = (lo + hi + 1) // 2
        if remaining_s(step, schedule.replanned(mid, last_start, schedule.anchor), costs, val_scale) <= available_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_plan(step: int, epoch_start: int, available_s: float, costs: Costs, schedule: Schedule,
             val_scale: float = 1.0) -> tuple[int, int]:
    """(total, last_start) of ``schedule`` re-planned: as many whole epochs as fit with their
    validations, then a last epoch that takes the time left, at least half an epoch long (shorter
    only when the epoch running now must be the last). ``epoch_start`` is where the epoch of the
    next step began."""
    e = schedule.steps_per_epoch
    least = max(1, e // 2)
    best = (_fit_total(step, epoch_start, available_s, costs, schedule, val_scale), epoch_start)
    last = max(step, epoch_start) // e * e  # epoch ends still to come: multiples of e after this step
    while True:  # one more whole epoch before the last, while the last keeps half an epoch or more
        last += e
        total = _fit_total(step, last, available_s, costs, schedule, val_scale)
        fits = remaining_s(step, schedule.replanned(total, last, schedule.anchor), costs, val_scale) <= available_s
        if not fits or total - last < least:
            return best
        best = (total, last)


def forecast_band_s(step: int, schedule: Schedule, costs: Costs, val_scale: float = 1.0) -> float:
    """The spread of the forecast end from just after ``step``: half the interquartile range of a step
    for each step left, and a tenth of a validation for each validation left."""
    return ((schedule.total - step) * costs.step_spread_s / 2
            + 0.1 * costs.val_s * val_scale * schedule.count_validations(step, schedule.total))


def epoch_forecast_s(schedule: Schedule, start: int, end: int, costs: Costs, validates: bool,
                     val_scale: float = 1.0) -> float:
    """The epoch of ``schedule`` over the steps (start, end]: the steps, its checkpoints, and its
    validation when ``validates``."""
    return ((end - start) * costs.step_s + schedule.count_checkpoints(start, end) * costs.checkpoint_s
            + (costs.val_s * val_scale if validates else 0.0))


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
    """The clock against the run's ``schedule`` (what the loop follows): measures what the run
    costs and, when the forecast drifts from the aim, swaps in a re-planned schedule.

    ``budget_s`` None: forecast only (the schedule stays as configured)."""

    def __init__(self, schedule: Schedule, start: float, budget_s: float | None, costs: Costs | None = None,
                 replans: int = 0, step_at_val: float | None = None):
        self.schedule, self.start = schedule, start
        self.budget_s, self.costs, self.replans = budget_s, costs, replans
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
        configured = Schedule.from_config(config, steps_per_epoch, has_val)
        if not saved or budget_s is None:
            return cls(configured, start, budget_s)
        # a resume: the deadline stays where the run's first command set it (downtime is spent)
        first_start = saved.get("start", start)
        costs = Costs(**saved["costs"]) if saved.get("costs") else None
        anchor = tuple(saved["anchor"]) if saved.get("anchor") else None
        total, last_start = int(saved["total"]), saved.get("last_start")
        if last_start is None:
            last_start = max(0, (total - 1) // steps_per_epoch * steps_per_epoch)
        b = cls(configured.replanned(total, last_start, anchor), first_start, budget_s, costs,
                int(saved.get("replans", 0)), saved.get("step_at_val"))
        now = time.time() if now is None else now
        if now > b.deadline:
            raise ConfigError(f"training.time_budget_hours: the budget of this run ended at {format_clock(b.deadline)} "
                              f"({format_duration(now - b.deadline)} ago); raise it to continue")
        down = start - float(saved.get("saved_at", start))
        b.resumed = f"resumed after {format_duration(max(down, 0.0))} of downtime and {format_duration(now - start)} of start-up"
        return b

    def guess_validation(self, model: torch.nn.Module, data, config: Config, device: torch.device, ddp) -> None:
        """Before the first validation is timed, a budget run plans with a probe of it, taken with
        the first measured steps (the same load on the machine) by rank 0 and shared."""
        if not (self.active and self.schedule.val_every and self.costs is None):
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

    @contextmanager
    def timing_checkpoint(self) -> Iterator[None]:
        """Around a checkpoint's write: its time is a cost of its own, not a step's."""
        t0 = time.time()
        try:
            yield
        finally:
            spent = time.time() - t0
            self.checkpoint_spent += spent
            c = self.costs
            if c is not None:
                c.checkpoint_s = 0.7 * c.checkpoint_s + 0.3 * spent
            self.checkpoint_seen = spent

    def state_dict(self, step: int) -> dict:
        """What a checkpoint keeps: the plan and its costs, and when it was written."""
        s = self.schedule
        return {"budget_s": self.budget_s, "start": self.start, "total": s.total, "last_start": s.last_start,
                "anchor": list(s.anchor) if s.anchor else None, "replans": self.replans,
                "costs": asdict(self.costs) if self.costs else None, "step_at_val": self.step_at_val,
                "saved_at": time.time(), "step": step}

    # -- the loop's one call per step --
    def after_step(self, step: int, step_s: float) -> dict | None:
        """Measure the iteration that just ended (``step`` steps done, its epoch-end work included);
        re-plan when the forecast has drifted. Returns the ``plan`` record to log (None: the plan holds)."""
        now = time.time()
        epoch_end, validated = self.schedule.epoch_end(step), self.schedule.validates(step)
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
            self.step_at_val = self._step_time() if self.recent else seen  # a resume's first step may validate
        if self.costs is None and len(self.recent) >= MIN_SAMPLES:  # first measurement; validation not yet
            tau = self._step_time()
            val_guess = self.probe() if self.probe and self.schedule.val_every else 0.0
            self.mark = time.time()  # the probe is no step's cost
            self.costs = Costs(tau, val_guess, self.checkpoint_seen)
            self.step_at_val = tau if val_guess else None  # the guess scales with the load, as a timed one
            self.must_plan = True
        if self.costs is None:
            return None
        if self.recent:
            self.costs.step_s = self._step_time()
            self.costs.step_spread_s = self._spread()
        if step >= self.schedule.total:
            return None
        if not self.active:  # forecast only: at the first measurements and at each epoch end
            first, self.must_plan = self.must_plan, False
            return self._record(step, now, "forecast") if epoch_end or first else None
        self._reprobe(step)
        forecast = now + remaining_s(step, self.schedule, self.costs, self._val_scale())
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
        s = self.schedule
        if validated and remaining_s(step, s.replanned(step + 1, step, s.anchor), self.costs) > self.aim - now:
            # not even one more step and a final validation fit: the validation just done is the final one
            self.schedule = s.replanned(step, min(s.last_start, step), s.anchor)
            self.replans += 1
            return self._record(step, now, reason + "; no time for one more step and a final validation: the run ends here")
        changed = self._replan(step, now)
        return self._record(step, now, reason) if changed or first else None

    def end_early(self, step: int, reason: str) -> dict | None:
        """The run ends at ``step`` (early stopping): the schedule ends there, and the ``plan``
        record (None before the first measurements) says why."""
        s = self.schedule
        self.schedule = s.replanned(step, min(s.last_start, step), s.anchor)
        return {**self._record(step, time.time(), reason), "early_stop": True} if self.costs is not None else None

    def sync(self, ddp) -> Schedule:
        """Every rank follows rank 0's schedule; returns it."""
        if self.active and ddp.world > 1:
            (self.schedule,) = ddp.broadcast([self.schedule])
        return self.schedule

    # -- inside --
    def _reprobe(self, step: int) -> None:
        """A validation never timed in this run is probed again when the final one is near (its steps
        left take less than it): the load may have changed since the first probe, and a validation
        slows down with it more than a step does (its threads, its metric)."""
        if not self.probe or self.val_timed or self.reprobed:
            return
        near = (self.schedule.total - step) * self.costs.step_s <= max(30.0, self.costs.val_s * self._val_scale())
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
            return f"the forecast end moved {format_duration(drift)} {later}"
        step = (c.step_s - p.step_s) / max(p.step_s, 1e-9)
        val = (c.val_s * self._val_scale() - p.val_s) / max(p.val_s, 1e-9) if p.val_s else 0.0
        if abs(val) > abs(step) and abs(val) > 0.05:
            what = f"validation {'slower' if val > 0 else 'faster'} ({c.val_s * self._val_scale():.1f} s, planned {p.val_s:.1f} s)"
        elif abs(step) > 0.02:
            what = f"steps {'slower' if step > 0 else 'faster'} ({c.step_s:.3f} s, planned {p.step_s:.3f} s)"
        else:
            what = "checkpoints and logging took other times than planned"
        return f"{what}: the forecast end moved {format_duration(drift)} {later}"

    def _replan(self, step: int, now: float) -> bool:
        """The largest total that ends by the aim; the decay anchored where the LR is now."""
        s = self.schedule
        epoch_start = s.epoch_of(step) * s.steps_per_epoch
        total, last = fit_plan(step, epoch_start, self.aim - now, self.costs, s, self._val_scale())
        if (total, last) == (s.total, s.last_start):
            return False
        # the decay goes on from the LR of the last step run (index step - 1), over the steps left
        at = max(step - 1, s.optim.warmup_steps)
        done = decay_progress(at, s.total, s.optim, s.anchor) if step - 1 >= s.optim.warmup_steps else 0.0
        self.schedule = s.replanned(total, last, (at, done))
        self.replans += 1
        return True

    def _record(self, step: int, now: float, reason: str) -> dict:
        c, s, scale = self.costs, self.schedule, self._val_scale()
        self.planned = replace(c, val_s=c.val_s * scale)
        e, last = s.steps_per_epoch, s.last_start
        return {
            "kind": PLAN, "step": step, "reason": reason, "total_steps": s.total,
            "epochs": last // e + 1, "steps_per_epoch": e, "last_epoch_start": last, "last_epoch_steps": s.total - last,
            "epochs_left": s.count_epoch_ends(step, s.total), "replans": self.replans,
            "anchor_step": s.anchor[0] if s.anchor else None,
            "anchor_progress": s.anchor[1] if s.anchor else None,
            "time": now, "start": self.start, "elapsed_s": now - self.start,
            "budget_s": self.budget_s, "deadline": self.deadline if self.active else None,
            "aim": self.aim if self.active else None,
            "forecast_end": now + remaining_s(step, s, c, scale), "forecast_band_s": forecast_band_s(step, s, c, scale),
            "step_s": c.step_s, "val_s": c.val_s * scale, "checkpoint_s": c.checkpoint_s,
            "forecast_epoch_s": epoch_forecast_s(s.replanned(e, 0, s.anchor), 0, e, c, bool(s.val_every), scale),
            "forecast_last_epoch_s": epoch_forecast_s(s, last, s.total, c, bool(s.val_every), scale),
        }

    def closing_note(self, step: int) -> str:
        """The end against the budget, for the closing message."""
        if not self.active:
            return ""
        now = time.time()
        early = self.deadline - now
        return (f"; budget {format_duration(self.budget_s)}: ended after {format_duration(now - self.start)} "
                f"({format_duration(early)} {'before' if early >= 0 else 'after'} the deadline {format_clock(self.deadline)}), "
                f"{self.replans} re-plans, LR {self.schedule.lr(step - 1):.3g} at the last step")
