"""Typed YAML configs, with ``section.key=value`` overrides; the keys keep the names researchers of this task use.

Unknown keys and wrong types are errors naming the key.

Paths (``data.manifest``, ``data.root``, ``data.cache_dir``) follow one rule: a relative path
resolves against the folder of the config file that holds it; absolute paths, ``~`` and
``${ENV}`` paths stay as written (expanded when read). Every config the project writes rebases its
relative paths onto its own folder (``save_config``), and the copy inside a checkpoint holds them
absolute, so a written config reaches the same files from wherever it is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vesuvius_lab.errors import ConfigError
from vesuvius_lab.io import atomic_write_text
from vesuvius_lab.loss_terms import REGISTRY
from vesuvius_lab.postprocess import RULES as POSTPROCESS_RULES
from vesuvius_lab.postprocess import PostprocessConfig
from vesuvius_lab.rules import COUNT, NON_NEGATIVE, POSITIVE, SHARE, Rule, at_least, check_type
from vesuvius_lab.network_plan import NNUNET_MIN_EDGE, nnunet_plan


@dataclass
class DataConfig:
    manifest: str = "data_manifests/synthetic_demo.yaml"
    root: str | None = None  # overrides the manifest's data root
    cache_dir: str | None = None  # default: $VLAB_CACHE_DIR or ~/.cache/vesuvius_lab
    patch_size: list[int] = field(default_factory=lambda: [64, 64, 64])
    chunk_cache_mb: int = 256  # decoded cache chunks each data worker keeps (a 320^3 volume's four arrays: 125 MB)


@dataclass
class SamplerConfig:
    fg_fraction: float = 0.33  # share of patches centred on a label-1 voxel (nnU-Net: 0.33)
    max_redraws: int = 10  # redraws of a patch that is all label 2 (ignored)
    fg_points: int = 20000  # label-1 locations kept per volume for foreground draws


@dataclass
class AugmentConfig:
    enabled: bool = True
    where: str = "worker"  # "worker": in the data workers; "device": batched on the training device
    p_rotation: float = 0.2
    max_rotation_deg: float = 30.0
    p_scale: float = 0.2
    scale_range: list[float] = field(default_factory=lambda: [0.8, 1.25])
    p_elastic: float = 0.2
    elastic_magnitude: float = 4.0  # voxels, largest control-point displacement
    elastic_grid: int = 5  # control points per axis
    p_flip: float = 0.5  # per axis
    permute_axes: bool = True  # among axes of equal patch size
    p_gamma: float = 0.3
    gamma_range: list[float] = field(default_factory=lambda: [0.7, 1.5])
    p_contrast: float = 0.15
    contrast_range: list[float] = field(default_factory=lambda: [0.75, 1.25])
    p_noise: float = 0.15
    noise_std: float = 0.05
    p_blur: float = 0.1
    blur_sigma: list[float] = field(default_factory=lambda: [0.5, 1.0])
    # nnU-Net v2's other intensity transforms (configs/nnunet_aug.yaml); off by default
    p_brightness: float = 0.0  # multiply the image by a factor from brightness_range
    brightness_range: list[float] = field(default_factory=lambda: [0.75, 1.25])
    p_gamma_inverted: float = 0.0  # gamma of the inverted image: 1 - (1 - x) ** gamma, gamma from gamma_range
    p_lowres: float = 0.0  # simulated low resolution: nearest down to a lowres_scale share of each edge, linear up
    lowres_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])


@dataclass
class ModelConfig:
    features: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # unet: width per stage
    deep_supervision: bool = True
    deep_supervision_heads: int = 3  # full resolution + auxiliary heads at 1/2, 1/4
    arch: str = "unet"  # unet: the U-Net of `features`; dynunet: MONAI's DynUNet, stages planned from the patch as nnU-Net does
    res_block: bool = False  # dynunet: residual blocks (the residual-encoder "ResEnc" recipe)
    base_features: int = 32  # dynunet: width of the first stage, doubling per stage (nnU-Net: 32)
    max_features: int = 320  # dynunet: widest stage (nnU-Net 3D: 320)


SCHEDULE = ("start", "ramp")  # each term's schedule keys: loss.<term>_start, loss.<term>_ramp


def _loss_fields() -> list[tuple]:
    """The loss section's keys, all from the term registry but two: each term's weight and
    settings, then the shared keys, then every term's schedule."""
    fields = []
    for term in REGISTRY:
        fields.append((term.name, float, field(default=term.weight)))
        fields += [(s.key, type(s.default), field(default=s.default)) for s in term.settings]
    fields += [("deep_supervision_terms", list[str], field(default_factory=lambda: ["bce", "dice"])),
               ("schedule_unit", str, field(default="step"))]
    fields += [(f"{term.name}_{s}", int, field(default=0)) for term in REGISTRY for s in SCHEDULE]
    return fields


