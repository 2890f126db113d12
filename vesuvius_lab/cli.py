"""The vesuvius-lab command line. Exit status: 0 done, 1 internal error, 2 bad input (one line per
problem), 3 stopped by SIGINT or SIGTERM (resumable)."""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import gc
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from vesuvius_lab import __version__
from vesuvius_lab.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_STOPPED, Stopped, VLabError

Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: list[Command] = []  # (name, help, add its arguments, run it), in the order of the help


def command(name: str, help_text: str, add_args: Callable[[argparse.ArgumentParser], None]):
    """Registers the function below as ``vesuvius-lab NAME``: its help and arguments sit beside it."""
    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS.append((name, help_text, add_args, run))
        return run
    return register


def _patch_size(text: str) -> tuple[int, int, int]:
    from vesuvius_lab.synth import parse_shape

    try:
        return parse_shape(text) if "," in text or "x" in text else (int(text),) * 3
    except (VLabError, ValueError):
        raise argparse.ArgumentTypeError(f"invalid patch size {text!r}: expected N or Z,Y,X") from None


# --- synth -----------------------------------------------------------------------------------
def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="output data root (created; must be empty)")
    p.add_argument("--volumes", type=int, default=8, help="training volumes (default 8)")
    p.add_argument("--shape", default="128", help="N or Z,Y,X (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same files (default 0)")
    p.add_argument("--scrolls", type=int, default=4, help="number of scroll ids (default 4)")
    p.add_argument("--test-volumes", type=int, default=1, help="volumes in test_images/ (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier synthetic dataset at OUT")
    p.add_argument("--geometry", choices=("planar", "scroll"), default="planar",
                   help="planar: near-parallel wavy sheets (fast tests); scroll: wraps round a tilted axis, pressed "
                        "into contact, with ring artifacts (default planar)")


@command("synth", "write a synthetic dataset in the Kaggle layout", _synth_args)
def _synth(args: argparse.Namespace) -> int:
    from vesuvius_lab.synth import parse_shape, synth

    rows = synth(args.out, args.volumes, parse_shape(args.shape), args.seed, args.scrolls, args.test_volumes, args.overwrite,
                 geometry=args.geometry)
    print(f"wrote {len(rows)} training volumes to {args.out}")
    return EXIT_OK


# --- validate --------------------------------------------------------------------------------
def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help="data root, or a manifest YAML")
    p.add_argument("--patch-size", type=_patch_size, help="note volumes smaller than this patch, which training pads (N or Z,Y,X)")
    p.add_argument("--config", type=Path, help="take the patch size from this config")
    p.add_argument("--jobs", type=int, default=None, help="decoding threads")


@command("validate", "check a data root or manifest before training", _validate_args)
def _validate(args: argparse.Namespace) -> int:
    from vesuvius_lab.preflight import preflight

    patch = args.patch_size
    if patch is None and args.config is not None:
        from vesuvius_lab.config import load_config

        patch = load_config(args.config).data.patch_size
    notes: list[str] = []
    problems = preflight(args.source, patch_size=patch, jobs=args.jobs, say=notes.append)
    for note in notes:
        print(f"note: {note}")
    if problems:
        raise VLabError(problems)
    print(f"{args.source}: ok")
    return EXIT_OK


# --- manifest --------------------------------------------------------------------------------
def _manifest_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="{build,check}")
    b = sub.add_parser("build", help="scan a data root and write a manifest")
    b.add_argument("root", type=Path)
    b.add_argument("-o", "--output", type=Path, required=True, help="manifest YAML to write")
    b.add_argument("--name", help="dataset name (default: folder name)")
    b.add_argument("--like", type=Path, help="copy the split policy and description from this manifest")
    c = sub.add_parser("check", help="report records that vanished or changed")
    c.add_argument("manifest", type=Path)
    c.add_argument("--root", type=Path, help="data root (overrides the manifest's)")


