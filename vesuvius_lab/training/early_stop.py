"""Early stopping (``training.early_stop_patience``, ``training.early_stop_min_delta``), as
Lightning's ``EarlyStopping(mode="max")``: a run whose validation score has not improved by
``min_delta`` over its last ``patience`` validations ends, finished, after that validation's
checkpoint.

The state (the best score that counted as an improvement, the validations since) is a function of
the validation scores alone and every checkpoint keeps it, so a killed and resumed run stops at the
step an unbroken one stops at.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from vesuvius_lab.config import TrainingConfig


@dataclass
class EarlyStop:
    patience: int | None  # validations without improvement before the run ends; None: off
    min_delta: float = 0.0  # what counts as an improvement: a score above best + min_delta
    best: float = -math.inf  # the score of the last improvement
    since: int = 0  # validations since the last improvement
    stopped_at: int | None = None  # the step whose validation ended the run

    @classmethod
    def for_run(cls, training: TrainingConfig, saved: dict | None) -> EarlyStop:
        """As configured, continuing the state a checkpoint kept (``state_dict``)."""
        stop = cls(training.early_stop_patience, training.early_stop_min_delta)
        if saved:
            stop.best, stop.since, stop.stopped_at = saved["best"], saved["since"], saved["stopped_at"]
        return stop

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    def after_validation(self, step: int, score: float) -> bool:
        """Count the validation at ``step``; True when it ends the run."""
        if score > self.best + self.min_delta:
            self.best, self.since = score, 0
        else:
            self.since += 1
        if self.patience is not None and self.since >= self.patience:
            self.stopped_at = step
        return self.stopped

    def reason(self) -> str:
        return (f"no validation improved the score by more than {self.min_delta:g} over "
                f"{self.best:.4f} in the last {self.patience} (training.early_stop_patience)")

    def state_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in ("best", "since", "stopped_at")}
