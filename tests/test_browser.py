"""Notebooks in a real JupyterLab through headless Chromium, used as a researcher uses them: Run All,
then the widgets. 01: napari in 3D, switch records, the kernel lives on. 03: the demo config's own
defaults. 04: a start with a mistyped override shows its error, then a real start, logged steps,
Stop. 07: Launch a sweep, its table followed to the study's end, Apply best. Screenshots go to tests/artifacts/."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import nbformat
import papermill
import pytest

from conftest import require
from lab_runs_helpers import write_tiny_config
from vesuvius_lab.lab import runs
from vesuvius_lab.lab.forms import RECONNECT_TEXT
from vesuvius_lab.training.run_dir import RunDir

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "04_train_live.ipynb"
NEWS = "official Jupyter news"  # the pop-up a fresh JupyterLab greets with (off: jupyterlab-overrides.json)
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


def _overrides(tmp_path: Path) -> str:
    """A JupyterLab settings folder with this checkout's defaults (jupyterlab-overrides.json, as
    `make install` puts it in the environment), so the lab under test has the workbench's settings."""
    folder = tmp_path / "lab-settings"
    (folder / "overrides.d").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "jupyterlab-overrides.json", folder / "overrides.d" / "vesuvius-lab.json")
    return str(folder)


@contextmanager
def jupyterlab(tmp_path: Path, notebook: Path, parameters: dict, failure: Path, extra_cells: tuple[str, ...] = ()):
    """A JupyterLab server on ``notebook`` (parameters injected, extra cells appended) and a Chromium
    page on it, after Run All; a failure leaves a screenshot at ``failure``. Yields the page."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    root = tmp_path / "lab"
    root.mkdir()
    nb = papermill.execute_notebook(notebook, None, parameters=parameters, prepare_only=True, progress_bar=False)
    nb.cells += [nbformat.v4.new_code_cell(source) for source in extra_cells]
    nbformat.write(nb, root / notebook.name)
    port = _free_port()
    log = open(tmp_path / "jupyter.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--ServerApp.token={TOKEN}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0", "--allow-root",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         f"--LabApp.app_settings_dir={_overrides(tmp_path)}"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config")},
    )
    try:
        _wait_for_server(f"http://127.0.0.1:{port}/api/status?token={TOKEN}", server)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("dialog", lambda dialog: dialog.accept())
            try:
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{notebook.name}?token={TOKEN}")
                page.locator(".jp-Notebook").first.wait_for(timeout=60_000)
                select = page.locator(".jp-Dialog button", has_text=re.compile(r"^\s*Select\s*$"))
                try:  # a fresh JupyterLab asks which kernel, even with the notebook's kernelspec
                    select.wait_for(timeout=20_000)
                    select.click()
                except PlaywrightTimeout:
                    pass
                page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(
                    state="attached", timeout=60_000)
                page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
                page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
                yield page
                assert page.get_by_text(NEWS).count() == 0, "JupyterLab greeted with its news pop-up"
            except Exception:
                page.screenshot(path=str(failure), full_page=True)
                print("failure screenshot:", failure, "server log:", tmp_path / "jupyter.log")
                raise
            browser.close()
    finally:
        _stop_server(server, log)


def _all_cells_ran(page, timeout_s: float = 300) -> None:
    """Until every code cell shows an execution count (Run All has reached the end); a cell that
    failed or printed to stderr (red) ends the wait at once, and the test."""
    red = "[data-mime-type='application/vnd.jupyter.stderr']"
    page.wait_for_function(
        "red => { const p = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent);"
        " return document.querySelector(red) || (p.length > 0 && p.every(t => /\\d/.test(t))); }",
        arg=red, timeout=timeout_s * 1000)
    errors = page.locator(red).all_inner_texts()
    assert not errors, f"a cell failed or warned: {errors}"


def _run_last_cell(page) -> None:
    page.locator(".jp-CodeCell .jp-InputArea-editor").last.click()
    page.keyboard.press("Shift+Enter")


def _kernel_died(page) -> bool:
    return page.get_by_text(re.compile(r"appears to have died")).count() > 0


@pytest.mark.browser
@pytest.mark.gui
@pytest.mark.slow
def test_notebook_01_switch_records_with_napari_in_3d(x_display, tiny_manifest, tmp_path, artifacts):
    """The widget's record change reaches the kernel on a subshell thread; napari must be changed on
    the Qt thread, keep its 3D camera, and the kernel must live on (it died here before)."""
    require(CHROMIUM.exists(), "chromium")
    from vesuvius_lab.manifest import load_manifest

    ids = [r.id for r in load_manifest(tiny_manifest).records]
    probe = "print('probe', viewer.title, viewer.dims.ndisplay, viewer.dims.axis_labels, [l.name for l in viewer.layers])"
    shot = artifacts / "01_inspect_volumes-browser-3d.png"
    with jupyterlab(tmp_path, REPO / "notebooks" / "01_inspect_volumes.ipynb",
                    {"manifest_path": str(tiny_manifest), "cache_dir": str(tmp_path / "cache")},
                    artifacts / "01_inspect_volumes-browser-failure.png", extra_cells=(probe,)) as page:
        _all_cells_ran(page)
        snapshot = page.locator("img.widget-image").last  # under the napari cell
        snapshot.wait_for(timeout=60_000)
        before = snapshot.get_attribute("src")
        page.locator(".widget-toggle-button", has_text=re.compile(r"^\s*3D\s*$")).click()
        page.wait_for_function("s => [...document.querySelectorAll('img.widget-image')].pop().src !== s",
                               arg=before, timeout=120_000)
        dropdown = page.locator(".widget-dropdown select").first
        for index in (1, 2):  # two switches, as the researcher did
            before = snapshot.get_attribute("src")
            dropdown.select_option(index=index)
            page.wait_for_function("s => [...document.querySelectorAll('img.widget-image')].pop().src !== s",
                                   arg=before, timeout=180_000)
        _run_last_cell(page)
        page.get_by_text(re.compile(rf"probe vesuvius-lab: {ids[2]} 3 \('z', 'y', 'x'\)")).wait_for(timeout=120_000)
        assert not _kernel_died(page)
        snapshot.scroll_into_view_if_needed()
        page.screenshot(path=str(shot))
        print(shot)
    from conftest_gui import assert_rendered

    assert_rendered(shot)


def _saved_outputs(page, path: Path) -> list:
    """Save the notebook from the page (Ctrl+S) and read back its code cells' outputs."""
    before = path.stat().st_mtime_ns
    page.locator(".jp-Notebook").first.click()
    page.keyboard.press("Control+s")
    deadline = time.monotonic() + 30
    while path.stat().st_mtime_ns == before and time.monotonic() < deadline:
        time.sleep(0.2)
    return [o for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code" for o in c.outputs]


@pytest.mark.browser
@pytest.mark.gui
@pytest.mark.slow
@pytest.mark.parametrize("name", ["02_preview_patches", "05_evaluate"])
def test_notebook_runs_all_in_jupyterlab(name, x_display, tiny_root, tiny_manifest, tmp_path, artifacts):
    """Run All in the browser: every cell runs, none fails or prints a warning, the kernel lives."""
    require(CHROMIUM.exists(), "chromium")
    parameters = {"manifest_path": str(tiny_manifest), "cache_dir": str(tmp_path / "cache")}
    if name == "02_preview_patches":
        parameters.update(config_path=str(REPO / "configs" / "demo.yaml"), patch_size=[24, 24, 24], n_patches=6,
                          montage_samples=2)
    else:  # a checkpoint trained a few steps
        run = tmp_path / "run"
        subprocess.run([sys.executable, "-m", "vesuvius_lab", "train", "--config",
                        str(write_tiny_config(tiny_root, tmp_path / "cfg", steps=4)), "--run-dir", str(run),
                        "--no-progress"], check=True, capture_output=True, timeout=300)
        parameters.update(checkpoint_path=str(run / "checkpoints" / "last.pt"), max_volumes=1,
                          overrides=["val.overlap=0.0"])
    shot = artifacts / f"{name}-browser.png"
    with jupyterlab(tmp_path, REPO / "notebooks" / f"{name}.ipynb", parameters,
                    artifacts / f"{name}-browser-failure.png") as page:
        _all_cells_ran(page, timeout_s=600)
        snapshot = page.locator("img.widget-image").last  # under the napari cell
        snapshot.wait_for(timeout=60_000)
        outputs = _saved_outputs(page, tmp_path / "lab" / f"{name}.ipynb")
        assert not [o for o in outputs if o.output_type == "error" or o.get("name") == "stderr"], outputs
        assert not _kernel_died(page)
        if name == "05_evaluate":
            _notebook_05_views_and_tables(page, artifacts)
        else:  # the sampler form starts at configs/demo.yaml's own fg 0.33, not a slider step's 0.35
            readout = page.locator(".widget-slider", has_text="fg_fraction").locator(".widget-readout").first
            assert readout.text_content().strip() == "0.33", readout.text_content()
        snapshot.scroll_into_view_if_needed()
        page.screenshot(path=str(shot))
        print(shot)
    from conftest_gui import assert_rendered

    assert_rendered(shot)


def _notebook_05_views_and_tables(page, artifacts: Path) -> None:
    """After Run All: the errors snapshot still shows the errors' colours (not the repair's), each
    view has its legend, and no table runs off the right of the notebook."""
    import numpy as np
    from PIL import Image

    from conftest_gui import assert_rendered

    errors = page.locator("img.widget-image").first
    errors.scroll_into_view_if_needed()
    shot = artifacts / "05_evaluate-browser-errors.png"
    errors.screenshot(path=str(shot))
    print(shot)
    rgb = assert_rendered(shot, min_std=5.0, min_colours=3).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    red, cyan = (r > 150) & (g < 80) & (b < 80), (r < 110) & (g > 150) & (b > 150)
    lime = (r < 100) & (g > 180) & (b < 100)  # the repair's "added", drawn over the errors before
    assert (red | cyan).mean() > 0.001 and not lime.any(), (red.mean(), cyan.mean(), lime.mean())
    for words in ("false positive", "false negative", "added by the repair"):
        assert page.get_by_text(words, exact=True).count() == 1, words  # the legend, not the prose
    page.locator(".jp-Notebook").first.evaluate("e => e.scrollTop = 0")
    widths = page.locator(".jp-OutputArea-output table").evaluate_all(
        "ts => ts.map(t => [t.scrollWidth, t.getBoundingClientRect().right,"
        " t.closest('.jp-Notebook').getBoundingClientRect().right])")
    # the notebook's three score tables and the tuner's (out-of-sample first, then in-sample)
    assert len(widths) == 4 and all(right <= edge for _, right, edge in widths), widths
    tables = artifacts / "05_evaluate-browser-tables.png"
    page.locator(".jp-OutputArea-output table").last.scroll_into_view_if_needed()
    page.screenshot(path=str(tables))
    print(tables)
    assert Image.open(tables).size[0] > 0 and np.asarray(Image.open(tables)).std() > 5


@pytest.mark.browser
@pytest.mark.slow
def test_notebook_03_plans_the_config_own_epoch_by_default(tiny_root, tmp_path, artifacts):
    """No target given: the epoch planned is the config's own, so a config that trains in minutes
    is planned in minutes (the shipped demo config takes over 10 minutes to measure on a shared
    2-core machine, so a tiny config of the same shape stands in for it here)."""
    require(CHROMIUM.exists(), "chromium")
    from vesuvius_lab.config import load_config

    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=30, epochs=3)
    shot = artifacts / "03_plan_epoch-browser-defaults.png"
    parameters = {"config_path": str(config), "out_path": str(tmp_path / "planned.yaml"),
                  "runs_dir": str(tmp_path / "runs"), "batch_sizes": [1, 2], "warmup": 1, "steps": 2,
                  "measure_now": True}
    with jupyterlab(tmp_path, REPO / "notebooks" / "03_plan_epoch.ipynb", parameters,
                    artifacts / "03_plan_epoch-browser-failure.png") as page:
        _all_cells_ran(page, timeout_s=600)
        head = page.locator(".widget-html", has_text=re.compile(r"steps/epoch × \d+ epochs")).first
        head.wait_for(timeout=60_000)
        text = head.inner_text()
        field = page.locator(".widget-text", has_text="epoch (min)")
        target = float(field.locator("input").input_value())
        assert 0 < target < 5, target  # the config's own epoch (30 steps), not the CLI's 60 minutes
        assert float(re.search(r"run ≈ ([\d.]+) h", text).group(1)) < 1.0, text
        assert re.search(r"× 3 epochs", text) and (tmp_path / "planned.yaml").exists()
        epoch = re.search(r"epoch ≈ (\d+:\d\d) \(target \d+:\d\d\)", text).group(1)  # one figure, one way
        plan_text = page.locator(".widget-html", has_text="Forecast:").first.inner_text()
        assert f"Forecast: {epoch} per epoch" in plan_text and f"{epoch} per epoch, the final" in plan_text
        assert "the step time this plan uses" in plan_text
        assert page.get_by_text(re.compile(r"saved the plan to .*plan\.json")).count() >= 1
        assert (tmp_path / "runs" / config.stem / "plan.json").is_file()
        assert load_config(tmp_path / "planned.yaml").training.max_epochs == 3
        field.evaluate("e => e.scrollIntoView({block: 'start'})")  # the form, its timings and the plan
        page.screenshot(path=str(shot))
        print(shot)
    from conftest_gui import assert_rendered

    assert_rendered(shot, min_std=10.0)