def _loss_doc() -> str:
    lines = [f"    {t.name}: {t.doc}" + "".join(f"\n      {s.key}: {s.doc}" for s in t.settings) for t in REGISTRY]
    return "\n".join([
        "The weights of the loss terms (0 disables a term at no cost) and their settings; one key",
        "per term and setting of ``loss_terms.REGISTRY``:", *lines,
        "    deep_supervision_terms: the terms also applied to the deep-supervision heads",
        "    <term>_start, <term>_ramp: a term is off for its first <term>_start steps (or epochs,",
        "      schedule_unit: step | epoch), then its weight ramps linearly to full over <term>_ramp steps (0: at once)",
    ])


LossConfig = dataclasses.make_dataclass("LossConfig", _loss_fields(),
                                        namespace={"__module__": __name__, "__doc__": _loss_doc()})


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 3e-3
    weight_decay: float = 1e-4
    momentum: float = 0.99  # sgd (nesterov)
    warmup_steps: int = 50
    schedule: str = "poly"  # poly | cosine; step-based, so steps per epoch do not bend it
    poly_power: float = 0.9
    min_lr: float = 0.0
    grad_clip: float = 12.0
    accumulate: int = 1
    amp: str = "bf16"  # bf16 | fp16 | off; used on CUDA only
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    ema_decay: float | None = None  # EMA of the weights (e.g. 0.999) for validation, best.pt and predict; 0/None: off


@dataclass
class ValConfig:
    overlap: float = 0.25
    batch: int = 2
    tta: bool = False  # mirror test-time augmentation
    max_volumes: int | None = None
    live_volume: int | str | None = 0  # kept at each validation: index among the validated volumes, or record id; null: none
    live_keep: int = 10  # live predictions kept: the latest N and the best (0: every one)


@dataclass
class TrainingConfig:
    train_batch_size: int = 2
    train_iterations_per_epoch: int | None = 200
    patches_per_volume: int | None = None
    drop_last: bool = False
    max_epochs: int = 1
    workers: int = 2
    prefetch_factor: int = 2
    persistent_workers: bool = True
    multiprocessing_context: str = "fork"
    pin_memory: bool = False
    worker_timeout_s: int = 600  # a batch that takes longer means a hung data worker (0: wait forever)
    checkpoint_every_steps: int = 100
    val_every_epochs: int = 1
    seed: int = 0
    keep_last: int = 1  # most recent checkpoints kept (last.pt is the newest; more are kept as step_N.pt)
    keep_best: int = 1  # best-scoring checkpoints kept (best.pt is the best; more are kept as best_step_N_score_S.pt)
    tensorboard: bool = True  # also write metrics.jsonl's records as TensorBoard events in the run folder
    time_budget_hours: float | None = None  # wall time of the whole command; the trainer re-plans to end inside it
    early_stop_patience: int | None = None  # end the run after this many validations without improvement; None: off
    early_stop_min_delta: float = 0.0  # an improvement is a validation score above the best by more than this


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    val: ValConfig = field(default_factory=ValConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    root: Path = field(default=Path("."), metadata={"internal": True})  # the config file's folder

    def path(self, value: str | None, what: str) -> Path | None:
        """A path from the config: ``~`` and ``${ENV}`` expanded, relative ones under ``root``."""
        if value is None:
            return None
        return (self.root / expand_path(value, what)).resolve()

    def to_dict(self, relative_to: str | os.PathLike | None = None) -> dict:
        """The sections as plain data. Relative paths are rebased onto the folder ``relative_to``
        (a config file written there), or made absolute when it is None (a checkpoint's copy)."""
        doc = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in _sections()}
        for section, key in PATH_KEYS:
            doc[section][key] = portable_path(doc[section][key], self.root, relative_to)
        return doc


