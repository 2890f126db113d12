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
# # 02 · Preview patches
#
# The training sampler and augmentation, as settings you can change: the boxes of sampled
# patches are drawn on the volume in napari (foreground draws red, uniform draws green), a
# montage shows augmented patches with their targets, and a table gives the coverage of the
# training split by one epoch of the run's plan. Press "Sample" after changing a setting.

# %% tags=["parameters"]
manifest_path = "../data_manifests/synthetic_demo.yaml"  # the demo data is generated on first use
config_path = "../configs/demo.yaml"  # the run config whose sampler, augmentation and epoch are previewed
record_id = None  # None: the manifest's first record
patch_size = None  # None: the config's data.patch_size
n_patches = 16
seed = 0
montage_samples = 4
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
from vesuvius_lab.config import load_config
from vesuvius_lab.lab import records, views, widgets

config = load_config(config_path)
manifest = records.open_manifest(manifest_path)
picker = widgets.RecordPicker(manifest, record_id, cache_dir)
form = widgets.SamplerForm(patch_size or config.data.patch_size, config.sampler, config.augment, n_patches, seed)
preview = widgets.PatchPreview(picker, form, config.training, montage_samples)
display(picker.widget, form.widget)

# %% [markdown]
# ## Sampled patches in napari

# %%
import napari

viewer = napari.Viewer()
views.show_record(viewer, picker.volume)
picker.on_change(lambda volume: views.show_record(viewer, volume))
preview.on_sampled(lambda patches: views.show_patch_boxes(viewer, patches))
preview.sample()
views.notebook_view(viewer)  # 2D/3D and a live snapshot of the canvas

# %% [markdown]
# ## Montage and coverage
# Mid-slices of each augmented patch along z, y and x: image, label, skeleton and signed distance.

# %%
preview.widget

# %%
if screenshot_dir:
    for path in views.save_views(viewer, screenshot_dir, "02_preview_patches"):
        print(path)

# %%
if close_viewer:
    viewer.close()
