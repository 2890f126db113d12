"""napari layers for a record, its prediction and its sampled patches, through the public layer API.

Volumes are added as dask arrays over the cache's chunked arrays, so napari decodes only the
chunks of the slice it displays; a record cropped from an OME-Zarr multiscale store also gets the
store's coarser levels (a multiscale layer). Layers have fixed names and are replaced when a new
record is shown, so a viewer can be reused.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import ipywidgets
import napari
import numpy as np
from napari.utils.colormaps import DirectLabelColormap

from vesuvius_lab.cache import CachedVolume
from vesuvius_lab.layout import IGNORE_LABEL
from vesuvius_lab.lab.data import LABEL_COLORS
from vesuvius_lab.preview import box_edges

PREDICTION_COLORS = {1: (1.0, 0.2, 1.0, 0.9)}
DRAW_COLORS = {True: (1.0, 0.25, 0.25, 1.0), False: (0.2, 1.0, 0.45, 1.0)}  # foreground / uniform draws
# A walk over the 12 edges of a box whose corners are numbered z*4 + y*2 + x (as patch_corners
# orders them), three edges walked twice: one path per box in 3D instead of 12 lines.
BOX_WALK = (0, 1, 3, 2, 0, 4, 5, 7, 6, 4, 5, 1, 3, 7, 6, 2)
ONLY_2D = ("ignored", "patch outlines")  # layers that would hide the rest in 3D
OBLIQUE = (0.0, -25.0, 55.0)  # camera angles for a first 3D view
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


def show_record(viewer: napari.Viewer, volume: CachedVolume, prediction: np.ndarray | None = None) -> list:
    """Image, surface (label 1) and ignored regions (label 2) in distinct colours, and a prediction.

    Surface and ignored regions are two labels layers over the same lazy array: the ignored border
    encloses every volume, so in 3D it would hide the surface and is shown in 2D only. An integer
    prediction is a label map (1 = surface); a float one is a probability map.
    """
    for name in ("image", "surface", "ignored", "prediction"):
        _replace(viewer, name)
    levels, label = image_levels(volume), lazy(volume.label)
    layers = [
        viewer.add_image(
            levels if len(levels) > 1 else levels[0], multiscale=len(levels) > 1, name="image", colormap="gray",
            contrast_limits=(0, 255), blending="additive", rendering="attenuated_mip", attenuation=0.3,
        ),
        viewer.add_labels(label, name="surface", colormap=label_colormap({1: LABEL_COLORS[1]}), opacity=0.7),
        viewer.add_labels(label, name="ignored", colormap=label_colormap({IGNORE_LABEL: LABEL_COLORS[IGNORE_LABEL]})),
    ]
    if prediction is not None:
        if np.issubdtype(prediction.dtype, np.integer):
            layers.append(viewer.add_labels(prediction, name="prediction", colormap=label_colormap(PREDICTION_COLORS)))
        else:
            layers.append(
                viewer.add_image(
                    prediction, name="prediction", colormap="magenta", blending="additive", contrast_limits=(0, 1)
                )
            )
    viewer.layers.move_multiple([viewer.layers.index(layer) for layer in layers], 0)  # under any patch boxes
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
