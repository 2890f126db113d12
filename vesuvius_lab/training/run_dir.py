"""The run folder: its one layout, the records of its log, its status, and its checkpoints.

    config.yaml  metrics.jsonl  train.log  status.json  console.log  launch.json  plan.json  run.lock
    checkpoints/last.pt  checkpoints/best.pt
    checkpoints/step_00001200.pt ...                  (training.keep_last > 1: the K most recent)
    checkpoints/best_step_00001000_score_0.612345.pt  (training.keep_best > 1: the M best scores)
    live/  (the live predictions: ``training.live_volume``)  events.out.tfevents.*  (TensorBoard: ``training.events``)

The trainer writes it (rank 0) while it holds ``run.lock`` (``RunLock``: one writer per run folder),
the notebook's run monitor and the planner read it; each name is spelled here only. Checkpoints are complete (model, optimizer, schedule, scaler, step, every RNG
state, the EMA of the weights when it is on), atomic, and load with ``torch.load(weights_only=True)``.
The kept copies are hard links to the checkpoint just written (a copy where the filesystem has no
links), made atomically; older ones are pruned only once the new one is on disk.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import functools
import glob
import hashlib
import json
import math
import os
import random
import re
import resource
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import psutil
import torch

from vesuvius_lab.config import Config, changed_keys, load_config
from vesuvius_lab.errors import ConfigError, DataError
from vesuvius_lab.io import atomic_path, atomic_write_text, stale_temp_files

# kinds of the records in metrics.jsonl
TRAIN, VAL, EPOCH = "train", "val", "epoch"


class RunState(enum.StrEnum):
    """status.json's ``state``: what the trainer says of its run (the value is the word written)."""

    NOT_STARTED = "not started"  # no status.json yet: never written by the trainer, only shown
    PREFLIGHT = "preflight"
    RUNNING = "running"
    STOPPED = "stopped"
    FINISHED = "finished"
    PRUNED = "pruned"  # ended by a sweep's pruner after a validation, its checkpoint kept: resumable
    FAILED = "failed"


ALIVE_STATES = (RunState.PREFLIGHT, RunState.RUNNING)  # the states only a live trainer writes


def process_gone(state: str) -> str:
    """How a state of a live trainer reads once its process is gone (killed without a last word)."""
    return f"{state}? (process gone)"


