"""Notebook 05's views of a scored checkpoint (``evaluate.evaluate_checkpoint``): ``score_table`` is
the leaderboard score and its parts per volume plus the mean; ``error_labels`` marks true
positives, false positives and false negatives for napari (``show_errors``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pathlib import Path

from vesuvius_lab.errors import DataError
from vesuvius_lab.evaluate import VolumeResult

TP, FP, FN = 1, 2, 3
ERROR_COLORS = {0: "transparent", TP: "white", FP: "red", FN: "cyan", None: "transparent"}


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
