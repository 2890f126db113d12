"""Choose the post-processing and repair settings by the exact leaderboard score.

``vesuvius-lab tune-postprocess RUN_DIR`` predicts the run's validation volumes once with its best
checkpoint (probabilities cached beside the run, reused while the checkpoint and its inference
settings stay the same), then scores every setting of a grid of ``postprocess`` keys on them with
``vesuvius_lab.leaderboard``, each (setting, volume) pair in its own worker process. Successive
halving spends the volumes where they matter: every setting is scored on a first share of the
volumes (at least two), the best third go on to all of them. The table is the mean score, TopoScore, SurfaceDice
and VOI score per setting; the best setting can be written into a config (``--apply``).

The best setting's score is in-sample: chosen and scored on the same volumes, it flatters the
setting (with a few volumes, a setting that happens to suit one of them wins). The out-of-sample
figure is cross-validated: the volumes are split into folds (one volume each up to ``MAX_FOLDS``
volumes: leave-one-out), each fold's setting is chosen, by the same search and ranking, on the other
volumes' scores only and scored on the fold's volumes; the figure is the mean over every volume of
its held-out score. It reuses the table's per-volume scores (nothing is predicted again).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vesuvius_lab.errors import ConfigError, DataError, VLabError
from vesuvius_lab.postprocess import PostprocessConfig, postprocess

PARTS = ("score", "topo", "surface_dice", "voi_score")
FULL_REPAIR = ["plug_pinholes", "fill_sheet_holes", "plug_pinholes", "close_tunnels"]
# the grid searched when none is given: threshold, then the repair steps and their main knob
DEFAULT_GRID: dict[str, list] = {
    "threshold": [0.45, 0.5, 0.55, 0.6],
    "repair": [[], ["plug_pinholes"], FULL_REPAIR[:2], FULL_REPAIR[:3], FULL_REPAIR,
               [*FULL_REPAIR, "split_bridges", "remove_small_components"]],
    "hole_window": [32, 48],
}
MAX_FOLDS = 10  # leave-one-out up to this many volumes, this many folds above
# the keys that matter only when their step runs (settings differing only in them are the same)
STEP_KEYS = {
    "fill_sheet_holes": ("hole_window", "max_hole_area"),
    "close_tunnels": ("hole_window", "max_hole_area"),
    "split_bridges": ("split_threshold", "split_depth", "split_min_core"),
    "remove_small_components": ("min_component_size",),
}


@dataclass(frozen=True)
class Volume:
    """One validation volume on disk: its probability (float32 .npy or a TIFF) and its label."""

    id: str
    probability: Path
    label: Path


# --- probabilities, computed once per checkpoint ---------------------------------------------------
def _file_signature(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _load_consistent(ckpt: Path, overrides: Sequence[str]):
    """(model, config, signature) of one version of ``ckpt``: a trainer may replace the file (an
    atomic rename) while it is read, so the signature must be the same before and after."""
    from vesuvius_lab.inference import model_from_checkpoint

    for _ in range(5):
        before = _file_signature(ckpt)
        model, config = model_from_checkpoint(ckpt, overrides)
        if _file_signature(ckpt) == before:
            return model, config, before
    raise DataError(f"{ckpt}: replaced again while being read five times; try again when the run saves less often")


def run_probabilities(run_dir: str | os.PathLike, cache: str | os.PathLike | None = None,
                      checkpoint: str | os.PathLike | None = None, device: str | None = None,
                      progress: bool = True, overrides: Sequence[str] = (),
                      manifest: str | os.PathLike | None = None) -> tuple[list[Volume], PostprocessConfig]:
    """The validation volumes of a run with its checkpoint's probabilities, and the checkpoint's
    post-processing. The probabilities are computed once: they are kept in ``cache`` (default
    RUN_DIR/tune) with a signature of the checkpoint and its inference settings (``overrides``
    change them, e.g. ``val.tta=true``), recomputed only when one of them or the volumes change.

    ``manifest``: every volume of another dataset instead (default cache RUN_DIR/tune-{its name}),
    so that a setting tuned on the run's own volumes can be scored on data neither saw."""
    from vesuvius_lab.io import locked
    from vesuvius_lab.training.run_dir import RunDir

    run = RunDir(run_dir)
    ckpt = Path(checkpoint) if checkpoint else run.best
    if not ckpt.is_file():
        raise DataError(f"{ckpt}: no checkpoint (train the run first, or pass --checkpoint)")
    if manifest is not None and not Path(manifest).is_file():
        raise DataError(f"{manifest}: no such manifest")
    folder = Path(cache) if cache else run.root / ("tune" if manifest is None else f"tune-{Path(manifest).stem}")
    with locked(folder / ".lock"):  # two tuners of one run take turns; the trainer never writes here
        return _cached_probabilities(ckpt, folder, device, progress, overrides, manifest)


