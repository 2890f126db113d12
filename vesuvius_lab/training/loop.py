"""Training: one process, or DDP under torchrun. Reads top to bottom like nanoGPT's train.py.

Setup (run folder, data with its preflight, the engine) -> resume -> the loop, which follows the
run's ``Schedule`` (the time budget may swap in a re-planned one after any step): the LR, the step,
the log line, the periodic checkpoint, and at each epoch's end ``end_of_epoch`` (validation when
due, early stopping's count of it, a sweep's pruner, checkpoint, epoch line). The LR depends on the optimizer step alone, the data stream on the sample index alone, and
checkpoints hold every RNG state, so a resumed run ends bitwise where an uninterrupted one would
(on CPU). Rank 0 writes the run folder (``run_dir``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from vesuvius_lab.config import Config, ModelConfig, changed_keys, load_config, save_config
from vesuvius_lab.data import Data, open_data, prepare_demo_data
from vesuvius_lab.device import default_device, memory_mb
from vesuvius_lab.errors import ConfigError, DataError, VLabError
from vesuvius_lab.evaluate import mean_scores, score_records
from vesuvius_lab.leaderboard import warm_up as metrics_warm_up
from vesuvius_lab.loader import Batches, build_loader
from vesuvius_lab.losses import TERMS
from vesuvius_lab.network_plan import nnunet_plan
from vesuvius_lab.sampling import PatchDataset
from vesuvius_lab.training import live_volume
from vesuvius_lab.training.budget import RunBudget, command_start
from vesuvius_lab.training.distributed import Distributed, setup_distributed
from vesuvius_lab.training.early_stop import EarlyStop
from vesuvius_lab.training.ema import resume_ema
from vesuvius_lab.training.engine import Engine, build_engine, forward_backward, optimizer_update
from vesuvius_lab.training.events import event_log
from vesuvius_lab.training.pace import BAR_FORMAT, PaceWatch
from vesuvius_lab.training.run_dir import (
    EPOCH, TRAIN, VAL, RunDir, RunLock, RunState, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
    weights_digest,
)

log = logging.getLogger("vesuvius_lab.train")


@dataclass
class LoopState:
    """What the loop carries from step to step, and what a checkpoint restores."""

    step: int = 0
    best: float = -math.inf
    nonfinite_total: int = 0
    saved: int | None = None  # the step last.pt holds (not itself saved)
    scored: tuple[int, float] | None = None  # (step, score) of the latest validation (not itself saved)


Pruner = Callable[[int, float], bool]  # (step, validation score) -> whether the run ends here, pruned


def train(config: Config, run_dir: str | Path, resume: bool = False, progress: bool = True,
          pruner: Pruner | None = None, started: float | None = None) -> dict:
    """Run (or resume) training as configured; returns the final status. Whatever stops it, the run
    folder ends in a true state: finished, stopped, pruned, or failed with the one-line reason.

    A sweep (``vesuvius_lab.sweep``) passes ``pruner``, called on rank 0 with each validation's score,
    and ``started``, its trial's start: the time budget counts from there, not from the process start
    (one worker process runs many trials)."""
    ddp = setup_distributed()
    run = RunDir(run_dir)
    lock = RunLock(run)
    try:
        refused = None
        if ddp.master:  # one lock for the job: rank 0 writes the folder
            try:
                if resume and not run.root.is_dir():
                    _check_run_folder(run, config, resume)  # nothing to resume: says so, creates nothing
                lock.acquire()
            except VLabError as exc:
                refused = exc.lines
        (refused,) = ddp.broadcast([refused])
        if refused:
            raise ConfigError(refused)
        ckpt = _check_run_folder(run, config, resume)
    except BaseException:
        lock.release()
        ddp.close()
        raise  # not this run's folder to mark: it belongs to another run, or to nobody yet
    stop = StopSignals()
    try:
        return _train(config, run, ddp, ckpt, progress, stop, pruner, started)
    except BaseException as exc:
        if ddp.master:
            _record_failure(run, exc)
        raise
    finally:
        stop.restore()  # only now: until the last status is written, a signal only asks to stop
        lock.release()
        ddp.close()


class StopSignals:
    """SIGTERM and SIGINT, from ``install`` to ``restore``, only ask the loop to stop at its next
    step boundary. They stay so until the run folder's last status is written: under torchrun a
    rank gets the signal twice (the group's, then the one torchrun forwards), and the second must
    not kill it between its checkpoint and its last status (stopped)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.previous: dict = {}

    def install(self) -> None:
        self.previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum, _frame) -> None:
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


