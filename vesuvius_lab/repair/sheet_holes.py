"""``fill_sheet_holes``: the holes of each sheet, filled along the sheet's own surface.

Windows whose Euler characteristic says they hold a tunnel are cut into their sheets (6-connected
pieces); each sheet gets a local frame from PCA, its surface becomes a height map over the sheet
plane (the lowest and highest offset along the normal per cell, i.e. its position and local
thickness), the enclosed empty cells of that map are the holes, and they are filled by
interpolating the map across them (harmonic, from the rim), then sealed to the sheet (a one-voxel
face closing and the pinhole plug around the fill: on a bent sheet the slab meets the rim at edges
and corners only). Holes the map misses (too small, too oblique, or between two merged sheets) get
the sheet's own closing with a ball of radius 1, 2, then 3; pockets a fill closes off are filled
with it. A fill is kept only if the exact Betti numbers of the sheet say a tunnel went and nothing
split or became a cavity; it never touches another sheet. Unlike ``close_tunnels`` it needs no
probability: the sheet's shape says where it goes on.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from scipy import ndimage

from vesuvius_lab._betti import background_components, betti_numbers, label_euler
from vesuvius_lab.repair.pinholes import plug_pinholes
from vesuvius_lab.repair.shared import (JIT, bounding_box, enclosed_background, euler_gain, grow_box, no_new_cavities,
                                        octants_keep, repair_windows)

FLATNESS = 0.3  # a piece is a sheet when its normal variance is below this share of the next one
MULTILAYER = 0.25  # ... and at most this share of its height-map cells hold two separate layers
CLOSING_RADII = (1, 2, 3)  # the balls of the sheet's own closing, for holes the height map misses


@nb.njit(**JIT)
def _jacobi(out, unknown, iterations):
    """Jacobi sweeps of the 4-neighbour mean over the unknown cells (edges repeat their value)."""
    n0, n1 = out.shape
    nxt = out.copy()
    for _ in range(iterations):
        for i in range(n0):
            for j in range(n1):
                if unknown[i, j]:
                    nxt[i, j] = (out[max(i - 1, 0), j] + out[min(i + 1, n0 - 1), j]
                                 + out[i, max(j - 1, 0)] + out[i, min(j + 1, n1 - 1)]) / 4
        out[:, :] = nxt
    return out


def _harmonic(values: np.ndarray, unknown: np.ndarray, iterations: int = 40) -> np.ndarray:
    """``values`` with the ``unknown`` cells replaced by a harmonic interpolation from the known
    ones (nearest known value first, then Jacobi sweeps of the 4-neighbour mean)."""
    _, (iy, ix) = ndimage.distance_transform_edt(unknown, return_indices=True)
    return _jacobi(values[iy, ix].astype(np.float64), unknown, iterations)


def sheet_hole_fill(piece: np.ndarray, forbidden: np.ndarray, max_hole_area: int) -> np.ndarray | None:
    """Voxels that fill the holes of one sheet ``piece`` (bool, a window), or None when the piece
    is not a sheet or has no enclosed hole of at most ``max_hole_area`` height-map cells.

    The filling never sets a ``forbidden`` voxel (the other sheets of the window and their
    26-neighbours), so it cannot merge sheets.
    """
    pts = np.argwhere(piece).astype(np.float64)
    if len(pts) < 16:
        return None
    mu = pts.mean(axis=0)
    q = pts - mu
    evals, evecs = np.linalg.eigh(q.T @ q / len(q))
    if evals[0] > FLATNESS * evals[1]:
        return None
    frame = evecs[:, ::-1]  # in-plane axes first, the normal last
    u, v, w = (q @ frame).T
    u0, v0 = np.floor(u.min()), np.floor(v.min())
    iu, iv = (u - u0).astype(np.int64), (v - v0).astype(np.int64)
    shape = (int(iu.max()) + 1, int(iv.max()) + 1)
    occupied = np.zeros(shape, bool)
    occupied[iu, iv] = True
    holes = ndimage.binary_fill_holes(occupied) & ~occupied
    if not holes.any():
        return None
    lo = np.full(shape, np.inf)
    hi = np.full(shape, -np.inf)
    np.minimum.at(lo, (iu, iv), w)
    np.maximum.at(hi, (iu, iv), w)
    counts = np.bincount(iu * shape[1] + iv, minlength=shape[0] * shape[1]).reshape(shape)
    span = np.where(occupied, hi - lo + 1, 0)
    if np.mean(counts[occupied] < 0.5 * span[occupied]) > MULTILAYER:  # folded or two sheets merged
        return None
    hole_labels, n = ndimage.label(holes)
    areas = np.bincount(hole_labels.ravel(), minlength=n + 1)
    small = areas <= max_hole_area
    small[0] = False
    holes = small[hole_labels]
    if not holes.any():
        return None
    thickness = float(np.median(span[occupied]))
    lo_f = _harmonic(np.where(occupied, lo, 0.0), ~occupied)
    hi_f = _harmonic(np.where(occupied, hi, 0.0), ~occupied)
    centre = (lo_f + hi_f) / 2
    half = np.minimum((hi_f - lo_f) / 2, thickness)  # never thicker than twice the sheet
    # the hole cells and the sheet around them are drawn again as one slab, so the fill joins the
    # sheet face to face (a fill drawn in the holes alone would meet a thin sheet only at edges and corners)
    cover = holes | (occupied & ndimage.binary_dilation(holes, structure=np.ones((3, 3), bool), iterations=2))
    # a hole cell gets the interpolated sheet plus half a voxel, a rim cell only what lies between
    # its own voxels, so nothing sticks out of the sheet
    reach = np.maximum(half, 0.5) + np.where(holes, 0.5, 0.0)
    box = _slab_box(cover, centre, reach, (u0, v0), mu, frame, piece.shape)  # only voxels there can be drawn
    origin = np.array([s.start for s in box], dtype=np.float64)
    grid = np.indices(tuple(s.stop - s.start for s in box), dtype=np.float64).reshape(3, -1).T + (origin - mu)
    gu, gv, gw = (grid @ frame).T
    cu, cv = np.floor(gu - u0).astype(np.int64), np.floor(gv - v0).astype(np.int64)
    inside = (cu >= 0) & (cu < shape[0]) & (cv >= 0) & (cv < shape[1])
    drawn = np.zeros(gu.size, bool)
    cells = (cu[inside], cv[inside])
    drawn[inside] = cover[cells] & (np.abs(gw[inside] - centre[cells]) <= reach[cells])
    add = np.zeros(piece.shape, bool)
    add[box] = drawn.reshape(tuple(s.stop - s.start for s in box))
    add &= ~piece & ~forbidden
    # a voxel with fewer than two face neighbours in the result would be a spike, not sheet
    near = grow_box(box, 1, piece.shape)
    grown = np.pad(piece[near] | add[near], 1)
    faces = sum(np.roll(grown, s, axis=a) for a in range(3) for s in (1, -1))[1:-1, 1:-1, 1:-1]
    add[near] &= faces >= 2
    return add if add.any() else None


def _slab_box(cover: np.ndarray, centre: np.ndarray, reach: np.ndarray, origin: tuple[float, float],
              mu: np.ndarray, frame: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The voxel box (within ``shape``) that holds the slab over the ``cover`` cells of a height
    map: each cell's prism (its square in the sheet plane, ``centre +- reach`` along the normal)
    mapped back to voxels, so the slab is drawn there and not over the whole window."""
    i, j = np.nonzero(cover)
    lo = np.stack([i + origin[0], j + origin[1], centre[i, j] - reach[i, j]], axis=1)
    hi = np.stack([i + origin[0] + 1, j + origin[1] + 1, centre[i, j] + reach[i, j]], axis=1)
    # per axis, the extreme of frame @ (u, v, w) over each prism is at one of its corners
    low = mu + (np.minimum(lo[:, None, :] * frame, hi[:, None, :] * frame).sum(axis=2)).min(axis=0)
    high = mu + (np.maximum(lo[:, None, :] * frame, hi[:, None, :] * frame).sum(axis=2)).max(axis=0)
    return tuple(slice(max(int(np.floor(a)) - 1, 0), min(int(np.ceil(b)) + 2, n))
                 for a, b, n in zip(low, high, shape, strict=True))


