"""Spatial and intensity augmentation, one implementation for data workers and the training device.

Parameters are drawn per sample from that sample's own random generator (see ``sampling``), so a
patch is the same whatever worker or rank draws it. A sample's spatial transform maps each output
voxel to a source coordinate: a rotation and isotropic scale about the patch centre, plus a smooth
elastic displacement, then exact flips and axis permutations. Workers read only the source box the
transform touches; ``apply_batch`` resamples image and distance map trilinearly and label and
skeleton by nearest neighbour, on whatever device the batch lives on.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vesuvius_lab.config import AugmentConfig


@dataclass
class SpatialParams:
    matrix: np.ndarray  # (3, 3) output offset -> source offset, in voxels
    elastic: np.ndarray | None  # (3, g, g, g) control-point displacements in voxels
    flips: tuple[bool, bool, bool]
    perm: tuple[int, int, int]

    @property
    def identity(self) -> bool:
        return self.elastic is None and np.array_equal(self.matrix, np.eye(3))

    @property
    def distance_scale(self) -> float:
        """Output distances are source distances divided by the (isotropic) scale."""
        return float(1.0 / np.cbrt(abs(np.linalg.det(self.matrix))))


@dataclass
class IntensityParams:
    gamma: float = float("nan")
    contrast: float = float("nan")
    noise_std: float = 0.0
    noise_seed: int = 0
    blur_sigma: float = 0.0

    def as_array(self) -> np.ndarray:
        return np.array([self.gamma, self.contrast, self.noise_std, self.noise_seed, self.blur_sigma], np.float64)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    out = np.eye(3)
    for axes in ((0, 1), (0, 2), (1, 2)):
        a = math.radians(rng.uniform(-max_deg, max_deg))
        r = np.eye(3)
        i, j = axes
        r[i, i], r[i, j], r[j, i], r[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
        out = r @ out
    return out


def sample_spatial(rng: np.random.Generator, cfg: AugmentConfig, patch: tuple[int, int, int]) -> SpatialParams:
    matrix = np.eye(3)
    elastic = None
    flips, perm = (False, False, False), (0, 1, 2)
    if cfg.enabled:
        if rng.random() < cfg.p_rotation:
            matrix = _rotation(rng, cfg.max_rotation_deg) @ matrix
        if rng.random() < cfg.p_scale:
            matrix = rng.uniform(*cfg.scale_range) * matrix
        if rng.random() < cfg.p_elastic and cfg.elastic_magnitude > 0:
            g = cfg.elastic_grid
            elastic = rng.uniform(-1, 1, size=(3, g, g, g)).astype(np.float32) * cfg.elastic_magnitude
            elastic[:, [0, -1]] *= 0.5  # calmer at the edges of the patch
        flips = tuple(bool(rng.random() < cfg.p_flip) for _ in range(3))
        if cfg.permute_axes:
            order = list(range(3))
            for size in set(patch):  # shuffle only among axes of equal size, so the shape is kept
                axes = [i for i in range(3) if patch[i] == size]
                shuffled = list(rng.permutation(axes))
                for a, b in zip(axes, shuffled, strict=True):
                    order[a] = int(b)
            perm = tuple(order)
    return SpatialParams(matrix, elastic, flips, perm)


def sample_intensity(rng: np.random.Generator, cfg: AugmentConfig) -> IntensityParams:
    p = IntensityParams()
    if not cfg.enabled:
        return p
    if rng.random() < cfg.p_gamma:
        p.gamma = float(rng.uniform(*cfg.gamma_range))
    if rng.random() < cfg.p_contrast:
        p.contrast = float(rng.uniform(*cfg.contrast_range))
    if rng.random() < cfg.p_noise:
        p.noise_std = float(rng.uniform(0, cfg.noise_std))
        p.noise_seed = int(rng.integers(2**31))
    if rng.random() < cfg.p_blur:
        p.blur_sigma = float(rng.uniform(*cfg.blur_sigma))
    return p


def source_box(centre: np.ndarray, patch: tuple[int, int, int], params: SpatialParams) -> tuple[np.ndarray, np.ndarray]:
    """Integer [lo, hi) box in volume coordinates holding every source point of the transform."""
    if params.identity:
        lo = np.round(centre - (np.asarray(patch) - 1) / 2).astype(int)
        return lo, lo + np.asarray(patch)
    reach = params.matrix @ _corner_offsets(patch)
    margin = 0.0 if params.elastic is None else float(np.abs(params.elastic).max())
    lo = np.floor(centre + reach.min(axis=1) - margin).astype(int)
    hi = np.ceil(centre + reach.max(axis=1) + margin).astype(int) + 1
    return lo, hi


def _corner_offsets(patch) -> np.ndarray:
    """(3, 8) offsets of a patch's corners from its centre."""
    half = (np.asarray(patch) - 1) / 2
    return np.array(np.meshgrid(*[[-h, h] for h in half], indexing="ij")).reshape(3, -1)


