"""What one optimizer step needs, built once from a config, and the step itself.

The training loop and the planner's measurements run exactly this code: the model (in DDP when
there are several ranks), the optimizer, the precision (``device.amp_dtype``) and the loss; one
step is ``forward_backward`` over ``optim.accumulate`` micro-batches, then ``optimizer_update``
(which also moves the EMA of the weights, ``optim.ema_decay``, when it is on).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vesuvius_lab.augment import apply_batch
from vesuvius_lab.config import Config
from vesuvius_lab.device import AMP_DTYPES, amp_dtype
from vesuvius_lab.losses import TopologyLoss
from vesuvius_lab.model import as_input, build_model
from vesuvius_lab.sampling import PatchDataset
from vesuvius_lab.training.ema import EMA


@dataclass
class Engine:
    model: torch.nn.Module  # DDP-wrapped when world > 1; ``raw_model`` is the module itself
    criterion: TopologyLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    grad_clip: float
    accumulate: int = 1
    world: int = 1
    ema: EMA | None = None  # the averaged weights, when optim.ema_decay is on
    augment_patch: tuple[int, ...] | None = None  # augmentation on the device (augment.where: device): its patch

    @property
    def raw_model(self) -> torch.nn.Module:
        return self.model.module if self.world > 1 else self.model

    @property
    def eval_model(self) -> torch.nn.Module:
        """What validation scores: the EMA of the weights when it is on, else the trained weights."""
        return self.ema.module if self.ema is not None else self.raw_model

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr


@dataclass
class StepResult:
    finite: bool
    loss: float
    terms: dict
    data_wait_s: float
    weights: dict  # "weight_<term>": each term's weight at this step, as its schedule has it


def build_engine(config: Config, dataset: PatchDataset, device: torch.device, world: int = 1,
                 local_rank: int = 0, amp: str | None = None) -> Engine:
    """Model, optimizer, precision and loss as configured (the model wrapped in DDP when world > 1).

    ``amp`` (bf16, fp16, off) replaces ``optim.amp`` on any device, the CPU included: the step
    benchmark times autocast wherever the device has it, while training keeps to ``amp_dtype``."""
    torch.manual_seed(config.training.seed)
    model = build_model(config.model, config.data.patch_size).to(device)
    if world > 1:
        # 1x1x1 head kernels have the same memory in both layouts; DDP's stride warning is moot there.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    o = config.optim
    if o.name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=True, weight_decay=o.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    dtype = amp_dtype(o.amp, device) if amp is None else AMP_DTYPES[amp]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    raw = model.module if world > 1 else model
    ema = EMA(raw, o.ema_decay) if o.ema_decay else None
    criterion = TopologyLoss(config.loss, steps_per_epoch=dataset.layout.steps)
    return Engine(model, criterion, optimizer, scaler, device, dtype, o.grad_clip, o.accumulate, world, ema,
                  dataset.patch if dataset.device_augment else None)


def forward_backward(engine: Engine, batches: Iterator[dict], step: int) -> StepResult:
    """Fetch ``accumulate`` micro-batches, run forward, loss and backward; time the wait for data."""
    e = engine
    data_wait, sums, loss_value, finite = 0.0, {}, 0.0, True
    for micro in range(e.accumulate):
        t0 = time.perf_counter()
        batch = next(batches)
        batch = {k: v.to(e.device, non_blocking=True) for k, v in batch.items()}
        if e.augment_patch is not None:
            batch = apply_batch(batch, e.augment_patch)
        data_wait += time.perf_counter() - t0
        last = micro == e.accumulate - 1
        ctx = e.model.no_sync() if (e.world > 1 and not last) else contextlib.nullcontext()
        with ctx, torch.autocast(e.device.type, dtype=e.amp_dtype or torch.float32, enabled=e.amp_dtype is not None):
            outputs = e.model(as_input(batch["image"]))
            loss, terms = e.criterion(outputs, batch, step)
        finite = finite and bool(torch.isfinite(loss))
        e.scaler.scale(loss / e.accumulate).backward()
        loss_value += float(loss.detach()) / e.accumulate
        for k, v in terms.items():
            if v is not None:
                sums[k] = sums.get(k, 0.0) + v / e.accumulate
    weights = {f"weight_{t}": w for t, w in e.criterion.weights_at(step).items()}
    return StepResult(finite, loss_value, sums, data_wait, weights)


def optimizer_update(engine: Engine, finite: bool) -> tuple[float, bool]:
    """Clip and apply the gradients; returns the grad norm and whether the update was applied.

    A non-finite loss (``finite`` False) or gradient norm drops the step, so bad gradients never
    reach the weights (in bf16 and fp32 nothing else would stop them). With fp16 the GradScaler
    skips overflowing steps itself while it searches its scale; those count as applied."""
    e = engine
    grad_norm, applied = float("nan"), False
    if finite:
        e.scaler.unscale_(e.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(e.model.parameters(), e.grad_clip))
        applied = math.isfinite(grad_norm) or e.scaler.is_enabled()
        if applied:
            e.scaler.step(e.optimizer)
            e.scaler.update()
            if e.ema is not None:
                e.ema.update(e.raw_model)
    e.optimizer.zero_grad(set_to_none=True)
    if e.device.type == "cuda":
        torch.cuda.synchronize(e.device)
    return grad_norm, applied