def piece_tunnels(labels: np.ndarray, n: int) -> np.ndarray | None:
    """beta1 of each 6-connected piece of a labelled window (index = label), from its Euler
    characteristic (beta1 = 1 + beta2 - chi); None when the window encloses a cavity, whose piece
    this cheap count cannot tell."""
    if not background_components(labels)[1].all():
        return None
    return 1 - label_euler(labels, n)


def fill_sheet_holes(mask: np.ndarray, window: int = 32, max_hole_area: int = 400) -> np.ndarray:
    """Fill the holes of every sheet, window by window (see the module's note)."""
    import cc3d

    out = np.array(mask, dtype=bool, copy=True)
    cube = np.ones((3, 3, 3), bool)
    for sl, pieces in repair_windows(out, window, across=False):  # a fill across a face risked cavities
        sub = out[sl]  # a view: fills land in ``out``
        labels, n = cc3d.connected_components(np.ascontiguousarray(sub, dtype=np.uint8), connectivity=6, return_N=True)
        labels = labels.astype(np.int32)
        near_hi = near_lo = None
        tunnels = piece_tunnels(labels, n)
        for c in range(1, n + 1):
            if tunnels is not None and tunnels[c] <= 0:
                continue
            piece = labels == c
            before = betti_numbers(piece)
            if before[1] == 0:
                continue
            if near_hi is None:  # the lowest and highest piece label among each voxel's 26-neighbours:
                # a piece may only grow where no other piece is a neighbour
                near_hi = ndimage.maximum_filter(labels, footprint=cube, mode="constant", cval=0)
                near_lo = ndimage.minimum_filter(np.where(labels > 0, labels, n + 1), footprint=cube, mode="constant", cval=n + 1)
            forbidden = (near_hi > 0) & ~((near_hi == c) & (near_lo == c))
            box = bounding_box(piece, max(CLOSING_RADII) + 1)  # fills stay near the piece: work in its box
            fills = [lambda: _seal(piece, _in_box(sheet_hole_fill, piece, forbidden, box, max_hole_area), forbidden)]
            # holes too small or too oblique for the height map: the piece's own closing
            cache: dict = {}
            fills += [lambda r=r: _in_box(_closing_fill, piece, forbidden, box, r, cache) for r in CLOSING_RADII]
            for fill in fills:
                add = fill()
                if add is None:
                    continue
                add |= enclosed_background(piece | add) & ~forbidden  # a fill may close off a pocket: it is filled too
                # each separate blob of the fill is kept only if it removes a tunnel by itself, so a
                # closing does not thicken the sheet where it has no hole
                blobs, n_blobs = cc3d.connected_components(add.astype(np.uint8), connectivity=26, return_N=True)
                boxes = cc3d.statistics(blobs)["bounding_boxes"] if n_blobs > 1 else []
                for b in [*range(1, len(boxes)), 0]:  # the whole fill (0) last: blobs that only together close a hole
                    grown = bounding_box(add, 1) if b == 0 else grow_box(boxes[b], 1, add.shape)
                    local = add[grown] if b == 0 else blobs[grown] == b
                    if euler_gain(piece[grown], piece[grown] | local) < 1 - before[2]:
                        continue  # a bump on the sheet, no plug: no tunnel can go (nor a cavity)
                    blob = np.zeros(add.shape, bool)
                    blob[grown] = local
                    after = betti_numbers(piece | blob)
                    if (after[1] < before[1] and after[0] <= before[0] and after[2] <= before[2]
                            and octants_keep(sub, sub | blob, pieces)):
                        piece |= blob
                        sub |= blob
                        before = after
                        if before[1] == 0:
                            break
                if before[1] == 0:
                    break
    return no_new_cavities(mask, out)


