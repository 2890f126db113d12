"""A compressed, chunked cache of decoded volumes and their targets, read lazily by the workers.

Each record gets a folder with ``image.zarr``, ``label.zarr`` and ``meta.json``; derived arrays
(topology targets) live beside them. Every array is a Zarr v3 array of one shard holding 32³
chunks compressed with Blosc (LZ4 for the CT image, whose noise Zstd hardly shrinks further but
decodes 8x slower; Zstd for the masks, LZ4-HC for the quantised distance). Any Zarr
reader (dask, napari, zarr-python) opens them; the workers read them with ``ChunkedArray``, which
decodes only the chunks under a patch box and keeps recently used chunks in a bounded per-process
``ChunkCache`` (zarr-python's per-call overhead is ~1 ms, a patch box touches hundreds of chunks).

An entry is rebuilt when its source changes (a TIFF's size or mtime, a Zarr crop's metadata and
chunk files) or the cache format changes, and derived arrays are rebuilt when the entry's content
checksum or their version changes. Arrays are written to a temp folder and renamed into place,
``meta.json`` last, under a per-entry lock: a killed build leaves no half-written entry, and
parallel builders (``cache build --jobs``, training ranks) never do the same work twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numcodecs import blosc  # imported before data workers fork, so none pays for it on its first batch

from vesuvius_lab.errors import DataError
from vesuvius_lab.io import atomic_dir, atomic_path, atomic_write_text, read_any, remove_stale_temp, source_signature
from vesuvius_lab.layout import Record, check_pair, content_checksum

CACHE_FORMAT = "zarr3-blosc-1"
CHUNK = (32, 32, 32)  # inner chunk: a 128³ patch box decodes ~1.7x its voxels (64³ chunks: ~2.9x)
# Blosc settings per array kind: (codec, level, shuffle)
CODECS = {
    "image": ("lz4", 5, "noshuffle"),
    "mask": ("zstd", 3, "bitshuffle"),  # 0/1/2 values: bit planes are mostly zero
    "distance": ("lz4hc", 5, "noshuffle"),  # int8 steps: 1.5x Zstd's size, decoded 5x faster
}
DEFAULT_CHUNK_CACHE_MB = 256
_OLD_FILES = ("image.npy", "label.npy", "skeleton.npy", "skeleton.json", "distance.npy", "distance.json")


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLAB_CACHE_DIR") or Path.home() / ".cache" / "vesuvius_lab")


# --- reading -------------------------------------------------------------------------------------
class ChunkCache:
    """Decoded chunks, least recently used dropped first, at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key, load: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return value
        value = load()
        self.misses += 1
        if value.nbytes > self.max_bytes:
            return value
        with self._lock:
            if key not in self._items:
                self._items[key] = value
                self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
        return value

    @property
    def nbytes(self) -> int:
        return self._bytes


def _decode_in_this_thread() -> None:
    """Blosc decodes each chunk in the calling thread, with its own context: a 32 KB chunk is one
    Blosc block, so decode threads would have nothing to split; the data workers (processes) are
    the parallelism and never oversubscribe the cores, and Blosc's global thread pool (which a
    forked worker would inherit half-dead) and its global lock are never used."""
    blosc.use_threads = False


def _layout(meta: dict) -> dict | None:
    """Inner chunk shape, codec and fill value of a one-shard sharded array as ``write_array``
    writes it; None for any other layout."""
    try:
        (codec,) = meta["codecs"]
        conf = codec["configuration"]
        names = [c["name"] for c in conf["codecs"]]
        index = [c["name"] for c in conf["index_codecs"]]
        shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
        ok = (codec["name"] == "sharding_indexed" and names == ["bytes", "blosc"] and index == ["bytes", "crc32c"]
              and conf["index_location"] == "end" and all(s >= n for s, n in zip(shard, meta["shape"], strict=True))
              and meta["chunk_key_encoding"]["name"] == "default")
        return {"chunk": tuple(conf["chunk_shape"]), "shard": tuple(shard), "fill": meta["fill_value"]} if ok else None
    except (KeyError, TypeError, ValueError):
        return None


