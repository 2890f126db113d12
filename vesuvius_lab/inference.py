"""Sliding-window inference over whole volumes of any shape.

Windows overlap and are blended with a Gaussian (MONAI's inferer), several windows go through the
model at once, mirror test-time augmentation averages the probabilities of the flipped inputs,
and on CUDA the model runs under autocast while the stitched volume stays on the CPU.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from vesuvius_lab.model import as_input


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
    amp_dtype: torch.dtype | None = torch.bfloat16,
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
