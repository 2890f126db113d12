"""The pace of a run: one step-time estimate for the CLI bar's and notebook 04's ETA, and the watch
that says once why a run slowed down (a real tiny run against real CPU burners)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from tqdm import tqdm
from tqdm.std import EMA

from lab_runs_helpers import write_tiny_config
from vesuvius_lab.config import load_config
from vesuvius_lab.lab import runs
from vesuvius_lab.planner import BatchTiming, Measurements
from vesuvius_lab.timefmt import format_duration
from vesuvius_lab.training import pace
from vesuvius_lab.training.pace import Busy, PaceWatch, Planned


def train_records(step_s: list[float], wait_s: float = 0.0) -> list[dict]:
    return [{"kind": "train", "step": i + 1, "loss": 1.0, "step_s": s, "data_wait_s": wait_s}
            for i, s in enumerate(step_s)]


def test_single_slow_steps_leave_the_estimate_where_tqdms_ema_jumps():
    rng = random.Random(0)
    steps = [0.35 * rng.uniform(0.95, 1.05) for _ in range(400)]
    for i in range(60, 400, 40):  # a validation, a checkpoint, a stall: one step 15x as long
        steps[i] = 5.3
    ema_dn, ema_dt, ours, theirs = EMA(0.3), EMA(0.3), [], []  # tqdm's rate: its EMAs of steps and of seconds
    for i, s in enumerate(steps):
        ema_dn(1)
        ema_dt(s)
        if i >= 25:
            ours.append(pace.step_time(steps[: i + 1]))
            theirs.append(ema_dt() / ema_dn())
    assert max(abs(x / 0.35 - 1) for x in ours) < 0.05
    assert max(abs(x / 0.35 - 1) for x in theirs) > 3.0  # tqdm's ETA 5x after each slow step


def test_a_sustained_change_is_followed_within_the_window():
    steps = [0.35] * 200
    assert pace.step_time(steps) == pytest.approx(0.35)
    steps += [1.05]
    assert pace.step_time(steps) == pytest.approx(0.35)  # one slow step: not yet a change
    steps += [1.05] * 28  # the window: 20 steps or 30 s, whichever is longer (29 steps of 1.05 s)
    assert pace.step_time(steps) == pytest.approx(1.05)
    assert pace.eta_s(pace.step_time(steps), 100) == pytest.approx(105.0) and pace.step_time([]) is None


def test_the_notebooks_eta_holds_steady_on_a_mix_of_fast_and_slow_steps():
    """Two runs taking turns on 2 cores: each step is fast (0.35 s, the other run waits) or slow
    (5.3 s, both compute). The median of the last 20 steps flips between the two whenever the mix is
    near half and half: the notebook's ETA went 32:26 -> 6:19 -> 25:26 within seconds."""
    rng = random.Random(1)
    steps = [rng.choice([0.35, 5.3]) for _ in range(300)]
    history, etas, medians = runs.History(), [], []
    for i, record in enumerate(train_records(steps)):
        history.add([record])
        if i >= 40:
            etas.append(runs.eta_seconds({"step": i + 1, "total_steps": 2000}, history))
            medians.append(statistics.median_low(steps[i - 19: i + 1]))
    jump = max(max(a, b) / min(a, b) for a, b in zip(etas, etas[1:]))
    assert jump < 1.25, jump
    assert max(max(a, b) / min(a, b) for a, b in zip(medians, medians[1:])) > 10  # what the ETA did before
    assert statistics.fmean(steps) * 0.8 < etas[-1] / (2000 - 300) < statistics.fmean(steps) * 1.2


