"""The loss terms of the topology-aware objective, and their weighted, deep-supervised sum.

Each term is a record of ``loss_terms.REGISTRY`` (its config keys, log fields and plot line follow
from it) and a function in ``FUNCTIONS`` here.

Every term masks label 2 (ignored), stays finite on empty patches, runs in fp32 even under
autocast, and is skipped entirely while its weight is 0: a term may start late and ramp in
(``loss.<term>_start`` / ``_ramp``, ScrollPrize's ``start_epoch``), and until it starts it costs
nothing and logs None. Targets: ``label`` (0/1/2), ``skeleton``
(precomputed medial surface of label 1) and ``distance`` (precomputed signed distance, negative
inside), as produced by the patch pipeline.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import cripser
import numpy as np
import torch
import torch.nn.functional as F

from vesuvius_lab.config import LossConfig
from vesuvius_lab.layout import IGNORE_LABEL
from vesuvius_lab.loss_terms import REGISTRY
from vesuvius_lab.targets import DISTANCE_CLIP

TERMS = tuple(term.name for term in REGISTRY)
EPS = 1.0


def weighted_bce(logits, fg, valid, pos_weight: float) -> torch.Tensor:
    """Mean BCE over non-ignored voxels; label-1 voxels weigh ``pos_weight`` (sheets are ~5 % of voxels)."""
    weight = torch.tensor(pos_weight, device=logits.device, dtype=logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, fg, pos_weight=weight, reduction="none")
    return (loss * valid).sum() / valid.sum().clamp(min=1)


def soft_dice(prob, fg, valid) -> torch.Tensor:
    """Batch soft Dice over non-ignored voxels; an empty patch predicted empty costs 0."""
    inter = (prob * fg * valid).sum()
    return 1 - (2 * inter + EPS) / ((prob * valid).sum() + (fg * valid).sum() + EPS)


def _shifted(x: torch.Tensor, dim: int, step: int) -> torch.Tensor:
    """x[i + step] along ``dim`` (step is -1 or +1), the edge voxel repeated past the border."""
    n = x.shape[dim]
    if step < 0:
        return torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)
    return torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)


class _NeighbourExtremum(torch.autograd.Function):
    """Max (or min) of each voxel and its neighbours one step along the given axes.

    Same values as the equivalent ``max_pool3d`` and the same gradients wherever the winner is
    unique, but what it keeps for backward is one int8 code per voxel (which neighbour won) instead
    of pooling's int64 indices (8x less memory, about 2x faster on CPU at 128^3). Ties go to the
    voxel itself, so a repeated border voxel never wins.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dims: tuple[int, ...], take_min: bool) -> torch.Tensor:
        moves = [(d, s) for d in dims for s in (-1, 1)]
        out = x.clone()
        code = torch.zeros(x.shape, dtype=torch.int8, device=x.device)
        for k, (d, s) in enumerate(moves, start=1):
            v = _shifted(x, d, s)
            better = v < out if take_min else v > out
            out = torch.where(better, v, out)
            code.masked_fill_(better, k)
        ctx.save_for_backward(code)
        ctx.moves = moves
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (code,) = ctx.saved_tensors
        grad_in = torch.where(code == 0, grad, 0.0)
        for k, (d, s) in enumerate(ctx.moves, start=1):
            won = torch.where(code == k, grad, 0.0)
            n = grad.shape[d]
            # the value at i came from i + s: send its gradient back there
            if s < 0:
                grad_in.narrow(d, 0, n - 1).add_(won.narrow(d, 1, n - 1))
            else:
                grad_in.narrow(d, 1, n - 1).add_(won.narrow(d, 0, n - 1))
        return grad_in, None, None


def _soft_erode(x: torch.Tensor) -> torch.Tensor:
    """Min over the 6-neighbourhood cross (a (B, C, Z, Y, X) tensor)."""
    return _NeighbourExtremum.apply(x, (2, 3, 4), True)


def _soft_dilate(x: torch.Tensor) -> torch.Tensor:
    """Max over the 3x3x3 cube, as three separable 1D passes."""
    for d in (2, 3, 4):
        x = _NeighbourExtremum.apply(x, (d,), False)
    return x


Kernel = Callable[[torch.Tensor], torch.Tensor]


