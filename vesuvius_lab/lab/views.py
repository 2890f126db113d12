"""napari layers for a record, its prediction and its sampled patches, through the public layer API.

Volumes are added as dask arrays over the cache's chunked arrays, so napari decodes only the
chunks of the slice it displays; a record cropped from an OME-Zarr multiscale store also gets the
store's coarser levels (a multiscale layer). Layers have fixed names and get the new record's data
in place when another record is shown, so a viewer is reused with its camera, its layer settings
and its 2D/3D mode. Every function that changes a viewer runs on the Qt thread
(``qt.on_qt_thread``), whichever thread a widget callback calls it from.
"""

from __future__ import annotations

import html
import io
import sys
import weakref
from pathlib import Path

import ipywidgets
import napari
import numpy as np
from napari.utils.colormaps import DirectLabelColormap

from vesuvius_lab.cache import CachedVolume
from vesuvius_lab.layout import IGNORE_LABEL
from vesuvius_lab.lab.records import LABEL_COLORS
from vesuvius_lab.lab.forms import notebook_form
from vesuvius_lab.lab.qt import on_qt_thread
from vesuvius_lab.preview import box_edges

PREDICTION_COLORS = {1: (1.0, 0.2, 1.0, 0.9)}
DRAW_COLORS = {True: (1.0, 0.25, 0.25, 1.0), False: (0.2, 1.0, 0.45, 1.0)}  # foreground / uniform draws
# A walk over the 12 edges of a box whose corners are numbered z*4 + y*2 + x (as patch_corners
# orders them), three edges walked twice: one path per box in 3D instead of 12 lines.
BOX_WALK = (0, 1, 3, 2, 0, 4, 5, 7, 6, 4, 5, 1, 3, 7, 6, 2)
ONLY_2D = ("ignored", "patch outlines")  # layers that would hide the rest in 3D
OBLIQUE = (0.0, -25.0, 55.0)  # camera angles for a first 3D view
AXIS_LABELS = ("z", "y", "x")  # the slider napari shows for a 3D volume says z, not -3
_FOLLOWING: weakref.WeakSet = weakref.WeakSet()  # viewers whose ndisplay changes are followed


def label_colormap(colors: dict[int, tuple[float, float, float, float]]) -> DirectLabelColormap:
    """Explicit colours per label value; any other value is transparent."""
    return DirectLabelColormap(color_dict={None: (0.0, 0.0, 0.0, 0.0), **colors})


def _replace(viewer: napari.Viewer, name: str) -> None:
    if name in viewer.layers:
        viewer.layers.remove(name)


def _sync_2d_only(viewer: napari.Viewer) -> None:
    for name in ONLY_2D:
        if name in viewer.layers:
            viewer.layers[name].visible = viewer.dims.ndisplay == 2


def _follow_ndisplay(viewer: napari.Viewer) -> None:
    """Hide the 2D-only layers in 3D and show them again in 2D, however ndisplay is switched."""
    if viewer not in _FOLLOWING:
        viewer.dims.events.ndisplay.connect(lambda _event: _sync_2d_only(viewer))
        _FOLLOWING.add(viewer)
    _sync_2d_only(viewer)


def _set_data(viewer: napari.Viewer, name: str, data, kind: type, add, multiscale: bool = False) -> napari.layers.Layer:
    """The layer ``name`` showing ``data``: the existing one gets the data in place (layers are not
    removed and re-added, so the camera, the layer settings and the layer list's rows stay), a
    missing one, or one of another kind or scale structure, is added with ``add(data)``."""
    if name in viewer.layers:
        layer = viewer.layers[name]
        if type(layer) is kind and getattr(layer, "multiscale", False) == multiscale:
            layer.data = data
            return layer
        viewer.layers.remove(layer)
    return add(data)


def lazy(array) -> "dask.array.Array":  # noqa: F821
    """A dask array over a cache array: each task decodes one z-slab of chunks."""
    import dask.array as da

    chunks = getattr(array, "chunks", None)
    slab = (chunks[0] if isinstance(chunks, tuple) else 32, 256, 256)
    return da.from_array(array, chunks=slab, asarray=True, lock=False, fancy=False)