PATH_KEYS = (("data", "manifest"), ("data", "root"), ("data", "cache_dir"))


class _Loader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML) reads ``1e-3`` as a string; researchers write floats that way. This safe
    loader also reads the YAML 1.2 float forms (``1e-3``, ``5E-4``, ``1.5e3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def load_yaml(text: str):
    """A config document or an override value (``yaml.safe_load`` semantics, with 1.2 floats)."""
    loader = _Loader(text)  # what yaml.safe_load does, with the resolver above
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# Every key that takes numbers or names has its meaningful values here; the rest are booleans and
# paths (checked by type). tests/test_config.py walks every key of every section against this table.
RULES: dict[str, Rule] = {
    "data.patch_size": COUNT,
    "data.chunk_cache_mb": NON_NEGATIVE,
    "sampler.fg_fraction": SHARE, "sampler.max_redraws": NON_NEGATIVE, "sampler.fg_points": COUNT,
    "augment.where": Rule(choices=("worker", "device")),
    **{f"augment.p_{k}": SHARE for k in ("rotation", "scale", "elastic", "flip", "gamma", "contrast", "noise", "blur",
                                         "brightness", "gamma_inverted", "lowres")},
    "augment.max_rotation_deg": Rule(low=0, high=180),
    "augment.scale_range": Rule(low=0, low_open=True, length=2, ordered=True),
    "augment.elastic_magnitude": NON_NEGATIVE, "augment.elastic_grid": at_least(2),
    "augment.gamma_range": Rule(low=0, low_open=True, length=2, ordered=True),
    "augment.contrast_range": Rule(low=0, low_open=True, length=2, ordered=True),
    "augment.noise_std": NON_NEGATIVE, "augment.blur_sigma": Rule(low=0, length=2, ordered=True),
    "augment.brightness_range": Rule(low=0, low_open=True, length=2, ordered=True),
    "augment.lowres_scale": Rule(low=0, low_open=True, high=1, length=2, ordered=True),
    "model.features": COUNT, "model.deep_supervision_heads": COUNT,
    "model.arch": Rule(choices=("unet", "dynunet")), "model.base_features": COUNT, "model.max_features": COUNT,
    **{f"loss.{term.name}": NON_NEGATIVE for term in REGISTRY},
    **{f"loss.{s.key}": s.rule for term in REGISTRY for s in term.settings},
    **{f"loss.{term.name}_{s}": NON_NEGATIVE for term in REGISTRY for s in SCHEDULE},
    "loss.deep_supervision_terms": Rule(choices=tuple(term.name for term in REGISTRY if term.heads)),
    "loss.schedule_unit": Rule(choices=("step", "epoch")),
    "optim.name": Rule(choices=("adamw", "sgd")), "optim.lr": POSITIVE, "optim.weight_decay": NON_NEGATIVE,
    "optim.momentum": Rule(low=0, high=1, high_open=True), "optim.warmup_steps": NON_NEGATIVE,
    "optim.schedule": Rule(choices=("poly", "cosine")), "optim.poly_power": POSITIVE, "optim.min_lr": NON_NEGATIVE,
    "optim.grad_clip": POSITIVE, "optim.accumulate": COUNT, "optim.amp": Rule(choices=("bf16", "fp16", "off")),
    "optim.max_nonfinite": COUNT,
    "optim.ema_decay": Rule(low=0, high=1, high_open=True),
    "val.overlap": Rule(low=0, high=1, high_open=True), "val.batch": COUNT, "val.max_volumes": COUNT,
    **{f"postprocess.{key}": rule for key, rule in POSTPROCESS_RULES.items()},
    "training.train_batch_size": COUNT, "training.train_iterations_per_epoch": COUNT,
    "training.patches_per_volume": COUNT, "training.max_epochs": COUNT, "training.workers": NON_NEGATIVE,
    "training.prefetch_factor": COUNT, "training.multiprocessing_context": Rule(choices=("fork", "spawn", "forkserver")),
    "training.checkpoint_every_steps": NON_NEGATIVE, "training.worker_timeout_s": NON_NEGATIVE, "training.val_every_epochs": NON_NEGATIVE,
    "training.seed": NON_NEGATIVE,
    "training.keep_last": COUNT, "training.keep_best": COUNT,
    "val.live_volume": NON_NEGATIVE,  # an index; a record id (a string) is checked against the data at validation
    "val.live_keep": NON_NEGATIVE,
    "training.time_budget_hours": POSITIVE,
    "training.early_stop_patience": COUNT, "training.early_stop_min_delta": NON_NEGATIVE,
}


def _as_written(value: str) -> bool:
    """Absolute, home-relative or environment paths: kept as written when a config is rewritten."""
    return Path(value).is_absolute() or value.startswith("~") or "$" in value


def expand_path(value: str, what: str) -> Path:
    """``~`` and ``${ENV}`` expanded; an unset variable is an error naming the key."""
    expanded = os.path.expanduser(os.path.expandvars(value))
    if "$" in expanded:
        raise ConfigError(f"{what}: {value!r} names an environment variable that is not set")
    return Path(expanded)


def portable_path(value: str | None, root: Path, relative_to: str | os.PathLike | None) -> str | None:
    """``value`` (relative to ``root``) rewritten to reach the same file from ``relative_to``."""
    if value is None or _as_written(value):
        return value
    target = (Path(root) / value).resolve()
    if relative_to is None:
        return target.as_posix()
    return Path(os.path.relpath(target, Path(relative_to).resolve())).as_posix()


def _sections() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Config) if not f.metadata.get("internal")]


