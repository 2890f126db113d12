"""Fixtures for the workbench tests (notebooks, widgets, napari), loaded from conftest.py.

napari draws with OpenGL into a real X window, so GUI tests run under a private Xvfb started once
per session when $DISPLAY is unset (Qt's offscreen platform cannot render napari's canvas).
Screenshots go to tests/artifacts/ and are listed at the end of the run.
"""

from __future__ import annotations

import ctypes.util
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import require
from vesuvius_lab.manifest import build_manifest

PR_SET_PDEATHSIG = 1  # linux/prctl.h
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
_SCREENSHOTS: list[Path] = []


def _wait_for_display(number: int, timeout: float) -> None:
    """Until the X server's socket accepts connections."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(f"/tmp/.X11-unix/X{number}")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _start_xvfb(timeout: float = 20.0) -> tuple[subprocess.Popen, int]:
    """Xvfb on a free display number, which it picks itself and reports through -displayfd.

    It is stopped by the kernel when this process exits (PR_SET_PDEATHSIG), not by fixture
    teardown: Qt keeps its X connection until the interpreter shuts down, and a server that
    vanishes first makes Qt's X I/O error handler exit the test run with status 1.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM),
    )
    os.close(write_fd)
    text, deadline = b"", time.monotonic() + timeout
    try:  # read up to the newline: Xvfb dies if the pipe closes before it has written it
        while not text.endswith(b"\n") and select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = os.read(read_fd, 16)
            if not chunk:
                break
            text += chunk
    finally:
        os.close(read_fd)
    if not text.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"Xvfb did not report a display within {timeout:.0f} s (exit status {proc.poll()})")
    _wait_for_display(int(text), timeout)
    if proc.poll() is not None:
        raise RuntimeError(f"Xvfb exited with status {proc.returncode} after reporting display :{int(text)}")
    return proc, int(text)


@pytest.fixture(scope="session")
def x_display():
    """$DISPLAY for napari and Qt (xcb): the caller's X server if set, else Xvfb until the run ends."""
    require(ctypes.util.find_library("GL") is not None, "libGL (Mesa OpenGL)")
    saved = {key: os.environ.get(key) for key in ("DISPLAY", "QT_QPA_PLATFORM")}
    os.environ["QT_QPA_PLATFORM"] = "xcb"
    if not os.environ.get("DISPLAY"):
        require(shutil.which("Xvfb") is not None, "Xvfb (apt package xvfb)")
        _, number = _start_xvfb()
        os.environ["DISPLAY"] = f":{number}"
    yield os.environ["DISPLAY"]
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture()
def viewer(x_display):
    """A real, shown napari viewer, closed after the test."""
    import napari

    v = napari.Viewer(show=True)
    yield v
    v.close()


@pytest.fixture(scope="session")
def tiny_manifest(tiny_root, tmp_path_factory) -> Path:
    """A manifest of the tiny dataset, as ``manifest build`` would write it (no synth section)."""
    path = tmp_path_factory.mktemp("manifest") / "tiny.yaml"
    build_manifest(tiny_root, name="tiny", progress=False).save(path)
    return path


@pytest.fixture()
def artifacts() -> Path:
    """tests/artifacts/, where screenshots are kept for a person to look at (ignored by git)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def assert_rendered(path: Path, min_std: float = 20.0, min_colours: int = 64) -> np.ndarray:
    """A screenshot that shows something: varied pixel values and many distinct colours."""
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"))
    colours = len(np.unique(rgb.reshape(-1, 3), axis=0))
    assert rgb.std() > min_std and colours > min_colours, f"{path} looks blank: std {rgb.std():.1f}, {colours} colours"
    _SCREENSHOTS.append(path)
    return rgb


def run_notebook(path: Path, parameters: dict | None = None, timeout: int = 120, cwd: Path | None = None,
                 output: Path | None = None):
    """Execute a notebook with papermill, as a researcher runs a parameterised notebook: the
    caller's values go in papermill's ``injected-parameters`` cell after the ``parameters`` cell.
    Runs in the notebook's own folder unless ``cwd`` says otherwise; a failing cell raises
    ``papermill.PapermillExecutionError`` naming the cell and its error."""
    import papermill

    return papermill.execute_notebook(path, output, parameters=parameters or {}, kernel_name="python3",
                                      cwd=cwd or Path(path).parent, execution_timeout=timeout,
                                      progress_bar=False)


def pytest_terminal_summary(terminalreporter) -> None:
    if _SCREENSHOTS:
        terminalreporter.section("screenshots")
        for path in dict.fromkeys(_SCREENSHOTS):
            terminalreporter.write_line(str(path))
