import math

import numpy as np
import pytest
import torch

from pipeline_helpers import make_dataset, strong_augment
from vesuvius_lab.config import AugmentConfig, load_config
from vesuvius_lab.loader import build_loader
from vesuvius_lab.sampling import Coverage, EpochLayout, coverage, is_foreground_draw, unique_patches


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("augment_where", ["worker", "device"])
def test_same_seed_same_patches_with_0_1_2_workers(tiny_root, tmp_path, augment_where):
    ds = make_dataset(tiny_root, tmp_path / "c", augment=strong_augment(), batch=2)
    ds.device_augment = augment_where == "device"
    ds.prepare(progress=False)
    results = []
    for workers in (0, 1, 2):
        cfg = load_config(None, [f"training.workers={workers}", "training.persistent_workers=false"])
        results.append(_batches(build_loader(ds, cfg, num_steps=3), 3))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            _same(a, b)
    idx = torch.cat([b["index"] for b in results[0]])
    assert idx.tolist() == list(range(6))


def test_resume_at_step_k_continues_the_identical_stream(tiny_root, tmp_path):
    ds = make_dataset(tiny_root, tmp_path / "c", augment=strong_augment())
    cfg = load_config(None, ["training.workers=2", "training.persistent_workers=false"])
    full = _batches(build_loader(ds, cfg, start_step=0, num_steps=5), 5)
    resumed = _batches(build_loader(ds, cfg, start_step=3, num_steps=2), 2)
    for a, b in zip(full[3:], resumed, strict=True):
        _same(a, b)
    assert not torch.equal(full[0]["image"], full[3]["image"])


def test_ranks_draw_disjoint_slices_of_one_stream():
    plan = EpochLayout(10, batch_size=3, world_size=2, steps_per_epoch=5)
    r0 = [i for s in range(4) for i in plan.indices(s, 0)]
    r1 = [i for s in range(4) for i in plan.indices(s, 1)]
    assert not set(r0) & set(r1) and sorted(r0 + r1) == list(range(24))


def test_foreground_fraction_within_5_percent(tiny_root, tmp_path):
    """Over 1000 draws, patches centred on label 1 = setting + chance hits of the uniform draws.

    The 5^3 patch is never clipped at a border (label 1 lies >= 3 voxels inside), so centres are exact.
    """
    rates = {}
    for fraction in (0.0, 0.33, 1.0):
        ds = make_dataset(tiny_root, tmp_path / "c", patch=(5, 5, 5), fg=fraction, augment=AugmentConfig(enabled=False))
        hits = 0
        for g in range(1000):
            s = ds.draw(g)
            c = s["centre"].numpy().astype(int)  # odd patch: the centre is a voxel
            hits += int(s["label"][tuple(c)] == 1)
        rates[fraction] = hits / 1000
        draws = sum(is_foreground_draw(g, fraction) for g in range(1000))
        assert abs(draws / 1000 - fraction) <= 0.001
    chance = rates[0.0]
    assert rates[1.0] == 1.0
    assert abs(rates[0.33] - (0.33 + 0.67 * chance)) <= 0.05, rates


def test_all_ignore_patches_are_redrawn(tiny_root, tmp_path):
    ds = make_dataset(tiny_root, tmp_path / "c", patch=(8, 8, 8), fg=0.0, augment=AugmentConfig(enabled=False))
    ds.sampler.max_redraws = 20
    all_ignored = sum(bool((ds.draw(g)["label"] == 2).all()) for g in range(300))
    ds.sampler.max_redraws = 0
    without = sum(bool((ds.draw(g)["label"] == 2).all()) for g in range(300))
    assert without > 10 and all_ignored == 0


def test_volume_smaller_than_patch_is_padded(tiny_root, tmp_path):
    ds = make_dataset(tiny_root, tmp_path / "c", patch=(56, 64, 40), augment=AugmentConfig(enabled=False), fg=0.0)
    s = ds[0]
    assert s["image"].shape == (1, 56, 64, 40) and s["label"].shape == (56, 64, 40)
    vol = ds.volume(int(s["volume_index"])).volume
    lab = s["label"].numpy()
    # 48^3 volume centred in 56x64: the padding rows are ignore (2) and image 0; the inside is an exact crop.
    assert (lab[:4] == 2).all() and (lab[-4:] == 2).all() and (s["image"][0, :4] == 0).all()
    np.testing.assert_array_equal(lab[4:52, 8:56, :], np.asarray(vol.label)[:, :, s["box_origin"][2] : s["box_origin"][2] + 40])


def test_full_pass_visits_every_volume_patches_per_volume_times(tiny_root, tmp_path):
    ds = make_dataset(tiny_root, tmp_path / "c", ppv=3, batch=4, augment=AugmentConfig(enabled=False))
    plan = ds.layout
    assert plan.samples_in_pass == 18 and plan.steps == 5  # ceil(18 / 4), last batch topped up
    counts = np.bincount([plan.volume_of(g, np.random.default_rng(g)) for g in range(18)], minlength=6)
    assert counts.tolist() == [3] * 6
    dropped = EpochLayout(6, 4, patches_per_volume=3, drop_last=True)
    assert dropped.steps == 4 and dropped.samples_per_epoch == 16
    second_epoch = [plan.volume_of(g, None) for g in range(20, 38)]
    assert np.bincount(second_epoch, minlength=6).tolist() == [3] * 6  # reshuffled, still complete


def test_coverage_estimate():
    assert unique_patches([(320, 320, 320), (256, 256, 256)], (128, 128, 128)) == 27 + 8
    plan = EpochLayout(806, 2, steps_per_epoch=2000)
    cov = coverage(plan, [(320, 320, 320)] * 806, (72, 136, 136))
    assert cov.unique_patches == 806 * 5 * 3 * 3 and cov.samples_per_epoch == 4000
    assert cov.ratio == pytest.approx(4000 / 36270) and 0 < cov.expected_distinct < cov.ratio
    unknown = Coverage(4000, 0)  # shapes missing from the manifest: the planner's coverage reads the same
    assert math.isnan(unknown.ratio) and math.isnan(unknown.expected_distinct)


def test_spawn_workers_give_the_same_stream(tiny_root, tmp_path):
    ds = make_dataset(tiny_root, tmp_path / "c", augment=strong_augment())
    ds.prepare(progress=False)
    ref = _batches(build_loader(ds, load_config(None, ["training.workers=0"]), num_steps=2), 2)
    cfg = load_config(None, ["training.workers=1", "training.multiprocessing_context=spawn", "training.prefetch_factor=1"])
    for a, b in zip(ref, _batches(build_loader(ds, cfg, num_steps=2), 2), strict=True):
        _same(a, b)
