"""Patch sampling over a manifest split, in the spirit of TorchIO's queue and nnU-Net's loader.

Every sample is addressed by a *global sample index* ``g``; all of its randomness (which volume,
where, which augmentation) comes from ``default_rng([seed, g])``. The stream is therefore the same
for any number of workers or ranks, and resuming at step k needs no replay: step k simply asks
for the indices of micro-batch ``k * accumulate`` onwards (see ``EpochLayout``).

Two epoch semantics, as in the seed notes:
- fixed steps (``training.train_iterations_per_epoch``): an endless stream, volumes drawn uniformly;
- full pass (``training.patches_per_volume`` x records): each epoch visits every volume that many
  times in a seeded random order; with ``drop_last`` the incomplete last batch is dropped, otherwise
  it is filled from the start of the same epoch's order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from vesuvius_lab.augment import read_box, sample_intensity, sample_spatial, source_box
from vesuvius_lab.cache import VolumeCache
from vesuvius_lab.config import AugmentConfig, SamplerConfig
from vesuvius_lab.layout import IGNORE_LABEL, Record
from vesuvius_lab.targets import DISTANCE_CLIP, PrepareReport, VolumeTargets, load_targets, prepare

PAD = {"image": 0, "label": IGNORE_LABEL, "skeleton": 0, "distance": DISTANCE_CLIP}


@dataclass(frozen=True)
class EpochLayout:
    """The one definition of a step and an epoch, shared by the sampler, the trainer and the planner.

    A *step* is one optimizer update. It takes ``accumulate`` micro-batches on each of
    ``world_size`` ranks, each of ``batch_size`` samples, so ``global_batch`` (samples per step) is
    their product. An epoch is ``steps`` steps: ``steps_per_epoch`` as configured, or enough steps
    for one full pass of ``patches_per_volume`` x volumes. The sampler counts micro-batches.
    """

    n_volumes: int
    batch_size: int  # per rank and micro-batch
    world_size: int = 1
    accumulate: int = 1
    steps_per_epoch: int | None = None  # fixed-steps mode
    patches_per_volume: int | None = None  # full-pass mode (when steps_per_epoch is None)
    drop_last: bool = False

    def __post_init__(self):
        if self.steps_per_epoch is None and self.patches_per_volume is None:
            raise ValueError("set train_iterations_per_epoch or patches_per_volume")

    @property
    def micro_batch(self) -> int:
        """Samples of one micro-batch over all ranks."""
        return self.batch_size * self.world_size

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step."""
        return self.micro_batch * self.accumulate

    @property
    def full_pass(self) -> bool:
        return self.steps_per_epoch is None

    @property
    def samples_in_pass(self) -> int:
        return self.n_volumes * (self.patches_per_volume or 0)

    @property
    def steps(self) -> int:
        """Optimizer steps per epoch."""
        if not self.full_pass:
            return self.steps_per_epoch
        per = self.samples_in_pass / self.global_batch
        return max(1, math.floor(per) if self.drop_last else math.ceil(per))

    @property
    def samples_per_epoch(self) -> int:
        return self.steps * self.global_batch

    def volume_of(self, g: int, rng: np.random.Generator) -> int:
        if not self.full_pass:
            return int(rng.integers(self.n_volumes))
        epoch_samples = self.samples_per_epoch
        epoch, pos = divmod(g, epoch_samples)
        order = np.random.default_rng([epoch, 0x5EED]).permutation(self.samples_in_pass)
        return int(order[pos % self.samples_in_pass] % self.n_volumes)

    def indices(self, micro: int, rank: int = 0) -> list[int]:
        """Global sample indices of micro-batch ``micro`` on ``rank``."""
        base = micro * self.micro_batch + rank * self.batch_size
        return list(range(base, base + self.batch_size))


def is_foreground_draw(g: int, fraction: float) -> bool:
    """Exactly ``fraction`` of any run of indices are foreground draws (a low-discrepancy rule)."""
    return math.floor((g + 1) * fraction) > math.floor(g * fraction)


