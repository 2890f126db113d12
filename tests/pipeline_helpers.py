"""Small builders shared by the patch-pipeline tests."""

from vesuvius_lab.cache import VolumeCache
from vesuvius_lab.config import AugmentConfig, SamplerConfig
from vesuvius_lab.layout import discover
from vesuvius_lab.sampling import EpochLayout, PatchDataset


def make_dataset(root, cache_dir, patch=(32, 32, 32), batch=2, steps=4, ppv=None, augment=None, fg=0.33, seed=0, **kw):
    records = discover(root)[0]
    layout = EpochLayout(len(records), batch, steps_per_epoch=None if ppv else steps, patches_per_volume=ppv, **kw)
    return PatchDataset(
        records, VolumeCache(cache_dir), patch, layout, SamplerConfig(fg_fraction=fg),
        augment if augment is not None else AugmentConfig(), seed=seed,
    )


def strong_augment(**overrides) -> AugmentConfig:
    cfg = AugmentConfig(p_rotation=1.0, p_scale=1.0, p_elastic=1.0, p_flip=0.5, p_gamma=1.0, p_contrast=1.0,
                        p_noise=1.0, p_blur=1.0, p_brightness=1.0, p_gamma_inverted=1.0, p_lowres=1.0)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg
