"""Launch, stop, resume and watch training runs from a notebook (notebook 04).

A run is a separate process group (``vesuvius-lab train`` or torchrun over it), so the kernel stays
responsive and neither can take the other down. Everything shown is read back from the run
directory the trainer writes (``status.json``, ``metrics.jsonl``), so a reopened notebook reattaches
to a running or finished run by its directory alone. The widget is built from small functions and
classes that tests drive without a browser (``button.click()``, ``refresh()``).
"""

from __future__ import annotations

import html
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ipywidgets as w
import psutil
from matplotlib.figure import Figure

from vesuvius_lab.config import load_config
from vesuvius_lab.errors import VLabError
from vesuvius_lab.evaluate import SCORE_PARTS as VAL_PARTS
from vesuvius_lab.io import atomic_write_text
from vesuvius_lab.lab.forecast import ForecastPanel
from vesuvius_lab.lab.forms import notebook_form
from vesuvius_lab.lab.plots import figure_png, smooth_curve
from vesuvius_lab.losses import TERMS
from vesuvius_lab.training.budget import PLAN
from vesuvius_lab.training.pace import eta_s, step_time
from vesuvius_lab.timefmt import format_duration
from vesuvius_lab.training.run_dir import (  # noqa: F401 (pid_alive)
    ALIVE_STATES, EPOCH, TRAIN, VAL, MetricsReader, RunDir, RunState, describe_holder, pid_alive, process_gone,
    same_process,
)



# --- command lines ---------------------------------------------------------------------------------


def train_argv(config: str | Path, run_dir: str | Path, devices: int = 1, resume: bool = False,
               overrides: Sequence[str] = (), python: str = sys.executable) -> list[str]:
    """The argv of one run: one process for ``devices <= 1``, else torchrun with one process per GPU.
    A resume takes the run's own config (``config`` is not passed): only ``overrides`` change it."""
    if devices > 1:
        head = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(devices)}",
                "-m", "vesuvius_lab"]
    else:
        head = [python, "-m", "vesuvius_lab"]
    source = ["--resume"] if resume else ["--config", str(config)]
    return [*head, "train", *source, "--run-dir", str(run_dir), "--no-progress", *(str(o) for o in overrides)]


def newest_config(default: str | Path, applied: str | Path) -> str:
    """The config notebook 04 starts by default: the one notebook 03's Apply wrote (``applied``),
    when it exists and is newer than ``default`` (the config it was planned from), else ``default``."""
    applied_path, default_path = Path(applied), Path(default)
    if applied_path.is_file() and (not default_path.is_file()
                                   or applied_path.stat().st_mtime >= default_path.stat().st_mtime):
        return str(applied)
    return str(default)


def config_budget(config: str | Path) -> float | None:
    """``training.time_budget_hours`` of a config file (None: no budget)."""
    return load_config(config).training.time_budget_hours


def budget_override(hours: float, configured: float | None) -> list[str]:
    """The override that makes the budget field count: none while it shows the config's own value,
    ``null`` for 0 (no budget)."""
    if (hours or None) == configured:
        return []
    return [f"training.time_budget_hours={hours:g}" if hours else "training.time_budget_hours=null"]


# --- reading a run directory -----------------------------------------------------------------------


def read_status(run_dir: str | Path) -> dict:
    """status.json, or {} when it is absent or being replaced."""
    return RunDir(run_dir).read_status()


