"""The time budget: the plan's arithmetic, the LR over re-plans, and runs that end on time."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lab_runs_helpers import write_tiny_config
from vesuvius_lab.config import OptimConfig, load_config
from vesuvius_lab.errors import ConfigError
from vesuvius_lab.training.budget import Costs, RunBudget, fit_plan, forecast_band_s, parse_duration, remaining_s
from vesuvius_lab.training.run_dir import read_records
from vesuvius_lab.training.schedule import Schedule, decay_progress, lr_at


def _shape(steps_per_epoch: int, val_every: int, checkpoint_every: int, final_val: bool = True) -> Schedule:
    """A schedule's cadence; its total and last epoch are what the tests vary."""
    return Schedule(steps_per_epoch, steps_per_epoch, 0, val_every, checkpoint_every, final_val)


def test_the_rest_of_a_run_counts_steps_validations_checkpoints_and_the_exit():
    costs, run = Costs(step_s=0.5, val_s=10.0, checkpoint_s=0.1, exit_s=1.0), _shape(100, 2, 40).replanned(360, 300, None)
    # after step 50 of a run whose last epoch runs 300..360: epoch ends at 100, 200, 300 (validation
    # at 200 only, every 2nd), checkpoints at 80, 120, 160, 240, 280, 320 between them, the final end
    rest = remaining_s(50, run, costs)
    assert rest == pytest.approx(310 * 0.5 + (1 + 1) * 10.0 + (3 + 6 + 1) * 0.1 + 1.0)
    assert remaining_s(360, run, costs) == pytest.approx(1.0)  # done: only the exit is left


def test_the_forecast_band_counts_the_step_spread_and_the_validations_left():
    run = _shape(100, 2, 40).replanned(360, 300, None)  # validations left after step 50: at 200 and the final one
    costs = Costs(step_s=0.5, val_s=10.0, checkpoint_s=0.1, step_spread_s=0.04)
    assert forecast_band_s(50, run, costs) == pytest.approx(310 * 0.04 / 2 + 0.1 * 10.0 * 2)
    assert forecast_band_s(50, run, costs, val_scale=2.0) == pytest.approx(310 * 0.04 / 2 + 0.1 * 20.0 * 2)
    budget = RunBudget(run, start=time.time(), budget_s=None, costs=costs)
    assert budget._record(50, time.time(), "forecast")["forecast_band_s"] == pytest.approx(forecast_band_s(50, run, costs))


def test_a_plan_keeps_whole_epochs_and_gives_the_last_one_the_time_left():
    costs, shape = Costs(step_s=0.5, val_s=150.0, checkpoint_s=0.1), _shape(150, 1, 50)
    # validation (150 s) dwarfs an epoch's steps (75 s): one more whole epoch would not leave half an
    # epoch after it, so the epoch running now becomes the last and takes all the time left
    total, last = fit_plan(150, 150, 330.0, costs, shape)
    assert last == 150 and remaining_s(150, shape.replanned(total, last, None), costs) <= 330.0
    assert remaining_s(150, shape.replanned(total + 1, last, None), costs) > 330.0  # not one step more fits
    # mid-way through a stretched last epoch (it began at 0), a new epoch end can only come later
    total, last = fit_plan(180, 0, 600.0, Costs(0.5, 5.0, 0.1), shape)
    assert (last == 0 or (last % 150 == 0 and last > 180)) and total - last >= 75
    # cheap validation: whole epochs, then a last one of at least half an epoch
    total, last = fit_plan(0, 0, 600.0, Costs(0.5, 5.0, 0.1), shape)
    assert last % 150 == 0 and 75 <= total - last
    assert remaining_s(0, shape.replanned(total, last, None), Costs(0.5, 5.0, 0.1)) <= 600