@command("manifest", "build or check a dataset manifest", _manifest_args)
def _manifest(args: argparse.Namespace) -> int:
    from vesuvius_lab.manifest import build_manifest, load_manifest

    if args.action == "build":
        template = load_manifest(args.like) if args.like else None
        manifest = build_manifest(args.root, name=args.name or (template.name if template else None), template=template)
        manifest.save(args.output)
        train, val = manifest.split_ids()
        print(f"wrote {args.output}: {len(manifest.records)} records ({len(train)} train, {len(val)} val)")
        return EXIT_OK
    manifest = load_manifest(args.manifest, root=args.root)
    _, problems = manifest.locate()
    if problems:
        raise VLabError(problems)
    print(f"{args.manifest}: {len(manifest.records)} records present, sizes unchanged")
    return EXIT_OK


# --- demo-data -------------------------------------------------------------------------------
def _demo_args(p: argparse.ArgumentParser) -> None:
    from vesuvius_lab.manifest import DEMO_MANIFEST

    p.add_argument("--manifest", type=Path, default=DEMO_MANIFEST, help="synthetic dataset manifest")


@command("demo-data", "prepare the embedded synthetic demo dataset if absent", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    from vesuvius_lab.manifest import ensure_demo_data

    manifest = ensure_demo_data(args.manifest)
    print(f"demo data ready: {len(manifest.records)} volumes at {manifest.root}")
    return EXIT_OK


# --- train -----------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path,
                   help="run config YAML (e.g. configs/demo.yaml); with --resume optional: the run's own config.yaml "
                        "is the config, and a file given must agree with it outside the overrides")
    p.add_argument("--run-dir", type=Path, help="run directory (default: $VLAB_RUNS_DIR or ./runs, then /<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run directory's last checkpoint with the run's own config; only the "
                        "overrides named here change it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--budget", metavar="DURATION",
                   help="wall time the whole run may take, e.g. 6h, 90m, 1h30m (training.time_budget_hours)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


@command("train", "train the topology-aware 3D U-Net (also under torchrun)", _train_args)
def _train(args: argparse.Namespace) -> int:
    from vesuvius_lab.config import load_config
    from vesuvius_lab.training import train
    from vesuvius_lab.training.budget import parse_duration
    from vesuvius_lab.training.run_dir import RunState, default_run_dir, resume_config

    overrides = [*args.overrides, *([f"training.time_budget_hours={parse_duration(args.budget)!r}"] if args.budget else [])]
    if args.config is None and (not args.resume or args.run_dir is None):
        raise VLabError("train needs --config CFG, or --resume --run-dir DIR to continue a run with its own config")
    run_dir = args.run_dir or default_run_dir(args.config)
    config = resume_config(run_dir, args.config, overrides) if args.resume else load_config(args.config, overrides)
    result = train(config, run_dir, resume=args.resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":
        print(f"{run_dir}: {result['message']}")
    return EXIT_OK if result["state"] == RunState.FINISHED else EXIT_STOPPED


# --- plan ------------------------------------------------------------------------------------
def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="run config YAML to plan (e.g. configs/demo.yaml)")
    p.add_argument("--target-epoch-minutes", type=float, default=60.0, help="wanted epoch duration (default 60)")
    p.add_argument("--budget-hours", type=float,
                   help="wall time of the whole run (default: training.time_budget_hours); sets the epochs and the last one's length")
    p.add_argument("--coverage-target", type=float,
                   help="share of the unique patch positions an epoch should see (default: warn below 0.5)")
    p.add_argument("--batch-sizes", help="comma-separated candidates (default: 1, 2, 4, ... until no gain or OOM)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per batch size (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per batch size (default 2)")
    p.add_argument("--memory-cap-mb", type=float, help="treat this as the device memory")
    p.add_argument("--max-seconds", type=float, default=90.0, help="time budget for the batch-size sweep (default 90)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--apply", type=Path, metavar="OUT.yaml", help="write the config with the plan applied")
    p.add_argument("--plan-file", type=Path, help="where to save plan.json (default: the config's run directory)")
    p.add_argument("--lr-range", action="store_true",
                   help="instead of the batch-size plan: the LR range test on the config's real step (LR rising "
                        "exponentially, stopped when the loss diverges); --apply writes the suggested optim.lr")
    p.add_argument("--lr-range-steps", type=int, default=100, help="steps of the LR range test (default 100)")
    p.add_argument("--lr-min", type=float, default=1e-8, help="the range test's first LR (default 1e-8)")
    p.add_argument("--lr-max", type=float, default=1.0, help="the range test's last LR (default 1)")
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="with --lr-range: save the loss-against-LR plot")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


