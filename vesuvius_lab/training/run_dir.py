"""The run folder: its one layout, the records of its log, its status, and its checkpoints.

    config.yaml  metrics.jsonl  train.log  status.json  console.log  launch.json  plan.json
    checkpoints/last.pt  checkpoints/best.pt

The trainer writes it (rank 0), the notebook's run monitor and the planner read it; each name is
spelled here only. Checkpoints are complete (model, optimizer, schedule, scaler, step, every RNG
state), atomic, and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from vesuvius_lab.errors import DataError
from vesuvius_lab.io import atomic_path, atomic_write_text

# kinds of the records in metrics.jsonl
TRAIN, VAL, EPOCH = "train", "val", "epoch"


def default_run_dir(config_path: str | os.PathLike) -> Path:
    """``$VLAB_RUNS_DIR/<config name>``, else ``runs/<config name>`` in the current folder."""
    return Path(os.environ.get("VLAB_RUNS_DIR") or "runs") / Path(config_path).stem


class RunDir:
    """A run's folder; every sub-folder is created at start (the seed run crashed on a missing one)."""

    CONFIG, METRICS, TRAIN_LOG, STATUS = "config.yaml", "metrics.jsonl", "train.log", "status.json"
    CONSOLE, LAUNCH, PLAN = "console.log", "launch.json", "plan.json"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.last, self.best = self.checkpoints / "last.pt", self.checkpoints / "best.pt"
        self.config, self.metrics = self.root / self.CONFIG, self.root / self.METRICS
        self.train_log, self.status_file = self.root / self.TRAIN_LOG, self.root / self.STATUS
        self.console, self.launch, self.plan = self.root / self.CONSOLE, self.root / self.LAUNCH, self.root / self.PLAN

    def create(self) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict) -> None:
        with open(self.metrics, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    def truncate_after(self, step: int) -> None:
        """Drop log lines beyond a resumed checkpoint; the resumed run writes them again."""
        if not self.metrics.is_file():
            return
        keep = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            if rec.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.metrics, "".join(k + "\n" for k in keep))

    def status(self, **fields) -> None:
        atomic_write_text(self.status_file, json.dumps({"pid": os.getpid(), "heartbeat": time.time(), **fields}))

    def read_status(self) -> dict:
        """status.json, or {} when it is absent or being replaced."""
        try:
            return json.loads(self.status_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomic: temp file, fsync, rename. A kill or a full disk leaves the previous checkpoint intact."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is a one-line error
        raise DataError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None


def rng_state() -> dict:
    """Every global RNG state, in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