def _train(config: Config, run: RunDir, ddp: Distributed, ckpt: dict | None, progress: bool,
           stop: StopSignals, pruner: Pruner | None = None, started: float | None = None) -> dict:
    # --- setup: run folder, data (the preflight of `vesuvius-lab validate` first), engine, resume ---
    device = default_device(ddp.local_rank)
    log_handler = _open_run_folder(run, config, ckpt is not None, ddp, progress)
    data, dataset = _open_data(config, ddp, progress)
    layout = dataset.layout
    engine = build_engine(config, dataset, device, ddp.world, ddp.local_rank)
    state = _resume(engine, ckpt, run, config, ddp) if ckpt is not None else LoopState()

    early_stop = EarlyStop.for_run(config.training, (ckpt or {}).get("early_stop"))

    # --- the schedule the loop follows; under a time budget (training.time_budget_hours) re-planned as it runs ---
    budget = _begin_budget(config, layout.steps, data, engine, ckpt, device, ddp, started)
    schedule = budget.schedule

    def write_checkpoint(best_too: bool = False) -> None:
        with budget.timing_checkpoint():
            checkpoint(run, engine, config, state, ddp, budget, early_stop, best_too)

    stop.install()
    batches = Batches(build_loader(dataset, config, start_step=state.step, rank=ddp.rank,
                                   num_steps=None if budget.active else schedule.total - state.step),
                      config.training.worker_timeout_s)
    if ddp.master:
        log.info("train: %d records, val: %d, %d steps/epoch x %d epochs, global batch %d",
                 len(data.train), len(data.val), layout.steps, config.training.max_epochs, layout.global_batch)
    if schedule.val_every:
        metrics_warm_up()  # start-up cost, not charged to the first epoch
    bar = tqdm(total=schedule.total, initial=state.step, desc="train", unit="step", disable=not (progress and ddp.master),
               bar_format=BAR_FORMAT)
    pace = PaceWatch.for_run(run.plan, config, device, ddp.world)  # the ETA, and one line when the run slows down
    consecutive_nonfinite, epoch_start, outcome = 0, time.perf_counter(), RunState.RUNNING
    doing, settled = state.step + 1, True  # the step under way; whether the state is a whole step's
    pruned = False  # a sweep's pruner ended the run at the latest validation

    # --- the loop ---
    try:
        while state.step < schedule.total and not early_stop.stopped:
            doing = state.step + 1
            epoch = schedule.epoch_of(state.step)
            t_step = time.perf_counter()
            lr = schedule.lr(state.step)
            engine.set_lr(lr)

            # the step: forward, loss and backward over `accumulate` micro-batches, then the update
            fb = forward_backward(engine, batches, state.step)
            nonfinite, stopping = ddp.any([not fb.finite, stop.signal is not None], device)  # all ranks agree
            if stopping and stop.signal is None:
                stop.signal = "SIGTERM"
            loss_finite = not nonfinite
            settled = False  # until the step is counted, a checkpoint would hold half an update
            grad_norm, applied = optimizer_update(engine, loss_finite)  # skipped on a non-finite gradient too
            finite = loss_finite and applied
            consecutive_nonfinite = 0 if finite else consecutive_nonfinite + 1
            state.nonfinite_total += 0 if finite else 1
            state.step += 1
            settled = not schedule.epoch_end(state.step)  # an epoch's last step: once validated and saved
            step_s = time.perf_counter() - t_step

            # the log line
            if ddp.master:
                run.append({
                    "kind": TRAIN, "step": state.step, "epoch": epoch, "lr": lr,
                    "loss": fb.loss if loss_finite else None, "skipped": not finite,
                    **{t: fb.terms.get(t) for t in TERMS}, **fb.weights,
                    "grad_norm": grad_norm if finite else None,
                    "step_s": step_s, "data_wait_s": fb.data_wait_s,
                    "samples_per_s": layout.global_batch / step_s,
                    "memory_mb": memory_mb(device), "global_batch": layout.global_batch,
                    "nonfinite_total": state.nonfinite_total,
                    "time": time.time(),  # wall clock: the forecast panel's actual progress
                })
                run.status(state=RunState.RUNNING, step=state.step, epoch=epoch, total_steps=schedule.total,
                           steps_per_epoch=schedule.steps_per_epoch)
                pace.after_step(state.step, step_s, fb.data_wait_s)
                bar.set_postfix(loss=f"{fb.loss:.3f}" if finite else "skip", lr=f"{lr:.2e}",
                                eta=pace.eta(schedule.total - state.step))
                bar.update(1)
            if not finite:
                what = "gradient norm" if loss_finite else "loss"
                log.warning("step %d: non-finite %s, step skipped (%d in a row)", state.step, what, consecutive_nonfinite)
                if consecutive_nonfinite >= config.optim.max_nonfinite:
                    outcome = RunState.FAILED
                    break

            # checkpoint; at the epoch's end also validation (when due) and the epoch line
            if schedule.epoch_end(state.step):
                validates = schedule.validates(state.step)
                improved = end_of_epoch(engine, data, config, state, epoch, ddp, run, progress, validates)
                pruned = validates and _ask_pruner(pruner, state, ddp)  # a sweep's trial ends after this checkpoint
                if validates and early_stop.after_validation(state.step, state.scored[1]):  # the run ends here
                    ended = budget.end_early(state.step, f"early stop at step {state.step}: {early_stop.reason()}")
                    if ended and ddp.master:
                        run.append(ended)
                write_checkpoint(best_too=improved)
                settled = True
                if ddp.master:
                    run.append({"kind": EPOCH, "step": state.step, "epoch": epoch, "epoch_s": time.perf_counter() - epoch_start})
                epoch_start = time.perf_counter()
                if pruned:
                    outcome = RunState.PRUNED
                    break
            elif schedule.checkpoints(state.step):
                write_checkpoint()  # skipped steps left the weights as they were: still finite
            # the time budget: measure this step; re-plan the rest of the run when its forecast drifts
            replanned = budget.after_step(state.step, step_s)
            if replanned and ddp.master:
                run.append(replanned)
                log.info("plan at step %d: %d steps (%s)", state.step, replanned["total_steps"], replanned["reason"])
            schedule = budget.sync(ddp)
            bar.total = schedule.total
            if stopping:  # what the ranks agreed at this step's all-reduce: a signal landing since then is
                # seen on one rank before another, and a rank that stopped alone would gather a checkpoint
                # while the others all-reduce the next step's flags (gloo aborts or hangs)
                if state.saved != state.step:
                    write_checkpoint()
                outcome = RunState.STOPPED
                break
        else:
            outcome = RunState.FINISHED
    except (RuntimeError, OSError, EOFError) as exc:
        # A data worker died or hung: the loader says so at a fetch, PyTorch's SIGCHLD handler
        # anywhere in the step. Unless it struck inside an update, the weights are step `state.step`'s.
        cause = worker_failure(exc, batches)
        if cause is None:
            raise
        batches.kill_workers()  # a hung worker ignores SIGTERM (see loader) and would block the exit
        if settled and state.saved != state.step:
            engine.optimizer.zero_grad(set_to_none=True)
            write_checkpoint()
        kept = f"{run.last} holds step {state.saved}" if state.saved is not None else "no checkpoint was written yet"
        raise DataError(f"data worker failed during step {doing} ({cause}); {kept}: resume with --resume") from None
    finally:
        batches = None  # shut the data workers down now, even while a traceback holds this frame
        bar.close()
    if outcome == RunState.FAILED:
        kept = (f"{run.last} holds them as of step {state.saved}" if state.saved is not None
                else "no checkpoint had been written yet")
        message = (f"stopped: {consecutive_nonfinite} non-finite {'gradients' if loss_finite else 'losses'} "
                   f"in a row at step {state.step}; no bad step reached the weights; {kept}")
    elif outcome == RunState.STOPPED:
        message = f"stopped by {stop.signal} at step {state.step}; resume with --resume"
    elif outcome == RunState.PRUNED:
        message = (f"pruned at step {state.step} by the sweep's pruner (validation score {state.scored[1]:.4f}); "
                   f"best validation score {state.best:.4f}; resume with --resume (a spent budget: raise "
                   "training.time_budget_hours)")
    elif early_stop.stopped:
        message = f"finished (early stop at step {early_stop.stopped_at}): {early_stop.reason()}; best validation score {state.best:.4f}"
    else:
        message = f"finished {schedule.total} steps; best validation score {state.best:.4f}" + budget.closing_note(state.step)

    # --- the run folder's last word ---
    if ddp.master:
        run.status(state=outcome, step=state.step, total_steps=schedule.total, message=message, best_score=state.best)
        log.info(message)
        log.removeHandler(log_handler)
        log_handler.close()
    if outcome == RunState.FAILED:
        raise VLabError(message)
    return {"state": outcome, "step": state.step, "best_score": state.best, "message": message}


