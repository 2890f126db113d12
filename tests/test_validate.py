"""Preflight validation: each defect made by hand gives its own line naming the file, and exit 2."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from vesuvius_lab.io import read_volume, write_volume


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.blake2b(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def first_id(root: Path) -> str:
    return (root / "train.csv").read_text().splitlines()[1].split(",")[0]


def test_synth_then_validate_is_clean(cli, tmp_path):
    code, _, err = cli("synth", tmp_path / "x", "--volumes", 4, "--shape", 40, "--seed", 0)
    assert code == 0 and err == []
    code, out, err = cli("validate", tmp_path / "x")
    assert (code, err) == (0, []) and out[-1].endswith(": ok")


def _missing_image(root, rid):
    (root / "train_images" / f"{rid}.tif").unlink()
    return [f"train_images/{rid}.tif: missing image file for csv id {rid}"]


def _missing_label(root, rid):
    (root / "train_labels" / f"{rid}.tif").unlink()
    return [f"train_labels/{rid}.tif: missing label file for csv id {rid}"]


def _csv_id_without_files(root, rid):
    with open(root / "train.csv", "a") as fh:
        fh.write("999,34117\n")
    return ["train_images/999.tif: missing image file for csv id 999", "train_labels/999.tif: missing label file"]


def _file_without_csv_id(root, rid):
    (root / "train_images" / "12345.tif").write_bytes((root / "train_images" / f"{rid}.tif").read_bytes())
    return ["train_images/12345.tif: file has no id in train.csv"]


def _duplicate_id(root, rid):
    with open(root / "train.csv", "a") as fh:
        fh.write(f"{rid},35360\n")
    return [f"train.csv:8: duplicate id {rid}"]


def _shape_mismatch(root, rid):
    write_volume(root / "train_labels" / f"{rid}.tif", np.zeros((40, 48, 48), np.uint8))
    return [f"train_labels/{rid}.tif: shape (40, 48, 48) does not match image shape (48, 48, 48)"]


def _not_3d(root, rid):
    tifffile.imwrite(root / "train_images" / f"{rid}.tif", np.zeros((48, 48), np.uint8))
    return [f"train_images/{rid}.tif: expected a 3D volume, found shape (48, 48)"]


def _wrong_dtype(root, rid):
    vol = read_volume(root / "train_images" / f"{rid}.tif").astype(np.uint16)
    tifffile.imwrite(root / "train_images" / f"{rid}.tif", vol, compression="lzw")
    return [f"train_images/{rid}.tif: dtype uint16, expected uint8"]


def _bad_label_values(root, rid):
    lab = read_volume(root / "train_labels" / f"{rid}.tif").copy()
    lab[10, 10, 10:13] = (3, 255, 7)
    write_volume(root / "train_labels" / f"{rid}.tif", lab)
    return [f"train_labels/{rid}.tif: label values {{3, 7, 255}} outside {{0, 1, 2}}"]


def _truncated(root, rid):
    path = root / "train_images" / f"{rid}.tif"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return [f"train_images/{rid}.tif: truncated or corrupt TIFF"]


def _corrupt(root, rid):
    path = root / "train_labels" / f"{rid}.tif"
    path.write_bytes(np.random.default_rng(0).integers(0, 255, 4000, dtype=np.uint8).tobytes())
    return [f"train_labels/{rid}.tif: truncated or corrupt TIFF"]


def _empty_csv(root, rid):
    (root / "train.csv").write_text("")
    return ["train.csv: empty csv (no header)"]


def _header_only_csv(root, rid):
    (root / "train.csv").write_text("id,scroll_id\n")
    return ["train.csv: empty csv (header but no rows)"]


def _missing_column(root, rid):
    (root / "train.csv").write_text("id,scroll\n1,2\n")
    return ["train.csv: missing column(s) scroll_id (found id, scroll)"]


def _deprecated_label_with_2(root, rid):
    (root / "deprecated_train_images").mkdir()
    (root / "deprecated_train_labels").mkdir()
    vol = read_volume(root / "train_labels" / f"{rid}.tif")  # has 0, 1 and 2
    write_volume(root / "deprecated_train_images" / "old.tif", vol)
    write_volume(root / "deprecated_train_labels" / "old.tif", vol)
    return ["deprecated_train_labels/old.tif: label values {2} outside {0, 1}"]


DEFECTS = [
    _missing_image, _missing_label, _csv_id_without_files, _file_without_csv_id, _duplicate_id,
    _shape_mismatch, _not_3d, _wrong_dtype, _bad_label_values, _truncated, _corrupt, _empty_csv,
    _header_only_csv, _missing_column, _deprecated_label_with_2,
]


@pytest.mark.parametrize("defect", DEFECTS, ids=lambda f: f.__name__.strip("_"))
def test_each_defect_gives_its_line_and_exit_2(cli, data_copy, defect):
    expected = defect(data_copy, first_id(data_copy))
    before = tree_digest(data_copy)
    code, out, err = cli("validate", data_copy)
    assert code == 2, (out, err)
    for fragment in expected:
        assert any(fragment in line for line in err), (fragment, err)
    assert all(line.startswith("error: ") and "\n" not in line for line in err)
    assert len(err) == len(expected), err  # one line per problem, no collateral noise
    assert tree_digest(data_copy) == before  # validation never touches the data


def test_all_problems_are_reported_at_once(cli, data_copy):
    rid = first_id(data_copy)
    expected = _missing_label(data_copy, rid) + _file_without_csv_id(data_copy, rid)
    other = (data_copy / "train.csv").read_text().splitlines()[2].split(",")[0]
    expected += _truncated(data_copy, other)
    code, _, err = cli("validate", data_copy)
    assert code == 2 and len(err) == 3
    for fragment in expected:
        assert any(fragment in line for line in err)


def test_volume_smaller_than_patch_is_a_note(cli, tiny_root):
    code, out, err = cli("validate", tiny_root, "--patch-size", "72,136,136")
    assert code == 0 and err == [] and out[-1] == f"{tiny_root}: ok"
    assert len(out) == 7 and all(line.startswith(f"note: {tiny_root / 'train_images'}") for line in out[:-1])
    assert all(line.endswith("volume shape (48, 48, 48) is smaller than the patch size (72, 136, 136) along z, y, x; "
                             "padded to the patch, with the ignore label in training") for line in out[:-1])
    assert cli("validate", tiny_root, "--patch-size", "32") == (0, [f"{tiny_root}: ok"], [])


def test_patch_size_from_config(cli, tiny_root, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  patch_size: [32, 64, 48]\n")
    code, out, err = cli("validate", tiny_root, "--config", cfg)
    assert code == 0 and "smaller than the patch size (32, 64, 48) along y;" in out[0]


def test_manifest_path_escaping_root(cli, data_copy, tmp_path):
    manifest = tmp_path / "m.yaml"
    assert cli("manifest", "build", data_copy, "-o", manifest)[0] == 0
    doc = yaml.safe_load(manifest.read_text())
    doc["records"][0]["image"] = "../../../etc/passwd"
    manifest.write_text(yaml.safe_dump(doc))
    code, _, err = cli("validate", manifest)
    assert code == 2 and len(err) == 1
    assert "../../../etc/passwd: image path of record" in err[0] and "escapes the data root" in err[0]


def test_missing_root_and_bad_manifest(cli, tmp_path):
    code, _, err = cli("validate", tmp_path / "nope")
    assert code == 2 and err == [f"error: {tmp_path / 'nope'}: data root is not a directory"]
    bad = tmp_path / "m.yaml"
    bad.write_text("records: [1, 2\n")
    code, _, err = cli("validate", bad)
    assert code == 2 and len(err) == 1 and "not valid YAML" in err[0]
