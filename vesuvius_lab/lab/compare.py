"""Notebook 06's views of runs side by side: the table (``vesuvius_lab.compare``), the config keys
in which the runs differ, their validation curves and loss terms overlaid, and each run's best
checkpoint one click away from notebook 05 (a copy of notebook 05 with ``checkpoint_path`` set,
linked from the table; the line to paste into notebook 05 itself is shown too).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

import ipywidgets as w
import pandas as pd
import papermill
from matplotlib.figure import Figure

from vesuvius_lab.compare import RunSummary, differing_keys, summarize_runs, table_rows
from vesuvius_lab.errors import DataError
from vesuvius_lab.evaluate import SCORE_PARTS
from vesuvius_lab.lab.forms import notebook_form
from vesuvius_lab.lab.plots import figure_png, smooth_curve
from vesuvius_lab.lab.runs import History
from vesuvius_lab.losses import TERMS
from vesuvius_lab.training.run_dir import RunDir

NOTEBOOK_05 = Path(__file__).resolve().parents[2] / "notebooks" / "05_evaluate.ipynb"


def load_runs(runs_dir: str | Path) -> list[RunSummary]:
    """Every run in ``runs_dir``; none (not an error) while no run has been trained."""
    try:
        return summarize_runs(runs_dir)
    except DataError:
        return []


def paste_line(summary: RunSummary) -> str:
    """The line for notebook 05's parameters cell that evaluates this run's best checkpoint."""
    return f"checkpoint_path = {str(summary.best_checkpoint.resolve())!r}"


def evaluation_notebook(summary: RunSummary, out_dir: str | Path, template: str | Path = NOTEBOOK_05) -> Path:
    """``out_dir/05_evaluate-<run>.ipynb``: notebook 05 with this run's best checkpoint injected by
    papermill (the ``injected-parameters`` cell after the ``parameters`` cell), ready to open and run."""
    if summary.best_checkpoint is None:
        raise DataError(f"{summary.path}: no best checkpoint yet (it comes with the first validation)")
    path = Path(out_dir) / f"05_evaluate-{summary.name.replace('/', '-')}.ipynb"  # a study's trial: study-trial
    path.parent.mkdir(parents=True, exist_ok=True)
    # `papermill TEMPLATE PATH -p checkpoint_path ... --prepare-only`: parameterised, not run
    papermill.execute_notebook(template, path, parameters={"checkpoint_path": str(summary.best_checkpoint.resolve())},
                               prepare_only=True, progress_bar=False)
    return path


def runs_table(summaries: Sequence[RunSummary], evaluate_dir: str | Path | None = None,
               notebook_dir: str | Path = ".", template: str | Path = NOTEBOOK_05) -> pd.DataFrame:
    """One row per run. With ``evaluate_dir``, the last column links each best checkpoint's
    notebook 05 (written there), relative to ``notebook_dir``, the folder of the notebook showing it."""
    rows = table_rows(summaries)
    for row, summary in zip(rows, summaries, strict=True):
        row.pop("run")
        if evaluate_dir is not None and summary.best_checkpoint is not None:
            path = evaluation_notebook(summary, evaluate_dir, template)
            link = Path(os.path.relpath(path.resolve(), Path(notebook_dir).resolve())).as_posix()
            row["notebook 05"] = (f"<a href='{html.escape(link)}' title='{html.escape(paste_line(summary))}'>"
                                  f"evaluate best.pt</a>")
    return pd.DataFrame(rows, index=pd.Index([s.name for s in summaries], name="run"))


def show_table(summaries: Sequence[RunSummary], evaluate_dir: str | Path | None = None, notebook_dir: str | Path = ".",
               template: str | Path = NOTEBOOK_05):
    """The table as HTML (links clickable), or a line saying there is nothing yet."""
    from IPython.display import HTML

    if not summaries:
        return HTML("no runs yet: start one in notebook 04 (or <code>vesuvius-lab train</code>)")
    return HTML(runs_table(summaries, evaluate_dir, notebook_dir, template).to_html(escape=False))


def differing_table(summaries: Sequence[RunSummary]) -> pd.DataFrame:
    """Rows: the config keys whose values differ; columns: the runs."""
    differ = differing_keys(summaries)
    table = pd.DataFrame({s.name: {k: repr(v[s.name]) for k, v in differ.items()} for s in summaries})
    table.index.name = "config key"
    return table


def histories(summaries: Sequence[RunSummary]) -> dict[str, History]:
    """Each run's series, read from its metrics.jsonl (as notebook 04's live plot reads them)."""
    out = {}
    for s in summaries:
        history = History()
        history.add(RunDir(s.path).records())
        out[s.name] = history
    return out


def compare_figure(runs: dict[str, History], smoothing: float = 0.6) -> Figure:
    """Validation score and parts, then the total loss and each loss term: one colour per run."""
    names = ["val " + p for p in SCORE_PARTS] + ["loss"] + list(TERMS)
    fig = Figure(figsize=(13, 8), dpi=72, layout="constrained")
    axes = fig.subplots(3, 4).flat
    for ax, name in zip(axes, names, strict=False):
        for i, (run, h) in enumerate(runs.items()):
            colour = f"C{i % 10}"
            if name.startswith("val "):
                ax.plot(h.val_steps, h.val[name[4:]], marker="o", color=colour, label=run)
                ax.set_ylim(0, 1.05)
            else:
                values = h.loss if name == "loss" else h.terms[name]
                points = [(s, v) for s, v in zip(h.steps, values, strict=True) if v == v]
                if points:
                    steps, ys = zip(*points, strict=True)
                    ax.plot(steps, ys, color=colour, alpha=0.25, lw=0.8)
                    ax.plot(steps, smooth_curve(ys, smoothing), color=colour, lw=1.5, label=run)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes_list = fig.axes
    if runs and axes_list[0].lines:
        axes_list[0].legend(fontsize=8, loc="best")
    for ax in axes_list[len(names):]:
        ax.axis("off")
    return fig


class CompareView:
    """The runs to overlay and the smoothing of the loss curves; the figure below them."""

    def __init__(self, summaries: Sequence[RunSummary], select: Sequence[str] | None = None):
        self.summaries = list(summaries)
        names = [s.name for s in self.summaries]
        chosen = [n for n in (select or names) if n in names]
        self.runs = w.SelectMultiple(options=names, value=chosen, description="runs", rows=min(max(len(names), 2), 8))
        self.smoothing = w.FloatSlider(value=0.6, min=0.0, max=0.99, step=0.01, description="smoothing",
                                       continuous_update=False)
        self.plot = w.Image(format="png")
        self.runs.observe(lambda _c: self.draw(), names="value")
        self.smoothing.observe(lambda _c: self.draw(), names="value")
        self.widget = notebook_form([w.HBox([self.runs, self.smoothing]), self.plot])
        self._histories = histories(self.summaries)
        self.draw()

    def draw(self) -> None:
        chosen = {name: self._histories[name] for name in self.runs.value}
        self.plot.value = figure_png(compare_figure(chosen, self.smoothing.value))

    def save_plot(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.plot.value)
        return path
