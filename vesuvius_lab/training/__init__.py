"""Training, one room per concern, read in this order:

- ``loop``: ``train()``: setup, resume, the loop (step, log line, checkpoint, epoch end);
- ``schedule``: the run's plan, clock-free: total steps, epoch ends, which steps validate and
  checkpoint, the LR of each step; the loop, the budget and the planner count from it;
- ``engine``: model, optimizer and precision; one step's forward-backward and update (the planner
  times this same step);
- ``ema``: the moving average of the weights that validation scores;
- ``early_stop``: the run ends when its validation score stops improving (state kept in checkpoints);
- ``budget``: the wall-clock budget: measures the run and swaps in a re-planned schedule; the forecast;
- ``pace``: the step-time estimate behind every ETA, and the watch that says why a run slowed down;
- ``run_dir``: the run folder's layout, its lock, log records, status, checkpoints and RNG state;
- ``live_volume``: one validation volume's prediction kept at each validation (notebook 04, napari);
- ``events``: the same records as TensorBoard event files;
- ``distributed``: ranks under torchrun and what they must agree on.
"""


def __getattr__(name: str):
    if name == "train":  # imported on use: the loop pulls in evaluation, which needs run_dir first
        from vesuvius_lab.training.loop import train

        return train
    raise AttributeError(name)
