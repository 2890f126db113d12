"""The install story: one pinned torch, no torchvision, environment.yml in step with pyproject."""

import re
import tomllib
from importlib import metadata
from pathlib import Path

import yaml

import vesuvius_lab
from conftest import require

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONDA_TO_PIP = {"pytorch": "torch"}


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower()


def _pin(req: str) -> str | None:
    m = re.search(r"==\s*([^,; ]+)", req)
    return m.group(1) if m else None


def test_installed_torch_is_the_pinned_one():
    import torch

    assert torch.__version__.split("+")[0] == vesuvius_lab.TORCH_PIN
    pins = [r for r in PYPROJECT["project"]["dependencies"] if _name(r) == "torch"]
    assert pins == [f"torch=={vesuvius_lab.TORCH_PIN}"]
    assert metadata.version("torch").split("+")[0] == vesuvius_lab.TORCH_PIN


def test_no_second_torch_or_torchvision():
    installed = {(d.metadata["Name"] or "").lower() for d in metadata.distributions()}
    assert not installed & {"torchvision", "torchaudio", "pytorch-triton"}
    torch_dists = [d for d in metadata.distributions() if (d.metadata["Name"] or "").lower() == "torch"]
    assert len(torch_dists) == 1


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip_section == ["-e .[gui,test]"]
    project = PYPROJECT["project"]
    declared = {_name(r): r for r in project["dependencies"]}
    for extra in ("gui", "test"):
        declared.update({_name(r): r for r in project["optional-dependencies"][extra]})
    for dep in conda:
        name, _, version = dep.partition("=")
        if name in ("python", "pip"):
            continue
        pip_name = CONDA_TO_PIP.get(name, name)
        assert pip_name in declared, f"environment.yml lists {name}, pyproject does not"
        if version:
            assert _pin(declared[pip_name]) == version, f"{name}: environment.yml pins {version}, pyproject {declared[pip_name]}"
    python = next(d for d in conda if d.startswith("python="))
    assert python.split("=")[1] == "3.11" and ">=3.11" in project["requires-python"]
    # The design card's packages are declared on both sides.
    for name in ("torch", "napari", "jupyterlab", "ipywidgets"):
        assert name in declared and any(CONDA_TO_PIP.get(c.split("=")[0], c.split("=")[0]) == name for c in conda)
    assert "monai" in declared and "matplotlib" in declared


def test_readme_gives_exactly_the_two_setup_commands():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make lab", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^lab:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    demo_data = makefile.split("\ndemo-data:", 1)[1].split("\n\n", 1)[0]
    assert "demo-data --manifest data_manifests/synthetic_scroll.yaml" in demo_data  # beside the planar demo
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_bench_extra_is_installed_at_its_pin_without_its_declared_dependencies():
    """batchgeneratorsv2, `bench data`'s nnU-Net v2 baseline: pyproject's bench extra, which make
    installs with --no-deps (its declared batchgenerators v1 stays out) after our torch."""
    (req,) = PYPROJECT["project"]["optional-dependencies"]["bench"]
    assert _name(req) == "batchgeneratorsv2" and _pin(req)
    makefile = (REPO / "Makefile").read_text()
    assert '--no-deps "$(BENCH_PIN)"' in makefile and "^bench = " in makefile
    installed = {(d.metadata["Name"] or "").lower(): d.version for d in metadata.distributions()}
    require("batchgeneratorsv2" in installed, "batchgeneratorsv2 (make install: pyproject's bench extra)")
    assert installed["batchgeneratorsv2"] == _pin(req)
    assert "batchgenerators" not in installed
