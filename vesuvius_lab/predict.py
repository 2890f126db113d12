"""Predict masks for whole volumes with a checkpoint: uint8 TIFFs plus a Kaggle submission.zip.

The checkpoint carries its resolved config, so the model, patch size, sliding-window settings and
post-processing are the ones it was trained and validated with (overridable from the CLI).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vesuvius_lab.device import default_device
from vesuvius_lab.errors import DataError
from vesuvius_lab.inference import model_from_checkpoint, predict_volume
from vesuvius_lab.io import atomic_path, read_volume, write_volume


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
) -> list[Path]:
    """Write ``{id}.tif`` masks (input shape, uint8 0/1) and ``submission.zip`` to ``output``.

    Several checkpoints (or run folders, or glob patterns) predict as an ensemble that averages
    their probabilities; ``weights`` picks a checkpoint's EMA or trained weights (``inference``)."""
    model, config = model_from_checkpoint(checkpoint, overrides, weights)
    files = input_volumes(source)
    dev = torch.device(device) if device else default_device()
    model.to(dev)
    out_dir = Path(output)
    written = []
    for path in tqdm(files, desc="predict", unit="vol", disable=not progress):
        mask = predict_volume(model, read_volume(path), config, dev).mask.astype(np.uint8)
        target = out_dir / f"{path.stem}.tif"
        write_volume(target, mask)
        written.append(target)
    with atomic_path(out_dir / "submission.zip") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for target in written:
                zf.write(target, arcname=target.name)
    return written
