"""Predict masks for whole volumes with a checkpoint: uint8 TIFFs plus a Kaggle submission.zip.

The checkpoint carries its resolved config, so the model, patch size, sliding-window settings and
post-processing are the ones it was trained and validated with (overridable from the CLI).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vesuvius_lab.config import Config, config_from_dict
from vesuvius_lab.errors import DataError
from vesuvius_lab.inference import predict_probabilities
from vesuvius_lab.io import atomic_path, read_volume, write_volume
from vesuvius_lab.model import build_model
from vesuvius_lab.postprocess import postprocess
from vesuvius_lab.train import load_checkpoint


def model_from_checkpoint(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> tuple[torch.nn.Module, Config]:
    """The trained model (eval mode) and the config it was trained with."""
    ckpt = load_checkpoint(Path(path))
    if "config" not in ckpt or "model" not in ckpt:
        raise DataError(f"{path}: not a vesuvius_lab checkpoint (no config or model)")
    config = config_from_dict(ckpt["config"], overrides, origin=f"{path} (stored config)")
    model = build_model(config.model)
    model.load_state_dict(ckpt["model"])
    return model.eval(), config


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
    checkpoint: str | os.PathLike,
    source: str | os.PathLike,
    output: str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    device: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write ``{id}.tif`` masks (input shape, uint8 0/1) and ``submission.zip`` to ``output``."""
    model, config = model_from_checkpoint(checkpoint, overrides)
    files = input_volumes(source)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.optim.amp)
    out_dir = Path(output)
    written = []
    for path in tqdm(files, desc="predict", unit="vol", disable=not progress):
        image = read_volume(path)
        prob = predict_probabilities(model, image, config.data.patch_size, config.val.overlap, config.val.batch,
                                     config.val.tta, dev, amp, progress=False)
        mask = postprocess(prob, config.postprocess).astype(np.uint8)
        target = out_dir / f"{path.stem}.tif"
        write_volume(target, mask)
        written.append(target)
    with atomic_path(out_dir / "submission.zip") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for target in written:
                zf.write(target, arcname=target.name)
    return written
