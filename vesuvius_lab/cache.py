"""A memory-mappable .npy cache of decoded volumes, so no dataset is ever held in RAM.

Each record gets a folder with ``image.npy``, ``label.npy`` and ``meta.json``; derived arrays
(topology targets) live beside them. An entry is rebuilt when its source file's size or mtime
changes, and derived arrays are rebuilt when the entry's content checksum or their version changes.
Writes are atomic, so a killed build leaves no half-written array behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vesuvius_lab.layout import Record, check_pair, content_checksum
from vesuvius_lab.errors import DataError
from vesuvius_lab.io import atomic_path, atomic_write_text, read_volume


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLAB_CACHE_DIR") or Path.home() / ".cache" / "vesuvius_lab")


@dataclass(frozen=True)
class CachedVolume:
    record: Record
    image: np.ndarray  # read-only memmap, uint8, (Z, Y, X)
    label: np.ndarray
    checksum: str
    folder: Path


def _signature(record: Record) -> dict:
    out = {}
    for key, path in (("image", record.image), ("label", record.label)):
        st = path.stat()
        out[key] = [st.st_size, st.st_mtime_ns]
    return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array))


class VolumeCache:
    """Decoded volumes on disk, opened as read-only memmaps."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.root = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def folder(self, record: Record) -> Path:
        key = hashlib.blake2b(str(record.image.resolve()).encode(), digest_size=6).hexdigest()
        return self.root / f"{record.id}-{key}"

    def _meta(self, folder: Path) -> dict | None:
        try:
            return json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            return None

    def meta(self, record: Record) -> dict | None:
        """What the cache recorded when it decoded this record (shape, checksum, source signature)."""
        return self._meta(self.folder(record))

    def is_fresh(self, record: Record) -> bool:
        meta = self.meta(record)
        try:
            return meta is not None and meta.get("signature") == _signature(record)
        except OSError:
            return False

    def load(self, record: Record) -> CachedVolume:
        """Open a record's cached arrays, (re)building them first if the source changed."""
        folder = self.folder(record)
        if not record.image.is_file() or not record.label.is_file():
            missing = record.image if not record.image.is_file() else record.label
            raise DataError(f"{missing}: file not found (record {record.id})")
        meta = self._meta(folder)
        if meta is None or meta.get("signature") != _signature(record):
            meta = self._build(record, folder)
        return CachedVolume(
            record=record,
            image=np.load(folder / "image.npy", mmap_mode="r"),
            label=np.load(folder / "label.npy", mmap_mode="r"),
            checksum=meta["checksum"],
            folder=folder,
        )

    def _build(self, record: Record, folder: Path) -> dict:
        signature = _signature(record)
        image, label = read_volume(record.image), read_volume(record.label)
        problems = check_pair(image, label, record.image, record.label)
        if problems:
            raise DataError(problems)
        folder.mkdir(parents=True, exist_ok=True)
        _save_npy(folder / "image.npy", image)
        _save_npy(folder / "label.npy", label)
        meta = {
            "id": record.id,
            "source": {"image": str(record.image), "label": str(record.label)},
            "signature": signature,
            "shape": list(image.shape),
            "checksum": content_checksum(image, label),
        }
        atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))  # written last: marks the entry complete
        return meta

    def derived(
        self, volume: CachedVolume, name: str, version: str, compute: Callable[[CachedVolume], np.ndarray]
    ) -> np.ndarray:
        """A per-volume array computed once (e.g. a skeleton) and memory-mapped afterwards."""
        path = volume.folder / f"{name}.npy"
        stamp = volume.folder / f"{name}.json"
        want = {"checksum": volume.checksum, "version": version}
        try:
            fresh = json.loads(stamp.read_text()) == want and path.is_file()
        except (OSError, ValueError):
            fresh = False
        if not fresh:
            _save_npy(path, compute(volume))
            atomic_write_text(stamp, json.dumps(want))
        return np.load(path, mmap_mode="r")
