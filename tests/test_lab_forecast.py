"""Notebook 04's forecast panel: epochs against their forecasts, the warning, the plot, the monitor."""

import io

import pytest
from PIL import Image

from vesuvius_lab.lab.forecast import ForecastPanel, epoch_checks, forecast_figure, warnings
from vesuvius_lab.lab.runs import History

START = 1_000_000.0


def plan(step, total, reason, forecast_epoch_s, last_s, epochs, t, end, deadline=START + 600):
    return {"kind": "plan", "step": step, "total_steps": total, "reason": reason, "epochs": epochs,
            "forecast_epoch_s": forecast_epoch_s, "forecast_last_epoch_s": last_s, "time": t, "start": START,
            "forecast_end": end, "forecast_band_s": 12.0, "deadline": deadline, "aim": deadline - 18,
            "budget_s": 600.0}


def records():
    plans = [plan(6, 400, "first measurements", 100.0, 140.0, 3, START + 40, START + 560),
             plan(100, 380, "validation slower (60.0 s, planned 40.0 s)", 120.0, 150.0, 3, START + 150, START + 580),
             plan(200, 360, "steps slower (0.600 s, planned 0.500 s)", 130.0, 95.0, 3, START + 290, START + 582)]
    epochs = [{"kind": "epoch", "step": 100, "epoch": 0, "epoch_s": 104.0},   # 4 % over 100 s
              {"kind": "epoch", "step": 200, "epoch": 1, "epoch_s": 140.0},   # 17 % over 120 s
              {"kind": "epoch", "step": 360, "epoch": 2, "epoch_s": 80.0}]    # 16 % under 95 s (the last)
    train = [{"kind": "train", "step": s, "time": START + 30 + s * 1.4} for s in range(1, 361)]
    return plans, epochs, train


def test_each_epoch_is_held_against_the_plan_in_force_when_it_began():
    plans, epochs, _ = records()
    checks = epoch_checks(plans, epochs)
    assert [(c.epoch, c.forecast_s, c.plan_step) for c in checks] == [(0, 100.0, 6), (1, 120.0, 100), (2, 95.0, 200)]
    assert [round(c.deviation, 2) for c in checks] == [0.04, 0.17, -0.16]
    assert warnings(plans, epochs) == ["epoch 1 took 2:20, 17% more than its forecast 2:00",
                                       "epoch 2 took 1:20, 16% less than its forecast 1:35"]


def test_the_plot_draws_actual_forecasts_band_re_plans_and_deadline():
    plans, epochs, train = records()
    fig = forecast_figure(plans, epochs, [r["time"] for r in train], [r["step"] for r in train], now=START + 500)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "actual" and labels[1].startswith("forecast: ends ") and labels[1].endswith("± 0:12")
    assert "re-plans (3)" in labels and any(x.startswith("deadline ") and "(10:00 budget)" in x for x in labels)
    actual = ax.lines[0]
    assert list(actual.get_ydata())[-1] == 360 and actual.get_xdata()[-1] == pytest.approx((30 + 360 * 1.4) / 60)
    assert len(ax.patches) == 1  # the band around the latest forecast end
    empty = forecast_figure([], [], [], [])
    assert "no forecast yet" in empty.axes[0].texts[0].get_text()


def test_the_panel_shows_the_warnings_and_redraws_only_on_news():
    plans, epochs, train = records()
    history, panel = History(), ForecastPanel()
    assert panel.show(history) == [] and panel.plot.layout.display == "none"
    history.add(train[:150] + plans[:2] + epochs[:1])
    assert panel.show(history) == []
    first = panel.plot.value
    assert Image.open(io.BytesIO(first)).size[0] > 400 and panel.plot.layout.display is None
    panel.plot.value = b""
    panel.show(history)
    assert panel.plot.value == b""  # nothing new: not redrawn
    history.add(train[150:] + plans[2:] + epochs[1:])
    shown = panel.show(history)
    assert len(shown) == 2 and "epoch 1 took 2:20" in panel.warning.value and panel.plot.value
