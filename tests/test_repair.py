"""Topology repair on hand-made volumes, judged by the exact Betti numbers and the leaderboard score."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest
from scipy import ndimage

from vesuvius_lab._betti import betti_numbers
from vesuvius_lab.errors import ConfigError
from vesuvius_lab.leaderboard import volume_score
from vesuvius_lab.postprocess import PostprocessConfig, postprocess
from vesuvius_lab.repair import (close_tunnels, fill_sheet_holes, piece_tunnels, plug_pinholes, split_bridges,
                                 tunnel_windows)

ALL_STEPS = ["plug_pinholes", "fill_sheet_holes", "close_tunnels", "split_bridges", "remove_small_components", "fill_cavities"]


def tilted_sheet(shape=(48, 48, 48), thickness=3.0, centre=22.0, tilt=(0.25, -0.15), bend=0.01) -> np.ndarray:
    """A curved sheet across the volume, its normal near axis 0 (as the synthetic scrolls' sheets)."""
    z, y, x = np.indices(shape, dtype=np.float64)
    height = centre + tilt[0] * (y - shape[1] / 2) + tilt[1] * (x - shape[2] / 2) + bend * ((y - shape[1] / 2) ** 2)
    return np.abs(z - height) < thickness / 2


def punch(mask: np.ndarray, centre: tuple[int, int], radius: float) -> np.ndarray:
    """The mask with a round hole through the sheet around (y, x), along axis 0."""
    _, y, x = np.indices(mask.shape)
    return mask & ((y - centre[0]) ** 2 + (x - centre[1]) ** 2 > radius**2)


def as_prob(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, 0.9, 0.1).astype(np.float32)


def test_a_sheet_with_a_punched_hole_is_repaired_and_its_score_rises():
    label = tilted_sheet().astype(np.uint8)
    holed = punch(label.astype(bool), (12, 12), 3.5)  # inside one of the metric's octants
    assert betti_numbers(holed) == (1, 1, 0)
    cfg = PostprocessConfig(repair=["fill_sheet_holes", "plug_pinholes"])
    repaired = postprocess(as_prob(holed), cfg)
    assert betti_numbers(repaired.astype(bool)) == (1, 0, 0)
    assert not (holed & ~repaired.astype(bool)).any()  # only adds
    before, after = volume_score(holed.astype(np.uint8), label), volume_score(repaired, label)
    assert after.topo == 1.0 and after.score > before.score + 0.1
    assert after.surface_dice >= before.surface_dice


def test_holes_wider_than_the_limits_stay():
    label = tilted_sheet()
    holed = punch(label, (12, 12), 6)
    assert betti_numbers(fill_sheet_holes(holed, window=32, max_hole_area=20))[1] == 1  # area ~113 cells
    assert betti_numbers(fill_sheet_holes(holed, window=16, max_hole_area=400))[1] == 1  # wider than half a window
    assert betti_numbers(fill_sheet_holes(holed, window=32, max_hole_area=400))[1] == 0


def test_a_wide_hole_in_a_bent_sheet_is_filled_and_joined_to_the_sheet():
    """A hole 16 voxels across in a bent sheet: the fill, a slab in the sheet's mean frame, meets the
    sheet around the rim at edges and corners only (each gap a new tunnel) unless it is sealed."""
    label = tilted_sheet(shape=(96, 96, 96), centre=24, tilt=(0.3, -0.2), bend=0.01)
    holed = punch(label, (22, 22), 8)  # inside the first octant (48 voxels)
    assert betti_numbers(holed) == (1, 1, 0)
    out = fill_sheet_holes(holed, window=48, max_hole_area=3000)
    assert betti_numbers(out) == (1, 0, 0)
    added = out & ~holed
    assert not (holed & ~out).any()
    assert (added & label).sum() >= 0.95 * added.sum()  # the fill lies in the sheet
    assert (added & label).sum() >= 0.6 * (label & ~holed).sum()  # and covers most of the hole
    before, after = (volume_score(m.astype(np.uint8), label.astype(np.uint8)) for m in (holed, out))
    assert after.topo == 1.0 and after.score > before.score + 0.1


def test_a_hole_the_probability_nearly_closes_is_closed_where_it_closes():
    """The sheet's hole still has probability 0.4 (under the 0.5 threshold), the background around
    the sheet 0.45 off it by two voxels: the fill takes the hole's voxels, not the brighter halo."""
    sheet = tilted_sheet(thickness=2.0)
    holed = punch(sheet, (22, 24), 3.0)
    prob = np.where(holed, 0.9, np.where(sheet, 0.4, 0.05)).astype(np.float32)
    halo = ndimage.binary_dilation(sheet, iterations=3) & ~ndimage.binary_dilation(sheet, iterations=1)
    prob[halo] = 0.45  # brighter than the hole but never where the hole closes
    assert betti_numbers(holed) == (1, 1, 0)
    out = close_tunnels(holed, prob, window=24)
    assert betti_numbers(out) == (1, 0, 0)
    added = out & ~holed
    assert not (holed & ~out).any() and added.any() and not (added & ~sheet).any()


def test_a_thin_loop_is_cut_rather_than_filled():
    """A ring of wire one voxel thick around a wide, dark hole: cutting one voxel removes the tunnel,
    filling would add a disc of voxels."""
    ring = np.zeros((32, 32, 32), bool)
    ring[6, 2:13, 2:13] = True
    ring[6, 3:12, 3:12] = False  # a square loop of wire, ten voxels a side, in one of the metric's octants
    assert betti_numbers(ring) == (1, 1, 0)
    out = close_tunnels(ring, np.where(ring, 0.9, 0.3), window=24)
    assert betti_numbers(out) == (1, 0, 0)
    assert not (out & ~ring).any() and (ring & ~out).sum() == 1


def test_piece_tunnels_count_each_pieces_tunnels_exactly():
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(40):
        a = ndimage.binary_opening(rng.random((14, 15, 16)) < 0.55)
        labels, n = cc3d.connected_components(a.astype(np.uint8), connectivity=6, return_N=True)
        counts = piece_tunnels(labels.astype(np.int32), n)
        if counts is None:  # a cavity somewhere: the exact count is left to betti_numbers
            assert betti_numbers(a)[2] > 0
            continue
        checked += 1
        assert [int(c) for c in counts[1:]] == [betti_numbers(labels == c)[1] for c in range(1, n + 1)]
    assert checked > 10


def test_pinholes_through_a_thick_sheet_are_plugged_voxel_by_voxel():
    sheet = np.zeros((12, 16, 16), bool)
    sheet[4:7] = True  # three voxels thick
    holes = np.zeros_like(sheet)
    holes[4:7, 8, 8] = holes[4:7, 3, 12] = True  # two holes one voxel wide, through it
    mask = sheet & ~holes
    mask[4:7, 0, 5] = False  # a notch at the edge is no hole
    out = plug_pinholes(mask)
    assert betti_numbers(mask)[1] == 2 and betti_numbers(out) == (1, 0, 0)
    assert np.array_equal(out ^ mask, holes)  # the holes' voxels and nothing else


def test_pinhole_plugging_does_not_join_parallel_sheets():
    two = np.zeros((12, 12, 12), bool)
    two[3:5] = True
    two[6:8] = True  # one voxel of background between the sheets
    assert np.array_equal(plug_pinholes(two), two)


def test_later_plugging_sweeps_that_read_only_changed_neighbourhoods_match_full_sweeps():
    from vesuvius_lab.repair import pinholes

    rng = np.random.default_rng(3)
    mask = rng.random((40, 40, 40)) < 0.55  # dense noise: plugs in every sweep, and pockets
    m = np.pad(mask, 1).astype(np.uint8)
    added, scratch = np.empty(1 << 16, np.int64), np.zeros(m.shape, np.uint8)
    per_sweep = []
    for _ in range(3):  # the reference: every sweep reads every voxel
        n = pinholes._plug_sweep(m, np.zeros((0, 0, 0), np.uint8), pinholes._N18, pinholes._N26, pinholes._FACES,
                                 pinholes._ADJ6_IN_N18, pinholes._ADJ26_IN_N26, added)
        per_sweep.append(n)
        pinholes._fill_pockets(m, added[:n], pinholes.N26_OFFSETS, 64, scratch)
    assert per_sweep[1] > 0 and per_sweep[2] > 0  # the later sweeps had work to do
    assert np.array_equal(plug_pinholes(mask, passes=3), m[1:-1, 1:-1, 1:-1].astype(bool))


def test_a_cavity_a_window_closed_off_is_filled_and_an_old_one_kept():
    from vesuvius_lab.repair.shared import no_new_cavities

    box = np.zeros((20, 20, 20), bool)
    box[4:16, 4:16, 4:16] = True
    box[6:14, 6:14, 6:14] = False  # a hollow box ...
    opened = box.copy()
    opened[10, 10, 14:16] = False  # ... with a way out, until a fill closes it
    closed = box.copy()
    out = no_new_cavities(opened, closed)
    assert betti_numbers(box)[2] == 1 and betti_numbers(out) == (1, 0, 0) and out[6:14, 6:14, 6:14].all()
    assert np.array_equal(closed, box)  # the input is not changed
    assert np.array_equal(no_new_cavities(box, box), box)  # a cavity that was there stays


def test_two_sheets_joined_by_a_one_voxel_bridge_are_split():
    mask = np.zeros((32, 32, 32), bool)
    mask[3:6] = True
    mask[10:13] = True  # both sheets in the metric's first octants along axis 0
    mask[6:10, 20, 20] = True  # a bridge one voxel wide
    assert cc3d.connected_components(mask.astype(np.uint8), connectivity=26, return_N=True)[1] == 1
    out = split_bridges(mask, as_prob(mask), threshold=0.5, depth=1.0, min_core=50)
    assert cc3d.connected_components(out.astype(np.uint8), connectivity=26, return_N=True)[1] == 2
    assert betti_numbers(out)[0] == 2
    far = np.ones(mask.shape, bool)
    far[:, 17:24, 17:24] = False
    assert np.array_equal(out[far], mask[far])  # the sheets away from the bridge are untouched
    label = np.zeros(mask.shape, np.uint8)
    label[3:6] = label[10:13] = 1
    cfg = PostprocessConfig(repair=["split_bridges", "remove_small_components"], min_component_size=20)
    assert volume_score(postprocess(as_prob(mask), cfg), label).score > volume_score(mask.astype(np.uint8), label).score


def test_a_correct_sheet_passes_bit_identical():
    sheets = tilted_sheet() | tilted_sheet(centre=34.0, thickness=4.0)
    prob = as_prob(sheets)
    plain = postprocess(prob, PostprocessConfig())
    repaired = postprocess(prob, PostprocessConfig(repair=ALL_STEPS, min_component_size=10, hole_window=24))
    assert repaired.dtype == np.uint8 and np.array_equal(plain, repaired) and np.array_equal(plain, sheets)
    assert tunnel_windows(sheets, 24) == []


def test_steps_run_in_the_listed_order():
    """A pinhole's plug is a one-voxel component until the hole is filled: removing small components
    first keeps the sheet, the other order keeps the fragment's place filled."""
    mask = np.zeros((16, 16, 16), bool)
    mask[6:8] = True
    mask[6:8, 8, 8] = False
    mask[1, 1, 1] = True  # a stray voxel
    prob = as_prob(mask)
    cfg = PostprocessConfig(min_component_size=2, repair=["plug_pinholes"])
    assert cfg.steps() == ("remove_small_components", "plug_pinholes")
    out = postprocess(prob, cfg)
    assert out[1, 1, 1] == 0 and out[6, 8, 8] == 1
    cfg = PostprocessConfig(min_component_size=2, close_holes=True, repair=["plug_pinholes", "remove_small_components"])
    assert cfg.steps() == ("fill_cavities", "plug_pinholes", "remove_small_components")


def test_repair_keys_are_checked():
    with pytest.raises(ConfigError, match="postprocess.repair: 'close' is not one of"):
        PostprocessConfig(repair=["close"])
    with pytest.raises(ConfigError, match="postprocess.hole_window"):
        PostprocessConfig(hole_window=4)
    with pytest.raises(ConfigError, match="postprocess.repair: expected a list"):
        PostprocessConfig(repair="plug_pinholes")


def test_predict_volume_runs_the_configured_repair():
    """Validation, ``predict`` and notebook 05 all post-process through ``inference.predict_volume``."""
    import torch

    from vesuvius_lab.config import load_config
    from vesuvius_lab.inference import predict_volume
    from vesuvius_lab.model import build_model

    config = load_config(None, ["data.patch_size=[16,16,16]", "model.features=[4,8]", "val.overlap=0.0",
                                "postprocess.threshold=0.45", "postprocess.repair=[plug_pinholes, fill_sheet_holes]"])
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    image = (tilted_sheet((32, 32, 32), centre=14.0) * 180 + 30).astype(np.uint8)
    pred = predict_volume(model, image, config, "cpu")
    assert np.array_equal(pred.mask, postprocess(pred.probability, config.postprocess))
    plain = postprocess(pred.probability, PostprocessConfig(threshold=0.45))
    assert pred.mask.sum() >= plain.sum()


def test_bench_repair_json(cli):
    import json

    code, out, err = cli("bench", "repair", "--json", "--size", "48", "--volumes", "1", "--hole-window", "24")
    assert code == 0, err
    result = json.loads(out[-1])
    assert result["hole_window"] == 24
    assert result["repair_cpu_seconds_per_volume"] > 0 and result["baseline_cpu_seconds_per_volume"] > 0
    assert set(result["steps_cpu_seconds"]) >= {"plug_pinholes", "fill_sheet_holes", "split_bridges"}
    assert result["ratio_to_baseline"] == round(result["repair_cpu_seconds_per_volume"] / result["baseline_cpu_seconds_per_volume"], 2)
    assert len(result["tunnels_before"]) == len(result["tunnels_after"]) == 1
