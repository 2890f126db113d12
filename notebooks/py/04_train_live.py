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
# # 04 · Train, live
#
# Start a training run as a separate process (one process, or torchrun over N GPUs), stop it
# (SIGTERM: it checkpoints, then exits) and resume it, while the plot below follows
# `metrics.jsonl`: the total loss and every loss term (smoothed by the slider's EMA), the learning
# rate, samples/s, the share of each step spent waiting for data, and the validation score with its
# parts. The progress bar and ETA come from `status.json`. Under the plot, the forecast against the
# actual progress: the plan's end time with its band, each re-plan marked (a run with
# `training.time_budget_hours` re-plans as it measures, to end inside its budget), and a warning for
# an epoch that ran more than 10 % off its forecast. The kernel stays free while the run trains;
# reopening this notebook (or restarting its kernel) reattaches to the run it showed last, running
# or finished. Resume continues the run's own `config.yaml`: only the overrides box changes keys,
# and the line under the buttons says which. A run that another process trains (a terminal,
# another kernel, a sweep) shows as "training elsewhere" with its pid and command: this notebook
# follows it and starts nothing in its folder. The config field offers the demo config and the one
# notebook 03's Apply wrote, and starts at the newer of the two; the line under it says which config
# Start starts. The budget field is `training.time_budget_hours` (0: none), the config's own until
# you change it.

# %% tags=["parameters"]
config_path = None  # None: the config notebook 03's Apply wrote, when it is newer than default_config_path
default_config_path = "../configs/demo.yaml"  # the run config until notebook 03 applies a plan to it
planned_config_path = "../configs/demo_planned.yaml"  # where notebook 03's Apply writes (its out_path)
runs_dir = "../runs"  # run directories go here, one per run name
run_name = None  # None: the run this notebook attached to last, else "demo"; an existing run's name reattaches
devices = 1  # 1: one process; N > 1: torchrun with one process per GPU
overrides = []  # config overrides as on the command line: "section.key", an equals sign, the value
refresh_s = 2.0  # seconds between plot refreshes
start = False  # True for unattended runs: press Start (or Resume, if the run has a checkpoint) now
wait_steps = 0  # > 0: wait here until that many steps are logged (unattended runs)
stop_at_end = False  # True: stop the run at the end of the notebook
screenshot_dir = None  # a folder: save the plot there as 04_train_live-plot.png

# %%
from pathlib import Path

from vesuvius_lab.lab import runs

config = config_path or runs.newest_config(default_config_path, planned_config_path)
monitor = runs.RunMonitor(config, runs_dir, run_name, devices, overrides, interval=refresh_s,
                          default_run_name="demo", offered=[default_config_path, planned_config_path])
monitor.watch()  # refreshes from a background thread; the kernel stays free
monitor.widget

# %%
if start:
    monitor.start(resume=monitor.has_checkpoint)
if wait_steps:
    monitor.wait_for(lambda s: len(monitor.history.steps) >= wait_steps or not s["alive"], timeout=600)
print(f"step {monitor.history.last_step}, {len(monitor.history.steps)} steps logged in {monitor.run_dir}")

# %% [markdown]
# The run's own output, last lines: the console of a run started here (the command line, then stdout
# and stderr), else the trainer's `train.log`:

# %%
print(monitor.log_tail(15))

# %%
if screenshot_dir:
    monitor.refresh()
    print(monitor.save_plot(Path(screenshot_dir) / "04_train_live-plot.png"))

# %%
if stop_at_end:
    monitor.stop()
    monitor.process.wait(timeout=120)
    monitor.unwatch()
    print(monitor.refresh()["state_shown"])

# %% [markdown]
# ## Live prediction
#
# At each validation the run keeps the prediction of one validation volume (`val.live_volume`:
# its index or record id; `val.live_keep` bounds how many are kept). Orthogonal slices of the
# image, the label, the probability and the errors (true positives white, false positives red,
# false negatives cyan, as in notebook 05), with that volume's score and parts; the slider goes
# back through the epochs. It follows the run above (and its run name); "Open in napari" shows
# the same volume in napari, with a dock widget that reloads when a new validation lands.

# %%
from vesuvius_lab.lab.live_panel import LivePanel

live_panel = LivePanel(monitor.run_dir)
monitor.followers.append(live_panel.follow)  # refreshed with the curves, from the same thread
live_panel.widget
