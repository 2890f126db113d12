"""Notebook 07's sweep panel: the search space as YAML beside a form of the sweep's settings, Launch
(a ``vesuvius-lab sweep`` worker in its own process group: the kernel stays free) and Stop, the
live trials table, Optuna's optimization history and parameter importances, the best trial's
checkpoint one click from notebook 05, and "Apply best" writing a config. The logic is
``vesuvius_lab.sweep``'s; this module only shows it.
"""

from __future__ import annotations

import html
import math
import os
import sys
import time
import warnings
from pathlib import Path

import ipywidgets as w

from vesuvius_lab.compare import summarize
from vesuvius_lab.errors import VLabError
from vesuvius_lab.evaluate import SCORE_PARTS
from vesuvius_lab.lab.compare import NOTEBOOK_05, evaluation_notebook, paste_line
from vesuvius_lab.lab.forms import notebook_form
from vesuvius_lab.lab.plots import figure_png
from vesuvius_lab.lab.runs import RunProcess, Watcher
from vesuvius_lab.lab.widgets import html_table
from vesuvius_lab.sweep import COUNTED, PRUNERS, SAMPLERS, STUDY_DB, apply_best, load_study, prepare
from vesuvius_lab.timefmt import format_duration


def trial_rows(study, runs_dir: str | Path) -> list[list[str]]:
    """One row per trial: number, Optuna's state, the run's state, parameters, best score and parts
    (from the run folder), wall time."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        folder = Path(runs_dir) / study.study_name / f"trial_{t.number:03d}"
        s = summarize(folder) if folder.is_dir() else None
        best = (s.best if s else None) or {}
        params = ", ".join(f"{k}={_short(v)}" for k, v in t.params.items())
        rows.append([str(t.number), t.state.name.lower(), s.state if s else "-", params,
                     *(_num(best.get(k)) for k in SCORE_PARTS), format_duration(s.wall_s) if s else "-",
                     t.user_attrs.get("error", "")])
    return rows


TRIAL_HEADER = ["trial", "optuna", "run", "parameters", *SCORE_PARTS, "wall", "note"]


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) and math.isfinite(value) else "-"


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def study_figures(study) -> list[bytes]:
    """Optuna's matplotlib optimization history and, with two or more completed trials, the
    parameter importances, as PNGs (the figures closed: nothing else shows them)."""
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as vis

    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    plots = [vis.plot_optimization_history]
    if len(done) >= 2 and len({k for t in done for k in t.params}) >= 1:
        plots.append(vis.plot_param_importances)
    pngs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # its matplotlib plots are "experimental"
        for plot in plots:
            try:
                ax = plot(study, target_name="validation score")
            except (ValueError, RuntimeError):  # importances of parameters that never varied
                continue
            fig = ax.figure
            fig.set_size_inches(7, 3.6)
            fig.tight_layout()
            pngs.append(figure_png(fig))
            plt.close(fig)
    return pngs


class SweepPanel:
    """The form, the buttons and the live table of one study (``runs_dir/<study>``)."""

    def __init__(self, config: str | Path, space: str | Path, runs_dir: str | Path, study: str | None = None,
                 trials: int = 6, trial_budget: str = "3m", sampler: str = "tpe", pruner: str = "median",
                 storage: str | None = None, interval: float = 5.0):
        self.runs_dir, self.storage, self.interval = Path(runs_dir), storage, interval
        space = Path(space)
        self.config = w.Text(str(config), description="config", layout=w.Layout(width="460px"))
        self.study_name = w.Text(study or space.stem, description="study", layout=w.Layout(width="460px"))
        self.space = w.Textarea(space.read_text(encoding="utf-8") if space.is_file() else "",
                                description="space", layout=w.Layout(width="640px", height="190px"))
        self.trials = w.BoundedIntText(trials, min=1, max=10_000, description="trials")
        self.trial_budget = w.Text(trial_budget, description="trial budget", placeholder="e.g. 20m (empty: none)")
        self.sampler = w.Dropdown(options=SAMPLERS, value=sampler, description="sampler")
        self.pruner = w.Dropdown(options=PRUNERS, value=pruner, description="pruner")
        self.launch_button = w.Button(description="Launch", button_style="primary")
        self.stop_button = w.Button(description="Stop")
        self.message = w.HTML()
        self.table = w.HTML()
        self.launch_button.on_click(lambda _: self.launch())
        self.stop_button.on_click(lambda _: self.stop())
        form = w.VBox([self.config, self.study_name, self.space,
                       w.HBox([self.trials, self.trial_budget]), w.HBox([self.sampler, self.pruner])])
        self.widget = notebook_form([form, w.HBox([self.launch_button, self.stop_button]), self.message, self.table])
        self._watcher = Watcher(self.refresh, self.message, f"watch {self.folder.name}")
        self.refresh()

    @property
    def folder(self) -> Path:
        return self.runs_dir / self.study_name.value

    @property
    def process(self) -> RunProcess:
        """The worker launched from here (its console.log and launch.json in the study folder)."""
        return RunProcess(self.folder)

    def study(self):
        """The study as stored, or None before its first worker created it."""
        if self.storage is None and not (self.folder / STUDY_DB).is_file():
            return None
        return load_study(self.study_name.value, self.runs_dir, self.storage)

    def launch(self) -> list[str] | None:
        """Check everything as the command would, then start one worker in the background; the
        argv started, or None (the reason in red under the buttons)."""
        space_file = self.folder / "space.yaml"  # the space as edited here, beside the study it made
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            space_file.write_text(self.space.value, encoding="utf-8")
            prepare(self.config.value, space_file, self.trials.value, self.trial_budget.value or None,
                    self.sampler.value, self.pruner.value, self.storage, self.study_name.value, self.runs_dir)
        except VLabError as exc:
            self.message.value = "<br>".join(f"<span style='color:#c00'>error: {html.escape(line)}</span>"
                                             for line in exc.lines)
            return None
        if self.process.alive():
            self.message.value = f"a worker of this study is already running (pid {self.process.pid})"
            return None
        argv = [sys.executable, "-m", "vesuvius_lab", "sweep", str(Path(self.config.value).resolve()), "--space",
                str(space_file.resolve()), "--trials", str(self.trials.value), "--sampler", self.sampler.value,
                "--pruner", self.pruner.value, "--study", self.study_name.value,
                "--runs-dir", str(self.runs_dir.resolve()), "--no-progress"]
        argv += ["--trial-budget", self.trial_budget.value] if self.trial_budget.value else []
        argv += ["--storage", self.storage] if self.storage else []
        self.process.start(argv, cwd=os.getcwd())
        self.message.value = f"launched: {html.escape(' '.join(argv[2:]))}"
        return argv

    def stop(self) -> bool:
        """SIGTERM to the worker launched here: its trial checkpoints and stays resumable."""
        stopped = self.process.stop()
        self.message.value = "stopping: the running trial checkpoints, a later launch resumes it" if stopped else \
            "no worker launched from here is running"
        return stopped

    def refresh(self) -> dict:
        """Re-read the study: the table, and a line with the counts, the best trial and the worker."""
        try:
            study = self.study()
        except VLabError as exc:
            study, self.table.value = None, html.escape(exc.lines[0])
        alive = self.process.alive()
        if study is None:
            self.table.value = f"no study {html.escape(self.study_name.value)} in {html.escape(str(self.runs_dir))} yet: Launch starts it"
            return {"alive": alive, "trials": 0, "ended": 0}
        rows = trial_rows(study, self.runs_dir)
        states = [s.lower() for s in COUNTED]  # Optuna's trial states, as the table writes them
        ended = sum(r[1] in states[:-1] for r in rows)
        counts = ", ".join(f"{sum(r[1] == s for r in rows)} {s}" for s in states)
        self.table.value = (f"<b>{'a worker runs' if alive else 'idle'}</b> · {len(rows)} trials: {counts}"
                            + html_table(rows, TRIAL_HEADER))
        return {"alive": alive, "trials": len(rows), "ended": ended}

    def watch(self, interval: float | None = None) -> None:
        """Refresh the table from a background thread until ``unwatch()``."""
        self._watcher.start(interval or self.interval)

    def unwatch(self) -> None:
        self._watcher.stop()

    def wait(self, timeout: float = 3600.0) -> dict:
        """Until the worker launched here has exited (unattended runs); the last refresh."""
        deadline = time.monotonic() + timeout
        while self.process.alive():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.folder}: the sweep still runs after {timeout} s")
            time.sleep(0.5)
        return self.refresh()

    def figures(self) -> w.Widget:
        """The optimization history and the parameter importances (as of now)."""
        study = self.study()
        pngs = study_figures(study) if study is not None else []
        if not pngs:
            return w.HTML("no trials yet: the plots come with the first ended trial")
        return w.VBox([w.Image(value=png, format="png", layout=w.Layout(max_width="760px")) for png in pngs])

    def best_link(self, evaluate_dir: str | Path, notebook_dir: str | Path = ".", template: str | Path = NOTEBOOK_05) -> w.HTML:
        """The best completed trial, and its best checkpoint as a link to notebook 05 set to it."""
        study = self.study()
        done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"] if study else []
        if not done:
            return w.HTML("no completed trial yet")
        best = max(done, key=lambda t: t.value)
        run = summarize(self.folder / f"trial_{best.number:03d}", f"{self.study_name.value}/trial_{best.number:03d}")
        if run.best_checkpoint is None:
            return w.HTML(f"trial {best.number}: no best checkpoint in {html.escape(str(run.path))}")
        path = evaluation_notebook(run, evaluate_dir, template)
        link = Path(os.path.relpath(path.resolve(), Path(notebook_dir).resolve())).as_posix()
        params = ", ".join(f"{k}={_short(v)}" for k, v in best.params.items())
        return w.HTML(f"best: trial {best.number}, score {best.value:.4f} ({html.escape(params)}) · "
                      f"<a href='{html.escape(link)}' title='{html.escape(paste_line(run))}'>evaluate its best.pt "
                      f"in notebook 05</a>")

    def apply_best(self, out: str | Path) -> str:
        """Write the config with the best trial's parameters to ``out``; the line saying so."""
        study = self.study()
        if study is None:
            return "no study yet"
        params = apply_best(study, self.config.value, out)
        return f"wrote {out}: " + ", ".join(f"{k}={_short(v)}" for k, v in params.items())
