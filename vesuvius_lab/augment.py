"""Spatial and intensity augmentation, one implementation for data workers and the training device.

Parameters are drawn per sample from that sample's own random generator (see ``sampling``), so a
patch is the same whatever worker or rank draws it. A sample's spatial transform maps each output
voxel to a source coordinate: a rotation and isotropic scale about the patch centre, plus a smooth
elastic displacement, then exact flips and axis permutations. Workers read only the source box the
transform touches; ``apply_batch`` resamples image and distance map trilinearly and label and
skeleton by nearest neighbour, on whatever device the batch lives on: on a GPU with grid_sample, on
the CPU with one compiled pass (``_resample_kernel``) that folds flips and permutations into the
transform and reads the stored dtypes directly (no sampling grid, no float copy of the source box).
The two agree to float rounding; a label can differ only where a sample point lies within float
rounding of a half-voxel tie.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numba as nb
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
    brightness: float = float("nan")
    gamma_inverted: float = float("nan")
    lowres_scale: float = float("nan")

    def as_array(self) -> np.ndarray:
        return np.array([self.gamma, self.contrast, self.noise_std, self.noise_seed, self.blur_sigma,
                         self.brightness, self.gamma_inverted, self.lowres_scale], np.float64)


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
    # drawn after the others, so that configs without them draw the same parameters as before
    if rng.random() < cfg.p_brightness:
        p.brightness = float(rng.uniform(*cfg.brightness_range))
    if rng.random() < cfg.p_gamma_inverted:
        p.gamma_inverted = float(rng.uniform(*cfg.gamma_range))
    if rng.random() < cfg.p_lowres:
        p.lowres_scale = float(rng.uniform(*cfg.lowres_scale))
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
    inside = bool(np.all(lo >= 0) and np.all(hi <= np.asarray(array.shape)))
    out = np.empty(tuple(hi - lo), dtype=array.dtype) if inside else np.full(tuple(hi - lo), fill, dtype=array.dtype)
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
    """Separable Gaussian of a (1, 1, Z, Y, X) image, edges replicated; on the CPU scipy's 1D
    correlation with the same kernel (a third of conv3d's time on one thread)."""
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    if x.device.type == "cpu":
        from scipy.ndimage import correlate1d

        out = x[0, 0].numpy()
        for dim in range(3):
            out = correlate1d(out, k.numpy(), axis=dim, mode="nearest")
        return torch.from_numpy(out)[None, None]
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = k.numel()
        pad = [0] * 6
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = radius
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.reshape(shape))
    return x


