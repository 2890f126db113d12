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


def test_a_group_of_keys_written_nested_reads_as_its_flat_keys(tmp_path):
    """training.early_stop: {patience, min_delta} (as Lightning users write it), the dotted override
    and the flat keys that config.yaml stores are one setting; a misspelt member names the flat key."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  early_stop: {patience: 3, min_delta: 0.01}\n")
    nested = load_config(cfg)
    assert (nested.training.early_stop_patience, nested.training.early_stop_min_delta) == (3, 0.01)
    assert load_config(cfg, ["training.early_stop.patience=5"]).training.early_stop_patience == 5
    flat = tmp_path / "flat.yaml"
    flat.write_text("training:\n  early_stop_patience: 3\n  early_stop_min_delta: 0.01\n")
    assert load_config(flat) == nested
    cfg.write_text("training:\n  early_stop: {patiense: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert err.value.lines == [f"{cfg}: unknown key training.early_stop_patiense "
                               "(did you mean training.early_stop_patience?)"]


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


def test_floats_as_researchers_write_them(tmp_path):
    """PyYAML reads YAML 1.1, where 1e-3 is a string; configs and overrides take it as a float."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lr: 1e-3\n  weight_decay: 5E-4\n  min_lr: 1.5e-6\nval:\n  overlap: .5\n")
    c = load_config(cfg, ["optim.poly_power=2e0", "loss.pos_weight=3E+0"])
    assert (c.optim.lr, c.optim.weight_decay, c.optim.min_lr, c.val.overlap) == (1e-3, 5e-4, 1.5e-6, 0.5)
    assert (c.optim.poly_power, c.loss.pos_weight) == (2.0, 3.0)
    assert load_config(None, ["training.seed=12"]).training.seed == 12  # integers stay integers
    assert load_config(None, ["data.manifest=1e3.yaml"]).data.manifest == "1e3.yaml"


def _bad_value(key: str, rule, annotation):
    """A value of the right type that the rule refuses."""
    import types
    import typing

    kind = annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # Optional[X]: X
        kind = next(a for a in typing.get_args(annotation) if a is not type(None))
    item_kind = typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind
    if rule.choices:
        bad = "no-such-choice"
    elif rule.low is not None:
        bad = rule.low if rule.low_open else rule.low - 1
    else:
        bad = rule.high if rule.high_open else rule.high + 1
    bad = item_kind(bad) if not rule.choices else bad
    if typing.get_origin(kind) is list:
        return [bad] * (rule.length or 3)
    return bad


def test_every_key_has_a_meaningful_range_and_out_of_range_is_one_line():
    import dataclasses
    import typing

    from vesuvius_lab.config import PATH_KEYS, RULES, Config

    walked = 0
    for section in dataclasses.fields(Config):
        if section.metadata.get("internal"):
            continue
        hints = typing.get_type_hints(type(getattr(Config(), section.name)))
        for key, annotation in hints.items():
            name = f"{section.name}.{key}"
            if (section.name, key) in PATH_KEYS or annotation is bool:
                assert name not in RULES
                continue
            assert name in RULES, f"{name} has no range in config.RULES"
            bad = _bad_value(name, RULES[name], annotation)
            with pytest.raises(ConfigError) as err:
                load_config(None, [f"{name}={bad!r}".replace("'", "")])
            lines = err.value.lines
            assert len(lines) == 1 and lines[0].startswith(f"override: {name}: ") and ("allowed" in lines[0] or "is not one of" in lines[0]), lines
            walked += 1
    assert walked >= 60


def test_ranges_as_a_new_user_meets_them(tmp_path, cli):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  train_batch_size: -2\n  max_epochs: -1\noptim:\n  lr: 1e-3\n  min_lr: 0.01\n"
                   "augment:\n  scale_range: [1.25, 0.8]\n")
    code, _, err = cli("train", "--config", cfg, "--run-dir", tmp_path / "run")
    assert code == 2 and not (tmp_path / "run").exists()
    assert err == [f"error: {cfg}: training.train_batch_size: -2 is out of range (allowed: >= 1)",
                   f"error: {cfg}: training.max_epochs: -1 is out of range (allowed: >= 1)",
                   f"error: {cfg}: augment.scale_range: [1.25, 0.8] must be in increasing order ([low, high])",
                   "error: optim.min_lr: 0.01 is above optim.lr 0.001"]
