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
# # 06 · Compare runs
#
# Every run under `runs_dir` side by side: its state, steps, training wall time, best validation
# score with its parts, and the config keys in which the runs differ; then the validation curves
# and every loss term of the runs you select, overlaid. Each run's best checkpoint is one click
# from notebook 05: the table links a copy of notebook 05 with that checkpoint set (written to
# `evaluate_dir`); hover the link for the line to paste into notebook 05 itself. The same table
# prints in a terminal with `vesuvius-lab runs`.

# %% tags=["parameters"]
runs_dir = "../runs"  # the folder of run folders (notebook 04 and `vesuvius-lab train` write them)
select = None  # run names to overlay; None: every run
evaluate_dir = "evaluations"  # notebook 05 copies, one per best checkpoint, linked from the table
screenshot_dir = None  # a folder: save the curves there as 06_compare_runs-curves.png

# %%
from pathlib import Path

from vesuvius_lab.lab import compare

summaries = compare.load_runs(runs_dir)
compare.show_table(summaries, evaluate_dir, template="05_evaluate.ipynb")

# %% [markdown]
# The config keys in which the runs differ (every other key is the same in all of them):

# %%
compare.differing_table(summaries)

# %% [markdown]
# Validation score and parts, the total loss and each loss term of the selected runs (loss curves
# smoothed as TensorBoard does; the faint line is the raw one):

# %%
view = compare.CompareView(summaries, select)
view.widget

# %%
if screenshot_dir:
    print(view.save_plot(Path(screenshot_dir) / "06_compare_runs-curves.png"))
