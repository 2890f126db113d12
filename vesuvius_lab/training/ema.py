"""An exponential moving average of the weights (``optim.ema_decay``), as the leaderboard's recipes keep.

After every applied optimizer step the average moves toward the trained weights:
``ema = d * ema + (1 - d) * w`` with ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates (the
warm-up of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``), so early averages are not
stuck at the random initialisation. It is a function of the update count alone, which the
checkpoint keeps with the averaged weights: a resumed run's average is bitwise the uninterrupted one.

A checkpoint's ``model`` is always the trained weights (what training resumes from); ``ema`` holds
``{"model": averaged weights, "updates": n, "decay": d}``. When EMA is on, validation scores the
average, so ``best.pt`` is the checkpoint whose *average* scored best, and predict, evaluate and
notebook 05 load the average (``inference.model_from_checkpoint``).
"""

from __future__ import annotations

import copy
import logging

import torch


class EMA:
    """The averaged copy of a model, on the model's device, never trained itself."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One step toward ``model``'s weights (floating-point entries; others, e.g. counters, copied)."""
        d = self.current_decay()
        averaged, trained = [], []
        for e, w in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if e.is_floating_point():
                averaged.append(e)
                trained.append(w.detach())
            else:
                e.copy_(w)
        if averaged:
            torch._foreach_lerp_(averaged, trained, 1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])

    def reset(self, model: torch.nn.Module) -> None:
        """Start the average afresh from ``model``'s weights (a resumed run that turned EMA on)."""
        self.module.load_state_dict(model.state_dict())
        self.updates = 0


def resume_ema(ema: EMA | None, model: torch.nn.Module, ckpt: dict, log: logging.Logger | None) -> None:
    """Restore the average a checkpoint holds; one written without EMA (turned on at this resume)
    starts the average from the resumed weights (``model``), and says so."""
    if ema is None:
        return
    if "ema" in ckpt:
        ema.load_state_dict(ckpt["ema"])
        return
    ema.reset(model)
    if log is not None:
        log.warning("the checkpoint holds no EMA of the weights (optim.ema_decay was off): "
                    "the average starts from the resumed weights at step %d", ckpt["step"])