def _open_run_folder(run: RunDir, config: Config, resume: bool, ddp: Distributed, progress: bool
                     ) -> logging.Handler | None:
    """Rank 0 readies the folder: stale temp files gone, an earlier unfinished log moved aside, the
    config saved (a changed one beside the old, never silently), the log and the events opened.
    Returns the log handler to close at the end."""
    handler = None
    if ddp.master:
        for stale in run.create():
            print(f"removed {stale}: a temp file left by a save that was killed", file=sys.stderr)
        moved = run.start_fresh() if not resume else None
        handler = _log_to(run)
        if moved:
            log.warning("the earlier run in %s died before its first checkpoint; its log is now %s", run.root, moved)
        changed = _changed_keys(run, config) if resume else []
        if changed:
            os.replace(run.config, run.previous_config)  # kept: resuming never silently replaces it
            log.warning("resumed with changed keys: %s (the earlier config is %s)", "; ".join(changed), run.previous_config)
            print(f"resuming with changed keys: {'; '.join(changed)} (the earlier config is {run.previous_config})",
                  file=sys.stderr)
        save_config(config, run.config)
        run.events = event_log(run, config)  # TensorBoard: every record appended is also an event
        run.status(state=RunState.PREFLIGHT, step=0)
        prepare_demo_data(config, progress)  # the embedded demo's volumes, when a fresh clone lacks them
    ddp.barrier()
    return handler


