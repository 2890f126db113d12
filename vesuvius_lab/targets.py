"""Targets for the topology-aware losses, computed once per volume and cached (never per patch).

- ``skeleton``: the medial surface of label 1. 3D skeletonization collapses a sheet to curves, so
  the volume is sliced across the sheets and each slice's sheet cross-sections are thinned to
  their centre lines; stacked, those lines form the sheet's medial surface.
- ``distance``: signed distance to the label-1 boundary (negative inside, positive outside),
  clipped to +-DISTANCE_CLIP, from the ``edt`` package (~13x faster than scipy here).
- ``fg_points``: a deterministic subsample of label-1 voxel locations for foreground draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import edt
import numpy as np
from skimage.morphology import skeletonize

from vesuvius_lab.cache import CachedVolume, VolumeCache

TARGETS_VERSION = "1"
DISTANCE_CLIP = 16.0


def slicing_axis(fg: np.ndarray) -> int:
    """The axis most parallel to the sheets: slices across it cut through the sheets.

    Sheets are crossed most often along their normal; the axis with the fewest 0->1 transitions
    is the one that lies most within the sheet planes.
    """
    crossings = [int(np.count_nonzero(np.diff(fg, axis=a) > 0)) for a in range(3)]
    return int(np.argmin(crossings))


def medial_surface(label: np.ndarray) -> np.ndarray:
    """uint8 medial surface of label 1, by per-slice 2D skeletonization across the sheets."""
    fg = np.asarray(label) == 1
    out = np.zeros(fg.shape, dtype=np.uint8)
    if not fg.any():
        return out
    axis = slicing_axis(fg.view(np.uint8))
    fg_t, out_t = np.moveaxis(fg, axis, 0), np.moveaxis(out, axis, 0)
    for i in range(fg_t.shape[0]):
        if fg_t[i].any():
            out_t[i] = skeletonize(fg_t[i])
    return out


def signed_distance(label: np.ndarray) -> np.ndarray:
    """float16 signed distance to the label-1 surface: negative inside, positive outside, clipped."""
    fg = np.ascontiguousarray(np.asarray(label) == 1)
    if not fg.any():
        return np.full(fg.shape, DISTANCE_CLIP, dtype=np.float16)
    dist = -edt.sdf(fg.view(np.uint8), parallel=1)
    return np.clip(dist, -DISTANCE_CLIP, DISTANCE_CLIP).astype(np.float16)


def fg_points(label: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    """Up to ``max_points`` label-1 voxel coordinates (int32, (N, 3)), deterministic."""
    coords = np.argwhere(np.asarray(label) == 1).astype(np.int32)
    if len(coords) > max_points:
        keep = np.random.default_rng(seed).choice(len(coords), size=max_points, replace=False)
        coords = coords[np.sort(keep)]
    return coords.reshape(-1, 3)


@dataclass(frozen=True)
class VolumeTargets:
    volume: CachedVolume
    skeleton: np.ndarray
    distance: np.ndarray
    fg_points: np.ndarray


def load_targets(cache: VolumeCache, volume: CachedVolume, max_fg_points: int) -> VolumeTargets:
    """The volume's cached targets, computed on first use and whenever the volume changes."""
    version = f"{TARGETS_VERSION}-clip{DISTANCE_CLIP}"
    return VolumeTargets(
        volume=volume,
        skeleton=cache.derived(volume, "skeleton", version, lambda v: medial_surface(v.label)),
        distance=cache.derived(volume, "distance", version, lambda v: signed_distance(v.label)),
        fg_points=cache.derived(volume, f"fg_points{max_fg_points}", version, lambda v: fg_points(v.label, max_fg_points)),
    )
