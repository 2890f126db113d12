"""Preview helpers for the notebooks: sampled patches with their boxes, and a montage of them."""

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


def montage(samples: list[dict], max_samples: int = 4):
    """Orthogonal mid-slices of image, label, skeleton and distance for each sample (matplotlib)."""
    import matplotlib.pyplot as plt

    samples = samples[:max_samples]
    columns = ("image", "label", "skeleton", "distance")
    fig, axes = plt.subplots(3 * len(samples), 4, figsize=(9, 2.2 * 3 * len(samples)), squeeze=False)
    style = {
        "image": dict(cmap="gray"),
        "label": dict(cmap="viridis", vmin=0, vmax=2, interpolation="nearest"),
        "skeleton": dict(cmap="magma", vmin=0, vmax=1, interpolation="nearest"),
        "distance": dict(cmap="RdBu", vmin=-8, vmax=8),
    }
    for row, sample in enumerate(samples):
        for axis in range(3):
            ax_row = axes[3 * row + axis]
            for col, key in enumerate(columns):
                arr = sample[key]
                ax_row[col].imshow(np.take(arr, arr.shape[axis] // 2, axis=axis), **style[key])
                ax_row[col].set_xticks([])
                ax_row[col].set_yticks([])
                if row == 0 and axis == 0:
                    ax_row[col].set_title(key)
            ax_row[0].set_ylabel(f"{sample['record_id']}\n{'zyx'[axis]}-mid", fontsize=7)
    fig.tight_layout()
    return fig
