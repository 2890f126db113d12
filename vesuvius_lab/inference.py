"""Inference over whole volumes of any shape: the one predict-and-post-process path.

``predict_volume`` is what validation, ``vesuvius-lab predict`` and notebook 05 call: sliding
windows blended with a Gaussian (MONAI's inferer), ``val.batch`` windows through the model at once,
``val.tta`` mirror test-time augmentation, autocast on CUDA as ``optim.amp`` says (the stitched
volume stays on the CPU), then the config's ``postprocess`` section. A checkpoint ensemble
(``Ensemble``, several checkpoints given to ``model_from_checkpoint``) goes through the same path:
its members' probabilities are averaged in every window.
"""

from __future__ import annotations

import itertools
import json
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
from vesuvius_lab.training.run_dir import checkpoint_sources, load_checkpoint

WEIGHTS = ("auto", "ema", "raw")  # which weights of a checkpoint: its EMA when it has one, the EMA, the trained ones


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


def inference_settings(config: Config) -> dict:
    """The config keys ``predict_volume``'s result depends on (JSON types), so a kept prediction
    can be told apart from one that other settings would make."""
    v = config.val
    return json.loads(json.dumps({"patch_size": list(config.data.patch_size), "overlap": v.overlap, "tta": v.tta,
                                  "amp": config.optim.amp, "postprocess": vars(config.postprocess)}, default=str))


class Ensemble(torch.nn.Module):
    """Several models as one: the logit of their mean probability (a checkpoint ensemble)."""

    def __init__(self, members: Sequence[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prob = torch.stack([torch.sigmoid(m(x).float()) for m in self.members]).mean(0)
        return torch.logit(prob, eps=1e-6)


def model_from_checkpoint(path: str | os.PathLike | Sequence[str | os.PathLike], overrides: Sequence[str] = (),
                          weights: str = "auto") -> tuple[torch.nn.Module, Config]:
    """The trained model (eval mode) and the config it was trained with, ``overrides`` applied.

    ``weights``: ``auto`` loads the EMA of the weights when the checkpoint has one (what its
    validation scored; see ``training.ema``), else the trained weights; ``ema`` or ``raw`` insist.
    A run folder or a glob pattern, or several of any (``run_dir.checkpoint_sources``), that stand for
    more than one checkpoint make an ``Ensemble`` that averages their probabilities; the first
    one's config sets the inference."""
    paths = checkpoint_sources([path] if isinstance(path, str | os.PathLike) else path)
    loaded = [_one_model(p, overrides, weights) for p in paths]
    if len(loaded) == 1:
        return loaded[0]
    config = loaded[0][1]
    for p, (_, other) in zip(paths[1:], loaded[1:], strict=True):
        if other.data.patch_size != config.data.patch_size:
            raise DataError(f"{p}: patch size {other.data.patch_size} differs from {config.data.patch_size} of "
                            f"{paths[0]}; an ensemble slides one window")
    return Ensemble([m for m, _ in loaded]).eval(), config


def _one_model(path: Path, overrides: Sequence[str], weights: str) -> tuple[torch.nn.Module, Config]:
    ckpt = load_checkpoint(path)
    if "config" not in ckpt or "model" not in ckpt:
        raise DataError(f"{path}: not a vesuvius_lab checkpoint (no config or model)")
    if weights not in WEIGHTS:
        raise DataError(f"weights {weights!r}: expected one of {', '.join(WEIGHTS)}")
    if weights == "ema" and "ema" not in ckpt:
        raise DataError(f"{path}: holds no EMA of the weights (trained without optim.ema_decay)")
    state = ckpt["ema"]["model"] if weights != "raw" and "ema" in ckpt else ckpt["model"]
    origin, root = f"{path} (stored config)", path.resolve().parent
    trained = config_from_dict(ckpt["config"], origin=origin, root=root)  # the network as it was trained
    config = config_from_dict(ckpt["config"], overrides, origin=origin, root=root) if overrides else trained
    model = build_model(trained.model, trained.data.patch_size)
    model.load_state_dict(state)
    return model.eval(), config