def test_the_lr_goes_on_without_a_jump_and_ends_at_its_final_value_after_re_plans():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="poly", poly_power=0.9, min_lr=0.01)
    assert [lr_at(s, 200, cfg, None) for s in range(200)] == [lr_at(s, 200, cfg) for s in range(200)]
    optim = load_config(None, ["optim.warmup_steps=10", "optim.lr=1.0", "optim.min_lr=0.01"]).optim
    schedule = Schedule(50, 200, 150, 1, 0, True, optim)
    lrs, step = [], 0
    for replan_at, new_total in ((60, 150), (100, 260), (200, 230)):
        while step < replan_at:
            lrs.append(schedule.lr(step))
            step += 1
        before = schedule.lr(step - 1)  # the LR of the last step run
        anchor = (step - 1, decay_progress(step - 1, schedule.total, optim, schedule.anchor))
        schedule = schedule.replanned(new_total, (new_total - 1) // 50 * 50, anchor)
        assert schedule.lr(step - 1) == pytest.approx(before)  # the new decay goes on from it: no jump
        assert schedule.lr(step) < before
    while step < schedule.total:
        lrs.append(schedule.lr(step))
        step += 1
    assert lrs[-1] == pytest.approx(0.01)  # the last step runs at the final LR
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # decay only


def test_a_resume_continues_the_plan_and_a_spent_budget_is_one_line():
    config = load_config(None, ["training.time_budget_hours=0.5"])
    now = time.time()
    first = RunBudget.begin(config, 100, True, None, start=now - 600)
    first.costs, first.schedule = Costs(1.0, 20.0, 0.5), first.schedule.replanned(900, 800, (50, 0.1))
    saved = first.state_dict(400)
    again = RunBudget.begin(config, 100, True, saved, start=now)
    assert again.deadline == pytest.approx(first.deadline)  # downtime is spent: the deadline stays
    assert again.schedule == first.schedule
    assert again.resumed.startswith("resumed after")
    late = load_config(None, ["training.time_budget_hours=0.1"])  # 6 min, started 10 min ago
    with pytest.raises(ConfigError, match="training.time_budget_hours: the budget of this run ended at"):
        RunBudget.begin(late, 100, True, saved, start=now)


def test_budget_durations_and_their_errors(cli, tmp_path):
    assert [parse_duration(t) for t in ("6h", "90m", "1h30m", "45s", "0.5")] == [6.0, 1.5, 1.5, 0.0125, 0.5]
    code, _, err = cli("train", "--config", tmp_path / "none.yaml", "--budget", "soon")
    assert code == 2 and err == ["error: --budget 'soon': expected a duration such as 6h, 90m, 1h30m or 45s"]
    code, _, err = cli("train", "--config", tmp_path / "none.yaml", "training.time_budget_hours=0")
    assert code == 2


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_lr_follows_the_plan_records(lines, optim, configured_total):
    """Every logged LR is the one its plan record defines (the plan in force at that step), and the
    LR is continuous at every re-plan: what a resume needs to reproduce the schedule exactly."""
    plans = [r for r in lines if r["kind"] == "plan"]
    for r in (r for r in lines if r["kind"] == "train"):
        index = r["step"] - 1  # the step's 0-based index: its LR was set before it ran
        now = [p for p in plans if p["step"] <= index]
        total, anchor = configured_total, None
        if now:
            total = now[-1]["total_steps"]
            anchor = (now[-1]["anchor_step"], now[-1]["anchor_progress"]) if now[-1]["anchor_step"] is not None else None
        assert r["lr"] == pytest.approx(lr_at(index, total, optim, anchor), rel=1e-9), r["step"]
    for before, after in zip(plans, plans[1:]):
        s = after["step"] - 1  # the last step run before the re-plan: the new decay starts from its LR
        old = (before["anchor_step"], before["anchor_progress"]) if before["anchor_step"] is not None else None
        new = (after["anchor_step"], after["anchor_progress"]) if after["anchor_step"] is not None else None
        assert lr_at(s, after["total_steps"], optim, new) == pytest.approx(lr_at(s, before["total_steps"], optim, old))


@pytest.mark.slow
def test_a_two_minute_budget_ends_on_time_with_a_competing_process_from_halfway(tiny_root, tmp_path):
    """The promise of the issue: 95-100 % of the budget, measured from the command's start to its
    exit, while a CPU-bound process competes for the second half of the run."""
    budget_s = 120.0
    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=20, epochs=1,
                            training={"checkpoint_every_steps": 10})
    run = tmp_path / "run"
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "vesuvius_lab", "train", "--config", str(cfg), "--run-dir",
                             str(run), "--no-progress", "--budget", "2m"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    competitor = None
    try:
        while proc.poll() is None and time.time() - t0 < budget_s / 2:
            time.sleep(0.05)
        competitor = subprocess.Popen(["nice", "-n", "0", sys.executable, "-c", "while True: pass"])
        out, err = proc.communicate(timeout=budget_s)
        elapsed = time.time() - t0
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-2000:]
    print(f"ended after {elapsed:.1f} s of a {budget_s:.0f} s budget ({elapsed / budget_s:.1%}); {out.strip()}")
    assert 0.95 * budget_s <= elapsed <= budget_s
    lines = _records(run)
    train_lines = [r for r in lines if r["kind"] == "train"]
    plans = [r for r in lines if r["kind"] == "plan"]
    total = plans[-1]["total_steps"]
    assert [r["step"] for r in train_lines] == list(range(1, total + 1))
    _assert_lr_follows_the_plan_records(lines, load_config(cfg).optim, 20)
    assert train_lines[-1]["lr"] == pytest.approx(load_config(cfg).optim.min_lr)  # the schedule completed
    assert [r["step"] for r in lines if r["kind"] == "val"][-1] == total  # the final validation
    assert plans[0]["reason"].startswith("first measurements") and all(p["reason"] for p in plans)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == total


@pytest.mark.slow
def test_a_stopped_budget_run_resumes_its_plan_and_still_ends_by_the_deadline(tiny_root, tmp_path):
    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=20, epochs=1, training={"checkpoint_every_steps": 5})
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vesuvius_lab", "train", "--config", str(cfg), "--run-dir", str(run),
           "--no-progress", "--budget", "150s"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = None
    while first.poll() is None:  # stop it once it has planned from measurements and checkpointed after that
        plans = [r for r in read_records(run / "metrics.jsonl") if r["kind"] == "plan"]  # live: skips a line being written
        saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True) if plans and (
            run / "checkpoints" / "last.pt").exists() else None
        if saved and saved["plan"]["costs"] and saved["step"] > plans[0]["step"]:
            deadline = plans[0]["deadline"]
            os.killpg(first.pid, signal.SIGTERM)
            break
        time.sleep(0.05)
    assert first.wait(timeout=120) == 3 and deadline is not None
    stopped_at = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]
    time.sleep(3)  # downtime
    second = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=200)
    assert second.returncode == 0, second.stderr[-2000:]
    ended = time.time()
    assert ended <= deadline + 0.5  # the deadline set by the first command holds
    lines = _records(run)
    resumed = [r for r in lines if r["kind"] == "plan" and r["step"] > stopped_at - 1 and "resumed" in r["reason"]]
    assert len(resumed) <= 1 and all(r["deadline"] == pytest.approx(deadline) for r in lines if r["kind"] == "plan")
    train_lines = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train_lines] == list(range(1, len(train_lines) + 1))
    _assert_lr_follows_the_plan_records(lines, load_config(cfg).optim, 20)  # across the resume too
    assert train_lines[-1]["lr"] == pytest.approx(0.0)
    assert [r["step"] for r in lines if r["kind"] == "val"][-1] == len(train_lines)
