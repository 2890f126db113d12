"""The training engine end to end on a tiny dataset: run directory, exact resume, signals, DDP."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

import pytest
import torch

from lab_runs_helpers import write_tiny_config
from vesuvius_lab.config import OptimConfig, load_config
from vesuvius_lab.io import read_volume
from vesuvius_lab.lab.runs import History, history_figure
from vesuvius_lab.training import train
from vesuvius_lab.training.schedule import lr_at

STEPS, EPOCHS = 6, 2


@pytest.fixture()
def tiny_config(tiny_root, tmp_path):
    """Config files for the tiny run, each in its own folder (two workers, frequent checkpoints)."""
    made = []

    def make(**sections) -> Path:
        training = {"workers": 2, "persistent_workers": True, "checkpoint_every_steps": 2, **sections.pop("training", {})}
        made.append(write_tiny_config(tiny_root, tmp_path / f"cfg{len(made)}", steps=STEPS, epochs=EPOCHS,
                                      training=training, **sections))
        return made[-1]

    return make


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def start(cfg: Path, run: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vesuvius_lab", "train", "--config", str(cfg), "--run-dir", str(run), "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return
        try:
            if json.loads((run / "status.json").read_text()).get("step", 0) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise TimeoutError(f"run never reached step {step}")


def final_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def test_lr_schedule_is_step_based():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="poly", poly_power=1.0)
    assert lr_at(0, 110, cfg) == pytest.approx(0.1) and lr_at(9, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.5) and lr_at(110, 110, cfg) == pytest.approx(0.0)
    cos = OptimConfig(lr=1.0, warmup_steps=0, schedule="cosine", min_lr=0.1)
    assert lr_at(50, 100, cos) == pytest.approx(0.55)


def test_run_directory_logs_and_checkpoints(tiny_config, tmp_path):
    run = tmp_path / "run"
    result = train(load_config(tiny_config(training={"workers": 0})), run, progress=False)
    assert result["state"] == "finished" and result["step"] == STEPS * EPOCHS
    for name in ("config.yaml", "metrics.jsonl", "train.log", "status.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    lines = records(run)
    train_lines = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train_lines] == list(range(1, STEPS * EPOCHS + 1))
    for key in ("lr", "loss", "bce", "dice", "cldice", "skeleton_recall", "surface", "topo", "step_s",
                "data_wait_s", "samples_per_s", "memory_mb"):
        assert key in train_lines[0]
    assert [r["topo"] is not None for r in train_lines[:4]] == [True, False, False, True]  # every 3 steps
    vals = [r for r in lines if r["kind"] == "val"]
    assert len(vals) == EPOCHS and all(0 <= v["score"] <= 1 for v in vals)
    assert {"topo", "surface_dice", "voi_score"} <= vals[0].keys()
    epochs = [r for r in lines if r["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1] and all(e["epoch_s"] > 0 for e in epochs)
    ckpt = final_state(run)  # loads with weights_only=True
    assert {"model", "optimizer", "scheduler", "scaler", "step", "rng"} <= ckpt.keys() and ckpt["step"] == 12
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    with pytest.raises(Exception, match="holds a checkpoint already"):
        train(load_config(tiny_config()), run, progress=False)


def test_predict_writes_masks_and_submission(tiny_config, tiny_root, tmp_path, cli):
    run = tmp_path / "run"
    train(load_config(tiny_config(training={"workers": 0, "max_epochs": 1, "val_every_epochs": 0})), run, progress=False)
    out = tmp_path / "pred"
    code, lines, err = cli("predict", "--checkpoint", run / "checkpoints" / "last.pt", "--input", tiny_root / "test_images",
                           "--output", out, "postprocess.threshold=0.4")
    assert code == 0, err
    test_ids = sorted(p.stem for p in (tiny_root / "test_images").glob("*.tif"))
    masks = sorted(out.glob("*.tif"))
    assert [m.stem for m in masks] == test_ids
    mask = read_volume(masks[0])
    assert mask.shape == read_volume(tiny_root / "test_images" / masks[0].name).shape and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert sorted(zf.namelist()) == [f"{i}.tif" for i in test_ids]
    code, _, err = cli("predict", "--checkpoint", tmp_path / "nope.pt", "--input", tiny_root, "--output", out)
    assert code == 2 and err == [f"error: {tmp_path / 'nope.pt'}: checkpoint not found"]


RECIPES = {
    "unet": {},
    # the leaderboard's recipe, tiny: residual DynUNet, EMA weights, a late loss term, kept checkpoints
    "dynunet-ema": {"model": {"arch": "dynunet", "res_block": True, "base_features": 4, "max_features": 16},
                    "optim": {"ema_decay": 0.9}, "loss": {"skeleton_recall_start": 4, "skeleton_recall_ramp": 3},
                    "training": {"keep_last": 3, "keep_best": 2}},
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(tiny_config, tmp_path, recipe):
    cfg = tiny_config(**RECIPES[recipe])
    reference = tmp_path / "reference"
    done = start(cfg, reference)
    assert done.wait(timeout=300) == 0, done.stderr.read()
    run, rng, kills = tmp_path / "killed", random.Random(7), 0
    proc = start(cfg, run)
    for target in sorted(rng.sample(range(1, STEPS * EPOCHS), 3)):
        wait_for_step(run, target, proc)
        time.sleep(rng.uniform(0, 0.3))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
        proc = start(cfg, run, "--resume")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert kills >= 2
    a, b = final_state(reference), final_state(run)
    assert a["step"] == b["step"] == STEPS * EPOCHS
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert ("ema" in a) == ("ema" in b) == (recipe == "dynunet-ema")
    if "ema" in a:  # the average too, and the same checkpoints kept
        assert a["ema"]["updates"] == b["ema"]["updates"] == STEPS * EPOCHS
        assert all(torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]) for k in a["ema"]["model"])
        kept = [sorted(p.name for p in (r / "checkpoints").glob("*step_*.pt")) for r in (reference, run)]
        assert kept[0] == kept[1] and len(kept[0]) == 5
    steps = [r["step"] for r in records(run) if r["kind"] == "train"]
    assert steps == list(range(1, STEPS * EPOCHS + 1))  # no duplicated or missing log lines


def test_a_kill_between_last_pt_and_its_copies_is_made_good_on_resume(tiny_config, tmp_path):
    """The state a SIGKILL right after last.pt's rename leaves (its best.pt and kept copies not yet
    made): the resume makes them, and the run keeps what an unbroken run keeps."""
    cfg = load_config(tiny_config(**{**RECIPES["dynunet-ema"], "training": {
        **RECIPES["dynunet-ema"]["training"], "workers": 0}}))
    run = tmp_path / "run"
    assert train(cfg, run, progress=False)["state"] == "finished"
    checkpoints = run / "checkpoints"
    whole = sorted(p.name for p in checkpoints.glob("*.pt"))
    last = final_state(run)
    assert last["kept"]["best"] and f"best_step_{STEPS * EPOCHS:08d}_score_{last['kept']['score']:.6f}.pt" in whole
    for path in checkpoints.glob(f"*step_{STEPS * EPOCHS:08d}*.pt"):
        path.unlink()
    (checkpoints / "best.pt").unlink()
    assert train(cfg, run, resume=True, progress=False)["state"] == "finished"
    assert sorted(p.name for p in checkpoints.glob("*.pt")) == whole
    best = torch.load(checkpoints / "best.pt", weights_only=True)
    assert best["step"] == STEPS * EPOCHS and all(torch.equal(best["model"][k], v) for k, v in last["model"].items())


def test_sigterm_stops_gracefully_with_a_checkpoint(tiny_config, tmp_path):
    cfg, run = tiny_config(training={"checkpoint_every_steps": 100}), tmp_path / "run"
    proc = start(cfg, run)
    wait_for_step(run, 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, data workers included
    assert proc.wait(timeout=120) == 3, proc.stderr.read()
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and "SIGTERM" in status["message"]
    assert final_state(run)["step"] == status["step"] >= 3
    proc = start(cfg, run, "--resume")
    assert proc.wait(timeout=300) == 0
    assert final_state(run)["step"] == STEPS * EPOCHS


def test_non_finite_losses_are_skipped_then_stop_the_run(tiny_config, tmp_path):
    cfg, run = tiny_config(optim={"lr": 1e30, "warmup_steps": 0, "max_nonfinite": 3}, training={"workers": 0}), tmp_path / "run"
    proc = start(cfg, run)
    assert proc.wait(timeout=300) == 2
    err = proc.stderr.read().strip().splitlines()
    assert err[-1].startswith("error: stopped: 3 non-finite losses in a row") and "Traceback" not in proc.stderr.read()
    skipped = [r for r in records(run) if r["kind"] == "train" and r["skipped"]]
    assert len(skipped) == 3 and skipped[-1]["nonfinite_total"] == 3
    assert final_state(run)["step"] >= 2  # the last checkpoint is intact and loadable


def test_torchrun_two_processes_on_cpu(tiny_config, tmp_path):
    cfg, run = tiny_config(training={"workers": 1, "max_epochs": 1}), tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "vesuvius_lab", "train", "--config", str(cfg), "--run-dir", str(run), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = records(run)
    train_lines = [r for r in lines if r["kind"] == "train"]
    assert len(train_lines) == STEPS and all(r["global_batch"] == 4 for r in train_lines)  # written once, by rank 0
    assert len([r for r in lines if r["kind"] == "val"]) == 1
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # TensorBoard events: rank 0 alone
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


def expected_early_stop(scores: list[tuple[int, float]], patience: int, min_delta: float) -> int | None:
    """The step an early-stopped run ends at, from an unstopped run's validation scores (Lightning's rule)."""
    best, since = -float("inf"), 0
    for step, score in scores:
        best, since = (score, 0) if score > best + min_delta else (best, since + 1)
        if since >= patience:
            return step
    return None


def test_early_stopping_ends_at_the_right_validation_and_a_killed_run_stops_there_too(tiny_config, tmp_path):
    """Validations every 2 steps; the stop is computed from the unstopped run's own scores, and a
    run SIGKILLed between validations and resumed ends at the same step with the same weights."""
    sections = {"training": {"train_iterations_per_epoch": 2, "max_epochs": 12, "workers": 0, "checkpoint_every_steps": 1},
                "optim": {"lr": 0.03}}
    full = tmp_path / "full"
    assert train(load_config(tiny_config(**sections)), full, progress=False)["state"] == "finished"
    scores = [(r["step"], r["score"]) for r in records(full) if r["kind"] == "val"]
    assert len(scores) == 12
    gains = sorted(b - a for (_, a), (_, b) in zip(scores, scores[1:]) if b > a)
    min_delta = gains[len(gains) // 2] if gains else 0.0  # some improvements count, some do not
    patience = 2
    stop = expected_early_stop(scores, patience, min_delta)
    assert stop is not None and stop < 24, (scores, min_delta)
    sections["training"] |= {"early_stop_patience": patience, "early_stop_min_delta": min_delta}
    cfg = tiny_config(**sections)

    stopped = tmp_path / "stopped"
    outcome = train(load_config(cfg), stopped, progress=False)
    assert outcome["state"] == "finished" and outcome["step"] == stop
    status = json.loads((stopped / "status.json").read_text())
    assert status["state"] == "finished" and status["message"].startswith(f"finished (early stop at step {stop})")
    assert final_state(stopped)["step"] == stop and final_state(stopped)["early_stop"]["stopped_at"] == stop
    assert [(r["step"], r["score"]) for r in records(stopped) if r["kind"] == "val"] == [s for s in scores if s[0] <= stop]
    plans = [r for r in records(stopped) if r["kind"] == "plan" and r.get("early_stop")]
    assert len(plans) == 1 and plans[0]["step"] == plans[0]["total_steps"] == stop and "early stop" in plans[0]["reason"]
    history = History()
    history.add(records(stopped))
    marks = [line for ax in history_figure(history).axes for line in ax.lines if line.get_label().startswith("early stop")]
    assert history.early_stop == stop and len(marks) == 2 and all(m.get_xdata()[0] == stop for m in marks)  # notebook 04

    killed = tmp_path / "killed"
    proc = start(cfg, killed)
    wait_for_step(killed, stop - 3, proc)  # after an earlier validation: its state must come back from the checkpoint
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc = start(cfg, killed, "--resume")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    a, b = final_state(stopped), final_state(killed)
    assert b["step"] == stop and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert json.loads((killed / "status.json").read_text())["message"] == status["message"]
    again = train(load_config(cfg), killed, resume=True, progress=False)  # a finished early stop stays finished
    assert again["step"] == stop and again["message"].startswith(f"finished (early stop at step {stop})")


def test_a_budget_run_that_stops_early_says_so_in_its_plan(tiny_config, tmp_path):
    """No score rises by 1.0: the third validation (patience 2) ends a run that the clock would run on."""
    cfg = load_config(tiny_config(training={"train_iterations_per_epoch": 3, "max_epochs": 50, "workers": 0,
                                            "time_budget_hours": 0.5, "early_stop_patience": 2,
                                            "early_stop_min_delta": 1.0}))
    run = tmp_path / "run"
    outcome = train(cfg, run, progress=False)
    assert outcome["state"] == "finished" and outcome["message"].startswith("finished (early stop at step 9)")
    plans = [r for r in records(run) if r["kind"] == "plan"]
    assert plans[-1]["early_stop"] and plans[-1]["total_steps"] == 9 and plans[-1]["deadline"]
    assert all(p["total_steps"] > 9 and not p.get("early_stop") for p in plans[:-1]) and len(plans) > 1
    assert plans[-1]["reason"].startswith("early stop at step 9: no validation improved the score by more than 1")
    assert max(r["step"] for r in records(run) if r["kind"] == "train") == 9 == final_state(run)["step"]
