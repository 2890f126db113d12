"""Predict masks for whole volumes with a checkpoint: uint8 TIFFs plus a Kaggle submission.zip, or,
for a Zarr / OME-Zarr volume of any size, a Zarr mask written block by block.

The checkpoint carries its resolved config, so the model, patch size, sliding-window settings and
post-processing are the ones it was trained and validated with (overridable from the CLI).

A Zarr volume is cut into blocks (a multiple of the output chunks); each block is read with a
halo of half a patch, run through ``inference.predict_volume`` (windows, TTA, post-processing)
like any in-memory volume, and its core written to ``{name}.zarr/mask``. Memory is one block's,
whatever the volume's size. ``part=(I, N)`` takes every N-th block from the I-th, so N array-job
tasks (SLURM, torchrun across nodes) share one output store; finished blocks are marked in the
store, so a killed task resumes where it stopped. Post-processing sees a block and its halo: a
component that spans blocks is judged within each block's view of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vesuvius_lab.config import Config
from vesuvius_lab.device import default_device
from vesuvius_lab.errors import DataError
from vesuvius_lab.inference import model_from_checkpoint, predict_volume
from vesuvius_lab.training.run_dir import checkpoint_sources
from vesuvius_lab.io import ZarrRef, ZarrVolume, atomic_path, atomic_write_text, is_zarr_path, read_volume, write_volume

OUTPUT_CHUNK = 64
Part = tuple[int, int]


def parse_part(text: str) -> Part:
    """``"I/N"`` (1 <= I <= N) as (I, N)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise DataError(f"--part {text!r}: expected I/N, e.g. 3/8") from None
    if not 1 <= i <= n:
        raise DataError(f"--part {text!r}: need 1 <= I <= N")
    return i, n


def input_volumes(source: str | os.PathLike) -> list[Path]:
    source = Path(source)
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(source.glob("*.tif")) + sorted(source.glob("*.tiff"))
        if files:
            return files
        raise DataError(f"{source}: no .tif volumes in this folder")
    raise DataError(f"{source}: no such file or folder")


def predict(
    checkpoint: str | os.PathLike | Sequence[str | os.PathLike],
    source: str | os.PathLike,
    output: str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    device: str | None = None,
    progress: bool = True,
    weights: str = "auto",
    part: Part = (1, 1),
    ref: ZarrRef | None = None,
    block: Sequence[int] | None = None,
    probability: bool = False,
) -> list[Path]:
    """TIFF input: ``{id}.tif`` masks (input shape, uint8 0/1) and, unless split into parts,
    ``submission.zip`` in ``output``. Zarr input (a store, with ``ref`` inside it): the mask as
    ``output/{store name}.zarr``, this part's blocks (see ``predict_store``).

    Several checkpoints (or run folders, or glob patterns) predict as an ensemble that averages
    their probabilities; ``weights`` picks a checkpoint's EMA or trained weights (``inference``)."""
    model, config = model_from_checkpoint(checkpoint, overrides, weights)
    dev = torch.device(device) if device else default_device()
    model.to(dev)
    out_dir = Path(output)
    if ref is not None or is_zarr_path(source):
        name = Path(source).name.removesuffix(".zarr").removesuffix(".ome")
        target = out_dir / f"{name}.zarr"
        sources = checkpoint_sources([checkpoint] if isinstance(checkpoint, str | os.PathLike) else checkpoint)
        predict_store(model, config, source, ref, target, dev, part, block, probability, progress,
                      [f"{p.resolve()} ({weights})" for p in sources])
        return [target]
    files = input_volumes(source)[part[0] - 1 :: part[1]]
    written = []
    for path in tqdm(files, desc="predict", unit="vol", disable=not progress):
        mask = predict_volume(model, read_volume(path), config, dev).mask.astype(np.uint8)
        target = out_dir / f"{path.stem}.tif"
        write_volume(target, mask)
        written.append(target)
    if part[1] == 1:
        with atomic_path(out_dir / "submission.zip") as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for target in written:
                    zf.write(target, arcname=target.name)
    return written


# --- windowed Zarr prediction --------------------------------------------------------------------
def default_block(patch: Sequence[int], shape: Sequence[int]) -> tuple[int, int, int]:
    """Per axis: the whole axis up to 384 voxels (or 3 patches), so a Kaggle-sized volume is one
    block with no halo work; else 256 or twice the patch in whole output chunks. A block with its
    halo (float32 input, output and window weights) stays near 1.5 GB at a 128 patch."""
    return tuple(n if n <= max(384, 3 * p) else max(256, math.ceil(2 * p / OUTPUT_CHUNK) * OUTPUT_CHUNK)
                 for p, n in zip(patch, shape, strict=True))  # type: ignore[return-value]


