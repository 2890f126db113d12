# Two set-up commands for a fresh machine: `make lab` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN := $(shell sed -n 's/^TORCH_PIN = "\(.*\)"/\1/p' vesuvius_lab/__init__.py)
TOPOLOSSES_PIN := 0.2.0
BENCH_PIN := $(shell sed -n 's/^bench = \["\(.*\)"\].*/\1/p' pyproject.toml)
PYTEST_ARGS ?=
LAB_ARGS ?=

.PHONY: lab test install demo-data clean

install: $(STAMP)

# torch goes in first from its exact pin, so no other requirement can pull a second (CUDA) build.
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.d/vesuvius-lab.json

$(STAMP): pyproject.toml vesuvius_lab/__init__.py jupyterlab-overrides.json
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[gui,test]"
	# the Qt binding is PyQt6: an older .venv's PyQt5 would still be the one qtpy (napari) picks
	$(PY) -m pip uninstall -q -y pyqt5 pyqt5-qt5 pyqt5-sip 2>/dev/null || true
	# the workbench's JupyterLab defaults (no news pop-up), where JupyterLab reads a package's overrides
	install -D -m 644 jupyterlab-overrides.json $(LAB_OVERRIDES)
	# the official compiled Betti-Matching-3D, the metric tests' reference; --no-deps keeps our torch
	$(PY) -m pip install -q --no-deps "topolosses==$(TOPOLOSSES_PIN)"
	# nnU-Net v2's augmentation, `bench data`'s baseline: pyproject's bench extra, --no-deps (why: pyproject.toml)
	$(PY) -m pip install -q --no-deps "$(BENCH_PIN)"
	@touch $@

# the planar demo and the scroll-like one (data_manifests/synthetic_scroll.yaml) beside it
demo-data: $(STAMP)
	$(PY) -m vesuvius_lab demo-data
	$(PY) -m vesuvius_lab demo-data --manifest data_manifests/synthetic_scroll.yaml

# Jupyter refuses to run as root without --allow-root (containers and CI machines often are root).
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: demo-data
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=notebooks $(ROOT_FLAG) $(LAB_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
