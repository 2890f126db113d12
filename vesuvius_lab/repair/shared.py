"""What the repair steps share: the windows they work in, cut along the metric's octants, the
checks a change must pass there, and the background a change may close off.

The metric counts tunnels, components and cavities per octant, so a window is searched within an
octant or, for a hole across a face, checked in each octant's piece of it; a tunnel is found by the
Euler characteristic and a change judged by the metric's own Betti numbers (``vesuvius_lab._betti``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from vesuvius_lab._betti import background_components, betti_numbers, euler_characteristic

JIT = {"nogil": True, "cache": True}  # the numba options of the repair's kernels

# the 3x3x3 neighbourhood: index (dz+1)*9 + (dy+1)*3 + (dx+1), centre 13; then the 26 neighbours alone
OFFSETS = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=np.int64)
N26_OFFSETS = OFFSETS[np.abs(OFFSETS).sum(axis=1) >= 1]


def window_origins(shape: tuple[int, ...], window: int) -> list[tuple[int, int, int]]:
    """Origins of windows of edge ``window`` at half-window steps covering ``shape`` (the last one
    flush with the far face), so every hole narrower than half a window lies inside one of them."""
    axes = []
    for n in shape:
        w = min(window, n)
        step = max(w // 2, 1)
        starts = list(range(0, n - w + 1, step))
        if starts[-1] != n - w:
            starts.append(n - w)
        axes.append(starts)
    return list(itertools.product(*axes))


def _window(origin: tuple[int, int, int], window: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(o, min(o + window, n)) for o, n in zip(origin, shape, strict=True))


def tunnel_windows(mask: np.ndarray, window: int,
                   crossing: Sequence[Sequence[int]] | None = None) -> list[tuple[slice, ...]]:
    """Windows whose foreground has a tunnel by its Euler characteristic (beta1 >= beta0 - chi);
    with ``crossing`` (per axis, the coordinates of faces), only windows that straddle a face."""
    import cc3d

    mask = np.asarray(mask, dtype=np.uint8)
    found = []
    for origin in window_origins(mask.shape, window):
        sl = _window(origin, window, mask.shape)
        if crossing is not None and not any(s.start < f < s.stop for s, faces in zip(sl, crossing, strict=True)
                                            for f in faces):
            continue
        sub = np.ascontiguousarray(mask[sl])
        if not sub.any():
            continue
        chi = euler_characteristic(sub)
        b0 = cc3d.connected_components(sub, connectivity=6, return_N=True)[1]
        if b0 - chi > 0:
            found.append(sl)
    return found


def repair_windows(mask: np.ndarray, window: int,
                   across: bool = True) -> list[tuple[tuple[slice, ...], list[tuple[slice, ...]]]]:
    """Windows to repair, each with the pieces of it in the metric's octants (which count their
    tunnels, components and cavities apart): first ``tunnel_windows`` within each octant, then, with
    ``across``, those of the whole volume that straddle an octant's face, for holes that lie across
    one. A change is checked in its window and, when the window straddles a face, in each octant's
    piece of it."""
    from vesuvius_lab.leaderboard import octant_slices

    octants = octant_slices(mask.shape)
    found = []
    for part in octants:
        off = [s.start for s in part]
        found += [(tuple(slice(s.start + o, s.stop + o) for s, o in zip(sl, off, strict=True)), [])
                  for sl in tunnel_windows(mask[part], window)]
    faces = [sorted({s.start for s in axis} - {0}) for axis in zip(*octants, strict=True)]
    for sl in tunnel_windows(mask, window, crossing=faces) if across else []:
        pieces = []
        for part in octants:
            lo = [max(a.start, b.start) for a, b in zip(sl, part, strict=True)]
            hi = [min(a.stop, b.stop) for a, b in zip(sl, part, strict=True)]
            if all(h > l for l, h in zip(lo, hi, strict=True)):
                pieces.append(tuple(slice(l - a.start, h - a.start) for l, h, a in zip(lo, hi, sl, strict=True)))
        if len(pieces) > 1:
            found.append((sl, pieces))
    return found


def octants_keep(before: np.ndarray, after: np.ndarray, pieces: list[tuple[slice, ...]]) -> bool:
    """No octant piece of a window gains a component, tunnel or cavity from the change."""
    for piece in pieces:
        b, a = betti_numbers(before[piece]), betti_numbers(after[piece])
        if a[0] > b[0] or a[1] > b[1] or a[2] > b[2]:
            return False
    return True


def euler_gain(before: np.ndarray, after: np.ndarray) -> int:
    """chi(after) - chi(before), for crops of two masks to the box of the voxels they differ in,
    grown by one voxel: the cells elsewhere are the same in both, so this is the change of the
    whole mask's chi. A change that removes a tunnel and nothing else raises chi by one (chi =
    beta0 - beta1 + beta2): a cheap necessary condition before the exact Betti numbers."""
    return euler_characteristic(after) - euler_characteristic(before)


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The bounding box of a mask's voxels, grown by ``margin`` within the array."""
    out = []
    for axis in range(3):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        out.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + margin + 1, mask.shape[axis])))
    return tuple(out)


def grow_box(box: tuple[slice, ...], margin: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """``box`` grown by ``margin`` within an array of ``shape``."""
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape, strict=True))


def enclosed_background(mask: np.ndarray) -> np.ndarray:
    """Background (26-connected) that does not reach the array's faces: a window's pockets, a
    volume's cavities."""
    labels, outside = background_components(mask)
    return ~outside[labels]


def no_new_cavities(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """``after`` with the cavities it has and ``before`` had not filled: a change checked in its
    window may close off background that reaches the window's faces but not the volume's."""
    import cc3d

    cavities = enclosed_background(after)
    if not cavities.any():
        return after
    labels, n = cc3d.connected_components(cavities.astype(np.uint8), connectivity=26, return_N=True)
    new = np.zeros(n + 1, bool)
    new[np.unique(labels[cavities & ~enclosed_background(before)])] = True
    new[0] = False
    return after | new[labels]
