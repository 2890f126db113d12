"""Notebook 05's evaluation on a checkpoint trained a few steps here: scores, table, error colours."""

import subprocess
import sys

import numpy as np
import pytest

from lab_runs_helpers import write_tiny_config
from vesuvius_lab.evaluate import evaluate_checkpoint
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