@command("plan", "measure this machine and plan batch size and steps per epoch", _plan_args)
def _plan(args: argparse.Namespace) -> int:
    import json

    from vesuvius_lab.config import load_config
    from vesuvius_lab.planner import apply_plan, forecast_lines, measure, recommend, save_plan
    from vesuvius_lab.training.run_dir import RunDir, default_run_dir

    config = load_config(args.config, args.overrides)
    if args.lr_range:
        return _lr_range(args, config)
    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None
    m = measure(config, sizes, warmup=args.warmup, steps=args.steps, memory_cap_mb=args.memory_cap_mb,
                progress=not args.json, max_seconds=args.max_seconds)
    if os.environ.get("RANK", "0") != "0":  # under torchrun every rank measures; rank 0 reports
        return EXIT_OK
    budget_hours = args.budget_hours or config.training.time_budget_hours
    plan = recommend(m, config, args.target_epoch_minutes, budget_hours, coverage_target=args.coverage_target)
    plan_file = args.plan_file or RunDir(default_run_dir(args.config)).plan
    save_plan(plan, plan_file)
    if args.apply:
        apply_plan(args.config, plan, args.apply)
    if args.json:
        print(json.dumps(plan.to_dict()))
        return EXIT_OK
    for line in plan.explanation:
        print(line)
    for line in forecast_lines(plan):
        print(line)
    print(plan.lr_note)
    for w in plan.warnings:
        print(f"warning: {w}")
    for p in plan.presets:
        print(f"preset {p.name}: {p.train_iterations_per_epoch} steps x {p.max_epochs} epochs, "
              f"{p.forecast_epoch_s / 60:.1f} min/epoch, coverage {p.coverage:.0%} - {p.reason}")
    print(f"saved {plan_file}" + (f"; wrote {args.apply}" if args.apply else ""))
    return EXIT_OK


def _lr_range(args: argparse.Namespace, config) -> int:
    import json

    from vesuvius_lab.errors import ConfigError
    from vesuvius_lab.lab.plots import figure_png
    from vesuvius_lab.lr_range import apply_lr, lr_range_test, range_figure

    if not 0 < args.lr_min < args.lr_max:
        raise ConfigError(f"--lr-min {args.lr_min:g} and --lr-max {args.lr_max:g}: need 0 < min < max")
    if args.lr_range_steps < 2:
        raise ConfigError(f"--lr-range-steps {args.lr_range_steps}: need at least 2")
    result = lr_range_test(config, args.lr_min, args.lr_max, args.lr_range_steps, progress=not args.json)
    if args.plot:
        args.plot.write_bytes(figure_png(range_figure(result)))
    if args.apply:
        if result.suggested_lr is None:
            raise VLabError(f"{result.summary()}; {args.apply} not written")
        apply_lr(args.config, result.suggested_lr, args.apply)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(result.summary())
        if args.plot or args.apply:
            print("wrote " + ", ".join(str(p) for p in (args.plot, args.apply) if p))
    return EXIT_OK


