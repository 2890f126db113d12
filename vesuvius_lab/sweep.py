"""Recipe searches on Optuna (``vesuvius-lab sweep``, notebook 07): each trial an ordinary run.

A search space is YAML beside the config, one entry per config key: a list of choices, a float
range ``{low, high}`` (``log: true`` for log-uniform, ``step`` for a grid of it) or an integer range
(``low`` and ``high`` both integers). Every choice and bound is checked against the config's rules
(``config.RULES``) with the config itself, as an override would be, before any trial starts.

A trial is ``train()`` in ``runs/<study>/trial_NNN`` with its overrides and a time budget
(``training.time_budget_hours``), so notebook 04 follows it, ``vesuvius-lab runs`` and notebook 06
list it, and ``train --resume`` continues it. Each validation score goes to Optuna as an
intermediate value (``training.loop``'s ``pruner`` hook); a pruned trial ends with its checkpoint
and the run state "pruned". The study lives in SQLite under the study folder, or in any Optuna
storage (``--storage URL``) that several workers share.

Faults: a worker claims a trial (``claim.json``: host, pid, process start) under the study's lock
(``sweep.lock``) right after Optuna hands it out, and ``train()`` holds the run folder's lock while
it trains. A trial Optuna still calls running whose claimer is gone and whose run folder nobody
holds was interrupted (a SIGKILL, a node lost): the next worker to look adopts it and resumes it
from its checkpoint, under the same trial number. The run lock makes sure no two workers train it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from vesuvius_lab.config import load_config, load_yaml, rewrite_config
from vesuvius_lab.errors import ConfigError, Stopped, VLabError
from vesuvius_lab.io import atomic_write_text, locked
from vesuvius_lab.training.run_dir import RunDir, RunState, resume_config, same_process

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "halving", "hyperband", "none")
STUDY_DB, STUDY_LOCK, CLAIM = "study.db", "sweep.lock", "claim.json"
RANGE_KEYS = {"low", "high", "log", "step"}
STALE_S = 120.0  # a claim from another host, its run folder unheld and untouched this long: interrupted
COUNTED = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")  # Optuna's states that use up one of --trials: ended, then running


@dataclass(frozen=True)
class Param:
    """One key of the search space: ``choices``, or a range from ``low`` to ``high``."""

    key: str
    choices: tuple | None = None
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    integer: bool = False  # an integer range: the config key takes integers

    def suggest(self, trial):
        """This key's value in an Optuna trial (define-by-run)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid(self) -> list | None:
        """Every value the grid sampler visits; None for a continuous range."""
        if self.choices is not None:
            return list(self.choices)
        if self.integer:
            return list(range(self.low, self.high + 1, self.step or 1))
        if self.step:
            n = int(round((self.high - self.low) / self.step))
            return [round(self.low + i * self.step, 12) for i in range(n + 1)]
        return None

    def contains(self, value) -> bool:
        if self.choices is not None:
            return value in self.choices
        return isinstance(value, int | float) and not isinstance(value, bool) and self.low <= value <= self.high

    def bounds(self) -> list:
        """The values whose check against the config's rules checks the whole entry."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def override(key: str, value) -> str:
    """``section.key=value`` as ``train`` takes it (JSON is YAML: strings quoted, floats exact)."""
    return f"{key}={json.dumps(value)}"


def parse_space(doc: object, origin: str) -> tuple[dict[str, Param], list[str]]:
    """The entries of a space document, and one line per malformed one."""
    if not isinstance(doc, dict) or not doc:
        return {}, [f"{origin}: expected a mapping of section.key to choices or a range"]
    space, problems = {}, []
    for key, spec in doc.items():
        where = f"{origin}: {key}"
        if isinstance(spec, list):
            if not spec or not all(v is None or isinstance(v, bool | int | float | str) for v in spec):
                problems.append(f"{where}: choices must be a non-empty list of numbers, strings or booleans")
                continue
            space[key] = Param(str(key), choices=tuple(spec))
        elif isinstance(spec, dict):
            unknown = set(spec) - RANGE_KEYS
            low, high = spec.get("low"), spec.get("high")
            if unknown:
                problems.append(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))} (a range has low, high, log, step)")
            elif not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
                problems.append(f"{where}: a range needs numbers low and high")
            elif low >= high:
                problems.append(f"{where}: low {low} must be below high {high}")
            elif spec.get("log") and low <= 0:
                problems.append(f"{where}: a log-uniform range needs low > 0 (got {low})")
            elif spec.get("log") and spec.get("step"):
                problems.append(f"{where}: a range is log-uniform or stepped, not both")
            else:
                space[key] = Param(str(key), low=low, high=high, log=bool(spec.get("log")), step=spec.get("step"),
                                   integer=isinstance(low, int) and isinstance(high, int))
        else:
            problems.append(f"{where}: expected a list of choices or a range {{low, high}}, got {spec!r}")
    return space, problems


def load_space(space_path: str | Path, config_path: str | Path) -> dict[str, Param]:
    """The search space, every choice and bound checked against ``config_path``'s rules (as the
    trial's override will be); all problems at once, one line each, naming the space file."""
    space_path = Path(space_path)
    if not space_path.is_file():
        raise ConfigError(f"{space_path}: search space not found")
    try:
        doc = load_yaml(space_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{space_path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    space, problems = parse_space(doc, str(space_path))
    config = load_config(config_path)  # the config's own problems first, under its own name
    for key, param in list(space.items()):
        section, _, name = key.partition(".")
        hint = typing.get_type_hints(type(getattr(config, section))).get(name) if hasattr(config, section) else None
        if param.choices is None and hint is not None:  # a range is of the key's own type (a float key's 0 is 0.0)
            integer = int in (typing.get_args(hint) or (hint,))
            space[key] = dataclasses.replace(param, integer=integer, low=param.low if integer else float(param.low),
                                             high=param.high if integer else float(param.high))
    for param in space.values():
        for value in param.bounds():
            try:
                load_config(config_path, [override(param.key, value)])
            except ConfigError as exc:  # the entry's first problem: one line per key
                problems.append(f"{space_path}: {exc.lines[0].removeprefix('override: ')}")
                break
    if problems:
        raise ConfigError(problems)
    return space


@dataclass
class Sweep:
    """One study: its config, space and settings; every worker of the study builds the same one."""

    config: Path
    space_path: Path
    space: dict[str, Param]
    study: str
    runs_dir: Path
    trials: int
    trial_budget_h: float | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    storage: str | None = None
    seed: int | None = None
    baseline: bool = True  # the config's own values as the first trial, where the space holds them
    notes: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.runs_dir / self.study

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.folder / STUDY_DB).resolve()}"

    def trial_dir(self, number: int) -> Path:
        return self.folder / f"trial_{number:03d}"

    def overrides(self, params: dict) -> list[str]:
        budget = [f"training.time_budget_hours={self.trial_budget_h!r}"] if self.trial_budget_h else []
        return [override(k, v) for k, v in params.items()] + budget

    def open_study(self):
        """The Optuna study (created by the first worker), with this worker's sampler and pruner."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with locked(self.folder / STUDY_LOCK):  # two workers starting at once would both create the tables
            return optuna.create_study(storage=_storage(self.storage_url), study_name=self.study, direction="maximize",
                                       sampler=self._sampler(), pruner=self._pruner(), load_if_exists=True)

    def _sampler(self):
        import optuna

        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=self.seed)
        if self.sampler == "grid":
            return optuna.samplers.GridSampler({k: p.grid() for k, p in self.space.items()}, seed=self.seed)
        return optuna.samplers.TPESampler(seed=self.seed)

    def _pruner(self):
        import optuna

        if self.pruner == "median":  # two finished trials set the median (Optuna's 5 would prune none of a small sweep)
            return optuna.pruners.MedianPruner(n_startup_trials=2)
        if self.pruner == "halving":
            return optuna.pruners.SuccessiveHalvingPruner()
        if self.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner()
        return optuna.pruners.NopPruner()

    def baseline_params(self) -> dict | None:
        """The config's own value of every key searched (a key of one choice is fixed for the whole
        study, the baseline included), or None when one lies outside the space."""
        flat = load_config(self.config).to_dict()
        own = {k: p.choices[0] if p.choices is not None and len(p.choices) == 1 else flat[k.split(".")[0]][k.split(".", 1)[1]]
               for k, p in self.space.items()}
        return own if all(p.contains(own[k]) for k, p in self.space.items()) else None


def _storage(url: str):
    """An RDB storage; SQLite waits for a writer of another worker instead of failing at once."""
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def prepare(config: str | Path, space: str | Path, trials: int, trial_budget: str | None = None,
            sampler: str = "tpe", pruner: str = "median", storage: str | None = None, study: str | None = None,
            runs_dir: str | Path | None = None, seed: int | None = None, baseline: bool = True) -> Sweep:
    """Everything checked before any trial starts (space, config, budget, sampler, pruner)."""
    from vesuvius_lab.compare import default_runs_dir
    from vesuvius_lab.training.budget import parse_duration

    problems = []
    if sampler not in SAMPLERS:
        problems.append(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if pruner not in PRUNERS:
        problems.append(f"--pruner {pruner!r}: expected one of {', '.join(PRUNERS)}")
    if trials < 1:
        problems.append(f"--trials {trials}: expected at least 1")
    hours = None
    if trial_budget:
        try:
            hours = parse_duration(trial_budget)
            load_config(config, [f"training.time_budget_hours={hours!r}"])
        except ConfigError as exc:
            problems += [line.replace("--budget", "--trial-budget") for line in exc.lines]
    if problems:
        raise ConfigError(problems)
    params = load_space(space, config)
    sweep = Sweep(Path(config), Path(space), params, study or Path(space).stem,
                  Path(runs_dir) if runs_dir else default_runs_dir(), trials, hours, sampler, pruner, storage, seed,
                  baseline)
    if sampler == "grid":
        continuous = [k for k, p in params.items() if p.grid() is None]
        if continuous:
            raise ConfigError([f"{space}: {k}: the grid sampler needs choices, an integer range or a range with a step"
                               for k in continuous])
        size = math.prod(len(p.grid()) for p in params.values())
        if trials > size:
            sweep.notes.append(f"the grid has {size} points: {size} trials, not {trials}")
            sweep.trials = size
    return sweep


# --- a worker ------------------------------------------------------------------------------------


@dataclass
class Job:
    number: int
    trial_id: int
    overrides: list[str]
    adopted: bool  # an interrupted trial, resumed from its run folder


def _claim_record() -> dict:
    me = psutil.Process()
    return {"host": socket.gethostname(), "pid": me.pid, "process_start": me.create_time(), "time": time.time()}


def read_claim(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / CLAIM).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_claim(run_dir: Path, number: int, overrides: list[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CLAIM, json.dumps({**_claim_record(), "trial": number, "overrides": overrides}))


def interrupted(run_dir: Path, now: float | None = None) -> bool:
    """Whether a trial Optuna calls running has nobody working on it: its claimer is gone and its
    run folder's lock is free. A claim from another host is judged by the lock and its age alone."""
    claim, run = read_claim(run_dir), RunDir(run_dir)
    if claim is None or run.holder() is not None:
        return False  # claimed in another runs folder (another machine's), or being trained
    if claim.get("host") == socket.gethostname():
        return not same_process(claim.get("pid"), claim.get("process_start"))
    touched = max([claim.get("time", 0.0)] + [p.stat().st_mtime for p in (run.status_file,) if p.exists()])
    return (now or time.time()) - touched > STALE_S


