"""Scoring with the leaderboard metric: a model on records (validation, notebook 05), or a folder
of predictions against a folder of labels (``vesuvius-lab evaluate``).

Both predict through ``inference.predict_volume``, so training's validation and a checkpoint's
evaluation use the same windows, TTA, precision and post-processing. For folders, ``{id}.tif`` in
the prediction folder pairs with ``{id}.tif`` in the label folder; every problem (missing or extra
files, shapes that differ, unreadable TIFFs) is found before any scoring starts and reported as one
line naming the file; files are only read, never written.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vesuvius_lab.cache import VolumeCache
from vesuvius_lab.config import Config
from vesuvius_lab.data import open_data
from vesuvius_lab.device import default_device
from vesuvius_lab.errors import DataError, VLabError
from vesuvius_lab.inference import model_from_checkpoint, predict_volume
from vesuvius_lab.io import read_volume, tiff_info
from vesuvius_lab.layout import Record
from vesuvius_lab.leaderboard import TopoCounts, binarize, topo_counts, volume_score

SUFFIXES = (".tif", ".tiff")
SCORE_PARTS = ("score", "topo", "surface_dice", "voi_score")
PART_NAMES = {"score": "score", "topo": "topo", "surface_dice": "surface Dice", "voi_score": "VOI"}  # as shown


@dataclass
class VolumeResult:
    """One scored volume; the arrays are kept only when asked for (notebook 05 shows them)."""

    id: str
    image: np.ndarray | None = None
    label: np.ndarray | None = None
    probability: np.ndarray | None = None
    mask: np.ndarray | None = None
    scores: dict = field(default_factory=dict)


def score_records(model: torch.nn.Module, records: Sequence[Record], config: Config, cache: VolumeCache,
                  device: torch.device, progress: bool = False, keep_arrays: bool = False,
                  keep_ids: Collection[str] = ()) -> list[VolumeResult]:
    """Predict, post-process and score each record's whole volume; the arrays of every volume are
    kept with ``keep_arrays``, of those in ``keep_ids`` only otherwise (training's live prediction)."""
    results = []
    for record in tqdm(records, desc="validate", unit="vol", leave=False, disable=not progress):
        volume = cache.load(record)
        pred = predict_volume(model, volume.image, config, device)
        scores = volume_score(pred.mask, np.asarray(volume.label)).as_dict()
        if keep_arrays or record.id in keep_ids:
            results.append(VolumeResult(record.id, volume.image, volume.label, pred.probability, pred.mask, scores))
        else:
            results.append(VolumeResult(record.id, scores=scores))
    return results


def mean_scores(results: Sequence[VolumeResult]) -> dict:
    """The mean of each part of the score over the volumes."""
    return {k: statistics.fmean(r.scores[k] for r in results) for k in SCORE_PARTS}


def evaluate_checkpoint(checkpoint: str | os.PathLike, manifest: str | os.PathLike | None = None,
                        cache_dir: str | os.PathLike | None = None, max_volumes: int | None = None,
                        overrides: Sequence[str] = (), device: str | None = None,
                        progress: bool = False) -> list[VolumeResult]:
    """Score a checkpoint on the validation split of its own manifest (or ``manifest``), with the
    inference settings it was validated with (``overrides`` change them, e.g. ``val.tta=true``)."""
    model, config = model_from_checkpoint(checkpoint, overrides)
    dev = torch.device(device) if device else default_device()
    data = open_data(config, manifest=manifest, cache_dir=cache_dir)
    return score_records(model.to(dev), data.val[:max_volumes], config, data.cache, dev, progress, keep_arrays=True)


def volume_files(folder: Path, what: str, suffixes: Sequence[str] = SUFFIXES) -> tuple[dict[str, Path], list[str]]:
    """``{id: path}`` of the volumes in a folder (hidden files skipped) and the problems found."""
    if not folder.exists():
        return {}, [f"{folder}: {what} folder not found"]
    if not folder.is_dir():
        return {}, [f"{folder}: {what} folder is not a directory"]
    found: dict[str, Path] = {}
    problems = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if path.stem in found:
            problems.append(f"{path}: duplicate id {path.stem!r} (also {found[path.stem].name})")
            continue
        found[path.stem] = path
    return found, problems


def pair_files(pred_dir: str | os.PathLike, label_dir: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """(id, prediction, label) for every label; raises VLabError listing every mismatch."""
    pred_dir, label_dir = Path(pred_dir), Path(label_dir)
    preds, problems = volume_files(pred_dir, "prediction")
    labels, label_problems = volume_files(label_dir, "label")
    problems += label_problems
    if problems:
        raise VLabError(problems)
    if not labels:
        raise VLabError(f"{label_dir}: no label volumes (*.tif)")
    for rid in sorted(set(labels) - set(preds)):
        problems.append(f"{pred_dir / (rid + '.tif')}: missing prediction for label {labels[rid]}")
    for rid in sorted(set(preds) - set(labels)):
        problems.append(f"{preds[rid]}: no label {label_dir / (rid + '.tif')} for this prediction")
    pairs = [(rid, preds[rid], labels[rid]) for rid in sorted(set(labels) & set(preds))]
    for rid, pred, label in pairs:
        try:
            ps, ls = tiff_info(pred).shape, tiff_info(label).shape
        except DataError as exc:
            problems.extend(exc.lines)
            continue
        if len(ls) != 3:
            problems.append(f"{label}: expected a 3D volume, found shape {ls}")
        elif ps != ls:
            problems.append(f"{pred}: shape {ps} differs from label {label} shape {ls}")
        elif min(ls) < 4:
            problems.append(f"{label}: shape {ls} is too small for the metric (every axis needs 4 voxels)")
    if problems:
        raise VLabError(problems)
    return pairs


def topology(pred: np.ndarray, label: np.ndarray, counts: TopoCounts | None = None,
             fg_threshold: float | None = None) -> dict:
    """Which homology dimension costs the TopoScore: the Betti numbers (0, 1, 2) of prediction and
    label over the whole volume (ignored voxels removed, as the metric does), and the Betti
    matching's counts summed over the metric's octants: features matched, in the prediction, in the
    label, and the F1 per dimension (None where neither side has a feature: the dimension is skipped)."""
    from vesuvius_lab._betti import betti_numbers

    x, y = binarize(pred, label, fg_threshold)
    counts = counts if counts is not None else topo_counts(x, y)
    return {
        "betti_pred": list(betti_numbers(x)),
        "betti_label": list(betti_numbers(y)),
        "matched": list(counts.matched),
        "pred_features": list(counts.pred),
        "label_features": list(counts.label),
        "f1": [None if f != f else f for f in counts.f1()],
    }


def evaluate_dirs(
    pred_dir: str | os.PathLike,
    label_dir: str | os.PathLike,
    jobs: int | None = None,
    fg_threshold: float | None = None,
    progress: bool = True,
    with_topology: bool = False,
) -> dict:
    """``{"volumes": {id: {score, topo, surface_dice, voi_score, seconds}}, "mean_score": m}``;
    ``with_topology`` adds each volume's ``topology`` (Betti numbers and matched counts).

    ``jobs`` threads score volumes side by side (or, for fewer volumes than threads, the octants of
    one volume); the metric kernels release the GIL.
    """
    pairs = pair_files(pred_dir, label_dir)
    jobs = max(1, jobs if jobs is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    inner = 1 if len(pairs) >= jobs else jobs

    def score(item: tuple[str, Path, Path]) -> tuple[str, dict]:
        rid, pred, label = item
        t0 = time.perf_counter()
        pred_volume, label_volume = read_volume(pred), read_volume(label)
        result = volume_score(pred_volume, label_volume, fg_threshold=fg_threshold, jobs=inner)
        row = result.as_dict()
        row["seconds"] = round(time.perf_counter() - t0, 3)
        if with_topology:
            row.update(topology(pred_volume, label_volume, result.counts, fg_threshold))
        return rid, row

    rows: dict[str, dict] = {}
    bar = tqdm(total=len(pairs), desc="evaluate", unit="vol", disable=not progress)
    try:
        if jobs > 1 and len(pairs) > 1:
            with ThreadPoolExecutor(min(jobs, len(pairs))) as pool:
                for rid, row in pool.map(score, pairs):
                    rows[rid] = row
                    bar.update()
        else:
            for item in pairs:
                rid, row = score(item)
                rows[rid] = row
                bar.update()
    finally:
        bar.close()
    return {"volumes": rows, "mean_score": statistics.fmean(r["score"] for r in rows.values())}


def format_report(result: dict, write: Callable[[str], None] = print) -> None:
    """One line per volume (and its topology, when computed), then the mean."""
    for rid, row in result["volumes"].items():
        write(
            f"{rid}: score {row['score']:.4f}  topo {row['topo']:.4f}  surface_dice {row['surface_dice']:.4f}"
            f"  voi_score {row['voi_score']:.4f}  ({row['seconds']:.2f} s)"
        )
        if "betti_pred" in row:
            write("  " + format_topology(row))
    write(f"mean score: {result['mean_score']:.4f} over {len(result['volumes'])} volumes")


def format_topology(row: dict) -> str:
    """One line: Betti numbers of prediction and label, and per dimension matched / predicted / label
    features of the octants' Betti matching with its F1."""
    def dims(values) -> str:
        return "/".join("-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v)) for v in values)

    return (f"betti pred {dims(row['betti_pred'])} label {dims(row['betti_label'])} | octant features: matched "
            f"{dims(row['matched'])} of pred {dims(row['pred_features'])}, label {dims(row['label_features'])} | "
            f"F1 {dims(row['f1'])}")
