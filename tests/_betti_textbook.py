"""Betti matching by the textbook definition, for tiny volumes: an independent reference in tests.

Cells of the V-construction cubical complex carry the max of their vertices' values (foreground 0,
background 1); each filtration orders cells by (value, index) with index = (x, y, z, type). Columns
(k-cells) are reduced left to right over GF(2), the pivot being the last row in the row order.
Reported pairs are those born at 0 and dying at 1. A comparison pair (of U = X | Y) is matched when
the image reductions (comparison columns, input row order) of both inputs end at a birth cell of a
reported pair of that input: the definition Betti-Matching-3D implements.
"""

from __future__ import annotations

import itertools

import numpy as np


def textbook_cells(shape):
    """Cells of the V-construction complex of a box of ``shape``, by dimension: (index, vertices)."""
    unit = np.eye(3, dtype=int)
    cells = {0: [], 1: [], 2: [], 3: []}
    for x, y, z in itertools.product(*(range(k) for k in shape)):
        p = np.array((x, y, z))
        cells[0].append(((x, y, z, 0), [tuple(p)]))
        for t in range(3):
            q = p + unit[t]
            if (q < shape).all():
                cells[1].append(((x, y, z, t), [tuple(p), tuple(q)]))
        for t in range(3):  # square of type t: normal to axis t
            a, b = [ax for ax in range(3) if ax != t]
            vs = [p, p + unit[a], p + unit[b], p + unit[a] + unit[b]]
            if all((v < shape).all() for v in vs):
                cells[2].append(((x, y, z, t), [tuple(v) for v in vs]))
        vs = [p + np.array(o) for o in itertools.product((0, 1), repeat=3)]
        if all((v < shape).all() for v in vs):
            cells[3].append(((x, y, z, 0), [tuple(v) for v in vs]))
    return cells


def _boundary(cells, k):
    faces = {frozenset(vs): key for key, vs in cells[k - 1]}
    out = {}
    for key, vs in cells[k]:
        vs = set(vs)
        out[key] = {fk for fset, fk in faces.items() if fset <= vs}
    return out


def _reduce(columns, boundary, row_key):
    pivots, low = {}, {}
    for c in columns:
        col = set(boundary[c])
        while col:
            r = max(col, key=row_key)
            if r in pivots:
                col ^= pivots[r]
            else:
                pivots[r] = col
                low[c] = r
                break
    return low


def textbook_counts(X, Y):
    """(matched, pairs of X, pairs of Y) per dimension 0, 1, 2."""
    X = np.asarray(X, dtype=bool)
    Y = np.asarray(Y, dtype=bool)
    images = {"X": X, "Y": Y, "U": X | Y}
    cells = textbook_cells(np.array(X.shape))
    m, p, g = [], [], []
    for k in (1, 2, 3):
        bd = _boundary(cells, k)
        vals = {name: {} for name in images}
        for d in (k - 1, k):
            for key, vs in cells[d]:
                for name, F in images.items():
                    vals[name][(d, key)] = 0 if all(F[v] for v in vs) else 1

        def order(name, d):
            return lambda key: (vals[name][(d, key)], key)

        cols = {name: sorted((key for key, _ in cells[k]), key=order(name, k)) for name in images}
        births = {}
        for name in ("X", "Y"):
            low = _reduce(cols[name], bd, order(name, k - 1))
            births[name] = {r for c, r in low.items() if vals[name][(k - 1, r)] != vals[name][(k, c)]}
        low_u = _reduce(cols["U"], bd, order("U", k - 1))
        comp = [c for c, r in low_u.items() if vals["U"][(k - 1, r)] != vals["U"][(k, c)]]
        im_x = _reduce(cols["U"], bd, order("X", k - 1))
        im_y = _reduce(cols["U"], bd, order("Y", k - 1))
        m.append(sum(1 for c in comp if im_x.get(c) in births["X"] and im_y.get(c) in births["Y"]))
        p.append(len(births["X"]))
        g.append(len(births["Y"]))
    return tuple(m), tuple(p), tuple(g)