def _claim(sweep: Sweep, study) -> Job | None:
    """Under the study's lock: an interrupted trial to resume, else a new one; None when the study
    has its trials (ended or held by live workers)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == TrialState.RUNNING and interrupted(sweep.trial_dir(t.number)):
            overrides = t.user_attrs.get("overrides") or read_claim(sweep.trial_dir(t.number)).get("overrides", [])
            _write_claim(sweep.trial_dir(t.number), t.number, overrides)
            return Job(t.number, t._trial_id, overrides, adopted=True)  # _trial_id: what optuna.trial.Trial takes
    if sum(t.state.name in COUNTED for t in trials) >= sweep.trials:
        return None
    if not trials and sweep.baseline:
        own = sweep.baseline_params()
        if own is not None:
            study.enqueue_trial(own, user_attrs={"baseline": True})
    trial = study.ask()
    params = {key: param.suggest(trial) for key, param in sweep.space.items()}
    overrides = sweep.overrides(params)
    trial.set_user_attr("overrides", overrides)
    trial.set_user_attr("run_dir", str(sweep.trial_dir(trial.number).resolve()))
    _write_claim(sweep.trial_dir(trial.number), trial.number, overrides)
    return Job(trial.number, trial._trial_id, overrides, adopted=False)


def run_trial(sweep: Sweep, study, job: Job, progress: bool = True) -> str:
    """Train one trial (or resume an interrupted one) and tell Optuna how it ended; returns the
    trial's final run state. A stopped trial (SIGTERM) stays running in Optuna: the next worker resumes it."""
    import optuna
    from optuna.trial import TrialState

    from vesuvius_lab.training import train

    run = RunDir(sweep.trial_dir(job.number))
    trial = optuna.trial.Trial(study, job.trial_id)

    def pruner(step: int, score: float) -> bool:
        trial.report(score, step)
        return trial.should_prune()

    status = run.read_status()
    if job.adopted and status.get("state") in (RunState.FINISHED, RunState.PRUNED):  # killed before it told Optuna
        return _tell(study, trial, status["state"], status.get("best_score"))
    resume = run.last.exists() or run.status_file.exists()
    try:
        config = resume_config(run.root, None) if resume and run.config.is_file() else \
            load_config(sweep.config, job.overrides)
        result = train(config, run.root, resume=resume, progress=progress, pruner=pruner, started=time.time())
    except VLabError as exc:
        holder = run.holder()
        if holder is not None and holder.get("pid") != os.getpid():
            return "elsewhere"  # another worker adopted it a moment before: it is that worker's
        trial.set_user_attr("error", exc.lines[0])
        study.tell(trial, state=TrialState.FAIL)
        return RunState.FAILED
    if result["state"] == RunState.STOPPED:
        raise Stopped()  # the trial stays running in Optuna; its claimer is gone once this process exits
    return _tell(study, trial, result["state"], result["best_score"])