def _open_data(config: Config, ddp: Distributed, progress: bool) -> tuple[Data, PatchDataset]:
    """The checked data and this rank's patch dataset; rank 0 prepares every record's cache first."""
    data = open_data(config, check=True)
    dataset = data.patch_dataset(config, world_size=ddp.world)
    if ddp.master:
        for note in data.notes:  # volumes smaller than the patch, which the sampler pads
            log.info(note)
        data.prepare(config, progress=progress, say=log.info)  # cache (+ targets) of every record once, all cores
    ddp.barrier()
    return data, dataset


def _begin_budget(config: Config, steps_per_epoch: int, data: Data, engine: Engine, ckpt: dict | None,
                  device, ddp: Distributed, started: float | None = None) -> RunBudget:
    """The run's schedule and its clock: the configured one, or under a budget the plan a resumed
    run continues; every rank counts time from the command's start on rank 0 (or from ``started``)."""
    (started,) = ddp.broadcast([started or command_start()])
    budget = RunBudget.begin(config, steps_per_epoch, bool(data.val), (ckpt or {}).get("plan"), started)
    budget.guess_validation(engine.raw_model, data, config, device, ddp)
    if budget.active and ddp.master:
        log.info("time budget %.4g h: the run ends by %s; epochs follow the clock", config.training.time_budget_hours,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(budget.deadline)))
    return budget