def _unknown(name: object, known, qualified: str, listed: bool) -> str:
    """The one line for a misspelt section or key: the known name it most likely meant and, for a
    section, all the known ones."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    meant = f"did you mean {qualified.format(close[0])}?" if close else ""
    if listed:
        return f"({meant + ' ' if meant else ''}known: {', '.join(known)})"
    return f"({meant})" if meant else ""


def _apply(config: Config, doc: dict, origin: str) -> list[str]:
    problems = []
    sections = {f.name: f for f in _sections()}
    for name, values in doc.items():
        if name not in sections:
            problems.append(f"{origin}: unknown section {name!r} {_unknown(name, sections, '{!r}', listed=True)}")
            continue
        if not isinstance(values, dict):
            problems.append(f"{origin}: section {name!r} must be a mapping")
            continue
        hints = typing.get_type_hints(type(getattr(config, name)))
        for key, value in _ungrouped(values, hints):
            if key not in hints:
                problems.append(f"{origin}: unknown key {name}.{key} {_unknown(key, hints, name + '.{}', listed=False)}"
                                .rstrip())
                continue
            try:
                value = check_type(value, hints[key], f"{name}.{key}")
                rule = RULES.get(f"{name}.{key}")
                problem = rule.problem(f"{name}.{key}", value) if rule else None
                if problem:
                    problems.append(f"{origin}: {problem}")
                    continue
                # replace() re-runs a section's own validation (__post_init__), frozen or not
                setattr(config, name, dataclasses.replace(getattr(config, name), **{key: value}))
            except ConfigError as exc:
                problems.extend(f"{origin}: {line}" for line in exc.lines)
    return problems


def _ungrouped(values: dict, hints: dict) -> list[tuple[str, object]]:
    """A section's keys, with a group of keys that share a prefix written nested read as the flat
    keys: ``early_stop: {patience: 5}`` and the override ``training.early_stop.patience=5`` are
    ``early_stop_patience: 5`` (the form config.yaml stores)."""
    keys = []
    for key, value in values.items():
        key = str(key).replace(".", "_") if str(key) not in hints else key
        if isinstance(value, dict) and key not in hints and any(h.startswith(f"{key}_") for h in hints):
            keys.extend((f"{key}_{sub}", v) for sub, v in value.items())
        else:
            keys.append((key, value))
    return keys


def parse_override(text: str) -> tuple[str, str, object]:
    """'training.workers=4' -> ('training', 'workers', 4); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not section or not name:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return section, name, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then overrides; every problem is reported at once."""
    if path is None:
        return config_from_dict({}, overrides, origin="defaults", root=Path.cwd())
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config not found")
    try:
        doc = load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return config_from_dict(doc, overrides, origin=str(path), root=path.resolve().parent)


def config_from_dict(doc: dict, overrides: list[str] | tuple[str, ...] = (), origin: str = "config",
                     root: Path | None = None) -> Config:
    """A Config from a mapping of sections (a YAML document, or the copy stored in a checkpoint)."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{origin}: top level must be a mapping of sections")
    config = Config()
    config.root = root or Path.cwd()
    problems = _apply(config, doc, origin)
    for text in overrides:
        try:
            section, key, value = parse_override(text)
        except ConfigError as exc:
            problems += exc.lines
            continue
        problems += _apply(config, {section: {key: value}}, "override")
    problems += _cross_checks(config)
    if problems:
        raise ConfigError(problems)
    return config


