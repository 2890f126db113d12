"""Notebook 05's views of a scored checkpoint (``evaluate.evaluate_checkpoint``): ``score_table`` is
the leaderboard score and its parts per volume plus the mean; ``topology_table`` which homology
dimension costs the TopoScore; ``error_labels`` marks true positives, false positives and false
negatives for napari (``show_errors``); ``compare_repair`` and ``show_repair`` what the topology
repair adds and removes, and what that does to each part of the score; ``tune_results`` and
``tuning_table`` the tuner's out-of-sample and in-sample scores on these volumes."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from vesuvius_lab.errors import DataError
from vesuvius_lab.evaluate import VolumeResult, topology
from vesuvius_lab.leaderboard import volume_score
from vesuvius_lab.postprocess import PostprocessConfig, postprocess

TP, FP, FN = 1, 2, 3
ERROR_COLORS = {0: "transparent", TP: "white", FP: "red", FN: "cyan", None: "transparent"}
ERROR_LEGEND = {"true positive": ERROR_COLORS[TP], "false positive": ERROR_COLORS[FP],
                "false negative": ERROR_COLORS[FN]}  # notebook 05's errors view (views.notebook_view)


def require_checkpoint(path: str | Path) -> Path:
    """The checkpoint to evaluate, or one line saying how to get one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no checkpoint here yet: train a run in notebook 04 first "
                        "(run name 'demo' writes runs/demo/checkpoints/best.pt), or set checkpoint_path")
    return path


def score_table(results: list[VolumeResult]) -> pd.DataFrame:
    """One row per volume (score, topo, surface_dice, voi_score, ...), then their mean."""
    table = pd.DataFrame([{"volume": r.id, **{k: v for k, v in r.scores.items() if np.isscalar(v)}} for r in results])
    table = table.set_index("volume")
    table.loc["mean"] = table.mean(numeric_only=True)
    return table


def fitted(table: pd.DataFrame):
    """A wide table as notebook 05 shows it, inside JupyterLab's default width: numbers to 3
    decimals, column names wrapped onto several lines and the whole in a smaller font (pandas'
    own HTML keeps every name on one line and runs off the right of the output area)."""
    return table.style.format(precision=3, na_rep="–").set_table_styles([
        {"selector": "", "props": "font-size: 0.85em;"},
        {"selector": "th.col_heading", "props": "white-space: normal; overflow-wrap: anywhere; max-width: 5.5em;"
                                                " text-align: right;"},
        {"selector": "td, th", "props": "padding: 0.2em 0.4em;"},
    ])


def error_labels(mask: np.ndarray, label: np.ndarray, ignore: int = 2) -> np.ndarray:
    """uint8: 1 true positive, 2 false positive, 3 false negative, 0 elsewhere or ignored."""
    pred, truth = np.asarray(mask) > 0, np.asarray(label) == 1
    out = np.zeros(pred.shape, np.uint8)
    out[pred & truth], out[pred & ~truth], out[~pred & truth] = TP, FP, FN
    out[np.asarray(label) == ignore] = 0
    return out


def show_errors(viewer, result: VolumeResult) -> None:
    """The image, the probability, the ground truth, and the errors coloured (FP red, FN cyan)."""
    from napari.utils.colormaps import DirectLabelColormap

    viewer.layers.clear()
    viewer.add_image(np.asarray(result.image), name=f"{result.id} image", colormap="gray")
    viewer.add_image(result.probability, name="probability", colormap="magma", opacity=0.4, visible=False)
    viewer.add_labels((np.asarray(result.label) == 1).astype(np.uint8), name="ground truth", opacity=0.3, visible=False)
    viewer.add_labels(error_labels(result.mask, result.label), name="errors (TP white, FP red, FN cyan)",
                      colormap=DirectLabelColormap(color_dict=ERROR_COLORS), opacity=0.8)


def topology_table(results: list[VolumeResult]) -> pd.DataFrame:
    """Per volume: Betti-0/1/2 of prediction and label, and per dimension the octant features
    matched / in the prediction / in the label with the F1 (NaN: the dimension is skipped)."""
    rows = []
    for r in results:
        t = topology(r.mask, r.label)
        row = {"volume": r.id}
        for k in range(3):
            row |= {f"b{k} pred": t["betti_pred"][k], f"b{k} label": t["betti_label"][k], f"matched {k}": t["matched"][k],
                    f"pred {k}": t["pred_features"][k], f"label {k}": t["label_features"][k],
                    f"F1 {k}": np.nan if t["f1"][k] is None else t["f1"][k]}
        rows.append(row)
    return pd.DataFrame(rows).set_index("volume")


ADDED, REMOVED = 1, 2
REPAIR_COLORS = {0: "transparent", ADDED: "lime", REMOVED: "magenta", None: "transparent"}
REPAIR_LEGEND = {"added by the repair": REPAIR_COLORS[ADDED], "removed by the repair": REPAIR_COLORS[REMOVED],
                 "prediction before repair": "white"}


@dataclasses.dataclass
class RepairComparison:
    """One volume's masks without and with the repair, and the score of each."""

    id: str
    before: np.ndarray
    after: np.ndarray
    scores_before: dict
    scores_after: dict


