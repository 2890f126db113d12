"""The leaderboard metric on hand-made volumes with known answers, and against reference code.

References: the textbook matrix-reduction definition of the Betti matching (tests/_betti_textbook.py),
DeepMind's ``surface_distance`` package, skimage's ``variation_of_information``, and the compiled
Betti-Matching-3D module where one is installed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from _betti_textbook import textbook_cells, textbook_counts
from conftest import require
from vesuvius_lab import leaderboard as M
from vesuvius_lab._betti import betti_numbers, euler_characteristic, label_euler, match_counts
from vesuvius_lab.bench.metric import make_prediction, official_betti_module


def sheet(shape=(16, 16, 16), x=(3, 5)) -> np.ndarray:
    """A flat sheet, normal to axis 0, spanning the whole volume."""
    v = np.zeros(shape, dtype=np.uint8)
    v[x[0] : x[1]] = 1
    return v


def blobby(shape, seed, sigma=1.5, level=0.55) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random(shape), sigma)
    return smooth > np.quantile(smooth, level)


def entropy_bits(sizes) -> float:
    n = sum(sizes)
    return -sum(s / n * math.log2(s / n) for s in sizes if s)


# --- identical / empty --------------------------------------------------------------------------
def test_identical_volumes_score_one_in_every_part():
    label = sheet()
    label[0:2, 1:7, 1:7] = 1
    label[0:2, 3:5, 3:5] = 0  # a ring (tunnel) beside the sheet in the first octant
    label[9:15, 9:15, 9:15] = 1
    label[11, 11, 11] = 0  # a block with a cavity in the last octant
    result = M.volume_score(label.copy(), label)
    assert result.as_dict() == {"score": 1.0, "topo": 1.0, "surface_dice": 1.0, "voi_score": 1.0}
    assert result.counts.matched == result.counts.pred == result.counts.label
    assert sum(result.counts.label) > 0  # the volume does have features, all matched


def test_both_empty_scores_one():
    z = np.zeros((8, 8, 8), np.uint8)
    assert M.volume_score(z, z).as_dict() == {"score": 1.0, "topo": 1.0, "surface_dice": 1.0, "voi_score": 1.0}


def test_empty_prediction_against_two_sheets():
    label = sheet(x=(1, 3)) | sheet(x=(5, 7))  # two sheets, both in the 4 octants with x < 8
    pred = np.zeros_like(label)
    r = M.volume_score(pred, label)
    # those octants hold 2 label components: one finite dim-0 bar each, none predicted -> F1_0 = 0
    assert r.counts.label == (4, 0, 0) and r.counts.pred == (0, 0, 0)
    assert r.topo == 0.0
    assert r.surface_dice == 0.0
    # union = label voxels; label splits them in two equal halves, prediction is all background
    assert r.voi == pytest.approx(entropy_bits([512, 512]), abs=1e-12)
    assert r.voi_score == pytest.approx(1 / (1 + 0.3 * 1.0), abs=1e-12)
    assert r.score == pytest.approx(0.35 / 1.3, abs=1e-12)


def test_prediction_without_label_uses_the_pseudocount():
    label = np.zeros((16, 16, 16), np.uint8)
    pred = label.copy()
    pred[1:3, 1:3, 1:3] = 1
    pred[5:7, 5:7, 5:7] = 1  # two blobs in the first octant: one finite dim-0 bar
    r = M.volume_score(pred, label)
    assert r.counts.pred == (1, 0, 0) and r.counts.label == (0, 0, 0)
    assert r.topo == pytest.approx(0.5 / 1.5)
    assert r.surface_dice == 0.0
    assert r.voi_score == pytest.approx(1 / 1.3)


# --- topology ---------------------------------------------------------------------------------
def test_hole_through_a_sheet_adds_exactly_one_b1_feature():
    label = sheet(x=(3, 5))
    pred = label.copy()
    pred[3:5, 3:5, 3:5] = 0  # a 2x2 hole through the sheet, inside the first octant
    assert betti_numbers(label[:8, :8, :8]) == (1, 0, 0)
    assert betti_numbers(pred[:8, :8, :8]) == (1, 1, 0)
    r = M.volume_score(pred, label)
    assert r.counts.label == (0, 0, 0)
    assert r.counts.pred == (0, 1, 0)
    assert r.counts.matched == (0, 0, 0)
    assert r.topo == pytest.approx(0.5 / 1.5)  # the only feature: predicted, not in the label


def test_same_tunnel_in_both_is_matched_and_one_in_another_octant_is_not():
    label = np.zeros((16, 16, 16), np.uint8)
    label[2:4, 1:7, 1:7] = 1
    label[2:4, 3:5, 3:5] = 0  # a ring: one tunnel in the first octant
    assert match_counts(label, label.copy()) == ((0, 1, 0), (0, 1, 0), (0, 1, 0))
    moved = np.roll(label, 8, axis=2)  # the same ring, in the neighbouring octant
    c = M.topo_counts(moved > 0, label > 0)
    assert (c.matched, c.pred, c.label) == ((0, 0, 0), (0, 1, 0), (0, 1, 0))


def test_cavity_is_a_b2_feature():
    label = np.zeros((8, 8, 8), np.uint8)
    label[1:6, 1:6, 1:6] = 1
    label[3, 3, 3] = 0  # one enclosed void
    assert betti_numbers(label) == (1, 0, 1)
    m, p, g = match_counts(label, label)
    assert m == p == g == (0, 0, 1)
    filled = label.copy()
    filled[3, 3, 3] = 1
    m, p, g = match_counts(filled, label)
    assert (m, p, g) == ((0, 0, 0), (0, 0, 0), (0, 0, 1))


@pytest.mark.parametrize("seed", range(6))
def test_betti_matching_equals_the_textbook_definition(seed):
    rng = np.random.default_rng(seed)
    for _ in range(8):
        shape = tuple(int(n) for n in rng.integers(2, 6, 3))
        x = rng.random(shape) < rng.uniform(0.3, 0.9)
        y = x ^ (rng.random(shape) < rng.uniform(0.05, 0.3)) if rng.random() < 0.7 else np.roll(x, 1, axis=0)
        assert match_counts(x, y) == textbook_counts(x, y), shape


def test_betti_numbers_equal_the_textbook_barcode():
    rng = np.random.default_rng(11)
    for _ in range(10):
        x = rng.random((5, 5, 4)) < 0.6
        m, p, g = textbook_counts(x, np.zeros_like(x))
        b0, b1, b2 = betti_numbers(x)
        assert (b0 - 1, b1, b2) == p


def test_euler_characteristic_counts_the_cells_of_each_label():
    """The one Euler count the metric and the repair share, against the cells counted one by one:
    on bool, 0/255 and strided inputs, and per 6-connected label."""
    import cc3d

    rng = np.random.default_rng(12)
    for _ in range(12):
        shape = tuple(int(n) for n in rng.integers(2, 7, 3))
        x = rng.random(shape) < rng.uniform(0.3, 0.9)
        cells = textbook_cells(shape)
        chi = sum((-1) ** k * sum(all(x[v] for v in vs) for _, vs in cells[k]) for k in range(4))
        assert euler_characteristic(x) == euler_characteristic(x.astype(np.uint8) * 255) == chi, shape
        assert euler_characteristic(np.ascontiguousarray(x.T).T) == chi  # a strided view
        labels, n = cc3d.connected_components(x.astype(np.uint8), connectivity=6, return_N=True)
        assert [int(c) for c in label_euler(labels.astype(np.int32), n)[1:]] == \
            [euler_characteristic(labels == c) for c in range(1, n + 1)]


def test_betti_numbers_equal_the_matchings_own_counts():
    """beta2 from the background's components (betti_numbers) and from the dual sweep the matching
    runs (its pairs in one input) agree on volumes too big for the textbook."""
    rng = np.random.default_rng(0)
    for k in range(20):
        x = rng.random((9, 10, 11)) < rng.uniform(0.3, 0.8) if k % 2 else blobby((24, 20, 22), k, sigma=1.0, level=0.5)
        b0, b1, b2 = betti_numbers(x)
        assert match_counts(x, x)[1] == (b0 - 1, b1, b2)


def test_fast_sweeps_equal_plain_sweeps():
    rng = np.random.default_rng(5)
    for _ in range(6):
        x = blobby((20, 18, 22), int(rng.integers(1 << 30)), sigma=1.0, level=rng.uniform(0.3, 0.7))
        y = ndimage.binary_dilation(x) if rng.random() < 0.5 else x ^ (rng.random(x.shape) < 0.05)
        assert match_counts(x, y, fast=True) == match_counts(x, y, fast=False)


# --- surface dice and VOI against the reference packages --------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_surface_dice_agrees_with_deepmind(seed):
    sd = pytest.importorskip("surface_distance")
    x = blobby((30, 26, 34), seed)
    y = ndimage.binary_erosion(blobby((30, 26, 34), seed, level=0.5)) | blobby((30, 26, 34), seed + 100, level=0.9)
    for tol in (0.0, 1.0, 1.5, 2.0, 3.3):
        ref = sd.compute_surface_dice_at_tolerance(sd.compute_surface_distances(y, x, (1.0, 1.0, 1.0)), tol)
        assert M.surface_dice_masks(x, y, tol) == pytest.approx(float(ref), abs=1e-9)
    ref = sd.compute_surface_dice_at_tolerance(sd.compute_surface_distances(y, x, (1.0, 1.0, 1.0)), 12.0)
    assert M.surface_dice_masks(x, y, 12.0) == pytest.approx(float(ref), abs=1e-9)  # the EDT branch


@pytest.mark.parametrize("seed", range(3))
def test_voi_agrees_with_skimage(seed):
    import cc3d
    from skimage.metrics import variation_of_information

    x = blobby((24, 24, 24), seed, level=0.8)
    y = blobby((24, 24, 24), seed + 7, level=0.75)
    gl = cc3d.connected_components(y.astype(np.uint8), connectivity=26)
    pl = cc3d.connected_components(x.astype(np.uint8), connectivity=26)
    union = (gl > 0) | (pl > 0)
    # skimage returns (H(image1 | image0), H(image0 | image1)): check that on a 4-voxel case first
    assert list(variation_of_information(np.array([0, 0, 1, 1]), np.zeros(4, int))) == [0.0, 1.0]
    ref_merge, ref_split = variation_of_information(gl[union], pl[union])
    split, merge = M.voi_masks(x, y)  # (H(label | pred), H(pred | label))
    assert split == pytest.approx(ref_split, abs=1e-12)
    assert merge == pytest.approx(ref_merge, abs=1e-12)


def test_bridge_between_two_sheets_lowers_voi():
    label = sheet(x=(2, 4)) | sheet(x=(8, 10))
    pred = label.copy()
    pred[4:8, 7:9, 7:9] = 1  # a 4x2x2 bridge joins the sheets
    r = M.volume_score(pred, label)
    # union: sheet A (512), sheet B (512), bridge (16, background in the label); one predicted object
    assert r.voi == pytest.approx(entropy_bits([512, 512, 16]), abs=1e-12)
    assert r.voi_score < M.volume_score(label.copy(), label).voi_score
    assert r.voi_score == pytest.approx(1 / (1 + 0.3 * entropy_bits([512, 512, 16])), abs=1e-12)


# --- ignore, thresholds ----------------------------------------------------------------------
def test_ignored_voxels_change_nothing_whatever_the_prediction_does_there():
    rng = np.random.default_rng(3)
    label = (blobby((24, 24, 24), 1) & ~blobby((24, 24, 24), 2, level=0.6)).astype(np.uint8)
    ignored = np.zeros(label.shape, bool)
    ignored[:, :, 16:] = True
    ignored[:3] = True
    label[ignored] = 2
    base = np.where(ignored, 0, blobby((24, 24, 24), 1)).astype(np.uint8)
    expected = M.volume_score(base, label).as_dict()
    for fill in (np.ones_like(base), rng.integers(0, 2, base.shape).astype(np.uint8), blobby((24, 24, 24), 9)):
        pred = np.where(ignored, fill, base).astype(np.uint8)
        assert M.volume_score(pred, label).as_dict() == expected
    assert expected["score"] < 1.0  # the case is not trivially perfect


def test_probabilities_with_fg_threshold_equal_the_binarised_mask():
    label = sheet(x=(3, 6)).astype(np.uint8)
    rng = np.random.default_rng(0)
    prob = np.clip(label * 0.8 + rng.normal(0, 0.2, label.shape), 0, 1).astype(np.float32)
    prob[0, 0, 0] = np.nan
    mask = (np.nan_to_num(prob) > 0.5).astype(np.uint8)
    assert M.volume_score(prob, label, fg_threshold=0.5) == M.volume_score(mask, label)
    assert M.surface_dice(prob, label, fg_threshold=0.5) == M.surface_dice(mask, label)
    assert M.topo_score(prob, label, fg_threshold=0.5) == M.topo_score(mask, label)
    assert M.voi_score(prob, label, fg_threshold=0.5) == M.voi_score(mask, label)


def test_inputs_are_not_modified_and_shapes_must_agree():
    label = sheet()
    label[0] = 2
    pred = np.ones_like(label)
    before = (pred.copy(), label.copy())
    M.volume_score(pred, label)
    assert np.array_equal(pred, before[0]) and np.array_equal(label, before[1])
    with pytest.raises(ValueError, match="shapes differ"):
        M.volume_score(pred[:-1], label)


# --- aggregation rules --------------------------------------------------------------------------
def test_topo_f1_rules():
    c = M.TopoCounts((2, 0, 0), (4, 0, 3), (4, 0, 0))
    f1 = c.f1()
    assert f1[0] == pytest.approx(0.5) and math.isnan(f1[1]) and f1[2] == pytest.approx(0.5 / 3.5)
    assert c.score() == pytest.approx((0.34 * 0.5 + 0.33 * 0.5 / 3.5) / 0.67)
    assert M.ZERO_COUNTS.score() == 1.0
    assert M.combine(1.2, 1.0, 1.0) == 1.0 and M.combine(0.0, 0.0, 0.0) == 0.0


def test_octants_follow_the_official_split():
    assert M.octant_slices((5, 4, 3))[0] == (slice(0, 3), slice(0, 2), slice(0, 2))
    assert len(M.octant_slices((5, 4, 3))) == 8


# --- the fast path is the straightforward path ----------------------------------------------------
def test_fast_path_gives_exactly_the_straightforward_numbers():
    from vesuvius_lab.synth import make_volume, scroll_style

    _, label = make_volume((40, 44, 36), 2, 1, scroll_style(2, 1))
    pred = make_prediction(label, 5)
    fast = M.volume_score(pred, label, jobs=2)
    plain = M.straightforward_score(pred, label)
    assert fast == plain
    assert 0.0 < fast.score < 1.0
    assert M.topo_counts(*M.binarize(pred, label), jobs=1) == M.topo_counts(*M.binarize(pred, label), jobs=2)


def test_agrees_with_the_compiled_betti_matching_module():
    bm = official_betti_module()
    require(bm is not None, "the compiled Betti-Matching-3D module (make install: pip install --no-deps topolosses)")
    from vesuvius_lab.synth import make_volume, scroll_style

    _, label = make_volume((40, 40, 40), 4, 2, scroll_style(4, 2))
    pred = make_prediction(label, 3)
    x, y = M.binarize(pred, label)
    for s in M.octant_slices(x.shape):
        r = bm.compute_matching((~x[s]).astype(np.float64), (~y[s]).astype(np.float64))
        m = tuple(int(v) for v in r.num_matched)
        p = tuple(a + int(b) for a, b in zip(m, r.num_unmatched_input1, strict=True))
        g = tuple(a + int(b) for a, b in zip(m, r.num_unmatched_input2, strict=True))
        assert match_counts(x[s], y[s]) == (m, p, g)
    rng = np.random.default_rng(0)
    for _ in range(30):
        shape = tuple(int(n) for n in rng.integers(2, 14, 3))
        a = rng.random(shape) < rng.uniform(0.3, 0.9)
        b = a ^ (rng.random(shape) < 0.15)
        r = bm.compute_matching((~a).astype(np.float64), (~b).astype(np.float64))
        m = tuple(int(v) for v in r.num_matched)
        assert match_counts(a, b)[0] == m
    for _ in range(20):  # the reference itself, against the textbook definition
        shape = tuple(int(n) for n in rng.integers(2, 6, 3))
        a = rng.random(shape) < rng.uniform(0.3, 0.9)
        b = a ^ (rng.random(shape) < 0.2)
        r = bm.compute_matching((~a).astype(np.float64), (~b).astype(np.float64))
        m = tuple(int(v) for v in r.num_matched)
        p = tuple(x + int(y) for x, y in zip(m, r.num_unmatched_input1, strict=True))
        g = tuple(x + int(y) for x, y in zip(m, r.num_unmatched_input2, strict=True))
        assert (m, p, g) == textbook_counts(a, b), shape


def test_bench_metric_reports_both_implementations_and_equal_scores(cli):
    import json

    code, out, err = cli("bench", "metric", "--json", "--size", "24", "--volumes", "1", "--baseline-volumes", "1",
                         "--repeats", "2", "--jobs", "1")
    assert code == 0 and not err
    result = json.loads("\n".join(out))
    for key in ("ours_seconds_per_volume", "ours_peak_rss_mib", "baseline_seconds_per_volume", "baseline_peak_rss_mib"):
        assert result[key] > 0
    assert result["ours_threads"] == 1 and result["baseline_threads"] == 1  # --jobs 1: one core, one thread
    assert set(result["parts"]) == {"binarize", "topo", "surface_dice", "voi"} and len(result["octants"]) == 8
    for part in [*result["parts"].values(), *result["octants"]]:
        assert part["official_s"] > 0
        if part["ours_s"] > 0:  # 0: an octant empty in both masks, which ours skips
            assert part["ratio"] == pytest.approx(part["official_s"] / part["ours_s"], rel=0.01)
    # the octants are the TopoScore's time on both sides
    assert sum(o["official_s"] for o in result["octants"]) <= result["parts"]["topo"]["official_s"] * 1.5
    assert result["speedup"] == pytest.approx(result["baseline_seconds_scaled_to_size"] / result["ours_seconds_per_volume"], rel=0.05)
    assert result["max_abs_score_diff"] <= 1e-9


def test_voi_counts_equal_numpy_unique_on_every_path(monkeypatch):
    """The VOI's counts (a contingency table for few components; bincount for a small key range and
    np.unique beyond it for many) are np.unique's, in its order, so the entropies are the same floats."""
    rng = np.random.default_rng(4)
    for keys in (rng.integers(0, 50, 1000), rng.integers(0, 1 << 40, 1000), np.zeros(3, np.int64)):
        assert np.array_equal(M._counts(keys), np.unique(keys, return_counts=True)[1])
    x = blobby((30, 28, 26), 1, level=0.8)
    y = blobby((30, 28, 26), 2, level=0.75)
    table = M.voi_masks(x, y)
    monkeypatch.setattr(M, "CONTINGENCY_CELLS", 0)  # the sorting path
    assert M.voi_masks(x, y) == table and table[0] > 0 and table[1] > 0


def test_tunnels_matched_in_one_sweep_equal_the_compiled_module():
    """Many tunnels in both inputs (the one linking sweep for both, stopping at the first to have
    all its events) against Betti-Matching-3D, octant by octant."""
    bm = official_betti_module()
    require(bm is not None, "the compiled Betti-Matching-3D module (make install: pip install --no-deps topolosses)")
    matched = 0
    for seed in range(6):
        x = blobby((22, 20, 24), seed, sigma=1.2, level=0.45)
        y = ndimage.binary_erosion(x) | blobby((22, 20, 24), seed + 50, sigma=1.2, level=0.8) if seed % 2 else \
            x ^ (blobby((22, 20, 24), seed + 90, sigma=0.8, level=0.93))
        r = bm.compute_matching((~x).astype(np.float64), (~y).astype(np.float64))
        m = tuple(int(v) for v in r.num_matched)
        p = tuple(a + int(b) for a, b in zip(m, r.num_unmatched_input1, strict=True))
        g = tuple(a + int(b) for a, b in zip(m, r.num_unmatched_input2, strict=True))
        assert match_counts(x, y) == (m, p, g), seed
        assert p[1] > 0 and g[1] > 0
        matched += m[1]
    assert matched > 0
