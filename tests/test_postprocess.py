"""Post-processing, judged by the leaderboard score on hand-made probability volumes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vesuvius_lab.errors import ConfigError
from vesuvius_lab.leaderboard import volume_score
from vesuvius_lab.postprocess import PostprocessConfig, postprocess


def sheet_label(shape=(24, 24, 24)) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[5:7] = 1
    label[15:17] = 1
    return label


def test_threshold_is_strictly_greater():
    prob = np.array([0.2, 0.5, 0.51, np.nan], np.float32).reshape(1, 1, 4)
    out = postprocess(prob, PostprocessConfig(threshold=0.5))
    assert out.dtype == np.uint8
    assert out.ravel().tolist() == [0, 0, 1, 0]


def test_hysteresis_keeps_weak_voxels_only_when_connected_to_strong_ones():
    prob = np.zeros((3, 3, 12), np.float32)
    prob[1, 1, 0:4] = [0.9, 0.5, 0.5, 0.5]  # weak run attached to a strong voxel
    prob[1, 1, 7:10] = 0.5  # weak run on its own
    out = postprocess(prob, {"method": "hysteresis", "low": 0.4, "high": 0.8})
    assert out[1, 1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]


def test_small_components_go_and_connectivity_is_the_metrics_6():
    """A diagonal chain is three components to the metric (6-connected foreground), so it goes."""
    mask = np.zeros((10, 10, 10), np.float32)
    mask[1, 1, 1] = mask[2, 2, 2] = mask[3, 3, 3] = 1  # a diagonal chain: three 6-components of 1
    mask[6, 6, 6:8] = 1  # two face neighbours: one 6-component of 2
    mask[8, 8, 8] = 1  # a single voxel
    out = postprocess(mask, PostprocessConfig(min_component_size=2))
    assert out[1, 1, 1] == out[2, 2, 2] == out[3, 3, 3] == 0
    assert out[6, 6, 6] == out[6, 6, 7] == 1
    assert out[8, 8, 8] == 0


def test_close_holes_fills_cavities_but_not_open_background():
    prob = np.zeros((9, 9, 9), np.float32)
    prob[1:6, 1:6, 1:6] = 1
    prob[3, 3, 3] = 0  # enclosed
    prob[3, 3, 1] = 0  # open to the outside of the block, not enclosed
    out = postprocess(prob, PostprocessConfig(close_holes=True))
    assert out[3, 3, 3] == 1 and out[3, 3, 1] == 0 and out[0, 0, 0] == 0
    assert postprocess(prob)[3, 3, 3] == 0  # off by default


def test_removing_small_spurious_components_raises_the_score():
    label = sheet_label()
    rng = np.random.default_rng(0)
    prob = np.where(label == 1, 0.9, 0.1).astype(np.float32)
    for c in ((10, 3, 3), (10, 12, 12), (20, 4, 18), (11, 19, 6), (2, 20, 20)):  # debris between sheets
        prob[c[0] : c[0] + 2, c[1] : c[1] + 2, c[2] : c[2] + 2] = 0.85
    prob += rng.uniform(-0.05, 0.05, prob.shape).astype(np.float32)
    raw = volume_score(postprocess(prob, PostprocessConfig(threshold=0.5)), label)
    clean = volume_score(postprocess(prob, PostprocessConfig(threshold=0.5, min_component_size=20)), label)
    assert raw.score < 1.0
    assert clean.score > raw.score
    assert clean.voi_score > raw.voi_score and clean.topo > raw.topo
    assert clean.as_dict() == {"score": 1.0, "topo": 1.0, "surface_dice": 1.0, "voi_score": 1.0}


def test_input_is_not_modified():
    prob = np.random.default_rng(1).random((8, 8, 8)).astype(np.float32)
    before = prob.copy()
    postprocess(prob, PostprocessConfig(min_component_size=3, close_holes=True))
    assert np.array_equal(prob, before)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="postprocess.method"):
        PostprocessConfig(method="otsu")
    with pytest.raises(ConfigError, match="postprocess.min_component_size"):
        PostprocessConfig(min_component_size=-1)
    with pytest.raises(ConfigError, match="postprocess.treshold: unknown key"):
        PostprocessConfig.from_mapping({"treshold": 0.4})
    with pytest.raises(ConfigError, match="postprocess.threshold"):
        PostprocessConfig(threshold=float("nan"))
    cfg = dataclasses.replace(PostprocessConfig(method="hysteresis"), low=0.9)  # built key by key: fine
    with pytest.raises(ConfigError, match="postprocess.low 0.9 is above postprocess.high 0.7"):
        postprocess(np.zeros((2, 2, 2), np.float32), cfg)
    with pytest.raises(ValueError, match="3D"):
        postprocess(np.zeros((4, 4), np.float32))


def test_one_range_for_a_key_wherever_the_setting_comes_from(tmp_path, cli):
    """postprocess.threshold is a probability: 1.5 is refused with the same line by an override,
    a config file, a tune-postprocess grid and a section built in code (the origin aside)."""
    import torch

    from vesuvius_lab.config import Config
    from vesuvius_lab.io import write_volume
    from vesuvius_lab.model import build_model

    message = "postprocess.threshold: 1.5 is out of range (allowed: [0, 1])"
    config = Config()
    checkpoint = tmp_path / "model.pt"
    model = build_model(config.model, config.data.patch_size)
    torch.save({"config": config.to_dict(), "model": model.state_dict()}, checkpoint)
    write_volume(tmp_path / "images" / "1.tif", np.zeros((8, 8, 8), np.uint8))
    code, _, err = cli("predict", "--checkpoint", checkpoint, "--input", tmp_path / "images", "--output", tmp_path / "out",
                       "postprocess.threshold=1.5")
    assert code == 2 and err == [f"error: override: {message}"] and not (tmp_path / "out").exists()

    cfg = tmp_path / "c.yaml"
    cfg.write_text("postprocess:\n  threshold: 1.5\n")
    code, _, err = cli("train", "--config", cfg, "--run-dir", tmp_path / "run")
    assert code == 2 and err == [f"error: {cfg}: {message}"] and not (tmp_path / "run").exists()

    prob, labels = tmp_path / "prob", tmp_path / "labels"
    prob.mkdir()
    np.save(prob / "1.npy", np.full((8, 8, 8), 0.6, np.float32))
    write_volume(labels / "1.tif", sheet_label((8, 8, 8)))
    code, _, err = cli("tune-postprocess", "--prob", prob, "--labels", labels, "--grid", "threshold=[1.5]")
    assert code == 2 and err == [f"error: {message}"]

    with pytest.raises(ConfigError) as raised:
        PostprocessConfig(threshold=1.5)
    assert raised.value.lines == [message]
