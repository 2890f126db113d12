"""Shared fixtures: small real datasets on disk, and the skip-or-fail rule for system dependencies."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from vesuvius_lab.cli import main as cli_main
from vesuvius_lab.synth import synth

pytest_plugins = ["conftest_gui"]  # Xvfb, napari viewer and notebook fixtures of the workbench tests

REPO = Path(__file__).resolve().parent.parent
REQUIRE_ALL = os.environ.get("VLAB_REQUIRE_ALL") == "1"


def require(available: bool, what: str) -> None:
    """Skip when a system dependency is missing, or fail under VLAB_REQUIRE_ALL=1 (CI)."""
    if available:
        return
    if REQUIRE_ALL:
        pytest.fail(f"required system dependency missing: {what}")
    pytest.skip(f"missing system dependency: {what}")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VLAB_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "vlab-cache"))
    monkeypatch.setenv("VLAB_RUNS_DIR", str(tmp_path_factory.getbasetemp() / "vlab-runs"))  # never the repo's runs/


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A 6-volume, 48^3 synthetic dataset over 3 scrolls; read-only for tests (copy to modify)."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    synth(root, volumes=6, shape=(48, 48, 48), seed=3, scrolls=3, test_volumes=1, progress=False)
    return root


@pytest.fixture()
def data_copy(tiny_root, tmp_path) -> Path:
    """A private copy of the tiny dataset that a test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(tiny_root, dst)
    return dst


@pytest.fixture()
def cli(capsys):
    """Run the CLI in-process; returns (exit status, stdout lines, stderr lines)."""

    def run(*args: str) -> tuple[int, list[str], list[str]]:
        code = cli_main([str(a) for a in args])
        out, err = capsys.readouterr()
        keep = [line for line in err.splitlines() if line.startswith(("error:", "internal error"))]
        return code, out.splitlines(), keep

    return run


@pytest.fixture(scope="session")
def finished_runs(tiny_root, tmp_path_factory) -> Path:
    """A folder of two finished tiny runs, "a" and "b" (``loss.cldice`` and ``optim.lr`` differ), two
    validations each; "b" was SIGKILLed after a checkpoint and resumed (one run, two processes)."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from lab_runs_helpers import write_tiny_config

    root = tmp_path_factory.mktemp("finished")
    training = {"checkpoint_every_steps": 2}
    configs = {"a": write_tiny_config(tiny_root, root / "cfg_a", steps=4, epochs=2, training=training),
               "b": write_tiny_config(tiny_root, root / "cfg_b", steps=4, epochs=2, training=training,
                                      loss={"cldice": 0.5}, optim={"lr": 0.02},
                                      data={"manifest": str(root / "cfg_a" / "tiny.yaml")})}  # the same data

    def train(name: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "vesuvius_lab", "train", "--config", str(configs[name]),
                                 "--run-dir", str(root / "runs" / name), "--no-progress", *extra],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)

    assert train("a").wait(timeout=600) == 0
    killed, status = train("b"), root / "runs" / "b" / "status.json"
    deadline = time.monotonic() + 300
    while killed.poll() is None and time.monotonic() < deadline:
        try:
            if json.loads(status.read_text()).get("step", 0) >= 3:  # past the checkpoint at step 2
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    if killed.poll() is None:
        os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    resumed = train("b", "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    return root / "runs"