def repair_settings(checkpoint: str | Path, overrides: Sequence[str] = (), repair: dict | None = None
                    ) -> tuple[PostprocessConfig, PostprocessConfig]:
    """(without repair, with repair): the checkpoint's post-processing with ``overrides`` and then
    ``repair`` (dotted config keys and their values, a notebook parameter papermill can read: its
    parser takes one equals sign a line) applied, and the same with an empty repair list."""
    overrides = [*overrides, *(f"{key}={json.dumps(value)}" for key, value in (repair or {}).items())]
    from vesuvius_lab.config import config_from_dict
    from vesuvius_lab.training.run_dir import load_checkpoint

    stored = load_checkpoint(Path(checkpoint)).get("config") or {}
    after = config_from_dict(stored, list(overrides), origin=f"{checkpoint} (stored config)",
                             root=Path(checkpoint).resolve().parent).postprocess
    return dataclasses.replace(after, repair=[]), after


def compare_repair(results: list[VolumeResult], before: PostprocessConfig, after: PostprocessConfig) -> list[RepairComparison]:
    """Each volume's probabilities post-processed both ways and scored."""
    out = []
    for r in results:
        masks = postprocess(r.probability, before), postprocess(r.probability, after)
        scores = [volume_score(m, np.asarray(r.label)).as_dict() for m in masks]
        out.append(RepairComparison(r.id, *masks, *scores))
    return out


def repair_table(comparisons: list[RepairComparison]) -> pd.DataFrame:
    """Per volume, each part of the score without and with the repair and its change; then the mean."""
    rows = []
    for c in comparisons:
        row = {"volume": c.id}
        for part in ("score", "topo", "surface_dice", "voi_score"):
            a, b = c.scores_before[part], c.scores_after[part]
            row |= {f"{part} before": a, f"{part} after": b, f"{part} change": b - a}
        row |= {"voxels added": int((c.after & ~c.before).sum()), "voxels removed": int((c.before & ~c.after).sum())}
        rows.append(row)
    table = pd.DataFrame(rows).set_index("volume")
    table.loc["mean"] = table.mean(numeric_only=True)
    return table


def repair_labels(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """uint8: 1 where the repair added a voxel, 2 where it removed one, 0 elsewhere."""
    b, a = np.asarray(before) > 0, np.asarray(after) > 0
    out = np.zeros(b.shape, np.uint8)
    out[a & ~b], out[b & ~a] = ADDED, REMOVED
    return out


def show_repair(viewer, result: VolumeResult, comparison: RepairComparison) -> None:
    """The image, the ground truth, the prediction before repair, and the repair's changes
    coloured over them (added green, removed magenta)."""
    from napari.utils.colormaps import DirectLabelColormap

    viewer.layers.clear()
    viewer.add_image(np.asarray(result.image), name=f"{result.id} image", colormap="gray")
    viewer.add_labels((np.asarray(result.label) == 1).astype(np.uint8), name="ground truth", opacity=0.25)
    viewer.add_labels(comparison.before.astype(np.uint8), name="prediction (before repair)", opacity=0.35,
                      colormap=DirectLabelColormap(color_dict={0: "transparent", 1: "white", None: "transparent"}))
    viewer.add_labels(repair_labels(comparison.before, comparison.after), name="repair (added green, removed magenta)",
                      colormap=DirectLabelColormap(color_dict=REPAIR_COLORS), opacity=1.0)


def tune_results(results: list[VolumeResult], checkpoint: str | Path, overrides: Sequence[str] = (),
                 grid: dict | None = None) -> dict:
    """``tune.tune`` (what ``vesuvius-lab tune-postprocess`` runs) over ``grid`` (post-processing
    keys and their values, as ``--grid`` takes them) from the checkpoint's post-processing, on these
    volumes' probabilities: the out-of-sample and in-sample scores, nothing predicted again."""
    from vesuvius_lab.tune import Volume, parse_grid, tune

    grid = parse_grid(f"{key}={json.dumps(values)}" for key, values in (grid or {}).items()) if grid else None
    _, base = repair_settings(checkpoint, overrides)
    with tempfile.TemporaryDirectory(prefix="vlab-tune-") as folder:  # the tuner's workers read files
        volumes = []
        for r in results:
            volume = Volume(r.id, Path(folder) / f"{r.id}.prob.npy", Path(folder) / f"{r.id}.label.npy")
            np.save(volume.probability, np.asarray(r.probability, np.float32))
            np.save(volume.label, np.asarray(r.label))
            volumes.append(volume)
        return tune(volumes, base, grid, progress=False)


def tuning_table(result: dict) -> pd.DataFrame:
    """The out-of-sample score first (each volume scored with the setting chosen on the others),
    then the in-sample best (chosen and scored on the same volumes) and the setting as configured;
    then per fold what it chose and scored. The out-of-sample rows are NaN for one volume."""
    from vesuvius_lab.tune import PARTS, setting_text

    oos = result["out_of_sample"] or {}
    how = ("leave-one-out" if oos.get("leave_one_out") else f"{oos.get('folds')} folds") if oos else "needs 2+ volumes"
    rows = {f"out-of-sample ({how})": {**{p: oos.get(p, np.nan) for p in PARTS}, "setting": "chosen per fold"},
            "in-sample best": {**{p: result["best"][p] for p in PARTS}, "setting": setting_text(result["best"]["setting"])},
            "as configured": {**{p: result["base"][p] for p in PARTS}, "setting": setting_text({})}}
    for fold in oos.get("per_fold", []):
        rows[f"held out {', '.join(fold['held_out'])}"] = {
            **{p: fold[p] for p in PARTS},
            "setting": f"{setting_text(fold['setting'])} (chosen on the others at {fold['chosen_on']:.3f})"}
    return pd.DataFrame.from_dict(rows, orient="index")
