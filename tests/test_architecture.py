"""One way through the code: configs written anywhere reach the same files, the planner and the
trainer share one epoch arithmetic, and each shared thing has one definition."""

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vesuvius_lab.config import load_config, save_config
from vesuvius_lab.manifest import build_manifest
from vesuvius_lab.training import train

PACKAGE = Path(__file__).resolve().parent.parent / "vesuvius_lab"
TINY = {
    "model": {"features": [4, 8, 16], "deep_supervision_heads": 2},
    "loss": {"cldice": 0.3, "skeleton_recall": 0.3, "surface": 0.1},
    "optim": {"lr": 0.01, "warmup_steps": 1},
    "val": {"max_volumes": 1, "overlap": 0.0, "batch": 8},
    "training": {"train_batch_size": 1, "train_iterations_per_epoch": 3, "max_epochs": 1, "workers": 0,
                 "persistent_workers": False, "checkpoint_every_steps": 0, "val_every_epochs": 1, "seed": 2},
}


def relative_config(tiny_root: Path, project: Path, **sections) -> Path:
    """A project as a researcher lays it out: manifests/ and experiments/ side by side, the config
    naming its manifest relative to its own folder (which is not called configs/)."""
    manifest = project / "manifests" / "tiny.yaml"
    if not manifest.exists():
        build_manifest(tiny_root, progress=False).save(manifest)
    doc = {"data": {"manifest": "../manifests/tiny.yaml", "patch_size": [16, 16, 16]}, **TINY}
    for name, values in sections.items():
        doc[name] = {**doc.get(name, {}), **values}
    path = project / "experiments" / "tiny.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def vlab(*args, cwd: Path, torchrun: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """The CLI in its own process group. Past ``timeout`` every process in the group gets SIGABRT,
    and Python's fault handler prints each one's threads: a hang fails with where it hung."""
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    command = [*head, "-m", "vesuvius_lab", *map(str, args)]
    with subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = [proc.pid, *descendants(proc.pid)]
            for pid in reversed(tree):  # the ranks first: torchrun starts them in sessions of their own
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGABRT)
            try:
                out, err = proc.communicate(timeout=60)
            finally:
                for pid in tree:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            pytest.fail(f"{shlex.join(command)} hung for {timeout} s; its processes' stacks:\n{err[-20000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def descendants(pid: int) -> list[int]:
    """The processes started by ``pid``, children before their own children (from /proc)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, ppid in parent.items() if ppid in frontier]
        found += frontier
    return found


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_planned_config_written_outside_the_repo_trains(tiny_root, tmp_path):
    """The issue's recipe: plan --apply into another folder, then train from a third folder."""
    config = relative_config(tiny_root, tmp_path / "project")
    planned = tmp_path / "elsewhere" / "out" / "planned.yaml"
    done = vlab("plan", "--config", config, "--target-epoch-minutes", 0.1, "--batch-sizes", "1", "--steps", 2,
                "--warmup", 1, "--apply", planned, "--plan-file", tmp_path / "plan.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    written = yaml.safe_load(planned.read_text())["data"]["manifest"]
    assert not Path(written).is_absolute()  # rebased, still relative: the pair can move together
    assert (planned.parent / written).resolve() == (tmp_path / "project" / "manifests" / "tiny.yaml").resolve()
    plan = json.loads((tmp_path / "plan.json").read_text())
    (tmp_path / "cwd").mkdir()
    run = tmp_path / "run"
    done = vlab("train", "--config", planned, "--run-dir", run, "--no-progress", "training.max_epochs=1",
                "val.max_volumes=1", cwd=tmp_path / "cwd")
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [r for r in metrics(run) if r["kind"] == "train"]
    assert len(steps) == plan["train_iterations_per_epoch"]
    # the run's own config.yaml and the checkpoint's copy reach the same manifest, from anywhere
    assert load_config(run / "config.yaml").path(load_config(run / "config.yaml").data.manifest, "m") == \
        (tmp_path / "project" / "manifests" / "tiny.yaml").resolve()
    stored = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["config"]["data"]["manifest"]
    assert Path(stored) == (tmp_path / "project" / "manifests" / "tiny.yaml").resolve()


def test_save_config_rebases_relative_paths_and_keeps_env_paths(tiny_root, tmp_path):
    config = relative_config(tiny_root, tmp_path / "project", data={"cache_dir": "${VLAB_CACHE_DIR}/x"})
    loaded = load_config(config)
    target = tmp_path / "deep" / "er" / "copy.yaml"
    save_config(loaded, target)
    doc = yaml.safe_load(target.read_text())
    assert doc["data"]["manifest"] == "../../project/manifests/tiny.yaml"
    assert doc["data"]["cache_dir"] == "${VLAB_CACHE_DIR}/x"  # environment paths stay as written
    again = load_config(target)
    assert again.path(again.data.manifest, "m") == loaded.path(loaded.data.manifest, "m")


@pytest.mark.slow
@pytest.mark.gui
def test_predict_and_notebook_05_on_a_checkpoint_made_elsewhere(tiny_root, tmp_path, x_display):
    """Notebook 05 with its own defaults (the checkpoint's manifest, the default cache), from
    notebooks/, on a checkpoint trained in another folder and then copied away."""
    from conftest_gui import run_notebook

    config = relative_config(tiny_root, tmp_path / "project")
    run = tmp_path / "project" / "runs" / "tiny"
    done = vlab("train", "--config", config, "--run-dir", run, "--no-progress", cwd=tmp_path / "project")
    assert done.returncode == 0, done.stderr[-2000:]
    moved = tmp_path / "shared" / "model.pt"
    moved.parent.mkdir()
    shutil.copy(run / "checkpoints" / "last.pt", moved)

    out = tmp_path / "pred"
    done = vlab("predict", "--checkpoint", moved, "--input", tiny_root / "test_images", "--output", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.tif")) == sorted(p.name for p in (tiny_root / "test_images").glob("*.tif"))

    notebook = PACKAGE.parent / "notebooks" / "05_evaluate.ipynb"
    nb = run_notebook(notebook, {"checkpoint_path": str(moved), "max_volumes": 1, "close_viewer": True}, timeout=300)
    tables = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "text/html" in o.get("data", {})]
    assert any("surface_dice" in t and "mean" in t for t in tables)


@pytest.mark.slow
def test_plan_under_torchrun_is_the_epoch_the_trainer_runs(tiny_root, tmp_path):
    """Two ranks and two accumulated micro-batches: the plan's steps and global batch are the trainer's."""
    config = relative_config(tiny_root, tmp_path / "project", optim={"accumulate": 2})
    planned, plan_file = tmp_path / "planned.yaml", tmp_path / "plan.json"
    done = vlab("plan", "--config", config, "--target-epoch-minutes", 0.15, "--batch-sizes", "1,2", "--steps", 2,
                "--warmup", 1, "--apply", planned, "--plan-file", plan_file, cwd=tmp_path, torchrun=2, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads(plan_file.read_text())
    assert plan["measurements"]["world_size"] == 2
    assert plan["global_batch"] == plan["train_batch_size"] * 2 * 2
    assert plan["samples_per_epoch"] == plan["global_batch"] * plan["train_iterations_per_epoch"]
    run = tmp_path / "run"
    done = vlab("train", "--config", planned, "--run-dir", run, "--no-progress", "training.max_epochs=1",
                cwd=tmp_path, torchrun=2, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r for r in metrics(run) if r["kind"] == "train"]
    status = json.loads((run / "status.json").read_text())
    assert len(steps) == status["total_steps"] == plan["train_iterations_per_epoch"]
    assert {r["global_batch"] for r in steps} == {plan["global_batch"]}


def test_accumulation_counts_optimizer_steps(tiny_root, tmp_path):
    """``train_iterations_per_epoch`` counts optimizer steps; accumulation makes each one larger."""
    config = load_config(relative_config(tiny_root, tmp_path / "p"), ["optim.accumulate=2", "training.val_every_epochs=0"])
    run = tmp_path / "run"
    result = train(config, run, progress=False)
    steps = [r for r in metrics(run) if r["kind"] == "train"]
    assert result["step"] == len(steps) == 3 and {r["global_batch"] for r in steps} == {2}


def _definitions(pattern: str) -> set[str]:
    """Modules of the package whose code matches ``pattern``."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        if re.search(pattern, path.read_text()):
            found.add(path.relative_to(PACKAGE).as_posix())
    return found


@pytest.mark.parametrize("what, pattern, home", [
    ("the AMP dtype map", r"torch\.bfloat16", {"device.py"}),
    ("the run folder's file names", r"\"(metrics\.jsonl|status\.json|last\.pt|launch\.json|console\.log)\"",
     {"training/run_dir.py"}),
    ("data setup from a config", r"config\.data\.(manifest|cache_dir|root)\b", {"data.py"}),
    ("the train/val split into records", r"split_records\(\)", {"data.py"}),
    # tune.py post-processes probabilities that inference.py predicted, under many candidate settings
    ("predict-and-post-process", r"(?<!def )\bpostprocess\(prob", {"inference.py", "tune.py"}),
    ("sliding-window inference", r"predict_probabilities\(model", {"inference.py"}),
    # the loop, the time budget and the planner all follow training/schedule.py's Schedule
    ("which epochs validate and where checkpoints fall", r"%\s*(self\.|t\.|config\.training\.|c\.)?(val_every\w*|checkpoint_every\w*|every)\b",
     {"training/schedule.py"}),
    ("the LR of a step", r"def (lr_at|decay_progress)\(", {"training/schedule.py"}),
    # every other module derives the terms from the registry (losses.FUNCTIONS maps them to their code)
    ("the loss terms", r"[\"']skeleton_recall[\"']", {"loss_terms.py", "losses.py"}),
    # the repair judges its changes by the metric's own counts
    ("the Euler characteristic and Betti numbers", r"def (euler_characteristic|label_euler|betti\w*)\(", {"_betti.py"}),
    # status.json's states are training.run_dir.RunState; everything else names them through it
    ("the run states", r"[\"'](finished|stopped|failed|running|preflight|not started)[\"']", {"training/run_dir.py"}),
    ("a span as h:mm:ss", r"divmod\([^)]*, 3600\)|:02d\}:\{", {"timefmt.py"}),
    ("reading metrics.jsonl's lines", r"json\.loads\((line|chunk)", {"training/run_dir.py"}),
    ("the smoothing of a curve", r"def (ema|smooth\w*)\(", {"lab/plots.py"}),
    ("the forecast band", r"step_spread_s / 2", {"training/budget.py"}),
    ("the coverage of an epoch", r"/ (m\.|self\.)?unique_patches", {"sampling.py"}),
])
def test_one_definition_each(what, pattern, home):
    assert _definitions(pattern) == home, what


def _imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports anywhere in its code: at the
    top, inside functions (imported on use) and under TYPE_CHECKING alike."""
    import ast

    def name(path: Path) -> str:
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[module] |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vesuvius_lab"):
                graph[module] |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                                  for a in node.names}
    return graph


def test_no_import_cycle_inside_the_package():
    """A cycle, even through an import inside a function, means two modules that are one: each
    layer imports only what lies below it."""
    graph = _imports()
    cycles, path, done = [], [], set()

    def walk(module: str) -> None:
        if module in path:
            cycles.append(path[path.index(module):] + [module])
            return
        if module in done or module not in graph:
            return
        path.append(module)
        for target in sorted(graph[module]):
            walk(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        walk(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert "vesuvius_lab.training.engine" in graph["vesuvius_lab.training.loop"]  # the graph is read at all


def test_the_readme_architecture_table_names_one_existing_module_per_stage():
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("| stage | module | what it holds |"):].split("\n\n")[0].splitlines()[2:]
    assert len(table) >= 10

    def exists(name: str) -> bool:
        path = PACKAGE / name.replace(".", "/")
        return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()

    for row in table:
        stage, module, holds = (cell.strip() for cell in row.strip("|").split("|"))
        named = re.findall(r"`([\w.]+)`", module)
        assert len(named) == 1 and exists(named[0]), f"{stage}: one module of the package, not {module}"
        for name in re.findall(r"`((?:training|lab)\.\w+)`", holds):
            assert exists(name), f"{stage}: {name} is not a module of the package"
