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
# # 03 · Plan the epoch
#
# How many steps per epoch, at which batch size, for how many epochs: set the wanted epoch
# duration, the total budget and the coverage target, press "Measure" (the real training step and
# loader are timed at each batch size, in the background), and read the recommendation, its
# warnings and the presets. "LR range test" runs the config's real step for about 100 steps with
# the LR rising exponentially (Smith's range test, as Lightning's `lr_find`), stops when the loss
# diverges, and plots the smoothed loss against the LR with the suggested LR and the rule that chose
# it; the model is left as it was. "Apply" writes the config with the plan's training keys and the
# suggested `optim.lr`. Until you set
# a target, the epoch planned is the config's own (the demo's takes minutes); a plan that
# `vesuvius-lab plan` saved for this config shows here at once.

# %% tags=["parameters"]
config_path = "../configs/demo.yaml"  # the run config to plan
out_path = "../configs/demo_planned.yaml"  # where Apply writes the planned config
runs_dir = "../runs"  # a plan `vesuvius-lab plan` saved there (runs/<config name>/plan.json) is shown at once
target_epoch_minutes = None  # None: the config's own epoch (its steps per epoch), as measured
budget_hours = None  # None: no budget
coverage_target = 1.0  # wanted share of the training patches seen per epoch
batch_sizes = None  # None: 1, 2, 4, ... until memory or speed stops growing
warmup = 2
steps = 8
measure_now = False  # True for unattended runs: measure and apply here
lr_range_now = False  # True for unattended runs: the LR range test here (minutes on the demo), applied with the plan
screenshot_dir = None  # a folder: save the timings plot there as 03_plan_epoch-timings.png

# %%
from pathlib import Path

from vesuvius_lab.lab.planning import PlanForm

form = PlanForm(config_path, out_path, target_epoch_minutes, budget_hours, coverage_target, batch_sizes, warmup, steps,
                runs_dir=runs_dir)
form.widget

# %%
if lr_range_now:
    print(form.lr_range().summary())
if measure_now:
    form.measure()
if measure_now or lr_range_now:
    print(form.apply())
if screenshot_dir and form.plot.value:
    shot = Path(screenshot_dir) / "03_plan_epoch-timings.png"
    shot.write_bytes(form.plot.value)
    print(shot)