def _cached_probabilities(ckpt: Path, folder: Path, device: str | None, progress: bool,
                          overrides: Sequence[str], manifest: str | os.PathLike | None
                          ) -> tuple[list[Volume], PostprocessConfig]:
    import torch

    from vesuvius_lab.data import open_data
    from vesuvius_lab.device import default_device
    from vesuvius_lab.inference import predict_volume
    from vesuvius_lab.io import atomic_path, atomic_write_text

    model, config, checkpoint_signature = _load_consistent(ckpt, overrides)
    data = open_data(config, manifest=manifest)
    records = data.val if manifest is None else [*data.train, *data.val]
    if not records:
        raise DataError(f"{data.manifest_path}: " + ("the manifest's split has no validation volumes to tune on"
                                                      if manifest is None else "the manifest has no volumes"))
    signature = {"checkpoint": checkpoint_signature, "val": dataclasses.asdict(config.val),
                 "patch_size": list(config.data.patch_size),
                 "records": {r.id: [_file_signature(r.image), _file_signature(r.label)] for r in records}}
    meta_path = folder / "probabilities.json"
    volumes = [Volume(r.id, folder / f"{r.id}.prob.npy", folder / f"{r.id}.label.npy") for r in records]
    try:
        fresh = json.loads(meta_path.read_text()) == signature and all(v.probability.is_file() and v.label.is_file()
                                                                         for v in volumes)
    except (OSError, ValueError):
        fresh = False
    if fresh:
        return volumes, config.postprocess
    folder.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    dev = torch.device(device) if device else default_device()
    model.to(dev)
    plain = dataclasses.replace(config, postprocess=PostprocessConfig())  # only the probabilities are kept
    for record, volume in zip(tqdm(records, desc="probabilities", unit="vol", disable=not progress), volumes, strict=True):
        cached = data.cache.load(record)
        prob = predict_volume(model, cached.image, plain, dev).probability
        for path, array in ((volume.probability, prob.astype(np.float32)), (volume.label, np.asarray(cached.label))):
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, array)
    atomic_write_text(meta_path, json.dumps(signature, indent=1))
    return volumes, config.postprocess


def folder_volumes(prob_dir: str | os.PathLike, label_dir: str | os.PathLike) -> list[Volume]:
    """Probability volumes ``{id}.npy`` (or ``{id}.tif``) paired with labels ``{id}.tif``."""
    from vesuvius_lab.evaluate import volume_files

    probs, problems = volume_files(Path(prob_dir), "probability", (".npy", ".tif", ".tiff"))
    labels, more = volume_files(Path(label_dir), "label", (".tif", ".tiff"))
    problems += more
    if problems:
        raise VLabError(problems)
    problems += [f"{probs[i]}: no label {Path(label_dir) / (i + '.tif')} for this probability" for i in sorted(set(probs) - set(labels))]
    problems += [f"{labels[i]}: no probability {Path(prob_dir) / (i + '.npy')} for this label" for i in sorted(set(labels) - set(probs))]
    if not problems and not labels:
        problems.append(f"{label_dir}: no label volumes (*.tif)")
    if problems:
        raise VLabError(problems)
    return [Volume(i, probs[i], labels[i]) for i in sorted(labels)]


