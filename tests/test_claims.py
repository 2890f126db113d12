"""Claims the README makes that had no test: mirror TTA, SIGINT, accumulation, device-side
augmentation inside a run, and DDP replicas that stay identical through stop and resume."""

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from lab_runs_helpers import write_tiny_config
from vesuvius_lab.config import ModelConfig, load_config
from vesuvius_lab.inference import predict_probabilities
from vesuvius_lab.model import as_input, build_model
from vesuvius_lab.training import train
from vesuvius_lab.training.run_dir import RunDir, read_records


def test_mirror_tta_is_the_mean_over_the_eight_flips():
    torch.manual_seed(0)
    model = build_model(ModelConfig(features=[4, 8], deep_supervision=False)).eval()
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 16), dtype=np.uint8)
    tta = predict_probabilities(model, image, (16, 16, 16), overlap=0.0, tta=True)
    plain = predict_probabilities(model, image, (16, 16, 16), overlap=0.0, tta=False)
    x = torch.from_numpy(image.astype(np.float32) / 255)[None, None]
    by_hand = torch.zeros_like(x)
    with torch.no_grad():
        for flips in range(8):
            dims = [d for d, bit in zip((2, 3, 4), (1, 2, 4), strict=True) if flips & bit]
            y = torch.sigmoid(model(as_input(x.flip(dims) if dims else x)).float())
            by_hand += y.flip(dims) if dims else y
    np.testing.assert_allclose(tta, (by_hand / 8)[0, 0].numpy(), atol=1e-5)
    assert np.abs(tta - plain).max() > 1e-4  # an untrained net is not flip-invariant: TTA did something


