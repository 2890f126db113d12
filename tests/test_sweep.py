"""Sweeps (issue 27): the search space checked before any trial, real worker processes on one real
SQLite study, a SIGKILLed worker's trial resumed from its checkpoint, a pruned trial listed and resumed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from lab_runs_helpers import write_tiny_config
from vesuvius_lab.sweep import load_study, prepare
from vesuvius_lab.training.run_dir import RunDir


def _worker(config: Path, space: Path, runs: Path, trials: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vesuvius_lab", "sweep", str(config), "--space", str(space),
                             "--trials", str(trials), "--runs-dir", str(runs), "--no-progress", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(worker: subprocess.Popen, timeout: float = 300) -> str:
    out, err = worker.communicate(timeout=timeout)
    assert worker.returncode == 0, err[-3000:]
    return out


def _ran(out: str) -> list[int]:
    """The trials a worker's output says it ran to their end."""
    return [int(n) for n in re.findall(r"^trial (\d+): (?:finished|pruned)$", out, re.M)]


def _space(folder: Path, doc: dict) -> Path:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_space_problems_are_one_line_each_and_exit_2_before_any_trial(tiny_root, tmp_path, cli):
    config = write_tiny_config(tiny_root, tmp_path / "cfg")
    space = _space(tmp_path, {"optim.lrr": {"low": 1e-3, "high": 1e-2, "log": True}, "loss.cldice": [0.0, -0.3],
                              "augment.p_elastic": {"low": 0.0, "high": 2.0}, "model.arch": ["unet", "transformer"],
                              "training.train_batch_size": {"low": 1.5, "high": 4.0}})
    code, out, err = cli("sweep", config, "--space", space, "--runs-dir", tmp_path / "runs")
    assert code == 2 and out == []
    assert err == [f"error: {space}: unknown key optim.lrr (did you mean optim.lr?)",
                   f"error: {space}: loss.cldice: -0.3 is out of range (allowed: >= 0)",
                   f"error: {space}: augment.p_elastic: 2.0 is out of range (allowed: [0, 1])",
                   f"error: {space}: model.arch: 'transformer' is not one of unet, dynunet",
                   f"error: {space}: training.train_batch_size: expected int, got float 1.5"], err
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_a_space_of_every_kind_and_the_baseline(tiny_root, tmp_path):
    config = write_tiny_config(tiny_root, tmp_path / "cfg")
    sweep = prepare(config, _space(tmp_path, {"optim.lr": {"low": 1e-3, "high": 0.1, "log": True},
                                              "augment.p_elastic": {"low": 0, "high": 1},
                                              "training.train_batch_size": {"low": 1, "high": 3},
                                              "model.arch": ["unet"]}),
                    trials=4, trial_budget="20m", runs_dir=tmp_path / "runs")
    assert not sweep.space["augment.p_elastic"].integer and sweep.space["training.train_batch_size"].integer
    assert sweep.baseline_params() == {"optim.lr": 0.01, "augment.p_elastic": 0.2, "training.train_batch_size": 2,
                                       "model.arch": "unet"}
    assert sweep.overrides({"optim.lr": 0.01, "model.arch": "unet"}) == [
        "optim.lr=0.01", 'model.arch="unet"', f"training.time_budget_hours={20 / 60!r}"]
    grid = prepare(config, _space(tmp_path, {"loss.cldice": [0.0, 0.3], "training.train_batch_size": {"low": 1, "high": 2}}),
                   trials=9, sampler="grid", runs_dir=tmp_path / "runs")
    assert grid.trials == 4 and grid.notes == ["the grid has 4 points: 4 trials, not 9"]