def _tell(study, trial, state: str, best_score: float | None) -> str:
    """Optuna learns how the trial's run ended: pruned, or its best validation score."""
    from optuna.trial import TrialState

    if state == RunState.PRUNED:
        study.tell(trial, state=TrialState.PRUNED)
    elif best_score is not None and math.isfinite(best_score):
        study.tell(trial, best_score)
    else:
        trial.set_user_attr("error", "no validation score (no validation volume, or the budget ended before one)")
        study.tell(trial, state=TrialState.FAIL)
        return RunState.FAILED
    return state


def run_worker(sweep: Sweep, progress: bool = True, say: Callable[[str], None] = print) -> dict:
    """Take trials until the study has its ``trials``; returns the study's summary. Start one per
    GPU or node (``--storage``): they share the study and never run one trial twice."""
    study = sweep.open_study()
    started = time.time()
    for note in sweep.notes:
        say(f"note: {note}")
    while True:
        with locked(sweep.folder / STUDY_LOCK):
            job = _claim(sweep, study)
        if job is None:
            break
        say(f"trial {job.number}{' (interrupted: resumed)' if job.adopted else ''}: {' '.join(job.overrides)}")
        state = run_trial(sweep, study, job, progress)
        say(f"trial {job.number}: {state}")
    return summary(study, time.time() - started)


