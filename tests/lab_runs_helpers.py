"""A tiny run config for the run-launcher, notebook and browser tests (workers=0, 16^3, CPU)."""

from __future__ import annotations

from pathlib import Path

import yaml

from vesuvius_lab.manifest import build_manifest


def write_tiny_config(tiny_root: Path, folder: Path, steps: int = 30, epochs: int = 1, **sections) -> Path:
    """A manifest of the tiny dataset and a run config beside it in ``folder``; returns the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "tiny.yaml"
    if not manifest.exists():
        build_manifest(tiny_root, progress=False).save(manifest)
    doc = {
        "data": {"manifest": str(manifest), "patch_size": [16, 16, 16]},
        "model": {"features": [4, 8, 16], "deep_supervision_heads": 2},
        "loss": {"cldice": 0.3, "skeleton_recall": 0.3, "surface": 0.1, "topo": 0.1, "topo_every": 3},
        "optim": {"lr": 0.01, "warmup_steps": 2},
        "val": {"max_volumes": 1, "overlap": 0.0, "batch": 8},
        "training": {"train_batch_size": 2, "train_iterations_per_epoch": steps, "max_epochs": epochs,
                     "workers": 0, "persistent_workers": False, "checkpoint_every_steps": 10,
                     "val_every_epochs": 1, "seed": 1},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    path = folder / "tiny_run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path
