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
# # 07 · Sweep
#
# A recipe search on Optuna, as `vesuvius-lab sweep` runs it: the search space as YAML (per config
# key a list of choices, a range `{low, high}` with `log: true` for log-uniform, or an integer
# range), the sampler (TPE, random, grid), the pruner (median, successive halving, Hyperband: fed
# each validation score) and a time budget per trial. Launch starts one worker in the background
# (the kernel stays free); Stop ends it after a checkpoint, and a later Launch resumes the trial it
# was running. Every trial is an ordinary run in `runs/<study>/trial_NNN`: notebook 04 follows it
# (`runs_dir` `../runs/<study>`, run name `trial_NNN`), notebook 06 and `vesuvius-lab runs` list it
# as `<study>/trial_NNN`. The table refreshes
# itself; the plots and the best trial are as of when their cells run. More workers (one per GPU,
# or a SLURM array) share the study from a terminal: see the README.

# %% tags=["parameters"]
config_path = "../configs/demo.yaml"  # every trial is this config with the trial's overrides
space_path = "../configs/demo_sweep.yaml"  # the search space the form starts from
runs_dir = "../runs"  # the study goes to runs_dir/<study>, its trials beside its SQLite file
study = None  # None: the space file's name
trials = 6  # trials in the study, over all its workers
trial_budget = "3m"  # wall time of each trial (training.time_budget_hours); "" for none
sampler = "tpe"  # tpe | random | grid
pruner = "median"  # median | halving | hyperband | none
refresh_s = 5.0  # seconds between table refreshes
launch = False  # True for unattended runs: press Launch now
wait = False  # True: wait here until the launched worker has ended (unattended runs)
evaluate_dir = "evaluations"  # where the best trial's notebook 05 copy is written
apply_out = "../configs/demo_best.yaml"  # where "Apply best" writes the config
apply_best = False  # True: apply the best trial at the end (unattended runs)
screenshot_dir = None  # a folder: save the plots there as 07_sweep-history.png (and -importances.png)

# %%
from pathlib import Path

from vesuvius_lab.lab import sweep

panel = sweep.SweepPanel(config_path, space_path, runs_dir, study, trials, trial_budget, sampler, pruner,
                         interval=refresh_s)
panel.watch()  # refreshes the table from a background thread; the kernel stays free
panel.widget

# %%
if launch:
    panel.launch()
if wait:
    panel.wait()
print(panel.message.value or "not launched: press Launch above")

# %% [markdown]
# Optuna's optimization history (each trial's score, the best so far) and, once two trials have
# completed, the importance of each parameter (fANOVA); run the cell again to redraw:

# %%
plots = panel.figures()
plots

# %% [markdown]
# The best completed trial, its best checkpoint one click from notebook 05 (a copy of notebook 05
# with `checkpoint_path` set, written to `evaluate_dir`; hover the link for the line to paste):

# %%
panel.best_link(evaluate_dir, template="05_evaluate.ipynb")

# %% [markdown]
# Apply best: the config with the best trial's parameters written to `apply_out` (the button, or
# `apply_best = True` for unattended runs).

# %%
import ipywidgets as w

apply_button, applied = w.Button(description="Apply best"), w.HTML()
apply_button.on_click(lambda _: setattr(applied, "value", panel.apply_best(apply_out)))
if apply_best:
    apply_button.click()
w.VBox([apply_button, applied])

# %%
if screenshot_dir:
    for name, image in zip(["history", "importances"], getattr(plots, "children", [])):
        path = Path(screenshot_dir) / f"07_sweep-{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image.value)
        print(path)
