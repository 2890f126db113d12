"""The run's schedule, with no clock in it: where epochs end, which of them validate, where
checkpoints fall and the LR of each step.

The loop follows it step by step; the time budget and the planner count from it (the closed-form
counts over an interval of steps), so what is forecast is what the loop does. A time budget
re-plans by swapping in another schedule (``replanned``): a new total, a new start of the last
epoch and a new LR anchor, the rest unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vesuvius_lab.config import Config, OptimConfig


def decay_progress(step: int, total: int, cfg: OptimConfig, anchor: tuple[int, float] | None = None) -> float:
    """How far the decay has gone at ``step`` (0 at the end of warm-up, 1 at ``total``).

    ``anchor`` (step, progress) re-plans the decay when the total changes mid-run (a time budget):
    from the last step run, the remaining progress is spread over the steps left, so the LR goes on
    from where it was, without a jump, and the last step (``total - 1``) runs at the final LR."""
    if anchor is None:
        return min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    at, done = anchor
    return done + (1.0 - done) * min(1.0, max(0.0, (step - at) / max(1, total - 1 - at)))


def lr_at(step: int, total: int, cfg: OptimConfig, anchor: tuple[int, float] | None = None) -> float:
    """Linear warmup, then poly or cosine decay, as a function of the optimizer step only (and of
    the re-plan ``anchor``, see ``decay_progress``)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = decay_progress(step, total, cfg, anchor)
    if cfg.schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        factor = (1 - progress) ** cfg.poly_power
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


def _multiples(n: int, a: int, b: int) -> int:
    """Multiples of ``n`` in (a, b]."""
    return max(0, b // n - a // n) if n > 0 else 0


@dataclass(frozen=True)
class Schedule:
    """Steps are counted as done (``done`` steps: 1 after the first step). Epochs are
    ``steps_per_epoch`` long, except the last, from ``last_start`` to ``total``, which a time budget
    makes longer or shorter."""

    steps_per_epoch: int
    total: int
    last_start: int  # where the last epoch begins: a multiple of steps_per_epoch
    val_every: int = 0  # epochs; 0: never (none configured, or no validation volumes)
    checkpoint_every: int = 0  # steps; 0: at epoch ends only
    final_val: bool = False  # the last epoch always validates (a budget run)
    optim: OptimConfig = field(default_factory=OptimConfig)
    anchor: tuple[int, float] | None = None  # the LR decay's re-plan anchor (``decay_progress``)

    @classmethod
    def from_config(cls, config: Config, steps_per_epoch: int, has_val: bool) -> Schedule:
        """The schedule as configured: ``max_epochs`` whole epochs."""
        t = config.training
        total = t.max_epochs * steps_per_epoch
        return cls(steps_per_epoch, total, max(0, (total - 1) // steps_per_epoch * steps_per_epoch),
                   t.val_every_epochs if has_val else 0, t.checkpoint_every_steps,
                   final_val=bool(t.time_budget_hours), optim=config.optim)

    def replanned(self, total: int, last_start: int, anchor: tuple[int, float] | None) -> Schedule:
        """The same cadence and optimizer over another total and last epoch, from another LR anchor."""
        return Schedule(self.steps_per_epoch, total, last_start, self.val_every, self.checkpoint_every,
                        self.final_val, self.optim, anchor)  # not dataclasses.replace: a re-plan calls it often

    def epoch_of(self, step: int) -> int:
        """The epoch of the step with index ``step`` (0-based)."""
        return step // self.steps_per_epoch if step < self.last_start else self.last_start // self.steps_per_epoch

    def epoch_end(self, done: int) -> bool:
        """Whether ``done`` steps close an epoch."""
        return done == self.total or (done <= self.last_start and done % self.steps_per_epoch == 0)

    def validates(self, done: int) -> bool:
        """Whether the epoch that ``done`` steps close validates: every ``val_every``-th epoch, and
        the last one of a budget run."""
        if not (self.val_every and self.epoch_end(done)):
            return False
        return (self.final_val and done == self.total) or (self.epoch_of(done - 1) + 1) % self.val_every == 0

    def checkpoints(self, done: int) -> bool:
        """Whether a checkpoint is written after ``done`` steps: at each epoch end, and every
        ``checkpoint_every`` steps."""
        return self.epoch_end(done) or bool(self.checkpoint_every and done % self.checkpoint_every == 0)

    def lr(self, step: int) -> float:
        """The LR of the step with index ``step`` (0-based)."""
        return lr_at(step, self.total, self.optim, self.anchor)

    # -- what falls in the steps (a, b], in closed form --
    def _whole_ends_upto(self, b: int) -> int:
        """The last step that can close a whole epoch (not the run's end) up to ``b``."""
        return min(b, self.last_start, self.total - 1)

    def _ends_at_total(self, a: int, b: int) -> bool:
        return a < self.total <= b

    def count_epoch_ends(self, a: int, b: int) -> int:
        return _multiples(self.steps_per_epoch, a, self._whole_ends_upto(b)) + self._ends_at_total(a, b)

    def count_validations(self, a: int, b: int) -> int:
        if not self.val_every:
            return 0
        whole = _multiples(self.steps_per_epoch * self.val_every, a, self._whole_ends_upto(b))
        return whole + (self._ends_at_total(a, b) and self.validates(self.total))

    def count_checkpoints(self, a: int, b: int) -> int:
        """Epoch ends, and the multiples of ``checkpoint_every`` that are not epoch ends."""
        c = self.checkpoint_every
        if not c:
            return self.count_epoch_ends(a, b)
        periodic = _multiples(c, a, min(b, self.total)) - (self._ends_at_total(a, b) and self.total % c == 0)
        shared = _multiples(math.lcm(c, self.steps_per_epoch), a, self._whole_ends_upto(b))
        return self.count_epoch_ends(a, b) + periodic - shared