@pytest.mark.browser
@pytest.mark.slow
def test_notebook_04_in_jupyterlab(tiny_root, tmp_path, artifacts):
    require(CHROMIUM.exists(), "chromium")
    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=400)
    run_dir = tmp_path / "runs" / "web"
    shot, failed = artifacts / "04_train_live-browser.png", artifacts / "04_train_live-browser-failed-launch.png"
    try:
        with jupyterlab(tmp_path, NOTEBOOK, {"config_path": str(config), "runs_dir": str(tmp_path / "runs"),
                                             "run_name": "web", "refresh_s": 0.5},
                        artifacts / "04_train_live-browser-failure.png") as page:
            _failed_launch(page, failed)
            _drive(page, run_dir, shot)
    finally:
        kill_run(run_dir)
    from conftest_gui import assert_rendered

    assert_rendered(shot)
    assert_rendered(failed, min_std=10.0)


@pytest.mark.browser
@pytest.mark.slow
def test_notebook_04_reopened_after_a_kernel_restart_shows_its_widgets(tiny_root, tmp_path, artifacts):
    """Run All, save, restart the kernel (its widget models are gone), reopen: the saved widget
    state (jupyterlab-overrides.json: saveState) shows the form, never "model not found", under a
    note (hidden while the form is live) saying to run the cell."""
    require(CHROMIUM.exists(), "chromium")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=400)
    shot = artifacts / "04_train_live-browser-reopened.png"
    with jupyterlab(tmp_path, NOTEBOOK, {"config_path": str(config), "runs_dir": str(tmp_path / "runs"),
                                         "run_name": "reopen", "refresh_s": 0.5},
                    artifacts / "04_train_live-browser-reopen-failure.png") as page:
        _all_cells_ran(page)
        notes = page.locator(".vlab-reconnect")
        assert notes.count() >= 2 and not any(notes.nth(i).is_visible() for i in range(notes.count()))  # live
        page.locator(".jp-Notebook").first.click()
        page.keyboard.press("Control+s")
        page.get_by_text("Saving completed").first.wait_for(timeout=30_000)
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Kernel$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Restart Kernel")).first.click()
        page.locator(".jp-Dialog button", has_text=re.compile(r"^\s*Restart\s*$")).click()
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(
            state="attached", timeout=60_000)
        page.reload()  # the tab reopened: a fresh widget manager, a kernel without the models
        page.locator(".jp-Notebook").first.wait_for(timeout=60_000)
        select = page.locator(".jp-Dialog button", has_text=re.compile(r"^\s*Select\s*$"))
        try:
            select.wait_for(timeout=10_000)
            select.click()
        except PlaywrightTimeout:
            pass
        form = page.locator(".jp-CodeCell", has_text="monitor.widget").first  # the cell that shows the form
        form.scroll_into_view_if_needed()
        form.locator(".jp-OutputArea-output").first.wait_for(timeout=60_000)
        page.wait_for_timeout(5000)  # the widget manager restores what it can
        form.scroll_into_view_if_needed()
        assert page.get_by_text("Error displaying widget").count() == 0
        form.locator("button.jupyter-button", has_text=re.compile(r"^\s*Start\s*$")).wait_for(timeout=10_000)
        note = form.locator(".vlab-reconnect", has_text=RECONNECT_TEXT)  # a saved copy says so
        note.wait_for(state="visible", timeout=10_000)
        page.screenshot(path=str(shot))
        print(shot)
    from conftest_gui import assert_rendered

    assert_rendered(shot, min_std=10.0)


