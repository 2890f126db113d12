"""Training: one process, or DDP under torchrun. Reads top to bottom like nanoGPT's train.py.

Setup (preflight, data, model, optimizer) -> resume -> the loop: fetch, schedule, step, log line,
checkpoint, validation. The LR depends on the optimizer step alone, the data stream on the sample
index alone, and checkpoints hold every RNG state, so a resumed run ends bitwise where an
uninterrupted one would (on CPU). Rank 0 writes the run directory:

    config.yaml  metrics.jsonl  train.log  status.json  checkpoints/{last,best}.pt
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from vesuvius_lab.augment import apply_batch
from vesuvius_lab.cache import VolumeCache
from vesuvius_lab.config import Config, OptimConfig, save_config
from vesuvius_lab.errors import ConfigError, DataError, VLabError
from vesuvius_lab.inference import predict_probabilities
from vesuvius_lab.io import atomic_path, atomic_write_text
from vesuvius_lab.loader import build_dataset, build_loader
from vesuvius_lab.losses import TERMS, TopologyLoss
from vesuvius_lab.manifest import Manifest, load_manifest
from vesuvius_lab.metrics import volume_score
from vesuvius_lab.metrics import warm_up as metrics_warm_up
from vesuvius_lab.model import as_input, build_model
from vesuvius_lab.postprocess import postprocess
from vesuvius_lab.validate import preflight

log = logging.getLogger("vesuvius_lab.train")


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warmup, then poly or cosine decay, as a function of the optimizer step only."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        factor = (1 - progress) ** cfg.poly_power
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


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


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomic: temp file, fsync, rename. A kill or a full disk leaves the previous checkpoint intact."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is a one-line error
        raise DataError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None


class RunDir:
    """The run directory; every folder is created at start (the seed run crashed on a missing one)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.last, self.best = self.checkpoints / "last.pt", self.checkpoints / "best.pt"
        self.metrics, self.status_file = self.root / "metrics.jsonl", self.root / "status.json"

    def create(self) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict) -> None:
        with open(self.metrics, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    def truncate_after(self, step: int) -> None:
        """Drop log lines beyond a resumed checkpoint; the resumed run writes them again."""
        if not self.metrics.is_file():
            return
        keep = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            if rec.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.metrics, "".join(k + "\n" for k in keep))

    def status(self, **fields) -> None:
        atomic_write_text(self.status_file, json.dumps({"pid": os.getpid(), "heartbeat": time.time(), **fields}))


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def master(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed() -> Distributed:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return Distributed(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def records_for(manifest: Manifest):
    train_ids, val_ids = manifest.split_ids()
    by_id = {r.id: manifest.resolve(r) for r in manifest.records}
    return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]


def validate_model(model, records, config: Config, cache: VolumeCache, device, progress: bool) -> dict:
    """Leaderboard score on whole validation volumes (sliding window + post-processing)."""
    scores = []
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.optim.amp)
    for record in tqdm(records[: config.val.max_volumes], desc="validate", unit="vol", leave=False, disable=not progress):
        vol = cache.load(record)
        prob = predict_probabilities(model, vol.image, config.data.patch_size, config.val.overlap,
                                     config.val.batch, config.val.tta, device, amp)
        scores.append(volume_score(postprocess(prob, config.postprocess), np.asarray(vol.label)).as_dict())
    return {k: statistics.fmean(s[k] for s in scores) for k in ("score", "topo", "surface_dice", "voi_score")}


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


@dataclass
class Engine:
    """What one optimizer step needs; shared by the training loop and the planner's measurements."""

    model: torch.nn.Module
    criterion: TopologyLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dataset: object  # PatchDataset: device-side augmentation happens here when it asks for it
    device: torch.device
    amp_dtype: torch.dtype | None
    grad_clip: float
    world: int = 1


@dataclass
class StepResult:
    finite: bool
    loss: float
    terms: dict
    data_wait_s: float


def forward_backward(engine: Engine, batches, step: int, accumulate: int = 1) -> StepResult:
    """Fetch ``accumulate`` micro-batches, run forward, loss and backward; time the wait for data."""
    e = engine
    data_wait, sums, loss_value, finite = 0.0, {}, 0.0, True
    for micro in range(accumulate):
        t0 = time.perf_counter()
        batch = next(batches)
        batch = {k: v.to(e.device, non_blocking=True) for k, v in batch.items()}
        if e.dataset.device_augment:
            batch = apply_batch(batch, e.dataset.patch)
        data_wait += time.perf_counter() - t0
        last = micro == accumulate - 1
        ctx = e.model.no_sync() if (e.world > 1 and not last) else contextlib.nullcontext()
        with ctx, torch.autocast(e.device.type, dtype=e.amp_dtype or torch.float32, enabled=e.amp_dtype is not None):
            outputs = e.model(as_input(batch["image"]))
            loss, terms = e.criterion(outputs, batch, step)
        finite = finite and bool(torch.isfinite(loss))
        e.scaler.scale(loss / accumulate).backward()
        loss_value += float(loss.detach()) / accumulate
        for k, v in terms.items():
            if v is not None:
                sums[k] = sums.get(k, 0.0) + v / accumulate
    return StepResult(finite, loss_value, sums, data_wait)


