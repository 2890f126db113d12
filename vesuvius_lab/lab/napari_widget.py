"""A napari dock widget (magicgui) that opens a manifest record and its sampled patches.

Declared in ``vesuvius_lab/napari.yaml`` (npe2), so napari lists it under Plugins; it can also
be docked from code with ``viewer.window.add_dock_widget(RecordPatchesWidget(viewer))``.
"""

from __future__ import annotations

from pathlib import Path

import napari
from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton, SpinBox

from vesuvius_lab.errors import VLabError
from vesuvius_lab.lab import records, views
from vesuvius_lab.manifest import DEMO_MANIFEST, load_manifest


class RecordPatchesWidget(Container):
    """Manifest file, record, patch size, number of patches and seed; "Open" adds the layers."""

    def __init__(self, viewer: napari.viewer.Viewer, manifest: str | Path = DEMO_MANIFEST):
        self.viewer = viewer
        self.manifest_file = FileEdit(label="manifest", filter="*.yaml", mode="r")
        self.record = ComboBox(label="record", choices=[])
        self.patch_size = SpinBox(label="patch size", min=4, max=1024, value=64)
        self.n_patches = SpinBox(label="patches", min=1, max=512, value=16)
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0)
        self.open_button = PushButton(text="Open")
        self.status = Label(value="")
        super().__init__(
            widgets=[self.manifest_file, self.record, self.patch_size, self.n_patches, self.seed, self.open_button, self.status]
        )
        self.manifest_file.changed.connect(self._list_records)
        self.open_button.changed.connect(self.open)
        self.manifest_file.value = manifest

    def _list_records(self) -> None:
        """Fill the record choices from the manifest alone (nothing is decoded yet)."""
        try:
            manifest = load_manifest(self.manifest_file.value)
        except VLabError as exc:
            self.record.choices = []
            self.status.value = "\n".join(exc.lines)
            return
        self.record.choices = [(info.title, info.id) for info in records.record_infos(manifest)]
        self.status.value = f"{manifest.name}: {len(manifest.records)} records"

    def open(self) -> None:
        """Add the chosen record's image/labels and its sampled patch boxes to the viewer."""
        if self.record.value is None:
            self.status.value = "choose a manifest with records first"
            return
        try:
            manifest = records.open_manifest(self.manifest_file.value)
            volume = records.open_record(manifest, self.record.value)
            patches = records.sample_patches(manifest, self.record.value, (self.patch_size.value,) * 3,
                                          self.n_patches.value, self.seed.value)
        except VLabError as exc:
            self.status.value = "\n".join(exc.lines)
            return
        views.show_record(self.viewer, volume)
        views.show_patch_boxes(self.viewer, patches)
        n_fg = sum(p["foreground_draw"] for p in patches)
        self.status.value = f"{volume.record.id}: {len(patches)} patches, {n_fg} foreground draws"
