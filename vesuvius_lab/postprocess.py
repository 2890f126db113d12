"""Turn a probability volume into the submitted mask: threshold or hysteresis, then topology clean-up
and repair.

Choices are judged by the leaderboard score (``vesuvius_lab.leaderboard``), not by eye: small spurious
components each cost a dim-0 feature in TopoScore and a component in VOI, enclosed cavities cost
dim-2 features, holes in sheets cost dim-1 features and sheets merged by bridges cost Betti-0 and VOI,
so removing them raises the score when they are errors. ``vesuvius-lab tune-postprocess`` picks the
settings by that score; ``vesuvius_lab.repair`` holds the repair steps.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from vesuvius_lab.errors import ConfigError
from vesuvius_lab.rules import COUNT, NON_NEGATIVE, SHARE, Rule, at_least, check_type

METHODS = ("threshold", "hysteresis")
# the steps after binarisation, in the order a config lists them (postprocess.repair)
REPAIR_STEPS = ("remove_small_components", "fill_cavities", "plug_pinholes", "fill_sheet_holes", "close_tunnels", "split_bridges")


@dataclass(frozen=True)
class PostprocessConfig:
    """How probabilities become a mask. Each field is validated on construction against its type
    and ``RULES`` (frozen: change one with ``dataclasses.replace``); ``check()`` adds the
    cross-field rule low <= high.

    method: "threshold" (foreground where prob > threshold) or "hysteresis" (prob > low, connected
        to a voxel with prob > high; skimage.filters.apply_hysteresis_threshold).
    min_component_size: foreground components with fewer voxels are removed (0: keep); 6-connected,
        as the metric counts them, so fragments touching a sheet only by an edge or corner go too.
    close_holes: fill enclosed cavities, i.e. background (26-connected, the dual of the 6-connected
        foreground the metric's topology uses) that does not reach the volume's border.
    repair: the clean-up and repair steps after binarisation, in order (each off unless listed; a
        step may appear twice): remove_small_components (min_component_size), fill_cavities,
        plug_pinholes, fill_sheet_holes (hole_window, max_hole_area), split_bridges (split_*).
        min_component_size > 0 and close_holes run first when the list does not place their step.
    hole_window: edge of the windows in which sheet holes are located and filled; a hole up to
        about half of it across is filled.
    max_hole_area: largest hole filled, in cells (voxels) of the sheet's height map.
    split_threshold, split_depth, split_min_core: a bridge is cut between two cores, each at least
        split_min_core voxels of the mask where the probability is above split_threshold and the
        distance to the background above split_depth voxels.
    """

    method: str = "threshold"
    threshold: float = 0.5
    low: float = 0.3
    high: float = 0.7
    min_component_size: int = 0
    close_holes: bool = False
    repair: list[str] = field(default_factory=list)
    hole_window: int = 32
    max_hole_area: int = 400
    split_threshold: float = 0.5
    split_depth: float = 1.0
    split_min_core: int = 200

    def __post_init__(self) -> None:
        problems = []
        for key, annotation in _hints().items():
            name, value = f"postprocess.{key}", getattr(self, key)
            try:
                check_type(value, annotation, name)
            except ConfigError as exc:
                problems += exc.lines
                continue
            problem = RULES[key].problem(name, value) if key in RULES else None
            if problem:
                problems.append(problem)
        if problems:
            raise ConfigError(problems)

    def check(self) -> None:
        """Cross-field rules, checked when the config is used (a config may be built key by key)."""
        if self.method == "hysteresis" and self.low > self.high:
            raise ConfigError(f"postprocess.low {self.low} is above postprocess.high {self.high}")

    def steps(self) -> tuple[str, ...]:
        """The steps after binarisation, in the order they run."""
        first = []
        if self.min_component_size > 1 and "remove_small_components" not in self.repair:
            first.append("remove_small_components")
        if self.close_holes and "fill_cavities" not in self.repair:
            first.append("fill_cavities")
        return (*first, *self.repair)

    @classmethod
    def from_mapping(cls, values: Mapping) -> PostprocessConfig:
        """Build from a config section; unknown keys are errors naming the key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError([f"postprocess.{k}: unknown key (known: {', '.join(sorted(known))})" for k in unknown])
        return cls(**dict(values))


# each key's meaningful values, wherever a setting comes from (config.RULES holds them as postprocess.<key>)
RULES: dict[str, Rule] = {
    "method": Rule(choices=METHODS), "threshold": SHARE, "low": SHARE, "high": SHARE,
    "min_component_size": NON_NEGATIVE, "repair": Rule(choices=REPAIR_STEPS), "hole_window": at_least(8),
    "max_hole_area": COUNT, "split_threshold": SHARE, "split_depth": NON_NEGATIVE, "split_min_core": COUNT,
}


@functools.cache
def _hints() -> dict[str, type]:
    return typing.get_type_hints(PostprocessConfig)


def binarize_probabilities(prob: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """Foreground mask from probabilities by the configured method (NaN is background)."""
    p = np.nan_to_num(np.asarray(prob, dtype=np.float32), nan=0.0)
    if cfg.method == "threshold":
        return p > cfg.threshold
    from skimage.filters import apply_hysteresis_threshold

    return apply_hysteresis_threshold(p, cfg.low, cfg.high)


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 6-connected components (the metric's foreground connectivity) with fewer than ``min_size`` voxels."""
    if min_size <= 1 or not mask.any():
        return mask
    import cc3d

    labels, n = cc3d.connected_components(np.ascontiguousarray(mask, dtype=np.uint8), connectivity=6, return_N=True)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def fill_cavities(mask: np.ndarray) -> np.ndarray:
    """Fill background regions (26-connected) that do not touch the volume's border."""
    from vesuvius_lab.repair import enclosed_background

    return mask | enclosed_background(mask)


def postprocess(prob: np.ndarray, cfg: PostprocessConfig | Mapping | None = None) -> np.ndarray:
    """uint8 mask (0/1) of a 3D probability volume under ``cfg`` (a PostprocessConfig or its mapping)."""
    if cfg is None:
        cfg = PostprocessConfig()
    elif isinstance(cfg, Mapping):
        cfg = PostprocessConfig.from_mapping(cfg)
    cfg.check()
    prob = np.asarray(prob)
    if prob.ndim != 3:
        raise ValueError(f"expected a 3D probability volume, got shape {prob.shape}")
    if not (np.issubdtype(prob.dtype, np.floating) or np.issubdtype(prob.dtype, np.integer) or prob.dtype == bool):
        raise ValueError(f"expected a numeric probability volume, got dtype {prob.dtype}")
    mask = binarize_probabilities(prob, cfg)
    for step in cfg.steps():
        mask = STEPS[step](mask, prob, cfg)
    return mask.astype(np.uint8)


def _split_bridges(mask: np.ndarray, prob: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    from vesuvius_lab.repair import split_bridges

    return split_bridges(mask, prob, cfg.split_threshold, cfg.split_depth, cfg.split_min_core)


def _plug_pinholes(mask: np.ndarray, prob: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    from vesuvius_lab.repair import plug_pinholes

    return plug_pinholes(mask)


def _fill_sheet_holes(mask: np.ndarray, prob: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    from vesuvius_lab.repair import fill_sheet_holes

    return fill_sheet_holes(mask, cfg.hole_window, cfg.max_hole_area)


def _close_tunnels(mask: np.ndarray, prob: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    from vesuvius_lab.repair import close_tunnels

    return close_tunnels(mask, prob, cfg.hole_window, cfg.max_hole_area)


# step name -> (mask, probability, config) -> mask
STEPS: dict[str, Callable[[np.ndarray, np.ndarray, PostprocessConfig], np.ndarray]] = {
    "remove_small_components": lambda mask, prob, cfg: remove_small_components(mask, cfg.min_component_size),
    "fill_cavities": lambda mask, prob, cfg: fill_cavities(mask),
    "plug_pinholes": _plug_pinholes,
    "fill_sheet_holes": _fill_sheet_holes,
    "close_tunnels": _close_tunnels,
    "split_bridges": _split_bridges,
}
