import json

import numpy as np
import pytest

from vesuvius_lab.layout import discover, inspect_record
from vesuvius_lab.errors import DataError
from vesuvius_lab.io import read_volume
from vesuvius_lab.synth import BORDER, MARKER, make_scroll_volume, make_volume, scroll_style, synth


def test_same_seed_same_dataset_other_seed_differs(tmp_path):
    sums = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        synth(tmp_path / name, volumes=2, shape=(40, 40, 40), seed=seed, scrolls=2, progress=False)
        records, problems = discover(tmp_path / name)
        assert problems == []
        sums[name] = [(r.id, inspect_record(r).checksum) for r in records]
    assert sums["a"] == sums["b"]
    assert sums["a"] != sums["c"]


def test_layout_labels_and_scrolls(tiny_root):
    records, problems = discover(tiny_root)
    assert problems == [] and len(records) == 6
    assert len({r.scroll_id for r in records}) == 3
    assert len(list((tiny_root / "test_images").glob("*.tif"))) == 1
    for r in records:
        lab = read_volume(r.label)
        assert set(np.unique(lab)) == {0, 1, 2}
        for axis in range(3):
            for edge in (slice(0, BORDER), slice(-BORDER, None)):
                sl = [slice(None)] * 3
                sl[axis] = edge
                assert (lab[tuple(sl)] == 2).all()  # the outer 3 voxels of every face are ignored


def test_label_fractions_resemble_the_competition():
    fg, ignore = [], []
    for i in range(6):
        _, lab = make_volume((96, 96, 96), 0, i, scroll_style(0, i % 4))
        fg.append((lab == 1).mean())
        ignore.append((lab == 2).mean())
    assert 0.03 < np.mean(fg) < 0.15
    assert 0.2 < np.mean(ignore) < 0.75


def test_not_solvable_by_a_global_threshold():
    """The best single intensity threshold, chosen with the labels, still scores a poor Dice."""
    best = []
    for i in range(4):
        img, lab = make_volume((96, 96, 96), 1, i, scroll_style(1, i))
        keep = lab != 2
        x, y = img[keep], lab[keep] == 1
        dices = []
        for t in range(0, 256, 4):
            pred = x >= t
            dices.append(2 * (pred & y).sum() / max(pred.sum() + y.sum(), 1))
        best.append(max(dices))
    assert max(best) < 0.7, best


def test_sheets_touch_somewhere():
    """Adjacent sheets are pushed together: labelled sheets form fewer components than they would apart."""
    from scipy import ndimage

    merged = 0
    for i in range(6):
        _, lab = make_volume((96, 96, 96), 2, i, scroll_style(2, 0))
        sheets = lab == 1
        _, n6 = ndimage.label(sheets)
        eroded = ndimage.binary_erosion(sheets, iterations=1)
        _, n_eroded = ndimage.label(eroded)
        merged += n_eroded > n6  # thinning splits a merge point into separate sheets
    assert merged >= 1