def _read(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r")
    from vesuvius_lab.io import read_volume

    return read_volume(path)


# --- the grid ------------------------------------------------------------------------------------
def parse_grid(items: Iterable[str]) -> dict[str, list]:
    """``["threshold=[0.4,0.5]", "repair=[[],[plug_pinholes]]"]`` -> {key: values}; each value
    list is YAML, the keys are ``postprocess`` keys (the ``postprocess.`` prefix is optional)."""
    import yaml

    from vesuvius_lab.config import load_yaml

    known = {f.name for f in dataclasses.fields(PostprocessConfig)}
    grid, problems = {}, []
    for text in items:
        key, sep, raw = text.partition("=")
        key = key.strip().removeprefix("postprocess.")
        if not sep or key not in known:
            problems.append(f"--grid {text!r}: expected KEY=[v1, v2, ...] with KEY one of {', '.join(sorted(known))}")
            continue
        try:
            values = load_yaml(raw)
        except yaml.YAMLError:
            values = None
        if not isinstance(values, list) or not values:
            problems.append(f"--grid {text!r}: the values must be a non-empty YAML list, e.g. {key}=[a, b]")
            continue
        grid[key] = values
    if problems:
        raise ConfigError(problems)
    return grid


def _relevant(cfg: PostprocessConfig) -> tuple:
    """What makes two settings different: the keys their steps read."""
    return tuple((k, json.dumps(getattr(cfg, k))) for k in sorted(_read_keys(cfg)))


def _read_keys(cfg: PostprocessConfig) -> list[str]:
    steps = cfg.steps()
    keys = ["method", "close_holes", "repair"]
    keys += ["threshold"] if cfg.method == "threshold" else ["low", "high"]
    for step, step_keys in STEP_KEYS.items():
        if step in steps:
            keys += step_keys
    return keys


def candidates(base: PostprocessConfig, grid: Mapping[str, Sequence]) -> list[PostprocessConfig]:
    """The base setting first, then every combination of the grid's values that differs from the
    settings before it; each is validated (one line per problem, naming the key)."""
    out, seen, problems = [base], {_relevant(base)}, []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        try:
            cfg = dataclasses.replace(base, **dict(zip(keys, values, strict=True)))
            cfg.check()
            unread = {f.name for f in dataclasses.fields(cfg)} - set(_read_keys(cfg))
            cfg = dataclasses.replace(cfg, **{k: getattr(base, k) for k in unread})  # no step reads them: as configured
        except ConfigError as exc:
            problems += [line for line in exc.lines if line not in problems]
            continue
        if _relevant(cfg) not in seen:
            seen.add(_relevant(cfg))
            out.append(cfg)
    if problems:
        raise ConfigError(problems)
    return out


def changes(cfg: PostprocessConfig, base: PostprocessConfig) -> dict:
    """The keys of ``cfg`` that differ from ``base``."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(base, f.name)}


# --- scoring ---------------------------------------------------------------------------------------
def score_volume(volume: Volume, cfg: PostprocessConfig) -> dict:
    """Post-process one volume's probabilities with ``cfg`` and score the mask (one worker's job)."""
    from vesuvius_lab.leaderboard import volume_score

    prob, label = _read(volume.probability), _read(volume.label)
    t0 = time.process_time()
    mask = postprocess(prob, cfg)
    seconds = time.process_time() - t0
    result = volume_score(mask, np.asarray(label), jobs=1)
    return {**result.as_dict(), "postprocess_cpu_s": seconds}


def _job(args: tuple[Volume, dict]) -> dict:
    volume, values = args
    return score_volume(volume, PostprocessConfig(**values))


@dataclass
class Row:
    """One setting's scores: per volume, and their means over the volumes scored (or ``ids``)."""

    setting: PostprocessConfig
    per_volume: dict = field(default_factory=dict)

    def mean(self, part: str, ids: Sequence[str] | None = None) -> float:
        return statistics.fmean(self.per_volume[i][part] for i in (self.per_volume if ids is None else ids))

    def rank(self, ids: Sequence[str] | None = None) -> tuple:
        """Sort key, best first: the higher mean score; at a score equal to the table's four
        decimals (settings that give the same masks, or all but a few voxels) fewer repair steps,
        then less post-processing CPU time."""
        ids = list(self.per_volume) if ids is None else ids
        cpu = statistics.median(self.per_volume[i]["postprocess_cpu_s"] for i in ids)
        return -round(self.mean("score", ids), 4), len(self.setting.repair), cpu

    def as_dict(self, base: PostprocessConfig) -> dict:
        return {"setting": changes(self.setting, base), **{p: self.mean(p) for p in PARTS},
                "volumes": len(self.per_volume),
                "postprocess_cpu_s": statistics.median(v["postprocess_cpu_s"] for v in self.per_volume.values()),
                "per_volume": self.per_volume}