@dataclass
class History:
    """The series the live plot draws, gathered from metrics records."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    terms: dict[str, list[float]] = field(default_factory=lambda: {t: [] for t in TERMS})
    lr: list[float] = field(default_factory=list)
    samples_per_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    data_wait_share: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in VAL_PARTS})
    weights: dict[str, list[float]] = field(default_factory=lambda: {t: [] for t in TERMS})  # per-term schedules
    times: list[float | None] = field(default_factory=list)  # wall time of each step (lab.forecast)
    plans: list[dict] = field(default_factory=list)  # the plan records: forecasts and re-plans
    epochs: list[dict] = field(default_factory=list)
    early_stop: int | None = None  # the step whose validation ended the run (training.early_stop_patience)

    def add(self, records: Sequence[dict]) -> None:
        for r in records:
            if r.get("kind") in (PLAN, EPOCH):
                (self.plans if r["kind"] == PLAN else self.epochs).append(r)
                if r.get("early_stop"):
                    self.early_stop = r["step"]
            if r.get("kind") == TRAIN:
                self.steps.append(r["step"])
                self.times.append(r.get("time"))
                self.loss.append(_num(r.get("loss")))
                for t in TERMS:
                    self.terms[t].append(_num(r.get(t)))
                    self.weights[t].append(_num(r.get(f"weight_{t}")))
                self.lr.append(_num(r.get("lr")))
                self.samples_per_s.append(_num(r.get("samples_per_s")))
                step_s = _num(r.get("step_s"))
                self.step_s.append(step_s)
                self.data_wait_share.append(_num(r.get("data_wait_s")) / step_s if step_s > 0 else math.nan)
            elif r.get("kind") == VAL:
                self.val_steps.append(r["step"])
                for k in VAL_PARTS:
                    self.val[k].append(_num(r.get(k)))

    def term_starts(self) -> dict[str, int]:
        """The step at which each late-starting term got its first weight (a term on from the first
        step logged, or never on, is not listed)."""
        starts = {}
        for t, weights in self.weights.items():
            on = [i for i, w in enumerate(weights) if w > 0]
            if on and on[0] > 0:
                starts[t] = self.steps[on[0]]
        return starts

    @property
    def last_step(self) -> int:
        return self.steps[-1] if self.steps else 0


def _num(value) -> float:
    return math.nan if value is None else float(value)


def launch_error(run_dir: str | Path) -> str | None:
    """The last ``error:`` line the latest launch printed (console.log after its command line)."""
    console = RunDir(run_dir).console
    try:
        lines = console.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    starts = [i for i, line in enumerate(lines) if line.startswith("$ ")]
    latest = lines[starts[-1] + 1:] if starts else lines
    errors = [line.removeprefix("error: ") for line in latest if line.startswith("error: ")]
    return errors[-1] if errors else None


def eta_seconds(status: dict, history: History) -> float | None:
    """The steps left at the step time the CLI bar uses too (``training.pace.step_time``); None when unknown."""
    step, total = status.get("step"), status.get("total_steps")
    if step is None or not total:
        return None
    return eta_s(step_time(history.step_s), total - step)


# --- the process ------------------------------------------------------------------------------------


class RunProcess:
    """One run's process group: started detached, stopped with SIGTERM to the whole group.

    A process is recognised by its pid and its start time together (``launch.json`` from the
    launcher, ``status.json`` from the trainer), so a reused pid is never taken for the run."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.run = RunDir(run_dir)
        self.popen: subprocess.Popen | None = None

    def _launch_info(self) -> dict:
        try:
            return json.loads(self.run.launch.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def start(self, argv: Sequence[str], cwd: str | Path | None = None) -> subprocess.Popen:
        if self.alive():
            raise RuntimeError(f"{self.run_dir}: a run is already going (pid {self.pid})")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run.console, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, cwd=cwd)
        try:
            started = psutil.Process(self.popen.pid).create_time()
        except psutil.Error:  # exited at once (a bad command line): nothing to identify later
            started = None
        atomic_write_text(self.run.launch, json.dumps({  # a new session: the leader's pid is the group id
            "argv": list(argv), "pid": self.popen.pid, "pgid": self.popen.pid, "process_start": started,
            "started": time.time()}))
        return self.popen

    def _identified(self) -> tuple[int, int] | None:
        """(pid, process group) of the run's live process, proven by its start time; else None."""
        if self.popen is not None:
            return (self.popen.pid, self.popen.pid) if self.popen.poll() is None else None
        launch = self._launch_info()
        if same_process(launch.get("pid"), launch.get("process_start")):
            return launch["pid"], launch["pgid"]
        for record in (self.run.holder() or {}, read_status(self.run_dir)):  # a run started elsewhere
            if record.get("host", socket.gethostname()) == socket.gethostname() and \
                    same_process(record.get("pid"), record.get("process_start")):
                try:
                    return record["pid"], os.getpgid(int(record["pid"]))
                except ProcessLookupError:
                    return None
        return None

    def elsewhere(self) -> dict | None:
        """The lock holder's record when the run folder is trained by a process not launched here
        (a terminal, another notebook's kernel, a sweep); None when free or launched here."""
        holder = self.run.holder()
        if not holder:
            return None
        if self.popen is not None and self.popen.poll() is None:
            mine = self.popen.pid
        else:
            launch = self._launch_info()
            mine = launch.get("pgid") if same_process(launch.get("pid"), launch.get("process_start")) else None
        try:
            launched_here = mine is not None and holder.get("host") == socket.gethostname() and \
                os.getpgid(int(holder["pid"])) == mine
        except (ProcessLookupError, KeyError, TypeError, ValueError):
            launched_here = False
        return None if launched_here else holder

    @property
    def pid(self) -> int | None:
        found = self._identified()
        return found[0] if found else None

    @property
    def pgid(self) -> int | None:
        """The process group Stop signals (the launched session, torchrun's ranks included)."""
        found = self._identified()
        return found[1] if found else None

    def alive(self) -> bool:
        return self._identified() is not None

    def stop(self, sig: int = signal.SIGTERM) -> bool:
        """Signal the run's process group (the trainer checkpoints, then exits); False if no live
        process is proven to be this run's."""
        found = self._identified()
        if found is None:
            return False
        try:
            os.killpg(found[1], sig)
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout: float | None = None) -> int | None:
        if self.popen is not None:
            return self.popen.wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.alive():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.run_dir}: still running after {timeout} s")
            time.sleep(0.1)
        return None


