"""napari views and the dock widget, in real viewers under Xvfb, checked through screenshots."""

from itertools import pairwise

import dask.array as da
import napari
import numpy as np
import pytest
from npe2 import PluginManager, PluginManifest
from npe2.manifest.utils import import_python_name

import vesuvius_lab
from conftest_gui import assert_rendered
from vesuvius_lab.augment import patch_corners
from vesuvius_lab.config import AugmentConfig, SamplerConfig
from vesuvius_lab.lab import records, views
from vesuvius_lab.lab.forms import RECONNECT_TEXT
from vesuvius_lab.lab.live_dock import LiveRunWidget
from vesuvius_lab.lab.napari_widget import RecordPatchesWidget
from vesuvius_lab.manifest import load_manifest
from vesuvius_lab.preview import box_edges

PLUGIN_YAML = vesuvius_lab.__file__.replace("__init__.py", "napari.yaml")


def _segments(points):
    return {frozenset(map(tuple, pair)) for pair in pairwise(np.round(points, 6))}


def _rotation(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def test_box_path_walks_exactly_the_twelve_edges():
    corners = patch_corners(np.array([10.0, 20, 30]), (8, 12, 16), _rotation(20))
    assert _segments(views.box_path(corners)) == {frozenset(map(tuple, np.round(e, 6))) for e in box_edges(corners)}


def test_box_sections_outline_the_box_on_each_slice():
    corners = patch_corners(np.array([10.0, 20, 30]), (9, 13, 17), np.eye(3))  # z 6..14, y 14..26, x 22..38
    sections = views.box_sections(corners)
    assert [s[0, 0] for s in sections] == list(range(6, 15))
    for s in sections:
        assert sorted(map(tuple, s[:, 1:])) == [(14, 22), (14, 38), (26, 22), (26, 38)]
    tilted = patch_corners(np.array([10.0, 20, 30]), (9, 13, 17), _rotation(30))
    inverse = np.linalg.inv(_rotation(30))
    for s in views.box_sections(tilted):
        assert np.all(s[:, 0] == s[0, 0]) and len(s) >= 4  # planar polygons
        local = (inverse @ (s - [10, 20, 30]).T).T  # back in the patch's own axes: on or in the box
        assert np.all(np.abs(local) <= np.array([4, 6, 8]) + 1e-6)


def _colour_share(rgb: np.ndarray, rgb_ref, tol: int = 40) -> float:
    return float(np.mean(np.all(np.abs(rgb.astype(int) - np.asarray(rgb_ref)) < tol, axis=-1)))


@pytest.mark.gui
def test_record_patches_and_prediction_render_in_2d_and_3d(viewer, tiny_manifest, artifacts, tmp_path):
    manifest = load_manifest(tiny_manifest)
    rid = manifest.records[0].id
    volume = records.open_record(manifest, rid)
    prediction = (np.asarray(volume.label) == 1).astype(np.float32) * 0.9
    layers = views.show_record(viewer, volume, prediction)
    patches = records.sample_patches(manifest, rid, (24, 24, 24), 6, sampler=SamplerConfig(fg_fraction=0.5),
                                  augment=AugmentConfig(enabled=False))
    boxes, outlines = views.show_patch_boxes(viewer, patches)
    assert [layer.name for layer in viewer.layers] == ["image", "surface", "ignored", "prediction", "patch boxes",
                                                        "patch outlines"]
    assert all(isinstance(layer.data, da.Array) for layer in layers[:3])  # lazy: napari decodes what it shows
    assert len(boxes.data) == 6 and list(boxes.features["foreground_draw"]) == [p["foreground_draw"] for p in patches]
    shot2d, shot3d = views.save_views(viewer, artifacts, "views-record-patches")
    rgb2d, rgb3d = assert_rendered(shot2d), assert_rendered(shot3d)
    # Box colours are drawn opaque over everything: both kinds of draw must show in both views.
    for rgb in (rgb2d, rgb3d):
        for colour in views.DRAW_COLORS.values():
            assert _colour_share(rgb, np.array(colour[:3]) * 255) > 1e-4
    assert not np.array_equal(rgb2d, rgb3d)
    assert viewer.dims.ndisplay == 2 and viewer.layers["ignored"].visible


@pytest.mark.gui
def test_label_map_prediction_and_an_ndisplay_toggle_bound_both_ways(viewer, tiny_manifest):
    manifest = load_manifest(tiny_manifest)
    volume = records.open_record(manifest, manifest.records[0].id)
    views.show_record(viewer, volume, (np.asarray(volume.label) == 1).astype(np.uint8))
    assert [layer.name for layer in viewer.layers] == ["image", "surface", "ignored", "prediction"]
    assert isinstance(viewer.layers["prediction"], napari.layers.Labels)  # integers: a label map
    toggle = views.ndisplay_toggle(viewer)
    toggle.value = 3
    assert viewer.dims.ndisplay == 3 and tuple(viewer.scene.camera.angles) == pytest.approx(views.OBLIQUE)
    assert not viewer.layers["ignored"].visible and viewer.layers["surface"].visible
    viewer.dims.ndisplay = 2
    assert toggle.value == 2 and viewer.layers["ignored"].visible


def test_plugin_manifest_is_valid_and_points_at_the_widget():
    manifest = PluginManifest.from_file(PLUGIN_YAML)
    assert manifest.name == "vesuvius-lab"
    commands = {c.id: c.python_name for c in manifest.contributions.commands}
    assert sorted(w.command for w in manifest.contributions.widgets) == sorted(commands)
    assert import_python_name(commands["vesuvius-lab.record_patches"]) is RecordPatchesWidget
    assert import_python_name(commands["vesuvius-lab.live_run"]) is LiveRunWidget


@pytest.mark.gui
def test_dock_widget_from_the_plugin_manifest_opens_record_and_patches(viewer, tiny_manifest, artifacts):
    plugins = PluginManager.instance()
    plugins.discover()  # the package's napari.manifest entry point, as an installed plugin is found
    assert plugins.get_manifest("vesuvius-lab").name == PluginManifest.from_file(PLUGIN_YAML).name
    _dock, widget = viewer.window.add_plugin_dock_widget("vesuvius-lab", "Record patches")
    assert isinstance(widget, RecordPatchesWidget)
    widget.manifest_file.value = tiny_manifest
    listed = load_manifest(tiny_manifest).records
    assert list(widget.record.choices) == [r.id for r in listed]
    widget.record.value = listed[2].id
    widget.patch_size.value, widget.n_patches.value, widget.seed.value = 20, 5, 7
    widget.open_button.native.click()
    assert {"image", "surface", "ignored", "patch boxes", "patch outlines"} <= {layer.name for layer in viewer.layers}
    assert viewer.layers["image"].data.shape == (48, 48, 48) and len(viewer.layers["patch boxes"].data) == 5
    assert widget.status.value.startswith(f"{listed[2].id}: 5 patches")
    for path in views.save_views(viewer, artifacts, "dock-widget"):
        assert_rendered(path)
    widget.manifest_file.value = tiny_manifest.parent / "missing.yaml"
    assert widget.record.choices == () and "manifest not found" in widget.status.value


def test_a_blank_or_flat_screenshot_is_rejected(tmp_path):
    from PIL import Image

    blank, two_tone = np.zeros((60, 80, 3), np.uint8), np.zeros((60, 80, 3), np.uint8)
    two_tone[:, 40:] = 255
    for name, rgb in (("blank", blank), ("two-tone", two_tone)):
        Image.fromarray(rgb).save(tmp_path / f"{name}.png")
        with pytest.raises(AssertionError, match="looks blank"):
            assert_rendered(tmp_path / f"{name}.png")


@pytest.mark.gui
def test_error_view_colours_false_positives_red_and_false_negatives_cyan(viewer, artifacts):
    """Notebook 05's napari view: a prediction shifted off a sheet shows both error colours."""
    from vesuvius_lab.evaluate import VolumeResult
    from vesuvius_lab.lab.evaluation import show_errors

    label = np.zeros((24, 48, 48), np.uint8)
    label[:, 20:24] = 1  # a sheet, four voxels thick
    label[:, :, :4] = 2  # an ignored strip: no error colour may show there
    mask = np.zeros_like(label)
    mask[:, 22:26] = 1  # half on the sheet, half beside it
    image = (label == 1).astype(np.uint8) * 200 + 20
    result = VolumeResult("v1", image, label, mask.astype(np.float32), mask, {"score": 0.5})
    show_errors(viewer, result)
    assert [layer.name for layer in viewer.layers] == ["v1 image", "probability", "ground truth",
                                                        "errors (TP white, FP red, FN cyan)"]
    errors = viewer.layers[-1].data
    assert errors[0, 20, 10] == 3 and errors[0, 22, 10] == 1 and errors[0, 25, 10] == 2 and errors[0, 22, 2] == 0
    shot = artifacts / "evaluate-errors.png"
    viewer.reset_view()
    viewer.screenshot(path=str(shot), canvas_only=True)
    rgb = assert_rendered(shot, min_std=10.0, min_colours=3)
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    red, cyan = (r > 150) & (g < 80) & (b < 80), (r < 110) & (g > 150) & (b > 150)  # the 0.8-opaque blends
    assert red.mean() > 0.01 and cyan.mean() > 0.01


@pytest.mark.gui
def test_another_record_from_a_widget_thread_keeps_the_3d_view_and_the_layers(viewer, tiny_manifest):
    """Notebook 01's record change as JupyterLab delivers it: a widget callback on a kernel
    subshell's thread, with napari in 3D. The call is run on the Qt thread, the layers get the new
    data in place (the layer list never paints a removed row) and the camera stays oblique."""
    import threading
    import time

    from qtpy.QtWidgets import QApplication

    manifest = load_manifest(tiny_manifest)
    first, second = (records.open_record(manifest, r.id) for r in manifest.records[:2])
    before = views.show_record(viewer, first, (np.asarray(first.label) == 1).astype(np.float32))
    views.set_ndisplay(viewer, 3)
    shown, threads = [], []

    def callback() -> None:
        shown.append(views.show_record(viewer, second))
        threads.append(threading.current_thread())

    worker = threading.Thread(target=callback)
    worker.start()
    deadline = time.monotonic() + 60
    while worker.is_alive() and time.monotonic() < deadline:
        QApplication.processEvents()  # the kernel's Qt loop
        time.sleep(0.01)
    worker.join(timeout=1)
    assert shown and threads[0] is not threading.main_thread()
    assert [layer.name for layer in viewer.layers] == ["image", "surface", "ignored"]  # the prediction was the first's
    assert all(a is b for a, b in zip(shown[0], before, strict=False))  # the same layers, new data
    shown_image = np.asarray(viewer.layers["image"].data)  # a lazy view over the second record's cache
    assert np.array_equal(shown_image, second.image[:]) and not np.array_equal(shown_image, first.image[:])
    assert viewer.dims.ndisplay == 3 and tuple(viewer.scene.camera.angles) == pytest.approx(views.OBLIQUE)
    assert viewer.dims.axis_labels == ("z", "y", "x") and not viewer.layers["ignored"].visible


def test_a_viewer_call_from_another_thread_raises_its_error_in_the_caller(x_display):
    """An exception on the Qt thread comes back to the calling thread, never raised in a Qt slot."""
    import threading

    from qtpy.QtWidgets import QApplication

    from vesuvius_lab.lab.qt import on_qt_thread

    QApplication.instance() or QApplication([])

    @on_qt_thread
    def fails(value):
        assert threading.current_thread() is threading.main_thread()
        raise ValueError(f"bad {value}")

    caught = []
    worker = threading.Thread(target=lambda: caught.append(pytest.raises(ValueError, fails, 3)))
    worker.start()
    while worker.is_alive():
        QApplication.processEvents()
        worker.join(timeout=0.01)
    assert "bad 3" in str(caught[0].value)


@pytest.mark.gui
def test_notebook_view_shows_a_snapshot_that_follows_the_viewer(viewer, tiny_manifest, artifacts):
    """Under a napari cell: the 2D/3D buttons and the canvas as an image, redrawn after a change."""
    import io
    import time

    from PIL import Image
    from qtpy.QtWidgets import QApplication

    manifest = load_manifest(tiny_manifest)
    views.show_record(viewer, records.open_record(manifest, manifest.records[0].id))
    viewer.dims.axis_labels = ("0", "1", "2")
    box = views.notebook_view(viewer)
    note, toggle, image = box.children  # the note shows only on a saved copy (lab.forms)
    assert RECONNECT_TEXT in note.value and "vlab-form" in box._dom_classes
    assert viewer.dims.axis_labels == ("z", "y", "x") and isinstance(toggle, type(views.ndisplay_toggle(viewer)))
    axes = viewer.canvas.overlays.axes  # the names on the canvas, so in the snapshot too
    assert axes.visible and axes.labels and axes.colored
    first = image.value
    corner = _corner(first)  # napari's axes, bottom left: x cyan, y magenta (z yellow in 3D)
    assert (_near(corner, (0, 255, 255)) > 20) and (_near(corner, (255, 0, 255)) > 20)
    axes.visible = False
    assert _near(_corner(views.ViewerSnapshot(viewer).update()), (0, 255, 255)) < _near(corner, (0, 255, 255)) / 4
    axes.visible = True
    (artifacts / "notebook-view-2d.png").write_bytes(first)
    assert_rendered(artifacts / "notebook-view-2d.png")
    toggle.value = 3
    deadline = time.monotonic() + 30
    while image.value == first and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.02)
    assert image.value != first, "the snapshot did not follow the switch to 3D"
    shown = np.asarray(Image.open(io.BytesIO(image.value)).convert("RGB"))
    canvas = viewer.screenshot(canvas_only=True)[..., :3]
    assert shown.shape == canvas.shape and np.abs(shown.astype(int) - canvas).mean() < 2


def _corner(png: bytes) -> np.ndarray:
    """The bottom-left quarter of a snapshot, where napari draws the canvas axes."""
    import io

    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return rgb[rgb.shape[0] * 3 // 4:, : rgb.shape[1] // 4]


def _near(rgb: np.ndarray, colour: tuple[int, int, int], tolerance: int = 40) -> int:
    return int((np.abs(rgb - np.array(colour)).max(axis=-1) < tolerance).sum())