def folds(ids: Sequence[str], k: int | None = None) -> list[list[str]]:
    """The held-out volumes of each fold: volume i in fold i mod k (default: leave-one-out up to
    ``MAX_FOLDS`` volumes). None of them for a single volume: nothing is left to choose on."""
    if len(ids) < 2:
        if k is not None:
            raise ConfigError(f"--folds {k}: cross-validation needs at least 2 volumes, there is {len(ids)}")
        return []
    k = min(len(ids), MAX_FOLDS) if k is None else k
    if not 2 <= k <= len(ids):
        raise ConfigError(f"--folds {k}: need 2 to {len(ids)} folds for {len(ids)} volumes")
    return [list(ids[f::k]) for f in range(k)]


def _score(rows: Sequence[Row], volumes: Sequence[Volume], run: Callable, bar) -> None:
    """Score each row on the volumes it has no score for yet."""
    work = [(row, v) for row in rows for v in volumes if v.id not in row.per_volume]
    bar.total += len(work)
    bar.refresh()
    for (row, v), result in zip(work, run(_job, [(v, dataclasses.asdict(row.setting)) for row, v in work]), strict=True):
        row.per_volume[v.id] = result
        bar.update()


def _halving(rows: list[Row], volumes: Sequence[Volume], first: int | None, eta: int, run: Callable, bar) -> Row:
    """Successive halving over ``volumes``: every row on the first ``first`` (None: no halving), the
    best 1/eta on all; scores already in a row are reused, missing ones computed. Returns the best
    row of those that reached every volume, ranked on these volumes only."""
    rungs = [first, len(volumes)] if first and first < len(volumes) else [len(volumes)]
    alive = rows
    for r, n in enumerate(rungs):
        _score(alive, volumes[:n], run, bar)
        if r + 1 < len(rungs):
            ids = [v.id for v in volumes[:n]]
            ranked = sorted(alive, key=lambda row: row.rank(ids))
            alive = ranked[: math.ceil(len(ranked) / eta)]
            if rows[0] not in alive:  # the base setting always reaches the end: the "before" of the table
                alive.append(rows[0])
    ids = [v.id for v in volumes]
    return min(alive, key=lambda row: row.rank(ids))


