"""Volumes smaller than the patch along some axis, in a dataset of mixed, non-cubic shapes: the
preflight notes them, the sampler pads them with the ignore label, the losses ignore the padding,
and training, validation, prediction and evaluation keep every volume's own shape."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lab_runs_helpers import write_tiny_config
from vesuvius_lab.config import load_config
from vesuvius_lab.data import open_data
from vesuvius_lab.evaluate import evaluate_checkpoint
from vesuvius_lab.io import read_volume, write_volume
from vesuvius_lab.layout import IGNORE_LABEL
from vesuvius_lab.losses import TopologyLoss
from vesuvius_lab.sampling import PAD
from vesuvius_lab.synth import SCROLL_IDS, make_volume, scroll_style

PATCH = (48, 48, 48)
# (id, shape): three scrolls; 1000, 1002 and 1004 are smaller than PATCH (along z, z and y)
TRAIN = [("1000", (40, 56, 64)), ("1001", (48, 72, 48)), ("1002", (40, 56, 64)),
         ("1003", (48, 72, 48)), ("1004", (56, 40, 50)), ("1005", (48, 48, 48))]
TEST = [("2000", (40, 56, 64)), ("2001", (30, 60, 20))]
VAL_IDS = ["1001", "1004"]  # scroll 35360, which the manifest's seeded split holds out
FULLY_LABELLED = "1000"  # no label 2 of its own: every label 2 in its patches is padding


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory) -> Path:
    """Synthetic volumes of the shapes above, in the Kaggle layout; read-only for tests."""
    root = tmp_path_factory.mktemp("mixed") / "data"
    rows = []
    for k, (rid, shape) in enumerate(TRAIN + TEST):
        image, label = make_volume(shape, 5, k, scroll_style(5, k % 3))
        if rid == FULLY_LABELLED:
            label[label == IGNORE_LABEL] = 0
        if k < len(TRAIN):
            write_volume(root / "train_images" / f"{rid}.tif", image)
            write_volume(root / "train_labels" / f"{rid}.tif", label)
            rows.append(f"{rid},{SCROLL_IDS[k % 3]}\n")
        else:
            write_volume(root / "test_images" / f"{rid}.tif", image)
    (root / "train.csv").write_text("id,scroll_id\n" + "".join(rows))
    return root


def small(shape, patch=PATCH) -> bool:
    return any(s < p for s, p in zip(shape, patch, strict=True))


def test_validate_notes_volumes_smaller_than_the_patch(cli, mixed_root, tmp_path):
    code, out, err = cli("validate", mixed_root, "--patch-size", "48")
    assert code == 0 and err == []
    assert out[-1] == f"{mixed_root}: ok"
    notes = [line for line in out if line.startswith("note: ")]
    assert len(notes) == sum(small(shape) for _, shape in TRAIN) == 3
    assert notes[0] == (f"note: {mixed_root / 'train_images' / '1000.tif'}: volume shape (40, 56, 64) is smaller than "
                        "the patch size (48, 48, 48) along z; padded to the patch, with the ignore label in training")
    assert "1004.tif: volume shape (56, 40, 50) is smaller than the patch size (48, 48, 48) along y;" in notes[2]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  patch_size: [32, 64, 64]\n")
    code, out, err = cli("validate", mixed_root, "--config", cfg)
    assert code == 0 and err == []
    assert [Path(line.split(": ")[1]).name for line in out[:-1]] == [f"{rid}.tif" for rid, _ in TRAIN]
    assert "1001.tif: volume shape (48, 72, 48) is smaller than the patch size (32, 64, 64) along x;" in out[1]
    assert "1004.tif: volume shape (56, 40, 50) is smaller than the patch size (32, 64, 64) along y, x;" in out[4]
    assert cli("validate", mixed_root, "--patch-size", "32") == (0, [f"{mixed_root}: ok"], [])


def _inside(origin: np.ndarray, patch, shape) -> np.ndarray:
    """Which voxels of an unaugmented patch at ``origin`` lie inside a volume of ``shape``."""
    axes = [(o + np.arange(p) >= 0) & (o + np.arange(p) < n) for o, p, n in zip(origin, patch, shape, strict=True)]
    return axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]


@pytest.mark.slow
@pytest.mark.parametrize("patch", [PATCH, (32, 64, 48)])
def test_sampler_pads_with_the_ignore_label_and_the_losses_ignore_it(mixed_root, tmp_path, patch):
    config = load_config(write_tiny_config(mixed_root, tmp_path / "cfg", data={"patch_size": list(patch)},
                                           augment={"enabled": False}, sampler={"fg_fraction": 0.5},
                                           training={"train_batch_size": 4}))
    data = open_data(config, check=True)
    assert [r.id for r in data.val] == VAL_IDS
    assert len(data.notes) == sum(small(shape, patch) for _, shape in TRAIN)
    shapes = dict(TRAIN)
    # unique patch positions: an axis smaller than the patch holds one
    assert data.unique_patches(patch) == sum(math.prod(max(1, math.ceil(s / p)) for s, p in zip(shapes[r.id], patch))
                                             for r in data.train)
    data.prepare(config, jobs=1, progress=False)
    dataset = data.patch_dataset(config)
    seen_padded = set()
    samples = [dataset[g] for g in range(24)]
    for sample in samples:
        record = data.train[int(sample["volume_index"])]
        volume = data.cache.load(record)
        origin = sample["box_origin"].numpy()
        inside = _inside(origin, patch, volume.image.shape)
        label, image = sample["label"].numpy(), sample["image"][0].numpy()
        assert (label[~inside] == IGNORE_LABEL).all() and (sample["skeleton"].numpy()[~inside] == PAD["skeleton"]).all()
        assert (image[~inside] == PAD["image"]).all() and (sample["distance"].numpy()[~inside] == PAD["distance"]).all()
        crop = tuple(slice(max(o, 0), o + p) for o, p in zip(origin, patch, strict=True))
        np.testing.assert_array_equal(label[inside], np.asarray(volume.label)[crop].ravel())
        np.testing.assert_array_equal(image[inside], np.asarray(volume.image)[crop].ravel() / np.float32(255))
        for axis, (n, p) in enumerate(zip(volume.image.shape, patch, strict=True)):
            if n < p:  # centred: the padding splits evenly before and after
                before, after = -origin[axis], origin[axis] + p - n
                assert abs(before - after) <= 1 and before > 0
                seen_padded.add(record.id)
    assert FULLY_LABELLED in seen_padded

    # no gradient reaches a padded (or otherwise ignored) voxel through any loss term, at any head
    batch = {k: torch.stack([s[k] for s in samples[:4]]) for k in ("label", "skeleton", "distance")}
    full = torch.randn((4, 1, *patch), requires_grad=True)
    half = torch.randn((4, 1, *(p // 2 for p in patch)), requires_grad=True)
    loss = TopologyLoss(config.loss)
    total, terms = loss([full, half], batch, step=0)
    assert all(terms[t] is not None for t in ("bce", "dice", "cldice", "skeleton_recall", "surface", "topo"))
    total.backward()
    ignored = batch["label"][:, None] == IGNORE_LABEL
    assert ignored.any() and (full.grad[ignored] == 0).all() and full.grad[~ignored].abs().sum() > 0
    assert (half.grad[ignored[:, :, ::2, ::2, ::2]] == 0).all()


@pytest.mark.slow
def test_train_predict_evaluate_on_volumes_smaller_than_the_patch(cli, mixed_root, tmp_path):
    cfg = write_tiny_config(mixed_root, tmp_path / "cfg", steps=3, epochs=1, data={"patch_size": list(PATCH)},
                            val={"max_volumes": len(VAL_IDS), "overlap": 0.25, "batch": 2})
    run = tmp_path / "run"
    code, _, err = cli("train", "--config", cfg, "--run-dir", run, "--no-progress")
    assert code == 0, err
    log = (run / "train.log").read_text()
    assert "1004.tif: volume shape (56, 40, 50) is smaller than the patch size (48, 48, 48) along y;" in log
    vals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "val"]
    assert len(vals) == 1 and 0 <= vals[0]["score"] <= 1
    results = evaluate_checkpoint(run / "checkpoints" / "last.pt")  # notebook 05's path: the same validation
    assert [r.id for r in results] == VAL_IDS
    for r in results:
        assert r.image.shape == r.label.shape == r.probability.shape == r.mask.shape == dict(TRAIN)[r.id]
    assert np.mean([r.scores["score"] for r in results]) == pytest.approx(vals[0]["score"], abs=1e-9)

    # predict keeps each input's shape, whatever its axes against the patch
    out = tmp_path / "pred"
    code, _, err = cli("predict", "--checkpoint", run / "checkpoints" / "last.pt", "--input", mixed_root / "test_images",
                       "--output", out)
    assert code == 0, err
    for rid, shape in TEST:
        mask = read_volume(out / f"{rid}.tif")
        assert mask.shape == shape and set(np.unique(mask)) <= {0, 1}

    # evaluate scores the masks of every training volume; those of the validation split give the
    # score the run's validation logged for the same weights
    out = tmp_path / "pred_train"
    assert cli("predict", "--checkpoint", run / "checkpoints" / "last.pt", "--input", mixed_root / "train_images",
               "--output", out)[0] == 0
    for rid, shape in TRAIN:
        assert read_volume(out / f"{rid}.tif").shape == shape
    code, lines, err = cli("evaluate", "--pred", out, "--labels", mixed_root / "train_labels", "--json")
    assert code == 0, err
    report = json.loads("\n".join(lines))["volumes"]
    assert sorted(report) == [rid for rid, _ in TRAIN] and all(0 <= r["score"] <= 1 for r in report.values())
    assert np.mean([report[rid]["score"] for rid in VAL_IDS]) == pytest.approx(vals[0]["score"], abs=1e-9)
