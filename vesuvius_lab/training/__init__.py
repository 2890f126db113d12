"""Training, one room per concern, read in this order:

- ``loop``: ``train()``: setup, resume, the loop (step, schedule, log line), the epoch end;
- ``engine``: model, optimizer and precision; one step's forward-backward and update; the LR schedule
  (the planner times this same step);
- ``run_dir``: the run folder's layout, its log records, status, checkpoints and RNG state;
- ``distributed``: ranks under torchrun and what they must agree on;
- ``pace``: the step-time estimate behind every ETA, and the watch that says why a run slowed down.
"""


def __getattr__(name: str):
    if name == "train":  # imported on use: the loop pulls in evaluation, which needs run_dir first
        from vesuvius_lab.training.loop import train

        return train
    raise AttributeError(name)
