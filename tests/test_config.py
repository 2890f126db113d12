from pathlib import Path

import pytest

from vesuvius_lab.config import load_config
from vesuvius_lab.errors import ConfigError


def test_file_then_overrides(tmp_path):
    cfg = tmp_path / "configs" / "c.yaml"
    cfg.parent.mkdir()
    cfg.write_text("training:\n  workers: 4\n  train_iterations_per_epoch: 50\ndata:\n  patch_size: [72, 136, 136]\n")
    # 72 x 136 x 136 needs a U-Net whose stages divide it: 4 stages halve 3 times (8 | 72, 136).
    overrides = ["training.workers=1", "training.train_iterations_per_epoch=null", "training.patches_per_volume=4"]
    c = load_config(cfg, [*overrides, "training.seed=7"])
    assert (c.training.workers, c.training.train_iterations_per_epoch, c.training.seed) == (1, None, 7)
    assert c.training.patches_per_volume == 4
    assert c.data.patch_size == [72, 136, 136]
    assert c.root == cfg.parent  # the config file's own folder, whatever its name
    assert c.path("../data_manifests/x.yaml", "manifest") == (tmp_path / "data_manifests" / "x.yaml").resolve()


def test_unknown_keys_and_wrong_types_name_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  wrokers: 4\n  max_epochs: many\nmodle: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg, ["training.persistent_workers=3", "data.patch_size=[1,2]", "nodot=1"])
    text = "\n".join(err.value.lines)
    for fragment in (
        "unknown key training.wrokers",
        "training.max_epochs: expected int, got str 'many'",
        "unknown section 'modle'",
        "training.persistent_workers: expected bool, got int 3",
        "data.patch_size: expected 3 positive sizes",
        "override 'nodot=1': expected section.key=value",
    ):
        assert fragment in text
    assert len(err.value.lines) == 6


def test_config_paths_resolve_against_the_config_folder_and_env(tmp_path, monkeypatch):
    """One rule: relative to the file that holds them; absolute, ~ and ${ENV} paths as written."""
    cfg = tmp_path / "anywhere" / "c.yaml"
    cfg.parent.mkdir()
    cfg.write_text("data:\n  manifest: m/x.yaml\n  root: ${VLAB_TEST_DATA}/d\n  cache_dir: /abs/cache\n")
    monkeypatch.setenv("VLAB_TEST_DATA", str(tmp_path / "data"))
    c = load_config(cfg)
    assert c.path(c.data.manifest, "data.manifest") == cfg.parent / "m" / "x.yaml"
    assert c.path(c.data.root, "data.root") == tmp_path / "data" / "d"
    assert c.path(c.data.cache_dir, "data.cache_dir") == Path("/abs/cache")
    monkeypatch.delenv("VLAB_TEST_DATA")
    with pytest.raises(ConfigError, match="data.root: .*environment variable that is not set"):
        c.path(c.data.root, "data.root")


def test_cross_checks_name_the_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.patch_size=[72,136,136]", "model.features=[8,16,32,64,128]",
                           "training.train_iterations_per_epoch=null", "postprocess.method=otsu"])
    text = "\n".join(err.value.lines)
    assert "must be divisible by 16" in text and "set train_iterations_per_epoch or patches_per_volume" in text
    assert "postprocess.method: 'otsu' is not one of" in text