def test_accumulated_micro_batches_give_the_larger_batch_gradient(data_copy, tmp_path):
    """Where the maths says so, 2 micro-batches of 1 accumulated equal one batch of 2 (the same
    samples): BCE alone, a mean over voxels, with no ignored voxels (equal counts per sample) and
    instance norm (no batch statistics)."""
    from vesuvius_lab.data import open_data
    from vesuvius_lab.io import read_volume, write_volume
    from vesuvius_lab.loader import build_loader
    from vesuvius_lab.training.engine import build_engine, forward_backward

    for label in (data_copy / "train_labels").glob("*.tif"):
        write_volume(label, np.where(read_volume(label) == 2, 0, read_volume(label)).astype(np.uint8))
    base = write_tiny_config(data_copy, tmp_path / "cfg", augment={"enabled": False},
                             model={"deep_supervision": False},
                             loss={"dice": 0.0, "cldice": 0.0, "skeleton_recall": 0.0, "surface": 0.0, "topo": 0.0})
    grads = []
    for overrides in (["training.train_batch_size=2"], ["training.train_batch_size=1", "optim.accumulate=2"]):
        config = load_config(base, overrides)
        data = open_data(config)
        dataset = data.patch_dataset(config)
        engine = build_engine(config, dataset, torch.device("cpu"))
        forward_backward(engine, iter(build_loader(dataset, config, num_steps=1)), 0)
        grads.append([p.grad.clone() for p in engine.model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_device_side_augmentation_trains_the_same_run(tiny_root, tmp_path):
    """augment.where: device resamples the batch on the training device; the run's losses equal the
    worker-side run's (same samples, same transforms), inside a real training run."""
    losses = {}
    for where in ("worker", "device"):
        cfg = write_tiny_config(tiny_root, tmp_path / where, steps=3, augment={"where": where, "p_rotation": 1.0,
                                "p_elastic": 1.0, "p_flip": 1.0}, training={"val_every_epochs": 0})
        run = tmp_path / f"run-{where}"
        assert train(load_config(cfg), run, progress=False)["state"] == "finished"
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[where] = [r["loss"] for r in lines if r["kind"] == "train"]
    assert len(losses["device"]) == 3
    np.testing.assert_allclose(losses["device"], losses["worker"], rtol=1e-4)


def _start(cfg: Path, run: Path, *extra: str, nproc: int = 0) -> subprocess.Popen:
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    return subprocess.Popen([*head, "-m", "vesuvius_lab", "train", "--config", str(cfg), "--run-dir", str(run),
                             "--no-progress", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if RunDir(run).read_status().get("step", 0) >= step:
            return
        time.sleep(0.02)


@pytest.mark.slow
def test_signals_that_keep_coming_still_end_in_stopped(tiny_root, tmp_path):
    """Under torchrun a rank gets the group's SIGTERM and then the one torchrun forwards: until the
    run's last status is written, every one of them only asks to stop."""
    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=40, training={"val_every_epochs": 0,
                            "checkpoint_every_steps": 100})
    run = tmp_path / "run"
    proc = _start(cfg, run)
    _wait_for_step(run, 3, proc)
    while proc.poll() is None:  # our own child, not yet reaped: its pid is still its own
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.002)
    status = RunDir(run).read_status()
    assert status["state"] == "stopped" and "SIGTERM" in status["message"], status
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == status["step"] >= 3


def test_an_in_process_run_gives_the_signal_handlers_back(tiny_root, tmp_path):
    """A notebook trains in its own process: after the run, Ctrl-C (SIGINT) must interrupt again."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=2, training={"val_every_epochs": 0})
    assert train(load_config(cfg), tmp_path / "run", progress=False)["state"] == "finished"
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.slow
def test_sigint_stops_after_a_checkpoint(tiny_root, tmp_path):
    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=40, training={"val_every_epochs": 0,
                            "checkpoint_every_steps": 100})
    run = tmp_path / "run"
    proc = _start(cfg, run)
    _wait_for_step(run, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches the whole group
    assert proc.wait(timeout=120) == 3, proc.stderr.read()
    status = RunDir(run).read_status()
    assert status["state"] == "stopped" and "SIGINT" in status["message"]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == status["step"] >= 3


@pytest.mark.slow
def test_ddp_replicas_stay_identical_through_stop_and_resume(tiny_root, tmp_path):
    """Under torchrun: SIGTERM mid-epoch, resume, finish; every checkpoint's per-rank weight digests
    agree, and the result is the uninterrupted two-rank run's, bit for bit."""
    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=10, training={
        "workers": 0, "checkpoint_every_steps": 100, "val_every_epochs": 0})
    reference = _start(cfg, tmp_path / "reference", nproc=2)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]
    run = tmp_path / "run"
    proc = _start(cfg, run, nproc=2)
    _wait_for_step(run, 4, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # as the notebook's Stop does: torchrun and its ranks
    proc.wait(timeout=120)  # torchrun itself exits 1 on a signal; the ranks' own word is status.json
    status = RunDir(run).read_status()
    assert status["state"] == "stopped" and "SIGTERM" in status["message"], status
    stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert stopped["step"] == status["step"]
    assert 4 <= stopped["step"] < 10 and len(stopped["rank_weights"]) == 2
    assert len(set(stopped["rank_weights"])) == 1
    proc = _start(cfg, run, "--resume", nproc=2)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-8000:]  # the ranks' own lines come before torchrun's
    a = torch.load(tmp_path / "reference" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 10 and len(set(b["rank_weights"])) == 1
    assert a["rank_weights"] == b["rank_weights"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_a_stop_signal_on_one_rank_stops_every_rank_at_the_same_step(tiny_root, tmp_path):
    """SIGTERM to rank 0 alone (a user's kill, a scheduler's signal to one process): the ranks stop at
    the step they agreed on in its all-reduce. A rank that stopped on its own flag, read after that
    all-reduce, gathered a checkpoint while the other all-reduced the next step: the job hung or gloo
    aborted. Four tries, a quarter of a step apart, so that one lands between the all-reduce and the check."""
    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=400, training={
        "workers": 0, "checkpoint_every_steps": 1000, "val_every_epochs": 0})
    for attempt in range(4):
        run = tmp_path / f"run{attempt}"
        proc = _start(cfg, run, nproc=2)
        try:
            _wait_for_step(run, 5, proc)
            step_s = statistics.median(r["step_s"] for r in read_records(run / "metrics.jsonl") if r["kind"] == "train")
            _wait_for_step(run, 8, proc)
            time.sleep(attempt / 4 * step_s)
            rank0 = RunDir(run).read_status()["pid"]
            assert psutil.Process(rank0).ppid() == proc.pid  # one of this torchrun's ranks, nothing else
            os.kill(rank0, signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        status = RunDir(run).read_status()
        assert status["state"] == "stopped" and "SIGTERM" in status["message"], (attempt, status, proc.stderr.read()[-4000:])
        last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
        assert last["step"] == status["step"] and len(last["rank_weights"]) == 2
        assert len(set(last["rank_weights"])) == 1
