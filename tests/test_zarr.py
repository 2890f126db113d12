"""Zarr / OME-Zarr records: manifest, validation without whole reads, sampling, windowed predict
into Zarr with parts, and a Zarr-backed manifest end to end (validate, train, predict, evaluate)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from vesuvius_lab.cache import VolumeCache
from vesuvius_lab.config import Config, DataConfig, ModelConfig, PostprocessConfig, ValConfig
from vesuvius_lab.errors import DataError, VLabError
from vesuvius_lab.inference import predict_volume
from vesuvius_lab.io import ZarrRef, ZarrVolume, parse_crop, read_volume
from vesuvius_lab.layout import discover
from vesuvius_lab.manifest import load_manifest
from vesuvius_lab.model import build_model
from vesuvius_lab.predict import blocks, predict_block, predict_store
from vesuvius_lab.preflight import preflight

EDGE = 48  # the tiny dataset's volumes


def write_ome_zarr(path: Path, volume: np.ndarray, chunks=(8, 16, 16)) -> None:
    """A two-level OME-Zarr 0.4 multiscale image (level 1 = every other voxel)."""
    group = zarr.open_group(str(path), mode="w", attributes={"multiscales": [{
        "version": "0.4", "axes": [{"name": a, "type": "space"} for a in "zyx"],
        "datasets": [{"path": "0"}, {"path": "1"}]}]})
    for name, data in (("0", volume), ("1", volume[::2, ::2, ::2])):
        group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks)[...] = data


@pytest.fixture()
def zarr_root(tiny_root, tmp_path) -> Path:
    """The tiny dataset's training volumes side by side along x in one 'scroll' store (image:
    OME-Zarr with two levels; labels: a plain array in a second store), one record per crop; the
    last record's label is a TIFF. Written with its manifest (zarr.yaml)."""
    records = discover(tiny_root)[0]
    root = tmp_path / "zarrdata"
    root.mkdir()
    image = np.concatenate([read_volume(r.image) for r in records], axis=2)
    label = np.concatenate([read_volume(r.label) for r in records], axis=2)
    write_ome_zarr(root / "scroll.zarr", image)
    labels = zarr.open_group(str(root / "labels.zarr"), mode="w")
    labels.create_array("surface", shape=label.shape, dtype="uint8", chunks=(8, 16, 16))[...] = label
    items = []
    for k, r in enumerate(records):
        crop = f"0:{EDGE},0:{EDGE},{k * EDGE}:{(k + 1) * EDGE}"
        item = {"id": r.id, "scroll_id": r.scroll_id, "image": {"store": "scroll.zarr", "level": 0, "crop": crop},
                "label": {"store": "labels.zarr", "array": "surface", "crop": crop}}
        if k == len(records) - 1:
            shutil.copy(r.label, root / f"{r.id}_label.tif")
            item["label"] = f"{r.id}_label.tif"
        items.append(item)
    doc = {"format": "vesuvius_lab.manifest/1", "name": "zarr", "root": ".", "records": items,
           "split": {"policy": "by_scroll_id", "val_fraction": 0.34, "seed": 0}}
    (root / "zarr.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root


def test_zarr_records_load_resolve_and_round_trip(zarr_root, tmp_path):
    manifest = load_manifest(zarr_root / "zarr.yaml")
    rec = manifest.records[0]
    assert rec.image == "scroll.zarr" and rec.image_ref == ZarrRef("", 0, ((0, 48), (0, 48), (0, 48)))
    assert manifest.records[-1].label_ref is None
    manifest.save(tmp_path / "again.yaml")
    again = load_manifest(tmp_path / "again.yaml", root=zarr_root)
    assert [(r.image, r.image_ref, r.label, r.label_ref) for r in again.records] == \
        [(r.image, r.image_ref, r.label, r.label_ref) for r in manifest.records]
    found, problems = manifest.locate()
    assert len(found) == len(manifest.records) and not problems

    doc = yaml.safe_load((zarr_root / "zarr.yaml").read_text())
    doc["records"][0]["image"]["crop"] = "0:48,0:48"
    doc["records"][1]["image"]["colour"] = "red"
    doc["records"][2]["image"] = {"store": "../outside.zarr"}
    (zarr_root / "bad.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(VLabError) as err:
        load_manifest(zarr_root / "bad.yaml")
    lines = err.value.lines
    assert any("record #0" in line and "z0:z1,y0:y1,x0:x1" in line for line in lines)
    assert any("record #1" in line and "unknown keys ['colour']" in line for line in lines)


def test_zarr_volume_levels_crops_and_errors(zarr_root):
    store = zarr_root / "scroll.zarr"
    full = zarr.open_group(str(store), mode="r")["0"][:]
    vol = ZarrVolume(store, ZarrRef("", 0, parse_crop("4:20,8:40,50:90")))
    assert vol.shape == (16, 32, 40) and vol.dtype == np.uint8
    np.testing.assert_array_equal(vol.read(), full[4:20, 8:40, 50:90])
    np.testing.assert_array_equal(vol.read((slice(2, 5), slice(0, 3), slice(10, 11))), full[6:9, 8:11, 60:61])
    assert ZarrVolume(store, ZarrRef(level=1)).shape == tuple((s + 1) // 2 for s in full.shape)
    for ref, message in ((ZarrRef(level=2), "scroll.zarr level 2: no such level (the multiscale group has levels 0-1)"),
                         (ZarrRef(crop=((0, 48), (0, 49), (0, 10))), "exceeds the array shape"),
                         (ZarrRef(array="nope"), "cannot open as Zarr")):
        with pytest.raises(DataError, match=re.escape(message)):
            ZarrVolume(store, ref)
    with pytest.raises(DataError, match="without OME-Zarr multiscales; name an array .arrays: surface."):
        ZarrVolume(zarr_root / "labels.zarr")


def test_validate_checks_zarr_records_from_metadata_and_spot_chunks(zarr_root, cli):
    assert preflight(zarr_root / "zarr.yaml", patch_size=(32, 32, 32), progress=False) == []
    code, lines, err = cli("validate", zarr_root / "zarr.yaml")
    assert code == 0, err

    labels = zarr.open_array(str(zarr_root / "labels.zarr"), path="surface", mode="r+")
    labels[0, 0, 0] = 7  # a corner chunk: spot-checked
    middle = zarr_root / "labels.zarr" / "surface" / "c" / "1" / "0" / "0"  # z 8:16 of record 0: no spot check's
    middle.write_bytes(b"garbage")
    notes: list[str] = []
    problems = preflight(zarr_root / "zarr.yaml", patch_size=(64, 64, 64), progress=False, say=notes.append)
    assert any("labels.zarr/surface" in p and "label values {7} outside {0, 1, 2}" in p for p in problems)
    assert any("smaller than the patch size (64, 64, 64)" in n and "with the ignore label in training" in n for n in notes)
    assert not any("smaller than the patch" in p for p in problems)
    assert not any("unreadable chunk" in p for p in problems)  # never decoded: validation reads a few chunks only
    manifest = load_manifest(zarr_root / "zarr.yaml")
    with pytest.raises(DataError, match="unreadable chunk data"):  # the cache build decodes all and says so
        VolumeCache(zarr_root / "cache").load(manifest.record(manifest.records[0].id))


def test_cache_follows_a_rewritten_zarr_chunk(zarr_root, tmp_path):
    manifest = load_manifest(zarr_root / "zarr.yaml")
    record = manifest.record(manifest.records[0].id)
    cache = VolumeCache(tmp_path / "cache")
    first = cache.load(record)
    np.testing.assert_array_equal(np.asarray(first.image), ZarrVolume(record.image, record.image_ref).read())
    assert cache.folder(record) != cache.folder(manifest.record(manifest.records[1].id))  # same store, other crop
    arr = zarr.open_array(str(zarr_root / "scroll.zarr"), path="0", mode="r+")
    arr[10, 10, 10] = 255 - arr[10, 10, 10]
    assert not cache.is_fresh(record)
    assert cache.load(record).checksum != first.checksum


@pytest.fixture()
def one_thread():
    """Tiny models run fastest on one thread (and a busy machine's spinning OpenMP threads slow them 30x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model_config(patch=16) -> tuple[torch.nn.Module, Config]:
    torch.manual_seed(0)
    config = Config(data=DataConfig(patch_size=[patch] * 3), model=ModelConfig(features=[4, 8], deep_supervision_heads=1),
                    val=ValConfig(overlap=0.25, batch=4), postprocess=PostprocessConfig(min_component_size=5))
    return build_model(config.model).eval(), config


def test_windowed_zarr_predict_equals_the_in_memory_path(zarr_root, tmp_path, one_thread):
    model, config = tiny_model_config()
    store, ref = zarr_root / "scroll.zarr", ZarrRef(crop=((0, 40), (4, 44), (10, 74)))
    image = ZarrVolume(store, ref).read()
    # one block holding the whole crop: exactly the in-memory path
    whole = tmp_path / "whole.zarr"
    predict_store(model, config, store, ref, whole, torch.device("cpu"), block=(64, 64, 64), probability=True, progress=False)
    expected = predict_volume(model, image, config, "cpu")
    np.testing.assert_array_equal(zarr.open_group(str(whole))["mask"][:], expected.mask.astype(np.uint8))
    np.testing.assert_array_equal(zarr.open_group(str(whole))["probability"][:],
                                  np.round(expected.probability * 255).astype(np.uint8))
    # blocks of 32 in two parts, written by two calls into one store: block by block the in-memory path
    split = tmp_path / "split.zarr"
    first = predict_store(model, config, store, ref, split, torch.device("cpu"), part=(1, 2), block=(32, 32, 32), progress=False)
    assert first["done"] < first["blocks"] and first["written"] == first["part_blocks"]
    last = predict_store(model, config, store, ref, split, torch.device("cpu"), part=(2, 2), block=(32, 32, 32), progress=False)
    assert last["done"] == last["blocks"] == len(blocks(image.shape, (32, 32, 32), (8, 8, 8)))
    manual = np.zeros(image.shape, np.uint8)
    for core, read in blocks(image.shape, (32, 32, 32), (8, 8, 8)):
        manual[core] = predict_block(model, image[read], core, read, config, torch.device("cpu"))[0]
    np.testing.assert_array_equal(zarr.open_group(str(split))["mask"][:], manual)
    # a killed part resumes: only the unmarked block is predicted again
    (split / ".blocks" / "3").unlink()  # block 3 is part 2's
    again = predict_store(model, config, store, ref, split, torch.device("cpu"), part=(2, 2), block=(32, 32, 32), progress=False)
    assert again["written"] == 1 and again["done"] == again["blocks"]
    with pytest.raises(DataError, match="holds another prediction"):
        predict_store(model, config, store, ZarrRef(crop=((0, 40), (0, 48), (0, 48))), split, torch.device("cpu"),
                      block=(32, 32, 32), progress=False)


@pytest.mark.slow
def test_a_zarr_manifest_end_to_end(zarr_root, tiny_root, tmp_path, cli):
    """validate -> train two steps -> predict (Zarr, two parts) -> evaluate, all on Zarr records."""
    from lab_runs_helpers import write_tiny_config
    from vesuvius_lab.config import load_config
    from vesuvius_lab.evaluate import evaluate_checkpoint
    from vesuvius_lab.leaderboard import volume_score
    from vesuvius_lab.training import train

    code, _, err = cli("validate", zarr_root / "zarr.yaml", "--patch-size", "16")
    assert code == 0, err
    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=2, epochs=1, data={"manifest": str(zarr_root / "zarr.yaml")},
                            training={"checkpoint_every_steps": 2, "workers": 2}, val={"max_volumes": 1})
    code, lines, err = cli("cache", "build", cfg, "--jobs", "2", "--no-progress")
    assert code == 0 and "prepared" in lines[-1], err
    result = train(load_config(cfg), tmp_path / "run", progress=False)
    assert result["state"] == "finished" and result["step"] == 2
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    manifest = load_manifest(zarr_root / "zarr.yaml")
    _, val_ids = manifest.split_ids()
    val = manifest.entry(val_ids[0])
    crop = ",".join(f"{a}:{b}" for a, b in val.image_ref.crop)
    for part in ("1/2", "2/2"):
        code, lines, err = cli("predict", "--checkpoint", ckpt, "--input", zarr_root / "scroll.zarr", "--crop", crop,
                               "--output", tmp_path / "pred", "--part", part, "--block", "64")
        assert code == 0 and lines == [f"part {part}: wrote {tmp_path / 'pred' / 'scroll.zarr'}"], err
    mask = zarr.open_group(str(tmp_path / "pred" / "scroll.zarr"))["mask"][:]
    results = evaluate_checkpoint(ckpt, cache_dir=tmp_path / "eval-cache", max_volumes=1)
    assert results[0].id == val.id
    np.testing.assert_array_equal(mask, results[0].mask.astype(np.uint8))  # one block: the validation path's mask
    label = np.asarray(results[0].label)
    assert volume_score(mask, label).as_dict() == pytest.approx(results[0].scores)
    code, _, err = cli("predict", "--checkpoint", ckpt, "--input", zarr_root / "scroll.zarr", "--crop", "0:1",
                       "--output", tmp_path / "pred2")
    assert code == 2 and "z0:z1,y0:y1,x0:x1" in err[0]


@pytest.mark.gui
def test_napari_shows_a_zarr_record_lazily_with_its_coarser_level(viewer, zarr_root, tmp_path):
    from conftest_gui import assert_rendered
    from vesuvius_lab.lab import views

    manifest = load_manifest(zarr_root / "zarr.yaml")
    record = manifest.record(manifest.records[1].id)
    volume = VolumeCache(tmp_path / "cache").load(record)
    layers = views.show_record(viewer, volume)
    image = layers[0]
    assert image.multiscale and [tuple(level.shape) for level in image.data] == [(48, 48, 48), (24, 24, 24)]
    coarse = zarr.open_group(str(zarr_root / "scroll.zarr"))["1"][:, :, 24:48]
    np.testing.assert_array_equal(np.asarray(image.data[1]), coarse)  # the record's crop of level 1
    np.testing.assert_array_equal(np.asarray(layers[1].data[5]), np.asarray(volume.label)[5])
    shot = tmp_path / "zarr-record.png"
    viewer.screenshot(path=str(shot), canvas_only=True)
    assert_rendered(shot)


def test_default_blocks_keep_a_kaggle_volume_whole_and_cut_a_scroll():
    from vesuvius_lab.predict import default_block

    assert default_block((128, 128, 128), (320, 320, 320)) == (320, 320, 320)  # one block, no halo work
    assert default_block((64, 64, 64), (320, 1024, 1024)) == (320, 256, 256)
    assert default_block((160, 160, 160), (14000, 8000, 8000)) == (320, 320, 320)
    assert len(blocks((320, 1024, 1024), (320, 256, 256), (32, 32, 32))) == 16
