"""Notebook 04's live prediction panel: what the model segments, validation after validation.

The run keeps one validation volume's prediction at each validation (``training.live_volume``); the panel
shows orthogonal slices of its image, label, probability and errors (true positives white, false
positives red, false negatives cyan: notebook 05's ``evaluation.error_labels`` and
``ERROR_COLORS``), the volume's score and parts, and an epoch slider over the kept validations.
"Open in napari" shows the same in a viewer whose dock widget follows the run (``live_dock``).
Everything is read from the run folder, so the panel reattaches to a running or finished run.
``refresh()`` is what ``RunMonitor`` calls (its ``followers``); tests call it without a browser.
"""

from __future__ import annotations

import html
import math
import threading
from collections.abc import Sequence
from pathlib import Path

import ipywidgets as w
import numpy as np
from matplotlib.colors import ListedColormap, to_rgba
from matplotlib.figure import Figure

from vesuvius_lab.evaluate import PART_NAMES, SCORE_PARTS
from vesuvius_lab.lab.evaluation import ERROR_COLORS, FN, FP, TP, error_labels
from vesuvius_lab.lab.forms import notebook_form
from vesuvius_lab.lab.plots import AXES, figure_png, label_rgba
from vesuvius_lab.training import live_volume

def error_colormap() -> ListedColormap:
    """notebook 05's error colours (``ERROR_COLORS``) for values 0, TP, FP, FN, in matplotlib."""
    colours = [ERROR_COLORS[v] for v in (0, TP, FP, FN)]
    return ListedColormap([(0.0, 0.0, 0.0, 0.0) if c == "transparent" else to_rgba(c) for c in colours])


def plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The slice of ``volume`` through ``index`` across ``axis`` (0 z, 1 y, 2 x)."""
    return np.take(volume, index, axis=axis)


def format_scores(volume: str, entry: dict) -> str:
    """The volume's score and parts at this validation, as one line of HTML."""
    scores = entry.get("scores", {})
    parts = [f"{PART_NAMES[k]} {scores[k]:.4f}" for k in SCORE_PARTS
             if isinstance(scores.get(k), int | float) and math.isfinite(scores[k])]
    return (f"<b>{html.escape(volume)}</b> · {html.escape(live_volume.entry_label(entry))} · "
            + (" · ".join(parts) if parts else "not scored"))


