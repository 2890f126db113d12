"""The run launcher of notebook 04: argv, incremental metrics, and a real tiny run started, stopped,
resumed and reattached through the widget's buttons."""

from __future__ import annotations

import json
import os

import pytest

from lab_runs_helpers import write_tiny_config
from vesuvius_lab.lab import runs
from vesuvius_lab.lab.plots import figure_png, smooth_curve
from vesuvius_lab.losses import TERMS
from vesuvius_lab.timefmt import format_duration
from vesuvius_lab.training.run_dir import MetricsReader, RunDir


def test_train_argv_one_process_and_torchrun():
    assert runs.train_argv("c.yaml", "r", python="py") == [
        "py", "-m", "vesuvius_lab", "train", "--config", "c.yaml", "--run-dir", "r", "--no-progress"]
    argv = runs.train_argv("c.yaml", "r", devices=4, resume=True, overrides=["loss.topo=0"], python="py")
    assert argv[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m"]
    assert argv[6:] == ["vesuvius_lab", "train", "--resume", "--run-dir", "r", "--no-progress", "loss.topo=0"]
    assert "--config" not in argv  # a resume continues the run's own config; only the overrides change it


def test_metrics_reader_is_incremental_and_keeps_a_torn_line_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    reader = MetricsReader(path)
    assert reader.read() == []  # no file yet
    line = json.dumps({"kind": "train", "step": 1, "loss": 0.5, "step_s": 2.0, "data_wait_s": 0.5})
    path.write_text(line + "\n" + '{"kind": "train", "st')
    assert [r["step"] for r in reader.read()] == [1]
    with open(path, "a") as fh:
        fh.write('ep": 2, "loss": 0.4}\n')
    assert [r["step"] for r in reader.read()] == [2]
    assert reader.read() == []
    path.write_text(line + "\n")  # truncated by a resume: read again from the start
    assert [r["step"] for r in reader.read()] == [1] and reader.reset
    history = runs.History()
    history.add([json.loads(line), {"kind": "val", "step": 1, "score": 0.3, "topo": 0.2, "surface_dice": 0.4,
                                     "voi_score": 0.5}])
    assert history.data_wait_share == [0.25] and history.val["voi_score"] == [0.5]
    assert runs.eta_seconds({"step": 1, "total_steps": 11}, history) == 20.0
    assert format_duration(3725) == "1:02:05" and format_duration(None) == "?"
    assert format_duration(-125) == "2:05" and format_duration(float("inf")) == "?"  # a span reads as its length


def test_pid_alive():
    assert runs.pid_alive(os.getpid()) and not runs.pid_alive(None) and not runs.pid_alive(2**22 + 12345)


@pytest.mark.slow
def test_start_stop_resume_and_reattach_through_the_buttons(tiny_root, tmp_path):
    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=60)
    monitor = runs.RunMonitor(config, tmp_path / "runs", run_name="tiny")
    assert monitor.refresh()["state_shown"] == "not started" and monitor.stop_button.disabled
    monitor.start_button.click()
    try:
        assert monitor.process.popen is not None and monitor.process.pgid == monitor.process.popen.pid
        assert os.getpgid(monitor.process.popen.pid) == monitor.process.popen.pid  # its own process group
        status = monitor.wait_for(lambda s: len(monitor.history.steps) >= 2, timeout=180)
        assert status["alive"] and monitor.start_button.disabled and not monitor.stop_button.disabled
        assert monitor.history.steps[:2] == [1, 2]
        assert all(len(monitor.history.terms[t]) == len(monitor.history.steps) for t in TERMS)
        assert 0 <= monitor.history.data_wait_share[0] <= 1 and monitor.history.samples_per_s[0] > 0
        assert monitor.progress.max == 60 and monitor.progress.value >= 2
        assert status["eta_s"] is not None and "ETA" in monitor.status.value
        assert monitor.plot.value[:4] == b"\x89PNG"
        monitor.stop_button.click()
        monitor.process.wait(timeout=120)
        status = monitor.wait_for(lambda s: not s["alive"], timeout=30)
        stopped = runs.read_status(monitor.run_dir)
        assert stopped["state"] == "stopped" and 2 <= stopped["step"] < 60, stopped
        assert (monitor.run_dir / "checkpoints" / "last.pt").exists()
        assert "stopped" in monitor.status.value and not monitor.start_button.disabled

        monitor.start_button.click()  # a fresh start over a checkpoint is refused
        assert "Resume" in monitor.message.value and not monitor.process.alive()
        monitor.resume_button.click()
        assert "--resume" in monitor.process.popen.args
        monitor.process.wait(timeout=240)
        status = monitor.wait_for(lambda s: not s["alive"], timeout=30)
        assert status["state"] == "finished", monitor.log_tail(40)
        assert monitor.progress.value == monitor.progress.max == 60
        assert monitor.history.steps[-1] == 60 and len(monitor.history.val_steps) == 1
        assert set(monitor.history.steps) == set(range(1, 61))
        # the forecast panel: a run without a budget forecasts at its first measurements and epoch end
        assert monitor.history.plans and {p["reason"] for p in monitor.history.plans} == {"forecast"}
        assert monitor.forecast.plot.value[:4] == b"\x89PNG" and len(monitor.history.epochs) == 1

        again = runs.RunMonitor(config, tmp_path / "runs", run_name="tiny")  # the notebook reopened
        shown = again.refresh()
        assert shown["state_shown"] == "finished" and not shown["alive"]
        assert again.history.steps == monitor.history.steps and again.history.val == monitor.history.val
        assert again.progress.value == 60 and again.stop_button.disabled
    finally:
        monitor.process.stop()


