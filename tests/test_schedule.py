"""The run's schedule: its closed-form counts agree with a walk over the steps, the planner counts
checkpoints as the loop writes them, and a real run (also one stopped and resumed) does what the
schedule forecasts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab_runs_helpers import write_tiny_config
from vesuvius_lab.config import load_config
from vesuvius_lab.planner import BatchTiming, Measurements, epoch_seconds
from vesuvius_lab.training import train
from vesuvius_lab.training.budget import Costs, remaining_s
from vesuvius_lab.training.run_dir import RunDir, read_records
from vesuvius_lab.training.schedule import Schedule


def _shapes(e: int):
    """(total, last_start) of whole epochs, a long and a short last epoch, one epoch stretched or
    cut, and a run that a budget ended at an epoch end (total == last_start)."""
    yield 3 * e, 2 * e
    yield 3 * e + max(1, e // 2), 3 * e  # long: a whole epoch and more
    if e > 1:
        yield 2 * e + e // 2, 2 * e  # short
    yield 2 * e + 1, 0  # a single stretched epoch
    yield 2 * e, 2 * e


CASES = [(e, v, c, f, total, last)
         for e in (1, 2, 3, 5) for v in (0, 1, 2, 3) for c in (0, 1, 2, 3, 4, 6, 7) for f in (False, True)
         for total, last in _shapes(e)]


def test_the_counts_over_any_interval_equal_a_walk_over_the_steps():
    for case in CASES:
        s = Schedule(*case)
        for a in range(s.total + 1):
            for b in range(a, s.total + 1):
                done = range(a + 1, b + 1)
                assert s.count_epoch_ends(a, b) == sum(map(s.epoch_end, done)), (s, a, b)
                assert s.count_validations(a, b) == sum(map(s.validates, done)), (s, a, b)
                assert s.count_checkpoints(a, b) == sum(map(s.checkpoints, done)), (s, a, b)


def test_the_walk_follows_the_loop_rules():
    """Epoch ends every epoch and at the total; validation every 2nd epoch, and at a budget run's end;
    checkpoints at epoch ends and at the other multiples of checkpoint_every."""
    s = Schedule(4, 14, 8, val_every=2, checkpoint_every=3, final_val=True)  # the last epoch runs 8..14
    assert [d for d in range(1, 15) if s.epoch_end(d)] == [4, 8, 14]
    assert [d for d in range(1, 15) if s.validates(d)] == [8, 14]
    assert [d for d in range(1, 15) if s.checkpoints(d)] == [3, 4, 6, 8, 9, 12, 14]
    assert [s.epoch_of(i) for i in range(14)] == [0] * 4 + [1] * 4 + [2] * 6
    assert s.replanned(15, 12, None).validates(15)  # re-planned: the new last epoch (12..15) validates
    assert not Schedule(4, 12, 8, val_every=2).validates(12)  # epoch 3 of 3 is not due, and no budget


def test_the_planner_counts_the_checkpoints_the_loop_writes():
    """100 steps with checkpoint_every_steps 50: the loop writes 2 (step 50, and step 100 at the
    epoch's end), not 3."""
    config = load_config(None, ["training.checkpoint_every_steps=50"])
    m = Measurements(device="cpu", timings=[], val_s=0.0, checkpoint_s=1.0, memory_capacity_mb=1.0,
                     train_records=1, val_records=0, unique_patches=1, workers=0)
    assert epoch_seconds(100, BatchTiming(1, step_s=0.0), m, config, val_every=0) == 2.0


# -- a real tiny run does what the schedule forecasts --

def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _forecast(schedule: Schedule) -> dict:
    """What the schedule says a run writes, each list also checked against the closed-form counts
    that the planner's forecast adds up (``remaining_s`` with one unit cost at a time)."""
    done = range(1, schedule.total + 1)
    out = {"train": list(done), "epoch": [d for d in done if schedule.epoch_end(d)],
           "val": [d for d in done if schedule.validates(d)], "checkpoint": [d for d in done if schedule.checkpoints(d)]}
    units = {"train": Costs(1.0, 0.0, 0.0, exit_s=0.0), "val": Costs(0.0, 1.0, 0.0, exit_s=0.0),
             "checkpoint": Costs(0.0, 0.0, 1.0, exit_s=0.0)}
    for kind, costs in units.items():
        assert remaining_s(0, schedule, costs) == len(out[kind]), kind
    assert schedule.count_epoch_ends(0, schedule.total) == len(out["epoch"])
    return out


def _written(run: Path) -> dict:
    lines = _records(run)
    kept = [int(p.stem.split("_")[1]) for p in RunDir(run).recent_checkpoints()]
    return {kind: [r["step"] for r in lines if r["kind"] == kind] for kind in ("train", "epoch", "val")} | {
        "checkpoint": sorted(kept)}


def _config(tiny_root: Path, folder: Path, steps: int, val_every: int, every: int) -> Path:
    return write_tiny_config(tiny_root, folder, steps=steps, epochs=3, optim={"warmup_steps": 1},
                             training={"val_every_epochs": val_every, "checkpoint_every_steps": every,
                                       "keep_last": 100})


@pytest.mark.slow
@pytest.mark.parametrize("steps, val_every, every", [(4, 1, 0), (4, 2, 3), (5, 1, 5)])
def test_a_run_writes_what_its_schedule_forecasts(tiny_root, tmp_path, steps, val_every, every):
    config = load_config(_config(tiny_root, tmp_path / "cfg", steps, val_every, every))
    train(config, tmp_path / "run", progress=False)
    expected = _forecast(Schedule.from_config(config, steps, has_val=True))
    assert _written(tmp_path / "run") == expected
    assert expected["val"] and expected["checkpoint"]


@pytest.mark.slow
def test_a_run_stopped_mid_epoch_and_resumed_writes_what_its_schedule_forecasts(tiny_root, tmp_path):
    """SIGTERM mid-epoch: the stop writes one checkpoint the schedule does not have (where it
    stopped); the resumed run then writes the schedule's own, and nothing twice."""
    path, run = _config(tiny_root, tmp_path / "cfg", 5, 2, 3), tmp_path / "run"
    cmd = [sys.executable, "-m", "vesuvius_lab", "train", "--config", str(path), "--run-dir", str(run), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        while proc.poll() is None:  # stop inside the second epoch, past its periodic checkpoint at step 6
            if any(r["kind"] == "train" and r["step"] >= 6 for r in read_records(run / "metrics.jsonl")):  # live: tolerant
                os.killpg(proc.pid, signal.SIGTERM)
                break
            time.sleep(0.02)
        assert proc.wait(timeout=120) == 3, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped = json.loads((run / "status.json").read_text())["step"]
    schedule = Schedule.from_config(load_config(path), 5, has_val=True)
    assert 6 <= stopped < 10  # inside the second epoch
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = _forecast(schedule)
    expected["checkpoint"] = sorted(set(expected["checkpoint"]) | {stopped})
    assert _written(run) == expected
