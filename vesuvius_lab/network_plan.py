"""nnU-Net's rule for a U-Net's shape from its patch size: no torch, so configs can check it.

The planner of nnU-Net v2 (``ExperimentPlanner.get_plans_for_configuration`` ->
``network_topology.get_pool_and_conv_props``) decides how many stages a U-Net has, each stage's
stride and kernel size, and the multiple the patch must be, from the patch size and the voxel
spacing; widths double from 32 per stage up to 320 (3D). ``model.arch: dynunet`` is built from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NNUNET_MIN_EDGE = 4  # nnU-Net's UNet_featuremap_min_edge_length: the bottleneck keeps >= 4 voxels per axis


@dataclass(frozen=True)
class Topology:
    """A U-Net's shape as nnU-Net plans it for one patch size (``get_pool_and_conv_props``)."""

    strides: list[list[int]]  # per stage; the first is [1, 1, 1] (the input block)
    kernels: list[list[int]]  # per stage
    divisor: list[int]  # the patch must be a multiple of this on each axis
    padded_patch: list[int]  # the patch nnU-Net would train with: each axis rounded up to a multiple

    @property
    def stages(self) -> int:
        return len(self.strides)


def nnunet_plan(patch_size: list[int], spacing: tuple[float, ...] = (1.0, 1.0, 1.0),
                    min_edge: int = NNUNET_MIN_EDGE) -> Topology:
    """Stages, strides and kernel sizes for ``patch_size``, by nnU-Net's rule (ExperimentPlanner ->
    network_topology.get_pool_and_conv_props, nnU-Net v2; our CT is isotropic, so ``spacing`` is 1).

    Each round pools (stride 2) every axis that still has at least ``2 * min_edge`` voxels and whose
    spacing is within a factor 2 of the finest; a lone axis pools only while it has ``3 * min_edge``.
    An axis's kernel becomes 3 once its spacing is within a factor 2 of the finest. The bottleneck
    gets a 3x3x3 kernel. A patch whose sides are not multiples of 2^pools is padded up by nnU-Net.
    """
    dim = len(patch_size)
    spacing_now, size = list(spacing), [float(p) for p in patch_size]
    pools, kernel = [0] * dim, [1] * dim
    strides, kernels = [[1] * dim], []
    while True:
        axes = [d for d in range(dim) if size[d] >= 2 * min_edge]
        if not axes:
            break
        finest = min(spacing_now[d] for d in axes)
        axes = [d for d in axes if spacing_now[d] / finest < 2]
        if len(axes) == 1 and size[axes[0]] < 3 * min_edge:
            break
        if not axes:
            break
        finest_all = min(spacing_now)
        kernel = [3 if kernel[d] == 3 or spacing_now[d] / finest_all < 2 else 1 for d in range(dim)]
        stride = [2 if d in axes else 1 for d in range(dim)]
        for d in axes:
            pools[d] += 1
            spacing_now[d] *= 2
            size[d] = math.ceil(size[d] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)
    divisor = [2**p for p in pools]
    padded = [math.ceil(p / k) * k for p, k in zip(patch_size, divisor, strict=True)]
    return Topology(strides, kernels, divisor, padded)


def stage_widths(stages: int, base: int, cap: int) -> list[int]:
    """nnU-Net's widths: ``base`` doubling per stage, capped (32 -> 320 in 3D)."""
    return [min(base * 2**i, cap) for i in range(stages)]
