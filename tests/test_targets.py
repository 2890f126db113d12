import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from vesuvius_lab.targets import DISTANCE_CLIP, fg_points, medial_surface, signed_distance, slicing_axis


def tilted_sheet(shape=(40, 48, 48), thickness=4.0):
    z, y, x = np.indices(shape)
    depth = z - 0.3 * y - 0.1 * x
    label = np.zeros(shape, np.uint8)
    label[np.abs(depth - 4) < thickness / 2] = 1
    return label


def test_medial_surface_keeps_a_surface_where_3d_skeletonize_collapses_it():
    label = tilted_sheet()
    surf = medial_surface(label)
    assert (label[surf == 1] == 1).all()
    # One thin layer: every (y, x) column crossing the sheet holds about one surface voxel.
    columns = label.any(axis=0)
    per_column = surf.sum(axis=0)[columns]
    assert np.median(per_column) == 1 and (per_column <= 2).mean() > 0.95
    assert surf.sum() > 0.6 * columns.sum()
    # 3D skeletonization of the same sheet leaves far fewer voxels: it is no surface.
    assert skeletonize(label.astype(bool)).sum() < 0.5 * surf.sum()


def test_slicing_axis_lies_in_the_sheet_plane():
    label = tilted_sheet()
    assert slicing_axis(label == 1) != 0  # the normal is mostly z
    assert slicing_axis(np.swapaxes(label, 0, 2) == 1) != 2


def test_signed_distance_sign_values_and_empty():
    label = np.zeros((20, 20, 20), np.uint8)
    label[8:12] = 1
    label[0] = 2  # ignore does not count as foreground
    d = signed_distance(label)
    assert d.dtype == np.float16
    assert d[10, 5, 5] < 0 and d[3, 5, 5] == 5 and d[15, 5, 5] == 4
    assert (d[label == 1] < 0).all() and (d[label != 1] > 0).all()
    reference = ndimage.distance_transform_edt(label != 1)
    np.testing.assert_allclose(d[label != 1], np.minimum(reference[label != 1], DISTANCE_CLIP), atol=0.01)
    assert (signed_distance(np.zeros((5, 5, 5), np.uint8)) == DISTANCE_CLIP).all()


def test_fg_points_are_label_1_and_deterministic():
    label = tilted_sheet()
    pts = fg_points(label, 500, seed=1)
    assert pts.shape == (500, 3) and (label[tuple(pts.T)] == 1).all()
    np.testing.assert_array_equal(pts, fg_points(label, 500, seed=1))
