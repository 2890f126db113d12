import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from vesuvius_lab.cache import CACHE_FORMAT, ChunkCache, ChunkedArray, VolumeCache
from vesuvius_lab.io import read_volume, write_volume
from vesuvius_lab.layout import discover
from vesuvius_lab.targets import DISTANCE_CLIP, is_prepared, load_targets, prepare, signed_distance


def test_cache_is_chunked_reused_and_rebuilt_on_change(data_copy, tmp_path):
    cache = VolumeCache(tmp_path / "cache")
    record = discover(data_copy)[0][0]
    first = cache.load(record)
    assert isinstance(first.image, ChunkedArray) and first.image.shape == (48, 48, 48)
    image, label = read_volume(record.image), read_volume(record.label)
    np.testing.assert_array_equal(np.asarray(first.label), label)
    np.testing.assert_array_equal(zarr.open_array(str(first.folder / "image.zarr"), mode="r")[:], image)  # any Zarr reader
    rng = np.random.default_rng(0)
    for _ in range(20):  # numpy's basic slicing, decoded chunk by chunk
        lo = rng.integers(0, 47, 3)
        hi = lo + rng.integers(1, 48 - lo + 1)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        np.testing.assert_array_equal(first.image[box], image[box])
    for key in (5, (slice(None), 7), (Ellipsis, -1), (slice(3, 40, 5), 2, slice(None, None, 3)), (slice(10, 5),)):
        np.testing.assert_array_equal(first.image[key], image[key])
    mtime = (first.folder / "meta.json").stat().st_mtime_ns
    assert cache.load(record).checksum == first.checksum
    assert (first.folder / "meta.json").stat().st_mtime_ns == mtime  # reused, not rebuilt

    lab = label.copy()
    lab[lab == 1] = 0
    write_volume(record.label, lab)
    os.utime(record.label, ns=(mtime + 10**9, mtime + 10**9))
    assert not cache.is_fresh(record)
    second = cache.load(record)
    assert second.checksum != first.checksum and (np.asarray(second.label) == 1).sum() == 0


def test_derived_arrays_follow_the_volume(data_copy, tmp_path):
    cache = VolumeCache(tmp_path / "cache")
    record = discover(data_copy)[0][0]
    calls = []

    def compute(vol):
        calls.append(1)
        return (np.asarray(vol.label) == 1).astype(np.uint8)

    vol = cache.load(record)
    a = cache.derived(vol, "fg", "v1", compute)
    b = cache.derived(vol, "fg", "v1", compute)
    assert len(calls) == 1 and isinstance(a, ChunkedArray) and np.array_equal(np.asarray(a), np.asarray(b))
    cache.derived(vol, "fg", "v2", compute)  # a new algorithm version recomputes
    assert len(calls) == 2
    points = cache.derived(vol, "pts", "v1", lambda v: np.arange(12, dtype=np.int32).reshape(4, 3))
    assert points.shape == (4, 3) and (vol.folder / "pts.npy").is_file()  # not volume-shaped: a plain .npy


def test_targets_are_stored_compactly_and_read_back(data_copy, tmp_path):
    cache = VolumeCache(tmp_path / "cache")
    records = discover(data_copy)[0]
    tiff = sum(r.image.stat().st_size + r.label.stat().st_size for r in records)
    for r in records:
        vol = cache.load(r)
        t = load_targets(cache, vol, 1000)
        exact = signed_distance(read_volume(r.label)).astype(np.float32)
        distance = np.asarray(t.distance)
        assert distance.dtype == np.float32 and np.abs(distance - exact).max() <= 0.125  # quarter-voxel steps
        assert distance.max() <= DISTANCE_CLIP and t.distance[3:9, 0, 5:7].shape == (6, 2)
        assert json.loads((vol.folder / "distance.zarr" / "zarr.json").read_text())["data_type"] == "int8"
    stored = sum(f.stat().st_size for f in (tmp_path / "cache").rglob("*") if f.is_file())
    assert stored <= 1.3 * tiff, (stored, tiff)  # images, labels, skeletons and distances together


def test_chunk_cache_is_bounded_and_reused(data_copy, tmp_path):
    record = discover(data_copy)[0][0]
    cache = VolumeCache(tmp_path / "cache", chunk_cache_mb=0.1)  # three 32^3 chunks
    vol = cache.load(record)
    vol.image[0:40, 0:40, 0:40]
    assert cache.chunks.nbytes <= 0.1 * 2**20 and cache.chunks.misses == 8
    small = ChunkCache(10**6)
    arr = ChunkedArray(vol.folder / "image.zarr", small)
    arr[0:10, 0:10, 0:10], arr[5:20, 5:20, 5:20]
    assert small.misses == 1 and small.hits == 1


