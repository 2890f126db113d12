"""Notebook 05's evaluation on a checkpoint trained a few steps here: scores, table, error colours."""

import subprocess
import sys

import numpy as np
import pytest

from lab_runs_helpers import write_tiny_config
from vesuvius_lab.evaluate import VolumeResult, evaluate_checkpoint
from vesuvius_lab.lab import evaluation


def test_error_labels():
    mask = np.array([1, 1, 0, 0, 1], np.uint8)
    label = np.array([1, 0, 1, 0, 2], np.uint8)
    assert evaluation.error_labels(mask, label).tolist() == [1, 2, 3, 0, 0]


@pytest.mark.slow
def test_evaluate_a_tiny_checkpoint(tiny_root, tmp_path):
    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=4)
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "vesuvius_lab", "train", "--config", str(config), "--run-dir", str(run),
                    "--no-progress"], check=True, capture_output=True, timeout=300)
    results = evaluate_checkpoint(run / "checkpoints" / "last.pt", max_volumes=1, overrides=["val.overlap=0.0"])
    assert len(results) == 1 and results[0].probability.shape == results[0].label.shape
    assert 0.0 <= results[0].scores["score"] <= 1.0
    table = evaluation.score_table(results)
    assert list(table.index) == [results[0].id, "mean"]
    assert {"score", "topo", "surface_dice", "voi_score"} <= set(table.columns)
    assert table.loc["mean", "score"] == pytest.approx(results[0].scores["score"])


def _holed_sheet_result():
    from vesuvius_lab.evaluate import VolumeResult

    label = np.zeros((24, 40, 40), np.uint8)
    label[6:9] = 1  # a sheet three voxels thick, below the metric's octant face at z = 12
    label[:, :, :2] = 2
    prob = np.where(label == 1, 0.9, 0.05).astype(np.float32)
    prob[6:9, 8:12, 8:12] = 0.1  # a hole through it, inside one of the metric's octants
    image = np.where(label == 1, 200, 30).astype(np.uint8)
    mask = (prob > 0.5).astype(np.uint8)
    return VolumeResult("v1", image, label, prob, mask, {})


def test_topology_table_shows_the_tunnel_of_a_holed_sheet():
    table = evaluation.topology_table([_holed_sheet_result()])
    row = table.loc["v1"]
    assert (row["b0 pred"], row["b1 pred"], row["b2 pred"]) == (1, 1, 0)
    assert (row["b0 label"], row["b1 label"], row["b2 label"]) == (1, 0, 0)
    assert row["pred 1"] >= 1 and row["label 1"] == 0 and row["F1 1"] == pytest.approx(0.5 / (row["pred 1"] + 0.5))
    assert np.isnan(row["F1 2"])


@pytest.mark.gui
def test_repair_view_colours_added_voxels_green(viewer, artifacts):
    from conftest_gui import assert_rendered

    result = _holed_sheet_result()
    before = evaluation.PostprocessConfig()
    after = evaluation.PostprocessConfig(repair=["fill_sheet_holes", "plug_pinholes"], hole_window=24)
    (comparison,) = evaluation.compare_repair([result], before, after)
    table = evaluation.repair_table([comparison])
    assert table.loc["v1", "topo change"] > 0 and table.loc["v1", "score change"] > 0
    assert table.loc["v1", "voxels added"] == 48 and table.loc["v1", "voxels removed"] == 0  # the hole, exactly
    evaluation.show_repair(viewer, result, comparison)
    assert [layer.name for layer in viewer.layers] == ["v1 image", "ground truth", "prediction (before repair)",
                                                        "repair (added green, removed magenta)"]
    assert viewer.layers[-1].data[7, 10, 10] == evaluation.ADDED and viewer.layers[-1].data[7, 30, 30] == 0
    viewer.dims.set_point(0, 7)
    viewer.reset_view()
    shot = artifacts / "evaluate-repair.png"
    viewer.screenshot(path=str(shot), canvas_only=True)
    rgb = assert_rendered(shot, min_std=10.0, min_colours=3)
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    assert ((g > 180) & (r < 100) & (b < 100)).mean() > 0.002  # the green plug


def test_repair_settings_come_from_the_checkpoint_with_overrides(tmp_path):
    import torch

    from vesuvius_lab.config import load_config

    config = load_config(None, ["postprocess.threshold=0.4", "postprocess.repair=[plug_pinholes]"])
    torch.save({"config": config.to_dict()}, tmp_path / "c.pt")
    before, after = evaluation.repair_settings(tmp_path / "c.pt", ["postprocess.hole_window=24"])
    assert after.threshold == before.threshold == 0.4 and after.repair == ["plug_pinholes"] and before.repair == []
    assert after.hole_window == 24


@pytest.mark.gui
def test_the_errors_view_stays_as_its_cell_made_it_after_the_repair_view(viewer, artifacts):
    """Notebook 05 after Run All: the snapshot under the errors cell still shows false positives red
    and false negatives cyan (with their legend) once the repair cell has drawn its own view."""
    import io
    import time

    import napari
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    from vesuvius_lab.lab import views

    label = np.zeros((24, 48, 48), np.uint8)
    label[:, 20:24] = 1  # a sheet across every z slice, four voxels thick
    mask = np.zeros_like(label)
    mask[:, 22:26] = 1  # half on the sheet, half beside it: false positives and false negatives
    image = (label == 1).astype(np.uint8) * 200 + 20
    result = VolumeResult("v1", image, label, mask.astype(np.float32), mask, {})
    evaluation.show_errors(viewer, result)
    errors_box = views.notebook_view(viewer, evaluation.ERROR_LEGEND)
    (comparison,) = evaluation.compare_repair([result], evaluation.PostprocessConfig(),
                                              evaluation.PostprocessConfig(repair=["plug_pinholes"]))
    repair_viewer = napari.Viewer(show=True)  # the repair cell's own viewer, as notebook 05 makes it
    try:
        evaluation.show_repair(repair_viewer, result, comparison)
        repair_box = views.notebook_view(repair_viewer, evaluation.REPAIR_LEGEND)
        deadline = time.monotonic() + 2  # let any scheduled snapshot of either viewer land
        while time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.02)
        shot = artifacts / "05_evaluate-errors-after-repair.png"
        shot.write_bytes(errors_box.snapshot.widget.value)
        rgb = np.asarray(Image.open(io.BytesIO(errors_box.snapshot.widget.value)).convert("RGB")).astype(int)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        assert ((r > 150) & (g < 80) & (b < 80)).mean() > 0.005, "no red false positives in the errors snapshot"
        assert ((r < 110) & (g > 150) & (b > 150)).mean() > 0.005, "no cyan false negatives in the errors snapshot"
        legend = errors_box.legend.value
        assert "false positive" in legend and "background:red" in legend and "background:cyan" in legend
        assert "added by the repair" in repair_box.legend.value
    finally:
        repair_viewer.close()