def test_the_cli_bar_shows_the_notebooks_eta_and_not_tqdms():
    rng = random.Random(2)
    steps = [rng.uniform(0.3, 0.4) for _ in range(50)] + [6.0]
    watch, history = PaceWatch(Planned(0.35, 0.0, "test"), say=lambda line: None), runs.History()
    for step, s in enumerate(steps, 1):
        watch.after_step(step, s, 0.0)
    history.add(train_records(steps))
    eta = runs.eta_seconds({"step": 51, "total_steps": 1051}, history)
    shown = format_duration(eta)
    assert watch.eta(1000) == shown and 1000 * 0.34 < eta < 1000 * 0.37  # the last step's 6 s is trimmed
    with open(os.devnull, "w") as sink, tqdm(total=1051, initial=51, bar_format=pace.BAR_FORMAT, file=sink) as bar:
        bar.set_postfix(loss="0.5", eta=watch.eta(1000))
        line = bar.format_meter(**bar.format_dict)
    assert f", eta={shown}" in line and "<" not in line and "/s" not in line, line  # no tqdm remaining, no rate


def test_the_watch_speaks_once_per_slow_spell_and_scans_only_then():
    said = []
    watch = PaceWatch(Planned(0.1, 0.02, "the test's plan"), workers=2, say=said.append)
    t0 = time.perf_counter()
    for step in range(1, 601):
        watch.after_step(step, 0.1, 0.002)
    assert said == [] and time.perf_counter() - t0 < 1.0  # no process scan while the pace holds
    step = 600
    for _ in range(400):  # 3.5x slower, the data wait unchanged: the compute slowed
        step += 1
        watch.after_step(step, 0.35, 0.002)
    assert len(said) == 1, said
    found = re.search(r"^step (\d+): the last \d+ steps \(3\d s\) took 0\.2\d* s each, 2\.\dx the 0\.1 s planned "
                      r"\(the test's plan\), 1% of it waiting for data \(planned 2%\)\. Likely cause: ", said[0])
    assert found, said[0]
    assert 600 + 20 < int(found[1]) <= 600 + 86  # one slow step is no spell; 30 s of them fill the window
    assert "the data loader" not in said[0]
    for _ in range(600):  # back to the plan, then slow again: one more line
        step += 1
        watch.after_step(step, 0.1, 0.002)
    assert len(said) == 1
    for _ in range(400):
        step += 1
        watch.after_step(step, 0.3, 0.002)
    assert len(said) == 2


def test_without_a_plan_the_watch_holds_a_run_to_its_own_first_steady_steps():
    watch = PaceWatch(say=lambda line: None)
    for step in range(1, 6):
        watch.after_step(step, 3.0, 0.0)  # start-up: no plan of its own
    assert watch.planned is None
    for step in range(6, 26):
        watch.after_step(step, 0.2 if step % 2 else 0.3, 0.05)
    assert watch.planned.step_s == pytest.approx(0.25) and watch.planned.wait_share == pytest.approx(0.2125, abs=0.01)
    assert watch.planned.source == "this run's steps 6-25"


def test_a_data_bound_window_blames_the_loader_from_real_cpu_readings():
    """Steps 3x slower whose compute stayed as planned while the wait for data grew: the loader,
    whatever else the machine runs at the time (real psutil readings of this machine)."""
    said = []
    watch = PaceWatch(Planned(0.1, 0.05, "plan.json"), workers=1, say=said.append)
    for step in range(1, 200):
        watch.after_step(step, 0.3, 0.21)
    assert len(said) == 1
    assert "70% of it waiting for data (planned 5%)" in said[0]
    assert "Likely cause: the data loader cannot keep up" in said[0] and "training.workers (now 1)" in said[0]
    assert re.search(r"\d+\.\d of \d+ cores busy outside this run", said[0])


