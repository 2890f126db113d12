"""Notebook 04's live prediction panel in a real JupyterLab through headless Chromium: Run All,
press Start, and see the panel change from one validation to the next, scores shown."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import require
from lab_runs_helpers import write_tiny_config
from test_browser import CHROMIUM, NOTEBOOK, jupyterlab, kill_run
from vesuvius_lab.lab import runs

EPOCH = re.compile(r"epoch (\d+) · step (\d+) · score (\d\.\d{4}) · topo \d\.\d{4} · surface Dice \d\.\d{4} · VOI \d\.\d{4}")


@pytest.mark.browser
@pytest.mark.slow
def test_live_panel_changes_between_two_validations_in_jupyterlab(tiny_root, tmp_path, artifacts):
    require(CHROMIUM.exists(), "chromium")
    from PIL import Image

    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=3, epochs=60)
    run_dir = tmp_path / "runs" / "live"
    shots: list[tuple[tuple[str, ...], np.ndarray]] = []
    try:
        with jupyterlab(tmp_path, NOTEBOOK, {"config_path": str(config), "runs_dir": str(tmp_path / "runs"),
                                             "run_name": "live", "refresh_s": 0.5},
                        artifacts / "04_train_live-panel-failure.png") as page:
            panel = page.locator(".vlab-live-panel")
            panel.get_by_text("no live prediction").wait_for(timeout=90_000)  # the panel, before any validation
            page.locator("button.jupyter-button", has_text=re.compile(r"^\s*Start\s*$")).click()
            for n in range(2):
                shots.append(_shot(page, panel, artifacts / f"04_train_live-panel-{n}.png", shots, Image))
            assert panel.locator(".widget-readout").all_inner_texts()[-3:] == ["24", "24", "24"]  # z, y, x: centre
            page.locator("button.jupyter-button", has_text=re.compile(r"^\s*Stop\s*$")).click()
            page.get_by_text(re.compile(r"^stopped$")).first.wait_for(timeout=90_000)
    finally:
        kill_run(run_dir)
    (first, one), (second, two) = shots
    assert first[:2] != second[:2] and one.shape == two.shape and not np.array_equal(one, two)
    assert runs.read_status(run_dir)["state"] == "stopped"


def _shot(page, panel, path: Path, earlier: list, Image) -> tuple[tuple[str, ...], np.ndarray]:
    """Wait for a validation not shown before; screenshot the panel while its score line stays."""
    seen = {s[0][:2] for s in earlier}
    page.wait_for_function(
        """([seen]) => { const el = document.querySelector('.vlab-live-panel');
             const m = el && el.innerText.match(/epoch (\\d+) · step (\\d+) · score/);
             return m && !seen.includes(m[1] + ':' + m[2]) && el.querySelector('img').naturalWidth > 0; }""",
        arg=[[f"{e}:{s}" for e, s in seen]], timeout=180_000)
    while True:
        before = EPOCH.search(panel.inner_text())
        png = panel.screenshot(path=str(path))
        after = EPOCH.search(panel.inner_text())
        if before and after and before.groups() == after.groups():
            print(path, before.group(0))
            return before.groups(), np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