# --- predict ---------------------------------------------------------------------------------
def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, nargs="+", required=True,
                   help="checkpoint (.pt) written by train; several, a run folder (its best kept checkpoints) "
                        "or a quoted glob predict as an ensemble that averages their probabilities")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="a checkpoint's EMA of the weights or its trained weights (default: the EMA when it has one)")
    p.add_argument("--input", type=Path, required=True, help="a volume .tif, a folder of them, or a Zarr / OME-Zarr store")
    p.add_argument("--output", type=Path, required=True,
                   help="folder for {id}.tif masks and submission.zip (Zarr input: for {store name}.zarr)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--part", default="1/1", metavar="I/N",
                   help="do the I-th of N parts (array jobs: SLURM_ARRAY_TASK_ID+1/N); Zarr: every N-th block, TIFF: every N-th file")
    p.add_argument("--array", default="", help="Zarr: the array or multiscale group inside the store (default: its root)")
    p.add_argument("--level", type=int, help="Zarr: OME-Zarr resolution level (default 0)")
    p.add_argument("--crop", help="Zarr: z0:z1,y0:y1,x0:x1 at that level (default: all)")
    p.add_argument("--block", type=_patch_size, help="Zarr: block edge N or Z,Y,X, multiples of 64 (default: 256 or 2x the patch)")
    p.add_argument("--probability", action="store_true", help="Zarr: also write the probability (uint8, 255 = 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="TIFF: predict every mask again (default: keep masks made with the same weights, settings and input)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. val.tta=true postprocess.threshold=0.6")


@command("predict", "predict masks with a checkpoint; writes submission.zip", _predict_args)
def _predict(args: argparse.Namespace) -> int:
    from vesuvius_lab.io import ZarrRef, is_zarr_path, parse_crop
    from vesuvius_lab.predict import parse_part, predict

    part = parse_part(args.part)
    zarr_input = is_zarr_path(args.input)
    if not zarr_input and (args.array or args.level is not None or args.crop or args.block or args.probability):
        raise VLabError(f"{args.input}: --array, --level, --crop, --block and --probability apply to Zarr input only")
    ref = ZarrRef(args.array, args.level, parse_crop(args.crop, "--crop")) if zarr_input else None
    masks = predict(args.checkpoint, args.input, args.output, args.overrides, args.device, part=part, ref=ref,
                    block=args.block, probability=args.probability, weights=args.weights, overwrite=args.overwrite)
    if zarr_input:
        print(f"part {part[0]}/{part[1]}: wrote {masks[0]}")
    elif part[1] > 1:
        print(f"part {part[0]}/{part[1]}: {len(masks)} masks in {args.output}")
    else:
        print(f"{len(masks)} masks and {args.output / 'submission.zip'}")
    return EXIT_OK


# --- cache -----------------------------------------------------------------------------------
def _cache_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="{build}")
    b = sub.add_parser("build", help="prepare every record (decoded volume, skeleton, distance) in parallel; resumable")
    b.add_argument("source", type=Path, metavar="MANIFEST_OR_CONFIG", help="a manifest YAML or a run config YAML")
    b.add_argument("--jobs", type=int, default=None, help="processes (default: all cores)")
    b.add_argument("--cache-dir", type=Path, help="cache folder (default: the config's data.cache_dir, $VLAB_CACHE_DIR or ~/.cache/vesuvius_lab)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (with a config)")


@command("cache", "prepare a dataset's cache with all cores ahead of training", _cache_args)
def _cache(args: argparse.Namespace) -> int:
    import yaml

    from vesuvius_lab.config import Config, load_config
    from vesuvius_lab.data import open_data

    if args.jobs is not None and args.jobs < 1:
        raise VLabError(f"--jobs {args.jobs}: need at least 1")
    try:
        doc = yaml.safe_load(args.source.read_text(encoding="utf-8")) if args.source.is_file() else None
    except yaml.YAMLError:
        doc = None
    if isinstance(doc, dict) and "format" in doc and "records" in doc:  # a manifest
        config, data = Config(), open_data(Config(), manifest=args.source, cache_dir=args.cache_dir or _default_cache())
    else:
        config = load_config(args.source, args.overrides)
        data = open_data(config, cache_dir=args.cache_dir)
    report = data.prepare(config, jobs=args.jobs, progress=not args.no_progress, say=None if not args.no_progress else print)
    if report.todo:
        print(f"{data.cache.root}: prepared {len(report.done)} volumes in {report.seconds:.1f} s with {report.jobs} jobs "
              f"({report.total - report.todo} were ready)")
    else:
        print(f"{data.cache.root}: all {report.total} volumes ready")
    return EXIT_OK