def _failed_launch(page, shot: Path) -> None:
    """A mistyped override: the CLI refuses it; the widget shows that line in red, Start stays usable."""
    start = page.locator("button.jupyter-button", has_text=re.compile(r"^\s*Start\s*$"))
    start.wait_for(timeout=60_000)
    overrides = page.locator(".widget-text", has_text="overrides").locator("input")
    overrides.fill("training.max_epoch=3")
    overrides.press("Enter")
    start.click()
    error = page.locator("span", has_text="unknown key training.max_epoch (did you mean training.max_epochs?)")
    error.first.wait_for(timeout=120_000)
    assert error.first.evaluate("e => getComputedStyle(e).color") == "rgb(204, 0, 0)"  # red
    page.get_by_text(re.compile(r"failed to start")).first.wait_for(timeout=10_000)
    assert start.is_enabled()
    page.screenshot(path=str(shot))
    print(shot)
    overrides.fill("")
    overrides.press("Enter")


def _drive(page, run_dir: Path, shot: Path) -> None:
    start = page.locator("button.jupyter-button", has_text=re.compile(r"^\s*Start\s*$"))
    start.wait_for(timeout=60_000)
    plot = page.locator("img.widget-image").first
    plot.wait_for(timeout=30_000)
    before = plot.get_attribute("src")
    # the config Start starts, said above the buttons, and the budget field (the config's own: none)
    page.get_by_text(re.compile(r"^Start starts .*tiny_run\.yaml")).first.wait_for(timeout=10_000)
    budget = page.locator(".widget-text", has_text="budget (h)").locator("input")
    assert float(budget.input_value()) == 0.0
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
    page.get_by_text(re.compile(r"^started config .*tiny_run\.yaml")).first.wait_for(timeout=10_000)
    page.locator("button.jupyter-button", has_text=re.compile(r"^\s*Stop\s*$")).click()
    page.get_by_text(re.compile(r"^stopped$")).first.wait_for(timeout=90_000)
    assert runs.read_status(run_dir)["state"] == "stopped"