@pytest.mark.slow
def test_reattach_to_a_running_run_and_stop_it(tiny_root, tmp_path):
    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=400)
    first = runs.RunMonitor(config, tmp_path / "runs", run_name="live", interval=0.2)
    first.start_button.click()
    try:
        first.wait_for(lambda s: len(first.history.steps) >= 2, timeout=180)
        second = runs.RunMonitor(config, tmp_path / "runs", run_name="live", interval=0.2)  # no Popen of its own
        assert second.process.popen is None and second.process.alive()
        second.watch()  # the background refresh keeps the kernel free
        step = second.history.last_step
        second.wait_for(lambda s: second.history.last_step > step, timeout=60)
        second.stop_button.click()
        second.wait_for(lambda s: not s["alive"], timeout=120)
        second.unwatch()
        assert runs.read_status(second.run_dir)["state"] == "stopped"
        assert first.process.popen.wait(timeout=10) == 3  # the CLI: 0 finished, 3 stopped
    finally:
        first.process.stop()


def test_a_failed_launch_shows_its_error_line_in_red_and_start_stays_usable(tiny_root, tmp_path):
    """A typo in the overrides: the CLI refuses before training; the widget must say why."""
    config = write_tiny_config(tiny_root, tmp_path / "cfg")
    monitor = runs.RunMonitor(config, tmp_path / "runs", run_name="typo", overrides=["training.max_epoch=3"])
    monitor.start_button.click()
    status = monitor.wait_for(lambda s: not s["alive"] and s["state_shown"] != "not started", timeout=120)
    assert status["state_shown"] == "failed to start"
    assert "unknown key training.max_epoch (did you mean training.max_epochs?)" in monitor.status.value
    assert "color:#c00" in monitor.status.value
    assert not monitor.start_button.disabled and monitor.stop_button.disabled


def _write_run(folder, steps: int = 20, val_at: tuple[int, ...] = (20,)) -> None:
    """A finished run's files as the trainer writes them (metrics.jsonl, train.log), no console.log."""
    folder.mkdir(parents=True)
    lines = [{"kind": "train", "step": i, "loss": 1.0 / i + 0.3 * (i % 2), "lr": 0.01, "samples_per_s": 4.0,
              "step_s": 0.5, "data_wait_s": 0.1, **{t: 0.1 for t in TERMS}} for i in range(1, steps + 1)]
    lines += [{"kind": "val", "step": s, "score": 0.4, "topo": 0.3, "surface_dice": 0.5, "voi_score": 0.6}
              for s in val_at]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (folder / "train.log").write_text("step 20/20 loss 0.35\nfinished: 20 steps\n")


