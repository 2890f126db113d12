"""The one way from a config to its data: manifest, cache, preflight, train/val split, patch dataset.

Training, the planner, evaluation and the notebooks all call ``open_data``; the patch dataset and
the epoch arithmetic (``epoch_layout``) come from here too, so none of them rebuilds either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from vesuvius_lab.cache import VolumeCache
from vesuvius_lab.config import Config
from vesuvius_lab.errors import DataError
from vesuvius_lab.layout import Record
from vesuvius_lab.manifest import Manifest, ensure_demo_data, load_manifest
from vesuvius_lab.preflight import preflight
from vesuvius_lab.sampling import EpochLayout, PatchDataset, unique_patches
from vesuvius_lab.synth import MARKER
from vesuvius_lab.targets import PrepareReport, prepare


def epoch_layout(config: Config, n_volumes: int, world_size: int = 1) -> EpochLayout:
    """Steps, global batch and epoch length as the trainer runs them for this config."""
    t = config.training
    return EpochLayout(
        n_volumes=n_volumes,
        batch_size=t.train_batch_size,
        world_size=world_size,
        accumulate=config.optim.accumulate,
        steps_per_epoch=t.train_iterations_per_epoch,
        patches_per_volume=t.patches_per_volume,
        drop_last=t.drop_last,
    )


def patch_dataset(config: Config, records: list[Record], cache: VolumeCache, world_size: int = 1) -> PatchDataset:
    """The training sampler over ``records``, as configured."""
    return PatchDataset(
        records,
        cache,
        config.data.patch_size,
        epoch_layout(config, len(records), world_size),
        sampler=config.sampler,
        augment=config.augment,
        seed=config.training.seed,
        device_augment=config.augment.where == "device",
    )


@dataclass
class Data:
    """A config's dataset: the manifest, the volume cache and the scroll split."""

    manifest_path: Path
    manifest: Manifest
    cache: VolumeCache
    train: list[Record] = field(default_factory=list)
    val: list[Record] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # the preflight's notes: volumes smaller than the patch

    def patch_dataset(self, config: Config, world_size: int = 1) -> PatchDataset:
        if not self.train:
            raise DataError(f"{self.manifest_path}: no training records after the scroll split")
        return patch_dataset(config, self.train, self.cache, world_size)

    def prepare(self, config: Config, jobs: int | None = None, progress: bool = True, say=None) -> PrepareReport:
        """Cache entries of every record and the targets of the training records, in ``jobs``
        processes: what ``vesuvius-lab cache build``, training and ``plan`` run first."""
        return prepare(self.cache, self.train, config.sampler.fg_points, jobs, progress, say, plain=self.val)

    def unique_patches(self, patch_size) -> int:
        """Distinct patch positions of the training split, from the manifest's shapes (0 if unknown)."""
        ids = {r.id for r in self.train}
        shapes = [r.stats.shape for r in self.manifest.records if r.id in ids and r.stats is not None]
        return unique_patches(shapes, patch_size) if len(shapes) == len(ids) else 0


def prepare_demo_data(config: Config, progress: bool = True) -> bool:
    """Generate a synthetic manifest's volumes when they are absent (as ``make lab`` does), so a
    config naming the embedded demo runs in a fresh clone; True when it generated them."""
    path = config.path(config.data.manifest, "data.manifest")
    if config.data.root is not None or not path.is_file():
        return False  # another root, or no manifest: the preflight reports it
    manifest = load_manifest(path)
    if not manifest.synth or (manifest.root / MARKER).is_file():
        return False
    ensure_demo_data(path, progress=progress)
    return True


def open_data(
    config: Config,
    manifest: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    check: bool = False,
) -> Data:
    """The config's data; ``manifest`` and ``cache_dir`` (relative to the current folder) replace
    the config's. ``check`` runs the preflight of ``vesuvius-lab validate``, raises DataError
    with every problem and keeps its notes in ``Data.notes``."""
    path = Path(manifest).resolve() if manifest is not None else config.path(config.data.manifest, "data.manifest")
    root = config.path(config.data.root, "data.root")
    loaded = load_manifest(path, root=root)
    cache = VolumeCache(Path(cache_dir).resolve() if cache_dir is not None else config.path(config.data.cache_dir, "data.cache_dir"),
                        chunk_cache_mb=config.data.chunk_cache_mb)
    notes: list[str] = []
    if check:
        problems = preflight(path, patch_size=config.data.patch_size, progress=False, manifest=loaded, cache=cache,
                             say=notes.append)
        if problems:
            raise DataError(problems)
    train, val = loaded.split_records()
    return Data(path, loaded, cache, train, val, notes)
