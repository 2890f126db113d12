import importlib.util
import json

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import require  # noqa: E402
from pipeline_helpers import make_dataset, strong_augment  # noqa: E402
from vesuvius_lab.bench.input_pipeline import KINDS, nnunet_initial_patch, nnunet_transforms  # noqa: E402
from vesuvius_lab.config import AugmentConfig  # noqa: E402
from vesuvius_lab.preview import box_edges, draw_patches  # noqa: E402


def test_draw_patches_gives_boxes_in_volume_coordinates(tiny_root, tmp_path):
    ds = make_dataset(tiny_root, tmp_path / "c", patch=(16, 24, 24), augment=AugmentConfig(enabled=False))
    patches = draw_patches(ds, 5, start=10)
    assert [p["index"] for p in patches] == list(range(10, 15))
    for p in patches:
        lo, hi = p["corners"].min(axis=0), p["corners"].max(axis=0)
        np.testing.assert_allclose(hi - lo, [15, 23, 23])  # an untransformed patch is axis-aligned
        vol = ds.volume([r.id for r in ds.records].index(p["record_id"])).volume
        z, y, x = lo.astype(int)
        np.testing.assert_array_equal(p["label"], vol.label[z : z + 16, y : y + 24, x : x + 24])
        edges = box_edges(p["corners"])
        assert len(edges) == 12
        lengths = sorted(round(float(np.linalg.norm(e[1] - e[0]))) for e in edges)
        assert lengths == [15] * 4 + [23] * 8


def test_rotated_patch_box_is_rotated(tiny_root, tmp_path):
    ds = make_dataset(tiny_root, tmp_path / "c", augment=strong_augment(p_scale=0, p_elastic=0))
    corners = draw_patches(ds, 1)[0]["corners"]
    edges = box_edges(corners)
    np.testing.assert_allclose(sorted(np.linalg.norm(e[1] - e[0]) for e in edges), [31] * 12, rtol=1e-6)
    assert not np.allclose(corners.max(axis=0) - corners.min(axis=0), 31)  # not axis-aligned any more


def test_montage_has_orthogonal_slices_for_each_sample(tiny_root, tmp_path):
    """Labels in notebook 01's colours with a legend; the distance column with its colour bar."""
    from matplotlib.colors import to_rgba

    from vesuvius_lab.lab.records import LABEL_COLORS
    from vesuvius_lab.lab.plots import montage

    ds = make_dataset(tiny_root, tmp_path / "c", augment=strong_augment())
    fig = montage(draw_patches(ds, 2))
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2 * 3 * 4 and len(fig.axes) == len(panels) + 1  # one colour bar
    assert [ax.get_title() for ax in fig.axes[:4]] == ["image", "label", "skeleton", "distance"]
    assert "signed distance" in fig.axes[-1].get_xlabel()
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["1 surface", "2 ignored"]
    assert to_rgba(legend.legend_handles[0].get_facecolor()) == LABEL_COLORS[1]
    overlay = panels[1].get_images()[1].get_array()  # label column: the image, then the label colours
    surface = np.all(np.isclose(overlay, LABEL_COLORS[1]), axis=-1)
    assert surface.any() or not (draw_patches(ds, 1)[0]["label"] == 1).any()
    fig.savefig(tmp_path / "montage.png")
    assert (tmp_path / "montage.png").stat().st_size > 10_000