def summary(study, wall_s: float | None = None) -> dict:
    """The study's counts by state and its best trial (number, score, params, run folder)."""
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state.name == s for t in trials) for s in COUNTED}
    done = [t for t in trials if t.state.name == "COMPLETE"]
    best = max(done, key=lambda t: t.value) if done else None
    return {"study": study.study_name, "wall_s": wall_s, "trials": len(trials), "states": {k.lower(): v for k, v in counts.items()},
            "best": None if best is None else {"trial": best.number, "score": best.value, "params": best.params,
                                               "run_dir": best.user_attrs.get("run_dir")}}


def load_study(study: str, runs_dir: str | Path, storage: str | None = None):
    """A study as stored (for reading: the notebook, ``apply_best``)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or f"sqlite:///{(Path(runs_dir) / study / STUDY_DB).resolve()}"
    if storage is None and not (Path(runs_dir) / study / STUDY_DB).is_file():
        raise ConfigError(f"{Path(runs_dir) / study}: no study here yet (vesuvius-lab sweep, or notebook 07, starts one)")
    return optuna.load_study(study_name=study, storage=_storage(url))


def apply_best(study, config: str | Path, out: str | Path) -> dict:
    """Write ``config`` with the best trial's parameters as ``out``; returns them."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not done:
        raise ConfigError(f"study {study.study_name}: no completed trial yet")
    best = max(done, key=lambda t: t.value)
    changes: dict[str, dict] = {}
    for key, value in best.params.items():
        section, name = key.split(".", 1)
        changes.setdefault(section, {})[name] = value
    load_config(config, [override(k, v) for k, v in best.params.items()])  # the same rules as the trial met
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    rewrite_config(config, out, changes)
    return best.params