def patch_corners(centre: np.ndarray, patch, matrix: np.ndarray) -> np.ndarray:
    """The 8 corners (z, y, x) of a sampled patch in volume coordinates (elastic part left out)."""
    return (centre[:, None] + matrix @ _corner_offsets(patch)).T


def read_box(array: np.ndarray, lo: np.ndarray, hi: np.ndarray, fill) -> np.ndarray:
    """``array[lo:hi]`` with ``fill`` where the box leaves the volume; copies only the box."""
    out = np.full(tuple(hi - lo), fill, dtype=array.dtype)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(hi, array.shape)
    if np.all(src_hi > src_lo):
        dst = tuple(slice(a - o, b - o) for a, b, o in zip(src_lo, src_hi, lo, strict=True))
        out[dst] = array[tuple(slice(a, b) for a, b in zip(src_lo, src_hi, strict=True))]
    return out


@functools.lru_cache(maxsize=8)
def _offsets(patch: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """(3, N) offsets of every output voxel from the patch centre; cached per patch size."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2 for n in patch]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).reshape(3, -1)


def _grid(batch: dict, patch: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """(B, Z, Y, X, 3) sampling grid in grid_sample's normalised (x, y, z) order."""
    b = batch["matrix"].shape[0]
    offsets = _offsets(tuple(patch), device)
    matrix = batch["matrix"].to(device=device, dtype=torch.float32)
    coords = matrix @ offsets + batch["centre"].to(device=device, dtype=torch.float32)[:, :, None]
    coords = coords.reshape(b, 3, *patch)
    elastic = batch["elastic"].to(device=device, dtype=torch.float32)
    if elastic.abs().amax() > 0:
        coords = coords + F.interpolate(elastic, size=patch, mode="trilinear", align_corners=True)
    size = torch.tensor(batch["image"].shape[-3:], device=device, dtype=torch.float32)
    norm = 2 * coords / (size - 1).clamp(min=1)[None, :, None, None, None] - 1
    return norm.permute(0, 2, 3, 4, 1).flip(-1)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = k.numel()
        pad = [0] * 6
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = radius
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.reshape(shape))
    return x


def _intensity(image: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Gamma, contrast, noise and blur on a (B, 1, Z, Y, X) image in [0, 1]."""
    out = []
    for x, (gamma, contrast, noise_std, noise_seed, sigma) in zip(image, params.tolist(), strict=True):
        x = x[None]
        if not math.isnan(gamma):
            x = x.clamp(min=0) ** gamma
        if not math.isnan(contrast):
            mean = x.mean()
            x = (x - mean) * contrast + mean
        if noise_std > 0:
            gen = torch.Generator(device="cpu").manual_seed(int(noise_seed))
            x = x + (torch.randn(x.shape, generator=gen) * noise_std).to(x.device)
        if sigma > 0:
            x = _gaussian_blur(x, sigma)
        out.append(x[0])
    return torch.stack(out)


def apply_batch(batch: dict, patch: tuple[int, int, int]) -> dict:
    """Resample a collated batch of source boxes into patches and apply intensity augmentation.

    Works on CPU tensors (inside a data worker, batch of one) and on the training device.
    """
    image = batch["image"]
    device = image.device
    b = image.shape[0]
    identity = bool(batch["identity"].all()) and tuple(image.shape[-3:]) == tuple(patch)
    if identity:
        img = image.float() / 255
        lab, skel, dist = batch["label"], batch["skeleton"], batch["distance"].float()
    else:
        grid = _grid(batch, patch, device)
        linear = torch.cat([image.float()[:, None] / 255, batch["distance"].float()[:, None]], dim=1)
        # Label and skeleton share one nearest-neighbour pass: both pick the same source voxel.
        packed = (batch["label"] + 4 * batch["skeleton"]).float()[:, None]
        linear = F.grid_sample(linear, grid, mode="bilinear", padding_mode="border", align_corners=True)
        packed = F.grid_sample(packed, grid, mode="nearest", padding_mode="border", align_corners=True)
        img, dist = linear[:, 0], linear[:, 1]
        packed = packed[:, 0].to(torch.uint8)
        lab, skel = packed % 4, packed // 4
    dist = dist * batch["distance_scale"].to(device=device, dtype=torch.float32).reshape(b, 1, 1, 1)
    out = {"image": img[:, None], "label": lab, "skeleton": skel, "distance": dist}
    flips, perms = batch["flips"].tolist(), batch["perm"].tolist()
    for key, value in out.items():
        items = []
        for v, flip, perm in zip(value, flips, perms, strict=True):
            lead = v.dim() - 3  # 1 for the image's channel axis, else 0
            if perm != [0, 1, 2]:
                v = v.permute(*range(lead), *(lead + a for a in perm))
            dims = [lead + i for i in range(3) if flip[i]]
            items.append(v.flip(dims) if dims else v)
        out[key] = torch.stack(items)
    out["image"] = _intensity(out["image"], batch["intensity"])
    return out