def blocks(shape: Sequence[int], block: Sequence[int], halo: Sequence[int]) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """(core box, read box) of every block in C order; the read box is the core plus ``halo``,
    clipped to the volume."""
    out = []
    starts = [range(0, n, b) for n, b in zip(shape, block, strict=True)]
    for lo in itertools.product(*starts):
        core = tuple(slice(a, min(a + b, n)) for a, b, n in zip(lo, block, shape, strict=True))
        read = tuple(slice(max(0, c.start - h), min(n, c.stop + h)) for c, h, n in zip(core, halo, shape, strict=True))
        out.append((core, read))
    return out


def predict_block(model: torch.nn.Module, image: np.ndarray, core: tuple[slice, ...], read: tuple[slice, ...],
                  config: Config, device: torch.device):
    """The in-memory path on one block's read box, cut to its core: (mask, probability)."""
    pred = predict_volume(model, image, config, device)
    inner = tuple(slice(c.start - r.start, c.stop - r.start) for c, r in zip(core, read, strict=True))
    return pred.mask[inner].astype(np.uint8), pred.probability[inner]


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _open_output(target: Path, shape, block, identity: dict, probability: bool):
    """The output group, created by the first part to get here; any other content is refused."""
    import zarr

    target.mkdir(parents=True, exist_ok=True)
    with _locked(target / ".lock"):
        if (target / "zarr.json").is_file():
            group = zarr.open_group(str(target), mode="r+")
            if group.attrs.get("vesuvius_lab") != identity:
                raise DataError(f"{target}: holds another prediction (other input, block or checkpoint settings); "
                                "choose another output folder")
        else:
            group = zarr.open_group(str(target), mode="w", attributes={"vesuvius_lab": identity})
            chunks = tuple(min(OUTPUT_CHUNK, b) for b in block)
            group.create_array("mask", shape=shape, dtype="uint8", chunks=chunks, fill_value=0)
            if probability:
                group.create_array("probability", shape=shape, dtype="uint8", chunks=chunks, fill_value=0)
    return group


def predict_store(
    model: torch.nn.Module,
    config: Config,
    store: str | os.PathLike,
    ref: ZarrRef | None,
    target: str | os.PathLike,
    device: torch.device,
    part: Part = (1, 1),
    block: Sequence[int] | None = None,
    probability: bool = False,
    progress: bool = True,
    checkpoints: Sequence[str] = (),
) -> dict:
    """Predict a Zarr volume block by block into the Zarr group ``target`` (``mask``: uint8 0/1;
    ``probability``: uint8, 255 = 1, when asked). Returns how many blocks this part wrote and how
    many of all are done."""
    volume = ZarrVolume(store, ref or ZarrRef())
    if volume.dtype != np.uint8:
        raise DataError(f"{volume.where}: dtype {volume.dtype}, expected uint8")
    patch = tuple(int(p) for p in config.data.patch_size)
    block = tuple(int(b) for b in (block or default_block(patch, volume.shape)))
    if any(b > OUTPUT_CHUNK and b % OUTPUT_CHUNK and b < n for b, n in zip(block, volume.shape, strict=True)):
        raise DataError(f"block {block}: sizes above {OUTPUT_CHUNK} must be multiples of it (the output chunks)")
    halo = tuple(p // 2 for p in patch)
    target = Path(target)
    identity = {"source": volume.where, "block": list(block), "halo": list(halo),
                "val": {k: v for k, v in vars(config.val).items() if k != "max_volumes"},
                "postprocess": json.loads(json.dumps(vars(config.postprocess), default=str)), "probability": probability,
                "checkpoints": list(checkpoints)}
    group = _open_output(target, volume.shape, block, identity, probability)
    done_dir = target / ".blocks"
    done_dir.mkdir(exist_ok=True)
    all_blocks = blocks(volume.shape, block, halo)
    mine = [k for k in range(len(all_blocks)) if k % part[1] == part[0] - 1]
    todo = [k for k in mine if not (done_dir / str(k)).is_file()]
    for k in tqdm(todo, desc=f"predict part {part[0]}/{part[1]}", unit="block", disable=not progress):
        core, read = all_blocks[k]
        mask, prob = predict_block(model, volume.read(read), core, read, config, device)
        group["mask"][core] = mask
        if probability:
            group["probability"][core] = np.round(prob * 255).astype(np.uint8)
        atomic_write_text(done_dir / str(k), "")
    finished = sum(1 for k in range(len(all_blocks)) if (done_dir / str(k)).is_file())
    return {"written": len(todo), "part_blocks": len(mine), "done": finished, "blocks": len(all_blocks)}
