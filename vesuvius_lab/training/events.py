"""TensorBoard event files: every record of metrics.jsonl also as scalars, so that
``tensorboard --logdir runs`` shows each run folder as one run, as researchers expect.

``RunDir.append`` hands each record here (rank 0 writes the records; ``training.tensorboard: false``
turns this off). Tags are ``<kind>/<field>``: ``train/loss``, ``train/<term>`` for every loss term,
``train/lr``, ``train/samples_per_s``, ``train/data_wait_share``, ``train/memory_mb``,
``val/score`` and its parts, ``epoch/epoch_s``. metrics.jsonl stays the source of truth: a
failure here (a full disk, a broken install) is logged once and ends the events, never the run.
A resumed run purges what an earlier process logged after the resumed step (``purge_step``).
"""

from __future__ import annotations

import atexit
import logging
import math
from pathlib import Path

from vesuvius_lab.config import Config
from vesuvius_lab.training.run_dir import EPOCH, TRAIN, VAL, RunDir

log = logging.getLogger("vesuvius_lab.train")

FLUSH_S = 5  # seconds between the writer's flushes: `tensorboard` shows a running run this fresh
SKIP = ("kind", "step")


def event_log(run: RunDir, config: Config) -> EventLog | None:
    """The sink ``RunDir.append`` writes to, or None when ``training.tensorboard`` is off."""
    return EventLog(run.root) if config.training.tensorboard else None


def scalars(record: dict) -> dict[str, float]:
    """A record's numbers as TensorBoard tags (booleans as 0/1; nulls and non-finite values left out)."""
    kind = record.get("kind", "record")
    out = {}
    for key, value in record.items():
        if key in SKIP or value is None or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[f"{kind}/{key}"] = float(value)
    if kind == TRAIN and record.get("data_wait_s") is not None and record.get("step_s"):
        out[f"{TRAIN}/data_wait_share"] = float(record["data_wait_s"]) / float(record["step_s"])
    return out


class EventLog:
    """One SummaryWriter, opened at the first record (its step is the purge step)."""

    def __init__(self, root: str | Path):
        self.root, self.writer, self.failed = Path(root), None, False

    def write(self, record: dict) -> None:
        if self.failed or record.get("step") is None:
            return
        try:
            step = int(record["step"])
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(self.root), purge_step=step, flush_secs=FLUSH_S)
                atexit.register(self.close)  # the writer's thread is a daemon: flush what it holds at exit
            for tag, value in scalars(record).items():
                self.writer.add_scalar(tag, value, step)
            if record.get("kind") in (VAL, EPOCH):
                self.writer.flush()
        except Exception as exc:  # noqa: BLE001 - the events are a view; the run goes on without them
            self.failed = True
            log.warning("TensorBoard events stopped at step %s (%s: %s); metrics.jsonl has every record",
                        record.get("step"), type(exc).__name__, exc)
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - closing a writer that already failed
                pass