def _default_cache() -> Path:
    from vesuvius_lab.cache import default_cache_dir

    return default_cache_dir()


# --- bench -----------------------------------------------------------------------------------
def _bench_args(p: argparse.ArgumentParser) -> None:
    from vesuvius_lab.bench import BENCHES, load

    sub = p.add_subparsers(dest="bench", required=True, metavar="{" + ",".join(BENCHES) + "}")
    for name in BENCHES:
        module = load(name)
        b = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        b.add_argument("--json", action="store_true", help="print one JSON object")
        module.add_args(b)


@command("bench", "measure speed against a same-run baseline; JSON with --json", _bench_args)
def _bench(args: argparse.Namespace) -> int:
    import json

    from vesuvius_lab.bench import load

    result = load(args.bench).run(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return EXIT_OK


# --- evaluate --------------------------------------------------------------------------------
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", type=Path, required=True, help="folder of predictions {id}.tif")
    p.add_argument("--labels", type=Path, required=True, help="folder of labels {id}.tif (2 = ignored)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--jobs", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("--fg-threshold", type=float, default=None, help="foreground is value > T (default: value != 0)")
    p.add_argument("--topology", action="store_true",
                   help="also each volume's Betti-0/1/2 of prediction and label and the matched feature counts")


@command("evaluate", "score predictions against labels with the leaderboard metric", _evaluate_args)
def _evaluate(args: argparse.Namespace) -> int:
    import json

    from vesuvius_lab.evaluate import evaluate_dirs, format_report

    if args.jobs is not None and args.jobs < 1:
        raise VLabError(f"--jobs {args.jobs}: need at least 1")
    result = evaluate_dirs(args.pred, args.labels, jobs=args.jobs, fg_threshold=args.fg_threshold,
                           with_topology=args.topology)
    if args.json:
        print(json.dumps(result))
    else:
        format_report(result)
    return EXIT_OK


# --- sweep -----------------------------------------------------------------------------------
def _sweep_args(p: argparse.ArgumentParser) -> None:  # sampler and pruner names are checked by sweep.prepare
    p.add_argument("config", type=Path, help="run config YAML: every trial is it with the trial's overrides")
    p.add_argument("--space", type=Path, required=True,
                   help="search space YAML: per section.key a list of choices, a range {low, high[, log, step]}")
    p.add_argument("--trials", type=int, default=20, help="trials in the study, over all its workers (default 20)")
    p.add_argument("--trial-budget", metavar="DURATION", help="wall time of each trial, e.g. 20m (training.time_budget_hours)")
    p.add_argument("--sampler", default="tpe", help="Optuna sampler: tpe (default), random or grid")
    p.add_argument("--pruner", default="median",
                   help="Optuna pruner fed each validation score: median (default), halving (successive halving), "
                        "hyperband or none")
    p.add_argument("--study", help="study name: trials go to RUNS/<study>/trial_NNN (default: the space file's name)")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage URL shared by several workers (default: SQLite RUNS/<study>/study.db)")
    p.add_argument("--runs-dir", type=Path, help="folder of runs (default: $VLAB_RUNS_DIR or ./runs)")
    p.add_argument("--seed", type=int, help="sampler seed (give each worker its own)")
    p.add_argument("--no-baseline", action="store_true", help="do not run the config's own values as the first trial")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@command("sweep", "search recipes with Optuna: each trial a run with its own overrides and time budget", _sweep_args)
def _sweep(args: argparse.Namespace) -> int:
    from vesuvius_lab.sweep import prepare, run_worker
    from vesuvius_lab.timefmt import format_duration

    sweep = prepare(args.config, args.space, args.trials, args.trial_budget, args.sampler, args.pruner, args.storage,
                    args.study, args.runs_dir, args.seed, baseline=not args.no_baseline)
    result = run_worker(sweep, progress=not args.no_progress)
    states = ", ".join(f"{n} {state}" for state, n in result["states"].items())
    print(f"study {result['study']} ({sweep.folder}): {result['trials']} trials ({states}); "
          f"this worker {format_duration(result['wall_s'])}")
    best = result["best"]
    if best:
        print(f"best: trial {best['trial']} score {best['score']:.4f} {best['params']} ({best['run_dir']})")
    return EXIT_OK


# --- runs ------------------------------------------------------------------------------------
def _runs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs_dir", nargs="?", type=Path, metavar="DIR",
                   help="a folder of run folders, or one run folder (default: $VLAB_RUNS_DIR or ./runs)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


@command("runs", "every run side by side: state, steps, wall time, best score, differing config keys", _runs_args)
def _runs(args: argparse.Namespace) -> int:
    import json

    from vesuvius_lab.compare import default_runs_dir, format_runs, runs_json, summarize_runs

    runs_dir = args.runs_dir or default_runs_dir()
    summaries = summarize_runs(runs_dir)
    if args.json:
        print(json.dumps(runs_json(summaries)))
    elif not summaries:
        print(f"{runs_dir}: no runs yet (vesuvius-lab train, or notebook 04, writes them)")
    else:
        format_runs(summaries)
    return EXIT_OK


# --- tune-postprocess ------------------------------------------------------------------------
def _tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, nargs="?", help="run folder: its best checkpoint predicts its validation volumes")
    p.add_argument("--checkpoint", type=Path, help="another checkpoint than RUN_DIR/checkpoints/best.pt")
    p.add_argument("--cache", type=Path, help="where the probabilities are kept (default RUN_DIR/tune)")
    p.add_argument("--prob", type=Path, help="instead of a run: a folder of probabilities {id}.npy or {id}.tif")
    p.add_argument("--labels", type=Path, help="with --prob: the folder of labels {id}.tif")
    p.add_argument("--manifest", type=Path,
                   help="with RUN_DIR: every volume of another dataset's manifest instead of the run's validation "
                        "volumes (a transfer check; cached in RUN_DIR/tune-{manifest name})")
    p.add_argument("--config", type=Path,
                   help="config whose postprocess section is the starting setting, copied by --apply (default RUN_DIR/config.yaml)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=[v1,v2,...]",
                   help="postprocess values to search (repeat per key; default: threshold, repair steps, hole_window)")
    p.add_argument("--eta", type=int, default=3, help="successive halving: the best 1/ETA go on to all volumes (0: full grid)")
    p.add_argument("--folds", type=int, default=None, metavar="K",
                   help="the out-of-sample score: each of K folds of the volumes scored with the setting chosen on the "
                        "others (default: leave-one-out up to 10 volumes, 10 folds above)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--device", help="for the probabilities: cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--json", action="store_true",
                   help="print the table, the best setting (in-sample) and the out-of-sample folds as one JSON object")
    p.add_argument("--apply", type=Path, metavar="OUT.yaml", help="write the config with the best setting")
    p.add_argument("--tta", action="store_true",
                   help="the run's probabilities with mirror test-time augmentation (val.tta=true; --apply writes it too)")


@command("tune-postprocess", "choose post-processing and repair settings by the exact score", _tune_args)
def _tune(args: argparse.Namespace) -> int:
    import json

    from vesuvius_lab.config import load_config, rewrite_config
    from vesuvius_lab.postprocess import PostprocessConfig
    from vesuvius_lab.tune import folder_volumes, format_table, parse_grid, run_probabilities, tune

    if (args.run_dir is None) == (args.prob is None):
        raise VLabError("give a RUN_DIR, or --prob DIR with --labels DIR")
    if args.prob is not None and args.labels is None:
        raise VLabError("--prob needs --labels DIR")
    if args.jobs is not None and args.jobs < 1:
        raise VLabError(f"--jobs {args.jobs}: need at least 1")
    if args.folds is not None and args.folds < 2:  # before the probabilities are predicted
        raise VLabError(f"--folds {args.folds}: need at least 2 (one fold would have no volume to choose on)")
    if args.manifest is not None and args.run_dir is None:
        raise VLabError("--manifest predicts with a run's checkpoint: give a RUN_DIR")
    if args.tta and args.run_dir is None:
        raise VLabError("--tta predicts a run's volumes: give a RUN_DIR (--prob folders are already predicted)")
    grid = parse_grid(args.grid) if args.grid else None
    source = args.config or (args.run_dir / "config.yaml" if args.run_dir is not None else None)
    if args.apply and (source is None or not source.is_file()):
        raise VLabError(f"--apply needs the config to copy: {source} not found" if source else "--apply needs --config CFG")
    base = load_config(args.config).postprocess if args.config else PostprocessConfig()
    if args.run_dir is not None:
        volumes, stored = run_probabilities(args.run_dir, args.cache, args.checkpoint, args.device, progress=not args.json,
                                            overrides=["val.tta=true"] if args.tta else [], manifest=args.manifest)
        base = base if args.config else stored
    else:
        volumes = folder_volumes(args.prob, args.labels)
    result = tune(volumes, base, grid, eta=args.eta, jobs=args.jobs, progress=True, k=args.folds)
    if args.apply:
        rewrite_config(source, args.apply, {"postprocess": result["best"]["setting"], **({"val": {"tta": True}} if args.tta else {})})
        result["applied"] = str(args.apply)
    if args.json:
        print(json.dumps(result))
    else:
        format_table(result)
        if args.apply:
            print(f"wrote {args.apply}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vesuvius-lab", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vesuvius-lab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_args, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(run=run)
    return parser


# what a stopped command leaves, and how to go on (exit status 3)
AFTER_STOP = {
    "train": "resume with --resume",
    "sweep": "run it again: the interrupted trial resumes from its checkpoint",
    "predict": "run it again: finished masks are kept",
    "cache": "run it again: prepared volumes are kept",
    "tune-postprocess": "run it again: cached probabilities are kept",
}


def _raise_stopped(_signum, _frame) -> None:
    raise Stopped()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    own_process = argv is None
    if own_process:  # SIGTERM stops a command as Ctrl-C does (training checkpoints first: training.loop)
        signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        return args.run(args)
    except VLabError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:
        name = getattr(exc, "signal", "SIGINT")
        print(f"stopped by {name}; {AFTER_STOP.get(args.command, 'run it again')}", file=sys.stderr)
        return EXIT_STOPPED
    except Exception as exc:  # noqa: BLE001 - the user gets one line; VLAB_DEBUG=1 shows the traceback
        if os.environ.get("VLAB_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (set VLAB_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if own_process:  # a process of its own, about to exit: torch and MONAI leave millions of objects
            gc.freeze()  # that the exit's last collection would walk for seconds (a budget run's end time)


def run() -> NoReturn:
    """``vesuvius-lab`` and ``python -m vesuvius_lab``: ``main`` in a process of its own."""
    faulthandler.enable()  # a crash in native code (a decoder, a collective) prints every thread's Python stack
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_rank(code)
    raise SystemExit(code)


def _exit_rank(code: int) -> NoReturn:
    """End a torchrun rank as the interpreter would, less its teardown. DDP keeps the gloo process
    group alive past ``destroy_process_group``; a worker thread of that group still letting go of
    the last collective's tensors when the teardown starts aborts the rank ("terminate called
    without an active exception", pytorch/pytorch#179291), and torchrun then reports a run that
    finished as failed. By now the run folder holds its last word."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()  # what the interpreter waits for at exit (the live prediction's last write)
    atexit._run_exitfuncs()  # logging's flush, multiprocessing's finalizers, as at a normal exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
