import numpy as np
import torch

from pipeline_helpers import make_dataset, strong_augment
from vesuvius_lab.augment import _resample_cpu, _resample_grid, apply_batch
from vesuvius_lab.config import AugmentConfig
from vesuvius_lab.sampling import collate


def test_untransformed_patch_is_an_exact_crop_of_all_arrays(tiny_root, tmp_path):
    ds = make_dataset(tiny_root, tmp_path / "c", augment=AugmentConfig(enabled=False))
    s = ds[5]
    t = ds.volume(int(s["volume_index"]))
    z, y, x = s["box_origin"].tolist()
    crop = (slice(z, z + 32), slice(y, y + 32), slice(x, x + 32))
    np.testing.assert_array_equal(s["label"].numpy(), t.volume.label[crop])
    np.testing.assert_array_equal(s["skeleton"].numpy(), t.skeleton[crop])
    np.testing.assert_allclose(s["image"][0].numpy(), t.volume.image[crop] / 255, rtol=1e-6)
    np.testing.assert_allclose(s["distance"].numpy(), t.distance[crop].astype(np.float32))


def test_flips_and_permutations_are_exact(tiny_root, tmp_path):
    plain = make_dataset(tiny_root, tmp_path / "c", augment=AugmentConfig(enabled=False))
    flipped = make_dataset(tiny_root, tmp_path / "c", augment=AugmentConfig(
        p_rotation=0, p_scale=0, p_elastic=0, p_flip=0.5, p_gamma=0, p_contrast=0, p_noise=0, p_blur=0))
    for g in range(6):
        raw = flipped.draw(g)
        out = flipped[g]
        ref = plain.volume(int(raw["volume_index"])).volume.label
        z, y, x = raw["box_origin"].tolist()
        expect = np.asarray(ref[z : z + 32, y : y + 32, x : x + 32]).transpose(raw["perm"].tolist())
        for axis in np.flatnonzero(raw["flips"].numpy()):
            expect = np.flip(expect, axis)
        np.testing.assert_array_equal(out["label"].numpy(), expect)


def test_strong_augmentation_keeps_labels_and_aligns_targets(tiny_root, tmp_path):
    ds = make_dataset(tiny_root, tmp_path / "c", augment=strong_augment(max_rotation_deg=45))
    inside, outside, fg_voxels = [], [], 0
    for g in range(24):
        s = ds[g]
        lab, skel, dist = s["label"].numpy(), s["skeleton"].numpy(), s["distance"].numpy()
        assert set(np.unique(lab)) <= {0, 1, 2}
        assert set(np.unique(skel)) <= {0, 1}
        assert (lab[skel == 1] == 1).all()  # nearest-neighbour resampling picks the same source voxel
        inside.append(dist[lab == 1])
        outside.append(dist[lab == 0])
        fg_voxels += int((lab == 1).sum())
        assert np.isfinite(s["image"].numpy()).all()
    inside, outside = np.concatenate(inside), np.concatenate(outside)
    assert fg_voxels > 1000
    assert (inside < 0.5).mean() > 0.97 and (outside > -0.5).mean() > 0.97


def test_device_batched_path_equals_worker_path(tiny_root, tmp_path):
    """The same parameters resampled as a batch (as on a GPU) give the worker's patches."""
    ds = make_dataset(tiny_root, tmp_path / "c", augment=strong_augment())
    worker = [ds[g] for g in range(4)]
    batch = collate([ds.draw(g) for g in range(4)])  # boxes of different sizes, padded
    out = apply_batch({k: v.to("cpu") for k, v in batch.items()}, ds.patch)
    for i, w in enumerate(worker):
        assert torch.equal(out["label"][i], w["label"]) and torch.equal(out["skeleton"][i], w["skeleton"])
        torch.testing.assert_close(out["image"][i], w["image"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["distance"][i], w["distance"], atol=1e-4, rtol=1e-4)


def test_intensity_augmentation_changes_only_the_image(tiny_root, tmp_path):
    base = make_dataset(tiny_root, tmp_path / "c", augment=AugmentConfig(enabled=False))
    inten = make_dataset(tiny_root, tmp_path / "c", augment=strong_augment(p_rotation=0, p_scale=0, p_elastic=0, p_flip=0, permute_axes=False))
    a, b = base[3], inten[3]
    assert torch.equal(a["label"], b["label"]) and torch.equal(a["distance"], b["distance"])
    assert not torch.allclose(a["image"], b["image"])


def test_cpu_kernel_resamples_as_grid_sample(tiny_root, tmp_path):
    """The CPU's compiled pass and the device's grid_sample give the same patches, flips, axis
    permutations and elastic displacement included: labels agree but for rounding ties at half-voxel
    points, image and distance to float rounding."""
    ds = make_dataset(tiny_root, tmp_path / "c", augment=strong_augment(max_rotation_deg=45))
    for p_elastic in (0.0, 1.0):
        ds.augment.p_elastic = p_elastic
        batch = collate([ds.draw(g) for g in range(6)])
        assert not batch["identity"].any() and (batch["elastic"].abs().amax() > 0) == (p_elastic > 0)
        cpu, grid = _resample_cpu(batch, ds.patch), _resample_grid(batch, ds.patch)
        for key in ("label", "skeleton"):
            assert cpu[key].dtype == grid[key].dtype and (cpu[key] != grid[key]).float().mean() < 1e-4
        torch.testing.assert_close(cpu["image"], grid["image"], atol=1e-5, rtol=0)
        torch.testing.assert_close(cpu["distance"], grid["distance"], atol=2e-4, rtol=0)


def test_nnunets_intensity_transforms_do_what_they_say():
    """Brightness multiplies, inverted gamma is 1 - (1 - x) ** g, simulated low resolution keeps the
    shape but loses the finest detail; each alone, on images in [0, 1]."""
    from vesuvius_lab.augment import IntensityParams, _intensity

    z = torch.linspace(0, 1, 16)
    image = (z[:, None, None] * torch.ones(16, 16, 16) * torch.linspace(0.2, 1, 16))[None, None]

    def run(**params):
        return _intensity(image.clone(), torch.from_numpy(IntensityParams(**params).as_array())[None])

    torch.testing.assert_close(run(), image)
    torch.testing.assert_close(run(brightness=1.2), image * 1.2)
    torch.testing.assert_close(run(gamma_inverted=1.5), 1 - (1 - image) ** 1.5)
    noise = torch.rand((1, 1, 16, 16, 16), generator=torch.Generator().manual_seed(0))
    low = _intensity(noise.clone(), torch.from_numpy(IntensityParams(lowres_scale=0.5).as_array())[None])
    assert low.shape == noise.shape and float(low.std()) < 0.7 * float(noise.std())  # the finest detail is gone
