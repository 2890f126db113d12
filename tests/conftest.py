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
