"""vesuvius_lab.lab.records: record listing, lazy volumes, predictions, sampled patches, coverage."""

import math
import shutil

import numpy as np
import pytest

from vesuvius_lab.cache import ChunkedArray
from vesuvius_lab.config import AugmentConfig, SamplerConfig, TrainingConfig
from vesuvius_lab.errors import ConfigError, DataError
from vesuvius_lab.io import read_volume
from vesuvius_lab.lab import records
from vesuvius_lab.manifest import build_manifest, load_manifest
from vesuvius_lab.sampling import is_foreground_draw
from vesuvius_lab.synth import synth


@pytest.fixture()
def manifest(tiny_manifest):
    return load_manifest(tiny_manifest)


def test_record_infos_give_split_shape_and_histogram(manifest):
    infos = records.record_infos(manifest)
    train, val = manifest.split_ids()
    assert [i.id for i in infos] == [r.id for r in manifest.records]
    assert {i.id for i in infos if i.split == "val"} == set(val) and val
    assert {i.id for i in infos if i.split == "train"} == set(train)
    first = infos[0]
    assert first.shape == (48, 48, 48) and sum(first.histogram.values()) == 48**3
    assert first.title == f"{first.id} · scroll {first.scroll_id} · {first.split}"
    rows = records.histogram_rows(manifest, first)
    assert [r[0] for r in rows] == ["0 background", "1 recto papyrus surface", "2 unlabeled (ignored)"]
    assert math.isclose(sum(float(r[2].rstrip("%")) for r in rows), 100.0, abs_tol=0.2)


def test_open_record_gives_lazy_cache_arrays(manifest, tmp_path):
    rec = manifest.records[1]
    volume = records.open_record(manifest, rec.id, tmp_path / "cache")
    assert isinstance(volume.image, ChunkedArray) and volume.image.shape == (48, 48, 48)
    np.testing.assert_array_equal(np.asarray(volume.label), read_volume(manifest.resolve(rec).label))
    with pytest.raises(ConfigError, match="not in manifest"):
        records.open_record(manifest, "nope")


def test_open_prediction_checks_format_and_shape(tmp_path):
    assert records.open_prediction(None, (4, 4, 4)) is None
    np.save(tmp_path / "p.npy", np.zeros((4, 4, 4), np.float32))
    assert isinstance(records.open_prediction(tmp_path / "p.npy", (4, 4, 4)), np.memmap)
    with pytest.raises(DataError, match="does not match"):
        records.open_prediction(tmp_path / "p.npy", (4, 4, 5))
    with pytest.raises(DataError, match=".npy or .tif"):
        records.open_prediction(tmp_path / "p.png", (4, 4, 4))


def test_sample_patches_follow_the_training_sampler(manifest, tmp_path):
    rid = manifest.records[2].id
    kwargs = dict(patch_size=(16, 16, 16), n=9, seed=4, sampler=SamplerConfig(fg_fraction=0.5),
                  augment=AugmentConfig(enabled=False), cache_dir=tmp_path / "c")
    patches = records.sample_patches(manifest, rid, **kwargs)
    assert [p["index"] for p in patches] == list(range(9))
    assert {p["record_id"] for p in patches} == {rid}
    assert [p["foreground_draw"] for p in patches] == [is_foreground_draw(g, 0.5) for g in range(9)]
    again = records.sample_patches(manifest, rid, **kwargs)
    for a, b in zip(patches, again, strict=True):
        np.testing.assert_array_equal(a["corners"], b["corners"])
    other = records.sample_patches(manifest, rid, **{**kwargs, "seed": 5})
    assert any(not np.array_equal(a["corners"], b["corners"]) for a, b in zip(patches, other, strict=True))


def test_epoch_coverage_uses_training_split_and_plan(manifest):
    training = TrainingConfig(train_batch_size=3, train_iterations_per_epoch=5)
    cov = records.epoch_coverage(manifest, (16, 16, 16), training)
    n_train = len(manifest.split_ids()[0])
    assert cov.unique_patches == n_train * 3**3  # 48 / 16 = 3 positions per axis
    assert cov.samples_per_epoch == 15
    rows = dict(records.coverage_rows(cov))
    assert rows["unique patches"] == f"{n_train * 27:,}" and rows["samples per epoch"] == "15"
    assert rows["coverage ratio"] == f"{15 / (n_train * 27):.2f}"
    assert rows["expected distinct share"] == f"{100 * (1 - math.exp(-15 / (n_train * 27))):.1f}%"


def test_open_manifest_generates_missing_synthetic_data(tmp_path):
    root = tmp_path / "demo"
    synth(root, volumes=2, shape=(24, 24, 24), seed=9, scrolls=2, test_volumes=0, progress=False)
    manifest = build_manifest(root, progress=False)
    manifest.synth = {"volumes": 2, "shape": [24, 24, 24], "seed": 9, "scrolls": 2, "test_volumes": 0}
    manifest.save(tmp_path / "demo.yaml")
    shutil.rmtree(root)
    opened = records.open_manifest(tmp_path / "demo.yaml")
    found, problems = opened.locate()
    assert problems == [] and [r.id for r in found] == [r.id for r in manifest.records]
