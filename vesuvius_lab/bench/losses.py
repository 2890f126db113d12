"""Memory and time of each loss term: what it keeps for backward, and forward+backward seconds.

Memory is counted exactly with autograd's saved-tensor hooks (unique storages, so views are not
counted twice); it is the activation memory a term adds on any device. clDice is also measured
without activation checkpointing, the baseline that shows why its soft skeleton is recomputed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vesuvius_lab.config import LossConfig
from vesuvius_lab.losses import TERMS, TopologyLoss, soft_skeleton

MB = 2**20


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=128, help="patch edge (default 128)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)


def _saved_mb(fn) -> float:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.backward()
    return sum(storages.values()) / MB


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
        times = []
        for _ in range(args.repeats):
            logits.grad = None
            t0 = time.perf_counter()
            mb = _saved_mb(lambda: loss_fn(logits, targets, 0)[0])
            times.append(time.perf_counter() - t0)
        results[term] = {"saved_mb": round(mb, 1), "seconds": round(statistics.median(times), 3)}
    prob = torch.sigmoid(logits.detach()).requires_grad_()
    plain = _saved_mb(lambda: soft_skeleton(prob, LossConfig().cldice_iterations).sum())
    input_mb = logits.numel() * 4 / MB
    return {
        "patch": list(shape[2:]), "batch": args.batch,
        "input_mb": round(input_mb, 1),
        "terms": results,
        "cldice_without_checkpointing_saved_mb": round(plain, 1),
        "note": "saved_mb: activation memory held for backward; the logits themselves are input_mb",
    }
