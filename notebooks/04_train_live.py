# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
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
# `metrics.jsonl`: the total loss and every loss term, the learning rate, samples/s, the share of
# each step spent waiting for data, and the validation score with its parts. The progress bar and
# ETA come from `status.json`. Under the plot, the forecast against the actual progress: the
# plan's end time with its band, each re-plan marked (a run with `training.time_budget_hours`
# re-plans as it measures, to end inside its budget), and a warning for an epoch that ran more than
# 10 % off its forecast. The kernel stays free while the run trains; reopening this notebook on the
# same run name reattaches to the run, running or finished.

# %% tags=["parameters"]
config_path = "../configs/demo.yaml"  # the run config
runs_dir = "../runs"  # run directories go here, one per run name
run_name = "demo"  # an existing run's name reattaches to it
devices = 1  # 1: one process; N > 1: torchrun with one process per GPU
overrides = []  # config overrides, "section.key=value"
refresh_s = 2.0  # seconds between plot refreshes
start = False  # True for unattended runs: press Start (or Resume, if the run has a checkpoint) now
wait_steps = 0  # > 0: wait here until that many steps are logged (unattended runs)
stop_at_end = False  # True: stop the run at the end of the notebook
screenshot_dir = None  # a folder: save the plot there as 04_train_live-plot.png

# %%
from pathlib import Path

from vesuvius_lab.lab import runs

monitor = runs.RunMonitor(config_path, runs_dir, run_name, devices, overrides, interval=refresh_s)
monitor.watch()  # refreshes from a background thread; the kernel stays free
monitor.widget

# %%
if start:
    monitor.start(resume=monitor.has_checkpoint)
if wait_steps:
    monitor.wait_for(lambda s: len(monitor.history.steps) >= wait_steps or not s["alive"], timeout=600)
print(f"step {monitor.history.last_step}, {len(monitor.history.steps)} steps logged in {monitor.run_dir}")

# %% [markdown]
# The run's own output (the command line, then stdout and stderr), last lines:

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
