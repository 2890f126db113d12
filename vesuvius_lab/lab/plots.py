"""Matplotlib views for the notebooks, rendered to PNG so they work with any backend and in tests."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from vesuvius_lab.lab.records import LABEL_COLORS
from vesuvius_lab.layout import IGNORE_LABEL
from vesuvius_lab.targets import DISTANCE_CLIP

AXES = "zyx"


def label_rgba(label: np.ndarray) -> np.ndarray:
    """RGBA overlay of a label slice in the shared label colours (unknown values transparent)."""
    lut = np.zeros((256, 4))
    for value, rgba in LABEL_COLORS.items():
        lut[value] = rgba
    return lut[np.asarray(label)]


def smooth_curve(values: Sequence[float], weight: float) -> list[float]:
    """A curve smoothed as TensorBoard smooths it: an exponential moving average of weight ``weight``,
    debiased (the first points are not pulled towards 0); NaN points (a skipped step, a term not
    computed at that step) stay NaN and do not enter the average."""
    out, mean, norm = [], 0.0, 0.0
    for value in values:
        if value != value:
            out.append(math.nan)
            continue
        mean, norm = weight * mean + (1 - weight) * value, weight * norm + (1 - weight)
        out.append(mean / norm)
    return out


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


class OrthoSlices:
    """Three orthogonal slices through one point with the labels overlaid and crosshairs.

    The figure is built once and its artists updated in place, so moving a slider only redraws.
    """

    def __init__(self, image: np.ndarray, label: np.ndarray, figsize: tuple[float, float] = (11, 3.8)):
        self.fig = Figure(figsize=figsize, dpi=80, layout="constrained")
        self.axes = self.fig.subplots(1, 3)
        self._images, self._overlays, self._lines = [], [], []
        for ax in self.axes:
            self._images.append(ax.imshow(np.zeros((1, 1)), cmap="gray", vmin=0, vmax=255, interpolation="nearest"))
            self._overlays.append(ax.imshow(np.zeros((1, 1, 4)), interpolation="nearest"))
            self._lines.append((ax.axhline(0, color="w", lw=0.6, alpha=0.6), ax.axvline(0, color="w", lw=0.6, alpha=0.6)))
            ax.set_xticks([])
            ax.set_yticks([])
        self.set_volume(image, label)

    def set_volume(self, image: np.ndarray, label: np.ndarray) -> None:
        if image.shape != label.shape:
            raise ValueError(f"image shape {image.shape} differs from label shape {label.shape}")
        self.image, self.label = image, label
        for axis, ax in enumerate(self.axes):
            rows, cols = (a for a in range(3) if a != axis)
            extent = (-0.5, image.shape[cols] - 0.5, image.shape[rows] - 0.5, -0.5)
            self._images[axis].set_extent(extent)
            self._overlays[axis].set_extent(extent)
            ax.set_xlim(extent[:2])
            ax.set_ylim(extent[2:])
            ax.set_xlabel(AXES[cols])
            ax.set_ylabel(AXES[rows])
        self.show([s // 2 for s in image.shape])

    def show(self, point: Sequence[int]) -> None:
        """Slice through ``point`` (z, y, x): panel k shows the plane across axis k."""
        self.point = tuple(int(p) for p in point)
        for axis, ax in enumerate(self.axes):
            rows, cols = (a for a in range(3) if a != axis)
            plane = (slice(None),) * axis + (self.point[axis],)  # basic slicing: a cache array decodes one plane
            self._images[axis].set_data(np.asarray(self.image[plane]))
            self._overlays[axis].set_data(label_rgba(np.asarray(self.label[plane])))
            hline, vline = self._lines[axis]
            hline.set_ydata([self.point[rows]] * 2)
            vline.set_xdata([self.point[cols]] * 2)
            ax.set_title(f"{AXES[axis]} = {self.point[axis]}")

    def png(self) -> bytes:
        return figure_png(self.fig)


MONTAGE_COLUMNS = ("image", "label", "skeleton", "distance")


def montage(samples: list[dict], max_samples: int = 4) -> Figure:
    """Mid-slices along z, y and x of each sampled patch: image, label, skeleton and signed distance.

    Labels are drawn over the image in notebook 01's colours with a legend; the signed distance
    (negative inside the surface) has its colour bar in voxels.
    """
    samples = samples[:max_samples]
    fig = Figure(figsize=(9.5, 2.1 * 3 * len(samples) + 0.9), dpi=80, layout="constrained")
    axes = fig.subplots(3 * len(samples), len(MONTAGE_COLUMNS), squeeze=False)
    distance = None
    for row, sample in enumerate(samples):
        for axis in range(3):
            ax_row = axes[3 * row + axis]
            image, label, skeleton, dist = (np.take(sample[k], sample[k].shape[axis] // 2, axis=axis)
                                            for k in MONTAGE_COLUMNS)
            ax_row[0].imshow(image, cmap="gray")
            ax_row[1].imshow(image, cmap="gray")
            ax_row[1].imshow(label_rgba(np.asarray(label).astype(np.intp)), interpolation="nearest")
            ax_row[2].imshow(skeleton, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            distance = ax_row[3].imshow(dist, cmap="RdBu", vmin=-DISTANCE_CLIP, vmax=DISTANCE_CLIP)
            for ax in ax_row:
                ax.set_xticks([])
                ax.set_yticks([])
            ax_row[0].set_ylabel(f"{sample['record_id']}\n{AXES[axis]}-mid", fontsize=7)
    for ax, key in zip(axes[0], MONTAGE_COLUMNS, strict=True):
        ax.set_title(key)
    if distance is not None:
        fig.colorbar(distance, ax=axes[:, 3].tolist(), location="bottom", shrink=0.9, aspect=15,
                     label="signed distance, voxels\n(< 0 inside the surface)")
    handles = [Patch(color=LABEL_COLORS[1], label="1 surface"),
               Patch(color=LABEL_COLORS[IGNORE_LABEL][:3] + (0.6,), label=f"{IGNORE_LABEL} ignored")]
    fig.legend(handles=handles, loc="outside upper center", ncols=2, fontsize=8, title="label colours (as in notebook 01)")
    return fig
