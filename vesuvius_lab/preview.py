"""Preview helpers for the notebooks: sampled patches with their boxes (``lab.plots.montage`` draws them)."""

from __future__ import annotations

from itertools import combinations

import numpy as np

from vesuvius_lab.augment import patch_corners
from vesuvius_lab.sampling import PatchDataset


def draw_patches(dataset: PatchDataset, n: int, start: int = 0) -> list[dict]:
    """The first ``n`` samples of the stream from ``start``: arrays plus record id and patch corners.

    ``corners`` are the 8 (z, y, x) corners of the patch in its volume's coordinates (rotation and
    scale included, elastic displacement left out), ready for a napari shapes layer.
    """
    out = []
    for g in range(start, start + n):
        sample = dataset[g]
        vi = int(sample["volume_index"])
        centre = sample["centre"].numpy() + sample["box_origin"].numpy()
        corners = patch_corners(centre, dataset.patch, sample["matrix"].numpy())
        out.append(
            {
                "index": g,
                "record_id": dataset.records[vi].id,
                "foreground_draw": bool(sample["foreground_draw"]),
                "corners": corners,
                "image": sample["image"][0].numpy(),
                "label": sample["label"].numpy(),
                "skeleton": sample["skeleton"].numpy(),
                "distance": sample["distance"].numpy(),
            }
        )
    return out


def box_edges(corners: np.ndarray) -> list[np.ndarray]:
    """The 12 edges of a box given its 8 corners (as produced above), each a (2, 3) line."""
    edges = []
    for a, b in combinations(range(8), 2):
        if bin(a ^ b).count("1") == 1:  # corners differ in exactly one axis
            edges.append(np.stack([corners[a], corners[b]]))
    return edges