def live_figure(image: np.ndarray, label: np.ndarray, probability: np.ndarray, mask: np.ndarray,
                position: Sequence[int], title: str = "") -> Figure:
    """Three orthogonal planes through ``position`` (rows), each as image, ground truth,
    probability and errors over the image (columns). ``probability`` is uint8 (p * 255)."""
    fig = Figure(figsize=(10, 7.5), dpi=72, layout="constrained")
    axes = fig.subplots(3, 4)
    if title:
        fig.suptitle(title)
    errors_cmap = error_colormap()
    for row, axis in enumerate(range(3)):
        img, lab = plane(image, axis, position[axis]), plane(label, axis, position[axis])
        prob, msk = plane(probability, axis, position[axis]), plane(mask, axis, position[axis])
        errors = error_labels(msk, lab)
        axes[row, 0].imshow(img, cmap="gray", vmin=0, vmax=255)
        axes[row, 1].imshow(img, cmap="gray", vmin=0, vmax=255)
        axes[row, 1].imshow(label_rgba(lab), interpolation="nearest")  # surface and ignored, the shared colours
        axes[row, 2].imshow(prob.astype(np.float32) / 255, cmap="magma", vmin=0, vmax=1)
        axes[row, 3].imshow(img, cmap="gray", vmin=0, vmax=255, alpha=0.6)
        axes[row, 3].imshow(errors, cmap=errors_cmap, vmin=0, vmax=3, interpolation="nearest")
        axes[row, 0].set_ylabel(f"{AXES[axis]} = {position[axis]}")
    for col, name in enumerate(("image", "ground truth", "probability", "errors: TP white, FP red, FN cyan")):
        axes[0, col].set_title(name, fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


class LivePanel:
    """Slices of the live volume at the chosen validation; its score; an epoch slider; napari."""

    def __init__(self, run_dir: str | Path):
        self.slider = w.SelectionSlider(options=[("no validation yet", -1)], value=-1, description="epoch",
                                        continuous_update=False, layout=w.Layout(width="520px"))
        self.follow_latest = w.Checkbox(value=True, description="follow the latest validation", indent=False)
        self.positions = [w.IntSlider(value=0, min=0, max=0, description=a, continuous_update=False)
                          for a in AXES]
        self.scores = w.HTML()
        self.message = w.HTML()
        self.image = w.Image(format="png")
        self.napari_button = w.Button(description="Open in napari", icon="cube",
                                      tooltip="the same volume in napari; its dock widget follows the run")
        self.napari_button.on_click(lambda _b: self.open_napari())
        self.slider.observe(self._on_choice, names="value")
        for slider in self.positions:
            slider.observe(lambda _c: self.draw(), names="value")
        self.widget = notebook_form([
            w.HTML("<b>Live prediction</b> (one validation volume, kept at each validation)"),
            w.HBox([self.slider, self.follow_latest, self.napari_button]),
            w.HBox(self.positions), self.scores, self.message, self.image,
        ], css_class="vlab-live-panel")  # the class: for the browser test and custom CSS
        self._lock = threading.RLock()
        self._setting = False
        self.viewer = None
        self.dock = None
        self.attach(run_dir)

    def attach(self, run_dir: str | Path) -> None:
        """Show the run in ``run_dir``: forget what was read, read it again."""
        with self._lock:
            self.run_dir = Path(run_dir)
            self.index: dict = {}
            self.volume: tuple[np.ndarray, np.ndarray] | None = None
            self._loaded: tuple[str, tuple[np.ndarray, np.ndarray]] | None = None
            self._drawn: tuple | None = None
        self.refresh()

    def follow(self, run_dir: str | Path) -> None:
        """The ``RunMonitor`` hook: the run shown there, refreshed (reattached when it changed)."""
        if Path(run_dir) != self.run_dir:
            self.attach(run_dir)
        else:
            self.refresh()

    @property
    def entries(self) -> list[dict]:
        return self.index.get("entries") or []

    @property
    def entry(self) -> dict | None:
        """The validation the slider shows."""
        return next((e for e in self.entries if e["step"] == self.slider.value), None)

    def refresh(self) -> None:
        """Read the index; offer each kept validation on the slider, move to the latest when
        following, and redraw when what is shown changed."""
        with self._lock:
            index = live_volume.read_index(self.run_dir)
            if index.get("volume") != self.index.get("volume") or index.get("shape") != self.index.get("shape"):
                self.volume, self._loaded = None, None
            self.index = index
            problem = index.get("problem")
            self.message.value = f"<span style='color:#b00'>{html.escape(problem)}</span>" if problem else ""
            if not self.entries:
                self.scores.value = f"no live prediction in {html.escape(str(self.run_dir))} yet: one comes with each validation"
                self._set_options([("no validation yet", -1)], -1)
                return
            options = [(live_volume.entry_label(e), e["step"]) for e in self.entries]
            latest = options[-1][1]
            keep = self.slider.value if self.slider.value in [s for _, s in options] else latest
            self._set_options(options, latest if self.follow_latest.value else keep)
            self.draw()

    def _set_options(self, options: list[tuple[str, int]], value: int) -> None:
        self._setting = True  # moves made here are not a choice by hand
        try:
            if list(self.slider.options) != options:
                self.slider.options = options
            self.slider.value = value
        finally:
            self._setting = False

    def _on_choice(self, change: dict) -> None:
        if self._setting:
            return
        latest = self.entries[-1]["step"] if self.entries else -1
        if change["new"] != latest and change["new"] != -1:
            self.follow_latest.value = False  # an earlier epoch chosen by hand stays shown
        self.draw()

    def _arrays(self, entry: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        if self.volume is None:
            try:
                self.volume = live_volume.load_volume(self.run_dir)
            except (OSError, KeyError, ValueError):
                return None
            for slider, size in zip(self.positions, self.volume[0].shape, strict=True):
                with slider.hold_sync():  # one message: the browser never clamps the value to the old max
                    slider.max, slider.value = size - 1, size // 2
        if self._loaded is None or self._loaded[0] != entry["file"]:
            try:
                self._loaded = (entry["file"], live_volume.load_entry(self.run_dir, entry, self.index["shape"]))
            except (OSError, KeyError, ValueError):
                return None  # removed by retention meanwhile: the next refresh offers what is there
        return (*self.volume, *self._loaded[1])

    def draw(self) -> None:
        """Redraw the slices when the validation or a position changed."""
        with self._lock:
            entry = self.entry
            if entry is None:
                return
            arrays = self._arrays(entry)
            if arrays is None:
                return
            position = tuple(s.value for s in self.positions)
            key = (entry["file"], position)
            if key != self._drawn:  # the slices first: the score line never runs ahead of them
                self._drawn = key
                self.image.value = figure_png(live_figure(*arrays, position, f"{self.run_dir.name}: {live_volume.entry_label(entry)}"))
            self.scores.value = format_scores(self.index["volume"], entry)

    def open_napari(self):
        """A napari viewer on the same volume, its "Live run" dock widget following this run."""
        from vesuvius_lab.lab.live_dock import open_viewer

        self.viewer, self.dock = open_viewer(self.run_dir)
        return self.viewer

    def save_image(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.image.value)
        return path
