"""Memory and time of each loss term: what it keeps for backward, and forward+backward seconds.

Memory is counted exactly with autograd's saved-tensor hooks (unique storages, so views are not
counted twice); it is the activation memory a term adds on any device. The soft skeleton is also
measured with the classic clDice kernels (``max_pool3d`` erosion and dilation), the baseline for
the int8-coded neighbour kernels in ``vesuvius_lab.losses``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from vesuvius_lab.config import LossConfig, ModelConfig
from vesuvius_lab.losses import TERMS, TopologyLoss, soft_skeleton
from vesuvius_lab.model import as_input, build_model

MB = 2**20


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=128, help="patch edge (default 128)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--features", type=int, nargs="+", default=[32, 64, 128, 256],
                   help="U-Net widths whose activation memory puts the terms in proportion (default: exp001_full's)")


def pooled_erode(x: torch.Tensor) -> torch.Tensor:
    """The classic clDice erosion: the minimum of three 1D min-pools (a 6-neighbourhood cross)."""
    p1 = -F.max_pool3d(-x, (3, 1, 1), 1, (1, 0, 0))
    p2 = -F.max_pool3d(-x, (1, 3, 1), 1, (0, 1, 0))
    p3 = -F.max_pool3d(-x, (1, 1, 3), 1, (0, 0, 1))
    return torch.minimum(torch.minimum(p1, p2), p3)


def pooled_dilate(x: torch.Tensor) -> torch.Tensor:
    """The classic clDice dilation: a 3x3x3 max-pool."""
    return F.max_pool3d(x, 3, 1, 1)


def _saved_mb(fn) -> float:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.backward()
    return sum(storages.values()) / MB


def _measure(fn, leaf: torch.Tensor, repeats: int) -> dict:
    """Saved-for-backward MB and median seconds of forward+backward of ``fn`` (its gradient reaches ``leaf``)."""
    times, mb = [], 0.0
    for _ in range(repeats):
        leaf.grad = None
        t0 = time.perf_counter()
        mb = _saved_mb(fn)
        times.append(time.perf_counter() - t0)
    return {"saved_mb": round(mb, 1), "seconds": round(statistics.median(times), 3)}


def _targets(batch: int, size: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    label = torch.zeros(batch, size, size, size, dtype=torch.uint8)
    label[:, size // 3 : size // 3 + 3] = 1  # a sheet
    label[:, :3] = 2
    return {"label": label, "skeleton": (label == 1).to(torch.uint8),
            "distance": torch.randn(batch, size, size, size, generator=gen)}


def run(args: argparse.Namespace) -> dict:
    shape = (args.batch, 1, args.size, args.size, args.size)
    targets = _targets(args.batch, args.size)
    logits = torch.randn(shape).requires_grad_()
    results = {}
    for term in TERMS:
        weights = {t: 0.0 for t in TERMS}
        weights[term] = 1.0
        loss_fn = TopologyLoss(LossConfig(**weights, topo_every=1))
        results[term] = _measure(lambda: loss_fn(logits, targets, 0)[0], logits, args.repeats)  # noqa: B023
    prob = torch.sigmoid(logits.detach()).requires_grad_()
    iterations = LossConfig().cldice_iterations
    skeletons = {
        name: _measure(lambda: soft_skeleton(prob, iterations, erode, dilate).sum(), prob, args.repeats)  # noqa: B023
        for name, erode, dilate in (("neighbour_kernels", None, None),
                                    ("max_pool3d_baseline", pooled_erode, pooled_dilate))
    }
    base, ours = skeletons["max_pool3d_baseline"], skeletons["neighbour_kernels"]
    skeletons["memory_ratio"] = round(base["saved_mb"] / max(ours["saved_mb"], 1e-9), 2)
    skeletons["speedup"] = round(base["seconds"] / max(ours["seconds"], 1e-9), 2)
    input_mb = logits.numel() * 4 / MB
    model = build_model(ModelConfig(features=args.features))
    image = as_input(torch.randn(shape))
    model_mb = _saved_mb(lambda: sum(o.float().mean() for o in model(image)))
    return {
        "patch": list(shape[2:]), "batch": args.batch,
        "input_mb": round(input_mb, 1),
        "terms": results,
        "soft_skeleton": skeletons,
        "model": {"features": args.features, "saved_mb": round(model_mb, 1)},
        "note": "saved_mb: activation memory held for backward; the logits themselves are input_mb",
    }
