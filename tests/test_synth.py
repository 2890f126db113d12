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


def _mid_surfaces(lab: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """The labelled wraps as 26-connected components (labels, count) and their mid-surfaces: the
    ridge of each component's distance transform."""
    from scipy import ndimage

    comps, n = ndimage.label(lab == 1, structure=np.ones((3, 3, 3)))
    edt = ndimage.distance_transform_edt(comps > 0)
    return comps, n, (comps > 0) & (edt >= ndimage.maximum_filter(edt, size=3))


def _ridge_samples(lab: np.ndarray, radius: int = 5):
    """Local thickness of the labelled wraps, sampled on their mid-surfaces: at each ridge voxel of
    a component's distance transform, the component's voxels inside a ball of this radius divided
    by the ball's equatorial area (a flat slab of thickness t gives t within a few per cent), and
    the normal as the least-spread axis of those voxels. Balls that hold label 2, another component
    (a contact gap) or reach past the chunk are dropped, so cut-off edges do not read as thin.
    Returns (component, thickness, normal, centre) per kept sample."""
    r = np.arange(-radius, radius + 1)
    offsets = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)
    offsets = offsets[(offsets**2).sum(1) <= radius * radius]
    comps, _, ridge = _mid_surfaces(lab)
    centres = np.argwhere(ridge)
    centres = centres[((centres >= radius) & (centres < np.array(lab.shape) - radius)).all(1)]
    ball = tuple((centres[:, None, :] + offsets[None]).transpose(2, 0, 1))
    own = comps[tuple(centres.T)]
    mine = comps[ball] == own[:, None]
    clean = (mine | (comps[ball] == 0)).all(1) & (lab[ball] != 2).all(1)
    own, mine, centres = own[clean], mine[clean], centres[clean]
    weight = mine / mine.sum(1, keepdims=True)
    mean = weight @ offsets
    second = np.einsum("nk,ki,kj->nij", weight, offsets, offsets) - mean[:, :, None] * mean[:, None, :]
    normals = np.linalg.eigh(second)[1][:, :, 0]
    return own, mine.sum(1) / (np.pi * radius * radius), normals, centres


