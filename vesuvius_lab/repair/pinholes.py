"""``plug_pinholes``: holes one voxel wide through a sheet, filled voxel by voxel.

A background voxel whose foreground neighbourhood is one ring (topological number T6 = 1) around
two separate background sides (T26 of the background >= 2) is a hole one voxel wide through a sheet
of any thickness, on the metric's topology (foreground 6-connected, background 26-connected). The
verdict reads the 3x3x3 neighbourhood alone, so one raster sweep fills them and later sweeps look
only where a fill changed a neighbourhood; the pockets that plugs at both faces of a thick sheet
close off are filled too. Cheap (a numba sweep), so it runs before the window-based steps and
seals their fills (``sheet_holes``).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from vesuvius_lab.repair.shared import JIT, N26_OFFSETS, OFFSETS

_ORDER = np.abs(OFFSETS).sum(axis=1)  # 1: face, 2: edge, 3: corner neighbour


def _adjacency(max_order: int, positions: np.ndarray) -> np.ndarray:
    """(27, 26) table: for each position, the positions within ``positions`` adjacent to it
    (offset differences of L1 order <= max_order and Chebyshev 1), padded with -1."""
    table = np.full((27, 26), -1, dtype=np.int64)
    for i in range(27):
        k = 0
        for j in positions:
            d = np.abs(OFFSETS[i] - OFFSETS[j])
            if j != i and d.max() == 1 and d.sum() <= max_order:
                table[i, k] = j
                k += 1
    return table


_N18 = np.array([i for i in range(27) if 1 <= _ORDER[i] <= 2], dtype=np.int64)
_N26 = np.array([i for i in range(27) if _ORDER[i] >= 1], dtype=np.int64)
_FACES = np.array([i for i in range(27) if _ORDER[i] == 1], dtype=np.int64)
_ADJ6_IN_N18 = _adjacency(1, _N18)
_ADJ26_IN_N26 = _adjacency(3, _N26)


@nb.njit(**JIT)
def _components(present, positions, adjacency, seeds_only, seeds, label, stack):
    """Number of components of the present positions under ``adjacency``; with ``seeds_only``,
    only those holding one of ``seeds`` count. ``label`` and ``stack`` are scratch (27 ints)."""
    label[:] = -1
    count = 0
    for start in positions:
        if not present[start] or label[start] >= 0:
            continue
        label[start] = count
        top = 0
        stack[top] = start
        top += 1
        while top > 0:
            top -= 1
            p = stack[top]
            for q in adjacency[p]:
                if q < 0:
                    break
                if present[q] and label[q] < 0:
                    label[q] = count
                    stack[top] = q
                    top += 1
        count += 1
    if not seeds_only:
        return count
    n = 0
    for i in range(seeds.shape[0]):  # distinct components among the seeds (stack reused as the seen list)
        s = seeds[i]
        if not present[s]:
            continue
        seen = False
        for j in range(n):
            if stack[j] == label[s]:
                seen = True
                break
        if not seen:
            stack[n] = label[s]
            n += 1
    return n


@nb.njit(**JIT)
def _plug_sweep(m, dirty, n18, n26, faces, adj6, adj26, added):
    """Fill, in place and in raster order, background voxels with T6(fg) = 1 and T26(bg) >= 2;
    their flat indices go to ``added``; returns how many. With a ``dirty`` array (else one of
    size 0), only voxels marked there are looked at, and the neighbours of each fill are marked:
    the verdict depends on the 3x3x3 neighbourhood alone, so a voxel whose neighbourhood did not
    change since it was last looked at keeps it."""
    Z, Y, X = m.shape
    only_dirty = dirty.size > 0
    fg = np.zeros(27, np.bool_)
    bg = np.zeros(27, np.bool_)
    label = np.empty(27, np.int64)
    stack = np.empty(27, np.int64)
    count = 0
    for z in range(1, Z - 1):
        for y in range(1, Y - 1):
            for x in range(1, X - 1):
                if m[z, y, x]:
                    continue
                if only_dirty and not dirty[z, y, x]:
                    continue
                faces_on = (m[z - 1, y, x] + m[z + 1, y, x] + m[z, y - 1, x] + m[z, y + 1, x]
                            + m[z, y, x - 1] + m[z, y, x + 1])
                if faces_on < 2:
                    continue
                if faces_on == 6:
                    continue  # no background side at all: not a hole (an enclosed voxel is a cavity)
                k = 0
                n_bg = 0
                for dz in range(-1, 2):
                    for dy in range(-1, 2):
                        for dx in range(-1, 2):
                            v = m[z + dz, y + dy, x + dx] != 0
                            fg[k] = v
                            bg[k] = not v
                            n_bg += not v
                            k += 1
                bg[13] = False
                if n_bg < 3:  # the voxel itself and one more: no two sides
                    continue
                if _components(bg, n26, adj26, False, faces, label, stack) < 2:
                    continue
                if _components(fg, n18, adj6, True, faces, label, stack) == 1:
                    m[z, y, x] = 1
                    if only_dirty:
                        dirty[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2] = 1
                    if count < added.shape[0]:
                        added[count] = (z * Y + y) * X + x
                    count += 1
    return count


@nb.njit(**JIT)
def _fill_pockets(m, starts, offsets, limit, dirty):
    """Fill each background region (26-connected) next to a ``starts`` voxel that holds at most
    ``limit`` voxels and does not reach the border: the pockets a plug closed off inside a thick
    sheet's hole (a plug at each face of the sheet encloses the voxels between them). A region is
    marked in ``m`` (2) while it is explored, then filled (1) or cleared (0): no scratch volume.
    The neighbours of the plugs and of the filled voxels are marked ``dirty``."""
    Z, Y, X = m.shape
    region = np.empty(limit + 1, np.int64)
    for s in starts:
        z0, r = divmod(s, Y * X)
        y0, x0 = divmod(r, X)
        dirty[z0 - 1:z0 + 2, y0 - 1:y0 + 2, x0 - 1:x0 + 2] = 1
        for k in range(offsets.shape[0]):
            z, y, x = z0 + offsets[k, 0], y0 + offsets[k, 1], x0 + offsets[k, 2]
            if m[z, y, x]:
                continue
            m[z, y, x] = 2
            region[0] = (z * Y + y) * X + x
            n, head, escaped = 1, 0, False
            while head < n and not escaped:
                i = region[head]
                head += 1
                zz, rr = divmod(i, Y * X)
                yy, xx = divmod(rr, X)
                if zz == 0 or yy == 0 or xx == 0 or zz == Z - 1 or yy == Y - 1 or xx == X - 1:
                    escaped = True
                    break
                for j in range(offsets.shape[0]):
                    a, b, c = zz + offsets[j, 0], yy + offsets[j, 1], xx + offsets[j, 2]
                    if m[a, b, c]:
                        continue
                    if n >= limit:
                        escaped = True
                        break
                    m[a, b, c] = 2
                    region[n] = (a * Y + b) * X + c
                    n += 1
            for h in range(n):
                i = region[h]
                zz, rr = divmod(i, Y * X)
                yy, xx = divmod(rr, X)
                m[zz, yy, xx] = 0 if escaped else 1
                if not escaped:
                    dirty[max(zz - 1, 0):zz + 2, max(yy - 1, 0):yy + 2, max(xx - 1, 0):xx + 2] = 1


def plug_pinholes(mask: np.ndarray, passes: int = 2, pocket: int = 64) -> np.ndarray:
    """Fill holes one voxel wide through sheets (see the module's note): ``passes`` sweeps at
    most, then the pockets of up to ``pocket`` voxels the plugs enclosed. Only the first sweep
    looks at every voxel; the next ones look where the last one changed something."""
    m = np.pad(np.asarray(mask, dtype=bool), 1).astype(np.uint8)
    added = np.empty(1 << 20, np.int64)
    dirty = np.zeros(0, np.uint8).reshape(0, 0, 0)
    for _ in range(passes):
        n = _plug_sweep(m, dirty, _N18, _N26, _FACES, _ADJ6_IN_N18, _ADJ26_IN_N26, added)
        if n == 0:
            break
        if dirty.size == 0:
            dirty = np.zeros(m.shape, np.uint8)
        _fill_pockets(m, added[: min(n, added.shape[0])], N26_OFFSETS, pocket, dirty)
    return m[1:-1, 1:-1, 1:-1].astype(bool)
