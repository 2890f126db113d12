"""TensorBoard event files: every record of metrics.jsonl also as scalars, so that
``tensorboard --logdir runs`` shows each run folder as one run, as researchers expect.

``RunDir.append`` hands each record here (rank 0 writes the records; ``training.tensorboard: false``
turns this off). Tags are ``<kind>/<field>``: ``train/loss``, ``train/<term>`` for every loss term,
``train/lr``, ``train/samples_per_s``, ``train/data_wait_share``, ``train/memory_mb``,
``val/score`` and its parts, ``epoch/epoch_s``. metrics.jsonl stays the source of truth: a
failure here (a full disk, a broken install) is logged once and ends the events, never the run.
A resumed run hides what an earlier process logged after the resumed step (a ``SessionLog`` START at
its first step, which TensorBoard honours as a purge).
"""

from __future__ import annotations

import atexit
import logging
import math
import time
from pathlib import Path

from vesuvius_lab.config import Config
from vesuvius_lab.training.run_dir import TRAIN, RunDir

log = logging.getLogger("vesuvius_lab.train")

FLUSH_S = 5  # the writer's own flush period (each record is flushed anyway)
SKIP = ("kind", "step")


def event_log(run: RunDir, config: Config) -> EventLog | None:
    """The sink ``RunDir.append`` writes to, or None when ``training.tensorboard`` is off."""
    return EventLog(run.root) if config.training.tensorboard else None


def scalars(record: dict) -> dict[str, float]:
    """A record's numbers as TensorBoard tags (booleans as 0/1; nulls and non-finite values left out)."""
    kind = record.get("kind", "record")
    out = {}
    for key, value in record.items():
        if key in SKIP or value is None or not isinstance(value, int | float) or (key == "epoch" and kind != TRAIN):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[f"{kind}/{key}"] = float(value)
    if kind == TRAIN and record.get("data_wait_s") is not None and record.get("step_s"):
        out[f"{TRAIN}/data_wait_share"] = float(record["data_wait_s"]) / float(record["step_s"])
    return out


class EventLog:
    """One event file per process, opened at the first record, whose step is the purge step: a
    resumed run hides what an earlier process logged beyond its checkpoint, as metrics.jsonl does.
    Each record is one event (all its scalars), flushed at once: a kill loses nothing written."""

    def __init__(self, root: str | Path):
        self.root, self.writer, self.failed = Path(root), None, False

    def write(self, record: dict) -> None:
        if self.failed or record.get("step") is None:
            return
        try:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog
            from tensorboard.compat.proto.summary_pb2 import Summary

            step = int(record["step"])
            if self.writer is None:
                from tensorboard.summary.writer.event_file_writer import EventFileWriter

                self.writer = EventFileWriter(str(self.root), flush_secs=FLUSH_S)
                self.writer.add_event(Event(wall_time=time.time(), step=step,
                                            session_log=SessionLog(status=SessionLog.START)))
                atexit.register(self.close)
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=value)
                                     for tag, value in scalars(record).items()])
            self.writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))
            self.writer.flush()
        except Exception as exc:  # noqa: BLE001 - the events are a view; the run goes on without them
            self.failed = True
            log.warning("TensorBoard events stopped at step %s (%s: %s); metrics.jsonl has every record",
                        record.get("step"), type(exc).__name__, exc)
            self.close()

    def close(self) -> None:
        atexit.unregister(self.close)
        if self.writer is not None:
            writer, self.writer = self.writer, None
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - closing a writer that already failed
                pass
