"""Notebook 04's live prediction panel, the napari "Live run" dock widget following a real run
under Xvfb, and notebook 06's views (table, differing keys, curves, notebook 05 one click away)."""

from __future__ import annotations

import shutil
import time

import nbformat
import numpy as np
import pytest

from conftest_gui import assert_rendered, run_notebook
from lab_runs_helpers import write_tiny_config
from vesuvius_lab.compare import summarize_runs
from vesuvius_lab.lab import compare, runs
from vesuvius_lab.lab.evaluation import ERROR_COLORS, FN, FP, TP, error_labels
from vesuvius_lab.lab.live_panel import LivePanel, error_colormap
from vesuvius_lab.lab.plots import smooth_curve
from vesuvius_lab.training import live_volume


def _png(data: bytes, path) -> np.ndarray:
    path.write_bytes(data)
    return assert_rendered(path)


def test_error_colours_are_notebook_05s():
    cmap = error_colormap()
    assert cmap(0)[3] == 0.0  # nothing drawn where there is no error
    assert [cmap(v)[:3] for v in (TP, FP, FN)] == [(1.0, 1.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 1.0)]
    assert (ERROR_COLORS[TP], ERROR_COLORS[FP], ERROR_COLORS[FN]) == ("white", "red", "cyan")


@pytest.mark.slow
def test_panel_reattaches_to_a_finished_run_and_goes_back_through_the_epochs(finished_runs, tmp_path):
    panel = LivePanel(finished_runs / "a")
    index = live_volume.read_index(finished_runs / "a")
    assert [label for label, _ in panel.slider.options] == ["epoch 0 · step 4", "epoch 1 · step 8"]
    assert panel.slider.value == 8 and panel.follow_latest.value
    latest = index["entries"][-1]["scores"]
    assert f"score {latest['score']:.4f}" in panel.scores.value and f"VOI {latest['voi_score']:.4f}" in panel.scores.value
    assert [s.value for s in panel.positions] == [24, 24, 24] and panel.positions[0].max == 47
    shot8 = _png(panel.image.value, tmp_path / "step8.png")
    panel.slider.value = 4  # the first epoch, chosen by hand: following stops
    assert not panel.follow_latest.value and "epoch 0 · step 4" in panel.scores.value
    shot4 = _png(panel.image.value, tmp_path / "step4.png")
    assert not np.array_equal(shot4, shot8)
    panel.positions[2].value = 10
    assert not np.array_equal(_png(panel.image.value, tmp_path / "x10.png"), shot4)
    panel.refresh()  # nothing new: the hand-chosen epoch stays
    assert panel.slider.value == 4
    panel.follow(finished_runs / "b")  # the monitor's run name changed
    assert panel.run_dir == finished_runs / "b" and panel.slider.value in (4, 8)
    empty = LivePanel(tmp_path / "nothing")
    assert empty.slider.value == -1 and "no live prediction" in empty.scores.value and empty.image.value == b""


@pytest.mark.gui
@pytest.mark.slow
def test_panel_and_napari_dock_follow_a_running_run(viewer, tiny_root, tmp_path, artifacts):
    """A run started from notebook 04's launcher; the panel (a follower of the monitor) and the
    napari dock widget (its Qt timer) both show each new validation as it lands."""
    from qtpy.QtWidgets import QApplication

    from vesuvius_lab.lab.live_dock import LiveRunWidget

    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=3, epochs=40)
    monitor = runs.RunMonitor(config, tmp_path / "runs", run_name="follow", interval=0.3)
    panel = LivePanel(monitor.run_dir)
    monitor.followers.append(panel.follow)
    dock = LiveRunWidget(viewer, monitor.run_dir, poll_ms=200)
    viewer.window.add_dock_widget(dock, name="Live run")
    monitor.start_button.click()
    shots, panels, layers = [], [], []
    seen = (0, 0)  # the dock's reloads and the panel's validations at the last snapshot
    try:
        for wanted in (1, 2):  # each snapshot after a validation newer than the last one's
            deadline = time.monotonic() + 240
            while dock.reloads <= seen[0] or len(panel.entries) <= seen[1]:
                QApplication.processEvents()  # the dock's timer fires in the Qt loop
                monitor.refresh()
                assert time.monotonic() < deadline, monitor.log_tail(30)
                time.sleep(0.05)
            seen = (dock.reloads, len(panel.entries))
            viewer.reset_view()
            shot = artifacts / f"live-dock-{wanted}.png"
            viewer.screenshot(path=str(shot), canvas_only=False)
            shots.append(assert_rendered(shot))
            panels.append(_png(panel.image.value, artifacts / f"live-panel-{wanted}.png"))
            layers.append(viewer.layers["probability"].data.copy())
            if wanted == 1:  # the notebook reopened on the running run: the new panel shows what is kept
                again = LivePanel(monitor.run_dir)
                assert again.entries and again.slider.value == again.entries[-1]["step"] and again.image.value
    finally:
        monitor.stop()
        monitor.process.wait(timeout=120)
    assert [layer.name for layer in viewer.layers][-1].startswith("errors")
    assert dock.reloads >= 2 and not np.array_equal(layers[0], layers[1])  # the layer data was replaced
    errors = viewer.layers[-1].data
    result = live_volume.load_result(monitor.run_dir, next(e for e in panel.entries if e["step"] == dock.shown))
    assert np.array_equal(errors, error_labels(result.mask, result.label))
    assert "epoch" in dock.status.value and "score" in dock.status.value
    assert not np.array_equal(panels[0], panels[1]) and not np.array_equal(shots[0], shots[1])