def soft_skeleton(x: torch.Tensor, iterations: int, erode: Kernel | None = None, dilate: Kernel | None = None) -> torch.Tensor:
    """Differentiable skeleton (Shit et al., clDice): what opening removes, over repeated erosions.

    ``erode``/``dilate`` default to the int8-coded neighbour kernels; benchmarks pass the classic
    ``max_pool3d`` ones to compare.
    """
    erode, dilate = erode or _soft_erode, dilate or _soft_dilate
    skel = F.relu(x - dilate(erode(x)))
    for _ in range(iterations):
        x = erode(x)
        delta = F.relu(x - dilate(erode(x)))
        skel = skel + F.relu(delta - skel * delta)
    return skel


def cl_dice(prob, fg, valid, skeleton_gt, iterations: int) -> torch.Tensor:
    """clDice with the prediction's soft skeleton and the precomputed medial surface as GT skeleton."""
    p = prob * valid
    skel_p = soft_skeleton(p, iterations)
    t_prec = ((skel_p * fg).sum() + EPS) / (skel_p.sum() + EPS)
    t_sens = ((skeleton_gt * p).sum() + EPS) / (skeleton_gt.sum() + EPS)
    return 1 - 2 * t_prec * t_sens / (t_prec + t_sens)


def skeleton_recall(prob, valid, skeleton_gt) -> torch.Tensor:
    """Share of the medial surface the prediction misses (Kirchhoff et al., Skeleton Recall)."""
    s = skeleton_gt * valid
    return 1 - ((prob * s).sum() + EPS) / (s.sum() + EPS)


def surface_loss(prob, valid, distance) -> torch.Tensor:
    """Boundary loss (Kervadec et al.): probability mass weighted by the signed distance map."""
    return (prob * (distance / DISTANCE_CLIP) * valid).sum() / valid.sum().clamp(min=1)


def _finite_pairs(f: np.ndarray) -> np.ndarray:
    """Finite persistence pairs of a sublevel filtration: rows (dim, birth, death, bz, by, bx, dz, dy, dx)."""
    ph = cripser.computePH(np.ascontiguousarray(f, dtype=np.float64), maxdim=2)
    return ph[ph[:, 2] < 1e300]


def topo_loss(prob, fg, valid, downsample: int) -> torch.Tensor:
    """TopLoss: persistence of the prediction matched to the Betti numbers of the ground truth.

    On the pooled probability map, per homology dimension, the k most persistent features of the
    prediction are pushed to persistence 1 and the rest to 0, where k counts the features of the
    ground truth. Gradients reach the birth and death voxels of each pair.
    """
    k = max(1, downsample)
    p = F.avg_pool3d(prob * valid, k, k) if k > 1 else prob * valid
    g = F.max_pool3d(fg * valid, k, k) if k > 1 else fg * valid
    total = prob.new_zeros(())
    for b in range(p.shape[0]):
        pb = p[b, 0]
        pred = _finite_pairs(1 - pb.detach().cpu().numpy())
        gt = _finite_pairs(1 - g[b, 0].cpu().numpy())
        for dim in range(3):
            rows = pred[pred[:, 0] == dim]
            if len(rows) == 0:
                continue
            n_gt = int(((gt[:, 0] == dim) & (gt[:, 2] - gt[:, 1] > 0.5)).sum())
            birth = torch.as_tensor(rows[:, 3:6], dtype=torch.long, device=p.device)
            death = torch.as_tensor(rows[:, 6:9], dtype=torch.long, device=p.device)
            pers = pb[tuple(birth.T)] - pb[tuple(death.T)]  # f = 1 - p, so persistence = p_b - p_d
            order = torch.argsort(pers.detach(), descending=True)
            keep, drop = order[:n_gt], order[n_gt:]
            total = total + ((1 - pers[keep]) ** 2).sum() + (pers[drop] ** 2).sum()
    return total / p.shape[0]


def ramp_factor(step: int, start: int, ramp: int) -> float:
    """Share of a term's weight at the 0-based optimizer step ``step``: 0 for the first ``start``
    steps, then rising linearly to 1 over ``ramp`` steps (at once when ``ramp`` is 0)."""
    if step < start:
        return 0.0
    return 1.0 if ramp <= 0 else min(1.0, (step - start + 1) / ramp)