class StreamBatchSampler(Sampler[list[int]]):
    """Micro-batches of global sample indices for one rank, from optimizer step ``start_step`` on
    (endless, or for ``num_steps`` steps)."""

    def __init__(self, layout: EpochLayout, start_step: int = 0, rank: int = 0, num_steps: int | None = None):
        self.layout, self.rank = layout, rank
        self.start = start_step * layout.accumulate
        self.count = None if num_steps is None else num_steps * layout.accumulate

    def __iter__(self) -> Iterator[list[int]]:
        micro = self.start
        while self.count is None or micro < self.start + self.count:
            yield self.layout.indices(micro, self.rank)
            micro += 1

    def __len__(self) -> int:
        if self.count is None:
            raise TypeError("endless stream")
        return self.count


class PatchDataset(Dataset):
    """Map-style dataset: global sample index -> augmented patch with its targets.

    Holds only paths and settings; each worker opens the cached chunked arrays on first use and
    decodes only the chunks under each patch box (through its own bounded chunk cache).
    With ``device_augment`` it returns the source box and the transform parameters instead,
    and the training device resamples the whole batch (``augment.apply_batch``).
    """

    def __init__(
        self,
        records: Sequence[Record],
        cache: VolumeCache,
        patch_size: Sequence[int],
        layout: EpochLayout,
        sampler: SamplerConfig | None = None,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        device_augment: bool = False,
    ):
        if not records:
            raise ValueError("no records to sample from")
        self.records = list(records)
        self.cache = cache
        self.patch = tuple(int(p) for p in patch_size)
        self.layout = layout
        self.sampler = sampler or SamplerConfig()
        self.augment = augment or AugmentConfig()
        self.seed = seed
        self.device_augment = device_augment
        self._volumes: dict[int, VolumeTargets] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_volumes"] = {}  # arrays are reopened in each worker, never pickled
        return state

    def __len__(self) -> int:
        return self.layout.samples_per_epoch

    def volume(self, i: int) -> VolumeTargets:
        if i not in self._volumes:
            vol = self.cache.load(self.records[i])
            self._volumes[i] = load_targets(self.cache, vol, self.sampler.fg_points)
        return self._volumes[i]

    def prepare(self, progress: bool = True, jobs: int | None = None, say=None) -> PrepareReport:
        """Build the cache and targets for every volume before workers start (``jobs`` processes,
        default all cores; ``say`` gets the line that says how long it will take)."""
        return prepare(self.cache, self.records, self.sampler.fg_points, jobs=jobs, progress=progress, say=say)

    def _centre(self, rng: np.random.Generator, targets: VolumeTargets, fg: bool) -> np.ndarray:
        """Patch centre in voxel coordinates; the patch stays inside the volume where it fits."""
        shape = np.asarray(targets.volume.image.shape)
        half = (np.asarray(self.patch) - 1) / 2
        if fg and len(targets.fg_points):
            point = targets.fg_points[rng.integers(len(targets.fg_points))].astype(float)
        else:
            point = np.array([rng.uniform(h, max(h, s - 1 - h)) for h, s in zip(half, shape, strict=True)])
        fits = shape >= np.asarray(self.patch)
        clipped = np.clip(point, half, shape - 1 - half)
        centre = np.where(fits, clipped, (shape - 1) / 2)  # too small: centre it and pad
        return np.floor(centre - half) + half  # align so that an untransformed patch is an exact crop

    def draw(self, g: int) -> dict:
        """The source box and transform for sample ``g`` (no resampling yet)."""
        rng = np.random.default_rng([self.seed, g])
        vi = self.layout.volume_of(g, rng)
        targets = self.volume(vi)
        fg = is_foreground_draw(g, self.sampler.fg_fraction)
        for _ in range(self.sampler.max_redraws + 1):
            centre = self._centre(rng, targets, fg)
            half = (np.asarray(self.patch) - 1) / 2
            lo = np.round(centre - half).astype(int)
            core = read_box(targets.volume.label, lo, lo + np.asarray(self.patch), IGNORE_LABEL)
            if (core != IGNORE_LABEL).any():
                break
        spatial = sample_spatial(rng, self.augment, self.patch)
        intensity = sample_intensity(rng, self.augment)
        lo, hi = source_box(centre, self.patch, spatial)
        arrays = {
            "image": read_box(targets.volume.image, lo, hi, PAD["image"]),
            "label": read_box(targets.volume.label, lo, hi, PAD["label"]),
            "skeleton": read_box(targets.skeleton, lo, hi, PAD["skeleton"]),
            "distance": read_box(targets.distance, lo, hi, PAD["distance"]),
        }
        g_elastic = self.augment.elastic_grid
        sample = {k: torch.from_numpy(v) for k, v in arrays.items()}
        sample.update(
            centre=torch.tensor(centre - lo, dtype=torch.float64),
            matrix=torch.tensor(spatial.matrix, dtype=torch.float64),
            elastic=torch.from_numpy(
                spatial.elastic if spatial.elastic is not None else np.zeros((3,) + (g_elastic,) * 3, np.float32)
            ),
            identity=torch.tensor(spatial.identity),
            flips=torch.tensor(spatial.flips),
            perm=torch.tensor(spatial.perm),
            distance_scale=torch.tensor(spatial.distance_scale, dtype=torch.float32),
            intensity=torch.from_numpy(intensity.as_array()),
            index=torch.tensor(g),
            volume_index=torch.tensor(vi),
            foreground_draw=torch.tensor(fg),
            box_origin=torch.from_numpy(lo.astype(np.int64)),
        )
        return sample

    def __getitem__(self, g: int) -> dict:
        sample = self.draw(int(g))
        if self.device_augment:
            return sample
        from vesuvius_lab.augment import apply_batch

        batch = {k: v[None] for k, v in sample.items()}  # a batch of one without collate's copies
        out = apply_batch(batch, self.patch)
        result = {k: v[0] for k, v in out.items()}
        for key in ("index", "volume_index", "foreground_draw", "box_origin", "centre", "matrix"):
            result[key] = sample[key]
        return result