def test_bench_data_json(cli):
    """All pipelines measured in interleaved repeats; each ratio is the median of the same-repeat ratios."""
    require(importlib.util.find_spec("batchgeneratorsv2") is not None, "batchgeneratorsv2 (pyproject's bench extra)")
    code, out, err = cli("bench", "data", "--json", "--samples", 2, "--baseline-samples", 1, "--warmup", 0,
                         "--repeats", 2, "--shape", 48, "--volumes", 1, "--patches", "24x24x24")
    assert code == 0, err
    result = json.loads(out[-1])
    run = result["by_patch"]["24x24x24"]
    assert result["patch"] == "24x24x24" and result["repeats"] == 2
    for kind in KINDS:
        figures = run[kind]
        assert len(figures["repeats"]) == 2 and all(rate > 0 for rate in figures["repeats"])
        assert figures["patches_per_s_per_core"] == pytest.approx(np.median(figures["repeats"]), abs=1e-3)
        assert result[f"{kind}_patches_per_s_per_core"] == figures["patches_per_s_per_core"]
        assert figures["peak_rss_mb"] > 50
    assert run["nnunet"]["initial_patch"] == [38, 38, 38]  # nnU-Net's loader reads a larger box
    for base in ("nnunet", "monai"):
        same_run = np.median(np.divide(run["ours"]["repeats"], run[base]["repeats"]))
        assert result[f"ours_vs_{base}"] == run["ratios"][f"ours_vs_{base}"] == pytest.approx(same_run, abs=0.02)


def test_bench_data_refuses_an_unknown_pipeline(cli):
    code, _, err = cli("bench", "data", "--pipelines", "ours,albumentations", "--shape", 48, "--volumes", 1)
    assert code == 2 and err == ["error: --pipelines: albumentations (choose among ours, ours_crop_only, nnunet, "
                                 "monai, with ours)"]


def test_nnunet_initial_patch_is_nnunets():
    """nnunetv2's get_patch_size for +-30 degrees and scale 0.85, truncated: 128 * (cos 30 + sin 30) / 0.85."""
    assert nnunet_initial_patch((128, 128, 128)) == (205, 205, 205)
    assert nnunet_initial_patch((72, 136, 136)) == (153, 218, 180)


def test_nnunet_transforms_really_augment():
    """nnU-Net v2's pipeline as the bench composes it: right shapes, labels kept, and over a few draws
    rotated or scaled patches, mirrored patches and intensity changes, each seen at least once."""
    require(importlib.util.find_spec("batchgeneratorsv2") is not None, "batchgeneratorsv2 (pyproject's bench extra)")
    import torch

    patch, box = (16, 24, 24), nnunet_initial_patch((16, 24, 24))
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(size=(1, *box)).astype(np.float32))
    seg = torch.from_numpy(rng.integers(0, 3, size=(1, *box)).astype(np.int16))
    seg[0, 0] = -1  # nnU-Net's outside-the-volume label, which the pipeline turns into background
    transforms = nnunet_transforms(patch)
    np.random.seed(0)
    torch.manual_seed(0)
    lo = [(b - p) // 2 for b, p in zip(box, patch, strict=True)]
    centre = tuple(slice(a, a + p) for a, p in zip(lo, patch, strict=True))
    crop_img, crop_seg = image[(0, *centre)], seg[(0, *centre)].clamp(min=0)
    flips = [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    kinds = set()
    for _ in range(60):
        out = transforms(image=image.clone(), segmentation=seg.clone())
        assert tuple(out["image"].shape) == (1, *patch) and tuple(out["segmentation"].shape) == (1, *patch)
        assert set(out["segmentation"].unique().tolist()) <= {0, 1, 2}
        dims = next((d for d in flips if torch.equal(out["segmentation"][0], crop_seg.flip(d))), None)
        if dims is None:
            kinds.add("resampled")  # rotated or scaled: random labels never match a crop
            continue
        if dims:
            kinds.add("mirrored")
        if not torch.allclose(out["image"][0], crop_img.flip(dims)):
            kinds.add("intensity")
    assert kinds == {"mirrored", "resampled", "intensity"}


def test_bench_losses_json(cli):
    code, out, err = cli("bench", "losses", "--json", "--size", 24, "--repeats", 1, "--features", 4, 8, 16)
    assert code == 0, err
    result = json.loads(out[-1])
    assert set(result["terms"]) == {"bce", "dice", "cldice", "skeleton_recall", "surface", "topo"}
    assert all(term["saved_mb"] > 0 for term in result["terms"].values())
    skel = result["soft_skeleton"]
    assert skel["memory_ratio"] == round(skel["max_pool3d_baseline"]["saved_mb"] / skel["neighbour_kernels"]["saved_mb"], 2)
    assert result["model"]["saved_mb"] > result["terms"]["bce"]["saved_mb"]
