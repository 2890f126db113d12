"""The epoch planner of notebook 03 as a form: targets, Measure (in a background thread, with a
progress bar), the timings table and plots, the recommendation with its warnings and presets, the
LR range test (``lr_range``: its plot and suggested LR), and Apply (writes the config: the plan's
training keys and the suggested ``optim.lr``, whichever there are). Callbacks are plain methods, so
tests drive it without a browser.

Its defaults come from the config: without a target, the epoch to plan is the config's own (its
steps per epoch at the measured speed), so a demo config is planned at demo size. Measure and
Apply save the plan where ``vesuvius-lab plan`` saves it (``runs/<config name>/plan.json``), and a
plan saved there is shown at once and re-planned without measuring: a restarted kernel keeps it."""

from __future__ import annotations

import html
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import ipywidgets as w
from matplotlib.figure import Figure

from vesuvius_lab import lr_range, planner
from vesuvius_lab.config import Config, load_config, rewrite_config
from vesuvius_lab.data import epoch_layout
from vesuvius_lab.lab.forms import notebook_form
from vesuvius_lab.lab.plots import figure_png
from vesuvius_lab.lab.widgets import html_table
from vesuvius_lab.timefmt import format_duration
from vesuvius_lab.training.run_dir import RunDir


def timings_rows(m: planner.Measurements) -> list[list[str]]:
    return [[t.batch_size, "OOM" if t.out_of_memory else f"{t.samples_per_s:.2f}", f"{t.step_s:.3f}",
             f"{t.data_wait_s:.3f}", f"{t.peak_memory_mb:.0f}"] for t in m.timings]


def timings_figure(m: planner.Measurements) -> Figure:
    fig = Figure(figsize=(9, 3.2), dpi=72, layout="constrained")
    ax_speed, ax_mem = fig.subplots(1, 2)
    ok = [t for t in m.timings if not t.out_of_memory]
    b = [t.batch_size for t in ok]
    ax_speed.plot(b, [t.samples_per_s for t in ok], marker="o", color="tab:green")
    ax_speed.set(title="samples / s", xlabel="batch size", xscale="log", xticks=b, xticklabels=[str(x) for x in b])
    peaks = [t.peak_memory_mb for t in ok]
    ax_mem.plot(b, peaks, marker="o", color="tab:blue")
    if peaks and m.memory_capacity_mb <= 2 * max(peaks):  # a far-off capacity line would flatten the curve
        ax_mem.axhline(m.memory_capacity_mb, color="tab:red", ls="--", label="capacity")
        ax_mem.legend(fontsize=7)
    ax_mem.set(title=f"peak memory (MB), capacity {m.memory_capacity_mb / 1024:.0f} GiB", xlabel="batch size",
               xscale="log", xticks=b, xticklabels=[str(x) for x in b])
    for ax in (ax_speed, ax_mem):
        ax.minorticks_off()  # a log axis otherwise adds stray ticks such as 3x10^0
    return fig


def config_epoch_minutes(m: planner.Measurements, config: Config) -> float:
    """The config's own epoch (its steps per epoch at its batch size, validation and checkpoints
    included) at the measured speed: the default target, so a demo config is planned at demo size."""
    ok = [t for t in m.timings if not t.out_of_memory]
    timing = next((t for t in ok if t.batch_size == config.training.train_batch_size),
                  max(ok, key=lambda t: t.samples_per_s))
    steps = epoch_layout(config, max(m.train_records, 1), m.world_size).steps
    seconds = planner.epoch_seconds(steps, timing, m, config, config.training.val_every_epochs)
    return max(0.1, math.ceil(seconds / 6) / 10)  # up to the next tenth of a minute


