"""Watching a run learn: the live prediction each validation keeps, the TensorBoard events, and
`vesuvius-lab runs` over real tiny runs (one of them killed and resumed)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from vesuvius_lab.compare import summarize_runs
from vesuvius_lab.config import load_config
from vesuvius_lab.errors import ConfigError
from vesuvius_lab.evaluate import SCORE_PARTS, VolumeResult
from vesuvius_lab.inference import model_from_checkpoint, predict_volume
from vesuvius_lab.layout import Record
from vesuvius_lab.leaderboard import volume_score
from vesuvius_lab.losses import TERMS
from vesuvius_lab.training import live_volume
from vesuvius_lab.training.events import EventLog, scalars
from vesuvius_lab.training.run_dir import RunDir


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def events(run) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={SCALARS: 0})  # 0: keep every event
    acc.Reload()
    return acc


@pytest.mark.slow
@pytest.mark.parametrize("name", ["a", "b"])
def test_tensorboard_events_hold_every_term_at_every_logged_step(finished_runs, name):
    """"b" ran in two processes (SIGKILL, then --resume): TensorBoard still sees each step once."""
    run = finished_runs / name
    acc = events(run)
    logged = records(run)
    expected: dict[str, dict[int, float]] = {}
    for r in logged:
        for tag, value in scalars(r).items():
            expected.setdefault(tag, {})[r["step"]] = value
    train_tags = {f"train/{k}" for k in ("loss", *TERMS, "lr", "samples_per_s", "data_wait_share", "memory_mb",
                                        "step_s", "grad_norm")}
    val_tags = {f"val/{k}" for k in SCORE_PARTS}
    assert train_tags | val_tags | {"epoch/epoch_s"} <= set(acc.Tags()["scalars"]) == set(expected)
    for tag, by_step in expected.items():
        seen = acc.Scalars(tag)
        assert [e.step for e in seen] == sorted(by_step), tag  # every step once, in order
        assert [e.value for e in seen] == pytest.approx([by_step[e.step] for e in seen], rel=1e-6), tag
    assert sorted(expected["train/topo"]) == [r["step"] for r in logged if r["kind"] == "train" and r["topo"] is not None]
    assert len(expected["train/loss"]) == 8 and sorted(expected["val/score"]) == [4, 8]


@pytest.mark.slow
def test_each_validation_keeps_the_prediction_it_scored(finished_runs):
    run = finished_runs / "a"
    index = live_volume.read_index(run)
    vals = [r for r in records(run) if r["kind"] == "val"]
    assert [e["step"] for e in index["entries"]] == [v["step"] for v in vals] == [4, 8]
    for entry, val in zip(index["entries"], vals, strict=True):  # one volume validated: its score is the mean
        assert entry["scores"] == pytest.approx({k: val[k] for k in SCORE_PARTS})
        assert entry["loop_s"] < entry["write_s"] and entry["bytes"] == (RunDir(run).live / entry["file"]).stat().st_size
    latest = live_volume.load_result(run)
    model, config = model_from_checkpoint(RunDir(run).last)  # the weights of the last validation
    again = predict_volume(model, latest.image, config, "cpu")
    assert np.abs(latest.probability - again.probability).max() <= 0.5 / 255 + 1e-6  # uint8 quantized
    assert np.array_equal(latest.mask, again.mask.astype(np.uint8))
    assert volume_score(latest.mask, latest.label).as_dict()["score"] == pytest.approx(latest.scores["score"])
    assert latest.id == index["volume"] and latest.image.dtype == np.uint8 and latest.label.shape == latest.image.shape


def _result(rid: str, score: float, seed: int, shape=(8, 12, 16)) -> VolumeResult:
    """One volume (the same image and label each time) and a prediction that differs with ``seed``."""
    volume = np.random.default_rng(0)
    image, label = volume.integers(0, 255, shape, dtype=np.uint8), (volume.random(shape) > 0.7).astype(np.uint8)
    probability = np.random.default_rng(seed).random(shape, dtype=np.float32)
    scores = {"score": score, "topo": score / 2, "surface_dice": score, "voi_score": 1 - score}
    return VolumeResult(rid, image, label, probability, probability > 0.5, scores)


def test_retention_keeps_the_latest_and_the_best_and_a_resume_rewrites_later_ones(tmp_path):
    run, config = RunDir(tmp_path / "run"), load_config(None, ["val.live_keep=2", "val.live_volume=v1"])
    run.create()
    for step, score in ((10, 0.2), (20, 0.9), (30, 0.3), (40, 0.4), (50, 0.1)):
        live_volume.keep(run, config, [VolumeResult("other", scores={}), _result("v1", score, step)], step, step // 10)
    live_volume.wait()
    index = live_volume.read_index(run.root)
    assert [e["step"] for e in index["entries"]] == [20, 40, 50]  # the best (0.9), then the latest two
    assert sorted(p.name for p in run.live.iterdir()) == ["index.json", "step_00000020.npz", "step_00000040.npz",
                                                          "step_00000050.npz", "volume.npz"]
    kept = live_volume.load_result(run.root, index["entries"][1])
    original = _result("v1", 0.4, 40)
    assert np.abs(kept.probability - original.probability).max() <= 0.5 / 255 + 1e-6
    assert np.array_equal(kept.mask, original.mask) and np.array_equal(kept.image, original.image)
    live_volume.keep(run, config, [_result("v1", 0.5, 41)], 40, 4)  # resumed at 30, validating again at 40
    live_volume.wait()
    assert [e["step"] for e in live_volume.read_index(run.root)["entries"]] == [20, 40]
    assert sorted(p.name for p in run.live.glob("step_*")) == ["step_00000020.npz", "step_00000040.npz"]
    assert live_volume.read_index(run.root)["entries"][1]["scores"]["score"] == 0.5


def test_the_chosen_volume_by_index_or_id_and_a_missing_one_said_once(tmp_path, caplog):
    recs = [Record(id=f"r{i}", scroll_id="s", image=f"i{i}.tif", label=f"l{i}.tif") for i in range(3)]
    assert live_volume.volume_ids(load_config(None, ["val.live_volume=2"]), recs) == ("r2",)
    assert live_volume.volume_ids(load_config(None, ["val.live_volume=r1"]), recs) == ("r1",)
    assert live_volume.volume_ids(load_config(None, ["val.live_volume=7"]), recs) == ()
    assert live_volume.volume_ids(load_config(None, ["val.live_volume=null"]), recs) == ()
    with pytest.raises(ConfigError, match=r"val.live_volume: -1 is out of range \(allowed: >= 0\)"):
        load_config(None, ["val.live_volume=-1"])
    run = RunDir(tmp_path / "run")
    config = load_config(None, ["val.live_volume=r9"])
    with caplog.at_level(logging.WARNING, logger="vesuvius_lab.train"):
        for step in (1, 2):
            live_volume.keep(run, config, [VolumeResult("r0", scores={"score": 0.1})], step, 0)
    problem = live_volume.read_index(run.root)["problem"]
    assert problem.startswith("val.live_volume 'r9' is none of the validated volumes (r0)")
    assert [r.getMessage() for r in caplog.records].count(problem) == 1


def test_a_failing_live_write_or_event_file_never_stops_the_run(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.live.write_text("a file where the live folder should be")
    with caplog.at_level(logging.WARNING, logger="vesuvius_lab.train"):
        live_volume.keep(run, load_config(None), [_result("v1", 0.5, 1)], 5, 0)
        live_volume.wait()
        blocked = tmp_path / "blocked"
        blocked.write_text("a file where the run folder should be")
        run.events = EventLog(blocked)
        run.append({"kind": "train", "step": 1, "loss": 0.5})  # the event fails; the record is written
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("live prediction at step 5 not written") for m in messages)
    assert any(m.startswith("TensorBoard events stopped at step 1") for m in messages)
    assert records(run.root) == [{"kind": "train", "step": 1, "loss": 0.5}] and run.events.failed


def test_tensorboard_off_with_one_key(tiny_root, tmp_path):
    from lab_runs_helpers import write_tiny_config
    from vesuvius_lab.training import train

    config = load_config(write_tiny_config(tiny_root, tmp_path / "cfg", steps=2), ["training.tensorboard=false",
                                                                                    "val.live_volume=null"])
    train(config, tmp_path / "run", progress=False)
    assert not list((tmp_path / "run").glob("events.out.tfevents.*")) and not (tmp_path / "run" / "live").exists()
    assert len([r for r in records(tmp_path / "run") if r["kind"] == "train"]) == 2


@pytest.mark.slow
def test_runs_command_lists_both_runs_and_the_keys_they_differ_in(finished_runs, cli):
    code, out, err = cli("runs", finished_runs)
    assert code == 0 and not err
    header, row_a, row_b = out[:3]
    assert header.split()[:4] == ["run", "state", "steps", "wall"]
    assert row_a.split()[:3] == ["a", "finished", "8/8"] and row_b.split()[:3] == ["b", "finished", "8/8"]
    assert out[3] == "config keys that differ:"
    assert [line.split()[0] for line in out[4:]] == ["loss.cldice", "optim.lr"]
    assert out[4].split()[1:] == ["a:", "0.3", "b:", "0.5"]
    code, out, _ = cli("runs", finished_runs, "--json")
    doc = json.loads(out[0])
    assert doc["differing_keys"] == {"loss.cldice": {"a": 0.3, "b": 0.5}, "optim.lr": {"a": 0.01, "b": 0.02}}
    for summary, row in zip(summarize_runs(finished_runs), doc["runs"], strict=True):
        vals = [r for r in records(finished_runs / row["name"]) if r["kind"] == "val"]
        best = max(vals, key=lambda r: r["score"])
        assert row["best"] == {"step": best["step"], "epoch": best["epoch"], **{k: best[k] for k in SCORE_PARTS}}
        assert row["best_checkpoint"] == str(finished_runs / row["name"] / "checkpoints" / "best.pt")
        assert row["state"] == "finished" and row["step"] == 8 and row["wall_s"] > 0
        assert summary.wall_s == pytest.approx(sum(r["epoch_s"] for r in records(summary.path) if r["kind"] == "epoch"))
    code, out, _ = cli("runs", finished_runs / "a")  # one run folder
    assert code == 0 and len(out) == 2 and out[1].startswith("a ")
    code, _, err = cli("runs", finished_runs / "nowhere")
    assert code == 2 and err == [f"error: {finished_runs / 'nowhere'}: no such folder of runs"]