def test_an_entry_of_the_npy_format_is_replaced(data_copy, tmp_path):
    cache = VolumeCache(tmp_path / "cache")
    record = discover(data_copy)[0][0]
    folder = cache.folder(record)
    folder.mkdir(parents=True)
    np.save(folder / "image.npy", np.zeros((2, 2, 2), np.uint8))
    (folder / "meta.json").write_text(json.dumps({"signature": {"image": [1, 2], "label": [3, 4]}, "checksum": "x"}))
    vol = cache.load(record)
    assert not (folder / "image.npy").exists() and cache.meta(record)["format"] == CACHE_FORMAT
    np.testing.assert_array_equal(np.asarray(vol.image), read_volume(record.image))


def test_parallel_preparation_equals_serial_and_is_idempotent(data_copy, tmp_path):
    records = discover(data_copy)[0][:4]
    serial, parallel = VolumeCache(tmp_path / "one"), VolumeCache(tmp_path / "two")
    report = prepare(serial, records, 500, jobs=1, progress=False)
    assert report.todo == 4 and len(report.done) == 4 and "4 of 4 volumes to prepare" in report.message
    prepare(parallel, records, 500, jobs=2, progress=False)
    for r in records:
        a, b = serial.load(r), parallel.load(r)
        assert a.checksum == b.checksum
        ta, tb = load_targets(serial, a, 500), load_targets(parallel, b, 500)
        np.testing.assert_array_equal(np.asarray(ta.skeleton), np.asarray(tb.skeleton))
        np.testing.assert_array_equal(np.asarray(ta.distance), np.asarray(tb.distance))
        np.testing.assert_array_equal(ta.fg_points, tb.fg_points)
    stamp = (parallel.folder(records[0]) / "distance.zarr" / "zarr.json").stat().st_mtime_ns
    again = prepare(parallel, records, 500, jobs=2, progress=False)
    assert again.todo == 0 and again.message == "cache: all 4 volumes prepared"
    assert (parallel.folder(records[0]) / "distance.zarr" / "zarr.json").stat().st_mtime_ns == stamp
    assert (tmp_path / "two" / "prepare_rate.json").is_file()  # the next estimate uses this machine's rate


@pytest.mark.slow
def test_a_killed_cache_build_resumes(tmp_path):
    """`cache build` killed mid-way (SIGKILL of its whole process group) leaves only complete
    entries; the next run prepares the rest and ends where an uninterrupted build ends."""
    from vesuvius_lab.manifest import build_manifest, load_manifest
    from vesuvius_lab.synth import synth

    root, manifest = tmp_path / "data", tmp_path / "m.yaml"
    synth(root, volumes=10, shape=(64, 64, 64), seed=5, scrolls=3, test_volumes=0, progress=False)
    build_manifest(root, progress=False).save(manifest)
    records = discover(root)[0]
    cache_dir = tmp_path / "cache"
    cmd = [sys.executable, "-m", "vesuvius_lab", "cache", "build", str(manifest), "--jobs", "1", "--cache-dir", str(cache_dir)]
    env = dict(os.environ, VLAB_CACHE_DIR=str(tmp_path / "unused"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    cache = VolumeCache(cache_dir)
    deadline = time.monotonic() + 300
    while sum(is_prepared(cache, r, None) for r in records) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # our own child's process group, started above
    proc.wait()
    ready = sum(is_prepared(cache, r, None) for r in records)
    assert 2 <= ready < len(records)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "prepared" in done.stdout and "were ready" in done.stdout
    assert int(done.stdout.split("(")[-1].split()[0]) >= ready - 1  # the finished entries were kept, not redone
    reference = VolumeCache(tmp_path / "reference")
    train, val = load_manifest(manifest).split_records()
    prepare(reference, train, 20000, jobs=1, progress=False, plain=val)
    for r in train:
        assert is_prepared(cache, r, 20000)
        a, b = cache.load(r), reference.load(r)
        assert a.checksum == b.checksum
        np.testing.assert_array_equal(np.asarray(load_targets(cache, a, 20000).distance),
                                      np.asarray(load_targets(reference, b, 20000).distance))
    assert not list(cache_dir.rglob("*.tmp"))  # a killed write left nothing behind once rebuilt
