"""Memory and time of each loss term: what it keeps for backward, and forward+backward seconds.

Memory is counted exactly with autograd's saved-tensor hooks (unique storages, so views are not
counted twice); it is the activation memory a term adds on any device. The soft skeleton is also
measured with the classic clDice kernels (``max_pool3d`` erosion and dilation), the baseline for
the int8-coded neighbour kernels in ``vesuvius_lab.losses``. ``--config`` measures a recipe instead:
its patch size, its loss settings and its network (parameters and activation memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vesuvius_lab.config import LossConfig, ModelConfig, load_config
from vesuvius_lab.losses import TERMS, TopologyLoss, soft_skeleton
from vesuvius_lab.model import as_input, build_model, parameter_count

MB = 2**20


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=128, help="patch edge (default 128)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--features", type=int, nargs="+", default=[32, 64, 128, 256],
                   help="U-Net widths whose activation memory puts the terms in proportion (default: exp001_full's)")
    p.add_argument("--config", type=Path,
                   help="a run config (a recipe): its patch size, loss settings and model instead of --size/--features")


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


def _targets(batch: int, patch: tuple[int, int, int]) -> dict:
    gen = torch.Generator().manual_seed(0)
    label = torch.zeros(batch, *patch, dtype=torch.uint8)
    label[:, patch[0] // 3 : patch[0] // 3 + 3] = 1  # a sheet
    label[:, :3] = 2
    return {"label": label, "skeleton": (label == 1).to(torch.uint8),
            "distance": torch.randn(batch, *patch, generator=gen)}


def run(args: argparse.Namespace) -> dict:
    if args.config is not None:
        config = load_config(args.config)
        patch, loss_cfg, model_cfg = tuple(config.data.patch_size), config.loss, config.model
    else:
        patch, loss_cfg, model_cfg = (args.size,) * 3, LossConfig(), ModelConfig(features=args.features)
    shape = (args.batch, 1, *patch)
    targets = _targets(args.batch, patch)
    logits = torch.randn(shape).requires_grad_()
    results = {}
    for term in TERMS:
        weights = {t: 0.0 for t in TERMS}
        weights[term] = 1.0
        starts = {f"{t}_start": 0 for t in TERMS}  # each term measured on its own, whenever its recipe starts it
        loss_fn = TopologyLoss(dataclasses.replace(loss_cfg, **weights, **starts, topo_every=1))
        results[term] = _measure(lambda: loss_fn(logits, targets, 0)[0], logits, args.repeats)  # noqa: B023
    prob = torch.sigmoid(logits.detach()).requires_grad_()
    iterations = loss_cfg.cldice_iterations
    skeletons = {
        name: _measure(lambda: soft_skeleton(prob, iterations, erode, dilate).sum(), prob, args.repeats)  # noqa: B023
        for name, erode, dilate in (("neighbour_kernels", None, None),
                                    ("max_pool3d_baseline", pooled_erode, pooled_dilate))
    }
    base, ours = skeletons["max_pool3d_baseline"], skeletons["neighbour_kernels"]
    skeletons["memory_ratio"] = round(base["saved_mb"] / max(ours["saved_mb"], 1e-9), 2)
    skeletons["speedup"] = round(base["seconds"] / max(ours["seconds"], 1e-9), 2)
    input_mb = logits.numel() * 4 / MB
    model = build_model(model_cfg, list(patch))
    image = as_input(torch.randn(shape))
    model_mb = _saved_mb(lambda: sum(o.float().mean() for o in model(image)))
    described = ({"arch": model_cfg.arch, "res_block": model_cfg.res_block,
                  "features": [model_cfg.base_features, model_cfg.max_features]} if model_cfg.arch == "dynunet"
                 else {"arch": "unet", "features": model_cfg.features})
    return {
        "patch": list(shape[2:]), "batch": args.batch,
        "input_mb": round(input_mb, 1),
        "terms": results,
        "soft_skeleton": skeletons,
        "model": {**described, "parameters": parameter_count(model), "saved_mb": round(model_mb, 1)},
        "note": "saved_mb: activation memory held for backward; the logits themselves are input_mb",
    }