def test_smooth_curve_is_debiased_and_skips_missing_points():
    assert smooth_curve([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0
    smoothed = smooth_curve([1.0, float("nan"), 0.0], 0.5)
    assert smoothed[0] == 1.0 and smoothed[1] != smoothed[1] and smoothed[2] == pytest.approx(1 / 3)
    assert smooth_curve([3.0, 1.0], 0.0) == [3.0, 1.0]


def test_loss_legend_hides_no_curve_and_one_validation_point_sits_on_the_step_axis(tmp_path):
    _write_run(tmp_path / "r", steps=20, val_at=(20,))
    history = runs.History()
    history.add(RunDir(tmp_path / "r").records())
    fig = runs.history_figure(history, smoothing=0.6)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    ax_loss, ax_val = fig.axes[0], fig.axes[4]
    legend = ax_loss.get_legend().get_window_extent(renderer)
    assert not legend.overlaps(ax_loss.get_window_extent(renderer))  # beside the axes, not over the total
    assert ax_val.get_xlim()[0] == 0 and 20 <= ax_val.get_xlim()[1] <= 21  # not 19.95..20.05
    assert ax_val.get_xlim() == ax_loss.get_xlim()
    total, raw = ax_loss.lines[1], ax_loss.lines[0]
    assert list(raw.get_ydata()) == history.loss and list(total.get_ydata()) == smooth_curve(history.loss, 0.6)


def test_the_plan_reaches_the_run_config_field_budget_field_and_the_line_saying_which(tiny_root, tmp_path):
    """Notebook 04 starts the config notebook 03 applied when it is newer, says which, and its
    budget field reaches training.time_budget_hours (the config's own value until changed)."""
    from vesuvius_lab.lab.planning import PlanForm

    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=30)
    planned = tmp_path / "cfg" / "tiny_planned.yaml"
    assert runs.newest_config(config, planned) == str(config)  # nothing applied yet
    form = PlanForm(config, planned, target_epoch_minutes=1.0, budget_hours=0.25)
    form.measurements = _measurements()
    form.recommend()
    form.apply()  # notebook 03's Apply
    chosen = runs.newest_config(config, planned)
    assert chosen == str(planned)
    monitor = runs.RunMonitor(chosen, tmp_path / "runs", "p", offered=[config, planned])
    assert monitor.config.value == str(planned) and list(monitor.config.options) == [str(planned), str(config)]
    assert f"Start starts <code>{planned}</code>" in monitor.config_note.value
    assert monitor.budget.value == 0.25  # the applied plan's budget, exactly
    argv = monitor.argv()
    assert argv[argv.index("--config") + 1] == str(planned) and not any("time_budget" in a for a in argv)
    monitor.budget.value = 1.5
    assert monitor.argv()[-1] == "training.time_budget_hours=1.5"
    monitor.budget.value = 0.0
    assert monitor.argv()[-1] == "training.time_budget_hours=null"
    monitor.config.value = str(config)  # back to the config as written: its own (no) budget
    assert monitor.budget.value == 0.0 and monitor.argv()[-1] == "--no-progress"
    monitor.config.value = str(tmp_path / "typo.yaml")
    assert "typo.yaml: config not found" in monitor.config_note.value and "color:#c00" in monitor.config_note.value


def _measurements():
    from vesuvius_lab.planner import BatchTiming, Measurements

    timing = BatchTiming(2, step_s=0.5, step_median_s=0.5, data_wait_s=0.01, compute_s=0.49, step_spread_s=0.01,
                         samples_per_s=4.0, peak_memory_mb=900.0, first_batch_s=1.0)
    return Measurements("cpu", [timing], val_s=5.0, checkpoint_s=0.1, memory_capacity_mb=24_000.0,
                        train_records=4, val_records=2, unique_patches=400, workers=0)


def test_the_plot_title_follows_the_state_when_no_record_comes_with_it(tmp_path):
    """A run writes its last records, then its final state: the title must not stay at "running"."""
    runs_dir = tmp_path / "runs"
    _write_run(runs_dir / "budget5m")
    run = RunDir(runs_dir / "budget5m")
    monitor = runs.RunMonitor("c.yaml", runs_dir, "budget5m")
    assert monitor.plot_title == "budget5m: not started"
    shown = monitor.plot.value
    run.status(state="finished", step=20, total_steps=20)  # as the trainer writes it
    monitor.refresh()
    assert monitor.plot_title == "budget5m: finished" and monitor.plot.value != shown
    expected = runs.history_figure(monitor.history, "budget5m: finished", monitor.smoothing.value)
    assert monitor.plot.value == figure_png(expected)


def test_a_finished_run_shows_its_log_and_a_restarted_kernel_offers_the_last_run(tmp_path):
    runs_dir = tmp_path / "runs"
    _write_run(runs_dir / "older")
    _write_run(runs_dir / "exp2")
    monitor = runs.RunMonitor("c.yaml", runs_dir, "older", default_run_name="demo")
    monitor.run_name.value = "exp2"  # the researcher switches to another run
    assert "finished: 20 steps" in monitor.log_tail() and "train.log" in monitor.log_tail()
    assert monitor.history.last_step == 20
    before = monitor.plot.value
    monitor.smoothing.value = 0.0
    assert monitor.plot.value != before  # redrawn with the raw curves, no new records needed
    again = runs.RunMonitor("c.yaml", runs_dir, None, default_run_name="demo")  # the kernel restarted
    assert again.run_name.value == "exp2" and again.history.last_step == 20
    (runs_dir / ".last_run.json").write_text('{"run_name": "../elsewhere"}')  # never a folder outside runs_dir
    assert runs.RunMonitor("c.yaml", runs_dir, None, default_run_name="demo").run_name.value == "demo"
    assert "has no run" in runs.RunMonitor("c.yaml", runs_dir, "new", default_run_name="demo").log_tail()