def image_levels(volume: CachedVolume) -> list:
    """The image as napari data: the cache's level, then the crop of each coarser level of its
    OME-Zarr multiscale store (factor from the level shapes), lazily; one level otherwise."""
    import dask.array as da

    levels = [lazy(volume.image)]
    ref = volume.record.image_ref
    if ref is None:
        return levels
    from vesuvius_lab.io import ZarrVolume

    source = ZarrVolume(volume.record.image, ref)
    for coarse in source.levels[source.level + 1:]:
        factor = [f / c for f, c in zip(source.full_shape, coarse.shape, strict=True)]
        box = tuple(slice(int(a // f), max(int(a // f) + 1, int(-(-b // f))))
                    for (a, b), f in zip(source.crop, factor, strict=True))
        level = da.from_zarr(coarse)[box]
        if min(level.shape) < 2:
            break
        levels.append(level)
    return levels


@on_qt_thread
def show_record(viewer: napari.Viewer, volume: CachedVolume, prediction: np.ndarray | None = None) -> list:
    """Image, surface (label 1) and ignored regions (label 2) in distinct colours, and a prediction.

    Surface and ignored regions are two labels layers over the same lazy array: the ignored border
    encloses every volume, so in 3D it would hide the surface and is shown in 2D only. An integer
    prediction is a label map (1 = surface); a float one is a probability map. Showing another
    record keeps the view (2D/3D, camera angles); it is refitted only if the shape changed.
    """
    before = viewer.layers["image"].data.shape if "image" in viewer.layers else None
    levels, label = image_levels(volume), lazy(volume.label)
    multiscale = len(levels) > 1
    layers = [
        _set_data(viewer, "image", levels if multiscale else levels[0], napari.layers.Image, lambda d: viewer.add_image(
            d, multiscale=multiscale, name="image", colormap="gray", contrast_limits=(0, 255), blending="additive",
            rendering="attenuated_mip", attenuation=0.3), multiscale),
        _set_data(viewer, "surface", label, napari.layers.Labels, lambda d: viewer.add_labels(
            d, name="surface", colormap=label_colormap({1: LABEL_COLORS[1]}), opacity=0.7)),
        _set_data(viewer, "ignored", label, napari.layers.Labels, lambda d: viewer.add_labels(
            d, name="ignored", colormap=label_colormap({IGNORE_LABEL: LABEL_COLORS[IGNORE_LABEL]}))),
    ]
    if prediction is None:
        _replace(viewer, "prediction")
    elif np.issubdtype(prediction.dtype, np.integer):
        layers.append(_set_data(viewer, "prediction", prediction, napari.layers.Labels, lambda d: viewer.add_labels(
            d, name="prediction", colormap=label_colormap(PREDICTION_COLORS))))
    else:
        layers.append(_set_data(viewer, "prediction", prediction, napari.layers.Image, lambda d: viewer.add_image(
            d, name="prediction", colormap="magenta", blending="additive", contrast_limits=(0, 1))))
    order = [viewer.layers.index(layer) for layer in layers]
    if order != list(range(len(layers))):
        viewer.layers.move_multiple(order, 0)  # under any patch boxes
    viewer.dims.axis_labels = AXIS_LABELS
    if before is not None and before != volume.image.shape:
        viewer.reset_view(reset_camera_angle=False)
    viewer.title = f"vesuvius-lab: {volume.record.id}"
    _follow_ndisplay(viewer)
    return layers


def box_path(corners: np.ndarray) -> np.ndarray:
    """(16, 3) path through a box's 8 corners that draws all 12 of its edges."""
    return np.asarray(corners)[list(BOX_WALK)]


def box_sections(corners: np.ndarray) -> list[np.ndarray]:
    """The box's outline on every integer z plane it crosses, each a convex (k, 3) polygon.

    napari shows a shape in 2D only on the slice that contains all its vertices, so a 3D box
    needs one planar outline per slice to be visible when slicing through it.
    """
    corners = np.asarray(corners, dtype=float)
    edges = box_edges(corners)
    sections = []
    for z in range(int(np.ceil(corners[:, 0].min())), int(np.floor(corners[:, 0].max())) + 1):
        points = []
        for a, b in edges:
            if a[0] == b[0]:
                if a[0] == z:
                    points += [a, b]
            elif min(a[0], b[0]) <= z <= max(a[0], b[0]):
                points.append(a + (z - a[0]) / (b[0] - a[0]) * (b - a))
        yx = np.unique(np.round(np.array(points)[:, 1:], 6), axis=0)
        if len(yx) < 3:
            continue
        centre = yx.mean(axis=0)
        yx = yx[np.argsort(np.arctan2(yx[:, 0] - centre[0], yx[:, 1] - centre[1]))]
        sections.append(np.column_stack([np.full(len(yx), float(z)), yx]))
    return sections


@on_qt_thread
def show_patch_boxes(viewer: napari.Viewer, patches: list[dict]) -> list:
    """Sampled patch boxes, foreground and uniform draws in different colours.

    Two layers: "patch boxes" (one wireframe path per box, drawn over the volume in 3D) and
    "patch outlines" (the per-slice outlines that 2D slicing shows).
    """
    for name in ("patch boxes", "patch outlines"):
        _replace(viewer, name)
    if not patches:
        return []
    colours = [DRAW_COLORS[p["foreground_draw"]] for p in patches]
    sections = [box_sections(p["corners"]) for p in patches]
    style = dict(ndim=3, edge_width=1.0, blending="translucent_no_depth")
    layers = [
        viewer.add_shapes(
            [box_path(p["corners"]) for p in patches],
            shape_type="path",
            name="patch boxes",
            edge_color=colours,
            features={"foreground_draw": [p["foreground_draw"] for p in patches], "index": [p["index"] for p in patches]},
            **style,
        ),
        viewer.add_shapes(
            [s for per_box in sections for s in per_box],
            shape_type="polygon",
            name="patch outlines",
            edge_color=[c for c, per_box in zip(colours, sections, strict=True) for _ in per_box],
            face_color="transparent",
            **style,
        ),
    ]
    _follow_ndisplay(viewer)
    return layers


@on_qt_thread
def set_ndisplay(viewer: napari.Viewer, ndisplay: int) -> None:
    """Switch 2D/3D; 3D starts from an oblique camera (napari's default looks along z, like 2D)."""
    viewer.dims.ndisplay = ndisplay
    if ndisplay == 3:
        viewer.scene.camera.angles = OBLIQUE


def ndisplay_toggle(viewer: napari.Viewer) -> ipywidgets.ToggleButtons:
    """2D/3D buttons for a notebook, bound both ways to the viewer's ``dims.ndisplay``."""
    toggle = ipywidgets.ToggleButtons(options=[("2D", 2), ("3D", 3)], value=viewer.dims.ndisplay, description="napari")
    toggle.observe(lambda change: set_ndisplay(viewer, change["new"]), names="value")
    viewer.dims.events.ndisplay.connect(lambda _event: setattr(toggle, "value", viewer.dims.ndisplay))
    return toggle


# layer events that change what the canvas shows (not thumbnails, status or loading states)
SHOWN_EVENTS = {"data", "visible", "opacity", "colormap", "contrast_limits", "gamma", "blending", "rendering",
                "attenuation", "iso_threshold", "edge_color", "face_color", "edge_width", "show_selected_label"}
SNAPSHOT_DELAY_MS = 250  # one snapshot after a burst of changes (a slider drag, a record switch)


class ViewerSnapshot:
    """The viewer's canvas as an image in the notebook, redrawn after whatever changes it.

    napari draws in a desktop window; on a remote JupyterLab (or in a saved notebook) this image is
    what the researcher sees. Camera, slider, 2D/3D and layer changes schedule one snapshot, taken
    on the Qt thread ``SNAPSHOT_DELAY_MS`` after the last of a burst.
    """

    def __init__(self, viewer: napari.Viewer, width: str = "640px"):
        from qtpy.QtCore import QTimer

        self.viewer = viewer
        self.image = ipywidgets.Image(format="png", layout=ipywidgets.Layout(width=width))
        self.widget = self.image
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(SNAPSHOT_DELAY_MS)
        self._timer.timeout.connect(self._scheduled)
        viewer.scene.camera.events.connect(self._changed)
        viewer.dims.events.current_step.connect(self._changed)
        viewer.dims.events.ndisplay.connect(self._changed)
        viewer.layers.events.connect(self._changed)
        viewer.layers.events.inserted.connect(lambda event: event.value.events.connect(self._layer_changed))
        for layer in viewer.layers:
            layer.events.connect(self._layer_changed)
        self.update()

    def _layer_changed(self, event) -> None:
        if event.type in SHOWN_EVENTS:
            self._changed(event)

    def _changed(self, _event=None) -> None:
        self._timer.start()  # napari's events come on the Qt thread (views.* run there)

    def _scheduled(self) -> None:
        """The timer's snapshot: an error is reported, never raised inside a Qt slot (which aborts)."""
        try:
            self.update()
        except Exception as exc:  # e.g. the viewer was closed meanwhile
            print(f"napari snapshot skipped: {exc!r}", file=sys.stderr)

    @on_qt_thread
    def update(self) -> bytes:
        """Take the snapshot now; its PNG bytes."""
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.viewer.screenshot(canvas_only=True, flash=False)).save(buf, format="png")
        self.image.value = buf.getvalue()
        return self.image.value


@on_qt_thread
def name_axes(viewer: napari.Viewer) -> None:
    """z/y/x on the canvas itself: the axes of napari's canvas overlay (bottom left), labelled from
    ``dims.axis_labels``, so a canvas snapshot says which way is which (the dims sliders that also
    carry the names are not part of the canvas)."""
    if viewer.dims.ndim == len(AXIS_LABELS):
        viewer.dims.axis_labels = AXIS_LABELS
    axes = viewer.canvas.overlays.axes
    axes.visible, axes.labels, axes.colored = True, True, True


def legend_html(colours: dict[str, str]) -> str:
    """A row of colour swatches with their meaning (CSS colours, as the layers' colormaps name them)."""
    swatch = ("<span style='margin-left:12px'><span style='display:inline-block;width:14px;height:14px;"
              "margin-right:4px;vertical-align:middle;border:1px solid #888;background:{}'></span>{}</span>")
    return "".join(swatch.format(html.escape(c), html.escape(name)) for name, c in colours.items())


def notebook_view(viewer: napari.Viewer, legend: dict[str, str] | None = None) -> ipywidgets.VBox:
    """What a napari cell shows under it: the 2D/3D buttons, a live snapshot of the canvas (axes
    named z/y/x) and the legend of its colours, so the notebook reads without the desktop window.
    The snapshot follows its viewer: a view that must stay as its cell made it gets a viewer of its own."""
    name_axes(viewer)
    snapshot = ViewerSnapshot(viewer)
    key = ipywidgets.HTML(legend_html(legend)) if legend else None
    box = notebook_form([ndisplay_toggle(viewer), snapshot.widget, *([key] if key else [])])
    box.snapshot = snapshot  # alive as long as its widget: napari holds event callbacks weakly
    box.legend = key
    return box


@on_qt_thread
def save_views(viewer: napari.Viewer, folder: str | Path, stem: str) -> list[Path]:
    """Canvas screenshots in 2D and 3D (``{stem}-2d.png``, ``{stem}-3d.png``); ndisplay is restored."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    before, paths = viewer.dims.ndisplay, []
    for ndisplay in (2, 3):
        set_ndisplay(viewer, ndisplay)
        path = folder / f"{stem}-{ndisplay}d.png"
        viewer.screenshot(path=str(path), canvas_only=True)
        paths.append(path)
    set_ndisplay(viewer, before)
    return paths
