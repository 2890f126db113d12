"""The networks ``model.arch`` chooses, all returning logits the same way.

``unet``: a four-level 3D U-Net with deep supervision from MONAI's DynUNet building blocks (the
widths in ``model.features``). ``dynunet``: MONAI's ``DynUNet`` (nnU-Net's dynamic U-Net) with its
stages, kernel sizes and strides planned from the patch size the way nnU-Net's experiment planner
does it (``nnunet_plan``), widths doubling from ``model.base_features`` up to
``model.max_features``; ``model.res_block: true`` gives residual blocks (the residual-encoder recipe).

In training mode a network returns the full-resolution logits followed by the auxiliary heads'
logits at their own, coarser resolution; the loss compares those with *downsampled targets*, so no
head is upsampled (that would cost memory for nothing). In eval mode it returns the full-resolution
logits only.
"""

from __future__ import annotations

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from monai.networks.nets import DynUNet
from torch import nn

from vesuvius_lab.config import ModelConfig
from vesuvius_lab.network_plan import nnunet_plan, stage_widths


class UNet3D(nn.Module):
    def __init__(self, features: list[int], in_channels: int = 1, out_channels: int = 1, heads: int = 3):
        super().__init__()
        norm = ("instance", {"affine": True})
        self.encoders = nn.ModuleList()
        prev = in_channels
        for i, f in enumerate(features):
            self.encoders.append(UnetBasicBlock(3, prev, f, kernel_size=3, stride=1 if i == 0 else 2, norm_name=norm))
            prev = f
        self.decoders = nn.ModuleList(
            UnetUpBlock(3, features[i], features[i - 1], kernel_size=3, stride=1, upsample_kernel_size=2, norm_name=norm)
            for i in range(len(features) - 1, 0, -1)
        )
        # Head j reads decoder level j from the top (0 = full resolution).
        n_heads = max(1, min(heads, len(features) - 1))
        self.heads = nn.ModuleList(UnetOutBlock(3, features[j], out_channels) for j in range(n_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
        x = skips.pop()
        levels = []  # decoder outputs, coarsest first
        for dec in self.decoders:
            x = dec(x, skips.pop())
            levels.append(x)
        levels.reverse()  # full resolution first
        if not self.training:
            return self.heads[0](levels[0])
        return [head(levels[j]) for j, head in enumerate(self.heads)]


class DeepSupervisedDynUNet(DynUNet):
    """MONAI's DynUNet whose training output is a list of logits at each head's own resolution.

    MONAI interpolates every auxiliary head up to full resolution and stacks them; the project's
    loss takes the heads as they are, against downsampled targets, as it does for ``UNet3D``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.output_block(self.skip_layers(x))
        if not (self.training and self.deep_supervision):
            self._release_heads()
            return out
        heads = list(self.heads)  # filled by the skip layers, coarser with each entry
        self._release_heads()
        return [out, *heads]

    def _release_heads(self) -> None:
        """The skip layers park each head's output on the module; drop them (they hold activations)."""
        for i in range(len(self.heads)):
            self.heads[i] = _EMPTY


_EMPTY = torch.empty(0)


def build_dynunet(cfg: ModelConfig, patch_size: list[int]) -> DeepSupervisedDynUNet:
    topo = nnunet_plan(patch_size)
    heads = cfg.deep_supervision_heads if cfg.deep_supervision else 1
    extra = max(0, min(heads - 1, topo.stages - 2))  # MONAI: fewer auxiliary heads than upsampling layers
    return DeepSupervisedDynUNet(
        spatial_dims=3, in_channels=1, out_channels=1, kernel_size=topo.kernels, strides=topo.strides,
        upsample_kernel_size=topo.strides[1:], filters=stage_widths(topo.stages, cfg.base_features, cfg.max_features),
        norm_name=("INSTANCE", {"affine": True}), deep_supervision=extra > 0, deep_supr_num=max(extra, 1),
        res_block=cfg.res_block,
    )


def build_model(cfg: ModelConfig, patch_size: list[int] | None = None) -> nn.Module:
    """The configured network in channels-last-3D layout (3x faster 3D convolutions on CPU here).

    ``dynunet`` plans its stages from ``patch_size`` (``data.patch_size``)."""
    if cfg.arch == "dynunet":
        if patch_size is None:
            raise ValueError("model.arch dynunet plans its stages from the patch size: pass data.patch_size")
        model = build_dynunet(cfg, patch_size)
    else:
        model = UNet3D(cfg.features, heads=cfg.deep_supervision_heads if cfg.deep_supervision else 1)
    return model.to(memory_format=torch.channels_last_3d)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def input_channels(model: nn.Module) -> int:
    """Channels the network's first convolution takes: the samples each voxel of an input must hold."""
    return next(m.in_channels for m in model.modules() if isinstance(m, nn.Conv3d))


def as_input(image: torch.Tensor) -> torch.Tensor:
    """A (B, 1, Z, Y, X) image batch in the layout the model's weights use."""
    return image.contiguous(memory_format=torch.channels_last_3d)
