"""Records, sampled patches and coverage for the notebooks and the napari widget (no GUI imports).

Volumes come from the memory-mapped cache, so opening a record never holds a dataset in RAM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vesuvius_lab.cache import CachedVolume, VolumeCache
from vesuvius_lab.config import AugmentConfig, Config, DataConfig, SamplerConfig, TrainingConfig
from vesuvius_lab.data import epoch_layout, patch_dataset
from vesuvius_lab.errors import ConfigError, DataError
from vesuvius_lab.layout import LABEL_NAMES
from vesuvius_lab.manifest import Manifest, ensure_demo_data, load_manifest
from vesuvius_lab.preview import draw_patches
from vesuvius_lab.sampling import Coverage, coverage

# RGBA per label value, shared by matplotlib overlays and napari: surface opaque amber, ignored
# regions a faint blue (they cover large parts of a volume and would hide the surface in 3D).
LABEL_COLORS: dict[int, tuple[float, float, float, float]] = {
    0: (0.0, 0.0, 0.0, 0.0),
    1: (1.0, 0.72, 0.0, 1.0),
    2: (0.2, 0.45, 1.0, 0.35),
}


@dataclass(frozen=True)
class RecordInfo:
    """What the record chooser shows about one record, read from the manifest (no decoding)."""

    id: str
    scroll_id: str
    split: str  # "train" or "val"
    shape: tuple[int, int, int] | None
    histogram: dict[int, int]

    @property
    def title(self) -> str:
        return f"{self.id} · scroll {self.scroll_id} · {self.split}"


def open_manifest(path: str | Path) -> Manifest:
    """Load a manifest; a synthetic one has its data generated first if absent (the demo)."""
    manifest = load_manifest(path)
    return ensure_demo_data(path, progress=False) if manifest.synth else manifest


def record_infos(manifest: Manifest) -> list[RecordInfo]:
    _, val = manifest.split_ids()
    val = set(val)
    return [
        RecordInfo(
            r.id,
            r.scroll_id,
            "val" if r.id in val else "train",
            r.stats.shape if r.stats else None,
            dict(r.stats.label_histogram) if r.stats else {},
        )
        for r in manifest.records
    ]


def histogram_rows(manifest: Manifest, info: RecordInfo) -> list[tuple[str, str, str]]:
    """(label, voxels, share) rows of a record's label histogram, named by the manifest."""
    total = sum(info.histogram.values()) or 1
    return [
        (f"{value} {LABEL_NAMES.get(value, '?')}", f"{count:,}", f"{100 * count / total:.1f}%")
        for value, count in sorted(info.histogram.items())
    ]


def open_record(manifest: Manifest, record_id: str, cache_dir: str | Path | None = None) -> CachedVolume:
    """A record's image and label as lazy read-only cache arrays (decoded into the cache on first use)."""
    return VolumeCache(cache_dir).load(manifest.record(record_id))


def open_prediction(path: str | Path | None, shape: Sequence[int]) -> np.ndarray | None:
    """A prediction volume (.npy memory-mapped, .tif decoded) checked against the record's shape."""
    if path is None:
        return None
    path = Path(path)
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r")
    elif path.suffix in (".tif", ".tiff"):
        from vesuvius_lab.io import read_volume

        array = read_volume(path)
    else:
        raise DataError(f"{path}: prediction must be .npy or .tif")
    if tuple(array.shape) != tuple(shape):
        raise DataError(f"{path}: prediction shape {tuple(array.shape)} does not match the record's {tuple(shape)}")
    return array


def sample_patches(
    manifest: Manifest,
    record_id: str,
    patch_size: Sequence[int],
    n: int,
    seed: int = 0,
    sampler: SamplerConfig | None = None,
    augment: AugmentConfig | None = None,
    cache_dir: str | Path | None = None,
) -> list[dict]:
    """The first ``n`` samples the training sampler would draw from one record, with their boxes."""
    augment = dataclasses.replace(augment or AugmentConfig(), where="worker")  # previews show augmented patches
    config = Config(data=DataConfig(patch_size=list(patch_size)), sampler=sampler or SamplerConfig(), augment=augment,
                    training=TrainingConfig(train_batch_size=max(n, 1), train_iterations_per_epoch=1, seed=seed))
    dataset = patch_dataset(config, [manifest.record(record_id)], VolumeCache(cache_dir))
    return draw_patches(dataset, n)


def epoch_coverage(manifest: Manifest, patch_size: Sequence[int], training: TrainingConfig) -> Coverage:
    """Coverage of the training split by one epoch of the given plan, from the manifest's shapes."""
    train, _ = manifest.split_ids()
    records = [manifest.entry(rid) for rid in train]
    missing = [r.id for r in records if r.stats is None]
    if missing:
        raise ConfigError(f"records without shapes in the manifest (rebuild it): {', '.join(missing)}")
    layout = epoch_layout(Config(training=training), len(records))
    return coverage(layout, [r.stats.shape for r in records], patch_size)


def coverage_rows(cov: Coverage) -> list[tuple[str, str]]:
    return [
        ("unique patches", f"{cov.unique_patches:,}"),
        ("samples per epoch", f"{cov.samples_per_epoch:,}"),
        ("coverage ratio", f"{cov.ratio:.2f}"),
        ("expected distinct share", f"{100 * cov.expected_distinct:.1f}%"),
    ]