def _resume(engine: Engine, ckpt: dict, run: RunDir, config: Config, ddp: Distributed) -> LoopState:
    """Weights, optimizer, scaler, EMA and this rank's RNG as of the checkpoint; rank 0 drops the
    log lines written after it and makes the copies a kill may have cut short."""
    engine.raw_model.load_state_dict(ckpt["model"])
    engine.optimizer.load_state_dict(ckpt["optimizer"])
    engine.scaler.load_state_dict(ckpt["scaler"])
    resume_ema(engine.ema, engine.raw_model, ckpt, log if ddp.master else None)
    set_rng_state(ckpt["rng"][ddp.rank] if ddp.rank < len(ckpt["rng"]) else ckpt["rng"][0])
    state = LoopState(ckpt["step"], ckpt["best_score"], ckpt["nonfinite_total"], saved=ckpt["step"])
    if ddp.master:
        log.info("resumed at step %d", state.step)
        run.truncate_after(state.step)  # lines a killed run wrote after its last checkpoint
        run.settle(ckpt, config.training.keep_last, config.training.keep_best)  # copies a kill cut short
    return state


def checkpoint(run: RunDir, engine: Engine, config: Config, state: LoopState, ddp: Distributed, budget: RunBudget,
               early_stop: EarlyStop, best_too: bool = False) -> None:
    """last.pt (and best.pt) as of this step. Every rank joins the gather of RNG states and weight
    digests; replicas that differ are refused, since no checkpoint of them could be trusted."""
    ranks = ddp.gather((rng_state(), weights_digest(engine.raw_model)))
    states, digests = [r[0] for r in ranks], [r[1] for r in ranks]
    if len(set(digests)) > 1:
        raise DataError(f"step {state.step}: the ranks' weights differ ({', '.join(d[:8] for d in digests)}); "
                        f"{run.last} keeps step {state.saved}")
    if not ddp.master:
        state.saved = state.step
        return
    score = state.scored[1] if state.scored and state.scored[0] == state.step else None
    payload = {
        "model": engine.raw_model.state_dict(),
        "optimizer": engine.optimizer.state_dict(),
        "scheduler": {"schedule": config.optim.schedule, "step": state.step, "total_steps": budget.schedule.total},
        "plan": budget.state_dict(state.step),  # the time budget's plan: a resumed run continues it
        "scaler": engine.scaler.state_dict(),
        "step": state.step,
        "epoch": state.step // max(budget.schedule.steps_per_epoch, 1),
        "best_score": state.best,
        "nonfinite_total": state.nonfinite_total,
        "early_stop": early_stop.state_dict(),  # a resumed run stops where an unbroken one does
        "rng": states,
        "rank_weights": digests,  # one digest per rank, all equal
        "config": config.to_dict(),  # paths absolute: it resolves from wherever it is read
        "kept": {"best": best_too, "score": score},  # the copies RunDir.settle redoes on resume
    }
    if engine.ema is not None:
        payload["ema"] = engine.ema.state_dict()  # the averaged weights: what validation scored
    save_checkpoint(run.last, payload)
    state.saved = state.step  # only once last.pt holds it: a failure mid-save retries the save
    run.settle(payload, config.training.keep_last, config.training.keep_best)


def worker_failure(exc: Exception, batches: Batches) -> str | None:
    """The cause, in a researcher's words, when ``exc`` is the DataLoader reporting a dead or hung
    worker (or the batch deadline ending a hung hand-over); None for any other error."""
    text = str(exc)
    if batches.hung:
        return f"no batch in {batches.timeout_s + batches.grace_s:g} s: a worker hung (training.worker_timeout_s)"
    if not isinstance(exc, RuntimeError):
        return None
    if "DataLoader timed out" in text:
        return text.split(".")[0] + ": a worker hung (training.worker_timeout_s)"
    if "DataLoader worker" not in text:
        return None
    if "Killed" in text or "signal: 9" in text or "SIGKILL" in text:
        return text.split(".")[0] + "; a SIGKILL is most often the kernel's out-of-memory killer (see dmesg)"
    return text.split(". ")[0]


