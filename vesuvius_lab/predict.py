"""Predict masks for whole volumes with a checkpoint: uint8 TIFFs plus a Kaggle submission.zip, or,
for a Zarr / OME-Zarr volume of any size, a Zarr mask written block by block.

The checkpoint carries its resolved config, so the model, patch size, sliding-window settings and
post-processing are the ones it was trained and validated with (overridable from the CLI).

A folder of TIFFs is checked whole from the files' headers before the first volume is predicted.
Each mask is written atomically, then a record beside it (``.predict/{id}.json``: the weights'
digest, the inference settings, the input's size and mtime, the mask's); a rerun keeps every
mask whose record matches, so a killed run continues where it stopped and a changed checkpoint,
setting or input is predicted again.

A Zarr volume is cut into blocks (a multiple of the output chunks); each block is read with a
halo of half a patch, run through ``inference.predict_volume`` (windows, TTA, post-processing)
like any in-memory volume, and its core written to ``{name}.zarr/mask``. Memory is one block's,
whatever the volume's size. ``part=(I, N)`` takes every N-th block from the I-th, so N array-job
tasks (SLURM, torchrun across nodes) share one output store; finished blocks are marked in the
store, so a killed task resumes where it stopped. Post-processing sees a block and its halo: a
component that spans blocks is judged within each block's view of it.
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import os
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vesuvius_lab.config import Config
from vesuvius_lab.device import default_device
from vesuvius_lab.errors import DataError
from vesuvius_lab.inference import inference_settings, model_from_checkpoint, predict_volume
from vesuvius_lab.io import (TEMP_SUFFIX, ZarrRef, ZarrVolume, atomic_path, atomic_write_text, is_zarr_path, locked,
                             read_volume, source_signature, tiff_info, write_volume)
from vesuvius_lab.model import input_channels
from vesuvius_lab.training.run_dir import checkpoint_sources, weights_digest

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


TIFF_SUFFIXES = (".tif", ".tiff")
RECORDS = ".predict"  # in the output folder: {id}.json per mask, what it was made with
SHOWN = 5  # names listed in a line about skipped files


def input_volumes(source: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """The .tif / .tiff volumes of a folder by name (or the one file given), and the names of the
    folder's other entries, which predict names as skipped (a folder with a trailing /). Hidden
    entries (a leading dot: macOS ``._`` twins of TIFFs, ``.ipynb_checkpoints``, temp files) are
    neither: they are nobody's volumes and would only be reported as corrupt."""
    source = Path(source)
    if source.is_file():
        return [source], []
    if not source.is_dir():
        raise DataError(f"{source}: no such file or folder")
    volumes, skipped = [], []
    for entry in sorted(source.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in TIFF_SUFFIXES:
            volumes.append(entry)
        else:
            skipped.append(entry.name + ("/" if entry.is_dir() else ""))
    if not volumes:
        raise DataError(f"{source}: no .tif volumes in this folder")
    return volumes, skipped


def check_inputs(files: Sequence[Path], channels: int) -> list[str]:
    """Every problem that would stop a volume's prediction, one line each, from the TIFF headers
    alone (no pixel decoded): unreadable or truncated, not 3D, not uint8, other channels than the
    model takes. Run before the first prediction, so a bad file at the end of a folder costs no
    hours of predicting the others first; corrupt compressed data inside a file is found only when
    it is decoded."""
    problems = []
    for path in files:
        try:
            info = tiff_info(path)
        except DataError as exc:
            problems.extend(exc.lines)
            continue
        if info.channels != channels:
            problems.append(f"{path}: {info.channels} channels per voxel (shape {info.shape}, axes {info.axes}); "
                            f"the model takes {channels}")
        elif len(info.spatial_shape) != 3:
            problems.append(f"{path}: expected a 3D volume, found shape {info.shape}")
        if info.dtype != np.uint8:
            problems.append(f"{path}: dtype {info.dtype}, expected uint8")
    return problems


def same_mask_names(files: Sequence[Path]) -> list[str]:
    """Inputs that would write one mask (``a.tif`` and ``a.tiff``)."""
    first: dict[str, Path] = {}
    problems = []
    for path in files:
        if path.stem in first:
            problems.append(f"{path}: would write the same mask {path.stem}.tif as {first[path.stem]}; rename one")
        first.setdefault(path.stem, path)
    return problems


def prediction_identity(model: torch.nn.Module, config: Config) -> dict:
    """What a prediction is made with: the weights by content (a checkpoint, its EMA or an ensemble)
    and the inference settings. Equal identities make equal masks, so a rerun keeps what it finds
    done: a TIFF mask's record, a Zarr store's attributes."""
    return {"weights": weights_digest(model), **inference_settings(config)}


def _mask_done(target: Path, record: Path, identity: dict) -> bool:
    """The mask is in place, untouched since its record, which names this identity."""
    try:
        made = json.loads(record.read_text(encoding="utf-8"))
        return made["identity"] == identity and made["mask"] == source_signature(target)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove_stale_temp(target: Path) -> None:
    """The temp files a killed write of ``target`` left (``io.atomic_path``); only this file's, so
    parts writing other masks into the folder are left alone."""
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*{TEMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


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
    overwrite: bool = False,
) -> list[Path]:
    """TIFF input: ``{id}.tif`` masks (input shape, uint8 0/1) and, unless split into parts,
    ``submission.zip`` in ``output``; returns this part's masks. Zarr input (a store, with ``ref``
    inside it): the mask as ``output/{store name}.zarr``, this part's blocks (see ``predict_store``).

    Every input is checked from its headers before the first prediction (``check_inputs``); any
    problem raises DataError with one line per file and nothing is written. A mask whose record in
    ``output/.predict/`` names the same weights, settings and input file (size, mtime) is kept, not
    predicted again, unless ``overwrite``; so a killed run, rerun, does only the rest. Non-TIFF
    entries of the input folder are named on stderr as skipped.

    Several checkpoints (or run folders, or glob patterns) predict as an ensemble that averages
    their probabilities; ``weights`` picks a checkpoint's EMA or trained weights (``inference``)."""
    out_dir = Path(output)
    sources = checkpoint_sources([checkpoint] if isinstance(checkpoint, str | os.PathLike) else checkpoint)
    made_by = [f"{p.resolve()} ({weights})" for p in sources]
    if ref is not None or is_zarr_path(source):
        if overwrite:
            raise DataError(f"{source}: overwrite applies to TIFF input; delete the output store to predict it again")
        model, config = model_from_checkpoint(sources, overrides, weights)
        dev = torch.device(device) if device else default_device()
        name = Path(source).name.removesuffix(".zarr").removesuffix(".ome")
        target = out_dir / f"{name}.zarr"
        predict_store(model.to(dev), config, source, ref, target, dev, part, block, probability, progress, made_by)
        return [target]
    volumes, skipped = input_volumes(source)
    if skipped:
        more = ", ..." if len(skipped) > SHOWN else ""
        print(f"{source}: skipped {len(skipped)} files that are not .tif volumes: {', '.join(skipped[:SHOWN])}{more}",
              file=sys.stderr)
    if out_dir.resolve() in {p.parent.resolve() for p in volumes}:
        raise DataError(f"{out_dir}: is the input folder; the masks would replace its volumes, choose another output")
    model, config = model_from_checkpoint(sources, overrides, weights)
    files = volumes[part[0] - 1 :: part[1]]
    problems = same_mask_names(volumes) + check_inputs(files, input_channels(model))
    if problems:
        raise DataError(problems)
    identity = prediction_identity(model, config)
    dev = torch.device(device) if device else default_device()
    model.to(dev)
    masks = [out_dir / f"{path.stem}.tif" for path in files]
    records = [out_dir / RECORDS / f"{path.stem}.json" for path in files]
    inputs = [{**identity, "input": [path.name, *source_signature(path)]} for path in files]
    todo = [k for k in range(len(files)) if overwrite or not _mask_done(masks[k], records[k], inputs[k])]
    if len(todo) < len(files):
        print(f"{out_dir}: {len(files) - len(todo)} of {len(files)} masks already made with these weights and "
              "settings, kept (--overwrite predicts them again)", file=sys.stderr)
    for k in tqdm(todo, desc="predict", unit="vol", total=len(files), initial=len(files) - len(todo),
                  disable=not progress):
        _remove_stale_temp(masks[k])
        _remove_stale_temp(records[k])
        mask = predict_volume(model, read_volume(files[k]), config, dev).mask.astype(np.uint8)
        write_volume(masks[k], mask)
        record = {"identity": inputs[k], "mask": source_signature(masks[k]), "checkpoints": made_by}
        atomic_write_text(records[k], json.dumps(record, indent=1) + "\n")
    if part[1] == 1:
        with atomic_path(out_dir / "submission.zip") as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for target in masks:
                    zf.write(target, arcname=target.name)
    return masks


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


def _open_output(target: Path, shape, block, identity: dict, probability: bool, checkpoints: list[str]):
    """The output group, created by the first part to get here (``checkpoints`` recorded beside the
    identity, for whoever reads it); a group of another identity is refused."""
    import zarr

    target.mkdir(parents=True, exist_ok=True)
    with locked(target / ".lock"):
        if (target / "zarr.json").is_file():
            group = zarr.open_group(str(target), mode="r+")
            if group.attrs.get("vesuvius_lab") != identity:
                raise DataError(f"{target}: holds another prediction (other input, block or checkpoint settings); "
                                "choose another output folder")
        else:
            group = zarr.open_group(str(target), mode="w", attributes={"vesuvius_lab": identity, "checkpoints": checkpoints})
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
    ``probability``: uint8, 255 = 1, when asked). Blocks marked done are kept when the store's
    identity (``prediction_identity`` of this input, block and halo) is this call's; a store of
    another is refused. Returns how many blocks this part wrote and how many of all are done."""
    volume = ZarrVolume(store, ref or ZarrRef())
    if volume.dtype != np.uint8:
        raise DataError(f"{volume.where}: dtype {volume.dtype}, expected uint8")
    patch = tuple(int(p) for p in config.data.patch_size)
    block = tuple(int(b) for b in (block or default_block(patch, volume.shape)))
    if any(b > OUTPUT_CHUNK and b % OUTPUT_CHUNK and b < n for b, n in zip(block, volume.shape, strict=True)):
        raise DataError(f"block {block}: sizes above {OUTPUT_CHUNK} must be multiples of it (the output chunks)")
    halo = tuple(p // 2 for p in patch)
    target = Path(target)
    identity = {"source": volume.where, "block": list(block), "halo": list(halo), "probability": probability,
                **prediction_identity(model, config)}
    group = _open_output(target, volume.shape, block, identity, probability, list(checkpoints))
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
