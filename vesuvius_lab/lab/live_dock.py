"""The "Live run" napari dock widget: a run's live prediction (``training.live_volume``) in notebook 05's
error view, following the run: it reloads when a new validation lands.

Declared in ``vesuvius_lab/napari.yaml`` (Plugins > Live run), opened by notebook 04's "Open in
napari" (``open_viewer``). A Qt timer polls the run folder's small ``live/index.json``; a new
validation replaces the probability and error layers' data in place, so the camera, the slice
and the layer settings stay as the researcher left them.
"""

from __future__ import annotations

from pathlib import Path

import napari
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label
from qtpy.QtCore import QTimer

from vesuvius_lab.evaluate import PART_NAMES, SCORE_PARTS, VolumeResult
from vesuvius_lab.lab.evaluation import error_labels, show_errors
from vesuvius_lab.training import live_volume

POLL_MS = 1000


def _layer(viewer: napari.Viewer, prefix: str):
    return next((layer for layer in viewer.layers if layer.name.startswith(prefix)), None)


def show_live(viewer: napari.Viewer, result: VolumeResult) -> None:
    """notebook 05's view of ``result``; when it shows this volume already, only the probability
    and the errors change."""
    image, probability, errors = (_layer(viewer, p) for p in (f"{result.id} image", "probability", "errors"))
    if image is None or probability is None or errors is None or image.data.shape != result.probability.shape:
        show_errors(viewer, result)
        return
    probability.data = result.probability
    errors.data = error_labels(result.mask, result.label)


class LiveRunWidget(Container):
    """Run folder, the validation shown, "follow the run"; reloads as validations land."""

    def __init__(self, viewer: napari.viewer.Viewer, run_dir: str | Path | None = None, poll_ms: int = POLL_MS):
        self.viewer = viewer
        self.run_folder = FileEdit(label="run folder", mode="d")
        self._choices: list = []
        # a callable: napari resets a docked magicgui widget's choices whenever layers change
        self.validation = ComboBox(label="validation", choices=lambda _widget: self._choices)
        self.follow = CheckBox(text="follow the run (show each new validation)", value=True)
        self.status = Label(value="choose a run folder")
        super().__init__(widgets=[self.run_folder, self.validation, self.follow, self.status])
        self.shown: int | None = None  # the step shown
        self.reloads = 0  # validations shown so far (tests and the status line)
        self.run_folder.changed.connect(self._on_folder)
        self.validation.changed.connect(self._on_choice)
        self.timer = QTimer(self.native)  # stops with the widget
        self.timer.timeout.connect(self.poll)
        self.timer.start(poll_ms)
        if run_dir is not None:
            self.run_folder.value = run_dir

    @property
    def run_dir(self) -> Path | None:
        value = self.run_folder.value
        return Path(value) if value and str(value) not in ("", ".") else None

    def _on_folder(self) -> None:
        self.shown, self._choices = None, []
        with self.validation.changed.blocked():
            self.validation.reset_choices()
        self.poll()

    def _on_choice(self) -> None:
        step = self.validation.value
        if step is None or step == self.shown:
            return
        entries = live_volume.read_index(self.run_dir).get("entries") or []
        if entries and step != entries[-1]["step"]:
            self.follow.value = False  # an earlier validation chosen by hand stays shown
        self._show(step)

    def poll(self) -> None:
        """Offer the kept validations; show the latest when following and it is new. Called by the
        Qt timer, where an exception would end napari (PyQt aborts): it is shown instead."""
        try:
            self._poll()
        except Exception as exc:  # noqa: BLE001 - the next poll tries again
            self.status.value = f"reload failed: {type(exc).__name__}: {exc}"

    def _poll(self) -> None:
        if self.run_dir is None:
            return
        index = live_volume.read_index(self.run_dir)
        entries = index.get("entries") or []
        if not entries:
            self.status.value = index.get("problem") or f"{self.run_dir.name}: no validation yet"
            return
        choices = [(live_volume.entry_label(e), e["step"]) for e in entries]
        if choices != self._choices:
            self._choices = choices
            with self.validation.changed.blocked():
                self.validation.reset_choices()
                if self.shown in [s for _, s in choices]:
                    self.validation.value = self.shown
        latest = entries[-1]["step"]
        if (self.follow.value and latest != self.shown) or self.shown is None:
            self._show(latest)

    def _show(self, step: int) -> None:
        index = live_volume.read_index(self.run_dir)
        entry = next((e for e in index.get("entries") or [] if e["step"] == step), None)
        result = live_volume.load_result(self.run_dir, entry) if entry else None
        if result is None:
            return  # removed by retention, or being written: the next poll sees what is there
        show_live(self.viewer, result)
        self.shown, self.reloads = step, self.reloads + 1
        with self.validation.changed.blocked():
            self.validation.value = step
        scores = ", ".join(f"{PART_NAMES[k]} {result.scores[k]:.3f}" for k in SCORE_PARTS
                           if isinstance(result.scores.get(k), int | float))
        self.status.value = f"{live_volume.entry_label(entry)}: {scores}"
        self.viewer.title = f"vesuvius-lab live: {self.run_dir.name}, {live_volume.entry_label(entry)}"


def open_viewer(run_dir: str | Path) -> tuple[napari.Viewer, LiveRunWidget]:
    """A napari viewer (the Qt loop started in a notebook kernel) with the dock following the run."""
    from vesuvius_lab.lab.qt import start_qt

    start_qt()
    viewer = napari.Viewer()
    widget = LiveRunWidget(viewer, run_dir)
    viewer.window.add_dock_widget(widget, name="Live run", area="right")
    return viewer, widget