def _check_run_folder(run: RunDir, config: Config, resume: bool) -> dict | None:
    """Refuse what would mix two runs, before anything is written; the checkpoint to resume from."""
    if not resume:
        if run.last.exists():
            raise ConfigError(f"{run.root}: holds a checkpoint already; pass --resume or choose another --run-dir")
        return None
    if not run.last.exists():
        if not run.status_file.exists():  # a mistyped --run-dir, not a run to continue
            raise ConfigError(f"{run.root}: nothing to resume (no checkpoint, no earlier run); "
                              "start it without --resume")
        print(f"{run.root}: the earlier run stopped before its first checkpoint; starting again from step 0",
              file=sys.stderr)  # exact: step 0 is where it started
        return None
    ckpt = load_checkpoint(run.last)
    stored = ckpt.get("config", {}).get("model", {})
    wanted = config.to_dict()["model"]
    defaults = asdict(ModelConfig())  # keys added since the checkpoint was written held their defaults
    differ = [f"model.{k} {stored.get(k, defaults[k])!r} -> {wanted[k]!r}" for k in wanted
              if stored.get(k, defaults[k]) != wanted[k]]
    before, now = ckpt.get("config", {}).get("data", {}).get("patch_size"), config.data.patch_size
    if wanted["arch"] == "dynunet" and before and nnunet_plan(before).strides != nnunet_plan(now).strides:
        differ.append(f"data.patch_size {before!r} -> {now!r} (model.arch dynunet plans its stages from it)")
    if differ:
        raise ConfigError(f"{run.last}: cannot resume with another model ({'; '.join(differ)}); "
                          f"resume with the run's own config {run.config}, or start a new --run-dir")
    return ckpt


def _changed_keys(run: RunDir, config: Config) -> list[str]:
    """The keys in which ``config`` differs from the run folder's config.yaml."""
    try:
        before = load_config(run.config)
    except VLabError:
        return ["config.yaml (unreadable)"] if run.config.exists() else []
    return changed_keys(before, config)


def _record_failure(run: RunDir, exc: BaseException) -> None:
    """status.json says failed, with the reason in one line (best effort: the disk may be full)."""
    if isinstance(exc, KeyboardInterrupt):
        reason = "interrupted"
    elif isinstance(exc, VLabError):
        reason = exc.lines[0] + (f" (and {len(exc.lines) - 1} more problems)" if len(exc.lines) > 1 else "")
    else:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
    with contextlib.suppress(OSError, VLabError):
        status = run.read_status()
        if status.get("state") != RunState.FAILED:  # the loop's own final word stands
            run.status(state=RunState.FAILED, step=status.get("step", 0), message=reason)


def _ask_pruner(pruner: Pruner | None, state: LoopState, ddp: Distributed) -> bool:
    """Rank 0 hands the validation just scored to a sweep's pruner; every rank learns its answer."""
    if pruner is None:
        return False
    (pruned,) = ddp.broadcast([bool(pruner(*state.scored)) if ddp.master else False])
    return pruned


def end_of_epoch(engine: Engine, data: Data, config: Config, state: LoopState, epoch: int, ddp: Distributed,
                 run: RunDir, progress: bool, validates: bool) -> bool:
    """Validate when the schedule says this epoch ``validates``; rank 0 scores, every rank learns
    the outcome. True when the score improved on the best so far, which makes this checkpoint the
    best one too."""
    if not validates:
        return False
    improved = False
    if ddp.master:
        records = data.val[: config.val.max_volumes]
        results = score_records(engine.eval_model, records, config, data.cache, engine.device, progress,
                                keep_ids=live_volume.volume_ids(config, records))
        scores = mean_scores(results)
        run.append({"kind": VAL, "step": state.step, "epoch": epoch, **scores})
        live_volume.keep(run, config, results, state.step, epoch)  # the live prediction, written in the background
        log.info("epoch %d val score %.4f (topo %.4f, surface dice %.4f, voi %.4f)", epoch,
                 scores["score"], scores["topo"], scores["surface_dice"], scores["voi_score"])
        improved = scores["score"] > state.best
        state.best = max(state.best, scores["score"])
        state.scored = (state.step, scores["score"])
    improved, state.best, state.scored = ddp.broadcast([improved, state.best, state.scored])
    return improved


def _log_to(run: RunDir) -> logging.Handler:
    handler = logging.FileHandler(run.train_log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler
