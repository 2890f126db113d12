"""Preflight validation: every problem with a dataset, one line each, before any training starts.

Reads only; never writes to or repairs the user's data. A TIFF record is decoded whole; a Zarr
record is checked from its metadata (store, array, level, crop, shape, dtype, the label's shape)
and a few chunks decoded at its corners and centre (label values, corrupt data), never the whole
array: a whole scroll is terabytes. The cache build decodes the rest and reports what it finds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

import itertools

import numpy as np

from vesuvius_lab.layout import (
    DEPRECATED_LABEL_VALUES,
    LABEL_VALUES,
    OPTIONAL_DIRS,
    Record,
    RecordStats,
    check_pair,
    discover,
    inspect_record,
)
from vesuvius_lab.errors import DataError, VLabError
from vesuvius_lab.io import ZarrVolume, read_volume, volume_info

SPOT_CHECKS = 9  # boxes decoded per Zarr record: 8 corners and the centre


def _spot_boxes(shape: Sequence[int], size: Sequence[int]) -> list[tuple[slice, ...]]:
    """Chunk-sized boxes at the corners and the centre of a volume."""
    size = [min(s, n) for s, n in zip(size, shape, strict=True)]
    starts = [(0, n - s) for n, s in zip(shape, size, strict=True)]
    boxes = {tuple(c) for c in itertools.product(*starts)}
    boxes.add(tuple((n - s) // 2 for n, s in zip(shape, size, strict=True)))
    return [tuple(slice(a, a + s) for a, s in zip(lo, size, strict=True)) for lo in sorted(boxes)][:SPOT_CHECKS]


def inspect_zarr_record(record: Record) -> RecordStats:
    """Check a record with a Zarr side from metadata and a few decoded chunks; DataError lists
    every problem. The checksum is empty: it needs every voxel."""
    problems, sides = [], []
    for path, ref in ((record.image, record.image_ref), (record.label, record.label_ref)):
        try:
            sides.append(ZarrVolume(path, ref) if ref is not None else volume_info(path))
        except DataError as exc:
            problems.extend(exc.lines)
    if problems:
        raise DataError(problems)
    shapes = [tuple(v.shape) if isinstance(v, ZarrVolume) else tuple(v[0]) for v in sides]
    dtypes = [v.dtype if isinstance(v, ZarrVolume) else v[1] for v in sides]
    where = [v.where if isinstance(v, ZarrVolume) else str(p) for v, p in zip(sides, (record.image, record.label), strict=True)]
    for w, dtype in zip(where, dtypes, strict=True):
        if dtype != np.uint8:
            problems.append(f"{w}: dtype {dtype}, expected uint8")
    if shapes[0] != shapes[1]:
        problems.append(f"{where[1]}: shape {shapes[1]} does not match image shape {shapes[0]}")
    if problems:
        raise DataError(problems)
    label_side = sides[1]
    if not isinstance(label_side, ZarrVolume):  # a TIFF label of a Zarr crop: crop-sized, decoded whole
        label = read_volume(record.label)
        problems.extend(check_pair(label, label, record.label, record.label))
    grid = max((v.storage_grid() for v in sides if isinstance(v, ZarrVolume)), key=lambda g: int(np.prod(g)))
    for box in _spot_boxes(shapes[0], grid):
        try:
            for side in sides:
                if isinstance(side, ZarrVolume):
                    values = side.read(box)
                    if side is label_side:
                        bad = sorted(set(np.unique(values).tolist()) - set(LABEL_VALUES))
                        if bad:
                            raise DataError(f"{side.where}: label values {{{', '.join(map(str, bad[:8]))}}} outside "
                                            f"{{{', '.join(map(str, LABEL_VALUES))}}}")
        except DataError as exc:
            problems.extend(exc.lines)
            break
    if problems:
        raise DataError(problems)
    return RecordStats(shapes[0], "uint8", {}, "")


def _inspect(record: Record, cache=None) -> RecordStats | list[str]:
    try:
        if cache is not None and cache.is_fresh(record):
            meta = cache.meta(record)
            return RecordStats(tuple(meta["shape"]), "uint8", {}, meta["checksum"])
        if record.image_ref is not None or record.label_ref is not None:
            return inspect_zarr_record(record)
        return inspect_record(record)
    except VLabError as exc:
        return exc.lines


def _padding_note(where: str | os.PathLike, shape: Sequence[int], patch_size: Sequence[int]) -> str | None:
    """The note for a volume smaller than the patch along some axis (None when it is not): it is
    no problem, since training pads its patches with the ignore label and prediction pads its windows."""
    axes = [name for name, s, p in zip("zyx", shape, patch_size, strict=True) if s < p]
    if not axes:
        return None
    return (f"{where}: volume shape {tuple(shape)} is smaller than the patch size {tuple(patch_size)} along "
            f"{', '.join(axes)}; padded to the patch, with the ignore label in training")


def _check_optional(root: Path) -> list[str]:
    """Optional Kaggle folders: test images must be 3D uint8; deprecated labels use {0,1} only."""
    problems = []
    for name in OPTIONAL_DIRS:
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.tif")):
            try:
                vol = read_volume(path)
            except VLabError as exc:
                problems.extend(exc.lines)
                continue
            if name == "deprecated_train_labels":
                image_path = root / "deprecated_train_images" / path.name
                image = vol
                if image_path.is_file():
                    try:
                        image = read_volume(image_path)
                    except VLabError:
                        pass  # reported when the image folder is scanned
                problems.extend(check_pair(image, vol, image_path, path, DEPRECATED_LABEL_VALUES))
            elif vol.dtype.name != "uint8":
                problems.append(f"{path}: dtype {vol.dtype}, expected uint8")
    return problems


def preflight(
    source: str | os.PathLike,
    patch_size: Sequence[int] | None = None,
    jobs: int | None = None,
    progress: bool = True,
    manifest=None,
    cache=None,
    say: Callable[[str], None] | None = None,
) -> list[str]:
    """All problems with a data root or a manifest (YAML file); an empty list means ready to train.

    ``say`` gets a note for each volume smaller than ``patch_size`` (not a problem: it is padded).

    ``manifest``: the already-loaded manifest of ``source`` (e.g. with its root overridden).
    ``cache``: a VolumeCache whose fresh entries were decoded and checked when they were built;
    their recorded checksum stands in for decoding the file again.
    """
    from vesuvius_lab.manifest import load_manifest  # manifest imports dataset; keep import order flat

    source = Path(source)
    expected: dict[str, RecordStats | None] = {}
    if manifest is not None or (source.is_file() and source.suffix in (".yaml", ".yml")):
        try:
            manifest = manifest or load_manifest(source)
        except VLabError as exc:
            return exc.lines
        records, problems = manifest.locate()
        expected = {rec.id: rec.stats for rec in manifest.records}
        root = manifest.root
    else:
        root = source
        records, problems = discover(source)
        if not source.is_dir():
            return problems
    workers = jobs or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # decoders release the GIL
        results = pool.map(lambda r: _inspect(r, cache), records)
        for record, result in zip(records, tqdm(results, total=len(records), desc="validate", unit="vol", disable=not progress), strict=True):
            if isinstance(result, list):
                problems.extend(result)
                continue
            old = expected.get(record.id)
            if old is not None and result.checksum and old.checksum != result.checksum:
                problems.append(f"{record.image}: record {record.id} changed since the manifest was built")
            note = _padding_note(record.image, result.shape, patch_size) if patch_size is not None else None
            if note and say is not None:
                say(note)
    problems.extend(_check_optional(root))
    return problems
