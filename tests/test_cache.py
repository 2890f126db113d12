import os

import numpy as np

from vesuvius_lab.cache import VolumeCache
from vesuvius_lab.layout import discover
from vesuvius_lab.io import read_volume, write_volume


def test_cache_is_memmapped_reused_and_rebuilt_on_change(data_copy, tmp_path):
    cache = VolumeCache(tmp_path / "cache")
    record = discover(data_copy)[0][0]
    first = cache.load(record)
    assert isinstance(first.image, np.memmap) and not first.image.flags.writeable
    np.testing.assert_array_equal(first.label, read_volume(record.label))
    mtime = (first.folder / "image.npy").stat().st_mtime_ns
    assert cache.load(record).checksum == first.checksum
    assert (first.folder / "image.npy").stat().st_mtime_ns == mtime  # reused, not rebuilt

    lab = read_volume(record.label).copy()
    lab[lab == 1] = 0
    write_volume(record.label, lab)
    os.utime(record.label, ns=(mtime + 10**9, mtime + 10**9))
    assert not cache.is_fresh(record)
    second = cache.load(record)
    assert second.checksum != first.checksum and (second.label == 1).sum() == 0


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
    assert len(calls) == 1 and np.array_equal(a, b)
    cache.derived(vol, "fg", "v2", compute)  # a new algorithm version recomputes
    assert len(calls) == 2