def collate(samples: list[dict]) -> dict:
    """Stack samples; source boxes of different sizes are padded at their far end with PAD values."""
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in PAD and len({tuple(v.shape) for v in values}) > 1:
            size = np.max([v.shape for v in values], axis=0)
            padded = []
            for v in values:
                pad = []
                for have, want in zip(reversed(v.shape), reversed(size), strict=True):
                    pad += [0, int(want - have)]
                padded.append(torch.nn.functional.pad(v.float(), pad, value=float(PAD[key])).to(v.dtype))
            values = padded
        out[key] = torch.stack(values)
    return out


def unique_patches(shapes: Sequence[Sequence[int]], patch_size: Sequence[int]) -> int:
    """Distinct non-overlapping patch positions in the dataset (the seed notes' 'unique patches')."""
    return int(sum(np.prod([max(1, math.ceil(s / p)) for s, p in zip(shape, patch_size, strict=True)]) for shape in shapes))


@dataclass(frozen=True)
class Coverage:
    samples_per_epoch: int
    unique_patches: int

    @property
    def ratio(self) -> float:
        """Samples per epoch over unique patches: the seed notes' coverage (target 0.5-1.0); NaN
        when the unique patches are unknown (0: shapes missing from the manifest)."""
        return self.samples_per_epoch / self.unique_patches if self.unique_patches else math.nan

    @property
    def expected_distinct(self) -> float:
        """Expected share of patch positions touched at least once by that many random draws."""
        return 1.0 - math.exp(-self.ratio)


def coverage(layout: EpochLayout, shapes: Sequence[Sequence[int]], patch_size: Sequence[int]) -> Coverage:
    return Coverage(layout.samples_per_epoch, unique_patches(shapes, patch_size))