def _facing(own: np.ndarray, normals: np.ndarray, centres: np.ndarray):
    """Pairs of samples (i, j) on two different components where j is i's nearest sample on any
    other component, under 25 voxels away and along i's normal: the same place on the next wrap."""
    from scipy.spatial import cKDTree

    pairs = []
    for k in np.unique(own):
        i, other = np.flatnonzero(own == k), np.flatnonzero(own != k)
        if other.size == 0:
            continue
        dist, j = cKDTree(centres[other]).query(centres[i])
        j = other[j]
        along = np.abs(((centres[j] - centres[i]) * normals[i]).sum(1)) / np.maximum(dist, 1e-9)
        keep = (along > 0.9) & (dist < 25)
        pairs.append(np.stack([i[keep], j[keep]], axis=1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=int)


def test_scroll_wrap_thickness_varies_along_the_wrap():
    """Thickness changes along each wrap (±30 % in the generator). The elliptical squash alone
    also makes a wrap look thicker on one side than the other, but it does so for the next wrap
    out at the same place, so the measure is the ratio of two facing wraps' local thicknesses:
    the spread (std of its log) along a pair has a median over 19 pairs of 0.17, and of 0.06 (from
    voxelisation, warp and contact) with a constant thickness per wrap; it must pass 0.1."""
    spreads = []
    for i in range(6):
        _, lab = make_scroll_volume((80, 80, 80), 7, i, scroll_style(7, i))
        own, thick, normals, centres = _ridge_samples(lab)
        pairs = _facing(own, normals, centres)
        for a, b in {(int(own[p]), int(own[q])) for p, q in pairs}:
            sel = pairs[(own[pairs[:, 0]] == a) & (own[pairs[:, 1]] == b)]
            if len(sel) >= 50:
                spreads.append(float(np.log(thick[sel[:, 0]] / thick[sel[:, 1]]).std()))
    assert len(spreads) >= 8, spreads
    assert np.median(spreads) > 0.1, np.round(spreads, 3)


def _axial_spectra(img: np.ndarray, lab: np.ndarray) -> dict[int, np.ndarray]:
    """Per labelled component, the mean power spectrum of the image along lines parallel to the
    scroll axis (the direction all sheet normals are perpendicular to) through its mid-surface,
    kept only where the whole 24-voxel line stays in the component; frequencies from 0.12 to 0.5
    cycles/voxel (periods 2-8 voxels: the fibres, not the slow density changes), normalised."""
    from scipy import ndimage

    normals = _normals(lab)
    axis = np.linalg.eigh(normals.T @ normals)[1][:, 0]
    steps = np.arange(-12, 12.01, 0.5)
    band = np.fft.rfftfreq(len(steps), d=0.5) >= 0.12
    comps, n, ridge = _mid_surfaces(lab)
    spectra = {}
    for k in range(1, n + 1):
        centres = np.argwhere(ridge & (comps == k))
        coords = (centres[:, None, :] + steps[None, :, None] * axis).reshape(-1, 3).T
        inside = ndimage.map_coordinates((comps == k).astype(np.float32), coords, order=0).reshape(len(centres), -1)
        keep = inside.min(1, initial=1) == 1
        if keep.sum() < 30:
            continue
        lines = ndimage.map_coordinates(img.astype(np.float32), coords, order=1).reshape(len(centres), -1)[keep]
        lines -= lines.mean(1, keepdims=True)
        power = (np.abs(np.fft.rfft(lines * np.hanning(len(steps)), axis=1)) ** 2).mean(0)[band]
        spectra[k] = power / np.linalg.norm(power)
    return spectra


def test_scroll_neighbouring_wraps_have_their_own_fibre_texture():
    """Each wrap draws its own fibre wavelengths, angle and contrast, so the spectra of two facing
    wraps along the scroll axis peak at different periods. Measured without noise, drift and
    debris (the style's knobs), which only bury the fibres: 1 - cosine similarity of the two
    spectra has a median over 12 facing pairs of 0.37, and 0.08 when every wrap shares one texture."""
    from vesuvius_lab.synth import ScrollStyle

    distances = []
    for i in range(6):
        quiet = ScrollStyle(scroll_style(9, i).spacing, noise=0.0, drift=0.0, debris=0.0)
        img, lab = make_scroll_volume((80, 80, 80), 9, i, quiet)
        own, _, normals, centres = _ridge_samples(lab)
        pairs = _facing(own, normals, centres)
        spectra = _axial_spectra(img, lab)
        ids, counts = np.unique(np.sort(own[pairs], axis=1), axis=0, return_counts=True)
        for (a, b), count in zip(ids, counts, strict=True):
            if count >= 50 and a in spectra and b in spectra:
                distances.append(1 - float(spectra[a] @ spectra[b]))
    assert len(distances) >= 8, distances
    assert np.median(distances) > 0.2, np.round(distances, 3)


def _radial_residual(image: np.ndarray, weight: np.ndarray, width: float = 0.5) -> float:
    """Share of a 2D map's (weighted) variance left after subtracting its best function of the
    distance from one point (means in rings `width` wide), searched on a 1-voxel grid to 56
    voxels either side of the centre (the scanner axis may lie outside the chunk), then refined
    to a quarter voxel; 0 for a map symmetric about some point."""
    yy, xx = (np.indices(image.shape, dtype=np.float64) - np.array(image.shape)[:, None, None] / 2).reshape(2, -1)
    keep = weight.ravel() > 0
    m, w, yy, xx = image.ravel()[keep], weight.ravel()[keep], yy[keep], xx[keep]
    m = m - np.average(m, weights=w)
    total = np.average(m * m, weights=w)

    def residual(cy: float, cx: float) -> float:
        ring = (np.hypot(yy - cy, xx - cx) / width).astype(int)
        mean = np.bincount(ring, w * m) / np.maximum(np.bincount(ring, w), 1e-12)
        return float(np.average((m - mean[ring]) ** 2, weights=w) / total)

    best = min((residual(cy, cx), cy, cx) for cy in range(-56, 57) for cx in range(-56, 57))
    fine = np.arange(-1, 1.01, 0.25)
    return min(residual(best[1] + dy, best[2] + dx) for dy in fine for dx in fine)


def test_ct_artifacts_depend_only_on_the_distance_from_a_z_axis():
    """On a flat image (no drift, little noise) the rings and the cupping are constant along z (a
    column's spread over z is the noise) and the z-mean is radially symmetric about some point:
    a function of the radius leaves about the noise's share of the z-mean's variance (under 2x), and
    that variance is several times the noise's (the artifacts are there). Measured: z-mean
    variance 19-32x the noise's; the radius leaves 1.1-1.3x the noise's (rings narrower than the
    half-voxel rings of the fit leave a little), ~1x without artifacts."""
    from vesuvius_lab.synth import ScrollStyle, _add_ct_artifacts

    shape = (64, 64, 64)
    pos = [(np.arange(n, dtype=np.float32) - n / 2).reshape([-1 if a == i else 1 for a in range(3)])
           for i, n in enumerate(shape)]
    style = ScrollStyle(spacing=(8.0, 12.0), noise=0.05, drift=0.0, debris=0.0)
    noise_of_mean = style.noise**2 / shape[0]
    for seed in range(4):
        out = _add_ct_artifacts(np.full(shape, 0.5, np.float32), np.random.default_rng(seed), pos, style)
        assert (out - out.mean(0)).std() < 1.01 * style.noise, seed  # pure noise: 0.992
        zmean = out.mean(0)
        assert zmean.var() > 5 * noise_of_mean, (seed, zmean.var() / noise_of_mean)
        left = _radial_residual(zmean, np.ones_like(zmean)) * zmean.var()
        assert left < 2 * noise_of_mean, (seed, left / noise_of_mean)


def test_scroll_background_shows_rings_about_the_scanner_axis():
    """In a generated chunk, the background away from any sheet (median over z per column, which
    debris cannot sway; high-passed so the slow drift and packing field drop out) is closer to a
    function of the radius about some point than the same values shuffled over the columns: ring
    artifacts. Residual shares measured: 0.77-0.81 against 0.91-0.92 shuffled (mean gap 0.12);
    without rings and cupping the gap is -0.01 to 0.04 (mean 0.007), so the mean must pass 0.06."""
    from scipy import ndimage

    gaps = []
    for i in range(3):
        img, lab = make_scroll_volume((192, 64, 64), 4, i, scroll_style(4, i))
        background = (lab == 0) & ~ndimage.binary_dilation(lab != 0, iterations=2)
        columns = np.ma.median(np.ma.masked_array(img, ~background), axis=0).filled(0).astype(np.float64)
        weight = np.where(background.sum(0) >= 8, background.sum(0), 0).astype(np.float64)
        columns *= weight > 0
        smooth = ndimage.gaussian_filter(columns * weight, 2.5) / np.maximum(ndimage.gaussian_filter(weight, 2.5), 1e-12)
        detail = columns - smooth
        shuffle = np.random.default_rng(0).permutation(detail.size).reshape(detail.shape)
        shuffled = _radial_residual(detail.ravel()[shuffle], weight.ravel()[shuffle])
        gaps.append(shuffled - _radial_residual(detail, weight))
    assert np.mean(gaps) > 0.06, np.round(gaps, 3)


def test_inclusions_are_a_few_compact_grains_brighter_than_papyrus():
    """On an empty volume, 2-5 separate grains, each 2-5 voxels across (6 when the centre falls
    between voxels) and ball-like (filling at least 0.3 of its bounding box; a ball fills 0.52),
    all at least 0.9: above 99 % of the labelled papyrus of a generated chunk (~0.74)."""
    from scipy import ndimage

    from vesuvius_lab.synth import _add_inclusions

    img, lab = make_scroll_volume(SMALL, 6, 0, scroll_style(6, 0))
    papyrus = np.percentile(img[lab == 1], 99) / 255
    for seed in range(10):
        grains = np.zeros((48, 48, 48), np.float32)
        _add_inclusions(grains, np.random.default_rng(seed))
        comps, n = ndimage.label(grains > 0)
        assert 2 <= n <= 5, (seed, n)
        assert grains[grains > 0].min() >= 0.9 > papyrus, (seed, papyrus)
        for k, box in enumerate(ndimage.find_objects(comps), start=1):
            extent = [s.stop - s.start for s in box]
            assert 2 <= max(extent) <= 6 and (comps[box] == k).mean() >= 0.3, (seed, extent)
