"""``vesuvius-lab tune-postprocess``: the best setting is the metric's best, probabilities are computed
once per checkpoint, the best setting lands in a config, the out-of-sample score is each volume's score
under the setting chosen on the others and is printed first, bad input is one line."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import numpy as np
import pytest

from lab_runs_helpers import write_tiny_config
from vesuvius_lab.config import load_config
from vesuvius_lab.io import write_volume
from vesuvius_lab.lab.evaluation import tuning_table
from vesuvius_lab.leaderboard import volume_score
from vesuvius_lab.manifest import build_manifest
from vesuvius_lab.postprocess import PostprocessConfig, postprocess
from vesuvius_lab.synth import synth

REPAIR = ["plug_pinholes", "fill_sheet_holes", "plug_pinholes"]


@pytest.fixture()
def prob_folders(tmp_path):
    """Probabilities of two sheets per volume, with a hole punched in one and faint debris."""
    prob_dir, label_dir = tmp_path / "prob", tmp_path / "labels"
    prob_dir.mkdir()
    rng = np.random.default_rng(0)
    volumes = {}
    for k, rid in enumerate(["11", "22"]):
        label = np.zeros((32, 32, 32), np.uint8)
        label[6 + k : 9 + k] = 1
        label[18:21] = 1
        label[:, :, -2:] = 2
        prob = np.where(label == 1, 0.8, 0.1) + rng.uniform(-0.05, 0.05, label.shape)
        prob[6 + k : 9 + k, 10:14, 10:14] = 0.2  # a hole through the first sheet, inside one of the metric's octants
        prob[12:14, 4:6, 24:26] = 0.45  # debris between the sheets, above some thresholds
        np.save(prob_dir / f"{rid}.npy", prob.astype(np.float32))
        write_volume(label_dir / f"{rid}.tif", label)
        volumes[rid] = (prob.astype(np.float32), label)
    return prob_dir, label_dir, volumes


def metric_mean(volumes, cfg: PostprocessConfig) -> float:
    return statistics.fmean(volume_score(postprocess(p, cfg), y).score for p, y in volumes.values())


def test_the_tuners_best_is_the_metrics_best_and_apply_writes_it(cli, prob_folders, tmp_path):
    prob_dir, label_dir, volumes = prob_folders
    base_cfg = tmp_path / "base.yaml"
    base_cfg.write_text("postprocess:\n  threshold: 0.5\n  min_component_size: 0\n")
    out_cfg = tmp_path / "tuned.yaml"
    code, out, err = cli("tune-postprocess", "--prob", prob_dir, "--labels", label_dir, "--config", base_cfg,
                         "--grid", "threshold=[0.3, 0.5]", "--grid", f"repair=[[], [{', '.join(REPAIR)}]]",
                         "--eta", "0", "--jobs", "1", "--json", "--apply", out_cfg)
    assert code == 0 and not err
    result = json.loads(out[-1])
    assert result["settings"] == 4 and len(result["rows"]) == 4 and all(r["volumes"] == 2 for r in result["rows"])
    by_metric = {}
    for threshold in (0.3, 0.5):
        for repair in ([], REPAIR):
            by_metric[(threshold, tuple(repair))] = metric_mean(volumes, PostprocessConfig(threshold=threshold, repair=repair))
    for row in result["rows"]:  # every row is the metric's own number
        key = (row["setting"].get("threshold", 0.5), tuple(row["setting"].get("repair", [])))
        assert row["score"] == pytest.approx(by_metric[key], abs=1e-12)
    best_key = max(by_metric, key=by_metric.get)
    best = result["best"]
    assert (best["postprocess"]["threshold"], tuple(best["postprocess"]["repair"])) == best_key
    assert best["score"] == pytest.approx(by_metric[best_key]) and best["score"] > result["base"]["score"]
    assert set(best) >= {"setting", "score", "topo", "surface_dice", "voi_score"}
    assert best_key[1] == tuple(REPAIR)  # the hole costs a tunnel: repair wins
    tuned = load_config(out_cfg).postprocess
    assert (tuned.threshold, tuple(tuned.repair)) == best_key


def out_of_sample_by_hand(result: dict) -> tuple[float, list[dict]]:
    """Leave-one-out from the reported per-volume score table (a grid of thresholds, scored in full):
    for each volume, the setting with the best mean score over the other volumes (at equal four
    decimals, the lower median CPU time), scored on the one left out."""
    ids, pooled, chosen = result["volumes"], [], []
    assert all(set(r["per_volume"]) == set(ids) for r in result["rows"])
    for held in ids:
        others = [i for i in ids if i != held]
        row = min(result["rows"], key=lambda r: (-round(statistics.fmean(r["per_volume"][i]["score"] for i in others), 4),
                                                 statistics.median(r["per_volume"][i]["postprocess_cpu_s"] for i in others)))
        chosen.append(row["setting"])
        pooled.append(row["per_volume"][held]["score"])
    return statistics.fmean(pooled), chosen


def test_the_out_of_sample_score_holds_out_each_volume_and_exposes_a_setting_that_suits_one(cli, tmp_path):
    """Two volumes with faint debris (a low threshold keeps it: a little worse) and one whose sheets
    are faint (a low threshold finds them: much better). In-sample the low threshold wins on the
    mean; chosen on the other two volumes it is never right for the volume left out."""
    prob_dir, label_dir = tmp_path / "prob", tmp_path / "labels"
    prob_dir.mkdir()
    rng = np.random.default_rng(1)
    for rid, faint in (("a", False), ("b", False), ("c", True)):
        label = np.zeros((32, 32, 32), np.uint8)
        label[6:9] = label[20:23] = 1
        prob = np.where(label == 1, 0.4 if faint else 0.8, 0.1) + rng.uniform(-0.03, 0.03, label.shape)
        if not faint:
            prob[13:15, 4:6, 4:6] = 0.4  # a speck of debris between the sheets: a component too many
        np.save(prob_dir / f"{rid}.npy", prob.astype(np.float32))
        write_volume(label_dir / f"{rid}.tif", label)
    base_cfg = tmp_path / "base.yaml"
    base_cfg.write_text("postprocess:\n  threshold: 0.5\n  min_component_size: 0\n")
    args = ("tune-postprocess", "--prob", prob_dir, "--labels", label_dir, "--config", base_cfg,
            "--grid", "threshold=[0.3, 0.5]", "--eta", "0", "--jobs", "1")
    code, out, err = cli(*args, "--json")
    assert code == 0 and not err
    result = json.loads(out[-1])
    oos, best = result["out_of_sample"], result["best"]
    assert oos["folds"] == 3 and oos["leave_one_out"] and [f["held_out"] for f in oos["per_fold"]] == [["a"], ["b"], ["c"]]
    by_hand, chosen = out_of_sample_by_hand(result)
    assert oos["score"] == pytest.approx(by_hand, abs=1e-12)
    assert [f["setting"] for f in oos["per_fold"]] == chosen
    for fold in oos["per_fold"]:  # each fold's own figures are its held-out volume's row in the table
        row = next(r for r in result["rows"] if r["setting"] == fold["setting"])
        assert fold["score"] == row["per_volume"][fold["held_out"][0]]["score"]
        assert fold["topo"] == row["per_volume"][fold["held_out"][0]]["topo"]
    # the case overfits: in-sample the faint volume's threshold wins, out of sample it costs
    assert best["postprocess"]["threshold"] == 0.3 and chosen[2] == {}  # chosen on a and b: as configured (0.5)
    assert oos["score"] < best["score"]
    table = tuning_table(result)  # notebook 05's view of it: the out-of-sample score first
    assert list(table.index[:2]) == ["out-of-sample (leave-one-out)", "in-sample best"]
    assert table["score"].iloc[0] == oos["score"] and table["score"].iloc[1] == best["score"]
    code, out, err = cli(*args)
    assert code == 0 and not err
    assert out[0].startswith(f"out-of-sample: score {oos['score']:.4f}, ") and "leave-one-out over 3 volumes" in out[0]
    assert out.index("in-sample table (chosen and scored on the same volumes):") > 0
    assert out[-1].startswith(f"in-sample best: score {best['score']:.4f} ")
    assert not any(line.startswith("best") for line in out)  # no unlabelled figure
    code, out, err = cli(*args, "--folds", "2", "--json")  # k folds: volume i in fold i mod k
    assert code == 0 and [f["held_out"] for f in json.loads(out[-1])["out_of_sample"]["per_fold"]] == [["a", "c"], ["b"]]
    from vesuvius_lab.tune import folder_volumes, format_table, tune

    one = tune(folder_volumes(prob_dir, label_dir)[:1], PostprocessConfig(min_component_size=0), {"threshold": [0.3]},
               eta=0, jobs=1, progress=False)  # one volume: no other to choose on, and it says so
    lines = []
    format_table(one, lines.append)
    assert one["out_of_sample"] is None and lines[0].startswith("out-of-sample: none (one volume")
    assert np.isnan(tuning_table(one)["score"].iloc[0]) and tuning_table(one).index[0] == "out-of-sample (needs 2+ volumes)"


def test_successive_halving_scores_every_setting_on_a_first_share_and_the_best_on_all(prob_folders):
    from vesuvius_lab.tune import folder_volumes, tune

    import shutil

    prob_dir, label_dir, _ = prob_folders
    for k in range(3, 7):  # six volumes: a first rung of two
        shutil.copy(prob_dir / f"{11 * (k % 2 + 1)}.npy", prob_dir / f"{11 * k}.npy")
        shutil.copy(label_dir / f"{11 * (k % 2 + 1)}.tif", label_dir / f"{11 * k}.tif")
    volumes = folder_volumes(prob_dir, label_dir)
    grid = {"threshold": [0.3, 0.4, 0.5, 0.6], "repair": [[], REPAIR]}
    result = tune(volumes, PostprocessConfig(), grid, eta=3, jobs=2, progress=False)
    counts = sorted(r["volumes"] for r in result["rows"])
    # the folds' searches (the same first rung of two, on the other volumes) add a third volume at most
    assert len(volumes) == 6 and result["settings"] == 8 and counts.count(6) >= 3 and counts[0] <= 3
    assert sum(counts) < 8 * 6  # halving spared jobs, the folds included
    assert result["rows"][0]["volumes"] == 6 and result["best"]["score"] == result["rows"][0]["score"]
    assert result["out_of_sample"]["folds"] == 6
    assert tune(volumes[:5], PostprocessConfig(), grid, eta=3, jobs=1, progress=False)["rows"][-1]["volumes"] == 5


def test_at_an_equal_score_fewer_repair_steps_rank_first(prob_folders):
    from vesuvius_lab.tune import folder_volumes, tune

    prob_dir, label_dir, volumes = prob_folders
    # at threshold 0.9 nothing is foreground, so every repair gives the same (empty) masks
    grid = {"threshold": [0.9], "repair": [REPAIR, ["plug_pinholes"], [], REPAIR[:2]]}
    result = tune(folder_volumes(prob_dir, label_dir), PostprocessConfig(), grid, eta=0, jobs=1, progress=False)
    rows = [r for r in result["rows"] if r["setting"].get("threshold") == 0.9]  # the grid, less the base
    assert len(rows) == 4 and len({r["score"] for r in rows}) == 1  # the same score: the tie is real
    assert [r["setting"].get("repair", []) for r in rows] == [[], ["plug_pinholes"], REPAIR[:2], REPAIR]


def test_bad_input_is_one_line(cli, prob_folders, tmp_path):
    prob_dir, label_dir, _ = prob_folders
    cases = [
        ((), "give a RUN_DIR, or --prob DIR with --labels DIR"),
        (("--prob", prob_dir), "--prob needs --labels DIR"),
        (("--prob", prob_dir, "--labels", label_dir, "--grid", "treshold=[0.4]"), "--grid 'treshold=[0.4]': expected KEY="),
        (("--prob", prob_dir, "--labels", label_dir, "--grid", "threshold=0.4"), "must be a non-empty YAML list"),
        (("--prob", prob_dir, "--labels", label_dir, "--grid", "repair=[[close]]"), "postprocess.repair: 'close' is not one of"),
        (("--prob", prob_dir, "--labels", tmp_path / "nowhere"), "label folder not found"),
        (("--prob", prob_dir, "--labels", label_dir, "--apply", tmp_path / "x.yaml"), "--apply needs --config CFG"),
        (("--prob", prob_dir, "--labels", label_dir, "--tta"), "--tta predicts a run's volumes: give a RUN_DIR"),
        (("--prob", prob_dir, "--labels", label_dir, "--folds", "3"), "--folds 3: need 2 to 2 folds for 2 volumes"),
        (("--prob", prob_dir, "--labels", label_dir, "--folds", "1"), "--folds 1: need at least 2"),
    ]
    for args, message in cases:
        code, out, err = cli("tune-postprocess", *args)
        assert code == 2 and len(err) == 1 and message in err[0], (args, err)
    (prob_dir / "22.npy").unlink()
    code, _, err = cli("tune-postprocess", "--prob", prob_dir, "--labels", label_dir)
    assert code == 2 and err == [f"error: {label_dir / '22.tif'}: no probability {prob_dir / '22.npy'} for this label"]


@pytest.mark.slow
def test_a_tiny_run_is_predicted_once_and_tuned_by_the_metric(tiny_root, tmp_path, cli):
    from vesuvius_lab.evaluate import evaluate_checkpoint, mean_scores

    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=6, val={"max_volumes": 2})
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "vesuvius_lab", "train", "--config", str(config), "--run-dir", str(run),
                    "--no-progress"], check=True, capture_output=True, timeout=600)
    args = ("tune-postprocess", run, "--grid", "threshold=[0.3, 0.5, 0.7]", "--eta", "0", "--jobs", "2", "--json")
    code, out, err = cli(*args)
    assert code == 0 and not err
    result = json.loads(out[-1])
    cached = sorted((run / "tune").glob("*.prob.npy"))
    assert len(cached) == len(result["volumes"]) >= 1
    stamps = [p.stat().st_mtime_ns for p in cached]
    metric = {}
    for threshold in (0.3, 0.5, 0.7):  # the whole predict-and-score path, as validation runs it
        results = evaluate_checkpoint(run / "checkpoints" / "best.pt", overrides=[f"postprocess.threshold={threshold}"])
        assert sorted(r.id for r in results) == sorted(result["volumes"])
        metric[threshold] = mean_scores(results)["score"]
    for row in result["rows"]:
        assert row["score"] == pytest.approx(metric[row["setting"].get("threshold", 0.5)], abs=1e-9)
    assert result["best"]["postprocess"]["threshold"] == max(metric, key=metric.get)
    oos = result["out_of_sample"]  # leave-one-out over the run's validation volumes, from the same table
    assert oos["leave_one_out"] and oos["folds"] == len(result["volumes"]) >= 2
    by_hand, chosen = out_of_sample_by_hand(result)
    assert oos["score"] == pytest.approx(by_hand, abs=1e-12) and [f["setting"] for f in oos["per_fold"]] == chosen
    code, out, _ = cli(*args)  # again: the cached probabilities serve
    assert code == 0 and [p.stat().st_mtime_ns for p in cached] == stamps
    # with mirror TTA: predicted again, scored as evaluate scores them with val.tta=true, and applied
    out_cfg = tmp_path / "tta.yaml"
    code, out, err = cli("tune-postprocess", run, "--tta", "--grid", "threshold=[0.45]", "--eta", "0", "--json",
                         "--apply", out_cfg)
    assert code == 0 and not err
    assert [p.stat().st_mtime_ns for p in cached] != stamps
    assert json.loads((run / "tune" / "probabilities.json").read_text())["val"]["tta"] is True
    row = next(r for r in json.loads(out[-1])["rows"] if r["setting"].get("threshold") == 0.45)
    tta = evaluate_checkpoint(run / "checkpoints" / "best.pt", overrides=["val.tta=true", "postprocess.threshold=0.45"])
    assert row["score"] == pytest.approx(mean_scores(tta)["score"], abs=1e-9)
    assert load_config(out_cfg).val.tta is True
    # a transfer check: every volume of another dataset, predicted once into its own cache and scored
    other = tmp_path / "other"
    synth(other, volumes=3, shape=(48, 48, 48), seed=11, scrolls=2, test_volumes=0, progress=False)
    build_manifest(other, progress=False).save(tmp_path / "other.yaml")
    code, out, err = cli("tune-postprocess", run, "--manifest", tmp_path / "other.yaml", "--grid", "threshold=[0.45]",
                         "--eta", "0", "--json")
    assert code == 0 and not err
    moved = json.loads(out[-1])
    assert sorted(moved["volumes"]) == sorted(p.stem for p in (other / "train_images").glob("*.tif"))
    assert sorted(p.name for p in (run / "tune-other").glob("*.prob.npy")) == sorted(f"{i}.prob.npy" for i in moved["volumes"])
    plain = evaluate_checkpoint(run / "checkpoints" / "best.pt", overrides=["postprocess.threshold=0.45"],
                                manifest=tmp_path / "other.yaml")
    assert len(plain) < len(moved["volumes"])  # evaluate scores the other manifest's validation split only
    row = next(r for r in moved["rows"] if r["setting"].get("threshold") == 0.45)
    for r in plain:
        assert row["per_volume"][r.id]["score"] == pytest.approx(r.scores["score"], abs=1e-9)
    code, _, err = cli("tune-postprocess", run, "--manifest", tmp_path / "missing.yaml")
    assert code == 2 and err == [f"error: {tmp_path / 'missing.yaml'}: no such manifest"]


@pytest.mark.slow
def test_the_second_synthetic_dataset_is_what_its_manifest_says(tmp_path):
    """data_manifests/synthetic_seed7_160.yaml (the generalisation check's data) regenerates exactly."""
    from pathlib import Path

    from vesuvius_lab.manifest import build_manifest, load_manifest
    from vesuvius_lab.synth import synth

    repo = Path(__file__).resolve().parent.parent
    committed = load_manifest(repo / "data_manifests" / "synthetic_seed7_160.yaml", root=tmp_path / "d")
    p = committed.synth
    assert (p["seed"], p["shape"]) == (7, [160, 160, 160])
    synth(tmp_path / "d", p["volumes"], tuple(p["shape"]), p["seed"], p["scrolls"], p["test_volumes"], progress=False)
    rebuilt = build_manifest(tmp_path / "d", progress=False)
    assert [(r.id, r.stats, r.sizes) for r in rebuilt.records] == [(r.id, r.stats, r.sizes) for r in committed.records]
    assert load_config(repo / "configs" / "demo_seed7.yaml").data.manifest == "../data_manifests/synthetic_seed7_160.yaml"
