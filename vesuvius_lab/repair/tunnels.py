"""``close_tunnels``: each tunnel left in the mask, closed where the probability closes it.

The tunnels ``fill_sheet_holes`` cannot fill (no flat sheet around them, or a loop rather than a
hole) are located by cubical persistence of the probability within each window: a tunnel dies
where the probability fills its hole, and the mask is filled there, or the loop is cut where it
was born when it is thin, whichever changes fewer voxels. A change is kept only when the window's
exact Betti numbers (and each octant piece's) say a tunnel went and nothing else changed.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from vesuvius_lab._betti import betti_numbers
from vesuvius_lab.repair.shared import bounding_box, euler_gain, no_new_cavities, octants_keep, repair_windows


def close_tunnels(mask: np.ndarray, prob: np.ndarray | None, window: int = 32, max_fill: int = 400,
                  radii: tuple[int, ...] = (1, 2, 3, 5, 8), rounds: int = 3) -> np.ndarray:
    """Close each tunnel left in the mask (see ``_close_in_window``), window by window, adding at
    most ``max_fill`` voxels per tunnel. A tunnel no change could close is remembered by a plug that
    kills it (never written to the mask): the overlapping windows that hold it, and only tunnels
    so remembered, skip the persistence computation (most of the step's time)."""
    out = np.array(mask, dtype=bool, copy=True)
    refused = np.zeros(out.shape, bool)
    for sl, pieces in repair_windows(out, window):
        p = out[sl].astype(np.float64) if prob is None else np.nan_to_num(np.asarray(prob[sl], dtype=np.float64), nan=0.0)
        for _ in range(rounds):
            if refused[sl].any() and betti_numbers(out[sl] | refused[sl])[1] == 0:
                break  # only tunnels already found closed to every change (no tunnel: see below)
            if not _close_in_window(out[sl], p, radii, max_fill, pieces, refused[sl]):
                break
    return no_new_cavities(mask, out)


def _close_in_window(sub: np.ndarray, prob: np.ndarray, radii: tuple[int, ...], max_fill: int,
                     pieces: list[tuple[slice, ...]], refused: np.ndarray) -> bool:
    """Close the tunnels of one window in place; True if one went and some remain. Each H1 class
    of the mask, located by cubical persistence of the probability (mask at the bottom of the
    filtration, the rest at -p), dies where the probability closes its hole: there the hole is
    filled with the voxels, 6- (else 26-)connected to that death voxel within a small box, whose probability
    reaches the death level (at most ``max_fill`` voxels); or the loop is cut where it was born,
    when it is thin there: whichever changes fewer voxels. A change is kept only when the window's exact Betti numbers say a tunnel went and no component
    or cavity came or went."""
    import cc3d
    import cripser

    before = betti_numbers(sub)
    if before[1] == 0:
        return False
    # beyond the reach of a fill the probability does not matter: one value there keeps the
    # persistence computation small
    near = ndimage.binary_dilation(sub, structure=np.ones((3, 3, 3), bool), iterations=4)
    f = np.where(sub, -1.0, np.where(near, -np.minimum(prob, 1.0 - 1e-6), 0.0))
    ph = cripser.computePH(f, maxdim=1)
    pairs = ph[(ph[:, 0] == 1) & (ph[:, 1] <= -1.0) & (ph[:, 2] > -1.0)]
    pairs = pairs[np.argsort(pairs[:, 2])]
    shape = np.array(sub.shape)
    interior = np.zeros(sub.shape, bool)
    interior[1:-1, 1:-1, 1:-1] = True  # never next to voxels outside the window: no merges unseen
    changed = False
    sheets = None
    for row in pairs:
        level = -row[2]
        death = row[6:9].astype(np.int64)
        birth = row[3:6].astype(np.int64)
        tries = []
        for r in radii:
            lo, hi = np.maximum(death - r, 0), np.minimum(death + r + 1, shape)
            box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            cand = (prob[box] >= level) & ~sub[box] & interior[box]
            at = tuple(death - lo)
            if not cand[at]:
                continue
            for connectivity in (6, 26):  # along the sheet first; across a diagonal gap if it must
                labels = cc3d.connected_components(cand.astype(np.uint8), connectivity=connectivity)
                add = np.zeros(sub.shape, bool)
                add[box] = labels == labels[at]
                tries.append(("add", add))
        for r in (0, 1, 2):  # a thin loop: cut at its birth, the cheapest first
            lo, hi = np.maximum(birth - r, 0), np.minimum(birth + r + 1, shape)
            cut = np.zeros(sub.shape, bool)
            cut[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
            cut &= sub & interior
            if cut.any():
                tries.append(("cut", cut))
        tries.sort(key=lambda t: int(t[1].sum()))  # the fewest voxels changed first: a thin loop is cut
        for kind, change in tries:
            if kind == "add" and change.sum() > max_fill:
                continue
            trial = sub | change if kind == "add" else sub & ~change
            grown = bounding_box(change, 1)
            if euler_gain(sub[grown], trial[grown]) < 1:
                continue
            after = betti_numbers(trial)
            if (after[1] < before[1] and after[0] == before[0] and after[2] == before[2]
                    and octants_keep(sub, trial, pieces)):
                sub[...] = trial
                before = after
                changed = True
                break
        else:  # refused: remember the smallest cube around the death voxel that kills the tunnel,
            # away from the other sheets (a plug that joins two of them makes a tunnel of its own)
            if sheets is None:
                sheets = cc3d.connected_components(sub.astype(np.uint8), connectivity=6)
            others = ndimage.binary_dilation(sub & (sheets != sheets[tuple(birth)]),
                                             structure=np.ones((3, 3, 3), bool))
            for r in (2, 4, 8):
                plug = np.zeros(sub.shape, bool)
                plug[tuple(slice(max(a - r, 0), a + r + 1) for a in death)] = True
                plug &= ~others
                if betti_numbers(sub | plug)[1] < before[1]:
                    refused |= plug
                    break
        if before[1] == 0:
            return False
    return changed
