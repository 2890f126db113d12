"""The leaderboard's recipes: nnU-Net's DynUNet, EMA weights, late-starting loss terms, kept
checkpoints and checkpoint ensembles, and the recipe configs."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lab_runs_helpers import write_tiny_config
from vesuvius_lab.config import LossConfig, load_config
from vesuvius_lab.errors import ConfigError, DataError
from vesuvius_lab.io import atomic_write_text
from vesuvius_lab.losses import TERMS, TopologyLoss
from vesuvius_lab.model import as_input, build_model, parameter_count
from vesuvius_lab.network_plan import nnunet_plan
from vesuvius_lab.training import train
from vesuvius_lab.training.run_dir import RunDir, checkpoint_sources

REPO = Path(__file__).resolve().parent.parent
DYNUNET = {"arch": "dynunet", "res_block": True, "base_features": 4, "max_features": 16}
STEPS, EPOCHS = 4, 3


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def recipe_run(tiny_root, tmp_path_factory) -> Path:
    """A tiny residual DynUNet trained with an EMA, a late-starting skeleton recall term and kept
    checkpoints: three epochs of four steps, validated after each."""
    folder = tmp_path_factory.mktemp("recipe")
    cfg = write_tiny_config(tiny_root, folder / "cfg", steps=STEPS, epochs=EPOCHS, model=DYNUNET,
                            optim={"ema_decay": 0.9, "lr": 0.02},
                            loss={"topo": 0.0, "skeleton_recall_start": 5, "skeleton_recall_ramp": 2},
                            training={"keep_last": 2, "keep_best": 2, "checkpoint_every_steps": 2})
    run = folder / "run"
    assert train(load_config(cfg), run, progress=False)["state"] == "finished"
    return run


# --- the architecture ------------------------------------------------------------------------------

def test_dynunet_is_planned_from_the_patch_as_nnunet_plans_it():
    """nnU-Net v2's planner (isotropic spacing, feature maps >= 4): 128^3 gets 6 stages pooled 5 times;
    72 x 136 x 136 stops pooling z one stage early and would be padded to 80 x 160 x 160."""
    cube = nnunet_plan([128, 128, 128])
    assert cube.strides == [[1, 1, 1]] + [[2, 2, 2]] * 5 and cube.kernels == [[3, 3, 3]] * 6
    assert cube.divisor == [32, 32, 32] and cube.padded_patch == [128, 128, 128]
    seed = nnunet_plan([72, 136, 136])
    assert seed.strides[-1] == [1, 2, 2] and seed.divisor == [16, 32, 32] and seed.padded_patch == [80, 160, 160]
    config = load_config(None, ["model.arch=dynunet", "data.patch_size=[128,128,128]"])
    model = build_model(config.model, config.data.patch_size)
    assert 31_000_000 < parameter_count(model) < 31_400_000  # nnU-Net's 3d_fullres U-Net, 32 -> 320 wide
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.arch=dynunet", "data.patch_size=[72,136,136]"])
    assert err.value.lines == ["data.patch_size: [72, 136, 136] must be a multiple of [16, 32, 32] for model.arch "
                               "dynunet (nnU-Net's 6-stage plan for it); nnU-Net would use [80, 160, 160]"]


def test_dynunet_heads_reach_the_loss_at_their_own_resolution():
    config = load_config(None, ["data.patch_size=[16,16,32]", "model.deep_supervision_heads=3",
                                *(f"model.{k}={v}" for k, v in DYNUNET.items())])
    model = build_model(config.model, config.data.patch_size)
    outputs = model.train()(as_input(torch.randn(2, 1, 16, 16, 32)))
    assert [tuple(o.shape[2:]) for o in outputs] == [(16, 16, 32), (8, 8, 16)]  # 3 stages: one auxiliary head
    label = torch.zeros(2, 16, 16, 32, dtype=torch.uint8)
    label[:, 4:6] = 1
    targets = {"label": label, "skeleton": (label == 1).to(torch.uint8), "distance": torch.zeros(label.shape)}
    loss, _ = TopologyLoss(config.loss)(outputs, targets)
    loss.backward()
    assert math.isfinite(loss.item()) and all(p.grad is not None for p in model.parameters())
    assert model.eval()(as_input(torch.randn(1, 1, 16, 16, 32))).shape == (1, 1, 16, 16, 32)


def test_resuming_a_dynunet_with_a_patch_that_replans_it_is_one_line(recipe_run, cli):
    before = (recipe_run / "checkpoints" / "last.pt").read_bytes()
    code, _, err = cli("train", "--config", recipe_run / "config.yaml", "--run-dir", recipe_run, "--resume",
                       "--no-progress", "data.patch_size=[32,32,32]", "training.max_epochs=4")
    assert code == 2 and len(err) == 1 and "cannot resume with another model" in err[0]
    assert "data.patch_size [16, 16, 16] -> [32, 32, 32] (model.arch dynunet plans its stages from it)" in err[0]
    assert (recipe_run / "checkpoints" / "last.pt").read_bytes() == before


# --- per-term schedules ----------------------------------------------------------------------------

def test_a_term_contributes_nothing_before_its_start_and_its_full_weight_after_the_ramp():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1, 8, 8, 8, generator=gen)
    label = torch.randint(0, 3, (1, 8, 8, 8), generator=gen, dtype=torch.uint8)
    targets = {"label": label, "skeleton": (label == 1).to(torch.uint8), "distance": torch.zeros(label.shape)}
    base = {"bce": 1.0, "dice": 1.0, "cldice": 0.0, "surface": 0.0, "topo": 0.0}
    scheduled = TopologyLoss(LossConfig(**base, skeleton_recall=0.8, skeleton_recall_start=3, skeleton_recall_ramp=4))
    without, _ = TopologyLoss(LossConfig(**base, skeleton_recall=0.0))(logits, targets)
    always, _ = TopologyLoss(LossConfig(**base, skeleton_recall=0.8))(logits, targets)
    term = (always - without).item() / 0.8
    assert term > 0
    for step in range(3):  # off: not even computed
        total, report = scheduled(logits, targets, step)
        assert torch.equal(total, without) and report["skeleton_recall"] is None
        assert scheduled.weights_at(step)["skeleton_recall"] == 0.0
    for step, share in ((3, 0.25), (4, 0.5), (5, 0.75)):  # the ramp
        total, _ = scheduled(logits, targets, step)
        assert total.item() == pytest.approx(without.item() + share * 0.8 * term, rel=1e-6)
    for step in (6, 7, 1000):  # full weight from the end of the ramp
        total, _ = scheduled(logits, targets, step)
        assert torch.equal(total, always)
    by_epoch = TopologyLoss(LossConfig(skeleton_recall=0.8, skeleton_recall_start=2, schedule_unit="epoch"),
                            steps_per_epoch=10)
    assert [by_epoch.weights_at(s)["skeleton_recall"] for s in (19, 20)] == [0.0, 0.8]


def test_the_log_and_the_live_plot_show_when_a_term_starts(recipe_run):
    from vesuvius_lab.lab.runs import History, history_figure

    steps = [r for r in records(recipe_run) if r["kind"] == "train"]
    assert [r["weight_skeleton_recall"] for r in steps[:8]] == [0, 0, 0, 0, 0, 0.15, 0.3, 0.3]
    assert all(r["skeleton_recall"] is None for r in steps[:5]) and all(r["skeleton_recall"] is not None for r in steps[5:])
    assert all(r["weight_dice"] == 1.0 for r in steps)
    history = History()
    history.add(records(recipe_run))
    assert history.term_starts() == {"skeleton_recall": 6}  # logged steps count from 1
    loss_axis = history_figure(history).axes[0]
    assert "skeleton_recall starts" in [line.get_label() for line in loss_axis.lines]


# --- EMA -------------------------------------------------------------------------------------------

def test_ema_is_validated_and_is_what_best_pt_and_predict_hold(recipe_run, tiny_root):
    from vesuvius_lab.data import open_data
    from vesuvius_lab.evaluate import score_records
    from vesuvius_lab.inference import model_from_checkpoint, predict_volume

    vals = [r for r in records(recipe_run) if r["kind"] == "val"]
    best_step = max(vals, key=lambda r: r["score"])["step"]
    best = torch.load(recipe_run / "checkpoints" / "best.pt", weights_only=True)
    assert best["step"] == best_step and best["ema"]["updates"] == best_step
    assert any(not torch.equal(best["ema"]["model"][k], best["model"][k]) for k in best["model"])
    ema_model, config = model_from_checkpoint(recipe_run / "checkpoints" / "best.pt")
    raw_model, _ = model_from_checkpoint(recipe_run / "checkpoints" / "best.pt", weights="raw")
    assert all(torch.equal(v, best["ema"]["model"][k]) for k, v in ema_model.state_dict().items())
    assert all(torch.equal(v, best["model"][k]) for k, v in raw_model.state_dict().items())
    data = open_data(config)
    record = data.val[:1]
    ema_scores = score_records(ema_model, record, config, data.cache, torch.device("cpu"))[0].scores
    assert ema_scores["score"] == [v for v in vals if v["step"] == best_step][0]["score"]  # what validation scored
    image = data.cache.load(record[0]).image
    ema_prob = predict_volume(ema_model, image, config, "cpu").probability
    raw_prob = predict_volume(raw_model, image, config, "cpu").probability
    assert np.abs(ema_prob - raw_prob).max() > 1e-3  # EMA validation is not raw validation
    last = torch.load(recipe_run / "checkpoints" / "last.pt", weights_only=True)
    assert last["ema"]["updates"] == STEPS * EPOCHS and last["ema"]["decay"] == 0.9


# --- kept checkpoints and ensembles ------------------------------------------------------------------

def test_kept_checkpoints_are_the_last_k_and_the_best_m(recipe_run):
    run = RunDir(recipe_run)
    assert [p.name for p in run.recent_checkpoints()] == ["step_00000012.pt", "step_00000010.pt"]
    assert os.path.samefile(run.recent_checkpoints()[0], run.last)  # a link, not a second write
    vals = sorted((r for r in records(recipe_run) if r["kind"] == "val"), key=lambda r: (-r["score"], r["step"]))
    assert [p.name for p in run.best_checkpoints()] == [
        f"best_step_{v['step']:08d}_score_{v['score']:.6f}.pt" for v in vals[:2]]
    best = torch.load(run.best_checkpoints()[0], weights_only=True)
    assert best["step"] == vals[0]["step"]
    assert not list(run.checkpoints.glob(".*.tmp"))


def test_retention_prunes_only_after_the_new_copy_is_on_disk(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    for step, score in ((1, 0.5), (2, 0.7), (3, 0.6), (4, 0.4), (5, 0.6)):
        atomic_write_text(run.last, f"step {step}")  # replaced, as save_checkpoint replaces it
        run.retain(step, score, keep_last=2, keep_best=2)
    assert [p.read_text() for p in run.recent_checkpoints()] == ["step 5", "step 4"]
    assert [p.read_text() for p in run.best_checkpoints()] == ["step 2", "step 3"]  # a tie keeps the earlier
    run.last.unlink()  # the copy cannot be made: a one-line error, and nothing kept is removed
    with pytest.raises(DataError, match="could not keep a copy of last.pt"):
        run.retain(6, 0.9, keep_last=2, keep_best=2)
    assert [p.read_text() for p in run.recent_checkpoints()] == ["step 5", "step 4"]
    assert [p.read_text() for p in run.best_checkpoints()] == ["step 2", "step 3"]
    assert not list(run.checkpoints.glob(".*.tmp"))


def test_predict_averages_a_checkpoint_ensemble_and_evaluate_scores_it(recipe_run, tiny_root, tmp_path, cli):
    from vesuvius_lab.inference import Ensemble, model_from_checkpoint, predict_volume
    from vesuvius_lab.io import read_volume

    run = RunDir(recipe_run)
    members = run.best_checkpoints()
    assert checkpoint_sources([recipe_run]) == members
    assert checkpoint_sources([str(run.checkpoints / "step_*.pt")]) == sorted(run.recent_checkpoints())
    ensemble, config = model_from_checkpoint([recipe_run])
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 2
    image = read_volume(next((tiny_root / "test_images").glob("*.tif")))
    probs = [predict_volume(model_from_checkpoint(m)[0], image, config, "cpu").probability for m in members]
    together = predict_volume(ensemble, image, config, "cpu").probability
    assert np.abs(together - (probs[0] + probs[1]) / 2).max() < 1e-5
    assert np.abs(probs[0] - probs[1]).max() > 1e-4  # two different members, really averaged
    # the CLI: a run folder, several files, and the masks scored by `evaluate`
    out = tmp_path / "pred"
    code, _, err = cli("predict", "--checkpoint", recipe_run, "--input", tiny_root / "train_images", "--output", out)
    assert code == 0, err
    code, lines, err = cli("evaluate", "--pred", out, "--labels", tiny_root / "train_labels", "--json")
    assert code == 0, err
    assert 0 <= json.loads(lines[0])["mean_score"] <= 1
    code, _, err = cli("predict", "--checkpoint", *members, run.last, "--input", tiny_root / "test_images",
                       "--output", tmp_path / "three", "--weights", "raw")
    assert code == 0, err
    code, _, err = cli("predict", "--checkpoint", str(tmp_path / "nothing_*.pt"), "--input", tiny_root / "test_images",
                       "--output", tmp_path / "none")
    assert code == 2 and err == [f"error: {tmp_path / 'nothing_*.pt'}: no checkpoint matches this pattern"]


def test_notebook_05s_evaluation_loads_a_dynunet_checkpoint(recipe_run):
    from vesuvius_lab.evaluate import evaluate_checkpoint, mean_scores

    results = evaluate_checkpoint(recipe_run / "checkpoints" / "best.pt", max_volumes=1, device="cpu")
    assert len(results) == 1 and results[0].probability.shape == results[0].label.shape
    assert 0 <= mean_scores(results)["score"] <= 1


# --- old runs keep working ---------------------------------------------------------------------------

def test_a_checkpoint_from_before_model_arch_predicts_and_resumes(tiny_root, tmp_path, cli):
    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=2, training={"val_every_epochs": 0})
    run = tmp_path / "run"
    assert cli("train", "--config", cfg, "--run-dir", run, "--no-progress")[0] == 0
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    new_keys = {"model": ("arch", "res_block", "base_features", "max_features"), "optim": ("ema_decay",),
                "training": ("keep_last", "keep_best"),
                "loss": ("schedule_unit", *(f"{t}_{s}" for t in TERMS for s in ("start", "ramp")))}
    for section, keys in new_keys.items():
        for key in keys:
            del ckpt["config"][section][key]
    torch.save(ckpt, run / "checkpoints" / "last.pt")  # as a run of the release before wrote it
    doc = yaml.safe_load((run / "config.yaml").read_text())
    for section, keys in new_keys.items():
        for key in keys:
            del doc[section][key]
    (run / "config.yaml").write_text(yaml.safe_dump(doc))
    code, _, err = cli("predict", "--checkpoint", run / "checkpoints" / "last.pt", "--input", tiny_root / "test_images",
                       "--output", tmp_path / "pred")
    assert code == 0, err
    code, _, err = cli("train", "--config", cfg, "--run-dir", run, "--resume", "--no-progress", "training.max_epochs=2")
    assert code == 0, err
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4


# --- recipe configs, planner and bench ---------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.yaml")
                                     if not p.stem.endswith("_sweep")))  # every recipe (a _sweep file is a search space)
def test_recipe_configs_load_and_build(name):
    config = load_config(REPO / "configs" / f"{name}.yaml")
    model = build_model(config.model, config.data.patch_size)
    assert parameter_count(model) > 0
    if name == "kaggle_resenc_128":
        assert (config.model.arch, config.model.res_block, config.data.patch_size) == ("dynunet", True, [128] * 3)
        assert (config.training.train_batch_size, config.optim.schedule, config.val.tta) == (2, "poly", True)
        assert config.loss.skeleton_recall > 0 and config.loss.dice > 0 and config.loss.bce > 0
        text = (REPO / "configs" / f"{name}.yaml").read_text()
        assert "[nnU-Net]" in text and "[SkelRec]" in text and "[ResEnc]" in text  # each choice names its source


def test_bench_losses_runs_on_a_recipe(tiny_root, tmp_path, cli):
    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", model=DYNUNET)
    code, lines, err = cli("bench", "losses", "--config", cfg, "--repeats", "1", "--json")
    assert code == 0, err
    result = json.loads(lines[0])
    assert result["patch"] == [16, 16, 16] and result["model"]["arch"] == "dynunet"
    assert result["model"]["parameters"] > 0 and result["model"]["saved_mb"] > 0
    assert set(result["terms"]) == set(TERMS)


def test_the_planner_stops_timing_at_its_deadline(tiny_root, tmp_path):
    import time

    from vesuvius_lab.data import open_data
    from vesuvius_lab.planner import time_batch_size

    config = load_config(write_tiny_config(tiny_root, tmp_path / "cfg", model=DYNUNET))
    data = open_data(config)
    data.patch_dataset(config).prepare(progress=False)
    late = time_batch_size(config, data, 1, torch.device("cpu"), warmup=3, steps=20, deadline=time.perf_counter())
    assert late.timed_steps == 1 and late.step_s > 0  # the second step, timed; the rest skipped
    full = time_batch_size(config, data, 1, torch.device("cpu"), warmup=1, steps=3)
    assert full.timed_steps == 3
