"""What a week-long run meets: bad configs, bad steps, dead runs, full disks, reused pids."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lab_runs_helpers import write_tiny_config
from vesuvius_lab.config import load_config, save_config
from vesuvius_lab.errors import DataError
from vesuvius_lab.io import write_volume
from vesuvius_lab.manifest import build_manifest
from vesuvius_lab.training import train
from vesuvius_lab.training.run_dir import RunDir, json_line, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parent.parent


def strict_json(text: str) -> dict:
    """Standard JSON only: NaN and Infinity are refused, as a JavaScript or Go reader would."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def tiny(tiny_root, folder, **sections):
    return load_config(write_tiny_config(tiny_root, folder, steps=4, **sections))


# --- configs ---------------------------------------------------------------------------------------

def test_resume_with_another_model_is_one_line_and_changes_nothing(tiny_root, tmp_path, cli):
    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=2, training={"val_every_epochs": 0})
    run = tmp_path / "run"
    assert cli("train", "--config", cfg, "--run-dir", run, "--no-progress")[0] == 0
    before = {p.name: p.read_bytes() for p in (run / "config.yaml", run / "checkpoints" / "last.pt")}
    code, _, err = cli("train", "--config", cfg, "--run-dir", run, "--resume", "--no-progress", "model.features=[8,16,32]")
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {run / 'checkpoints' / 'last.pt'}: cannot resume with another model")
    assert "model.features [4, 8, 16] -> [8, 16, 32]" in err[0]
    assert {p.name: p.read_bytes() for p in (run / "config.yaml", run / "checkpoints" / "last.pt")} == before
    # a legitimate change (a longer run) is resumed, and the earlier config is kept, not overwritten
    code, _, err = cli("train", "--config", cfg, "--run-dir", run, "--resume", "--no-progress", "training.max_epochs=2")
    assert code == 0, err
    assert yaml.safe_load((run / "config.previous.yaml").read_text())["training"]["max_epochs"] == 1
    assert load_config(run / "config.yaml").training.max_epochs == 2
    assert "resumed with changed keys: training.max_epochs 1 -> 2" in (run / "train.log").read_text()


@pytest.mark.slow
def test_a_config_naming_the_demo_manifest_prepares_its_data(tmp_path):
    """After `make test` (no `make lab`), the demo config must not meet 'record vanished' lines."""
    (tmp_path / "data_manifests").mkdir()
    shutil.copy(REPO / "data_manifests" / "synthetic_demo.yaml", tmp_path / "data_manifests")
    (tmp_path / "configs").mkdir()
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    (tmp_path / "configs" / "demo.yaml").write_text(yaml.safe_dump(demo))
    done = subprocess.run([sys.executable, "-m", "vesuvius_lab", "train", "--config", "configs/demo.yaml",
                           "--run-dir", "run", "training.max_epochs=1", "training.train_iterations_per_epoch=1",
                           "training.val_every_epochs=0", "training.workers=0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "vanished" not in done.stderr and "synth" in done.stderr  # its progress bar
    assert len(list((tmp_path / "data" / "synthetic_demo" / "train_images").glob("*.tif"))) == 12


# --- training state ----------------------------------------------------------------------------------

def test_a_nan_gradient_never_reaches_the_weights(tiny_root, tmp_path):
    """bf16/fp32 have no GradScaler to catch it: the engine must drop the step itself."""
    from vesuvius_lab.data import open_data
    from vesuvius_lab.loader import build_loader
    from vesuvius_lab.training.engine import build_engine, forward_backward, optimizer_update

    config = tiny(tiny_root, tmp_path / "cfg")
    data = open_data(config)
    dataset = data.patch_dataset(config)
    engine = build_engine(config, dataset, torch.device("cpu"))
    batches = iter(build_loader(dataset, config, num_steps=3))
    weight = next(engine.model.parameters())
    poison = weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    before = [p.detach().clone() for p in engine.model.parameters()]
    fb = forward_backward(engine, batches, 0)
    assert fb.finite  # the loss is finite: only its gradient is not
    grad_norm, applied = optimizer_update(engine, fb.finite)
    assert not applied and not np.isfinite(grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, engine.model.parameters()))
    poison.remove()
    fb = forward_backward(engine, batches, 1)
    assert optimizer_update(engine, fb.finite)[1]  # a good step is applied again
    assert not all(torch.equal(a, b) for a, b in zip(before, engine.model.parameters()))
    # and a checkpoint never holds non-finite weights
    state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": state})
    state[next(iter(state))].view(-1)[0] = float("inf")
    with pytest.raises(DataError, match="not saved: non-finite weights"):
        save_checkpoint(path, {"model": state})
    assert all(torch.isfinite(t).all() for t in load_checkpoint(path)["model"].values() if t.is_floating_point())


def test_a_preflight_failure_leaves_a_true_state_and_a_fresh_run_keeps_its_own_log(data_copy, tmp_path, cli):
    manifest = tmp_path / "m.yaml"
    build_manifest(data_copy, progress=False).save(manifest)
    cfg = write_tiny_config(data_copy, tmp_path / "cfg", steps=2, training={"val_every_epochs": 0})
    doc = yaml.safe_load(cfg.read_text())
    doc["data"]["manifest"] = str(manifest)
    cfg.write_text(yaml.safe_dump(doc))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 0.5}\n')  # a run that died early
    victim = sorted((data_copy / "train_images").glob("*.tif"))[0]
    victim.unlink()
    code, _, err = cli("train", "--config", cfg, "--run-dir", run, "--no-progress")
    assert code == 2 and err[0] == f"error: {victim}: record {victim.stem} vanished (file missing)"
    status = strict_json((run / "status.json").read_text())
    assert status["state"] == "failed" and status["message"].startswith(f"{victim}: record {victim.stem} vanished")
    assert not (run / "metrics.jsonl").exists()
    assert (run / "metrics.previous.jsonl").read_text().startswith('{"kind": "train", "step": 1')


