"""Runs side by side (``vesuvius-lab runs`` and notebook 06): each run folder's state, steps, wall
time, best validation score with its parts and best checkpoint, and the config keys in which the
runs differ. Everything is read from the run folders (``training.run_dir``); nothing is written.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vesuvius_lab.config import load_yaml
from vesuvius_lab.errors import DataError
from vesuvius_lab.evaluate import SCORE_PARTS
from vesuvius_lab.timefmt import format_duration
from vesuvius_lab.training.run_dir import (
    ALIVE_STATES, EPOCH, TRAIN, VAL, RunDir, RunState, process_gone, same_process,
)


@dataclass
class RunSummary:
    """One run folder, as the table shows it."""

    name: str
    path: Path
    state: str  # a RunState, or ``process_gone`` of one for a killed run
    step: int
    total_steps: int | None
    wall_s: float  # training and validation time, summed over the run's sessions (not the downtime)
    best: dict | None  # the best validation record: step, epoch, score and its parts
    best_checkpoint: Path | None
    message: str = ""
    config: dict = field(default_factory=dict)  # "section.key": value

    def to_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "state": self.state, "step": self.step,
                "total_steps": self.total_steps, "wall_s": round(self.wall_s, 3), "best": self.best,
                "best_checkpoint": str(self.best_checkpoint) if self.best_checkpoint else None,
                "message": self.message}


def default_runs_dir() -> Path:
    """``$VLAB_RUNS_DIR``, else ``runs`` in the current folder (where ``train`` puts runs)."""
    return Path(os.environ.get("VLAB_RUNS_DIR") or "runs")


def is_run(folder: Path) -> bool:
    run = RunDir(folder)
    return folder.is_dir() and any(p.is_file() for p in (run.status_file, run.metrics, run.config))


def _run_folders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".") and is_run(p)), key=lambda p: p.name)


def find_runs(runs_dir: str | os.PathLike) -> list[Path]:
    """The run folders in ``runs_dir`` (or ``runs_dir`` itself, when it is one), by name; a folder
    of runs inside it (a sweep's study: ``runs/<study>/<trial>``) adds its runs, grouped under it."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder of runs")
    if is_run(root):
        return [root]
    found = []
    for p in sorted((p for p in root.iterdir() if not p.name.startswith(".") and p.is_dir()), key=lambda p: p.name):
        found += [p] if is_run(p) else _run_folders(p)
    return found


def wall_seconds(records: Sequence[dict]) -> float:
    """Each finished epoch's time (its steps, validation and checkpoint), then the steps since."""
    total, last_epoch_step = 0.0, 0
    for r in records:
        if r.get("kind") == EPOCH and r.get("epoch_s") is not None:
            total += r["epoch_s"]
            last_epoch_step = r.get("step", 0)
    return total + sum(r.get("step_s") or 0.0 for r in records
                       if r.get("kind") == TRAIN and r.get("step", 0) > last_epoch_step)


def best_validation(records: Sequence[dict]) -> dict | None:
    """The validation record with the highest score (the first of equals, as best.pt keeps it)."""
    best = None
    for r in records:
        score = r.get("score") if r.get("kind") == VAL else None
        if isinstance(score, int | float) and math.isfinite(score) and (best is None or score > best["score"]):
            best = {"step": r.get("step"), "epoch": r.get("epoch"), **{k: r.get(k) for k in SCORE_PARTS}}
    return best


def flat_config(path: Path) -> dict:
    """config.yaml as ``{"section.key": value}``; {} when absent or unreadable."""
    try:
        doc = load_yaml(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {f"{section}.{key}": value for section, values in doc.items() if isinstance(values, dict)
            for key, value in values.items()}


def run_state(status: dict) -> str:
    """The state status.json says; a running run whose process is gone (killed) says so."""
    state = status.get("state") or RunState.NOT_STARTED
    if state in ALIVE_STATES and not same_process(status.get("pid"), status.get("process_start")):
        return process_gone(state)
    return state


def summarize(folder: str | os.PathLike, name: str | None = None) -> RunSummary:
    """One run folder's summary; ``name`` (default: the folder's) is what the table calls it."""
    run = RunDir(folder)
    records, status = run.records(), run.read_status()
    steps = [r["step"] for r in records if r.get("kind") == TRAIN and isinstance(r.get("step"), int)]
    return RunSummary(
        name=name or run.root.name, path=run.root, state=run_state(status),
        step=max([status.get("step") or 0, *steps]), total_steps=status.get("total_steps"),
        wall_s=wall_seconds(records), best=best_validation(records),
        best_checkpoint=run.best if run.best.is_file() else None, message=status.get("message", ""),
        config=flat_config(run.config))


def summarize_runs(runs_dir: str | os.PathLike) -> list[RunSummary]:
    """Every run in ``runs_dir``, a study's trials named ``<study>/<trial>``."""
    return [summarize(p, p.relative_to(runs_dir).as_posix() if p != Path(runs_dir) else None) for p in find_runs(runs_dir)]


MISSING = "(absent)"


def differing_keys(summaries: Sequence[RunSummary]) -> dict[str, dict[str, object]]:
    """``{"section.key": {run name: value}}`` for every key whose value is not the same in all runs."""
    keys = sorted({k for s in summaries for k in s.config})
    out = {}
    for key in keys:
        values = {s.name: s.config.get(key, MISSING) for s in summaries}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            out[key] = values
    return out


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) and math.isfinite(value) else "-"


def table_rows(summaries: Sequence[RunSummary]) -> list[dict]:
    """One row per run, the columns the table shows (text, as printed)."""
    rows = []
    for s in summaries:
        best = s.best or {}
        rows.append({"run": s.name, "state": s.state, "steps": f"{s.step}/{s.total_steps or '?'}",
                     "wall": format_duration(s.wall_s), **{k: _num(best.get(k)) for k in SCORE_PARTS},
                     "best at": str(best["step"]) if best else "-",
                     "best checkpoint": str(s.best_checkpoint) if s.best_checkpoint else "-"})
    return rows


def format_runs(summaries: Sequence[RunSummary], write: Callable[[str], None] = print) -> None:
    """The table, then the keys in which the runs differ, one line each."""
    if not summaries:
        write("no runs")
        return
    rows = table_rows(summaries)
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    write("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for r in rows:
        write("  ".join(r[c].ljust(widths[c]) for c in columns).rstrip())
    if len(summaries) < 2:
        return
    differ = differing_keys(summaries)
    if not differ:
        write("the runs' configs are the same")
        return
    write("config keys that differ:")
    width = max(len(k) for k in differ)
    for key, values in differ.items():
        write(f"  {key.ljust(width)}  " + "  ".join(f"{name}: {_value(v)}" for name, v in values.items()))


def _value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def runs_json(summaries: Sequence[RunSummary]) -> dict:
    return {"runs": [s.to_dict() for s in summaries], "differing_keys": differing_keys(summaries)}
