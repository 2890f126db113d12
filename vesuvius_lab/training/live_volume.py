"""Live predictions: at each validation the run keeps one chosen validation volume's prediction.

Notebook 04's live panel and the napari "Live run" dock widget show it while the run trains. The
prediction is the one validation has just computed (``score_records(..., keep_ids=...)``), never a
second one; the loop only hands it to a background thread (``keep``), which quantizes, compresses
and writes it, so the loop pays microseconds, not the write. In the run folder (``RunDir.live``)::

    live/index.json          the volume's id and shape, one entry per kept validation
                             (step, epoch, file, the volume's score and parts, bytes, seconds)
    live/volume.npz          its image and label, written once
    live/step_00000120.npz   probability as uint8 (p * 255), the post-processed mask as packed bits

Bounded: the latest ``val.live_keep`` validations and the best-scoring one are kept, older files
are removed. Every file is written atomically; a failed write is logged and never stops a run.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vesuvius_lab.config import Config
from vesuvius_lab.evaluate import VolumeResult
from vesuvius_lab.io import atomic_path, atomic_write_text
from vesuvius_lab.layout import Record
from vesuvius_lab.training.run_dir import RunDir, json_line

log = logging.getLogger("vesuvius_lab.train")

INDEX, VOLUME = "index.json", "volume.npz"
COMPRESS_LEVEL = 1
_writer: threading.Thread | None = None  # the one background write in flight (rank 0 only)


def volume_ids(config: Config, records: Sequence[Record | VolumeResult]) -> tuple[str, ...]:
    """The id of the validated volume ``val.live_volume`` names (an index or a record id); () when
    it names none of ``records`` (or of their results, in the same order)."""
    chosen = config.val.live_volume
    if chosen is None:
        return ()
    ids = [r.id for r in records]
    if isinstance(chosen, int):
        return (ids[chosen],) if chosen < len(ids) else ()
    return (chosen,) if chosen in ids else ()


def entry_file(step: int) -> str:
    return f"step_{step:08d}.npz"


def keep(run: RunDir, config: Config, results: Sequence[VolumeResult], step: int, epoch: int) -> float:
    """Hand the chosen volume's prediction of this validation to the background writer; returns
    the seconds the loop spent here (waiting for a previous write still in flight included)."""
    global _writer
    t0 = time.perf_counter()
    if config.val.live_volume is None:
        return 0.0
    if _writer is not None:
        _writer.join()  # one write at a time; a validation later, the last one is long done
    chosen = volume_ids(config, results)
    kept = next((r for r in results if r.id in chosen and r.probability is not None), None)
    if kept is None:
        _note_problem(run, f"val.live_volume {config.val.live_volume!r} is none of the validated volumes "
                           f"({', '.join(r.id for r in results)}): no live prediction is kept")
        return time.perf_counter() - t0
    loop_s = time.perf_counter() - t0
    _writer = threading.Thread(target=_write, args=(run, config.val.live_keep, kept, step, epoch, loop_s),
                               name="live prediction", daemon=False)  # the interpreter waits for it at exit
    _writer.start()
    return time.perf_counter() - t0


def wait() -> None:
    """Until the background write in flight (if any) is on disk."""
    if _writer is not None:
        _writer.join()


def _write(run: RunDir, live_keep: int, result: VolumeResult, step: int, epoch: int, loop_s: float) -> None:
    t0 = time.perf_counter()
    try:
        index = read_index(run.root)
        shape = list(np.shape(result.probability))
        if index.get("volume") != result.id or index.get("shape") != shape or not (run.live / VOLUME).is_file():
            _save_npz(run.live / VOLUME, image=np.asarray(result.image, np.uint8), label=np.asarray(result.label, np.uint8))
            index = {"volume": result.id, "shape": shape, "entries": []}
        probability = np.clip(np.asarray(result.probability) * 255 + 0.5, 0, 255).astype(np.uint8)
        mask = np.packbits(np.asarray(result.mask).astype(bool, copy=False).reshape(-1))
        name = entry_file(step)
        size = _save_npz(run.live / name, probability=probability, mask=mask)
        earlier = index.get("entries", [])
        entries = [e for e in earlier if e["step"] < step]  # a resumed run rewrites the later ones
        entries.append({"step": step, "epoch": epoch, "file": name, "scores": result.scores, "bytes": size,
                        "loop_s": round(loop_s, 6), "write_s": round(time.perf_counter() - t0, 3)})
        index["entries"], dropped = _retain(entries, live_keep)
        dropped += [e for e in earlier if e["step"] > step]
        index.pop("problem", None)
        atomic_write_text(run.live / INDEX, json_line(index))
        for entry in dropped:
            (run.live / entry["file"]).unlink(missing_ok=True)
        log.info("live prediction of %s at step %d kept (%.1f MB; %.4f s in the loop, %.2f s written in the background)",
                 result.id, step, size / 2**20, loop_s, time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - a live view is never worth a run
        log.warning("live prediction at step %d not written (%s: %s)", step, type(exc).__name__, exc)


def _retain(entries: list[dict], live_keep: int) -> tuple[list[dict], list[dict]]:
    """(kept, dropped): the latest ``live_keep`` entries and the best-scoring one (0: all)."""
    if not live_keep or len(entries) <= live_keep:
        return entries, []
    scored = [e for e in entries if _finite(e["scores"].get("score"))]
    best = max(scored, key=lambda e: e["scores"]["score"]) if scored else None
    kept = [e for i, e in enumerate(entries) if i >= len(entries) - live_keep or e is best]
    return kept, [e for e in entries if all(e is not k for k in kept)]


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _save_npz(path: Path, **arrays: np.ndarray) -> int:
    """An .npz as ``np.savez_compressed`` writes it, at zlib level 1: a third of level 6's time for
    4 % more bytes on a 320^3 probability (2.6 s, 25 MiB). ``np.load`` reads it."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=COMPRESS_LEVEL) as zf:
            for name, array in arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asarray(array), allow_pickle=False)
        size = tmp.stat().st_size
    return size