def test_logs_and_status_are_standard_json(tiny_root, tmp_path):
    config = tiny(tiny_root, tmp_path / "cfg", optim={"lr": 1e30, "warmup_steps": 0, "max_nonfinite": 2},
                  training={"val_every_epochs": 0})
    run = tmp_path / "run"
    with pytest.raises(Exception, match="non-finite losses in a row"):
        train(config, run, progress=False)
    lines = [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in lines if r["kind"] == "train"][-2:] == [True, True]
    assert all(r["loss"] is None and r["grad_norm"] is None for r in lines if r["skipped"])
    status = strict_json((run / "status.json").read_text())
    assert status["state"] == "failed" and status["best_score"] is None  # -inf before any validation
    assert "no bad step reached the weights" in status["message"]
    assert json_line({"a": float("nan"), "b": [float("-inf"), 1.0]}) == '{"a": null, "b": [null, 1.0]}'


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_for_the_user_keep_their_umask(tiny_root, tmp_path, umask):
    old = os.umask(umask)
    try:
        config = tiny(tiny_root, tmp_path / "cfg")
        save_config(config, tmp_path / "out" / "config.yaml")
        build_manifest(tiny_root, progress=False).save(tmp_path / "out" / "manifest.yaml")
        write_volume(tmp_path / "out" / "mask.tif", np.zeros((4, 4, 4), np.uint8))
    finally:
        os.umask(old)
    for name in ("config.yaml", "manifest.yaml", "mask.tif"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o666 & ~umask, name


def _full_filesystem(path: Path, size_kb: int):
    """A real small filesystem at ``path``: tmpfs when root (as in CI), else None."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        return None
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True)
    return path if done.returncode == 0 else None


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path):
    payload = {"model": {"w": torch.randn(64, 1024)}, "step": 1}  # 256 kB
    folder = tmp_path / "small"
    mounted = _full_filesystem(folder, 400)
    try:
        if mounted:
            save_checkpoint(folder / "last.pt", payload)
            payload["step"] = 2
            with pytest.raises(DataError) as err:
                save_checkpoint(folder / "last.pt", payload)  # the temp copy does not fit beside the old one
        else:  # unprivileged: the same full-disk error from a file-size limit, in a child process
            code = ("import resource, signal, torch, sys\n"
                    "from vesuvius_lab.training.run_dir import save_checkpoint\n"
                    f"p = {{'model': {{'w': torch.randn(64, 1024)}}, 'step': 1}}\n"
                    f"save_checkpoint(__import__('pathlib').Path({str(folder / 'last.pt')!r}), p)\n"
                    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                    "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
                    "p['step'] = 2\n"
                    "try:\n    save_checkpoint(__import__('pathlib').Path(" + repr(str(folder / "last.pt")) + "), p)\n"
                    "except Exception as e:\n    print(type(e).__name__, e.lines[0] if hasattr(e, 'lines') else e)\n")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
            assert out.startswith("DataError ")
        if mounted:
            assert len(err.value.lines) == 1 and "could not save the checkpoint" in err.value.lines[0]
            assert "the previous one is intact" in err.value.lines[0]
        assert load_checkpoint(folder / "last.pt")["step"] == 1
        assert [p.name for p in folder.iterdir()] == ["last.pt"]  # no temp file left
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=True)  # lazy: a failed writer may still hold its fd


def test_temp_files_of_a_killed_save_are_removed_at_the_next_start(tiny_root, tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    run.create()
    stale = [run.checkpoints / ".last.pt.k3j2.tmp", run.root / ".status.json.x9.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    keep = run.checkpoints / "notes.tmp"  # not ours: left alone
    keep.write_text("mine")
    train(tiny(tiny_root, tmp_path / "cfg", training={"val_every_epochs": 0}), run.root, progress=False)
    assert not any(p.exists() for p in stale) and keep.exists()
    assert f"removed {stale[0]}" in capsys.readouterr().err


# --- the run launcher ----------------------------------------------------------------------------------

def test_a_reused_pid_is_never_signalled(tmp_path):
    from vesuvius_lab.lab import runs

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        run = RunDir(tmp_path / "run")
        run.root.mkdir()
        # the run's process died long ago; its pid now belongs to an unrelated process group
        run.launch.write_text(json.dumps({"pid": bystander.pid, "pgid": bystander.pid, "process_start": 1.0}))
        run.status_file.write_text(json.dumps({"pid": bystander.pid, "process_start": 2.0, "state": "running"}))
        process = runs.RunProcess(run.root)
        assert not process.alive() and process.pid is None
        assert process.stop() is False
        assert bystander.poll() is None  # still running: nothing was sent to it
    finally:
        bystander.kill()
        bystander.wait()


def test_a_run_name_cannot_leave_the_runs_folder(tiny_root, tmp_path):
    from vesuvius_lab.lab import runs

    monitor = runs.RunMonitor(write_tiny_config(tiny_root, tmp_path / "cfg"), tmp_path / "runs", run_name="ok")
    for bad in ("../escaped", "/tmp/x", "a/b", ".."):
        monitor.run_name.value = bad
        assert monitor.run_name.value == "ok" and "must be a plain folder name" in monitor.message.value
    assert monitor.run_dir == tmp_path / "runs" / "ok"


@pytest.mark.slow
def test_a_killed_data_worker_leaves_a_checkpoint_and_resume_is_exact(tiny_root, tmp_path):
    """SIGKILL one data worker mid-epoch (as the OOM killer would): a one-line error naming the cause,
    a checkpoint at the last completed step, and --resume ends bitwise where an unbroken run does."""
    import time

    import psutil

    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=12, training={
        "workers": 2, "persistent_workers": True, "checkpoint_every_steps": 100, "val_every_epochs": 0})

    def start(run, *extra):
        return subprocess.Popen([sys.executable, "-m", "vesuvius_lab", "train", "--config", str(cfg), "--run-dir",
                                 str(run), "--no-progress", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    reference = start(tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    run = tmp_path / "run"
    proc = start(run)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = RunDir(run).read_status()
        if status.get("step", 0) >= 4:
            break
        time.sleep(0.02)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGKILL)
    assert proc.wait(timeout=120) == 2
    err = proc.stderr.read().strip().splitlines()
    assert err[-1].startswith("error: data worker failed during step") and "Traceback" not in "".join(err)
    assert "SIGKILL is most often the kernel's out-of-memory killer" in err[-1] or "exited unexpectedly" in err[-1]
    status = RunDir(run).read_status()
    assert status["state"] == "failed" and status["message"] == err[-1].removeprefix("error: ")
    held = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert held >= 4 and f"holds step {held}" in err[-1]
    resumed = start(run, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a = torch.load(tmp_path / "reference" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_a_worker_death_reported_between_fetches_still_leaves_the_last_whole_step(tiny_root, tmp_path, monkeypatch):
    """PyTorch reports a dead worker from its SIGCHLD handler wherever the loop is, not only at a
    fetch. Struck while the step's log line is written (the step applied and counted), the run
    still saves that step, and --resume from it ends bitwise where an unbroken run does."""
    import time

    import psutil

    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=8, training={
        "workers": 2, "persistent_workers": True, "checkpoint_every_steps": 100, "val_every_epochs": 0})
    config = load_config(cfg)
    assert train(config, tmp_path / "reference", progress=False)["state"] == "finished"
    before = {p.pid for p in psutil.Process().children()}
    write_status = RunDir.status

    def status_then_a_worker_dies(self, **fields):  # the OOM killer, right after step 3's log line
        write_status(self, **fields)
        if fields.get("state") == "running" and fields.get("step") == 3:
            workers = [p for p in psutil.Process().children() if p.pid not in before]
            assert len(workers) == 2
            os.kill(workers[0].pid, signal.SIGKILL)
            time.sleep(30)  # PyTorch's SIGCHLD handler raises in here

    monkeypatch.setattr(RunDir, "status", status_then_a_worker_dies)
    run = tmp_path / "run"
    with pytest.raises(DataError) as failed:
        train(config, run, progress=False)
    monkeypatch.undo()
    assert str(failed.value).startswith("data worker failed during step 3 (")
    assert str(failed.value).endswith(f"{run / 'checkpoints' / 'last.pt'} holds step 3: resume with --resume")
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    assert train(config, run, resume=True, progress=False)["state"] == "finished"
    a = torch.load(tmp_path / "reference" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
               for i in a["optimizer"]["state"])


class _StopsAfterHandingOver(torch.utils.data.Dataset):
    """Each item's worker stops itself (SIGSTOP) just after handing the item over."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        import threading

        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGSTOP)).start()
        return torch.full((64,), float(index))


