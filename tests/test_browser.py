"""Notebook 04 end to end in a real JupyterLab through headless Chromium: run all cells, press Start,
watch the page show logged steps, screenshot, Stop."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from conftest import require
from lab_runs_helpers import write_tiny_config
from vesuvius_lab.lab import runs
from vesuvius_lab.lab.runner import inject_parameters
from vesuvius_lab.training.run_dir import RunDir

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "04_train_live.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
TOKEN = "vlab-browser-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"jupyter lab did not answer {url} within {timeout} s")


def _kill_group(pgid: int | None, sig: int = signal.SIGTERM) -> None:
    if pgid:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass


def start_lab(root: Path, tmp_path: Path) -> tuple[subprocess.Popen, int, object]:
    """A JupyterLab server on ``root`` (its own process group), answering; (server, port, log)."""
    port = _free_port()
    log = open(tmp_path / "jupyter.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--ServerApp.token={TOKEN}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0", "--allow-root",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config")},
    )
    try:
        _wait_for_server(f"http://127.0.0.1:{port}/api/status?token={TOKEN}", server)
    except Exception:
        _kill_group(server.pid)
        log.close()
        raise
    return server, port, log


def open_and_run_all(p, port: int, name: str):
    """Headless Chromium on the notebook ``name``, its kernel chosen, Run All Cells; (browser, page)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"http://127.0.0.1:{port}/lab/tree/{name}?token={TOKEN}")
    page.locator(".jp-Notebook").first.wait_for(timeout=60_000)
    select = page.locator(".jp-Dialog button", has_text=re.compile(r"^\s*Select\s*$"))
    try:  # a fresh JupyterLab asks which kernel, even with the notebook's kernelspec
        select.wait_for(timeout=20_000)
        select.click()
    except PlaywrightTimeout:
        pass
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(state="attached", timeout=60_000)
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    return browser, page


@pytest.mark.browser
@pytest.mark.slow
def test_notebook_04_in_jupyterlab(tiny_root, tmp_path, artifacts):
    require(CHROMIUM.exists(), "chromium")
    from playwright.sync_api import sync_playwright

    root = tmp_path / "lab"
    root.mkdir()
    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=400)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    inject_parameters(nb, {"config_path": str(config), "runs_dir": str(tmp_path / "runs"), "run_name": "web",
                           "refresh_s": 0.5})
    nbformat.write(nb, root / NOTEBOOK.name)
    run_dir = tmp_path / "runs" / "web"
    server, port, log = start_lab(root, tmp_path)
    shot = artifacts / "04_train_live-browser.png"
    try:
        with sync_playwright() as p:
            browser, page = open_and_run_all(p, port, NOTEBOOK.name)
            page.on("dialog", lambda dialog: dialog.accept())
            failure = artifacts / "04_train_live-browser-failure.png"
            try:
                _drive(page, run_dir, shot)
            except Exception:
                page.screenshot(path=str(failure), full_page=True)
                print("failure screenshot:", failure)
                raise
            browser.close()
    finally:
        _cleanup(run_dir, server, log)
    from conftest_gui import assert_rendered

    assert_rendered(shot)


def _drive(page, run_dir: Path, shot: Path) -> None:
    start = page.locator("button.jupyter-button", has_text=re.compile(r"^\s*Start\s*$"))
    start.wait_for(timeout=60_000)
    plot = page.locator("img.widget-image").first
    plot.wait_for(timeout=30_000)
    before = plot.get_attribute("src")
    start.click()
    # the status line of the widget, updated by the kernel's background refresh
    page.get_by_text(re.compile(r"step ([2-9]|\d{2,}) / 400")).first.wait_for(timeout=90_000)
    # and the plot redrawn since the start (a new image blob), showing those steps
    page.wait_for_function("s => document.querySelector('img.widget-image').src !== s", arg=before, timeout=30_000)
    page.wait_for_timeout(1000)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "train" for r in steps) >= 2
    page.screenshot(path=str(shot), full_page=True)
    print(shot)
    page.locator("button.jupyter-button", has_text=re.compile(r"^\s*Stop\s*$")).click()
    page.get_by_text(re.compile(r"^stopped$")).first.wait_for(timeout=90_000)
    assert runs.read_status(run_dir)["state"] == "stopped"


def _cleanup(run_dir: Path, server: subprocess.Popen, log) -> None:
    try:
        _kill_group(json.loads((run_dir / RunDir.LAUNCH).read_text())["pgid"])
    except (OSError, ValueError, KeyError):
        pass
    _kill_group(server.pid)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:  # the server waits on its kernels; the group goes at once
        _kill_group(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
    log.close()