def _note_problem(run: RunDir, problem: str) -> None:
    """Said once in the log, and kept in the index for the notebook to show."""
    index = read_index(run.root)
    if index.get("problem") == problem:
        return
    log.warning(problem)
    try:
        atomic_write_text(run.live / INDEX, json_line({**index, "problem": problem}))
    except OSError as exc:
        log.warning("%s: not written (%s)", run.live / INDEX, exc.strerror or exc)


# --- reading (the notebook and napari) ------------------------------------------------------------


def entry_label(entry: dict) -> str:
    """How a kept validation is named in the notebook's slider and napari's dock."""
    return f"epoch {entry['epoch']} · step {entry['step']}"


def read_index(run_dir: str | Path) -> dict:
    """live/index.json, or {} when there is none yet (or it is being replaced)."""
    try:
        return json.loads((RunDir(run_dir).live / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def load_volume(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The live volume's (image, label)."""
    with np.load(RunDir(run_dir).live / VOLUME) as npz:
        return npz["image"], npz["label"]


def load_entry(run_dir: str | Path, entry: dict, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """One kept validation's (probability as uint8, p * 255; mask as uint8 0/1)."""
    with np.load(RunDir(run_dir).live / entry["file"]) as npz:
        probability = npz["probability"]
        mask = np.unpackbits(npz["mask"], count=int(np.prod(shape))).reshape(tuple(shape))
    return probability, mask


def load_result(run_dir: str | Path, entry: dict | None = None) -> VolumeResult | None:
    """A kept validation (the latest when ``entry`` is None) as notebook 05's VolumeResult; None
    when nothing is kept yet. A file removed meanwhile (retention) reads as None too."""
    index = read_index(run_dir)
    entries = index.get("entries") or []
    if entry is None:
        if not entries:
            return None
        entry = entries[-1]
    try:
        image, label = load_volume(run_dir)
        probability, mask = load_entry(run_dir, entry, index["shape"])
    except (OSError, KeyError, ValueError):
        return None
    return VolumeResult(index["volume"], image, label, probability.astype(np.float32) / 255, mask, dict(entry["scores"]))
