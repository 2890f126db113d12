"""How fast a run goes: the one step-time estimate behind every ETA (the CLI bar and notebook 04),
and the watch that says, once, when the steps stay far slower than planned and why.

On a CPU shared with another job the step time is neither steady nor normal: two demo runs on 2
cores gave steps of 2.4 to 22 s within a minute, and runs taking turns on the cores give a mix of
fast and slow steps. A median over the last N steps flips from one mode to the other when the mix is
near half and half (the whole ratio between the modes, in one step), and tqdm's EMA of the rate
jumps with every slow step. The estimate here is a trimmed mean over a window of steps and seconds:
one slow step is trimmed, a mix moves it by a step's share, a sustained change fills the window.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
from tqdm.auto import tqdm

from vesuvius_lab.timefmt import format_duration
from vesuvius_lab.config import Config

log = logging.getLogger("vesuvius_lab.train")

WINDOW_STEPS, WINDOW_S = 20, 30.0  # the window: the last steps that span both, the longer wins
MAX_STEPS = 500  # a window never holds more steps (fast GPU steps): the estimate stays cheap
TRIM = 0.10  # the share of the window's slowest, and of its fastest, steps left out of the estimate
SLOWER = 2.0  # the watch speaks when the window runs this many times slower than planned
RECOVERED = 1.5  # ... and again only after the window came back under this many times
WARMUP = 5  # the first steps of a run (process and worker start-up) set no plan of their own
DATA_BOUND = 0.20  # a step that waits for data this share of its time or more is data-bound
COMPETING = 0.5  # other processes using this many cores (and a quarter of them) take the run's cores
TOP = 5  # the busiest processes a slow line names
SCAN_S = 0.5  # how long the CPU use of the processes is sampled, once per slow spell
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"  # the CLI bar: no tqdm ETA


def window(step_s: Sequence[float]) -> list[int]:
    """Indices of the last finite step times that span at least 20 steps and 30 s (at most 500
    steps), newest first."""
    picked, spent = [], 0.0
    for i in range(len(step_s) - 1, -1, -1):
        if len(picked) >= MAX_STEPS or (len(picked) >= WINDOW_STEPS and spent >= WINDOW_S):
            break
        if math.isfinite(step_s[i]):
            picked.append(i)
            spent += step_s[i]
    return picked


def trimmed_mean(values: Iterable[float]) -> float | None:
    """The mean without the slowest and the fastest tenth (one each from three values on)."""
    ordered = sorted(values)
    if not ordered:
        return None
    k = math.ceil(TRIM * len(ordered)) if len(ordered) >= 3 else 0
    kept = ordered[k:len(ordered) - k]
    return sum(kept) / len(kept)


def step_time(step_s: Sequence[float]) -> float | None:
    """The time a step will take from now: the 10 % trimmed mean of the step times over the last 20
    steps or 30 s of steps, whichever is longer. One slow step (a stall, the workers' start-up at an
    epoch's first step) is trimmed; a mix of fast and slow steps moves it by one step's share per step; a
    sustained change has moved it all the way once it fills the window. None before a step."""
    return trimmed_mean(step_s[i] for i in window(step_s))


def eta_s(per_step: float | None, remaining_steps: int) -> float | None:
    """Seconds for the steps left at ``per_step`` (``step_time``): the CLI bar's and notebook 04's ETA."""
    return None if per_step is None else max(remaining_steps, 0) * per_step


@dataclass
class Planned:
    """What the watch holds the steps against."""

    step_s: float
    wait_share: float  # the data wait as a share of the step
    source: str  # in the researcher's words: where these numbers come from


def planned_from(plan_file: Path, config: Config, device: str, world_size: int) -> Planned | None:
    """The step that ``vesuvius-lab plan`` measured (plan.json) for this run's batch size, workers,
    device and ranks; None when there is no such plan or it measured another setup."""
    try:
        plan = json.loads(plan_file.read_text(encoding="utf-8"))
        m = plan["measurements"]
        if (m["workers"], m["device"], m["world_size"]) != (config.training.workers, device, world_size):
            return None
        timing = next(t for t in m["timings"] if t["batch_size"] == config.training.train_batch_size
                      and not t["out_of_memory"] and t["step_s"] and math.isfinite(t["step_s"]))
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None
    measured = time.strftime("%Y-%m-%d %H:%M", time.localtime(plan_file.stat().st_mtime))
    return Planned(timing["step_s"], timing["data_wait_s"] / timing["step_s"],
                   f"{plan_file} of {measured}")


@dataclass
class Busy:
    """The processes outside the run with one command line, and the CPU they used while sampled
    (100 = one core): another job's data workers are one entry, as they are one cause."""

    command: str
    pids: list[int]
    cpu_percent: float

    def __str__(self) -> str:
        pids = ", ".join(map(str, self.pids[:4])) + (", ..." if len(self.pids) > 4 else "")
        who = f"pid {pids}" if len(self.pids) == 1 else f"{len(self.pids)} processes, pids {pids}"
        return f"{self.command} [{who}] {self.cpu_percent:.0f}% of a core"


def own_processes() -> set[int]:
    """This run's processes: this one and its data workers; under torchrun every rank and the launcher."""
    me = psutil.Process()
    root = me.parent() if "TORCHELASTIC_RUN_ID" in os.environ and me.parent() is not None else me
    return {root.pid, *(p.pid for p in root.children(recursive=True))}


def cpu_use(seconds: float = SCAN_S) -> list[Busy]:
    """The CPU use over ``seconds`` of the processes outside this run, busiest first."""
    procs = list(psutil.process_iter(["pid", "name", "cmdline"]))
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(seconds)
    own, others = own_processes(), {}
    for p in procs:
        try:
            used = p.cpu_percent(None)
        except psutil.Error:
            continue
        if used > 0 and p.pid not in own:
            argv = p.info["cmdline"] or [p.info["name"] or "?"]
            command = " ".join([Path(argv[0]).name, *argv[1:]])[:70]
            busy = others.setdefault(command, Busy(command, [], 0.0))
            busy.pids.append(p.pid)
            busy.cpu_percent += used
    return sorted(others.values(), key=lambda b: -b.cpu_percent)


class PaceWatch:
    """Fed every step, it keeps the ETA and watches the pace: when the steps of a window (20 steps
    or 30 s, whichever is longer; their 10 % trimmed mean, as the ETA) run more than 2x slower than
    planned, or wait for data more than twice the planned share (and at least 20 % of the step), it
    says one line (train.log and the console) naming the likely cause (``cause``: other processes
    taking the cores, the busiest named with their CPU use, sampled for half a second then and never
    while the pace holds; or the data loader). It speaks again only after the window came back
    under 1.5x. The plan is plan.json's measured step when it measured this setup, else the
    run's own: its steps 6-25 by the same estimator."""

    def __init__(self, planned: Planned | None = None, workers: int = 0,
                 say: Callable[[str], None] | None = None):
        self.planned, self.workers = planned, workers
        self.say = say or _say
        self.step_s: deque[float] = deque(maxlen=MAX_STEPS)
        self.wait_share: deque[float] = deque(maxlen=MAX_STEPS)
        self.seen = 0  # steps fed
        self.watched = 0  # steps fed since the plan was known: a window of them is needed
        self.slow = False  # said, not yet recovered
        self.per_step: float | None = None  # ``step_time`` of the steps fed

    @classmethod
    def for_run(cls, plan_file: Path, config: Config, device: str, world_size: int) -> PaceWatch:
        return cls(planned_from(plan_file, config, str(device), world_size), config.training.workers)

    def eta(self, remaining_steps: int) -> str:
        """The ETA of the CLI bar, as notebook 04 shows it (``eta_s``)."""
        return format_duration(eta_s(self.per_step, remaining_steps))

    def after_step(self, step: int, step_s: float, data_wait_s: float) -> str | None:
        """Take the step just done; returns the line said, if this step made the watch speak."""
        self.seen += 1
        self.step_s.append(step_s)
        self.wait_share.append(data_wait_s / step_s if step_s > 0 else math.nan)
        times, shares = list(self.step_s), list(self.wait_share)
        self.per_step = step_time(times)
        if self.seen <= WARMUP:
            return None
        if self.planned is None:
            if self.seen == WARMUP + WINDOW_STEPS:  # the first steady steps, by the estimator of the watch
                waits = [x for x in shares[-WINDOW_STEPS:] if math.isfinite(x)]
                self.planned = Planned(trimmed_mean(times[-WINDOW_STEPS:]), trimmed_mean(waits) or 0.0,
                                       f"this run's steps {step - WINDOW_STEPS + 1}-{step}")
            return None
        self.watched += 1
        picked = window(times)
        spent = sum(times[i] for i in picked)
        whole = len(picked) >= WINDOW_STEPS and (spent >= WINDOW_S or len(picked) == MAX_STEPS)
        if not whole or self.watched < len(picked):
            return None  # no whole window of steps taken against the plan yet
        per_step = self.per_step
        share = trimmed_mean(shares[i] for i in picked if math.isfinite(shares[i])) or 0.0
        p = self.planned
        wait_limit = max(SLOWER * p.wait_share, DATA_BOUND)
        if self.slow:
            self.slow = per_step > RECOVERED * p.step_s or share > wait_limit * RECOVERED / SLOWER
            return None
        if per_step <= SLOWER * p.step_s and share <= wait_limit:
            return None
        self.slow = True
        line = self.diagnose(step, per_step, share, len(picked), spent)
        self.say(line)
        return line

    def diagnose(self, step: int, per_step: float, share: float, steps: int, spent: float) -> str:
        """The line: what is slow against the plan, and its likely cause from the CPU use of the moment."""
        p = self.planned
        return (f"step {step}: the last {steps} steps ({spent:.0f} s) took {per_step:.3g} s each, "
                f"{per_step / p.step_s:.1f}x the {p.step_s:.3g} s planned ({p.source}), "
                f"{share:.0%} of it waiting for data (planned {p.wait_share:.0%}). Likely cause: "
                + cause(per_step, share, p, cpu_use(), psutil.cpu_count() or 1, self.workers))


def cause(per_step: float, share: float, planned: Planned, others: Sequence[Busy], cores: int, workers: int) -> str:
    """Why a window ran slow. The data loader when the wait for data grew while the compute of a step
    stayed within 2x of the plan (a starved CPU slows both); else other processes when they used half
    a core and a quarter of the cores or more (the busiest named); else the data loader when the
    wait grew; else the compute itself."""
    taken = sum(b.cpu_percent for b in others) / 100
    use = f"{taken:.1f} of {cores} cores busy outside this run"
    compute = per_step * (1 - share) / max(planned.step_s * (1 - planned.wait_share), 1e-9)
    data_bound = share > max(SLOWER * planned.wait_share, DATA_BOUND)
    loader = (f"the data loader cannot keep up: the wait for data grew, the compute of a step is {compute:.1f}x "
              f"planned ({use}); raise training.workers (now {workers}) or lighten the augmentation")
    if data_bound and compute <= SLOWER:
        return loader
    if taken >= max(COMPETING, cores / 4):
        top = "; ".join(str(b) for b in others[:TOP] if b.cpu_percent >= 5)
        return f"other processes take the cores ({use}): {top}"
    if data_bound:
        return loader
    return (f"neither other processes ({use}) nor the data: the compute itself slowed "
            f"(a shared GPU, CPU frequency throttling, swapping?)")


def _say(line: str) -> None:
    """train.log through the run's logger, and the console under the progress bar."""
    log.warning(line)
    tqdm.write(f"warning: {line}", file=sys.stderr)