# --- the plot --------------------------------------------------------------------------------------


def plot_losses(ax, history: History, smoothing: float = 0.0) -> None:
    """The total loss and every term, smoothed by an EMA of weight ``smoothing`` (the raw total
    stays as a faint line); the legend sits outside the axes, where it hides no curve."""
    s = history.steps
    if smoothing > 0 and s:
        ax.plot(s, history.loss, color="black", lw=1, alpha=0.25)
    ax.plot(s, smooth_curve(history.loss, smoothing) if smoothing > 0 else history.loss, color="black", lw=2, label="total")
    starts = history.term_starts()
    for term, values in history.terms.items():
        if any(v == v for v in values):  # topo: only every topo_every steps
            line, = ax.plot(s, smooth_curve(values, smoothing) if smoothing > 0 else values, lw=1, marker=".", ms=3, label=term)
            if term in starts:  # a term that starts late (loss.<term>_start): where it comes in
                ax.axvline(starts[term], color=line.get_color(), ls=":", lw=1, label=f"{term} starts")
    ax.set_title(f"loss and terms (EMA {smoothing:.2f})" if smoothing > 0 else "loss and terms")
    if ax.lines:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def step_limits(history: History) -> tuple[float, float]:
    """One step range for every panel: a single validation point sits at its step, not on an axis
    of its own spanning a hundredth of a step."""
    last = max(history.steps[-1:] + history.val_steps[-1:] + [1])
    return 0.0, last * 1.02


def history_figure(history: History, title: str = "", smoothing: float = 0.0) -> Figure:
    """Losses, LR, throughput, data-wait share and validation scores against the step."""
    fig = Figure(figsize=(12, 6.5), dpi=72, layout="constrained")
    (ax_loss, ax_lr, ax_speed), (ax_wait, ax_val, ax_info) = fig.subplots(2, 3)
    if title:
        fig.suptitle(title)
    s = history.steps
    plot_losses(ax_loss, history, smoothing)
    ax_lr.plot(s, history.lr, color="tab:purple")
    ax_lr.set_title("learning rate")
    ax_speed.plot(s, history.samples_per_s, color="tab:green")
    ax_speed.set_title("samples / s")
    ax_wait.plot(s, history.data_wait_share, color="tab:red")
    ax_wait.set_ylim(0, 1.05)
    ax_wait.set_title("data-wait share of step time")
    for part in VAL_PARTS:
        ax_val.plot(history.val_steps, history.val[part], marker="o", lw=2 if part == "score" else 1, label=part)
    ax_val.set_ylim(0, 1.05)
    ax_val.set_title("validation")
    if ax_val.lines:
        ax_val.legend(fontsize=7, loc="best")
    if history.early_stop is not None:  # where early stopping ended the run
        for ax in (ax_loss, ax_val):
            ax.axvline(history.early_stop, color="tab:red", ls="--", lw=1.5, label=f"early stop (step {history.early_stop})")
        ax_val.legend(fontsize=7, loc="best")
    for ax in (ax_loss, ax_lr, ax_speed, ax_wait, ax_val):
        ax.set_xlabel("step")
        ax.set_xlim(step_limits(history))
        ax.grid(alpha=0.3)
    ax_info.axis("off")
    ax_info.text(0.0, 1.0, f"steps logged: {len(s)}\nlast step: {history.last_step}\n"
                 f"validations: {len(history.val_steps)}"
                 + (f"\nearly stop at step {history.early_stop}" if history.early_stop is not None else ""),
                 va="top", family="monospace")
    return fig