def _cross_checks(config: Config) -> list[str]:
    """Rules between keys (each key's own range is in RULES)."""
    problems = []
    if len(config.data.patch_size) != 3:
        problems.append(f"data.patch_size: expected 3 positive sizes, got {config.data.patch_size}")
    if config.model.arch == "dynunet":
        problems += _dynunet_checks(config)
    elif len(config.model.features) < 2:
        problems.append(f"model.features: {config.model.features} needs at least 2 stages")
    divisor = 2 ** (len(config.model.features) - 1)
    if config.model.arch == "unet" and len(config.data.patch_size) == 3 and any(p % divisor for p in config.data.patch_size):
        problems.append(
            f"data.patch_size: {config.data.patch_size} must be divisible by {divisor} "
            f"({len(config.model.features)} U-Net stages in model.features)"
        )
    if config.training.train_iterations_per_epoch is None and config.training.patches_per_volume is None:
        problems.append("training: set train_iterations_per_epoch or patches_per_volume")
    if config.optim.min_lr > config.optim.lr:
        problems.append(f"optim.min_lr: {config.optim.min_lr:g} is above optim.lr {config.optim.lr:g}")
    try:
        config.postprocess.check()
    except ConfigError as exc:
        problems += exc.lines
    return problems


def _dynunet_checks(config: Config) -> list[str]:
    """DynUNet's stages come from the patch (nnU-Net's rule): the patch must be a multiple of its pooling."""
    patch = config.data.patch_size
    if len(patch) != 3:
        return []
    topo = nnunet_plan(patch)
    problems = []
    if topo.stages < 3:
        problems.append(f"data.patch_size: {patch} is too small for model.arch dynunet (nnU-Net plans "
                        f"{topo.stages} stages; MONAI's DynUNet needs 3, i.e. a side of at least {4 * NNUNET_MIN_EDGE})")
    elif topo.padded_patch != list(patch):
        problems.append(f"data.patch_size: {patch} must be a multiple of {topo.divisor} for model.arch dynunet "
                        f"(nnU-Net's {topo.stages}-stage plan for it); nnU-Net would use {topo.padded_patch}")
    if config.model.max_features < config.model.base_features:
        problems.append(f"model.max_features: {config.model.max_features} is below model.base_features "
                        f"{config.model.base_features}")
    return problems


def changed_keys(before: Config, after: Config) -> list[str]:
    """``section.key old -> new`` for every key whose value differs (paths compared absolute)."""
    a, b = before.to_dict(), after.to_dict()
    return [f"{s}.{k} {a[s].get(k)!r} -> {v!r}" for s in b for k, v in b[s].items() if a[s].get(k) != v]


def save_config(config: Config, path: str | Path) -> None:
    """Write ``config`` as YAML at ``path`` (atomically), its relative paths rebased onto that folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(config.to_dict(relative_to=path.parent), sort_keys=False))


def rewrite_config(source: str | Path, out: str | Path, changes: dict[str, dict]) -> None:
    """Copy the config file ``source`` to ``out`` with ``changes`` ({section: {key: value or None to
    drop}}) applied; the keys the user wrote stay as written, relative paths rebased onto ``out``."""
    source, out = Path(source), Path(out)
    doc = load_yaml(source.read_text(encoding="utf-8")) or {}
    for section, key in PATH_KEYS:
        values = doc.get(section)
        if isinstance(values, dict) and isinstance(values.get(key), str):
            values[key] = portable_path(values[key], source.resolve().parent, out.parent)
    for section, values in changes.items():
        target = doc.setdefault(section, {})
        for key, value in values.items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    atomic_write_text(out, yaml.safe_dump(doc, sort_keys=False))