def read_records(path: str | os.PathLike) -> list[dict]:
    """Every record of a metrics.jsonl (none when it is absent); a line torn by a kill is skipped."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return []
    return _parse_lines(data)


def _parse_lines(data: bytes) -> list[dict]:
    records = []
    for line in data.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a kill
    return records


class MetricsReader:
    """Reads metrics.jsonl incrementally: only bytes not read before, and never a torn last line.

    A line without its newline yet is kept back until it is complete. When the file shrinks (a
    resumed run truncates lines written after its last checkpoint), it is read again from the start
    and ``reset`` is set so the caller can drop what it had.
    """

    def __init__(self, path: str | os.PathLike):
        self.path, self.offset, self.reset = Path(path), 0, False

    def read(self) -> list[dict]:
        self.reset = False
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self.offset:
            self.offset, self.reset = 0, True
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        return _parse_lines(chunk[:end])


def json_line(record: dict) -> str:
    """Standard JSON: NaN and infinities (a skipped step's loss, no best score yet) become null."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(record), allow_nan=False)


def default_run_dir(config_path: str | os.PathLike) -> Path:
    """``$VLAB_RUNS_DIR/<config name>``, else ``runs/<config name>`` in the current folder."""
    return Path(os.environ.get("VLAB_RUNS_DIR") or "runs") / Path(config_path).stem


class RunDir:
    """A run's folder; every sub-folder is created at start, so no save hours into a run meets a missing one."""

    CONFIG, METRICS, TRAIN_LOG, STATUS = "config.yaml", "metrics.jsonl", "train.log", "status.json"
    CONSOLE, LAUNCH, PLAN, LOCK = "console.log", "launch.json", "plan.json", "run.lock"
    PREVIOUS_METRICS = "metrics.previous.jsonl"  # the log of a run that died before its first checkpoint
    PREVIOUS_CONFIG = "config.previous.yaml"  # the config a resumed run had before
    LIVE = "live"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.last, self.best = self.checkpoints / "last.pt", self.checkpoints / "best.pt"
        self.config, self.metrics = self.root / self.CONFIG, self.root / self.METRICS
        self.previous_config = self.root / self.PREVIOUS_CONFIG
        self.train_log, self.status_file = self.root / self.TRAIN_LOG, self.root / self.STATUS
        self.console, self.launch, self.plan = self.root / self.CONSOLE, self.root / self.LAUNCH, self.root / self.PLAN
        self.live = self.root / self.LIVE
        self.lock_file = self.root / self.LOCK
        self.events = None  # a training.events.EventLog: append() also writes each record there

    RECENT = re.compile(r"step_(\d{8,})\.pt")
    BEST = re.compile(r"best_step_(\d{8,})_score_(-?\d+\.\d+)\.pt")

    def recent_checkpoints(self) -> list[Path]:
        """The kept recent checkpoints (``training.keep_last``), newest first."""
        found = [(int(m[1]), p) for p in self._listed() if (m := self.RECENT.fullmatch(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def best_checkpoints(self) -> list[Path]:
        """The kept best checkpoints (``training.keep_best``), best score first (the earlier of equals)."""
        found = [(-float(m[2]), int(m[1]), p) for p in self._listed() if (m := self.BEST.fullmatch(p.name))]
        return [p for *_, p in sorted(found)]

    def _listed(self) -> list[Path]:
        return list(self.checkpoints.glob("*.pt")) if self.checkpoints.is_dir() else []

    def retain(self, step: int, score: float | None, keep_last: int, keep_best: int) -> None:
        """Keep last.pt (just written, as of ``step``) among the ``keep_last`` most recent and, when it
        was scored, among the ``keep_best`` best; then prune what fell out. With 1 and 1 last.pt and
        best.pt are all there is."""
        if keep_last > 1:
            _keep_copy(self.last, self.checkpoints / f"step_{step:08d}.pt")
            for old in self.recent_checkpoints()[keep_last:]:
                old.unlink(missing_ok=True)
        if keep_best > 1 and score is not None and math.isfinite(score):
            kept = self.best_checkpoints()
            worst = float(self.BEST.fullmatch(kept[-1].name)[2]) if kept else -math.inf
            if len(kept) < keep_best or round(score, 6) > worst:
                _keep_copy(self.last, self.checkpoints / f"best_step_{step:08d}_score_{score:.6f}.pt")
                for old in self.best_checkpoints()[keep_best:]:
                    old.unlink(missing_ok=True)

    def settle(self, checkpoint: dict, keep_last: int, keep_best: int) -> None:
        """Redo the copies of last.pt that its save promised (best.pt, the kept recent and best
        ones): a kill between writing last.pt and copying it leaves them missing, and a resume
        continues after that step, so it would never make them. Each copy is idempotent."""
        kept = checkpoint.get("kept", {})
        if kept.get("best"):
            _keep_copy(self.last, self.best)
        self.retain(checkpoint["step"], kept.get("score"), keep_last, keep_best)

    def ensemble(self) -> list[Path]:
        """The checkpoints a run folder stands for in a checkpoint ensemble: its kept best ones, else
        best.pt, else last.pt."""
        kept = self.best_checkpoints()
        if kept:
            return kept
        return [p for p in (self.best, self.last) if p.is_file()][:1]

    def create(self) -> list[Path]:
        """Make the folders; remove temp files a kill during a save left behind (returned)."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        stale = stale_temp_files(self.root) + stale_temp_files(self.checkpoints) + stale_temp_files(self.live)
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def start_fresh(self) -> Path | None:
        """A fresh run never appends to another run's log: an earlier one is moved aside (returned)."""
        if not self.metrics.exists():
            return None
        previous = self.root / self.PREVIOUS_METRICS
        os.replace(self.metrics, previous)
        return previous

    def append(self, record: dict) -> None:
        try:
            with open(self.metrics, "a", encoding="utf-8") as fh:
                fh.write(json_line(record) + "\n")
                fh.flush()
        except OSError as exc:
            raise DataError(f"{self.metrics}: could not append to the log ({exc.strerror or exc})") from None
        if self.events is not None:
            self.events.write(record)  # never raises: metrics.jsonl is the source of truth

    def truncate_after(self, step: int) -> None:
        """Drop log lines beyond a resumed checkpoint; the resumed run writes them again."""
        if not self.metrics.is_file():
            return
        keep = [json_line(r) for r in self.records() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics, "".join(k + "\n" for k in keep))

    def records(self) -> list[dict]:
        """metrics.jsonl's records (``read_records``)."""
        return read_records(self.metrics)

    def status(self, **fields) -> None:
        """status.json: the state, and this process (pid and start time, so that the launcher
        never takes a reused pid for the run)."""
        me = {"pid": os.getpid(), "process_start": _process_start(os.getpid()), "heartbeat": time.time()}
        try:
            atomic_write_text(self.status_file, json_line({**me, **fields}))
        except OSError as exc:
            raise DataError(f"{self.status_file}: could not write the status ({exc.strerror or exc})") from None

    def read_status(self) -> dict:
        """status.json, or {} when it is absent or being replaced."""
        try:
            return json.loads(self.status_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def holder(self) -> dict | None:
        """Who trains in this folder now (``RunLock``'s record: pid, host, started, command), or None
        when nobody holds its lock. Reading it takes no lock that a trainer could meet."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if _try_flock(fd, fcntl.LOCK_SH):  # got it: nobody holds the exclusive lock
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None
            return _read_holder(fd) or {"pid": None}  # held, its record not yet written
        finally:
            os.close(fd)


class RunLock:
    """An exclusive ``flock`` on ``run.lock`` for a trainer's whole life: one writer per run folder.

    The kernel drops the lock when its process dies, however it dies (SIGKILL, the OOM killer), so a
    killed run never leaves a stale lock. The holder writes who it is into the file (the file is
    never replaced: that would move the lock to another inode). A fork of the holder (a data worker)
    closes its inherited descriptor at once, so an orphaned worker cannot keep a dead run's folder
    locked. Under torchrun rank 0 holds it for the job."""

    def __init__(self, run: RunDir):
        self.run, self.fd = run, None

    def acquire(self, wait_s: float = 1.0) -> RunLock:
        """Take the lock or raise ConfigError naming the holder; creates nothing but the folder and
        the (empty, then filled) lock file. ``wait_s`` covers a reader's brief shared probe."""
        self.run.root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.run.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise DataError(f"{self.run.lock_file}: cannot open the run's lock ({exc.strerror or exc})") from None
        deadline = time.monotonic() + wait_s
        while not _try_flock(fd, fcntl.LOCK_EX):
            if time.monotonic() > deadline:
                holder = _read_holder(fd)
                os.close(fd)
                raise ConfigError(f"{self.run.root}: training elsewhere ({describe_holder(holder)}); "
                                  "stop that run first, or choose another --run-dir")
            time.sleep(0.05)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
                  "started": time.time(), "command": _command_line()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self.fd = fd
        _HELD_LOCKS.add(fd)
        return self

    def release(self) -> None:
        if self.fd is not None:
            _HELD_LOCKS.discard(self.fd)
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        try:
            os.close(fd)  # only this child's reference: the parent keeps its lock
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _command_line() -> str:
    """This process's command as the user typed it (``python -m vesuvius_lab`` shown as the CLI)."""
    program = os.path.basename(sys.argv[0] or "python")
    if program in ("__main__.py", "vesuvius-lab"):
        program = "vesuvius-lab"
    return shlex.join([program, *sys.argv[1:]])


def _try_flock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
    except (OSError, ValueError):
        return {}  # the holder has not written its record yet


def describe_holder(holder: dict | None) -> str:
    """'pid 123 on host, started 2026-12-05 03:40:01, command vesuvius-lab train ...'"""
    if not holder or holder.get("pid") is None:
        return "holder not yet recorded"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, int | float) else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}, command {holder.get('command', '?')}"


def resume_config(run_dir: str | os.PathLike, config_file: str | os.PathLike | None,
                  overrides: Sequence[str] = ()) -> Config:
    """The config a resumed run continues with: the run's own ``config.yaml``, changed only in the keys
    ``overrides`` name. A ``config_file`` given too must agree with it in every other key: a resume
    never takes a recipe change from a file silently."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        if config_file is None:
            raise ConfigError(f"{run.root}: nothing to resume (no {run.CONFIG}); start it with --config CFG")
        return load_config(config_file, overrides)  # the earlier run died before writing it
    own = load_config(run.config, overrides)
    if config_file is not None:
        differ = changed_keys(own, load_config(config_file, overrides))
        if differ:
            raise ConfigError(f"{config_file}: differs from the run's own config {run.config} in keys not named on "
                              f"the command line ({'; '.join(differ)}); resume without --config to continue the "
                              "run's own recipe, or name each key to change as section.key=value")
    return own


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        with open(f"/proc/{int(pid)}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def same_process(pid: int | None, started: float | None) -> bool:
    """Whether ``pid`` is still the process that started at ``started`` (psutil's create_time):
    after it exits, its pid may be reused by an unrelated process, which must never be signalled."""
    if not pid or started is None or not pid_alive(pid):
        return False
    try:
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < 0.05
    except psutil.Error:
        return False


@functools.lru_cache(maxsize=4)
def _process_start(pid: int) -> float:
    """This process's start time, read once (status.json is written every step)."""
    return psutil.Process(pid).create_time()


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomic: temp file, fsync, rename. A kill or a full disk leaves the previous checkpoint intact.

    Weights that are not finite are never saved: such a checkpoint could only poison a resume."""
    bad = [name for name, t in payload.get("model", {}).items()
           if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise DataError(f"{path}: not saved: non-finite weights in {', '.join(bad[:3])}"
                        + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))
    try:
        with atomic_path(path) as tmp:
            try:
                torch.save(payload, tmp)
            except RuntimeError:  # torch's writer reports a refused write as an internal error
                refused = _write_refused(tmp)
                if refused is None:
                    raise
                raise OSError(refused, os.strerror(refused), str(tmp)) from None
    except OSError as exc:
        raise DataError(f"{path}: could not save the checkpoint ({exc.strerror or exc}); "
                        "the previous one is intact") from None


def _write_refused(tmp: Path) -> int | None:
    """Why the system refused to write ``tmp``: a full filesystem or a file-size limit (errno)."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and tmp.exists() and tmp.stat().st_size >= limit - 4096:
        return errno.EFBIG
    if shutil.disk_usage(tmp.parent).free < 2**20:
        return errno.ENOSPC
    return None


def _keep_copy(source: Path, target: Path) -> None:
    """``target`` becomes ``source``'s content, atomically: a hard link (no space, no write) or, on a
    filesystem without links, a copy."""
    try:
        with atomic_path(target) as tmp:
            tmp.unlink()
            try:
                os.link(source, tmp)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                shutil.copyfile(source, tmp)
    except OSError as exc:
        raise DataError(f"{target}: could not keep a copy of {source.name} ({exc.strerror or exc}); "
                        f"{source} is intact") from None


def checkpoint_sources(sources: Sequence[str | os.PathLike]) -> list[Path]:
    """The checkpoint files ``predict --checkpoint`` names: files, run folders (``RunDir.ensemble``:
    their best kept checkpoints) and glob patterns, in the order given."""
    found: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            run = RunDir(path.parent if path.name == "checkpoints" else path)
            members = run.ensemble()
            if not members:
                raise DataError(f"{path}: no checkpoints in this run folder ({run.checkpoints} holds no .pt)")
            found += members
        elif any(c in str(source) for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(str(source))) if Path(p).is_file())
            if not matches:
                raise DataError(f"{source}: no checkpoint matches this pattern")
            found += matches
        else:
            raise DataError(f"{path}: checkpoint not found")
    return found


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is a one-line error
        raise DataError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None


def weights_digest(model: torch.nn.Module) -> str:
    """A digest of every weight's bytes: equal on every rank while DDP keeps the replicas in step."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rng_state() -> dict:
    """Every global RNG state, in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
