"""The epoch planner of notebook 03 as a form: targets, Measure (in a background thread, with a
progress bar), the timings table and plots, the recommendation with its warnings and presets, and
Apply (writes the config). Callbacks are plain methods, so tests drive it without a browser."""

from __future__ import annotations

import html
import threading
from pathlib import Path

import ipywidgets as w
from matplotlib.figure import Figure

from vesuvius_lab import planner
from vesuvius_lab.config import load_config
from vesuvius_lab.lab.plots import figure_png
from vesuvius_lab.lab.widgets import html_table


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


class PlanForm:
    """Targets, Measure with progress, the recommendation, and Apply to ``out_path``."""

    def __init__(self, config_path: str | Path, out_path: str | Path, target_epoch_minutes: float = 60.0,
                 budget_hours: float | None = None, coverage_target: float = 1.0,
                 batch_sizes: list[int] | None = None, warmup: int = 2, steps: int = 8):
        self.config_path, self.out_path = Path(config_path), Path(out_path)
        self.batch_sizes, self.warmup, self.steps = batch_sizes, warmup, steps
        self.target = w.FloatText(value=target_epoch_minutes, description="epoch (min)")
        self.budget = w.FloatText(value=budget_hours or 0.0, description="budget (h)",
                                  tooltip="0: no budget; else the wall time the whole run may take: Apply sets "
                                          "training.time_budget_hours and the trainer re-plans to end inside it")
        self.coverage = w.FloatText(value=coverage_target, description="coverage")
        self.measure_button = w.Button(description="Measure", button_style="info")
        self.apply_button = w.Button(description="Apply", button_style="success", disabled=True)
        self.progress = w.IntProgress(value=0, min=0, max=1, description="measuring")
        self.table, self.recommendation, self.message = w.HTML(), w.HTML(), w.HTML()
        self.plot = w.Image(format="png", layout=w.Layout(display="none"))  # shown once there is a plot
        self.measure_button.on_click(lambda _b: self.measure_async())
        self.apply_button.on_click(lambda _b: self.apply())
        for field_ in (self.target, self.budget, self.coverage):
            field_.observe(lambda _c: self.recommend(), names="value")
        self.widget = w.VBox([w.HBox([self.target, self.budget, self.coverage]),
                              w.HBox([self.measure_button, self.progress, self.apply_button]),
                              self.message, self.table, self.plot, self.recommendation])
        self.measurements: planner.Measurements | None = None
        self.plan: planner.Plan | None = None
        self.thread: threading.Thread | None = None

    def measure(self) -> planner.Measurements:
        """Run the planner's sweep (the progress bar follows its parts), then recommend."""
        def on_progress(done: int, total: int, message: str) -> None:
            self.progress.max, self.progress.value = total, done
            self.message.value = html.escape(message)

        self.measurements = planner.measure(load_config(self.config_path), self.batch_sizes, warmup=self.warmup,
                                            steps=self.steps, progress=False, on_progress=on_progress)
        m = self.measurements
        self.message.value = f"measured {len(m.timings)} batch sizes in {m.seconds:.0f} s on {m.device}"
        self.table.value = html_table(timings_rows(m), ("batch", "samples/s", "step s", "data wait s", "peak MB"))
        self.plot.value = figure_png(timings_figure(m))
        self.plot.layout.display = None
        self.recommend()
        return m

    def measure_async(self) -> threading.Thread:
        def run() -> None:
            try:
                self.measure()
            except Exception as exc:
                self.message.value = f"<b>measuring failed</b>: {html.escape(repr(exc))}"
            finally:
                self.measure_button.disabled = False

        self.measure_button.disabled = True
        self.thread = threading.Thread(target=run, name="plan measure", daemon=True)
        self.thread.start()
        return self.thread

    def recommend(self) -> planner.Plan | None:
        if self.measurements is None:
            return None
        self.plan = planner.recommend(self.measurements, load_config(self.config_path), self.target.value,
                                      self.budget.value or None, coverage_target=self.coverage.value or None)
        p = self.plan
        head = (f"<b>batch {p.train_batch_size} × {p.train_iterations_per_epoch} steps/epoch × {p.max_epochs} epochs</b>"
                f", coverage {p.coverage:.0%}, epoch ≈ {p.forecast_epoch_s / 60:.1f} min, run ≈ {p.forecast_run_s / 3600:.2f} h")
        items = "".join(f"<li>{html.escape(x)}</li>" for x in [*p.explanation, *planner.forecast_lines(p)])
        warn = "".join(f"<li style='color:#b00'>{html.escape(x)}</li>" for x in p.warnings)
        presets = html_table([[s.name, s.train_iterations_per_epoch, s.max_epochs, f"{s.forecast_epoch_s / 60:.1f}",
                               f"{s.coverage:.0%}", s.reason] for s in p.presets],
                             ("preset", "steps/epoch", "epochs", "epoch min", "coverage", "why"))
        self.recommendation.value = f"{head}<ul>{items}</ul><ul>{warn}</ul>{presets}"
        self.apply_button.disabled = False
        return p

    def apply(self) -> Path:
        if self.plan is None:
            raise RuntimeError("measure first")
        planner.apply_plan(self.config_path, self.plan, self.out_path)
        self.message.value = f"wrote {html.escape(str(self.out_path))}"
        return self.out_path
