"""DataLoader construction from config: workers, prefetch, persistence, start method, pinning.

Sample randomness comes from the global sample index (see ``sampling``), so worker seeding here
only pins down libraries that use global RNGs; the stream does not depend on the worker count.
"""

from __future__ import annotations

import random
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from vesuvius_lab.cache import VolumeCache
from vesuvius_lab.config import Config
from vesuvius_lab.dataset import Record
from vesuvius_lab.sampling import EpochPlan, PatchDataset, StreamBatchSampler, collate


def epoch_plan(config: Config, n_volumes: int, world_size: int = 1) -> EpochPlan:
    t = config.training
    return EpochPlan(
        n_volumes=n_volumes,
        batch_size=t.train_batch_size,
        world_size=world_size,
        steps_per_epoch=t.train_iterations_per_epoch,
        patches_per_volume=t.patches_per_volume,
        drop_last=t.drop_last,
    )


def _worker_init(worker_id: int) -> None:
    # A Ctrl-C or a SIGTERM sent to the whole process group must not kill workers mid-batch:
    # the main process stops gracefully (checkpoint first) and then shuts them down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    info = get_worker_info()
    seed = info.seed % 2**32 if info is not None else worker_id
    torch.set_num_threads(1)  # one core per worker; the workers are the parallelism
    np.random.seed(seed)
    random.seed(seed)


def build_dataset(config: Config, records: list[Record], world_size: int = 1, device_augment: bool | None = None) -> PatchDataset:
    cache = VolumeCache(config.path(config.data.cache_dir, "data.cache_dir"))
    return PatchDataset(
        records,
        cache,
        config.data.patch_size,
        epoch_plan(config, len(records), world_size),
        sampler=config.sampler,
        augment=config.augment,
        seed=config.training.seed,
        device_augment=(config.augment.where == "device") if device_augment is None else device_augment,
    )


def build_loader(
    dataset: PatchDataset, config: Config, start_step: int = 0, rank: int = 0, num_steps: int | None = None
) -> DataLoader:
    """An endless (or ``num_steps``-long) loader of batches for one rank, starting at ``start_step``."""
    t = config.training
    workers = max(0, t.workers)
    kwargs = {}
    if workers > 0:
        kwargs = dict(
            prefetch_factor=t.prefetch_factor,
            persistent_workers=t.persistent_workers,
            multiprocessing_context=t.multiprocessing_context,
            worker_init_fn=_worker_init,
        )
    return DataLoader(
        dataset,
        batch_sampler=StreamBatchSampler(dataset.plan, start_step=start_step, rank=rank, num_steps=num_steps),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=t.pin_memory and torch.cuda.is_available(),
        **kwargs,
    )
