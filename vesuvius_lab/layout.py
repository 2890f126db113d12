"""The Kaggle "vesuvius-challenge-surface-detection" file layout and label values: records, csv,
and per-record inspection. These are fixed by the task, not configured.

Layout under a data root::

    train.csv                  id,scroll_id
    train_images/{id}.tif      uint8 3D volume
    train_labels/{id}.tif      uint8: 0 background, 1 recto surface, 2 unlabeled (ignored)
    test_images/ deprecated_train_images/ deprecated_train_labels/   optional
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vesuvius_lab.errors import DataError
from vesuvius_lab.io import ZarrRef, read_any

TRAIN_CSV = "train.csv"
IMAGE_DIR = "train_images"
LABEL_DIR = "train_labels"
OPTIONAL_DIRS = ("test_images", "deprecated_train_images", "deprecated_train_labels")
LABEL_VALUES = (0, 1, 2)
DEPRECATED_LABEL_VALUES = (0, 1)
IGNORE_LABEL = 2
LABEL_NAMES = {0: "background", 1: "recto papyrus surface", 2: "unlabeled (ignored)"}
# As older manifests spelled the layout out (they may still carry it; see manifest._fixed_semantics).
LAYOUT = {
    "csv": TRAIN_CSV,
    "images": f"{IMAGE_DIR}/{{id}}.tif",
    "labels": f"{LABEL_DIR}/{{id}}.tif",
    "optional": [f"{d}/" for d in OPTIONAL_DIRS],
}


@dataclass(frozen=True)
class Record:
    """One training volume: where its image and label live, and which scroll it came from."""

    id: str
    scroll_id: str
    image: Path  # a TIFF, or a Zarr store (then ``image_ref`` says where inside it)
    label: Path
    image_ref: ZarrRef | None = None
    label_ref: ZarrRef | None = None


@dataclass(frozen=True)
class RecordStats:
    """What decoding a record tells us; stored in manifests."""

    shape: tuple[int, int, int]
    dtype: str
    label_histogram: dict[int, int]
    checksum: str


def read_train_csv(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Rows (id, scroll_id) of ``train.csv`` and one problem line per defect found."""
    if not path.is_file():
        return [], [f"{path}: file not found"]
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        return [], [f"{path}: unreadable csv ({exc})"]
    if not header:
        return [], [f"{path}: empty csv (no header)"]
    missing = [c for c in ("id", "scroll_id") if c not in header]
    if missing:
        return [], [f"{path}: missing column(s) {', '.join(missing)} (found {', '.join(header)})"]
    if not rows:
        return [], [f"{path}: empty csv (header but no rows)"]
    problems, seen, out = [], set(), []
    for line_no, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        rid, sid = row["id"], row["scroll_id"]
        if not rid:
            problems.append(f"{path}:{line_no}: empty id")
            continue
        if "/" in rid or "\\" in rid or rid in (".", ".."):
            problems.append(f"{path}:{line_no}: id {rid!r} is not a plain file name")
            continue
        if rid in seen:
            problems.append(f"{path}:{line_no}: duplicate id {rid}")
            continue
        seen.add(rid)
        out.append((rid, sid))
    return out, problems


def discover(root: Path) -> tuple[list[Record], list[str]]:
    """Records listed in ``train.csv`` whose files exist, plus problems for every mismatch."""
    root = Path(root)
    if not root.is_dir():
        return [], [f"{root}: data root is not a directory"]
    rows, problems = read_train_csv(root / TRAIN_CSV)
    image_dir, label_dir = root / IMAGE_DIR, root / LABEL_DIR
    for d in (image_dir, label_dir):
        if not d.is_dir():
            problems.append(f"{d}: directory not found")
    records = []
    for rid, sid in rows:
        image, label = image_dir / f"{rid}.tif", label_dir / f"{rid}.tif"
        ok = True
        for kind, path in (("image", image), ("label", label)):
            if path.parent.is_dir() and not path.is_file():
                problems.append(f"{path}: missing {kind} file for csv id {rid}")
                ok = False
        if ok and image.parent.is_dir() and label.parent.is_dir():
            records.append(Record(rid, sid, image, label))
    listed = {rid for rid, _ in rows}
    if rows:  # without a usable csv every file would be reported; the csv problem says it all
        for d in (image_dir, label_dir):
            for f in sorted(d.glob("*.tif")) if d.is_dir() else []:
                if f.stem not in listed:
                    problems.append(f"{f}: file has no id in {TRAIN_CSV}")
    return records, problems


def content_checksum(image: np.ndarray, label: np.ndarray) -> str:
    """Checksum of decoded voxels (not file bytes), so recompression does not count as a change."""
    h = hashlib.blake2b(digest_size=16)
    for arr in (image, label):
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()


def check_pair(
    image: np.ndarray,
    label: np.ndarray,
    image_path: Path,
    label_path: Path,
    allowed_labels: tuple[int, ...] = LABEL_VALUES,
) -> list[str]:
    """Problems with a decoded image/label pair: dtype, shape agreement, label values."""
    problems = []
    for arr, path in ((image, image_path), (label, label_path)):
        if arr.dtype != np.uint8:
            problems.append(f"{path}: dtype {arr.dtype}, expected uint8")
    if image.shape != label.shape:
        problems.append(f"{label_path}: shape {label.shape} does not match image shape {image.shape}")
    if label.dtype == np.uint8:
        hist = np.bincount(label.ravel(), minlength=256)
        bad = [v for v in np.flatnonzero(hist) if v not in allowed_labels]
        if bad:
            shown = ", ".join(str(v) for v in bad[:8])
            problems.append(
                f"{label_path}: label values {{{shown}}} outside {{{', '.join(map(str, allowed_labels))}}}"
            )
    return problems


def inspect_record(record: Record) -> RecordStats:
    """Decode a record and check it; raises DataError with every problem found."""
    problems, arrays = [], []
    for path, ref in ((record.image, record.image_ref), (record.label, record.label_ref)):
        try:
            arrays.append(read_any(path, ref))
        except DataError as exc:
            problems.extend(exc.lines)
    if problems:
        raise DataError(problems)
    image, label = arrays
    problems = check_pair(image, label, record.image, record.label)
    if problems:
        raise DataError(problems)
    hist = np.bincount(label.ravel(), minlength=3)
    return RecordStats(
        shape=tuple(int(s) for s in image.shape),
        dtype=str(image.dtype),
        label_histogram={v: int(hist[v]) for v in LABEL_VALUES},
        checksum=content_checksum(image, label),
    )
