"""Notebook 05: predict the validation volumes with a checkpoint, score them, and colour the errors.

``evaluate`` returns plain per-volume results; ``score_table`` is the leaderboard score and its parts
per volume plus the mean; ``error_labels`` marks true positives, false positives and false negatives
for napari (``show_errors``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vesuvius_lab.cache import VolumeCache
from vesuvius_lab.inference import predict_probabilities
from vesuvius_lab.manifest import load_manifest
from vesuvius_lab.metrics import volume_score
from vesuvius_lab.postprocess import postprocess
from vesuvius_lab.predict import model_from_checkpoint

TP, FP, FN = 1, 2, 3
ERROR_COLORS = {0: "transparent", TP: "white", FP: "red", FN: "cyan", None: "transparent"}


@dataclass
class VolumeResult:
    id: str
    image: np.ndarray
    label: np.ndarray
    probability: np.ndarray
    mask: np.ndarray
    scores: dict


def evaluate(checkpoint: str | Path, manifest_path: str | Path | None = None, cache_dir: str | Path | None = None,
             max_volumes: int | None = None, overlap: float = 0.25, device: str = "cpu") -> list[VolumeResult]:
    """Predict and score the validation split (of the checkpoint's manifest unless another is given)."""
    model, config = model_from_checkpoint(checkpoint)
    manifest = load_manifest(manifest_path or config.path(config.data.manifest, "data.manifest"))
    _, val_ids = manifest.split_ids()
    cache = VolumeCache(cache_dir)
    results = []
    for rid in list(val_ids)[:max_volumes]:
        volume = cache.load(manifest.resolve(next(r for r in manifest.records if r.id == rid)))
        prob = predict_probabilities(model, np.asarray(volume.image), config.data.patch_size, overlap=overlap,
                                     device=device, amp_dtype=None)
        mask = postprocess(prob, config.postprocess)
        scores = volume_score(mask, np.asarray(volume.label)).as_dict()
        results.append(VolumeResult(rid, volume.image, volume.label, prob, mask, scores))
    return results


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