@pytest.mark.slow
def test_notebook_06_views_and_notebook_05_one_click_away(finished_runs, tmp_path):
    summaries = summarize_runs(finished_runs)
    table = compare.runs_table(summaries, tmp_path / "evaluations", notebook_dir=tmp_path)
    assert list(table.index) == ["a", "b"] and table.loc["a", "state"] == "finished"
    assert table.loc["b", "notebook 05"].startswith("<a href='evaluations/05_evaluate-b.ipynb'")
    nb = nbformat.read(tmp_path / "evaluations" / "05_evaluate-b.ipynb", as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]  # papermill's
    assert injected[0].source.endswith(f"checkpoint_path = \"{finished_runs / 'b' / 'checkpoints' / 'best.pt'}\"\n")
    assert compare.paste_line(summaries[1]) in table.loc["b", "notebook 05"].replace("&#x27;", "'")
    differ = compare.differing_table(summaries)
    assert list(differ.index) == ["loss.cldice", "optim.lr"] and differ.loc["optim.lr"].tolist() == ["0.01", "0.02"]
    view = compare.CompareView(summaries, select=["b"])
    one = _png(view.plot.value, tmp_path / "one.png")
    view.runs.value = ("a", "b")
    assert not np.array_equal(one, _png(view.plot.value, tmp_path / "two.png"))
    assert smooth_curve([1.0, float("nan"), 3.0], 0.5)[::2] == pytest.approx([1.0, 2.0 + 1 / 3])
    assert compare.load_runs(tmp_path / "no-runs") == [] and "no runs yet" in compare.show_table([]).data


@pytest.mark.gui
@pytest.mark.slow
def test_the_linked_notebook_05_evaluates_the_best_checkpoint(finished_runs, x_display, tmp_path):
    shutil.copytree(finished_runs / "a", tmp_path / "runs" / "a")
    (summary,) = summarize_runs(tmp_path / "runs")
    path = compare.evaluation_notebook(summary, tmp_path / "evaluations")
    nb = run_notebook(path, timeout=300)  # as it is written: only the checkpoint was set
    tables = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "text/html" in o.get("data", {})]
    assert any("surface_dice" in t and "mean" in t for t in tables)


@pytest.mark.gui
@pytest.mark.slow
def test_open_in_napari_and_the_plugin_dock_show_a_finished_run(finished_runs, viewer, artifacts):
    from npe2 import PluginManager

    from vesuvius_lab.lab.live_dock import LiveRunWidget

    panel = LivePanel(finished_runs / "a")
    opened = panel.open_napari()  # the notebook's button: a viewer with the dock following the run
    try:
        assert panel.dock.shown == 8 and panel.dock.reloads == 1 and "epoch 1 · step 8" in opened.title
        assert [layer.name for layer in opened.layers][1:] == ["probability", "ground truth",
                                                                "errors (TP white, FP red, FN cyan)"]
        panel.dock.validation.value = 4  # an earlier validation, chosen in the dock: following stops
        assert panel.dock.shown == 4 and not panel.dock.follow.value
        panel.dock.poll()
        assert panel.dock.shown == 4
    finally:
        opened.close()
    PluginManager.instance().discover()
    _dock, widget = viewer.window.add_plugin_dock_widget("vesuvius-lab", "Live run")
    assert isinstance(widget, LiveRunWidget) and widget.status.value == "choose a run folder"
    widget.run_folder.value = finished_runs / "b"
    assert widget.shown == 8 and widget.status.value.startswith("epoch 1 · step 8: score ")
    viewer.reset_view()
    viewer.screenshot(path=str(artifacts / "live-dock-finished.png"), canvas_only=True)
    assert_rendered(artifacts / "live-dock-finished.png")