def test_a_worker_stopped_mid_hand_over_meets_the_batch_deadline():
    """The main process blocked fetching a batch's tensors from a stopped worker (where the
    DataLoader's timeout cannot see) is freed by the deadline, and knows the worker hung."""
    import threading
    import time

    from torch.utils.data import DataLoader

    from vesuvius_lab.loader import Batches

    loader = DataLoader(_StopsAfterHandingOver(), batch_size=None, num_workers=1, prefetch_factor=1, timeout=1)
    batches = Batches(loader, timeout_s=1, grace_s=1)
    (worker,) = batches._it._workers
    backstop = threading.Timer(60, worker.kill)  # without the deadline the fetch would wait forever
    backstop.start()
    try:
        time.sleep(1.5)  # the first item is handed over and its worker has stopped
        t0 = time.monotonic()
        with pytest.raises((RuntimeError, OSError, EOFError)):
            next(batches)
        waited = time.monotonic() - t0
    finally:
        backstop.cancel()
        if worker.is_alive():
            worker.kill()
    assert batches.hung and not worker.is_alive()
    assert waited < 30  # the deadline (2 s), not the backstop (60 s)


@pytest.mark.slow
def test_a_hung_data_worker_times_out_into_a_checkpoint(tiny_root, tmp_path):
    """A worker that stops answering (SIGSTOP: alive, silent) is a timeout, not a run hung forever."""
    import time

    import psutil

    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=200, training={
        "workers": 1, "persistent_workers": True, "checkpoint_every_steps": 1000, "val_every_epochs": 0,
        "worker_timeout_s": 3, "prefetch_factor": 1})
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "vesuvius_lab", "train", "--config", str(cfg), "--run-dir", str(run),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and RunDir(run).read_status().get("step", 0) < 3:
        time.sleep(0.02)
    (worker,) = psutil.Process(proc.pid).children()
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        assert proc.wait(timeout=120) == 2
    finally:
        if psutil.pid_exists(worker.pid):
            os.kill(worker.pid, signal.SIGKILL)
    err = proc.stderr.read().strip().splitlines()[-1]
    assert err.startswith("error: data worker failed during step") and "a worker hung (training.worker_timeout_s)" in err
    held = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert held >= 3 and f"holds step {held}" in err