# --- the widget --------------------------------------------------------------------------------------


LAST_RUN = ".last_run.json"  # in runs_dir: the run a monitor attached to last, offered after a kernel restart


def last_run_name(runs_dir: str | Path) -> str | None:
    """The run a monitor over ``runs_dir`` attached to last, if its folder is still there."""
    try:
        name = json.loads((Path(runs_dir) / LAST_RUN).read_text(encoding="utf-8"))["run_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and Path(name).name == name and (Path(runs_dir) / name).is_dir() else None


def remember_run(runs_dir: str | Path, run_name: str) -> None:
    if last_run_name(runs_dir) != run_name:
        atomic_write_text(Path(runs_dir) / LAST_RUN, json.dumps({"run_name": run_name}))


class Watcher:
    """Calls a form's ``refresh`` from a background thread, so the kernel stays free while a run
    or a sweep goes on; a refresh that fails shows in the form's message and the watching goes on."""

    def __init__(self, refresh: Callable[[], object], message: w.HTML, name: str):
        self.refresh, self.message, self.name = refresh, message, name
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, interval: float) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._halt.clear()

        def loop() -> None:
            while not self._halt.wait(interval):
                try:
                    self.refresh()
                except Exception as exc:  # keep watching; show why a refresh failed
                    self.message.value = f"refresh failed: {html.escape(repr(exc))}"

        self._thread = threading.Thread(target=loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


class RunMonitor:
    """Config, run name, devices, Start / Stop / Resume, a progress bar with ETA and the live plot.

    ``refresh()`` reads what is new in the run directory and redraws; ``watch()`` does that from a
    background thread every ``interval`` seconds, so the kernel stays free. Constructing it on an
    existing run directory reattaches (reads everything logged, and the process if it is alive);
    without a run name it reattaches to the run it attached to last (after a kernel restart).
    """

    def __init__(self, config: str | Path, runs_dir: str | Path, run_name: str | None = None, devices: int = 1,
                 overrides: Sequence[str] = (), interval: float = 2.0, cwd: str | Path | None = None,
                 default_run_name: str = "run", offered: Sequence[str | Path] = ()):
        self.runs_dir, self.interval, self.cwd = Path(runs_dir), interval, cwd
        run_name = run_name or last_run_name(runs_dir) or default_run_name
        # the configs offered (e.g. the demo's, and the one notebook 03 applied); any other path can be typed
        self.config = w.Combobox(value=str(config), options=list(dict.fromkeys(str(c) for c in [config, *offered])),
                                 ensure_option=False, description="config", layout=w.Layout(width="520px"))
        self.budget = w.BoundedFloatText(value=0.0, min=0.0, max=1e6, description="budget (h)",
                                         tooltip="training.time_budget_hours: the wall time the whole run may take "
                                                 "(0: none); the trainer re-plans its epochs to end inside it")
        self.config_note = w.HTML()
        self.run_name = w.Text(value=run_name, description="run name")
        self.devices = w.BoundedIntText(value=devices, min=1, max=64, description="GPUs",
                                        tooltip="1: one process; N > 1: torchrun with N processes")
        self.overrides = w.Text(value=" ".join(overrides), description="overrides",
                                placeholder="section.key=value ...", layout=w.Layout(width="520px"))
        self.start_button = w.Button(description="Start", button_style="success", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop")
        self.resume_button = w.Button(description="Resume", button_style="info", icon="repeat")
        self.progress = w.IntProgress(value=0, min=0, max=1, description="progress")
        self.status = w.HTML()
        self.message = w.HTML()
        self.plot = w.Image(format="png")
        self.smoothing = w.FloatSlider(value=0.6, min=0.0, max=0.99, step=0.01, description="smoothing",
                                       tooltip="EMA weight of the loss curves (0: raw)", readout_format=".2f")
        self.smoothing.observe(lambda _c: self.redraw(), names="value")
        self.forecast = ForecastPanel()  # the plan's forecast against the run's progress (lab.forecast)
        self.start_button.on_click(lambda _b: self.start(resume=False))
        self.stop_button.on_click(lambda _b: self.stop())
        self.resume_button.on_click(lambda _b: self.start(resume=True))
        self.run_name.observe(self._on_run_name, names="value")
        self.config.observe(lambda _c: self._on_config(), names="value")
        self._on_config()
        self.widget = notebook_form([
            w.HBox([self.config, self.devices]), self.config_note, w.HBox([self.run_name, self.budget]),
            self.overrides,
            w.HBox([self.start_button, self.stop_button, self.resume_button]),
            w.HBox([self.progress, self.status]), self.message, self.smoothing, self.plot, self.forecast.widget,
        ])
        self._lock = threading.RLock()
        self._watcher = Watcher(self.refresh, self.message, f"watch {self.run_dir.name}")
        self.followers: list[Callable[[Path], None]] = []  # e.g. lab.live_panel.LivePanel.follow: run dir, each refresh
        self.attach()

    # -- state --
    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.run_name.value

    @property
    def has_checkpoint(self) -> bool:
        """Whether the run named now can be resumed."""
        return RunDir(self.run_dir).last.exists()

    def argv(self, resume: bool = False) -> list[str]:
        """The command of Start (the config field's config) or Resume (the run's own config.yaml),
        with the overrides box and, where it differs from that config's, the budget field."""
        own = RunDir(self.run_dir).config if resume else self.config.value
        try:
            budget = budget_override(self.budget.value, config_budget(own))
        except VLabError:  # the trainer says what is wrong with the config itself
            budget = []
        return train_argv(self.config.value, self.run_dir, self.devices.value, resume,
                          [*self.overrides.value.split(), *budget])

    def _on_config(self) -> None:
        """A config chosen: the budget field shows its budget, the note says which config Start starts."""
        path = self.config.value
        try:
            budget = config_budget(path)
        except VLabError as exc:
            self.config_note.value = f"<span style='color:#c00'>{html.escape(str(exc))}</span>"
            return
        self.budget.value = budget or 0.0
        others = [o for o in self.config.options if o != path and Path(o).is_file()]
        self.config_note.value = (f"Start starts <code>{html.escape(path)}</code>"
                                  + (f" (also offered: {', '.join(f'<code>{html.escape(o)}</code>' for o in others)})"
                                     if others else ""))

    def _on_run_name(self, change: dict) -> None:
        """A run name is a folder inside ``runs_dir``: anything else is refused and reverted."""
        name = change["new"]
        if not name or name in (".", "..") or Path(name).name != name:
            self.message.value = (f"<span style='color:#b00'>run name {html.escape(repr(name))}: "
                                  f"must be a plain folder name inside {html.escape(str(self.runs_dir))}</span>")
            self.run_name.value = change["old"]
            return
        self.attach()

    def attach(self) -> None:
        """Point at the run directory named now: forget what was read, read it all again."""
        with self._lock:
            self.process = RunProcess(self.run_dir)
            self.reader = MetricsReader(RunDir(self.run_dir).metrics)
            self.history = History()
            self._drawn, self._state = None, ""
            if self.run_dir.is_dir():
                remember_run(self.runs_dir, self.run_name.value)
        self.refresh()

    def start(self, resume: bool = False) -> None:
        with self._lock:
            holder = self.process.elsewhere()
            if holder:
                self.message.value = f"training elsewhere ({html.escape(describe_holder(holder))}): attached to it"
                self.attach()
                return
            if self.process.alive():
                self.message.value = f"already running (pid {self.process.pid}): stop it first"
                return
            if not resume and self.has_checkpoint:
                self.message.value = "this run has a checkpoint: press Resume, or choose another run name"
                return
            argv = self.argv(resume)
            self.process.start(argv, cwd=self.cwd)
            remember_run(self.runs_dir, self.run_name.value)
            what = f"started config {html.escape(self.config.value)}<br>"
            if resume:
                changes = argv[argv.index("--no-progress") + 1:]  # the overrides box and the budget field
                what = (f"resuming with the run's own config {html.escape(str(RunDir(self.run_dir).config))}, "
                        + (f"overrides: {html.escape(' '.join(changes))}" if changes else "no overrides") + "<br>")
            self.message.value = f"{what}<code>{html.escape(' '.join(argv))}</code>"
        self.refresh()

    def stop(self) -> None:
        with self._lock:
            sent = self.process.stop()
            self.message.value = "SIGTERM sent: the run checkpoints, then exits" if sent else "nothing is running"

    # -- display --
    def refresh(self) -> dict:
        """Read new metrics and status, update the progress bar, status line and plot; returns status."""
        with self._lock:
            new = self.reader.read()
            if self.reader.reset:
                self.history = History()
            self.history.add(new)
            status = read_status(self.run_dir)
            alive = self.process.alive()
            holder = self.process.elsewhere()
            state = status.get("state", RunState.NOT_STARTED)
            message = status.get("message", "")
            if holder:  # another process trains in this folder: show it, offer no Start
                state, message = "training elsewhere", describe_holder(holder)
            if not alive and state in (RunState.NOT_STARTED, *ALIVE_STATES):
                refused = launch_error(self.run_dir)  # e.g. a bad override: the CLI refused before training
                if refused and state == RunState.NOT_STARTED:
                    state, message = "failed to start", refused
                elif state != RunState.NOT_STARTED:
                    state = process_gone(state)
                    message = refused or message
            total, step = status.get("total_steps") or 0, max(status.get("step") or 0, self.history.last_step)
            self.progress.max = max(total, 1)
            self.progress.value = min(step, self.progress.max)
            eta = eta_seconds({"step": step, "total_steps": total}, self.history) if alive or state == RunState.STOPPED else None
            parts = [f"<b>{html.escape(state)}</b>", f"step {step} / {total or '?'}"]
            if eta is not None:  # a stopped run: what resuming it would still take
                parts.append(f"ETA {format_duration(eta)}" if alive else f"{format_duration(eta)} left when resumed")
            if message:
                text = html.escape(message.replace("resume with --resume", "press Resume"))
                failed = state.startswith((RunState.FAILED, *(process_gone(s) for s in ALIVE_STATES)))
                parts.append(f"<span style='color:#c00'>{text}</span>" if failed else text)
            self.status.value = " · ".join(parts)
            self.start_button.disabled = alive or bool(holder)
            self.resume_button.disabled = alive or bool(holder)
            self.stop_button.disabled = not alive
            self._state = state
            if self._drawing_key() != self._drawn:  # new records, or a new state for the title
                self.redraw()
            for follow in self.followers:
                follow(self.run_dir)
            self.forecast.show(self.history, time.time() if alive else None)
            return {**status, "state_shown": state, "step_shown": step, "alive": alive, "eta_s": eta}

    def _drawing_key(self) -> tuple[int, str]:
        """What the plot shows: the records drawn and the state in its title (a run finishes, or
        its process goes, after its last record: the title must follow)."""
        return len(self.history.steps) + len(self.history.val_steps), self._state

    @property
    def plot_title(self) -> str:
        return f"{self.run_name.value}: {self._state}"

    def redraw(self) -> None:
        """Draw the plot from the history read so far (a new smoothing needs no new records)."""
        with self._lock:
            self._drawn = self._drawing_key()
            self.plot.value = figure_png(history_figure(self.history, self.plot_title, self.smoothing.value))

    def watch(self, interval: float | None = None) -> None:
        """Refresh from a background thread until ``unwatch()``."""
        self._watcher.start(interval or self.interval)

    def unwatch(self) -> None:
        self._watcher.stop()

    def wait_for(self, predicate, timeout: float = 120.0, poll: float = 0.1) -> dict:
        """Refresh until ``predicate(status_dict)`` is true; the status dict of ``refresh()``."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.refresh()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.run_dir}: condition not met within {timeout} s; last status {status}")
            time.sleep(poll)

    def save_plot(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.plot.value)
        return path

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the run's output: the console of a run launched from here (its command
        line, stdout and stderr), else the trainer's own train.log (a run started elsewhere)."""
        run = RunDir(self.run_dir)
        for path in (run.console, run.train_log):
            if path.is_file():
                text = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-lines:]
                return f"({path})\n" + "".join(text)
        return f"(no output yet: {self.run_dir} has no run)"
