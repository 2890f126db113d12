import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from vesuvius_lab.errors import ConfigError
from vesuvius_lab.io import read_volume, write_volume
from vesuvius_lab.manifest import build_manifest, load_manifest
from vesuvius_lab.synth import synth

REPO = Path(__file__).resolve().parent.parent


def test_build_records_shape_histogram_checksum(cli, tiny_root, tmp_path):
    out = tmp_path / "m" / "tiny.yaml"
    code, lines, err = cli("manifest", "build", tiny_root, "-o", out)
    assert code == 0 and err == []
    manifest = load_manifest(out)
    assert manifest.root == tiny_root.resolve() and len(manifest.records) == 6
    rec = manifest.records[0]
    lab = read_volume(manifest.resolve(rec).label)
    assert rec.stats.shape == (48, 48, 48) and rec.stats.dtype == "uint8"
    assert rec.stats.label_histogram == {v: int((lab == v).sum()) for v in (0, 1, 2)}
    assert len(rec.stats.checksum) == 32
    assert yaml.safe_load(out.read_text())["root"] == "../../tiny0/data"  # stored relative to the manifest


def test_split_by_scroll_never_leaks(tiny_root):
    manifest = build_manifest(tiny_root, progress=False)
    train, val = manifest.split_ids()
    scroll = {r.id: r.scroll_id for r in manifest.records}
    assert train and val and not set(train) & set(val)
    assert not {scroll[i] for i in train} & {scroll[i] for i in val}
    manifest.split = {"policy": "by_scroll_id", "val_scroll_ids": [scroll[train[0]]]}
    train2, val2 = manifest.split_ids()
    assert train[0] in val2 and not {scroll[i] for i in train2} & {scroll[i] for i in val2}


def test_vanished_and_changed_records_are_noticed(cli, data_copy, tmp_path):
    out = tmp_path / "m.yaml"
    assert cli("manifest", "build", data_copy, "-o", out)[0] == 0
    manifest = load_manifest(out)
    gone, changed, same_size = (manifest.resolve(r) for r in manifest.records[:3])
    gone.label.unlink()
    vol = read_volume(changed.image)
    write_volume(changed.image, np.ascontiguousarray(vol[::-1]))  # other content, other compressed size
    lab = read_volume(same_size.label).copy()
    write_volume(same_size.label, lab)  # unchanged content: not a change

    code, _, err = cli("manifest", "check", out)
    assert code == 2 and len(err) == 2
    assert f"{gone.label}: record {gone.id} vanished" in err[0]
    assert f"{changed.image}: record {changed.id} changed" in err[1]

    code, _, err = cli("validate", out)
    assert code == 2 and len(err) == 2  # same answers from preflight; the rewritten label passes


def test_same_size_content_change_is_caught_by_checksum(cli, data_copy, tmp_path):
    out = tmp_path / "m.yaml"
    assert cli("manifest", "build", data_copy, "-o", out)[0] == 0
    rec = load_manifest(out).resolve(load_manifest(out).records[0])
    size = rec.label.stat().st_size
    lab = read_volume(rec.label).copy()
    flips = np.argwhere(lab == 0)[:5]
    for z, y, x in flips:
        lab[z, y, x] = 1
    write_volume(rec.label, lab)
    if rec.label.stat().st_size != size:  # make the sizes agree so only the checksum can tell
        pytest.skip("compressed size changed; covered by the quick check")
    code, _, err = cli("validate", out)
    assert code == 2 and f"record {rec.id} changed since the manifest was built" in err[0]


def test_root_override_and_bad_manifests(tiny_root, tmp_path):
    out = tmp_path / "m.yaml"
    build_manifest(tiny_root, progress=False).save(out)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_root, moved)
    assert load_manifest(out, root=moved).locate()[1] == []
    (tmp_path / "x.yaml").write_text("format: other\n")
    with pytest.raises(ConfigError, match="not a vesuvius_lab manifest"):
        load_manifest(tmp_path / "x.yaml")


def test_committed_demo_manifest_matches_what_synth_writes(tmp_path):
    """data_manifests/synthetic_demo.yaml is true: regenerating the demo data reproduces every record."""
    committed = load_manifest(REPO / "data_manifests" / "synthetic_demo.yaml", root=tmp_path / "demo")
    p = committed.synth
    synth(tmp_path / "demo", p["volumes"], tuple(p["shape"]), p["seed"], p["scrolls"], p["test_volumes"], progress=False)
    rebuilt = build_manifest(tmp_path / "demo", progress=False)
    assert [(r.id, r.scroll_id, r.stats, r.sizes) for r in rebuilt.records] == [
        (r.id, r.scroll_id, r.stats, r.sizes) for r in committed.records
    ]
    train, val = committed.split_ids()
    assert len(train) == 9 and len(val) == 3


@pytest.mark.parametrize("name", ["synthetic_scroll", "synthetic_scroll_seed7"])
def test_committed_scroll_manifests_match_what_synth_writes(tmp_path, name):
    """The scroll-like sets are true too: their first two records regenerate from the synth section
    (ids and volumes do not depend on how many follow; all of them would take a minute)."""
    committed = load_manifest(REPO / "data_manifests" / f"{name}.yaml", root=tmp_path / "s")
    p = committed.synth
    assert p["geometry"] == "scroll"
    synth(tmp_path / "s", 2, tuple(p["shape"]), p["seed"], p["scrolls"], 0, progress=False, geometry="scroll")
    rebuilt = build_manifest(tmp_path / "s", progress=False)
    assert [(r.id, r.scroll_id, r.stats, r.sizes) for r in rebuilt.records] == [
        (r.id, r.scroll_id, r.stats, r.sizes) for r in committed.records[:2]
    ]
    assert committed.split_ids()[1]  # validation volumes to tune and check transfer on


def test_kaggle_manifest_describes_the_competition_split():
    m = load_manifest(REPO / "data_manifests" / "kaggle_surface_detection.yaml", root=REPO)
    assert m.split["policy"] == "by_scroll_id" and m.records == []


@pytest.mark.parametrize("extra, key", [
    ("labels:\n  values: {0: bg, 1: fg, 3: unknown}\n  ignore_label: 3\n", "labels"),
    ("layout:\n  csv: scans.csv\n  images: img/{id}.tif\n", "layout"),
])
def test_a_manifest_asking_for_other_labels_or_layout_is_refused(tiny_root, tmp_path, extra, key):
    """The Kaggle labels (2 ignored) and layout are what the sampler, losses and metric apply; a
    manifest that says otherwise must not be silently ignored."""
    path = tmp_path / "m.yaml"
    build_manifest(tiny_root, progress=False).save(path)
    path.write_text(path.read_text().replace("split:", extra + "split:", 1))
    with pytest.raises(ConfigError) as err:
        load_manifest(path)
    assert err.value.lines == [err.value.lines[0]] and f"key '{key}'" in err.value.lines[0] and str(path) in err.value.lines[0]
    legacy = tmp_path / "legacy.yaml"  # older manifests spelled out the Kaggle semantics: still fine
    build_manifest(tiny_root, progress=False).save(legacy)
    legacy.write_text(legacy.read_text().replace("split:", "layout: {}\nlabels:\n  values: {0: a, 1: b, 2: c}\n  ignore_label: 2\nsplit:", 1))
    assert len(load_manifest(legacy).records) == 6