def test_the_cause_from_the_readings():
    plan = Planned(0.1, 0.05, "plan")
    burner = Busy("python3 -c while True: pass", [11, 12], 190.0)
    slow_compute = (0.4, 0.05)  # 4x, the same data share
    text = pace.cause(*slow_compute, plan, [burner, Busy("sshd", [5], 1.0)], 2, 0)
    assert text.startswith("other processes take the cores (1.9 of 2 cores busy outside this run)")
    assert "python3 -c while True: pass [2 processes, pids 11, 12] 190% of a core" in text and "sshd" not in text
    assert pace.cause(*slow_compute, plan, [Busy("sshd", [5], 10.0)], 2, 0).startswith(
        "neither other processes (0.1 of 2 cores")
    assert pace.cause(0.3, 0.7, plan, [burner], 2, 4).startswith("the data loader cannot keep up")
    assert pace.cause(0.5, 0.5, plan, [], 2, 4).startswith("the data loader cannot keep up")
    # on 64 cores, one busy core elsewhere takes nothing from the run
    assert pace.cause(*slow_compute, plan, [Busy("x", [7], 100.0)], 64, 0).startswith("neither")


def test_the_plan_is_plan_json_when_it_measured_this_setup(tmp_path, tiny_root):
    config = load_config(write_tiny_config(tiny_root, tmp_path / "cfg"))
    timings = [BatchTiming(1, step_s=0.05, data_wait_s=0.001), BatchTiming(2, step_s=0.08, data_wait_s=0.004)]
    m = Measurements("cpu", timings, 1.0, 0.1, 1000.0, 5, 1, 100, workers=config.training.workers)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"train_batch_size": 2, "measurements": asdict(m)}))
    planned = pace.planned_from(plan_file, config, "cpu", 1)
    assert planned.step_s == 0.08 and planned.wait_share == pytest.approx(0.05)
    assert planned.source.startswith(f"{plan_file} of ")
    assert pace.planned_from(plan_file, config, "cuda:0", 1) is None  # measured elsewhere
    assert pace.planned_from(plan_file, config, "cpu", 2) is None
    plan_file.write_text("{not json")
    assert pace.planned_from(plan_file, config, "cpu", 1) is None
    assert pace.planned_from(tmp_path / "absent.json", config, "cpu", 1) is None


BURNER = "vlab-pace-burner"


@pytest.mark.slow
def test_a_run_that_cpu_burners_slow_down_says_so_naming_them(tiny_root, tmp_path):
    """A real tiny run on core 0 alone sets its plan from its first steps; then four busy loops take
    that core. One line, in train.log and on the console, names them with their CPU use."""
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs CPU affinity and two cores")
    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=5000,
                            training={"val_every_epochs": 0, "checkpoint_every_steps": 0, "workers": 0})
    run = tmp_path / "run"
    console = open(tmp_path / "console.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    pin = lambda: os.sched_setaffinity(0, {0})  # noqa: E731
    proc = subprocess.Popen([sys.executable, "-m", "vesuvius_lab", "train", "--config", str(cfg), "--run-dir", str(run),
                             "--no-progress"], stdout=console, stderr=subprocess.STDOUT, env=env, preexec_fn=pin,
                            start_new_session=True)
    burners = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads((run / "status.json").read_text()).get("step", 0) > 26:
                    break  # its plan is set: steps 6-25
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        # each a session of its own, as another job is: the kernel shares a core between sessions (autogroup)
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass", BURNER], preexec_fn=pin,
                                    start_new_session=True) for _ in range(4)]
        while time.monotonic() < deadline + 30 and proc.poll() is None:
            if "Likely cause" in (run / "train.log").read_text():
                break
            time.sleep(0.5)
        log = (run / "train.log").read_text()
        lines = [line for line in log.splitlines() if "Likely cause" in line]
        assert len(lines) == 1, log[-3000:]
        line = lines[0]
        assert "WARNING" in line and "planned (this run's steps 6-25)" in line
        assert "other processes take the cores" in line, line
        share = re.search(rf"{BURNER} \[4 processes, pids [^\]]+\] (\d+)% of a core", line)
        assert share and int(share[1]) >= 40, line
        assert str(proc.pid) not in line.split("Likely cause")[1]  # the run itself is not a competitor
    finally:
        for b in burners:
            b.kill()
            b.wait()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        console.close()
    assert "warning: " + line.split(" WARNING ", 1)[1] in (tmp_path / "console.log").read_text()
    assert json.loads((run / "status.json").read_text())["state"] == "stopped"