def kill_run(run_dir: Path) -> None:
    """Stop the run a test started from the notebook (its process group, from launch.json), if any."""
    try:
        _kill_group(json.loads((run_dir / RunDir.LAUNCH).read_text())["pgid"])
    except (OSError, ValueError, KeyError):
        pass


@pytest.mark.slow
def test_a_notebook_saved_in_the_lab_gets_its_twin_in_py(tmp_path):
    """`make lab` as shipped (the server's root is notebooks/): a notebook saved through the server,
    as JupyterLab saves it, is paired into py/ by the notebooks' jupytext.toml (a hidden
    .jupytext.toml is ignored by the server: "Ignoring config file ... Jupytext issue #964")."""
    root = tmp_path / "notebooks"
    root.mkdir()
    for name in (p.name for p in (REPO / "notebooks").iterdir() if p.is_file() and not p.suffix == ".ipynb"):
        shutil.copy(REPO / "notebooks" / name, root)  # the folder's own config files, whatever they are
    port = _free_port()
    log = open(tmp_path / "jupyter.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--ServerApp.token={TOKEN}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0", "--allow-root"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config")},
    )
    try:
        _wait_for_server(f"http://127.0.0.1:{port}/api/status?token={TOKEN}", server)
        model = {"type": "notebook", "format": "json",
                 "content": nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")],
                                                     metadata={"kernelspec": {"name": "python3", "language": "python",
                                                                              "display_name": "Python 3"}})}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/contents/07_new.ipynb?token={TOKEN}",
                                         data=json.dumps(model).encode(), method="PUT",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert reply.status in (200, 201)
    finally:
        _stop_server(server, log)
    text = (tmp_path / "jupyter.log").read_text(errors="replace")
    assert "Ignoring config file" not in text, text[-2000:]
    twin = root / "py" / "07_new.py"
    assert twin.is_file() and not (root / "07_new.py").exists(), sorted(p.name for p in root.rglob("*"))
    assert twin.read_text().endswith("# %%\nx = 1\n")