def _in_box(fill, piece: np.ndarray, forbidden: np.ndarray, box: tuple[slice, ...], *args) -> np.ndarray | None:
    """``fill(piece, forbidden, *args)`` computed inside ``box`` and placed back in the window."""
    add = fill(piece[box], forbidden[box], *args)
    if add is None:
        return None
    out = np.zeros(piece.shape, bool)
    out[box] = add
    return out


def _seal(piece: np.ndarray, add: np.ndarray | None, forbidden: np.ndarray) -> np.ndarray | None:
    """A height-map fill joined to its sheet: where a bent sheet leaves the fill's slab, the two
    meet at edges and corners only, a ring of one-voxel gaps each of them a new tunnel. A closing
    along the faces (one voxel) and the pinhole plug seal them, within two voxels of the fill (worked
    in the fill's box). Never sets a ``forbidden`` voxel."""
    if add is None:
        return None
    box = bounding_box(add, 4)
    p, a = piece[box], add[box]
    near = ndimage.binary_dilation(a, structure=np.ones((3, 3, 3), bool), iterations=2) & ~p & ~forbidden[box]
    grown = np.pad(p | a, 1, mode="edge")
    closed = ndimage.binary_closing(grown, structure=ndimage.generate_binary_structure(3, 1))[1:-1, 1:-1, 1:-1]
    a = a | (closed & near)
    a |= plug_pinholes(p | a) & near
    out = add.copy()
    out[box] = a
    return out


def _closing_fill(piece: np.ndarray, forbidden: np.ndarray, radius: int, cache: dict) -> np.ndarray | None:
    """The voxels a closing with a ball of ``radius`` adds to one sheet, away from other sheets.
    ``cache`` keeps the distances to the sheet for the next radius of the same sheet."""
    import edt

    # the ball x^2 + y^2 + z^2 <= r^2 + r; dilation and erosion by squared distances (the same mask
    # as ndimage.binary_closing with that ball, 1.6x faster on a 56^3 box)
    pad = max(CLOSING_RADII) + 1  # the sheet goes on beyond the window (edge padding): no border effects
    if "distance" not in cache:
        padded = np.pad(piece, pad, mode="edge")
        cache["distance"] = edt.edtsq(np.ascontiguousarray(~padded, dtype=np.uint8), black_border=False)
    reach = radius * radius + radius
    grown = cache["distance"] <= reach
    closed = (edt.edtsq(np.ascontiguousarray(grown, dtype=np.uint8), black_border=True) > reach)[(slice(pad, -pad),) * 3]
    add = closed & ~piece & ~forbidden
    return add if add.any() else None
