"""``split_bridges``: sheets merged through thin bridges, cut apart.

Two label sheets touching through a bridge count as one component for Betti-0 and for VOI (its
components are 26-connected). Cores (the mask where the probability is high and the sheet is
thick) seed a geodesic partition of each component; where two cores' regions meet, the seam is
removed, so the sheets they belong to are no longer 26-connected. A component with one core is
left as it is.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from vesuvius_lab.repair.shared import JIT, N26_OFFSETS


@nb.njit(**JIT)
def _geodesic_partition(mask, seeds, offsets):
    """Grow the seed labels through the mask breadth-first (26-neighbours): each mask voxel gets the
    label of the seed nearest along the mask. Unreached voxels keep 0."""
    Z, Y, X = mask.shape
    lab = seeds.copy()
    n = Z * Y * X
    queue = np.empty(n, np.int64)
    head, tail = 0, 0
    flat = lab.ravel()
    for i in range(n):
        if flat[i] > 0:
            queue[tail] = i
            tail += 1
    while head < tail:
        i = queue[head]
        head += 1
        z, r = divmod(i, Y * X)
        y, x = divmod(r, X)
        for k in range(offsets.shape[0]):
            zz, yy, xx = z + offsets[k, 0], y + offsets[k, 1], x + offsets[k, 2]
            if zz < 0 or yy < 0 or xx < 0 or zz >= Z or yy >= Y or xx >= X:
                continue
            if mask[zz, yy, xx] and lab[zz, yy, xx] == 0:
                lab[zz, yy, xx] = lab[z, y, x]
                queue[tail] = (zz * Y + yy) * X + xx
                tail += 1
    return lab


@nb.njit(**JIT)
def _seams(lab, offsets):
    """Voxels with a 26-neighbour of another nonzero label."""
    Z, Y, X = lab.shape
    seam = np.zeros(lab.shape, np.bool_)
    for z in range(Z):
        for y in range(Y):
            for x in range(X):
                a = lab[z, y, x]
                if a == 0:
                    continue
                for k in range(offsets.shape[0]):
                    zz, yy, xx = z + offsets[k, 0], y + offsets[k, 1], x + offsets[k, 2]
                    if zz < 0 or yy < 0 or xx < 0 or zz >= Z or yy >= Y or xx >= X:
                        continue
                    b = lab[zz, yy, xx]
                    if b != 0 and b != a:
                        seam[z, y, x] = True
                        break
    return seam


def split_bridges(mask: np.ndarray, prob: np.ndarray | None, threshold: float = 0.5, depth: float = 1.0,
                  min_core: int = 200) -> np.ndarray:
    """Cut components that hold several cores apart along the seams between the cores' regions.

    A core is a 26-connected piece, of at least ``min_core`` voxels, of the mask where the
    probability exceeds ``threshold`` and the distance to the background exceeds ``depth`` (a
    bridge thinner than the sheets has no such voxels). Components with one core are untouched.
    """
    import cc3d
    import edt

    m = np.ascontiguousarray(mask, dtype=bool)
    if not m.any():
        return m
    core = edt.edt(m.astype(np.uint8), black_border=False) > depth
    if prob is not None:
        core &= np.nan_to_num(np.asarray(prob, dtype=np.float32), nan=0.0) > threshold
    seeds, n = cc3d.connected_components(core.astype(np.uint8), connectivity=26, return_N=True)
    if n < 2:
        return m
    sizes = np.bincount(seeds.ravel(), minlength=n + 1)
    keep = sizes >= min_core
    keep[0] = False
    seeds = np.where(keep[seeds], seeds, 0).astype(np.int32)
    lab = _geodesic_partition(m, seeds, N26_OFFSETS)
    return m & ~_seams(lab, N26_OFFSETS)