def tune(volumes: Sequence[Volume], base: PostprocessConfig, grid: Mapping[str, Sequence] | None = None,
         eta: int = 3, jobs: int | None = None, progress: bool = True, k: int | None = None) -> dict:
    """Score the grid's settings on the volumes (successive halving with factor ``eta``; 0 or 1:
    every setting on every volume). Returns the table (best first, every volume's scores in
    ``per_volume``), the best setting with its in-sample scores, the base's row, and
    ``out_of_sample``: the cross-validated scores over ``k`` folds (default leave-one-out up to
    ``MAX_FOLDS`` volumes) with each fold's held-out volumes, chosen setting and scores; None for
    one volume."""
    if not volumes:
        raise DataError("no volumes to tune on")
    held_out = folds([v.id for v in volumes], k)
    settings = candidates(base, DEFAULT_GRID if grid is None else grid)
    rows = [Row(s) for s in settings]
    if jobs is None:
        jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = max(1, int(jobs))
    first = None  # the first rung; the folds keep it, so that their search is the one they check
    if eta > 1 and len(rows) > eta and len(volumes) >= 2 * eta:  # a first rung of one volume would be noise
        first = max(1, math.ceil(len(volumes) / eta))
    t0 = time.perf_counter()
    chosen: list[tuple[list[str], Row]] = []
    with tqdm(total=0, desc="tune", unit="job", disable=not progress) as bar, _pool(jobs) as run:
        _halving(rows, volumes, first, eta, run, bar)
        for test in held_out:  # each fold's setting is chosen by the same search on the other volumes only
            row = _halving(rows, [v for v in volumes if v.id not in test], first, eta, run, bar)
            _score([row], [v for v in volumes if v.id in test], run, bar)
            chosen.append((test, row))
    table = sorted(rows, key=lambda row: (-len(row.per_volume), *row.rank()))
    best = table[0]
    out_of_sample = None
    if chosen:
        held = [(i, row) for test, row in chosen for i in test]
        out_of_sample = {
            **{p: statistics.fmean(row.per_volume[i][p] for i, row in held) for p in PARTS},
            "folds": len(chosen), "leave_one_out": len(chosen) == len(volumes),
            "per_fold": [{"held_out": test, "setting": changes(row.setting, base),
                          "chosen_on": row.mean("score", [v.id for v in volumes if v.id not in test]),
                          **{p: row.mean(p, test) for p in PARTS}} for test, row in chosen]}
    return {
        "rows": [row.as_dict(base) for row in table],
        "best": {"setting": changes(best.setting, base), "postprocess": dataclasses.asdict(best.setting),
                 **{p: best.mean(p) for p in PARTS}},
        "base": {p: rows[0].mean(p) for p in PARTS},
        "out_of_sample": out_of_sample,
        "volumes": [v.id for v in volumes],
        "settings": len(rows),
        "jobs": jobs,
        "seconds": round(time.perf_counter() - t0, 2),
    }


class _pool:
    """``run(fn, items)`` -> results in order: in this process for one job, else worker processes
    (spawned: the parent may hold torch threads, which a fork would inherit half-initialised)."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self.executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> Callable:
        if self.jobs > 1:
            import multiprocessing

            self.executor = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"))
            return lambda fn, items: self.executor.map(fn, items)
        return lambda fn, items: map(fn, items)

    def __exit__(self, *exc) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)


def format_table(result: dict, write: Callable[[str], None] = print) -> None:
    """The out-of-sample score first (the one to trust) with each fold's choice, then the in-sample
    table (one line per setting, best first) and the in-sample best setting."""
    n = len(result["volumes"])
    oos = result["out_of_sample"]
    if oos is None:
        write("out-of-sample: none (one volume: no other volume to choose the setting on)")
    else:
        how = "leave-one-out" if oos["leave_one_out"] else f"{oos['folds']} folds"
        write(f"out-of-sample: score {oos['score']:.4f}, topo {oos['topo']:.4f}, surface_dice {oos['surface_dice']:.4f}, "
              f"voi_score {oos['voi_score']:.4f} ({how} over {n} volumes: each scored with the setting chosen on the others)")
        for fold in oos["per_fold"]:
            write(f"  held out {','.join(fold['held_out'])}: {setting_text(fold['setting'])} "
                  f"(chosen on the others at {fold['chosen_on']:.4f}) scores {fold['score']:.4f}")
    write("in-sample table (chosen and scored on the same volumes):")
    write(f"{'score':>7} {'topo':>7} {'sdice':>7} {'voi':>7} {'vols':>4} {'cpu_s':>6}  setting")
    for row in result["rows"]:
        write(f"{row['score']:7.4f} {row['topo']:7.4f} {row['surface_dice']:7.4f} {row['voi_score']:7.4f} "
              f"{row['volumes']:4d} {row['postprocess_cpu_s']:6.2f}  {setting_text(row['setting'])}")
    b, base = result["best"], result["base"]
    write(f"in-sample best: score {b['score']:.4f} (as configured {base['score']:.4f}), topo {b['topo']:.4f}, "
          f"surface_dice {b['surface_dice']:.4f}, voi_score {b['voi_score']:.4f} over {n} volumes, "
          f"{result['settings']} settings in {result['seconds']:.0f} s")


def setting_text(setting: dict) -> str:
    """A setting's changes on one line, as the table shows them (CLI and notebook 05)."""
    return " ".join(f"{k}={_short(v)}" for k, v in setting.items()) or "(as configured)"


def _short(value) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)

