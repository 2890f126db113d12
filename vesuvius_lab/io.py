"""Volume I/O (multi-page uint8 TIFF) and crash-safe file writes."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from vesuvius_lab.errors import DataError


@dataclass(frozen=True)
class TiffInfo:
    """What the TIFF header says, read without decoding any pixel data."""

    shape: tuple[int, ...]
    dtype: np.dtype
    pages: int


_capture = threading.local()


class _ThreadCapture(logging.Filter):
    """tifffile reports truncated or corrupt files through its logger and returns what it could read.

    While a read is under way on this thread, its log records are collected (and turned into a
    DataError) instead of printed; reads on other threads are unaffected.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        sink = getattr(_capture, "sink", None)
        if sink is None:
            return True
        if record.levelno >= logging.WARNING:
            sink.append(record.getMessage())
        return False


logging.getLogger("tifffile").addFilter(_ThreadCapture())


@contextlib.contextmanager
def _tifffile_problems(path: Path) -> Iterator[None]:
    _capture.sink = messages = []
    try:
        yield
    except DataError:
        raise
    except Exception as exc:  # tifffile and imagecodecs raise many kinds
        raise DataError(f"{path}: truncated or corrupt TIFF ({type(exc).__name__}: {exc})") from None
    finally:
        _capture.sink = None
    if messages:
        first = messages[0].splitlines()[0]
        raise DataError(f"{path}: truncated or corrupt TIFF ({first})")


def tiff_info(path: str | os.PathLike) -> TiffInfo:
    """Shape and dtype of a multi-page TIFF volume; raises DataError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with _tifffile_problems(path), tifffile.TiffFile(path) as tif:
        pages = len(tif.pages)
        if pages == 0:
            raise DataError(f"{path}: TIFF has no pages")
        series = tif.series[0]
        shape, dtype = tuple(series.shape), np.dtype(series.dtype)
        first = tif.pages.first
        if pages > 1 and len(shape) == 2:
            shape = (pages, *first.shape)
    return TiffInfo(shape=shape, dtype=dtype, pages=pages)


def read_volume(path: str | os.PathLike) -> np.ndarray:
    """Decode a whole 3D TIFF volume; raises DataError naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with _tifffile_problems(path), tifffile.TiffFile(path) as tif:
        pages = len(tif.pages)
        data = tif.asarray(key=range(pages)) if pages > 1 else tif.asarray()
        declared = tif.series[0].shape
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, found shape {tuple(data.shape)}")
    if len(declared) == 3 and tuple(declared) != data.shape:
        raise DataError(f"{path}: truncated TIFF (header declares {tuple(declared)}, found {data.shape})")
    return data


def write_volume(path: str | os.PathLike, volume: np.ndarray) -> None:
    """Write a 3D uint8 volume as an LZW-compressed multi-page TIFF, atomically."""
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(volume), compression="lzw", photometric="minisblack")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it into place.

    A crash, kill or full disk leaves either the old file or the new one, never half of one. The
    file gets the mode a plain ``open`` would give it (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


TEMP_SUFFIX = ".tmp"


def stale_temp_files(folder: Path) -> list[Path]:
    """Temp files ``atomic_path`` left in ``folder`` when its process was killed mid-write."""
    return sorted(p for p in Path(folder).glob(f".*{TEMP_SUFFIX}") if p.is_file())


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else set and reset."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def resolve_inside(root: str | os.PathLike, relative: str | os.PathLike, what: str = "path") -> Path:
    """Resolve ``relative`` under ``root``; refuse anything that escapes it (``..``, absolute, symlinks)."""
    root_path = Path(root).resolve()
    candidate = (root_path / relative).resolve()
    if candidate != root_path and root_path not in candidate.parents:
        raise DataError(f"{relative}: {what} escapes the data root {root_path}")
    return candidate