def test_refuses_non_empty_foreign_dir(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(DataError, match="not empty"):
        synth(tmp_path, volumes=1, shape=(32, 32, 32), progress=False)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_overwrite_only_replaces_a_synthetic_dataset(tmp_path):
    synth(tmp_path / "d", volumes=1, shape=(32, 32, 32), progress=False)
    with pytest.raises(DataError, match="--overwrite"):
        synth(tmp_path / "d", volumes=1, shape=(32, 32, 32), progress=False)
    synth(tmp_path / "d", volumes=2, shape=(32, 32, 32), overwrite=True, progress=False)
    assert len(list((tmp_path / "d" / "train_images").glob("*.tif"))) == 2


def test_bad_shape_is_one_line(cli, tmp_path):
    code, _, err = cli("synth", tmp_path / "x", "--shape", "ten")
    assert code == 2 and err == ["error: shape 'ten': expected N or Z,Y,X integers"]


# --- scroll geometry -------------------------------------------------------------------------
SMALL = (64, 64, 64)


def _normals(lab: np.ndarray) -> np.ndarray:
    """Unit normals of the labelled sheets: the gradient of the smoothed sheet mask at its flanks."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter((lab == 1).astype(np.float32), 1.5)
    grad = np.stack(np.gradient(smooth), axis=-1)
    mag = np.linalg.norm(grad, axis=-1)
    keep = mag > 0.5 * mag.max()
    return grad[keep] / mag[keep, None]


def _spread(normals: np.ndarray) -> tuple[float, np.ndarray]:
    """Second eigenvalue of the normals' orientation tensor (0 for parallel planes, 0.5 for a
    cylinder's normals) and the histogram of their angle in the plane of the first two axes."""
    w, v = np.linalg.eigh(normals.T @ normals / len(normals))
    angle = np.mod(np.arctan2(normals @ v[:, 1], normals @ v[:, 2]), np.pi)  # unsigned: n and -n alike
    return float(w[1]), np.histogram(angle, bins=8, range=(0, np.pi))[0] / len(angle)


def test_scroll_normals_turn_through_every_direction_in_one_chunk():
    """Each chunk's labelled sheets face every way round the scroll axis (96³: at 64³ the
    unlabelled region can hide the wraps nearest the axis); planar sheets face one way."""
    for i in range(4):
        _, lab = make_scroll_volume((96, 96, 96), 0, i, scroll_style(0, i))
        second, hist = _spread(_normals(lab))
        assert second > 0.18 and hist.min() > 0.025, (i, second, hist)
    _, lab = make_volume((96, 96, 96), 0, 0, scroll_style(0, 0))
    second, hist = _spread(_normals(lab))
    assert second < 0.12 and hist.min() < 0.02, (second, hist)


def test_scroll_wraps_touch_yet_stay_separate_sheets():
    """Adjacent wraps come within one voxel of each other, the blurred image brighter there than
    between wraps, and the labels keep that voxel 0, so the two wraps are two components."""
    from scipy import ndimage

    touching = 0
    for i in range(6):
        img, lab = make_scroll_volume(SMALL, 1, i, scroll_style(1, i))
        comps, _ = ndimage.label(lab == 1, structure=np.ones((3, 3, 3)))
        big = np.iinfo(np.int32).max
        hi = ndimage.maximum_filter(comps, size=3)
        lo = ndimage.minimum_filter(np.where(comps > 0, comps, big), size=3)
        gap = (comps == 0) & (lab == 0) & (lo < big) & (hi != lo)  # a background voxel between two sheets
        if gap.sum() >= 5:
            touching += 1
            background = img[(lab == 0) & ~ndimage.binary_dilation(lab == 1, iterations=3)].mean()
            sheet = img[lab == 1].mean()
            assert img[gap].mean() > background + 0.1 * (sheet - background)  # blur half fills the gap
    assert touching >= 2  # contact patches fall outside some small chunks


def test_scroll_labels_have_unlabelled_wraps_a_region_and_the_border():
    from scipy import ndimage

    for i in range(3):
        _, lab = make_scroll_volume(SMALL, 2, i, scroll_style(2, i))
        assert set(np.unique(lab)) == {0, 1, 2}
        for axis in range(3):
            for edge in (slice(0, BORDER), slice(-BORDER, None)):
                sl = [slice(None)] * 3
                sl[axis] = edge
                assert (lab[tuple(sl)] == 2).all()
        inner = (lab == 2)[BORDER + 3 : -BORDER - 3, BORDER + 3 : -BORDER - 3, BORDER + 3 : -BORDER - 3]
        region = ndimage.binary_opening(inner, iterations=4)  # what is thicker than any wrap
        assert region.mean() > 0.01, i  # the unlabelled region
        thin = inner & ~ndimage.binary_dilation(region, iterations=4)
        sizes = np.bincount(ndimage.label(thin)[0].ravel())[1:]
        assert sizes.max() > 200, i  # an unlabelled wrap (thin, sheet-like, away from the region)


def test_scroll_volumes_are_deterministic_and_differ_between_chunks(tmp_path):
    a = make_scroll_volume(SMALL, 3, 0, scroll_style(3, 0))
    b = make_scroll_volume(SMALL, 3, 0, scroll_style(3, 0))
    c = make_scroll_volume(SMALL, 3, 1, scroll_style(3, 0))
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert not (a[0] == c[0]).all()
    synth(tmp_path / "s", volumes=1, shape=(32, 32, 32), geometry="scroll", test_volumes=0, progress=False)
    assert json.loads((tmp_path / "s" / MARKER).read_text())["geometry"] == "scroll"
    with pytest.raises(DataError, match="geometry"):
        synth(tmp_path / "t", volumes=1, shape=(32, 32, 32), geometry="spiral", progress=False)



def test_a_scroll_manifest_regenerates_its_volumes(cli, tmp_path):
    """The manifest's synth section (geometry included) is enough to write the same volumes again."""
    import shutil

    from vesuvius_lab.manifest import build_manifest, ensure_demo_data

    code, _, err = cli("synth", tmp_path / "data", "--geometry", "scroll", "--shape", "32", "--volumes", "2",
                       "--scrolls", "2", "--test-volumes", "0", "--seed", "9")
    assert code == 0, err
    manifest = build_manifest(tmp_path / "data", progress=False)
    manifest.synth = json.loads((tmp_path / "data" / MARKER).read_text())
    manifest.save(tmp_path / "m.yaml")
    shutil.rmtree(tmp_path / "data")
    assert len(ensure_demo_data(tmp_path / "m.yaml", progress=False).records) == 2  # checksums checked


def test_scroll_labelled_sheets_are_watertight():
    """Labelled wraps have few tunnels (Betti-1 = Betti-0 - Euler characteristic, no cavities): a
    band thinner than two voxels leaks through its diagonals, and labels full of pinholes would make
    TopoScore unreachable for any prediction."""
    from scipy import ndimage
    from skimage.measure import euler_number

    for i in range(4):
        _, lab = make_scroll_volume(SMALL, 5, i, scroll_style(5, i))
        sheets = lab == 1
        b0 = ndimage.label(sheets, structure=np.ones((3, 3, 3)))[1]
        assert b0 - euler_number(sheets, connectivity=3) <= 2 * b0 + 2, i
