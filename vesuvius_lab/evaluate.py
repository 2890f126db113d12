"""Score a folder of predictions against a folder of labels with the leaderboard metric.

``{id}.tif`` in the prediction folder pairs with ``{id}.tif`` in the label folder. Every problem
(missing or extra files, shapes that differ, unreadable TIFFs) is found before any scoring starts and
reported as one line naming the file; files are only read, never written.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from vesuvius_lab.errors import DataError, VLabError
from vesuvius_lab.io import read_volume, tiff_info
from vesuvius_lab.metrics import volume_score

SUFFIXES = (".tif", ".tiff")


def _volumes(folder: Path, what: str) -> tuple[dict[str, Path], list[str]]:
    if not folder.exists():
        return {}, [f"{folder}: {what} folder not found"]
    if not folder.is_dir():
        return {}, [f"{folder}: {what} folder is not a directory"]
    found: dict[str, Path] = {}
    problems = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in SUFFIXES or not path.is_file():
            continue
        if path.stem in found:
            problems.append(f"{path}: duplicate id {path.stem!r} (also {found[path.stem].name})")
            continue
        found[path.stem] = path
    return found, problems


def pair_files(pred_dir: str | os.PathLike, label_dir: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """(id, prediction, label) for every label; raises VLabError listing every mismatch."""
    pred_dir, label_dir = Path(pred_dir), Path(label_dir)
    preds, problems = _volumes(pred_dir, "prediction")
    labels, label_problems = _volumes(label_dir, "label")
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


def evaluate_dirs(
    pred_dir: str | os.PathLike,
    label_dir: str | os.PathLike,
    jobs: int | None = None,
    fg_threshold: float | None = None,
    progress: bool = True,
) -> dict:
    """``{"volumes": {id: {score, topo, surface_dice, voi_score, seconds}}, "mean_score": m}``.

    ``jobs`` threads score volumes side by side (or, for fewer volumes than threads, the octants of
    one volume); the metric kernels release the GIL.
    """
    pairs = pair_files(pred_dir, label_dir)
    jobs = max(1, jobs if jobs is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    inner = 1 if len(pairs) >= jobs else jobs

    def score(item: tuple[str, Path, Path]) -> tuple[str, dict]:
        rid, pred, label = item
        t0 = time.perf_counter()
        result = volume_score(read_volume(pred), read_volume(label), fg_threshold=fg_threshold, jobs=inner)
        row = result.as_dict()
        row["seconds"] = round(time.perf_counter() - t0, 3)
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
    """One line per volume, then the mean."""
    for rid, row in result["volumes"].items():
        write(
            f"{rid}: score {row['score']:.4f}  topo {row['topo']:.4f}  surface_dice {row['surface_dice']:.4f}"
            f"  voi_score {row['voi_score']:.4f}  ({row['seconds']:.2f} s)"
        )
    write(f"mean score: {result['mean_score']:.4f} over {len(result['volumes'])} volumes")