def _low_resolution(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Nearest-neighbour down to ``scale`` of each edge, trilinear back up (nnU-Net's simulated low resolution)."""
    size = x.shape[-3:]
    small = F.interpolate(x, size=[max(1, round(n * scale)) for n in size], mode="nearest-exact")
    return F.interpolate(small, size=size, mode="trilinear")


def _intensity(image: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Gamma (of the image and of its inverse), brightness, contrast, noise, blur and low resolution
    on a (B, 1, Z, Y, X) image in [0, 1]."""
    out = []
    for x, row in zip(image, params.tolist(), strict=True):
        gamma, contrast, noise_std, noise_seed, sigma, brightness, gamma_inverted, lowres = row
        x = x[None]
        if not math.isnan(gamma_inverted):
            x = 1 - (1 - x).clamp(min=0) ** gamma_inverted
        if not math.isnan(gamma):
            x = x.clamp(min=0) ** gamma
        if not math.isnan(brightness):
            x = x * brightness
        if not math.isnan(contrast):
            mean = x.mean()
            x = (x - mean) * contrast + mean
        if noise_std > 0:
            gen = torch.Generator(device="cpu").manual_seed(int(noise_seed))
            x = x + (torch.randn(x.shape, generator=gen) * noise_std).to(x.device)
        if sigma > 0:
            x = _gaussian_blur(x, sigma)
        if not math.isnan(lowres):
            x = _low_resolution(x, lowres)
        out.append(x[0])
    return torch.stack(out)


@nb.njit(inline="always")
def _axis(c, top):
    """Clamp a source coordinate into [0, top] (border padding); its floor, the next index, the
    fraction and the nearest index (ties to even, as grid_sample's nearbyint rounds)."""
    c = min(max(c, 0.0), top)
    i = int(c)  # c >= 0: the floor
    f = c - i
    n = i + 1 if f > 0.5 or (f == 0.5 and i % 2 == 1) else i
    return i, min(i + 1, int(top)), f, n


@nb.njit(nogil=True, cache=True)
def _resample_kernel(image, distance, label, skeleton, affine, shift, disp, out_image, out_distance, out_label,
                     out_skeleton):
    """Output voxel q samples source point ``affine @ q + shift (+ disp[:, q])``, clamped into the box
    (grid_sample's border padding with align_corners): image (uint8, scaled to [0, 1]) and distance
    trilinearly, label and skeleton at the nearest voxel."""
    tz, ty, tx = image.shape[0] - 1.0, image.shape[1] - 1.0, image.shape[2] - 1.0
    nz, ny, nx = out_image.shape
    has_disp = disp.shape[0] == 3
    for z in range(nz):
        for y in range(ny):
            bz = affine[0, 0] * z + affine[0, 1] * y + shift[0]
            by = affine[1, 0] * z + affine[1, 1] * y + shift[1]
            bx = affine[2, 0] * z + affine[2, 1] * y + shift[2]
            for x in range(nx):
                cz, cy, cx = bz + affine[0, 2] * x, by + affine[1, 2] * x, bx + affine[2, 2] * x
                if has_disp:
                    cz += disp[0, z, y, x]
                    cy += disp[1, z, y, x]
                    cx += disp[2, z, y, x]
                z0, z1, fz, nz_ = _axis(cz, tz)
                y0, y1, fy, ny_ = _axis(cy, ty)
                x0, x1, fx, nx_ = _axis(cx, tx)
                gz, gy, gx = 1.0 - fz, 1.0 - fy, 1.0 - fx
                w000, w001, w010, w011 = gz * gy * gx, gz * gy * fx, gz * fy * gx, gz * fy * fx
                w100, w101, w110, w111 = fz * gy * gx, fz * gy * fx, fz * fy * gx, fz * fy * fx
                out_image[z, y, x] = (
                    w000 * image[z0, y0, x0] + w001 * image[z0, y0, x1] + w010 * image[z0, y1, x0]
                    + w011 * image[z0, y1, x1] + w100 * image[z1, y0, x0] + w101 * image[z1, y0, x1]
                    + w110 * image[z1, y1, x0] + w111 * image[z1, y1, x1]) * (1.0 / 255.0)
                out_distance[z, y, x] = (
                    w000 * distance[z0, y0, x0] + w001 * distance[z0, y0, x1] + w010 * distance[z0, y1, x0]
                    + w011 * distance[z0, y1, x1] + w100 * distance[z1, y0, x0] + w101 * distance[z1, y0, x1]
                    + w110 * distance[z1, y1, x0] + w111 * distance[z1, y1, x1])
                out_label[z, y, x] = label[nz_, ny_, nx_]
                out_skeleton[z, y, x] = skeleton[nz_, ny_, nx_]


def warm_up() -> None:
    """Load (or compile, once per machine) the CPU resampling kernel for the cache's dtypes, so that a
    worker's first transformed patch does not pay for it."""
    small = np.zeros((2, 2, 2), np.uint8)
    _resample_kernel(small, np.zeros((2, 2, 2), np.float32), small, small, np.eye(3), np.zeros(3),
                     np.zeros((0, 1, 1, 1), np.float32), np.empty((2, 2, 2), np.float32),
                     np.empty((2, 2, 2), np.float32), np.empty_like(small), np.empty_like(small))


def _orientation(perm: list[int], flips: list[bool]) -> np.ndarray:
    """(3, 3) map from an oriented patch's offsets to the resampled patch's: ``permute(perm)`` then
    ``flip`` on the output equals sampling at ``P @ F @ offset``."""
    out = np.zeros((3, 3))
    for j in range(3):
        out[perm[j], j] = -1.0 if flips[j] else 1.0
    return out


def _resample_cpu(batch: dict, patch: tuple[int, int, int]) -> dict:
    """The whole spatial part on the CPU: one compiled pass per sample, flips and permutations included."""
    b = batch["image"].shape[0]
    half = (np.asarray(patch, dtype=np.float64) - 1) / 2
    disp = None
    if batch["elastic"].abs().amax() > 0:
        disp = F.interpolate(batch["elastic"].float(), size=patch, mode="trilinear", align_corners=True)
    out = {"image": torch.empty((b, *patch)), "distance": torch.empty((b, *patch)),
           "label": torch.empty((b, *patch), dtype=batch["label"].dtype),
           "skeleton": torch.empty((b, *patch), dtype=batch["skeleton"].dtype)}
    for i in range(b):
        perm, flips = batch["perm"][i].tolist(), batch["flips"][i].tolist()
        affine = batch["matrix"][i].double().numpy() @ _orientation(perm, flips)
        shift = batch["centre"][i].double().numpy() - affine @ half
        if disp is None:
            field = np.zeros((0, 1, 1, 1), np.float32)
        else:
            field = disp[i].permute(0, *(1 + a for a in perm))
            dims = [1 + j for j in range(3) if flips[j]]
            field = np.ascontiguousarray((field.flip(dims) if dims else field).numpy())
        _resample_kernel(batch["image"][i].numpy(), batch["distance"][i].float().numpy(), batch["label"][i].numpy(),
                         batch["skeleton"][i].numpy(), affine, shift, field, out["image"][i].numpy(),
                         out["distance"][i].numpy(), out["label"][i].numpy(), out["skeleton"][i].numpy())
    return out


def _resample_grid(batch: dict, patch: tuple[int, int, int]) -> dict:
    """The whole spatial part with grid_sample, on the batch's device (the GPU path)."""
    grid = _grid(batch, patch, batch["image"].device)
    linear = torch.cat([batch["image"].float()[:, None] / 255, batch["distance"].float()[:, None]], dim=1)
    # Label and skeleton share one nearest-neighbour pass: both pick the same source voxel.
    packed = (batch["label"] + 4 * batch["skeleton"]).float()[:, None]
    linear = F.grid_sample(linear, grid, mode="bilinear", padding_mode="border", align_corners=True)
    packed = F.grid_sample(packed, grid, mode="nearest", padding_mode="border", align_corners=True)
    packed = packed[:, 0].to(torch.uint8)
    return _orient({"image": linear[:, 0], "label": packed % 4, "skeleton": packed // 4, "distance": linear[:, 1]},
                   batch)


def _orient(out: dict, batch: dict) -> dict:
    """Each sample's axis permutation, then its flips, on every array of ``out``."""
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
    return out


def apply_batch(batch: dict, patch: tuple[int, int, int]) -> dict:
    """Resample a collated batch of source boxes into patches and apply intensity augmentation.

    Works on CPU tensors (inside a data worker, batch of one) and on the training device.
    """
    image = batch["image"]
    device = image.device
    b = image.shape[0]
    identity = bool(batch["identity"].all()) and tuple(image.shape[-3:]) == tuple(patch)
    scale = batch["distance_scale"].to(device=device, dtype=torch.float32).reshape(b, 1, 1, 1)
    if identity:
        out = _orient({"image": image.float()[:, None] / 255, "label": batch["label"], "skeleton": batch["skeleton"],
                       "distance": batch["distance"].float()}, batch)
    else:
        out = (_resample_cpu if device.type == "cpu" else _resample_grid)(batch, tuple(patch))
        out["image"] = out["image"][:, None]
    out["distance"] = out["distance"] * scale
    out["image"] = _intensity(out["image"], batch["intensity"])
    return out
