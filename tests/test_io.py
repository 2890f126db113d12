import numpy as np
import pytest
import tifffile

from vesuvius_lab.errors import DataError
from vesuvius_lab.io import atomic_path, atomic_write_text, read_volume, resolve_inside, tiff_info, write_volume


def test_volume_roundtrip_is_lzw_multipage(tmp_path):
    vol = np.random.default_rng(0).integers(0, 255, size=(7, 20, 30), dtype=np.uint8)
    path = tmp_path / "v.tif"
    write_volume(path, vol)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 7
        assert tif.pages.first.compression == tifffile.COMPRESSION.LZW
    np.testing.assert_array_equal(read_volume(path), vol)
    info = tiff_info(path)
    assert info.shape == (7, 20, 30) and info.dtype == np.uint8


def test_truncated_tiff_is_a_one_line_error(tmp_path):
    path = tmp_path / "v.tif"
    write_volume(path, np.random.default_rng(1).integers(0, 255, size=(16, 32, 32), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        read_volume(path)
    assert len(err.value.lines) == 1 and str(path) in err.value.lines[0] and "truncated" in err.value.lines[0]


def test_tiff_info_finds_a_cut_file_and_channels_from_headers(tmp_path):
    """A file cut short keeps its headers; the last page's data past the end gives it away."""
    path = tmp_path / "v.tif"
    write_volume(path, np.random.default_rng(1).integers(0, 255, size=(16, 32, 32), dtype=np.uint8))
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError) as err:
        tiff_info(path)
    assert err.value.lines == [f"{path}: truncated TIFF (its pages' data ends at byte {size}, the file has {size - 10})"]
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((4, 8, 8, 3), np.uint8), photometric="rgb")
    info = tiff_info(rgb)
    assert (info.channels, info.spatial_shape, info.axes) == (3, (4, 8, 8), "QYXS")
    grey = tmp_path / "grey.tif"
    write_volume(grey, np.zeros((4, 8, 8), np.uint8))
    assert (tiff_info(grey).channels, tiff_info(grey).spatial_shape) == (1, (4, 8, 8))


def test_2d_tiff_is_rejected(tmp_path):
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, np.zeros((32, 32), np.uint8))
    with pytest.raises(DataError, match="expected a 3D volume"):
        read_volume(path)


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "ckpt.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.txt"]  # no temp file left behind


def test_atomic_path_creates_missing_parent_dirs(tmp_path):
    atomic_write_text(tmp_path / "runs" / "exp" / "checkpoints" / "x.txt", "ok")
    assert (tmp_path / "runs" / "exp" / "checkpoints" / "x.txt").read_text() == "ok"


@pytest.mark.parametrize("bad", ["../outside.tif", "/etc/passwd", "a/../../b.tif"])
def test_resolve_inside_refuses_escapes(tmp_path, bad):
    with pytest.raises(DataError, match="escapes the data root"):
        resolve_inside(tmp_path, bad)


def test_resolve_inside_refuses_symlink_escape(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(DataError):
        resolve_inside(tmp_path / "root", "link/secret.tif")
    assert resolve_inside(tmp_path / "root", "a/b.tif") == (tmp_path / "root" / "a" / "b.tif").resolve()
