import numpy as np
import pytest

from vesuvius_lab.layout import discover, inspect_record
from vesuvius_lab.errors import DataError
from vesuvius_lab.io import read_volume
from vesuvius_lab.synth import BORDER, make_volume, scroll_style, synth


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