class ChunkedArray:
    """A read-only 3D array over one cache array: numpy-style basic slicing decodes only the chunks
    under the slice (through ``chunk_cache`` when given); ``np.asarray`` decodes all of it."""

    ndim = 3

    def __init__(self, path: str | os.PathLike, chunk_cache: ChunkCache | None = None):
        self.path = Path(path)
        try:
            meta = json.loads((self.path / "zarr.json").read_text())
        except (OSError, ValueError):
            raise DataError(f"{self.path}: cache array missing or unreadable") from None
        layout = _layout(meta)
        if layout is None or len(meta.get("shape", ())) != 3:
            raise DataError(f"{self.path}: not a cache array of format {CACHE_FORMAT}")
        self.shape = tuple(int(s) for s in meta["shape"])
        self.dtype = np.dtype(meta["data_type"])
        self.chunks = layout["chunk"]
        self.fill = layout["fill"]
        self.grid = tuple(math.ceil(s / c) for s, c in zip(layout["shard"], self.chunks, strict=True))
        self.chunk_cache = chunk_cache
        self._key = str(self.path)
        self._fd: int | None = None
        self._pid = -1
        self._index: np.ndarray | None = None

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_pid": -1, "_index": None}

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ChunkedArray({self.path}, shape={self.shape}, dtype={self.dtype})"

    def zarr(self):
        """The same array through zarr-python (for dask, napari or any Zarr tool)."""
        import zarr

        return zarr.open_array(str(self.path), mode="r")

    def _open(self) -> None:
        _decode_in_this_thread()
        shard = self.path / "c" / "0" / "0" / "0"
        n = math.prod(self.grid)
        self._pid = os.getpid()
        try:
            self._fd = os.open(shard, os.O_RDONLY)
        except FileNotFoundError:  # every chunk was the fill value, so zarr wrote no shard
            self._fd = None
            self._index = np.full((*self.grid, 2), np.iinfo(np.uint64).max, np.uint64)
            return
        size = os.fstat(self._fd).st_size
        raw = os.pread(self._fd, n * 16, size - n * 16 - 4)
        self._index = np.frombuffer(raw, "<u8").reshape(*self.grid, 2)

    def _decode(self, idx: tuple[int, int, int]) -> np.ndarray:
        offset, nbytes = (int(v) for v in self._index[idx])
        if offset == np.iinfo(np.uint64).max:
            return np.full(self.chunks, self.fill, self.dtype)
        data = os.pread(self._fd, nbytes, offset)
        return np.frombuffer(blosc.decompress(data), self.dtype).reshape(self.chunks)

    def _chunk(self, idx: tuple[int, int, int], cached: bool) -> np.ndarray:
        if self.chunk_cache is None or not cached:
            return self._decode(idx)
        return self.chunk_cache.get((self._key, idx), lambda: self._decode(idx))

    def read(self, lo: tuple[int, ...], hi: tuple[int, ...], cached: bool = True) -> np.ndarray:
        """``array[lo:hi]`` (inside the array) as a new C-contiguous numpy array."""
        if self._pid != os.getpid():
            self._open()
        out = np.empty(tuple(b - a for a, b in zip(lo, hi, strict=True)), self.dtype)
        if out.size == 0:
            return out
        axes = []  # per axis: (chunk index, slice inside the chunk, slice inside ``out``)
        for a, b, n in zip(lo, hi, self.chunks, strict=True):
            axes.append([(i, slice(max(a, i * n) - i * n, min(b, (i + 1) * n) - i * n),
                          slice(max(a, i * n) - a, min(b, (i + 1) * n) - a)) for i in range(a // n, (b - 1) // n + 1)])
        for (i, si, di), (j, sj, dj), (k, sk, dk) in itertools.product(*axes):
            out[di, dj, dk] = self._chunk((i, j, k), cached)[si, sj, sk]
        return out

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if Ellipsis in key:
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (3 - len(key) + 1) + key[i + 1:]
        key = key + (slice(None),) * (3 - len(key))
        lo, hi, squeeze, steps = [], [], [], []
        for axis, (k, n) in enumerate(zip(key, self.shape, strict=True)):
            if isinstance(k, (int, np.integer)):
                k = int(k) + n if k < 0 else int(k)
                if not 0 <= k < n:
                    raise IndexError(f"index {k} is out of bounds for axis {axis} with size {n}")
                lo.append(k), hi.append(k + 1), squeeze.append(axis), steps.append(slice(None))
            elif isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 0:
                    return np.asarray(self)[key]
                lo.append(start), hi.append(max(start, stop)), steps.append(slice(None, None, step))
            else:  # fancy indexing: rare, served from a full read
                return np.asarray(self)[key]
        out = self.read(tuple(lo), tuple(hi))[tuple(steps)]
        return out.reshape([s for i, s in enumerate(out.shape) if i not in squeeze]) if squeeze else out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.read((0, 0, 0), self.shape, cached=False)
        return out if dtype is None else out.astype(dtype, copy=False)


def write_array(path: Path, array: np.ndarray, kind: str) -> None:
    """One cache array, atomically: a Zarr v3 array of one shard of Blosc-compressed 32³ chunks."""
    import zarr
    from zarr.codecs import BloscCodec

    codec, level, shuffle = CODECS[kind]
    shard = tuple(math.ceil(s / c) * c for s, c in zip(array.shape, CHUNK, strict=True))
    with atomic_dir(path) as tmp:
        z = zarr.create_array(str(tmp), shape=array.shape, dtype=array.dtype, chunks=CHUNK, shards=shard,
                              compressors=BloscCodec(cname=codec, clevel=level, shuffle=shuffle), fill_value=0,
                              overwrite=True)
        z[...] = np.ascontiguousarray(array)


# --- the cache -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CachedVolume:
    record: Record
    image: ChunkedArray  # uint8, (Z, Y, X), lazily decoded
    label: ChunkedArray
    checksum: str
    folder: Path


def _signature(record: Record) -> dict:
    return {
        "format": CACHE_FORMAT,
        "image": source_signature(record.image, record.image_ref),
        "label": source_signature(record.label, record.label_ref),
    }


def _exists(record: Record) -> Path | None:
    for path in (record.image, record.label):
        if not path.exists():
            return path
    return None


class VolumeCache:
    """Decoded volumes on disk as compressed chunked arrays; ``chunk_cache_mb`` bounds the decoded
    chunks each process (each data worker) keeps."""

    def __init__(self, cache_dir: str | os.PathLike | None = None, chunk_cache_mb: float = DEFAULT_CHUNK_CACHE_MB):
        self.root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.chunk_cache_mb = chunk_cache_mb
        self.chunks = ChunkCache(int(chunk_cache_mb * 2**20))

    def __getstate__(self):
        return {"root": self.root, "chunk_cache_mb": self.chunk_cache_mb}  # each process its own chunk cache

    def __setstate__(self, state):
        self.__init__(state["root"], state["chunk_cache_mb"])

    def folder(self, record: Record) -> Path:
        where = str(record.image.resolve()) + (repr(record.image_ref) if record.image_ref else "")
        key = hashlib.blake2b(where.encode(), digest_size=6).hexdigest()
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
            return meta is not None and meta.get("signature") == json.loads(json.dumps(_signature(record)))
        except (OSError, DataError):
            return False

    @contextlib.contextmanager
    def locked(self, folder: Path) -> Iterator[None]:
        """An exclusive lock on one entry, so concurrent builders wait instead of repeating the work."""
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def load(self, record: Record) -> CachedVolume:
        """Open a record's cached arrays, (re)building them first if the source changed."""
        folder = self.folder(record)
        missing = _exists(record)
        if missing is not None:
            raise DataError(f"{missing}: file not found (record {record.id})")
        signature = json.loads(json.dumps(_signature(record)))
        meta = self._meta(folder)
        if meta is None or meta.get("signature") != signature:
            with self.locked(folder):
                meta = self._meta(folder)
                if meta is None or meta.get("signature") != signature:
                    meta = self._build(record, folder, signature)
        return CachedVolume(
            record=record,
            image=ChunkedArray(folder / "image.zarr", self.chunks),
            label=ChunkedArray(folder / "label.zarr", self.chunks),
            checksum=meta["checksum"],
            folder=folder,
        )

    def _build(self, record: Record, folder: Path, signature: dict) -> dict:
        remove_stale_temp(folder)
        for name in _OLD_FILES:  # an entry of the earlier .npy format: its space comes back
            (folder / name).unlink(missing_ok=True)
        image, label = read_any(record.image, record.image_ref), read_any(record.label, record.label_ref)
        problems = check_pair(image, label, record.image, record.label)
        if problems:
            raise DataError(problems)
        (folder / "meta.json").unlink(missing_ok=True)  # the entry is incomplete until meta.json is back
        write_array(folder / "image.zarr", image, "image")
        write_array(folder / "label.zarr", label, "mask")
        meta = {
            "id": record.id,
            "format": CACHE_FORMAT,
            "source": {"image": str(record.image), "label": str(record.label)},
            "signature": signature,
            "shape": list(image.shape),
            "checksum": content_checksum(image, label),
        }
        atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))  # written last: marks the entry complete
        return meta

    def derived(
        self, volume: CachedVolume, name: str, version: str, compute: Callable[[CachedVolume], np.ndarray],
        kind: str = "mask",
    ):
        """A per-volume array computed once (e.g. a skeleton): a volume-shaped one is stored as a
        cache array of ``kind`` and returned as a ChunkedArray, anything else as a .npy array."""
        want = {"checksum": volume.checksum, "version": version}
        stamp = volume.folder / f"{name}.json"

        def fresh() -> Path | None:
            try:
                if json.loads(stamp.read_text()) != want:
                    return None
            except (OSError, ValueError):
                return None
            for path in (volume.folder / f"{name}.zarr", volume.folder / f"{name}.npy"):
                if path.exists():
                    return path
            return None

        path = fresh()
        if path is None:
            with self.locked(volume.folder):
                path = fresh()
                if path is None:
                    remove_stale_temp(volume.folder)
                    stamp.unlink(missing_ok=True)
                    array = compute(volume)
                    if array.ndim == 3 and tuple(array.shape) == tuple(volume.image.shape):
                        path = volume.folder / f"{name}.zarr"
                        write_array(path, array, kind)
                    else:
                        path = volume.folder / f"{name}.npy"
                        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                            np.save(fh, np.ascontiguousarray(array))
                    atomic_write_text(stamp, json.dumps(want))
        if path.suffix == ".zarr":
            return ChunkedArray(path, self.chunks)
        return np.load(path, mmap_mode="r")
