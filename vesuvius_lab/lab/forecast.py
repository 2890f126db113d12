"""Forecast against actual, live (notebook 04): the plan's end time with its band beside the run's
progress, each re-plan marked, and a warning for each epoch that ran more than 10 % off its forecast.

Everything comes from the run's ``plan`` records (``training/budget.py``: written at the first
measurements and at each re-plan, and at each epoch end of a run without a budget), its ``epoch``
records and the wall time of its ``train`` records, gathered by ``runs.History``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

import ipywidgets as w
from matplotlib.figure import Figure

from vesuvius_lab.lab.plots import figure_png
from vesuvius_lab.timefmt import format_clock, format_duration

DEVIATION = 0.10  # an epoch this far off its forecast is worth a look


@dataclass
class EpochCheck:
    epoch: int
    actual_s: float
    forecast_s: float
    plan_step: int  # the plan in force when the epoch began

    @property
    def deviation(self) -> float:
        return (self.actual_s - self.forecast_s) / self.forecast_s if self.forecast_s > 0 else math.nan


def plan_at(plans: Sequence[dict], step: int) -> dict | None:
    """The plan in force at ``step`` steps done: the latest one made by then."""
    made = [p for p in plans if p["step"] <= step]
    return made[-1] if made else None


def epoch_checks(plans: Sequence[dict], epochs: Sequence[dict]) -> list[EpochCheck]:
    """Each finished epoch against the forecast of the plan in force when it began (epoch 0: the
    first plan, made a few steps into it)."""
    out, begun = [], 0
    for e in epochs:
        plan = plan_at(plans, begun) or (plans[0] if plans and plans[0]["step"] < e["step"] else None)
        if plan is not None:
            last = e["epoch"] == plan["epochs"] - 1
            forecast = plan["forecast_last_epoch_s"] if last else plan["forecast_epoch_s"]
            out.append(EpochCheck(e["epoch"], e["epoch_s"], forecast, plan["step"]))
        begun = e["step"]
    return out


def warnings(plans: Sequence[dict], epochs: Sequence[dict]) -> list[str]:
    """One line per epoch that ran more than 10 % longer or shorter than its forecast."""
    return [f"epoch {c.epoch} took {format_duration(c.actual_s)}, {abs(c.deviation):.0%} "
            f"{'more' if c.deviation > 0 else 'less'} than its forecast {format_duration(c.forecast_s)}"
            for c in epoch_checks(plans, epochs) if abs(c.deviation) > DEVIATION]


def forecast_figure(plans: Sequence[dict], epochs: Sequence[dict], times: Sequence[float], steps: Sequence[int],
                    now: float | None = None) -> Figure:
    """Steps done against minutes since the start: the actual progress, every plan's forecast (the
    latest with the band of its end), the re-plans, the deadline and the aim."""
    fig = Figure(figsize=(12, 3.4), dpi=72, layout="constrained")
    ax = fig.subplots()
    if not plans:
        ax.text(0.5, 0.5, "no forecast yet: the first plan comes after the first measured steps",
                ha="center", va="center", transform=ax.transAxes)
        ax.axis("off")
        return fig
    start = plans[-1]["start"]

    def minutes(t: float) -> float:
        return (t - start) / 60

    done = [(minutes(t), s) for t, s in zip(times, steps) if t is not None]
    if done:
        ax.plot(*zip(*done), color="black", lw=2, label="actual")
    for p in plans[:-1]:
        ax.plot([minutes(p["time"]), minutes(p["forecast_end"])], [p["step"], p["total_steps"]],
                color="tab:blue", lw=1, ls=":", alpha=0.5)
    latest = plans[-1]
    end, band = latest["forecast_end"], latest["forecast_band_s"]
    ax.plot([minutes(latest["time"]), minutes(end)], [latest["step"], latest["total_steps"]], color="tab:blue",
            lw=1.5, ls="--", label=f"forecast: ends {format_clock(end)} ± {format_duration(band)}")
    ax.axvspan(minutes(end - band), minutes(end + band), color="tab:blue", alpha=0.15)
    replans = [p for p in plans if p["reason"] != "forecast"]
    if replans:
        ax.scatter([minutes(p["time"]) for p in replans], [p["step"] for p in replans], marker="v", color="tab:orange",
                   zorder=3, label=f"re-plans ({len(replans)})")
    if latest.get("deadline"):
        ax.axvline(minutes(latest["deadline"]), color="tab:red", lw=1.5,
                   label=f"deadline {format_clock(latest['deadline'])} ({format_duration(latest['budget_s'])} budget)")
        ax.axvline(minutes(latest["aim"]), color="tab:red", lw=1, ls=":", label="aim")
    if now is not None:
        ax.axvline(minutes(now), color="grey", lw=0.8)
    ax.set(xlabel="minutes since the start", ylabel="steps done", title="forecast against actual")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return fig


class ForecastPanel:
    """The forecast plot and the epoch warnings under the run monitor's plot; ``show`` redraws it
    from a ``runs.History`` when something new arrived."""

    def __init__(self):
        self.warning = w.HTML()
        self.plot = w.Image(format="png", layout=w.Layout(display="none"))  # shown once there is a plan
        self.widget = w.VBox([self.warning, self.plot])
        self._drawn: tuple | None = None

    def show(self, history, now: float | None = None) -> list[str]:
        """Redraw from ``history`` (its plans, epochs and step times); returns the warnings shown."""
        found = warnings(history.plans, history.epochs)
        self.warning.value = "".join(f"<div style='color:#b60'>⚠ {html.escape(x)}</div>" for x in found)
        key = (len(history.plans), len(history.epochs), len(history.times))
        if history.plans and key != self._drawn:
            self._drawn = key
            fig = forecast_figure(history.plans, history.epochs, history.times, history.steps, now)
            self.plot.value = figure_png(fig)
            self.plot.layout.display = None
        return found
