"""Volume I/O (multi-page uint8 TIFF) and crash-safe file writes."""

from __future__ import annotations

import contextlib
import fcntl
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
    axes: str  # tifffile's letter per axis of ``shape``: C or S a channel axis, Q/Z/I/Y/X spatial or unknown

    @property
    def channels(self) -> int:
        """Samples per voxel: the product of the channel axes (1 for a grey volume)."""
        return int(np.prod([n for n, a in zip(self.shape, self.axes, strict=True) if a in "CS"], dtype=np.int64))

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(n for n, a in zip(self.shape, self.axes, strict=True) if a not in "CS")


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
    """Shape, dtype and axes of a multi-page TIFF volume from its headers, without decoding pixels;
    raises DataError if unreadable, or truncated: some page's data lies past the end of the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    size = path.stat().st_size
    with _tifffile_problems(path), tifffile.TiffFile(path) as tif:
        pages = len(tif.pages)
        if pages == 0:
            raise DataError(f"{path}: TIFF has no pages")
        series = tif.series[0]
        shape, dtype, axes = tuple(series.shape), np.dtype(series.dtype), series.axes
        first = tif.pages.first
        if pages > 1 and len(shape) == 2:
            shape, axes = (pages, *first.shape), "Q" + first.axes
        tif.pages.useframes = True  # a page's data offsets and sizes without parsing its other tags
        end = max((o + n for page in tif.pages for o, n in zip(page.dataoffsets, page.databytecounts, strict=True)),
                  default=0)
    if end > size:
        raise DataError(f"{path}: truncated TIFF (its pages' data ends at byte {end}, the file has {size})")
    return TiffInfo(shape=shape, dtype=dtype, pages=pages, axes=axes)


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


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created) while the block runs: writers of one shared
    folder (parts of a prediction, two tuners of one run) take turns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


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


# --- Zarr / OME-Zarr volumes -------------------------------------------------------------------
Crop = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def parse_crop(text: str | None, what: str = "crop") -> Crop | None:
    """``"z0:z1,y0:y1,x0:x1"`` (voxels at the record's level) as ((z0, z1), (y0, y1), (x0, x1))."""
    if text is None or str(text).strip() == "":
        return None
    parts = str(text).replace(" ", "").split(",")
    try:
        bounds = tuple((int(a), int(b)) for a, b in (p.split(":") for p in parts))
    except ValueError:
        raise DataError(f"{what}: {text!r} is not z0:z1,y0:y1,x0:x1") from None
    if len(bounds) != 3 or any(a < 0 or b <= a for a, b in bounds):
        raise DataError(f"{what}: {text!r} is not z0:z1,y0:y1,x0:x1 with 0 <= start < stop")
    return bounds  # type: ignore[return-value]


def format_crop(crop: Crop | None) -> str | None:
    return None if crop is None else ",".join(f"{a}:{b}" for a, b in crop)


@dataclass(frozen=True)
class ZarrRef:
    """Where a volume lives inside a Zarr store: the array (or OME-Zarr multiscale group) path,
    the resolution level of a multiscale group, and an optional crop at that level."""

    array: str = ""  # path inside the store; "" is the store's root node
    level: int | None = None  # dataset index of an OME-Zarr multiscale group (default 0)
    crop: Crop | None = None

    def describe(self, store: Path) -> str:
        out = str(store) + (f"/{self.array}" if self.array else "")
        if self.level is not None:
            out += f" level {self.level}"
        return out + (f" [{format_crop(self.crop)}]" if self.crop else "")


def is_zarr_path(path: str | os.PathLike) -> bool:
    """A Zarr store is a folder (``.zarr`` or holding zarr.json / .zgroup / .zarray)."""
    path = Path(path)
    if path.suffix.lower() in (".zarr", ".ome.zarr"):
        return True
    return path.is_dir() and any((path / n).is_file() for n in ("zarr.json", ".zgroup", ".zarray"))


def multiscale_paths(attrs: dict) -> list[str] | None:
    """Dataset paths of an OME-Zarr multiscale group (0.4: ``multiscales``, 0.5: ``ome.multiscales``)."""
    ms = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    if not ms or not isinstance(ms, list) or not isinstance(ms[0], dict):
        return None
    return [str(d["path"]) for d in ms[0].get("datasets", []) if isinstance(d, dict) and "path" in d] or None


class ZarrVolume:
    """A 3D volume inside a (local) Zarr v2/v3 or OME-Zarr store, opened lazily: only metadata is
    read until a region is asked for. ``shape`` is the crop's; ``read(box)`` decodes only the
    chunks under the box."""

    def __init__(self, store: str | os.PathLike, ref: ZarrRef = ZarrRef()):
        import zarr

        self.store, self.ref = Path(store), ref
        where = ref.describe(self.store)
        if not self.store.exists():
            raise DataError(f"{self.store}: Zarr store not found")
        try:
            node = zarr.open(str(self.store), mode="r", path=ref.array or None) if ref.array else zarr.open(str(self.store), mode="r")
        except Exception as exc:  # zarr raises several kinds for a missing or broken node
            raise DataError(f"{where}: cannot open as Zarr ({type(exc).__name__}: {exc})") from None
        self.levels: list = []
        if isinstance(node, zarr.Group):
            paths = multiscale_paths(dict(node.attrs))
            if paths is None:
                names = ", ".join(sorted(k for k, _ in node.arrays())) or "none"
                raise DataError(f"{where}: a Zarr group without OME-Zarr multiscales; name an array (arrays: {names})")
            try:
                self.levels = [node[p] for p in paths]
            except KeyError as exc:
                raise DataError(f"{where}: multiscale dataset {exc} is missing") from None
            level = ref.level or 0
            if not 0 <= level < len(self.levels):
                raise DataError(f"{where}: no such level (the multiscale group has levels 0-{len(self.levels) - 1})")
            self.array = self.levels[level]
            self.level = level
        else:
            if ref.level not in (None, 0):
                raise DataError(f"{where}: level {ref.level} given, but the node is a single array, not a multiscale group")
            self.array, self.level, self.levels = node, 0, [node]
        full = tuple(int(s) for s in self.array.shape)
        if len(full) != 3:
            raise DataError(f"{where}: expected a 3D array, found shape {full}")
        crop = ref.crop or tuple((0, s) for s in full)
        if any(b > s for (_, b), s in zip(crop, full, strict=True)):
            raise DataError(f"{where}: crop {format_crop(crop)} exceeds the array shape {full}")
        self.crop: Crop = crop  # type: ignore[assignment]
        self.full_shape = full
        self.shape = tuple(b - a for a, b in crop)
        self.dtype = np.dtype(str(self.array.dtype))
        self.where = where

    def read(self, box: tuple[slice, slice, slice] | None = None) -> np.ndarray:
        """The crop (or a box inside it, in crop coordinates), decoded; DataError on a corrupt chunk."""
        box = box or tuple(slice(0, s) for s in self.shape)
        sel = tuple(slice(c0 + (b.start or 0), c0 + (s if b.stop is None else b.stop))
                    for (c0, _), b, s in zip(self.crop, box, self.shape, strict=True))
        try:
            return np.asarray(self.array[sel])
        except Exception as exc:  # codecs raise many kinds on corrupt data
            raise DataError(f"{self.where}: unreadable chunk data ({type(exc).__name__}: {exc})") from None

    def storage_grid(self) -> tuple[int, ...]:
        """Shape of one stored object (chunk, or shard when sharded): the unit a file holds."""
        meta = self.array.metadata
        grid = getattr(meta, "chunk_grid", None)
        return tuple(int(c) for c in (grid.chunk_shape if grid is not None else meta.chunks))

    def chunk_keys(self) -> list[tuple[tuple[int, ...], str]]:
        """(grid index, store key) of every stored object under the crop."""
        import itertools

        grid = self.storage_grid()
        ranges = [range(a // g, (b - 1) // g + 1) for (a, b), g in zip(self.crop, grid, strict=True)]
        return [(idx, self.array.metadata.encode_chunk_key(idx)) for idx in itertools.product(*ranges)]

    def signature(self) -> list:
        """Size and mtime of the array's metadata and of every chunk file under the crop: a
        rewritten chunk changes it, as a rewritten TIFF changes its own."""
        base = self.store / self.array.path
        out = [list(self.crop), self.level]
        for name in ("zarr.json", ".zarray"):
            if (base / name).is_file():
                st = (base / name).stat()
                out.append([name, st.st_size, st.st_mtime_ns])
        for _, key in self.chunk_keys():
            try:
                st = (base / key).stat()
                out.append([st.st_size, st.st_mtime_ns])
            except OSError:
                out.append(None)  # absent chunk: the fill value
        return out


def volume_info(path: str | os.PathLike, ref: ZarrRef | None = None) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a TIFF or a Zarr volume from metadata only."""
    if ref is not None or is_zarr_path(path):
        vol = ZarrVolume(path, ref or ZarrRef())
        return vol.shape, vol.dtype
    info = tiff_info(path)
    return info.shape, info.dtype


def read_any(path: str | os.PathLike, ref: ZarrRef | None = None) -> np.ndarray:
    """Decode a whole volume: a TIFF, or a Zarr array's crop."""
    if ref is not None or is_zarr_path(path):
        return ZarrVolume(path, ref or ZarrRef()).read()
    return read_volume(path)


def source_signature(path: Path, ref: ZarrRef | None = None):
    """What changes when a volume's source changes: a file's size and mtime, or a Zarr crop's chunks."""
    if ref is not None or is_zarr_path(path):
        return ZarrVolume(path, ref or ZarrRef()).signature()
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


# --- Zarr writes -------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` (a folder) by renames.

    A kill leaves the old folder or the new one in place, plus at most a temp folder that
    ``remove_stale_temp`` deletes; never a half-written folder under the final name.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old{os.getpid()}{TEMP_SUFFIX}"
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temp(folder: str | os.PathLike) -> None:
    """Delete temp files and folders that a killed atomic write left in ``folder``."""
    import shutil

    for p in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
