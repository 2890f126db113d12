"""Synthetic scroll chunks in the Kaggle layout: the embedded demo dataset.

Each volume holds a stack of curved papyrus sheets (2-4 voxels thick, uneven spacing, some pairs
touching where their undulations meet, which is the hard case for topology), cross-ply fibre
texture, dense debris blobs the size of a sheet's thickness, blur, noise and a smooth intensity
drift. Labels are partial as in the real data: 1 on labelled sheets, 2 on the 3-voxel border, on
unlabelled sheets and on an unlabelled region. Debris and drift defeat a global threshold, while
the sheets' planar shape stays learnable by a small 3D U-Net.

The scroll geometry (``make_scroll_volume``) cuts each chunk from a rolled scroll instead: wraps
round an axis tilted at random through the chunk, so the sheet normal turns all the way round;
adjacent wraps pressed into contact with a one-voxel unlabelled gap; thickness varying along a wrap;
each wrap its own fibre texture; ring artifacts, beam-hardening cupping and bright inclusions; some
wraps and one region unlabelled. The README lists what it models and what it does not.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from vesuvius_lab.layout import IMAGE_DIR, LABEL_DIR, TRAIN_CSV
from vesuvius_lab.errors import DataError
from vesuvius_lab.io import atomic_write_text, write_volume

SCROLL_IDS = ("34117", "35360", "26010", "26002", "44430", "53997")
BORDER = 3
MARKER = ".vesuvius_lab_synth.json"
GEOMETRIES = ("planar", "scroll")  # make_volume, make_scroll_volume


@dataclass(frozen=True)
class ScrollStyle:
    """Acquisition traits shared by all chunks of one scroll."""

    spacing: tuple[float, float]
    noise: float
    drift: float
    debris: float


def scroll_style(seed: int, scroll_index: int) -> ScrollStyle:
    rng = np.random.default_rng([seed, 7919, scroll_index])
    lo = rng.uniform(8.0, 11.0)
    return ScrollStyle(
        spacing=(lo, lo + rng.uniform(5.0, 9.0)),
        noise=rng.uniform(0.10, 0.15),
        drift=rng.uniform(0.35, 0.55),
        debris=rng.uniform(0.8, 1.4),
    )


def _smooth_field(rng: np.random.Generator, coords: list[np.ndarray], amplitude: float, waves: int = 3):
    """Sum of random low-frequency sinusoids over the given in-plane coordinates."""
    field = 0.0
    for _ in range(waves):
        k = rng.normal(size=len(coords))
        k *= 2 * np.pi / rng.uniform(40.0, 140.0) / max(np.linalg.norm(k), 1e-6)
        phase = rng.uniform(0, 2 * np.pi)
        arg = sum(ki * c for ki, c in zip(k, coords, strict=True))
        field = field + np.sin(arg + phase).astype(np.float32)
    return (amplitude / np.sqrt(waves)) * field


def make_volume(shape: tuple[int, int, int], seed: int, index: int, style: ScrollStyle):
    """One synthetic chunk: (image uint8, label uint8), deterministic for (seed, index)."""
    rng = np.random.default_rng([seed, index])
    zz, yy, xx = (np.arange(n, dtype=np.float32) - n / 2 for n in shape)
    zz, yy, xx = zz[:, None, None], yy[None, :, None], xx[None, None, :]

    # Orthonormal frame: the sheet normal n is tilted up to ~35 degrees from a random axis.
    axis = np.eye(3)[rng.integers(3)]
    normal = axis + rng.normal(scale=0.35, size=3)
    normal /= np.linalg.norm(normal)
    a = np.cross(normal, rng.normal(size=3))
    a /= np.linalg.norm(a)
    b = np.cross(normal, a)
    pos = [zz, yy, xx]
    u = sum(float(n) * p for n, p in zip(normal, pos, strict=True))
    s = sum(float(c) * p for c, p in zip(a, pos, strict=True))
    t = sum(float(c) * p for c, p in zip(b, pos, strict=True))

    # Scroll curvature plus shared undulation: the depth coordinate along which sheets are stacked.
    radius = rng.uniform(150.0, 500.0) * rng.choice([-1, 1])
    depth = u + (s * s) / (2 * radius) + _smooth_field(rng, [s, t], rng.uniform(2.0, 6.0))

    extent = float(np.sqrt(sum(n * n for n in shape))) / 2 + 10
    offsets, o = [], -extent + rng.uniform(0, style.spacing[1])
    while o < extent:
        offsets.append(o)
        o += rng.uniform(*style.spacing)
    n_sheets = len(offsets)
    thickness = rng.uniform(2.0, 4.0, size=n_sheets)
    labelled = rng.random(n_sheets) > 0.25
    if not labelled.any():
        labelled[rng.integers(n_sheets)] = True
    # One adjacent pair is pushed together at a random spot so that the sheets touch or merge.
    merge_at = int(rng.integers(0, max(n_sheets - 1, 1)))
    centre = rng.uniform(-0.3, 0.3, size=2) * np.array(shape[1:])

    image = 0.14 + _smooth_field(rng, pos, 0.06)  # uneven packing material between the wraps
    sheet_id = np.zeros(shape, dtype=np.int16)  # 1-based sheet index, 0 outside sheets
    wavelengths = rng.uniform(2.5, 4.0), rng.uniform(2.5, 4.0)
    # Each sheet touches only voxels whose depth lies in its band: sort voxels by depth once.
    flat_s, flat_t = np.broadcast_to(s, shape).ravel(), np.broadcast_to(t, shape).ravel()
    depth_bins = np.floor(depth.ravel()).astype(np.int32)
    order = np.argsort(depth_bins, kind="stable")
    sorted_bins = depth_bins[order]
    flat_image, flat_id, flat_depth = image.reshape(-1), sheet_id.reshape(-1), depth.reshape(-1)
    for i, (off, thick) in enumerate(zip(offsets, thickness, strict=True)):
        shift_amp = rng.uniform(0.5, 2.5)
        gap = 0.0
        if i == merge_at + 1:
            gap = offsets[i] - offsets[i - 1] - 0.5 * (thickness[i] + thickness[i - 1]) + 0.8
        reach = thick / 2 + 1 + shift_amp * np.sqrt(2) + max(gap, 0.0) + 1
        a = np.searchsorted(sorted_bins, np.floor(off - reach))
        b = np.searchsorted(sorted_bins, np.floor(off + reach), side="right")
        idx = order[a:b]
        bs, bt = flat_s[idx], flat_t[idx]
        shift = _smooth_field(rng, [bs, bt], shift_amp, waves=2)
        if gap:
            width = rng.uniform(10, 20)
            bump = np.exp(-((bs - centre[0]) ** 2 + (bt - centre[1]) ** 2) / (2 * width**2))
            shift = shift - gap * bump
        rel = flat_depth[idx] - off - shift
        half = thick / 2
        inside = np.abs(rel) < half
        hit = idx[inside & (flat_id[idx] == 0)]
        flat_id[hit] = i + 1
        # Cross-ply fibres: one direction on the recto half, the other on the verso half.
        fibres = np.where(rel < 0, np.sin(2 * np.pi * bs / wavelengths[0]), np.sin(2 * np.pi * bt / wavelengths[1]))
        # Density varies along the sheet (damage, compression) as well as between sheets.
        patchy = 1 + _smooth_field(rng, [bs, bt], 0.35, waves=2)
        density = rng.uniform(0.32, 0.72) * patchy * (1 + 0.18 * fibres)
        profile = np.clip(half + 0.5 - np.abs(rel), 0, 1)  # partial-volume edges
        flat_image[idx] = np.maximum(flat_image[idx], density * profile)

    _add_debris(image, rng, style)
    image = ndimage.gaussian_filter(image, sigma=0.7)
    grad = rng.normal(size=3)
    grad /= np.linalg.norm(grad)
    ramp = sum(float(g) * p for g, p in zip(grad, pos, strict=True)) / (max(shape) / 2)
    image *= 1 + style.drift * ramp
    image += style.drift * 0.3 * ramp + rng.normal(scale=style.noise, size=shape).astype(np.float32)
    image = np.clip(image * 255, 0, 255).astype(np.uint8)

    label = np.zeros(shape, dtype=np.uint8)
    sheets = sheet_id > 0
    is_labelled = np.concatenate([[False], labelled])[sheet_id]
    unlabelled = sheets & ~is_labelled
    label[ndimage.binary_dilation(unlabelled, iterations=1)] = 2
    label[sheets & is_labelled] = 1
    if rng.random() < 0.6:  # an annotator left part of the chunk unlabelled
        cut = rng.normal(size=3)
        cut /= np.linalg.norm(cut)
        plane = sum(float(c) * p for c, p in zip(cut, pos, strict=True))
        label[plane > rng.uniform(0.35, 0.6) * max(shape) / 2] = 2
    for axis_i in range(3):
        sl = [slice(None)] * 3
        sl[axis_i] = np.r_[0:BORDER, shape[axis_i] - BORDER : shape[axis_i]]
        label[tuple(sl)] = 2
    return image, label


def _add_debris(image: np.ndarray, rng: np.random.Generator, style: ScrollStyle) -> None:
    """Dense compact blobs as bright as papyrus: a threshold cannot tell them from sheets."""
    count = int(style.debris * image.size / 8000)
    if count == 0:
        return
    seeds = np.zeros(image.shape, dtype=np.float32)
    idx = tuple(rng.integers(0, n, size=count) for n in image.shape)
    seeds[idx] = rng.uniform(0.5, 0.85, size=count)
    blobs = ndimage.grey_dilation(seeds, footprint=ndimage.generate_binary_structure(3, 1), size=None)
    blobs = ndimage.grey_dilation(blobs, size=(4, 4, 4))
    np.maximum(image, blobs, out=image)


def make_scroll_volume(shape: tuple[int, int, int], seed: int, index: int, style: ScrollStyle):
    """One chunk cut from a rolled scroll: (image uint8, label uint8), deterministic for (seed, index).

    Wraps are concentric shells around an axis tilted at random and passing through the chunk, so
    the sheet normal turns all the way round inside one chunk; the shells are squashed (a crushed
    scroll), share a smooth warp, and adjacent pairs are pressed into contact in places with a
    one-voxel unlabelled gap between them, the case where a prediction merges two sheets."""
    rng = np.random.default_rng([seed, 15485863, index])
    zz, yy, xx = (np.arange(n, dtype=np.float32) - n / 2 for n in shape)
    pos = [zz[:, None, None], yy[None, :, None], xx[None, None, :]]
    half = np.array(shape, dtype=np.float64) / 2

    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    e1 = np.cross(axis, rng.normal(size=3))
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(axis, e1)
    centre = rng.uniform(-0.25, 0.25, size=3) * half  # the axis passes through the chunk
    rel = [p - float(c) for p, c in zip(pos, centre, strict=True)]
    u1 = sum(float(c) * p for c, p in zip(e1, rel, strict=True))
    u2 = sum(float(c) * p for c, p in zip(e2, rel, strict=True))
    along = sum(float(c) * p for c, p in zip(axis, rel, strict=True))
    squash = rng.uniform(1.0, 1.35)  # a crushed scroll: elliptical wraps
    radius = np.sqrt((u1 / squash) ** 2 + (u2 * squash) ** 2)
    depth = radius + _smooth_field(rng, pos, rng.uniform(1.5, 4.0))

    r_max = float(np.linalg.norm(half + np.abs(centre))) * squash + 8
    radii, r = [], rng.uniform(6.0, 12.0)  # the hollow core: no wrap inside it
    while r < r_max:
        radii.append(r)
        r += rng.uniform(*style.spacing)
    n = len(radii)
    base_thick = rng.uniform(2.5, 4.5, size=n)
    labelled = rng.random(n) > 0.2
    labelled[rng.integers(n)] = False  # at least one unlabelled wrap per chunk
    if not labelled.any():
        labelled[-1] = True
    contact_pairs = rng.choice(np.arange(1, n), size=min(3, n - 1), replace=False) if n > 1 else []
    contact_at = {int(k): (rng.normal(size=3) * half / 2) for k in contact_pairs}

    image = 0.12 + _smooth_field(rng, pos, 0.05)
    sheet_id = np.zeros(shape, dtype=np.int16)
    flat_pos = [np.broadcast_to(p, shape).ravel() for p in pos]
    flat_u1, flat_u2 = (np.broadcast_to(v, shape).ravel() for v in (u1, u2))
    flat_along = np.broadcast_to(along, shape).ravel()
    depth_bins = np.floor(depth.ravel()).astype(np.int32)
    order = np.argsort(depth_bins, kind="stable")
    sorted_bins = depth_bins[order]
    flat_image, flat_id, flat_depth = image.reshape(-1), sheet_id.reshape(-1), depth.reshape(-1)
    for i, (r0, thick0) in enumerate(zip(radii, base_thick, strict=True)):
        gap = radii[i] - radii[i - 1] - 0.5 * (thick0 + base_thick[i - 1]) if i in contact_at else 0.0
        reach = thick0 * 0.8 + 2.5 + gap + 1
        a = np.searchsorted(sorted_bins, np.floor(r0 - reach))
        b = np.searchsorted(sorted_bins, np.floor(r0 + reach), side="right")
        idx = order[a:b]
        if idx.size == 0:
            continue
        p = [c[idx] for c in flat_pos]
        shift = _smooth_field(rng, p, rng.uniform(0.3, 1.2), waves=2)
        if gap:  # pressed inwards onto the wrap below, over a patch 15-30 voxels wide
            width = rng.uniform(15, 30)
            d2 = sum((c - float(m)) ** 2 for c, m in zip(p, contact_at[i], strict=True))
            shift = shift - max(gap - 1.2, 0.0) * np.exp(-d2 / (2 * width**2))  # about a voxel apart
        thick = thick0 * (1 + _smooth_field(rng, p, 0.3, waves=2))  # thickness varies along the wrap
        rel_d = flat_depth[idx] - r0 - shift
        halfw = np.maximum(thick, 2.0) / 2  # thinner bands leak: the labels would be full of pinholes
        inside = np.abs(rel_d) < halfw
        hit = idx[inside & (flat_id[idx] == 0)]
        flat_id[hit] = i + 1
        # Fibre texture of this wrap: its own wavelengths, angle and contrast (neighbours differ).
        arc = np.arctan2(flat_u2[idx], flat_u1[idx]) * r0
        h = flat_along[idx]
        ang = rng.uniform(-0.4, 0.4)
        lam = rng.uniform(2.5, 5.0, size=2)
        ca, sa = np.cos(ang), np.sin(ang)
        recto = np.sin(2 * np.pi * (ca * h + sa * arc) / lam[0])
        verso = np.sin(2 * np.pi * (ca * arc - sa * h) / lam[1])
        fibres = np.where(rel_d < 0, recto, verso) * rng.uniform(0.08, 0.3)
        density = rng.uniform(0.35, 0.7) * (1 + _smooth_field(rng, p, 0.3, waves=2)) * (1 + fibres)
        profile = np.clip(halfw + 0.5 - np.abs(rel_d), 0, 1)
        flat_image[idx] = np.maximum(flat_image[idx], density * profile)

    _add_debris(image, rng, style)
    _add_inclusions(image, rng)
    image = ndimage.gaussian_filter(image, sigma=0.7)
    image = _add_ct_artifacts(image, rng, pos, style)
    image = np.clip(image * 255, 0, 255).astype(np.uint8)
    label = _scroll_labels(sheet_id, labelled, rng, pos, shape)
    return image, label


def _add_inclusions(image: np.ndarray, rng: np.random.Generator) -> None:
    """A few dense mineral grains, far brighter than papyrus, 2-5 voxels across."""
    for _ in range(int(rng.integers(2, 6))):
        c = [rng.uniform(0, n) for n in image.shape]
        rad = rng.uniform(1.0, 2.5)
        sl = tuple(slice(max(int(ci - rad - 1), 0), min(int(ci + rad + 2), n)) for ci, n in zip(c, image.shape, strict=True))
        grid = np.ogrid[sl]
        d2 = sum((g - ci) ** 2 for g, ci in zip(grid, c, strict=True))
        np.maximum(image[sl], np.where(d2 <= rad * rad, rng.uniform(0.9, 1.1), 0).astype(np.float32), out=image[sl])


def _add_ct_artifacts(image: np.ndarray, rng: np.random.Generator, pos: list[np.ndarray], style: ScrollStyle):
    """Ring artifacts and beam hardening around the scanner's rotation axis (the volume's z, off
    the chunk), a linear drift, and noise."""
    shape = image.shape
    rot = rng.uniform(-1.5, 1.5, size=2) * np.array(shape[1:]) / 2
    rho = np.sqrt((pos[1] - rot[0]) ** 2 + (pos[2] - rot[1]) ** 2)  # (1, Y, X): constant along z
    rings = np.zeros_like(rho)
    for _ in range(int(rng.integers(4, 9))):
        r = rng.uniform(rho.min(), rho.max())
        rings += rng.choice([-1, 1]) * rng.uniform(0.04, 0.1) * np.exp(-((rho - r) ** 2) / (2 * rng.uniform(0.4, 0.9) ** 2))
    cupping = rng.uniform(0.15, 0.35) * ((rho - rho.min()) / max(float(np.ptp(rho)), 1.0) - 0.5)  # beam hardening
    grad = rng.normal(size=3)
    grad /= np.linalg.norm(grad)
    ramp = sum(float(g) * p for g, p in zip(grad, pos, strict=True)) / (max(shape) / 2)
    image = image * (1 + style.drift * 0.6 * ramp + cupping) + rings
    return image + rng.normal(scale=style.noise, size=shape).astype(np.float32)


def _scroll_labels(sheet_id, labelled, rng, pos, shape):
    """Kaggle-like partial labels: 1 on labelled wraps, 2 on unlabelled wraps (and a voxel round
    them), on one unlabelled region and the 3-voxel border; a wrap touching a lower one keeps a
    one-voxel gap (its contact voxels are 0), so touching wraps stay separate components."""
    big = np.int16(np.iinfo(np.int16).max)
    lower = ndimage.minimum_filter(np.where(sheet_id > 0, sheet_id, big), size=3)
    contact = (sheet_id > 0) & (lower < sheet_id)
    sheets = (sheet_id > 0) & ~contact
    is_labelled = np.concatenate([[False], labelled])[sheet_id]
    label = np.zeros(shape, dtype=np.uint8)
    label[ndimage.binary_dilation(sheets & ~is_labelled, iterations=1)] = 2
    label[sheets & is_labelled] = 1
    half = np.array(shape) / 2
    c = rng.uniform(-0.6, 0.6, size=3) * half
    rad = rng.uniform(0.25, 0.4) * max(shape)
    d2 = sum((p - float(ci)) ** 2 for p, ci in zip(pos, c, strict=True))
    label[d2 < rad * rad] = 2  # one region the annotators left out
    for axis_i in range(3):
        sl = [slice(None)] * 3
        sl[axis_i] = np.r_[0:BORDER, shape[axis_i] - BORDER : shape[axis_i]]
        label[tuple(sl)] = 2
    return label


def parse_shape(text: str | int | tuple) -> tuple[int, int, int]:
    """'96' -> (96, 96, 96); '64,96,96' -> (64, 96, 96)."""
    if isinstance(text, int):
        parts = [text]
    elif isinstance(text, tuple | list):
        parts = list(text)
    else:
        parts = [p for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise DataError(f"shape {text!r}: expected N or Z,Y,X integers") from None
    if len(dims) == 1:
        dims *= 3
    if len(dims) != 3 or min(dims) < 2 * BORDER + 8:
        raise DataError(f"shape {text!r}: need 3 sizes, each at least {2 * BORDER + 8}")
    return tuple(dims)


def synth(
    out: str | Path,
    volumes: int,
    shape: tuple[int, int, int],
    seed: int = 0,
    scrolls: int = 4,
    test_volumes: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    geometry: str = "planar",
) -> list[tuple[str, str]]:
    """Write a synthetic dataset in the Kaggle layout; returns the (id, scroll_id) rows."""
    out = Path(out)
    if geometry not in GEOMETRIES:
        raise DataError(f"--geometry {geometry!r}: must be one of {', '.join(GEOMETRIES)}")
    make = make_scroll_volume if geometry == "scroll" else make_volume
    if volumes < 1:
        raise DataError(f"--volumes {volumes}: need at least 1")
    if not 1 <= scrolls <= len(SCROLL_IDS):
        raise DataError(f"--scrolls {scrolls}: must be 1..{len(SCROLL_IDS)}")
    if out.exists() and any(out.iterdir()):
        if not (overwrite and (out / MARKER).is_file()):
            raise DataError(
                f"{out}: directory is not empty"
                + ("" if (out / MARKER).is_file() else " and is not a synthetic dataset; choose another path")
                + ("; pass --overwrite to replace it" if (out / MARKER).is_file() else "")
            )
        shutil.rmtree(out)
    ids = _volume_ids(seed, volumes + test_volumes)
    styles = [scroll_style(seed, k) for k in range(scrolls)]
    rows = []
    jobs = [("train", k) for k in range(volumes)] + [("test", k) for k in range(test_volumes)]
    for j, (split, k) in enumerate(tqdm(jobs, desc="synth", unit="vol", disable=not progress)):
        scroll_index = k % scrolls
        image, label = make(shape, seed, j, styles[scroll_index])
        rid, sid = ids[j], SCROLL_IDS[scroll_index]
        if split == "train":
            write_volume(out / IMAGE_DIR / f"{rid}.tif", image)
            write_volume(out / LABEL_DIR / f"{rid}.tif", label)
            rows.append((rid, sid))
        else:
            write_volume(out / "test_images" / f"{rid}.tif", image)
    _write_csv(out / TRAIN_CSV, rows)
    if test_volumes:
        _write_csv(out / "test.csv", [(ids[volumes + k], SCROLL_IDS[k % scrolls]) for k in range(test_volumes)])
    params = {"volumes": volumes, "shape": list(shape), "seed": seed, "scrolls": scrolls, "test_volumes": test_volumes,
              "geometry": geometry}
    atomic_write_text(out / MARKER, json.dumps(params, indent=1) + "\n")
    return rows


def _volume_ids(seed: int, n: int) -> list[str]:
    """Distinct Kaggle-like numeric ids, deterministic for the seed."""
    rng, ids = np.random.default_rng([seed, 104729]), []
    while len(ids) < n:
        candidate = str(int(rng.integers(10**8, 2 * 10**9)))
        if candidate not in ids:
            ids.append(candidate)
    return ids


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    text = "id,scroll_id\n" + "".join(f"{r},{s}\n" for r, s in rows)
    atomic_write_text(path, text)
