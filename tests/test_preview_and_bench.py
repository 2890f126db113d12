import json

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402

from pipeline_helpers import make_dataset, strong_augment  # noqa: E402
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
    code, out, err = cli("bench", "data", "--json", "--samples", 2, "--baseline-samples", 1, "--warmup", 0,
                         "--shape", 48, "--volumes", 1, "--patches", "24x24x24")
    assert code == 0, err
    result = json.loads(out[-1])
    assert {"ours_patches_per_s", "baseline_patches_per_s", "ratio"} <= result.keys()
    run = result["by_patch"]["24x24x24"]
    assert run["ours"]["patches_per_s"] > 0 and run["baseline"]["patches_per_s"] > 0
    assert result["ratio"] == round(run["ours"]["patches_per_s"] / run["baseline"]["patches_per_s"], 2)
    assert run["ours"]["peak_rss_mb"] > 50


def test_bench_losses_json(cli):
    code, out, err = cli("bench", "losses", "--json", "--size", 24, "--repeats", 1, "--features", 4, 8, 16)
    assert code == 0, err
    result = json.loads(out[-1])
    assert set(result["terms"]) == {"bce", "dice", "cldice", "skeleton_recall", "surface", "topo"}
    assert all(term["saved_mb"] > 0 for term in result["terms"].values())
    skel = result["soft_skeleton"]
    assert skel["memory_ratio"] == round(skel["max_pool3d_baseline"]["saved_mb"] / skel["neighbour_kernels"]["saved_mb"], 2)
    assert result["model"]["saved_mb"] > result["terms"]["bce"]["saved_mb"]
