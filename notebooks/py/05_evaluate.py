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
# # 05 · Evaluate a checkpoint
#
# Predict the validation volumes with a checkpoint, exactly as its training validated them (the
# stored sliding-window, TTA, precision and post-processing settings), score each with the
# leaderboard metric (score, topo, surface Dice, VOI), and look at the errors in napari: true
# positives white, false positives red, false negatives cyan. Then see which homology dimension
# costs the TopoScore, what the topology repair (`postprocess.repair`, tuned by
# `vesuvius-lab tune-postprocess`) adds and removes, volume by volume, and what tuning it scores on
# volumes it was not tuned on (out-of-sample) and on those it was (in-sample).

# %% tags=["parameters"]
checkpoint_path = "../runs/demo/checkpoints/best.pt"  # a vesuvius_lab checkpoint
manifest_path = None  # None: the manifest the checkpoint was trained on
cache_dir = None  # None: $VLAB_CACHE_DIR, else ~/.cache/vesuvius_lab
max_volumes = None  # None: every validation volume
overrides = []  # changes to the stored inference settings, as on the command line (e.g. val.tta to true)
show_volume = 0  # which validation volume napari shows
close_viewer = False  # True for unattended runs: close napari at the end
screenshot_dir = None  # a folder: save the napari view there in 2D and 3D
# the repair to compare, config keys and values (tune-postprocess's choice for the demo, configs/demo_repair.yaml,
# less its threshold)
repair = {"postprocess.repair": ["plug_pinholes", "fill_sheet_holes"], "postprocess.hole_window": 40}
# the settings tuned on these volumes, postprocess keys and their values (as tune-postprocess --grid takes them)
tune_grid = {"threshold": [0.4, 0.5, 0.6], "repair": [[], ["plug_pinholes", "fill_sheet_holes"]]}

# %%
from vesuvius_lab.evaluate import evaluate_checkpoint
from vesuvius_lab.lab import evaluation

results = evaluate_checkpoint(evaluation.require_checkpoint(checkpoint_path), manifest_path, cache_dir, max_volumes,
                              overrides)
table = evaluation.score_table(results)
evaluation.fitted(table)

# %% [markdown]
# napari needs the Qt event loop in the kernel (`%gui qt`, made safe for unattended runs); this
# must run before the viewer is created.

# %%
from vesuvius_lab.lab.qt import start_qt

start_qt()

# %%
import napari

from vesuvius_lab.lab import views

viewer = napari.Viewer()
evaluation.show_errors(viewer, results[show_volume])
views.notebook_view(viewer, evaluation.ERROR_LEGEND)  # 2D/3D, a live snapshot of the canvas, its colours

# %%
if screenshot_dir:
    for path in views.save_views(viewer, screenshot_dir, "05_evaluate"):
        print(path)

# %% [markdown]
# ## Topology: which dimension costs the score
#
# Betti numbers of prediction and label (ignored voxels removed), and the Betti matching's features
# per dimension over the metric's octants: matched, in the prediction, in the label, and the F1.
# Predicted tunnels (`pred 1`) with none in the label drop the Betti-1 F1 to 0.5 / (p + 0.5).

# %%
evaluation.fitted(evaluation.topology_table(results))

# %% [markdown]
# ## Repair: what it adds and removes
#
# The same probabilities post-processed without and with `repair` (on top of the
# checkpoint's settings), each part of the score before and after, and the changes in napari:
# voxels added green, removed magenta, over the image, the ground truth and the prediction.

# %%
before, after = evaluation.repair_settings(checkpoint_path, overrides, repair)
comparisons = evaluation.compare_repair(results, before, after)
evaluation.fitted(evaluation.repair_table(comparisons))

# %%
repair_viewer = napari.Viewer()  # a viewer of its own: the errors view above stays as its cell made it
evaluation.show_repair(repair_viewer, results[show_volume], comparisons[show_volume])
views.notebook_view(repair_viewer, evaluation.REPAIR_LEGEND)

# %%
if screenshot_dir:
    for path in views.save_views(repair_viewer, screenshot_dir, "05_evaluate_repair"):
        print(path)

# %% [markdown]
# ## Tuning: the score to expect on new volumes
#
# What `vesuvius-lab tune-postprocess` reports for `tune_grid` on these volumes. The out-of-sample
# score comes first: each volume scored with the setting chosen on the other volumes
# (leave-one-out up to 10 volumes), the score to expect on volumes the setting was not tuned on. The in-sample best
# is chosen and scored on the same volumes: it flatters the setting. Then each fold's choice.

# %%
tuning = evaluation.tune_results(results, checkpoint_path, overrides, tune_grid)
evaluation.fitted(evaluation.tuning_table(tuning))

# %%
if close_viewer:
    repair_viewer.close()
    viewer.close()