def _downsample_targets(batch: dict, shape: tuple[int, ...]) -> dict:
    """Targets at a head's resolution ``shape`` (Z, Y, X): every k-th label, the skeleton max-pooled
    (thin sheets survive), distances in coarse voxels. nnU-Net's planner may stride axes differently."""
    full = tuple(batch["label"].shape[1:])
    if full == tuple(shape):
        return batch
    factors = tuple(f // s for f, s in zip(full, shape, strict=True))
    if any(f * k != n for f, k, n in zip(shape, factors, full, strict=True)):
        raise ValueError(f"a deep-supervision head of shape {tuple(shape)} does not divide the patch {full}")
    z, y, x = (slice(None, None, k) for k in factors)
    skel = batch["skeleton"].float()[:, None]
    return {
        "label": batch["label"][:, z, y, x],
        "skeleton": F.max_pool3d(skel, factors, factors)[:, 0],
        "distance": batch["distance"][:, z, y, x] / max(factors),
    }


class Head:
    """One output's logits and its targets (at the output's resolution), in the forms the terms
    take: fp32 with a channel axis. The skeleton and distance are read only by terms that use them."""

    def __init__(self, logits: torch.Tensor, targets: dict):
        self.logits = logits.float()
        label = targets["label"][:, None]
        self.valid = (label != IGNORE_LABEL).float()
        self.fg = (label == 1).float()
        self.prob = torch.sigmoid(self.logits)
        self.targets = targets

    @functools.cached_property
    def skeleton(self) -> torch.Tensor:
        return self.targets["skeleton"].float()[:, None]

    @functools.cached_property
    def distance(self) -> torch.Tensor:
        return self.targets["distance"].float()[:, None]


# term -> its value on one head at the 0-based optimizer step; None: not computed at this step
FUNCTIONS: dict[str, Callable[[Head, LossConfig, int], torch.Tensor | None]] = {
    "bce": lambda h, c, step: weighted_bce(h.logits, h.fg, h.valid, c.pos_weight),
    "dice": lambda h, c, step: soft_dice(h.prob, h.fg, h.valid),
    "cldice": lambda h, c, step: cl_dice(h.prob, h.fg, h.valid, h.skeleton * h.valid, c.cldice_iterations),
    "skeleton_recall": lambda h, c, step: skeleton_recall(h.prob, h.valid, h.skeleton),
    "surface": lambda h, c, step: surface_loss(h.prob, h.valid, h.distance),
    "topo": lambda h, c, step: (topo_loss(h.prob, h.fg, h.valid, c.topo_downsample)
                                if c.topo_every > 0 and step % c.topo_every == 0 else None),
}


class TopologyLoss(torch.nn.Module):
    """Weighted sum of the terms, deep-supervised; returns (total, per-term values at full scale).

    ``steps_per_epoch`` turns starts written in epochs (``loss.schedule_unit: epoch``) into steps."""

    def __init__(self, cfg: LossConfig, steps_per_epoch: int = 1):
        super().__init__()
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch

    def weight(self, term: str, step: int | None = None) -> float:
        """The term's weight; at ``step`` (0-based optimizer step) as its schedule has it."""
        full = float(getattr(self.cfg, term))
        if step is None:
            return full
        start = getattr(self.cfg, f"{term}_start") * (self.steps_per_epoch if self.cfg.schedule_unit == "epoch" else 1)
        return full * ramp_factor(step, start, getattr(self.cfg, f"{term}_ramp"))

    def weights_at(self, step: int) -> dict[str, float]:
        """Every term's effective weight at ``step`` (what the log records as ``weight_<term>``)."""
        return {t: self.weight(t, step) for t in TERMS}

    def forward(self, outputs, targets: dict, step: int = 0) -> tuple[torch.Tensor, dict[str, float | None]]:
        outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
        weights = self.weights_at(step)
        active = [t for t in TERMS if weights[t] > 0]
        scale_w = [0.5**j for j in range(len(outputs))]
        norm = sum(scale_w)
        device_type = outputs[0].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            total = outputs[0].new_zeros((), dtype=torch.float32)
            logged: dict[str, torch.Tensor] = {}
            for j, logits in enumerate(outputs):
                head = Head(logits, _downsample_targets(targets, logits.shape[2:]))
                names = active if j == 0 else [t for t in active if t in self.cfg.deep_supervision_terms]
                values = {n: v for n in names if (v := FUNCTIONS[n](head, self.cfg, step)) is not None}
                for name, value in values.items():
                    total = total + (scale_w[j] / norm) * weights[name] * value
                if j == 0:
                    logged = values
        names = list(logged)
        numbers = torch.stack([logged[n].detach() for n in names]).tolist() if names else []
        report: dict[str, float | None] = {t: None for t in TERMS}
        report.update({n: (v if math.isfinite(v) else float("nan")) for n, v in zip(names, numbers, strict=True)})
        return total, report
