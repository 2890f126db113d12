import pytest

from vesuvius_lab.config import load_config
from vesuvius_lab.errors import ConfigError


def test_file_then_overrides(tmp_path):
    cfg = tmp_path / "configs" / "c.yaml"
    cfg.parent.mkdir()
    cfg.write_text("training:\n  workers: 4\n  train_iterations_per_epoch: 50\ndata:\n  patch_size: [72, 136, 136]\n")
    c = load_config(cfg, ["training.workers=1", "training.train_iterations_per_epoch=null", "training.seed=7"])
    assert (c.training.workers, c.training.train_iterations_per_epoch, c.training.seed) == (1, None, 7)
    assert c.data.patch_size == [72, 136, 136]
    assert c.root == tmp_path  # the folder holding configs/
    assert c.path("data_manifests/x.yaml", "manifest") == (tmp_path / "data_manifests" / "x.yaml").resolve()


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


def test_config_paths_stay_inside_root(tmp_path):
    c = load_config(None)
    c.root = tmp_path
    with pytest.raises(Exception, match="escapes"):
        c.path("../../etc/passwd", "data.manifest")
