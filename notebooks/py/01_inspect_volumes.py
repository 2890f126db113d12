# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py//py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Inspect volumes
#
# Choose a record of a dataset manifest, look at orthogonal slices with its labels overlaid, and
# open it in napari in 2D and 3D. Surface (label 1) is amber, ignored regions (label 2) are blue;
# in 3D the ignored regions are hidden, since they enclose every volume and would hide the surface.
# Volumes are opened as memory-mapped cache files, so only the slices on screen are read.

# %% tags=["parameters"]
manifest_path = "../data_manifests/synthetic_demo.yaml"  # the demo data is generated on first use
record_id = None  # None: the manifest's first record
prediction_path = None  # .npy or .tif of the first record's shape: integers a label map, floats probabilities
cache_dir = None  # None: $VLAB_CACHE_DIR, else ~/.cache/vesuvius_lab
close_viewer = False  # True for unattended runs: close napari at the end
screenshot_dir = None  # a folder: save the napari view there in 2D and 3D

# %% [markdown]
# napari needs the Qt event loop in the kernel (`%gui qt`, made safe for unattended runs); this
# must run before the viewer is created.

# %%
from vesuvius_lab.lab.qt import start_qt

start_qt()

# %%
from vesuvius_lab.lab import records, views, widgets

manifest = records.open_manifest(manifest_path)
picker = widgets.RecordPicker(manifest, record_id, cache_dir)
picker.widget

# %% [markdown]
# ## Orthogonal slices
# One slider per axis; each panel shows the plane across its axis, the crosshairs the other two.

# %%
slices = widgets.SliceExplorer(picker.volume)
picker.on_change(slices.set_volume)
slices.widget

# %% [markdown]
# ## napari
# The viewer follows the record chosen above (the prediction belongs to the first record only),
# keeping its 2D/3D mode and camera. Under the cell, a snapshot of napari's canvas is redrawn after
# each change, so the view reads here too (a remote JupyterLab, a saved notebook).

# %%
import napari

viewer = napari.Viewer()
views.show_record(viewer, picker.volume, records.open_prediction(prediction_path, picker.volume.image.shape))
picker.on_change(lambda volume: views.show_record(viewer, volume))
views.notebook_view(viewer)  # 2D/3D and a live snapshot of the canvas

# %%
if screenshot_dir:
    for path in views.save_views(viewer, screenshot_dir, "01_inspect_volumes"):
        print(path)

# %%
if close_viewer:
    viewer.close()
