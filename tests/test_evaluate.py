"""``vesuvius-lab evaluate`` on real TIFF folders: scores, JSON shape, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vesuvius_lab.io import write_volume
from vesuvius_lab.leaderboard import volume_score

BIN = Path(sys.executable).parent


def _label(shape, offset: int) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[offset : offset + 2] = 1
    label[offset + 8 : offset + 10] = 1
    label[:, :, -3:] = 2  # an ignored slab
    return label


@pytest.fixture()
def folders(tmp_path):
    """Three volumes: a perfect prediction, one with debris, one with a bridge between the sheets."""
    pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
    volumes = {}
    for k, rid in enumerate(["101", "202", "303"]):
        label = _label((20, 18, 22), 2 + k)
        pred = (label == 1).astype(np.uint8)
        if rid == "202":
            pred[15:17, 3:5, 3:5] = 1
        if rid == "303":
            pred[3 + k : 13 + k, 8:10, 8:10] = 1
        pred[:, :, -2:] = 1  # whatever happens in the ignored slab does not count
        write_volume(pred_dir / f"{rid}.tif", pred)
        write_volume(label_dir / f"{rid}.tif", label)
        volumes[rid] = (pred, label)
    return pred_dir, label_dir, volumes


def test_json_report_matches_the_metric(cli, folders):
    pred_dir, label_dir, volumes = folders
    code, out, err = cli("evaluate", "--pred", pred_dir, "--labels", label_dir, "--json", "--jobs", "2")
    assert code == 0 and not err
    report = json.loads("\n".join(out))
    assert set(report) == {"volumes", "mean_score"}
    assert list(report["volumes"]) == ["101", "202", "303"]
    for rid, (pred, label) in volumes.items():
        row = report["volumes"][rid]
        assert set(row) == {"score", "topo", "surface_dice", "voi_score", "seconds"}
        assert {k: row[k] for k in ("score", "topo", "surface_dice", "voi_score")} == volume_score(pred, label).as_dict()
        assert row["seconds"] >= 0
    assert report["volumes"]["101"]["score"] == 1.0
    assert report["volumes"]["202"]["score"] < 1.0 and report["volumes"]["303"]["score"] < 1.0
    assert report["mean_score"] == pytest.approx(np.mean([r["score"] for r in report["volumes"].values()]))


def test_text_report_and_serial_run_agree(cli, folders):
    pred_dir, label_dir, _ = folders
    code, out, _ = cli("evaluate", "--pred", pred_dir, "--labels", label_dir, "--jobs", "1")
    assert code == 0
    assert out[0].startswith("101: score 1.0000  topo 1.0000  surface_dice 1.0000  voi_score 1.0000")
    code, js, _ = cli("evaluate", "--pred", pred_dir, "--labels", label_dir, "--json", "--jobs", "1")
    mean = json.loads("\n".join(js))["mean_score"]
    assert out[-1] == f"mean score: {mean:.4f} over 3 volumes"


def test_missing_extra_and_mismatched_files_are_one_line_errors(cli, folders):
    pred_dir, label_dir, volumes = folders
    (pred_dir / "101.tif").unlink()
    write_volume(pred_dir / "999.tif", np.zeros((20, 18, 22), np.uint8))
    write_volume(pred_dir / "202.tif", np.zeros((20, 18, 21), np.uint8))
    (pred_dir / "303.tif").write_bytes(b"not a tiff at all")
    before = {p.name: p.read_bytes() for p in label_dir.iterdir()}
    code, out, err = cli("evaluate", "--pred", pred_dir, "--labels", label_dir)
    assert code == 2 and out == []
    assert f"error: {pred_dir / '101.tif'}: missing prediction for label {label_dir / '101.tif'}" in err
    assert f"error: {pred_dir / '999.tif'}: no label {label_dir / '999.tif'} for this prediction" in err
    assert f"error: {pred_dir / '202.tif'}: shape (20, 18, 21) differs from label {label_dir / '202.tif'} shape (20, 18, 22)" in err
    assert any(line.startswith(f"error: {pred_dir / '303.tif'}: truncated or corrupt TIFF") for line in err)
    assert len(err) == 4
    assert {p.name: p.read_bytes() for p in label_dir.iterdir()} == before  # user data untouched


def test_missing_folders_and_bad_jobs(cli, tmp_path):
    code, _, err = cli("evaluate", "--pred", tmp_path / "nope", "--labels", tmp_path / "nolabels")
    assert code == 2
    assert err == [f"error: {tmp_path / 'nope'}: prediction folder not found", f"error: {tmp_path / 'nolabels'}: label folder not found"]
    (tmp_path / "p").mkdir()
    (tmp_path / "l").mkdir()
    code, _, err = cli("evaluate", "--pred", tmp_path / "p", "--labels", tmp_path / "l")
    assert code == 2 and err == [f"error: {tmp_path / 'l'}: no label volumes (*.tif)"]
    code, _, err = cli("evaluate", "--pred", tmp_path / "p", "--labels", tmp_path / "l", "--jobs", "0")
    assert code == 2 and err == ["error: --jobs 0: need at least 1"]


def test_console_script_prints_json_on_stdout_and_progress_on_stderr(folders):
    pred_dir, label_dir, _ = folders
    env = {**os.environ, "TQDM_DISABLE": ""}
    done = subprocess.run(
        [str(BIN / "vesuvius-lab"), "evaluate", "--pred", str(pred_dir), "--labels", str(label_dir), "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["volumes"]["101"]["score"] == 1.0
    assert "Traceback" not in done.stderr


def test_topology_report_names_the_dimension_that_costs(cli, folders):
    from vesuvius_lab._betti import betti_numbers
    from vesuvius_lab.leaderboard import binarize

    pred_dir, label_dir, volumes = folders
    code, out, err = cli("evaluate", "--pred", pred_dir, "--labels", label_dir, "--json", "--topology")
    assert code == 0 and not err
    report = json.loads("\n".join(out))
    for rid, (pred, label) in volumes.items():
        row = report["volumes"][rid]
        x, y = binarize(pred, label)
        assert row["betti_pred"] == list(betti_numbers(x)) and row["betti_label"] == list(betti_numbers(y))
        counts = volume_score(pred, label).counts
        assert (row["matched"], row["pred_features"], row["label_features"]) == (list(counts.matched), list(counts.pred), list(counts.label))
    assert report["volumes"]["101"]["betti_pred"] == [2, 0, 0]
    assert report["volumes"]["303"]["betti_pred"][0] == 1  # the bridge merged the two sheets
    code, out, _ = cli("evaluate", "--pred", pred_dir, "--labels", label_dir, "--topology")
    lines = [line for line in out if line.startswith("  betti pred")]
    assert len(lines) == 3 and "label 2/0/0" in lines[0] and "F1 " in lines[0]