def _stop_server(server: subprocess.Popen, log) -> None:
    _kill_group(server.pid)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:  # the server waits on its kernels; the group goes at once
        _kill_group(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
    log.close()


@pytest.mark.browser
@pytest.mark.slow
def test_notebook_07_launches_a_sweep_and_its_table_follows(tiny_root, tmp_path, artifacts):
    """Run All (nothing launched), then the Launch button: the worker runs in the background, the
    kernel stays free, and the table follows the study to its end."""
    require(CHROMIUM.exists(), "chromium")
    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=2)
    (tmp_path / "space.yaml").write_text("optim.lr: [0.01, 0.02]\n")
    parameters = {"config_path": str(config), "space_path": str(tmp_path / "space.yaml"),
                  "runs_dir": str(tmp_path / "runs"), "trials": 2, "trial_budget": "", "refresh_s": 0.5,
                  "evaluate_dir": str(tmp_path / "evaluations"), "apply_out": str(tmp_path / "best.yaml")}
    shot = artifacts / "07_sweep-browser.png"
    with jupyterlab(tmp_path, REPO / "notebooks" / "07_sweep.ipynb", parameters,
                    artifacts / "07_sweep-browser-failure.png") as page:
        _all_cells_ran(page, timeout_s=300)
        page.get_by_text("no study space in").first.wait_for(timeout=30_000)
        page.locator(".widget-button", has_text=re.compile(r"^\s*Launch\s*$")).click()
        page.get_by_text(re.compile(r"idle · 2 trials: 2 complete")).first.wait_for(timeout=300_000)
        assert page.locator("table", has_text="optim.lr=0.01").count() == 1
        page.locator(".widget-button", has_text="Apply best").click()
        page.get_by_text(re.compile(r"^wrote .*best\.yaml: optim\.lr=")).first.wait_for(timeout=30_000)
        outputs = _saved_outputs(page, tmp_path / "lab" / "07_sweep.ipynb")
        assert not [o for o in outputs if o.output_type == "error" or o.get("name") == "stderr"], outputs
        assert not _kernel_died(page)
        page.locator("table", has_text="optim.lr=0.01").first.scroll_into_view_if_needed()
        page.screenshot(path=str(shot))
        print(shot)
    from conftest_gui import assert_rendered

    assert_rendered(shot, min_std=5.0)
