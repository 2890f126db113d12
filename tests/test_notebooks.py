"""Notebooks: paired with py:percent twins, stored without outputs, and run top to bottom small."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import numpy as np
import papermill
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from conftest_gui import assert_rendered, run_notebook
from lab_runs_helpers import write_tiny_config
from vesuvius_lab.io import read_volume
from vesuvius_lab.manifest import load_manifest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
TWIN_DIR = NOTEBOOK_DIR / "py"  # the py:percent twins, kept out of the notebooks' file browser (jupytext.toml)
FORMATS = "ipynb,py//py:percent"
# Small parameters per notebook, on top of the tiny manifest, cache, screenshot folder and close_viewer.
SMALL = {
    "01_inspect_volumes": {},
    "02_preview_patches": {"patch_size": [24, 24, 24], "n_patches": 6, "montage_samples": 2},
    "03_plan_epoch": {"batch_sizes": [1, 2], "warmup": 1, "steps": 2, "target_epoch_minutes": 0.5,
                      "measure_now": True},
    # a tiny run (config written by the test), started, followed for a few steps, then stopped
    "04_train_live": {"run_name": "nb", "start": True, "wait_steps": 3, "stop_at_end": True, "refresh_s": 0.5},
    # two volumes: the tuning's leave-one-out has one to choose on for each held out
    "05_evaluate": {"max_volumes": 2, "overrides": ["val.overlap=0.0"], "tune_grid": {"threshold": [0.3, 0.5]}},
    "06_compare_runs": {},  # two finished tiny runs (the finished_runs fixture)
    # a tiny study of two trials, launched in the background and waited for; the best applied
    "07_sweep": {"trials": 2, "trial_budget": "", "launch": True, "wait": True, "apply_best": True, "refresh_s": 0.5},
}
# The screenshots each notebook saves (suffixes of tests/artifacts/<notebook>-<suffix>.png).
SHOTS = {"03_plan_epoch": ["timings"], "04_train_live": ["plot"], "06_compare_runs": ["curves"], "07_sweep": ["history"]}
NAPARI_SHOTS = ["2d", "3d"]


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source) for c in nb.cells]


def _tags(cell) -> list[str]:
    return cell.metadata.get("tags", [])


def test_every_notebook_has_a_twin_and_small_parameters():
    assert {p.stem for p in NOTEBOOKS} >= {"01_inspect_volumes", "02_preview_patches"}
    assert {p.stem for p in TWIN_DIR.glob("*.py")} == {p.stem for p in NOTEBOOKS}
    assert not list(NOTEBOOK_DIR.glob("*.py")), "twins go to notebooks/py/, beside nothing in the file browser"
    assert set(SMALL) == {p.stem for p in NOTEBOOKS}, "each notebook needs small parameters to run in the tests"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_paired_clean_and_parameterised(path):
    nb, twin = nbformat.read(path, as_version=4), jupytext.read(TWIN_DIR / f"{path.stem}.py")
    for doc in (nb, twin):
        assert doc.metadata["jupytext"]["formats"] == FORMATS
    assert _cells(nb) == _cells(twin), f"{path.name} and its twin differ: run jupytext --sync notebooks/py/{path.stem}.py"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{path.name} has outputs"
    assert [i for i, c in enumerate(code) if "parameters" in _tags(c)] == [0]
    assigned = [t.id for node in ast.parse(code[0].source).body for t in getattr(node, "targets", [])]
    inferred = list(papermill.inspect_notebook(str(path)))  # papermill's own reading of that cell
    assert inferred == assigned, f"{path.name}: papermill reads {inferred} of {assigned} (one '=' a line)"
    sources = [c.source for c in code]
    viewer_cells = [i for i, s in enumerate(sources) if "napari.Viewer(" in s]
    if viewer_cells:  # the Qt event loop, in a cell of its own, before any viewer; closed when asked
        qt = [i for i, s in enumerate(sources) if "start_qt()" in s]
        assert qt and qt[0] < viewer_cells[0] and "%gui qt" not in "".join(sources)
        assert "close_viewer" in sources[0] and "viewer.close()" in sources[-1]


@pytest.mark.gui
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_a_tiny_dataset(path, x_display, tiny_root, tiny_manifest, artifacts, tmp_path, request):
    parameters = {
        "manifest_path": str(tiny_manifest),
        "cache_dir": str(tmp_path / "cache"),
        "close_viewer": True,
        "screenshot_dir": str(artifacts),
        **SMALL[path.stem],
    }
    manifest = load_manifest(tiny_manifest)
    first = manifest.records[0]
    if path.stem == "01_inspect_volumes":  # a probability map of the first record, to overlay
        surface = read_volume(manifest.resolve(first).label) == 1
        np.save(tmp_path / "prediction.npy", np.where(surface, 0.9, 0.05).astype(np.float32))
        parameters["prediction_path"] = str(tmp_path / "prediction.npy")
    if path.stem == "03_plan_epoch":
        parameters["config_path"] = str(write_tiny_config(tiny_root, tmp_path / "cfg"))
        parameters["out_path"] = str(tmp_path / "planned.yaml")
        parameters["runs_dir"] = str(tmp_path / "runs")  # Measure saves the plan there, never in the repo's runs/
    if path.stem == "05_evaluate":  # a checkpoint trained a few steps
        run = tmp_path / "run"
        subprocess.run([sys.executable, "-m", "vesuvius_lab", "train", "--config",
                        str(write_tiny_config(tiny_root, tmp_path / "cfg", steps=4)), "--run-dir", str(run),
                        "--no-progress"], check=True, capture_output=True, timeout=300)
        parameters["checkpoint_path"] = str(run / "checkpoints" / "last.pt")
    if path.stem == "04_train_live":
        parameters["config_path"] = str(write_tiny_config(tiny_root, tmp_path / "cfg", steps=200))
        parameters["runs_dir"] = str(tmp_path / "runs")
    if path.stem == "06_compare_runs":
        parameters["runs_dir"] = str(request.getfixturevalue("finished_runs"))
        parameters["evaluate_dir"] = str(tmp_path / "evaluations")
    if path.stem == "07_sweep":
        parameters["config_path"] = str(write_tiny_config(tiny_root, tmp_path / "cfg", steps=2))
        (tmp_path / "space.yaml").write_text("optim.lr: [0.01, 0.02]\n")
        parameters.update(space_path=str(tmp_path / "space.yaml"), runs_dir=str(tmp_path / "runs"),
                          evaluate_dir=str(tmp_path / "evaluations"), apply_out=str(tmp_path / "best.yaml"))
    nb = run_notebook(path, parameters, timeout=180)
    nbformat.write(nb, artifacts / path.name)  # the executed notebook, to look at
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for suffix in SHOTS.get(path.stem, NAPARI_SHOTS):
        shot = artifacts / f"{path.stem}-{suffix}.png"
        assert str(shot) in printed
        assert_rendered(shot)
    napari_cells = [c for c in nb.cells if c.cell_type == "code" and "napari.Viewer(" in c.source]
    red = [o.text for c in napari_cells for o in c.outputs if o.get("name") == "stderr"]
    assert not red, f"a napari cell printed warnings (PyQt5, Qt6 theme, XDG_RUNTIME_DIR): {red}"
    shown = _widget_texts(nb)
    if path.stem == "05_evaluate":
        tables = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
                  if "text/html" in o.get("data", {})]
        assert any("surface_dice" in t and "mean" in t for t in tables)
        tuning = [t for t in tables if "out-of-sample (leave-one-out)" in t]
        assert len(tuning) == 1 and "in-sample best" in tuning[0] and tuning[0].count("held out ") == 2
        assert tuning[0].index("out-of-sample") < tuning[0].index("in-sample best")
        return
    if path.stem == "03_plan_epoch":
        assert str(tmp_path / "planned.yaml") in printed and (tmp_path / "planned.yaml").exists()
        assert any("steps/epoch" in t for t in shown) and any("<th>samples/s</th>" in t and t.count("<tr>") == 3 for t in shown)
        return
    if path.stem == "06_compare_runs":
        html = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
                if "text/html" in o.get("data", {})]
        assert "05_evaluate-a.ipynb" in html[0] and "05_evaluate-b.ipynb" in html[0] and "finished" in html[0]
        assert "loss.cldice" in html[1] and "optim.lr" in html[1]
        assert sorted(p.name for p in (tmp_path / "evaluations").iterdir()) == ["05_evaluate-a.ipynb", "05_evaluate-b.ipynb"]
        return
    if path.stem == "07_sweep":
        table = [t for t in shown if "<th>trial</th>" in t]
        assert table and table[-1].startswith("<b>idle</b> · 2 trials: 2 complete"), table
        assert any(t.startswith(f"wrote {tmp_path / 'best.yaml'}: optim.lr=") for t in shown)
        assert (tmp_path / "best.yaml").is_file() and len(list((tmp_path / "evaluations").iterdir())) == 1
        assert any("evaluate its best.pt in notebook 05" in t for t in shown)
        return
    if path.stem == "04_train_live":
        status = json.loads((tmp_path / "runs" / "nb" / "status.json").read_text())
        assert status["state"] == "stopped" and 3 <= status["step"] < 200, status
        assert "stopped\n" in printed and any("steps logged in" in line for line in printed.splitlines())
        assert any(t.startswith("<b>stopped</b> · step ") for t in shown)
        assert any(t.startswith("no live prediction in ") for t in shown)  # the live panel, before a validation
        return
    assert any(t.startswith(f"<b>{first.id}</b>: scroll {first.scroll_id}") for t in shown)  # the record summary
    if path.stem == "02_preview_patches":
        assert any(t.startswith(f"6 patches of {first.id}") for t in shown)


def _widget_texts(nb) -> list[str]:
    """String values of the widgets as the executed notebook saved them."""
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    return [m["state"]["value"] for m in state.values() if isinstance(m["state"].get("value"), str)]


def _nbconvert(notebook: Path, cwd: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """A standard runner, as researchers use it: `jupyter nbconvert --to notebook --execute`."""
    jupyter = Path(sys.executable).with_name("jupyter")
    return subprocess.run([str(jupyter), "nbconvert", "--to", "notebook", "--execute", str(notebook), "--output",
                           str(out), "--ExecutePreprocessor.timeout=600", *extra], cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def _papermill(notebook: Path, cwd: Path, out: Path) -> subprocess.CompletedProcess:
    """The other standard runner, for parameterised notebooks: `papermill IN OUT` (no -p: the defaults)."""
    papermill = Path(sys.executable).with_name("papermill")
    return subprocess.run([str(papermill), str(notebook), str(out), "--cwd", str(cwd), "--no-progress-bar",
                           "--execution-timeout", "600"], cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.mark.gui
@pytest.mark.slow
@pytest.mark.parametrize("runner", [_nbconvert, _papermill], ids=["nbconvert", "papermill"])
@pytest.mark.parametrize("name", ["01_inspect_volumes", "02_preview_patches", "03_plan_epoch", "04_train_live",
                                  "06_compare_runs", "07_sweep"])
def test_notebook_runs_with_its_own_defaults(name, runner, x_display, tmp_path):
    """From notebooks/, as shipped: the demo data is prepared where it is missing, nothing is injected."""
    out = tmp_path / f"{name}.ipynb"
    done = runner(NOTEBOOK_DIR / f"{name}.ipynb", NOTEBOOK_DIR, out)
    assert done.returncode == 0, done.stderr[-3000:]
    nb = nbformat.read(out, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors and all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")


@pytest.mark.gui
@pytest.mark.slow
def test_notebook_05_without_a_checkpoint_says_what_to_do(x_display, tmp_path):
    folder = tmp_path / "notebooks"  # a checkout where no run has been trained yet
    folder.mkdir()
    shutil.copy(NOTEBOOK_DIR / "05_evaluate.ipynb", folder)
    out = tmp_path / "out.ipynb"
    done = _nbconvert(folder / "05_evaluate.ipynb", folder, out, "--allow-errors")
    assert done.returncode == 0, done.stderr[-3000:]
    first = [c for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code"][1]  # after the parameters
    assert [o.output_type for o in first.outputs] == ["stream"], first.outputs  # no traceback
    assert first.outputs[0].text == ("error: ../runs/demo/checkpoints/best.pt: no checkpoint here yet: train a run in "
                                     "notebook 04 first (run name 'demo' writes runs/demo/checkpoints/best.pt), "
                                     "or set checkpoint_path\n")


def test_a_cell_that_awaits_is_not_starved_by_the_qt_loop(x_display, tmp_path):
    """After ``start_qt``, asyncio work of a cell (here a top-level await) still runs: ipykernel's
    Qt loop alone would hold the thread until the next shell message, which never comes."""
    nb = new_notebook(cells=[
        new_code_cell("from vesuvius_lab.lab.qt import start_qt\nstart_qt()"),
        new_code_cell("import asyncio\nfor _ in range(5):\n    await asyncio.sleep(0.1)\nawaited = 5"),
        new_code_cell("awaited"),
    ])
    path = tmp_path / "awaits.ipynb"
    nbformat.write(nb, path)
    done = run_notebook(path, timeout=60)
    assert done.cells[2].outputs[0]["data"]["text/plain"] == "5"


def test_a_new_notebook_gets_its_twin_in_py_and_jupyterlab_has_no_news_pop_up(tmp_path):
    """The file browser lists each notebook once: jupytext.toml pairs a new one into py/ as well.
    JupyterLab reads the workbench's overrides (installed by `make install`): no news pop-up."""
    shutil.copy(NOTEBOOK_DIR / "jupytext.toml", tmp_path)
    nbformat.write(new_notebook(cells=[new_code_cell("x = 1")]), tmp_path / "06_new.ipynb")
    jupytext_cli = Path(sys.executable).with_name("jupytext")
    done = subprocess.run([str(jupytext_cli), "--sync", str(tmp_path / "06_new.ipynb")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "py" / "06_new.py").is_file() and not (tmp_path / "06_new.py").exists()

    ours = json.loads((NOTEBOOK_DIR.parent / "jupyterlab-overrides.json").read_text())
    installed = Path(sys.prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.d" / "vesuvius-lab.json"
    assert installed.is_file(), "make install puts jupyterlab-overrides.json there"
    assert json.loads(installed.read_text()) == ours
    share = Path(sys.prefix) / "share" / "jupyter"
    for plugin, settings in ours.items():  # real settings of this JupyterLab and its extensions, with allowed values
        package, name = plugin.split(":")
        found = [p for p in (share / "lab" / "schemas" / package / f"{name}.json",
                             share / "labextensions" / package / "schemas" / package / f"{name}.json") if p.is_file()]
        assert found, f"{plugin}: no such settings schema in this environment"
        schema = json.loads(found[0].read_text())["properties"]
        for key, value in settings.items():
            allowed = [o["const"] for o in schema[key].get("oneOf", [])] or [value]
            assert value in allowed, (plugin, key, value)
    assert ours["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"
    assert ours["@jupyter-widgets/jupyterlab-manager:plugin"]["saveState"] is True  # a reopened notebook shows its widgets