@pytest.mark.slow
def test_two_workers_on_one_sqlite_study_run_each_trial_once(tiny_root, tmp_path):
    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=2, epochs=1)
    space, runs = _space(tmp_path, {"optim.lr": {"low": 1e-3, "high": 0.05, "log": True}}), tmp_path / "runs"
    workers = [_worker(config, space, runs, 4, "--pruner", "none", "--seed", str(seed)) for seed in (1, 2)]
    ran = [_ran(_finish(w)) for w in workers]
    assert sorted(ran[0] + ran[1]) == [0, 1, 2, 3], ran  # every trial once, by one worker
    study = load_study("space", runs)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    for t in study.trials:  # each trial's run: one session, steps logged once
        steps = [r["step"] for r in RunDir(runs / "space" / f"trial_{t.number:03d}").records() if r["kind"] == "train"]
        assert steps == [1, 2]
    listed = subprocess.run([sys.executable, "-m", "vesuvius_lab", "runs", str(runs), "--json"], capture_output=True,
                            text=True, check=True)
    assert [r["name"] for r in json.loads(listed.stdout)["runs"]] == [f"space/trial_{n:03d}" for n in range(4)]


@pytest.mark.slow
def test_a_sigkilled_worker_started_again_resumes_its_trial_from_the_checkpoint(tiny_root, tmp_path):
    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=12, epochs=1, training={"checkpoint_every_steps": 3})
    space, runs = _space(tmp_path, {"loss.cldice": [0.3]}), tmp_path / "runs"
    trial = RunDir(runs / "space" / "trial_000")
    worker = _worker(config, space, runs, 1)
    deadline = time.monotonic() + 240
    while not trial.last.exists() and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.05)
    assert trial.last.exists(), worker.communicate()[1][-2000:]
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and everything it started, mid-trial
    worker.wait()
    saved = torch_step(trial.last)
    assert 3 <= saved < 12
    out = _finish(_worker(config, space, runs, 1))
    assert out.startswith("trial 0 (interrupted: resumed)") and _ran(out) == [0], out
    assert f"resumed at step {saved}" in trial.train_log.read_text()
    study = load_study("space", runs)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]  # the study reached its count: no second trial
    assert json.loads(trial.status_file.read_text())["state"] == "finished"


def torch_step(path: Path) -> int:
    from vesuvius_lab.training.run_dir import load_checkpoint

    return load_checkpoint(path)["step"]


@pytest.mark.slow
def test_a_pruned_trial_ends_with_its_checkpoint_is_listed_as_pruned_and_resumes(tiny_root, tmp_path):
    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=3, epochs=2)
    space, runs = _space(tmp_path, {"optim.lr": [0.01, 1e-7]}), tmp_path / "runs"
    sweep = prepare(config, space, trials=3, runs_dir=runs, baseline=False)
    study = sweep.open_study()
    for lr in (0.01, 0.01, 1e-7):  # two that learn set the median; one that cannot learn falls below it
        study.enqueue_trial({"optim.lr": lr})
    out = _finish(_worker(config, space, runs, 3, "--no-baseline"))
    assert _ran(out) == [0, 1, 2] and "trial 2: pruned" in out, out
    states = [t.state for t in load_study("space", runs).trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.PRUNED]
    pruned = RunDir(runs / "space" / "trial_002")
    status = json.loads(pruned.status_file.read_text())
    at = status["step"]  # the validation that fell below the median: its checkpoint is the last one
    assert status["state"] == "pruned" and at in (3, 6) and torch_step(pruned.last) == at, status
    listed = subprocess.run([sys.executable, "-m", "vesuvius_lab", "runs", str(runs), "--json"], capture_output=True,
                            text=True, check=True)
    assert [r["state"] for r in json.loads(listed.stdout)["runs"]] == ["finished", "finished", "pruned"]
    resumed = subprocess.run([sys.executable, "-m", "vesuvius_lab", "train", "--resume", "--run-dir", str(pruned.root),
                              "--no-progress", "training.max_epochs=3"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at step {at}" in pruned.train_log.read_text()
    assert json.loads(pruned.status_file.read_text())["state"] == "finished" and torch_step(pruned.last) == 9