class PlanForm:
    """Targets, Measure with progress, the recommendation, and Apply to ``out_path``."""

    def __init__(self, config_path: str | Path, out_path: str | Path, target_epoch_minutes: float | None = None,
                 budget_hours: float | None = None, coverage_target: float = 1.0,
                 batch_sizes: list[int] | None = None, warmup: int = 2, steps: int = 8,
                 runs_dir: str | Path | None = None):
        self.config_path, self.out_path = Path(config_path), Path(out_path)
        self.batch_sizes, self.warmup, self.steps = batch_sizes, warmup, steps
        # where `vesuvius-lab plan` saves it: the config's run folder, runs/<config name>/plan.json
        self.plan_path = RunDir(Path(runs_dir) / self.config_path.stem).plan if runs_dir else None
        self.target = w.FloatText(value=target_epoch_minutes or 0.0, description="target epoch (min)",
                                  tooltip="0: the config's own epoch, as measured; the plan fills it with whole "
                                          "steps, so its forecast epoch (below) is at most this",
                                  style={"description_width": "initial"})
        self.budget = w.FloatText(value=budget_hours or 0.0, description="budget (h)",
                                  tooltip="0: no budget; else the wall time the whole run may take: Apply sets "
                                          "training.time_budget_hours and the trainer re-plans to end inside it")
        self.coverage = w.FloatText(value=coverage_target, description="coverage")
        self.measure_button = w.Button(description="Measure", button_style="info")
        self.lr_button = w.Button(description="LR range test", button_style="info",
                                  tooltip="the config's real step for ~100 steps, the LR rising exponentially; "
                                          "stops when the loss diverges; suggests optim.lr (Apply writes it)")
        self.lr_plot = w.Image(format="png", layout=w.Layout(display="none"))
        self.lr_message = w.HTML()
        self.apply_button = w.Button(description="Apply", button_style="success", disabled=True)
        # shown from the first Measure on: until then nothing is being measured
        self.progress = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(visibility="hidden"))
        self.table, self.recommendation, self.message = w.HTML(), w.HTML(), w.HTML()
        self.plot = w.Image(format="png", layout=w.Layout(display="none"))  # shown once there is a plot
        self.measure_button.on_click(lambda _b: self.measure_async())
        self.lr_button.on_click(lambda _b: self.lr_range_async())
        self.apply_button.on_click(lambda _b: self.apply())
        for field_ in (self.target, self.budget, self.coverage):
            field_.observe(lambda _c: self.recommend(), names="value")
        self.widget = notebook_form([w.HBox([self.target, self.budget, self.coverage]),
                              w.HBox([self.measure_button, self.lr_button, self.progress, self.apply_button]),
                              self.message, self.table, self.plot, self.recommendation, self.lr_message, self.lr_plot])
        self.measurements: planner.Measurements | None = None
        self.plan: planner.Plan | None = None
        self.lr_result: lr_range.RangeTest | None = None
        self.thread: threading.Thread | None = None
        if self.plan_path is not None and self.plan_path.is_file():
            self.show_saved(self.plan_path)

    def show_saved(self, path: Path) -> planner.Plan | None:
        """Show a saved plan: its timings, and its recommendation for its own target."""
        try:
            saved = planner.read_plan(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.message.value = f"<span style='color:#b00'>{html.escape(str(path))}: not a plan this form reads ({html.escape(str(exc))})</span>"
            return None
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(path)))
        if not self.target.value:
            self.target.value = round(saved.target_epoch_s / 60, 2)  # recommends again through the observer
        self._show_measurements(saved.measurements)
        self.message.value = (f"the plan saved in {html.escape(str(path))} ({when}, measured on {saved.measurements.device}): "
                              "change a target to plan again from its timings, or Measure to time this machine now")
        return self.plan

    def measure(self) -> planner.Measurements:
        """Run the planner's sweep (the progress bar follows its parts), then recommend."""
        def on_progress(done: int, total: int, message: str) -> None:
            self.progress.max, self.progress.value = total, done
            self.message.value = html.escape(message)

        self.progress.value, self.progress.description = 0, "measuring"
        self.progress.layout.visibility = "visible"
        self.measurements = planner.measure(load_config(self.config_path), self.batch_sizes, warmup=self.warmup,
                                            steps=self.steps, progress=False, on_progress=on_progress)
        self.progress.description = "measured"
        m = self.measurements
        self._show_measurements(m)
        self.message.value = f"measured {len(m.timings)} batch sizes in {m.seconds:.0f} s on {m.device}" + self.save()
        return m

    def save(self) -> str:
        """Save the plan where ``vesuvius-lab plan`` saves it, so a restarted kernel shows it again
        without measuring; the words saying where (empty without a runs folder)."""
        if self.plan is None or self.plan_path is None:
            return ""
        planner.save_plan(self.plan, self.plan_path)
        return f"; saved the plan to {html.escape(str(self.plan_path))}"

    def _show_measurements(self, m: planner.Measurements) -> None:
        self.measurements = m
        self.table.value = html_table(timings_rows(m), ("batch", "samples/s", "step s", "data wait s", "peak MB"))
        self.plot.value = figure_png(timings_figure(m))
        self.plot.layout.display = None
        self.recommend()

    def measure_async(self) -> threading.Thread:
        return self._in_background(self.measure, self.measure_button, self.message, "measuring")

    def _in_background(self, work: Callable[[], object], button: w.Button, message: w.HTML, what: str
                       ) -> threading.Thread:
        """``work`` in a thread, the kernel free meanwhile: ``button`` disabled until it ends, a
        failure said in ``message``."""
        def run() -> None:
            try:
                work()
            except Exception as exc:
                message.value = f"<b>{what} failed</b>: {html.escape(repr(exc))}"
            finally:
                button.disabled = False

        button.disabled = True
        self.thread = threading.Thread(target=run, name=f"plan: {what}", daemon=True)
        self.thread.start()
        return self.thread

    def recommend(self) -> planner.Plan | None:
        if self.measurements is None:
            return None
        config = load_config(self.config_path)
        if not self.target.value:  # the config's own epoch; setting the field recommends through the observer
            self.target.value = config_epoch_minutes(self.measurements, config)
            return self.plan
        self.plan = planner.recommend(self.measurements, config, self.target.value,
                                      self.budget.value or None, coverage_target=self.coverage.value or None)
        p = self.plan
        head = (f"<b>batch {p.train_batch_size} × {p.train_iterations_per_epoch} steps/epoch × {p.max_epochs} epochs</b>"
                f", coverage {p.coverage:.0%}, epoch ≈ {format_duration(p.forecast_epoch_s)} "
                f"(target {format_duration(p.target_epoch_s)}), run ≈ {p.forecast_run_s / 3600:.2f} h")
        items = "".join(f"<li>{html.escape(x)}</li>" for x in [*p.explanation, *planner.forecast_lines(p)])
        warn = "".join(f"<li style='color:#b00'>{html.escape(x)}</li>" for x in p.warnings)
        presets = html_table([[s.name, s.train_iterations_per_epoch, s.max_epochs, format_duration(s.forecast_epoch_s),
                               f"{s.coverage:.0%}", s.reason] for s in p.presets],
                             ("preset", "steps/epoch", "epochs", "epoch", "coverage", "why"))
        self.recommendation.value = f"{head}<ul>{items}</ul><ul>{warn}</ul>{presets}"
        self.apply_button.disabled = False
        return p

    def lr_range(self) -> lr_range.RangeTest:
        """The LR range test on the config's step (the progress bar follows its steps), its plot and suggestion."""
        def on_step(done: int, total: int) -> None:
            self.progress.max, self.progress.value = total, done

        self.progress.layout.visibility = "visible"
        self.progress.description = "LR range"
        self.lr_message.value = (f"LR range test running: the config's step, the LR rising from {lr_range.MIN_LR:g} "
                                 f"to {lr_range.MAX_LR:g} over {lr_range.STEPS} steps")
        r = self.lr_result = lr_range.lr_range_test(load_config(self.config_path), progress=False, on_step=on_step)
        self.lr_message.value = html.escape(r.summary()) + (
            "; Apply writes it as optim.lr" if r.suggested_lr is not None else "")
        self.lr_plot.value = figure_png(lr_range.range_figure(r))
        self.lr_plot.layout.display = None
        self.apply_button.disabled = self.plan is None and r.suggested_lr is None
        return r

    def lr_range_async(self) -> threading.Thread:
        return self._in_background(self.lr_range, self.lr_button, self.lr_message, "the LR range test")

    def apply(self) -> Path:
        """Write the config with the plan's training keys and the range test's suggested optim.lr."""
        changes = {"training": planner.plan_keys(self.plan)} if self.plan is not None else {}
        if self.lr_result is not None and self.lr_result.suggested_lr is not None:
            changes |= lr_range.lr_change(self.lr_result.suggested_lr)
        if not changes:
            raise RuntimeError("measure or run the LR range test first")
        rewrite_config(self.config_path, self.out_path, changes)
        self.message.value = f"wrote {html.escape(str(self.out_path))} ({', '.join(changes)} keys)" + self.save()
        return self.out_path
