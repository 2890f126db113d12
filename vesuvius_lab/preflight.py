"""Preflight validation: every problem with a dataset, one line each, before any training starts.

Reads only; never writes to or repairs the user's data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from vesuvius_lab.layout import (
    DEPRECATED_LABEL_VALUES,
    OPTIONAL_DIRS,
    Record,
    RecordStats,
    check_pair,
    discover,
    inspect_record,
)
from vesuvius_lab.errors import VLabError
from vesuvius_lab.io import read_volume


def _inspect(record: Record, cache=None) -> RecordStats | list[str]:
    try:
        if cache is not None and cache.is_fresh(record):
            meta = cache.meta(record)
            return RecordStats(tuple(meta["shape"]), "uint8", {}, meta["checksum"])
        return inspect_record(record)
    except VLabError as exc:
        return exc.lines


def _too_small(record: Record, shape: Sequence[int], patch_size: Sequence[int]) -> list[str]:
    small = [i for i, (s, p) in enumerate(zip(shape, patch_size, strict=True)) if s < p]
    if not small:
        return []
    return [f"{record.image}: volume shape {tuple(shape)} is smaller than the patch size {tuple(patch_size)}"]


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
) -> list[str]:
    """All problems with a data root or a manifest (YAML file); an empty list means ready to train.

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
            if old is not None and old.checksum != result.checksum:
                problems.append(f"{record.image}: record {record.id} changed since the manifest was built")
            if patch_size is not None:
                problems.extend(_too_small(record, result.shape, patch_size))
    problems.extend(_check_optional(root))
    return problems