def optimizer_update(engine: Engine, finite: bool) -> float:
    """Clip and apply the gradients (or drop them after a non-finite loss); returns the grad norm."""
    e = engine
    grad_norm = float("nan")
    if finite:
        e.scaler.unscale_(e.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(e.model.parameters(), e.grad_clip))
        e.scaler.step(e.optimizer)
        e.scaler.update()
    e.optimizer.zero_grad(set_to_none=True)
    if e.device.type == "cuda":
        torch.cuda.synchronize(e.device)
    return grad_norm


def build_engine(config: Config, dataset, device: torch.device, world: int = 1, local_rank: int = 0) -> Engine:
    """Model, optimizer, precision and loss as configured (the model wrapped in DDP when world > 1)."""
    torch.manual_seed(config.training.seed)
    model = build_model(config.model).to(device)
    if world > 1:
        # 1x1x1 head kernels have the same memory in both layouts; DDP's stride warning is moot there.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    o = config.optim
    if o.name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=True, weight_decay=o.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(o.amp) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return Engine(model, TopologyLoss(config.loss), optimizer, scaler, dataset, device, amp_dtype, o.grad_clip, world)


def train(config: Config, run_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) training as configured; returns the final status."""
    ddp = setup_distributed()
    device = torch.device(f"cuda:{ddp.local_rank}" if torch.cuda.is_available() else "cpu")
    run = RunDir(Path(run_dir))
    if ddp.master and run.last.exists() and not resume:
        raise ConfigError(f"{run.root}: holds a checkpoint already; pass --resume or choose another --run-dir")
    run.create()
    if ddp.master:
        handler = logging.FileHandler(run.root / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        save_config(config, run.root / "config.yaml")
        run.status(state="preflight", step=0)

    # --- data: the same preflight checks as `vesuvius-lab validate`, before anything trains ---
    manifest_path = config.path(config.data.manifest, "data.manifest")
    manifest = load_manifest(manifest_path, root=config.path(config.data.root, "data.root"))
    cache = VolumeCache(config.path(config.data.cache_dir, "data.cache_dir"))
    problems = preflight(manifest_path, patch_size=config.data.patch_size, progress=False, manifest=manifest, cache=cache)
    if problems:
        raise DataError(problems)
    train_records, val_records = records_for(manifest)
    if not train_records:
        raise DataError(f"{manifest_path}: no training records after the scroll split")
    dataset = build_dataset(config, train_records, world_size=ddp.world)
    if ddp.master:
        dataset.prepare(progress=progress)  # cache + targets once, before workers start
    ddp.barrier()
    plan = dataset.plan
    steps_per_epoch = plan.steps // config.optim.accumulate
    total_steps = config.training.max_epochs * steps_per_epoch

    # --- model, optimizer, precision ---
    engine = build_engine(config, dataset, device, ddp.world, ddp.local_rank)
    model, optimizer, scaler = engine.model, engine.optimizer, engine.scaler
    raw_model = model.module if ddp.world > 1 else model
    o = config.optim

    # --- resume ---
    step, best, nonfinite_total = 0, -math.inf, 0
    if resume and run.last.exists():
        ckpt = load_checkpoint(run.last)
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, best, nonfinite_total = ckpt["step"], ckpt["best_score"], ckpt["nonfinite_total"]
        set_rng_state(ckpt["rng"][ddp.rank] if ddp.rank < len(ckpt["rng"]) else ckpt["rng"][0])
        if ddp.master:
            log.info("resumed at step %d", step)
    if resume and ddp.master:
        run.truncate_after(step)  # lines a killed run wrote after its last checkpoint

    def checkpoint_payload() -> dict:
        states = [None] * ddp.world
        if ddp.world > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        return {
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {"schedule": o.schedule, "step": step, "total_steps": total_steps},
            "scaler": scaler.state_dict(),
            "step": step,
            "epoch": step // max(steps_per_epoch, 1),
            "best_score": best,
            "nonfinite_total": nonfinite_total,
            "rng": states,
            "config": config.to_dict(),
        }

    def write_checkpoint(best_too: bool = False) -> None:
        payload = checkpoint_payload()  # every rank joins the RNG gather
        if ddp.master:
            save_checkpoint(run.last, payload)
            if best_too:
                save_checkpoint(run.best, payload)

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    accumulate = o.accumulate
    loader = build_loader(dataset, config, start_step=step * accumulate, rank=ddp.rank,
                          num_steps=(total_steps - step) * accumulate)
    batches = iter(loader)
    if ddp.master:
        log.info("train: %d records, val: %d, %d steps/epoch x %d epochs, global batch %d",
                 len(train_records), len(val_records), steps_per_epoch, config.training.max_epochs,
                 plan.global_batch * accumulate)
    if val_records and config.training.val_every_epochs:
        metrics_warm_up()  # start-up cost, not charged to the first epoch
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (progress and ddp.master))
    consecutive_nonfinite, epoch_start, state = 0, time.perf_counter(), "running"
    message = ""
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            t_step = time.perf_counter()
            lr = lr_at(step, total_steps, o)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # --- the step: forward, loss, backward over `accumulate` micro-batches ---
            fb = forward_backward(engine, batches, step, accumulate)
            finite, loss_value, sums, data_wait = fb.finite, fb.loss, fb.terms, fb.data_wait_s
            if ddp.world > 1:  # every rank must agree on skipping and on stopping
                flags = torch.tensor([float(not finite), float(stop["signal"] is not None)], device=device)
                dist.all_reduce(flags)
                finite = flags[0].item() == 0
                if flags[1].item() > 0 and stop["signal"] is None:
                    stop["signal"] = "SIGTERM"
            grad_norm = optimizer_update(engine, finite)
            if finite:
                consecutive_nonfinite = 0
            else:
                nonfinite_total += 1
                consecutive_nonfinite += 1
            step += 1
            step_s = time.perf_counter() - t_step

            # --- log line ---
            if ddp.master:
                record = {
                    "kind": "train", "step": step, "epoch": epoch, "lr": lr,
                    "loss": loss_value if finite else None, "skipped": not finite,
                    **{t: sums.get(t) for t in TERMS},
                    "grad_norm": grad_norm if finite else None,
                    "step_s": step_s, "data_wait_s": data_wait,
                    "samples_per_s": plan.global_batch * accumulate / step_s,
                    "memory_mb": memory_mb(device), "global_batch": plan.global_batch * accumulate,
                    "nonfinite_total": nonfinite_total,
                }
                run.append(record)
                run.status(state="running", step=step, epoch=epoch, total_steps=total_steps,
                           steps_per_epoch=steps_per_epoch)
                bar.set_postfix(loss=f"{loss_value:.3f}" if finite else "skip", lr=f"{lr:.2e}")
                bar.update(1)
            if not finite:
                log.warning("step %d: non-finite loss, step skipped (%d in a row)", step, consecutive_nonfinite)
                if consecutive_nonfinite >= o.max_nonfinite:
                    message = (f"stopped: {consecutive_nonfinite} non-finite losses in a row at step {step}; "
                               f"the last good checkpoint {run.last} is intact")
                    state = "failed"
                    break

            # --- checkpoint, validation, epoch line ---
            epoch_end = step % steps_per_epoch == 0
            if epoch_end:
                val_every = config.training.val_every_epochs
                improved = False
                if val_every and (epoch + 1) % val_every == 0 and val_records:
                    if ddp.master:
                        scores = validate_model(raw_model, val_records, config, cache, device, progress)
                        run.append({"kind": "val", "step": step, "epoch": epoch, **scores})
                        log.info("epoch %d val score %.4f (topo %.4f, surface dice %.4f, voi %.4f)", epoch,
                                 scores["score"], scores["topo"], scores["surface_dice"], scores["voi_score"])
                        improved = scores["score"] > best
                        best = max(best, scores["score"])
                    if ddp.world > 1:
                        shared = [improved, best]
                        dist.broadcast_object_list(shared, src=0)
                        improved, best = shared
                write_checkpoint(best_too=improved)
                if ddp.master:
                    run.append({"kind": "epoch", "step": step, "epoch": epoch, "epoch_s": time.perf_counter() - epoch_start})
                epoch_start = time.perf_counter()
            elif config.training.checkpoint_every_steps and step % config.training.checkpoint_every_steps == 0:
                write_checkpoint()
            if stop["signal"] is not None:
                if not epoch_end:
                    write_checkpoint()
                state, message = "stopped", f"stopped by {stop['signal']} at step {step}; resume with --resume"
                break
        else:
            state, message = "finished", f"finished {total_steps} steps; best validation score {best:.4f}"
    except BaseException as exc:
        if ddp.master:
            run.status(state="failed", step=step, message=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if ddp.world > 1:
            dist.destroy_process_group()
    if ddp.master:
        run.status(state=state, step=step, total_steps=total_steps, message=message, best_score=best)
        log.info(message)
    if state == "failed":
        raise VLabError(message)
    return {"state": state, "step": step, "best_score": best, "message": message}

