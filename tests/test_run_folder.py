"""One run, one writer, one recipe: the run folder's lock, resuming with the run's own config, and the
exit codes a script relies on. Real trainer processes, real signals, real files."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lab_runs_helpers import write_tiny_config
from vesuvius_lab import cli as cli_module
from vesuvius_lab.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_STOPPED
from vesuvius_lab.lab import runs
from vesuvius_lab.training.run_dir import MetricsReader, RunDir, RunLock, RunState, read_records

VLAB = [sys.executable, "-m", "vesuvius_lab"]


def launch(*args: object) -> subprocess.Popen:
    return subprocess.Popen([*VLAB, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        if RunDir(run).read_status().get("step", 0) >= step:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{run} never reached step {step}")


def folder_state(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file's mtime and bytes: what 'changes nothing in the folder' compares."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def train_steps(run: Path) -> list[int]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in lines if r["kind"] == "train"]


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    code = cli_module.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(("error:", "internal error"))]


# --- one writer per run folder ---------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_trainer_is_refused_and_a_sigkilled_holder_leaves_no_stale_lock(tiny_root, tmp_path, capsys):
    """While a run trains (with a forked data worker), a second `train` into its folder, fresh or
    --resume, exits 2 naming the holder; the notebook's monitor shows it as training elsewhere and
    launches nothing; after a SIGKILL of the trainer alone, --resume continues at once."""
    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=100, training={
        "val_every_epochs": 0, "checkpoint_every_steps": 5, "workers": 1, "persistent_workers": True})
    run = tmp_path / "runs" / "r"
    first = launch("train", "--config", cfg, "--run-dir", run, "--no-progress")
    try:
        wait_for_step(run, 7, first)  # past the checkpoint at step 5
        for extra in (["--resume"], []):
            code, _, err = run_cli(capsys, "train", "--config", cfg, "--run-dir", run, "--no-progress", *extra)
            assert code == EXIT_BAD_INPUT and len(error_lines(err)) == 1, err
            line = error_lines(err)[0]
            assert line.startswith(f"error: {run}: training elsewhere (pid {first.pid} on ")
            assert f"command vesuvius-lab train --config {cfg} --run-dir {run}" in line
        assert not (run / "config.previous.yaml").exists() and not (run / "metrics.previous.jsonl").exists()
        assert RunDir(run).read_status()["pid"] == first.pid

        monitor = runs.RunMonitor(cfg, tmp_path / "runs", run_name="r")  # notebook 04 opened beside it
        shown = monitor.refresh()
        assert shown["state_shown"] == "training elsewhere" and shown["alive"]
        assert monitor.start_button.disabled and monitor.resume_button.disabled and not monitor.stop_button.disabled
        assert f"pid {first.pid}" in monitor.status.value
        monitor.start(resume=True)  # what a click on a stale button would do
        assert "training elsewhere" in monitor.message.value and monitor.process.popen is None
        assert not (run / "launch.json").exists() and not (run / "console.log").exists()

        os.kill(first.pid, signal.SIGKILL)  # the trainer alone: its data worker is orphaned, not killed
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert RunDir(run).holder() is None  # the kernel released it with the process
    resumed = launch("train", "--run-dir", run, "--resume", "--no-progress")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == EXIT_OK, err
    assert train_steps(run) == list(range(1, 101))  # one line per step: no second writer's scribbles


def test_the_lock_holder_is_recorded_and_released(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.holder() is None
    with RunLock(run):
        holder = run.holder()
        assert holder["pid"] == os.getpid() and holder["host"] and holder["started"] <= time.time()
        with pytest.raises(Exception, match="training elsewhere"):
            RunLock(run).acquire(wait_s=0.1)
        ready, tell = os.pipe()
        pid = os.fork()
        if pid == 0:  # a forked child (a data worker) must not keep the lock after its parent lets go
            os.write(tell, b"1")  # the fork's handlers have run
            time.sleep(3)
            os._exit(0)
        assert os.read(ready, 1) == b"1"
    try:
        assert run.holder() is None
        RunLock(run).acquire(wait_s=0).release()
    finally:
        os.waitpid(pid, 0)


def test_one_reader_of_the_log_skips_a_torn_line_and_a_resume_keeps_lines_to_the_byte(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.records() == [] and read_records(run.metrics) == []  # no log yet
    run.create()
    for step in (1, 2, 3):
        run.append({"kind": "train", "step": step, "loss": 0.5 / step, "lr": 1e-3, "skipped": False, "grad_norm": None})
    complete = run.metrics.read_bytes()
    with open(run.metrics, "ab") as fh:
        fh.write(b'{"kind": "train", "st')  # a line torn by a kill
    assert [r["step"] for r in run.records()] == [1, 2, 3] == [r["step"] for r in MetricsReader(run.metrics).read()]
    run.truncate_after(2)
    assert run.metrics.read_bytes() == b"".join(complete.splitlines(keepends=True)[:2])  # the kept lines as written
    assert [r["step"] for r in run.records()] == [1, 2]


def test_the_run_states_are_the_words_status_json_holds(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    run.status(state=RunState.STOPPED, step=3)
    assert b'"state": "stopped"' in run.status_file.read_bytes() and run.read_status()["state"] == RunState.STOPPED
    assert [s.value for s in RunState] == ["not started", "preflight", "running", "stopped", "finished", "pruned",
                                          "failed"]


# --- resume never changes the recipe silently -------------------------------------------------------

@pytest.mark.slow
def test_resume_takes_the_runs_own_config_and_refuses_a_differing_file(tiny_root, tmp_path, capsys):
    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=3, epochs=3, training={"val_every_epochs": 0})
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--config", cfg, "--run-dir", run, "--no-progress",
                           "optim.lr=0.002", "training.max_epochs=1")
    assert code == EXIT_OK, err
    before = folder_state(run)

    code, _, err = run_cli(capsys, "train", "--config", cfg, "--run-dir", run, "--resume", "--no-progress")
    assert code == EXIT_BAD_INPUT and len(error_lines(err)) == 1, err
    line = error_lines(err)[0]
    assert line.startswith(f"error: {cfg}: differs from the run's own config {run / 'config.yaml'}")
    assert "optim.lr 0.002 -> 0.01" in line and "training.max_epochs 1 -> 3" in line
    assert folder_state(run) == before

    code, _, err = run_cli(capsys, "train", "--resume", "--no-progress")
    assert code == EXIT_BAD_INPUT and "--resume --run-dir DIR" in error_lines(err)[0]

    code, out, err = run_cli(capsys, "train", "--run-dir", run, "--resume", "--no-progress", "training.max_epochs=2")
    assert code == EXIT_OK, err
    assert "resuming with changed keys: training.max_epochs 1 -> 2" in err and "optim.lr" not in err
    assert train_steps(run) == list(range(1, 7))
    lrs = [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert max(lrs) <= 0.002 + 1e-12  # the run's own LR, not the file's 0.01
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.002 and saved["training"]["max_epochs"] == 2

    # the same file with the differing keys named on the command line is accepted
    code, _, err = run_cli(capsys, "train", "--config", cfg, "--run-dir", run, "--resume", "--no-progress",
                           "optim.lr=0.002", "training.max_epochs=2")
    assert code == EXIT_OK, err


# --- exit codes --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_exit_codes_stopped_bad_input_and_internal_error(tiny_root, tmp_path, capsys, monkeypatch):
    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=400, training={"val_every_epochs": 0})
    run = tmp_path / "run"
    proc = launch("train", "--config", cfg, "--run-dir", run, "--no-progress")
    wait_for_step(run, 2, proc)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, err
    step = RunDir(run).read_status()["step"]
    assert f"stopped by SIGINT at step {step}; resume with --resume" in out

    # any other command stopped by a signal: 3, one line, what to do next
    for sig in (signal.SIGTERM, signal.SIGINT):
        out = tmp_path / f"synth-{sig.name}"
        synth = launch("synth", out, "--volumes", "200", "--shape", "96")
        deadline = time.monotonic() + 120
        while not list(out.glob("train_images/*.tif")) and time.monotonic() < deadline:  # inside its work
            time.sleep(0.05)
        synth.send_signal(sig)
        _, err = synth.communicate(timeout=120)
        assert synth.returncode == EXIT_STOPPED, err
        assert err.strip().splitlines()[-1] == f"stopped by {sig.name}; run it again"

    code, _, err = run_cli(capsys, "evaluate", "--pred", tmp_path / "nope", "--labels", tmp_path / "nope")
    assert code == EXIT_BAD_INPUT and error_lines(err) == [  # one line per problem
        f"error: {tmp_path / 'nope'}: prediction folder not found", f"error: {tmp_path / 'nope'}: label folder not found"]

    def broken(*_a, **_k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("vesuvius_lab.evaluate.evaluate_dirs", broken)
    monkeypatch.delenv("VLAB_DEBUG", raising=False)
    code, _, err = run_cli(capsys, "evaluate", "--pred", tmp_path, "--labels", tmp_path)
    assert code == EXIT_INTERNAL
    assert error_lines(err) == ["internal error: ZeroDivisionError: division by zero (set VLAB_DEBUG=1 for a traceback)"]


# --- other writers beside a trainer ------------------------------------------------------------------

@pytest.mark.slow
def test_two_tuners_beside_a_trainer_cache_the_probabilities_of_the_checkpoint_they_name(tiny_root, tmp_path):
    """The trainer replaces last.pt every step while two tune-postprocess processes share the run's
    cache: the cache's record names one version of the checkpoint, and the probabilities are that
    version's."""
    import numpy as np

    from vesuvius_lab.data import open_data
    from vesuvius_lab.inference import model_from_checkpoint, predict_volume
    from vesuvius_lab.postprocess import PostprocessConfig

    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=4, val={"max_volumes": 1}, training={
        "checkpoint_every_steps": 1, "keep_last": 500, "max_epochs": 1})
    run = tmp_path / "run"
    assert launch("train", "--config", cfg, "--run-dir", run, "--no-progress").wait(timeout=600) == EXIT_OK
    trainer = launch("train", "--run-dir", run, "--resume", "--no-progress", "training.max_epochs=60")
    try:
        wait_for_step(run, 6, trainer)
        tuners = [launch("tune-postprocess", run, "--checkpoint", run / "checkpoints" / "last.pt", "--grid",
                         "threshold=[0.5]", "--eta", "0", "--jobs", "1", "--json", "--device", "cpu") for _ in range(2)]
        for tuner in tuners:
            _, err = tuner.communicate(timeout=600)
            assert tuner.returncode == EXIT_OK, err
        assert trainer.poll() is None  # the checkpoint was being replaced all along
    finally:
        trainer.send_signal(signal.SIGTERM)
        trainer.wait(timeout=120)
    meta = json.loads((run / "tune" / "probabilities.json").read_text())
    kept = {p.stat().st_ino: p for p in (run / "checkpoints").glob("step_*.pt")}
    source = kept[meta["checkpoint"]["inode"]]  # the version the cache says it holds, kept as a hard link
    model, config = model_from_checkpoint(source)
    record = open_data(config).val[0]
    plain = dataclasses.replace(config, postprocess=PostprocessConfig())
    expected = predict_volume(model, open_data(config).cache.load(record).image, plain, "cpu").probability
    np.testing.assert_array_equal(np.load(run / "tune" / f"{record.id}.prob.npy"), expected.astype(np.float32))
