"""Inference over whole volumes of any shape: the one predict-and-post-process path.

``predict_volume`` is what validation, ``vesuvius-lab predict`` and notebook 05 call: sliding
windows blended with a Gaussian (MONAI's inferer), ``val.batch`` windows through the model at once,
``val.tta`` mirror test-time augmentation, autocast on CUDA as ``optim.amp`` says (the stitched
volume stays on the CPU), then the config's ``postprocess`` section.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from vesuvius_lab.config import Config, config_from_dict
from vesuvius_lab.device import amp_dtype
from vesuvius_lab.errors import DataError
from vesuvius_lab.model import as_input, build_model
from vesuvius_lab.postprocess import postprocess
from vesuvius_lab.training.run_dir import load_checkpoint


def _mirrors(tta: bool) -> list[tuple[int, ...]]:
    if not tta:
        return [()]
    return [tuple(d for d, on in zip((2, 3, 4), flags, strict=True) if on) for flags in itertools.product((0, 1), repeat=3)]


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    image: np.ndarray,
    patch_size: Sequence[int],
    overlap: float = 0.25,
    batch: int = 2,
    tta: bool = False,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Foreground probability (float32, same shape as ``image``) of a uint8 volume."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)[None, None]
    mirrors = _mirrors(tta)
    use_amp = device.type == "cuda" and amp_dtype is not None

    def predictor(window: torch.Tensor) -> torch.Tensor:
        window = window.to(device, non_blocking=True)
        total = torch.zeros_like(window, dtype=torch.float32)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            for dims in mirrors:
                flipped = window.flip(dims) if dims else window
                prob = torch.sigmoid(model(as_input(flipped)).float())
                total += prob.flip(dims) if dims else prob
        return total / len(mirrors)

    try:
        out = sliding_window_inference(
            x,
            roi_size=tuple(int(p) for p in patch_size),
            sw_batch_size=batch,
            predictor=predictor,
            overlap=overlap,
            mode="gaussian",
            padding_mode="constant",
            cval=0.0,
            sw_device=device,
            device=torch.device("cpu"),
            progress=progress,
        )
    finally:
        model.train(was_training)
    return out[0, 0].numpy()


@dataclass
class Prediction:
    probability: np.ndarray  # float32 foreground probability, the volume's shape
    mask: np.ndarray  # the post-processed binary mask


def predict_volume(model: torch.nn.Module, image: np.ndarray, config: Config, device: torch.device | str,
                   progress: bool = False) -> Prediction:
    """Probabilities and the post-processed mask of one volume, with the config's inference settings."""
    v = config.val
    prob = predict_probabilities(model, image, config.data.patch_size, v.overlap, v.batch, v.tta, device,
                                 amp_dtype(config.optim.amp, device), progress=progress)
    return Prediction(prob, postprocess(prob, config.postprocess))


def model_from_checkpoint(path: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[torch.nn.Module, Config]:
    """The trained model (eval mode) and the config it was trained with, ``overrides`` applied."""
    ckpt = load_checkpoint(Path(path))
    if "config" not in ckpt or "model" not in ckpt:
        raise DataError(f"{path}: not a vesuvius_lab checkpoint (no config or model)")
    config = config_from_dict(ckpt["config"], overrides, origin=f"{path} (stored config)", root=Path(path).resolve().parent)
    model = build_model(config.model)
    model.load_state_dict(ckpt["model"])
    return model.eval(), config
