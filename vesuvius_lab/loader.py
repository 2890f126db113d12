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

from vesuvius_lab.config import Config
from vesuvius_lab.sampling import PatchDataset, StreamBatchSampler, collate


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


def build_loader(
    dataset: PatchDataset, config: Config, start_step: int = 0, rank: int = 0, num_steps: int | None = None
) -> DataLoader:
    """An endless (or ``num_steps`` optimizer steps long) loader of one rank's micro-batches, from
    optimizer step ``start_step`` on."""
    t = config.training
    workers = max(0, t.workers)
    kwargs = {}
    if workers > 0:
        kwargs = dict(
            prefetch_factor=t.prefetch_factor,
            persistent_workers=t.persistent_workers,
            timeout=t.worker_timeout_s,
            multiprocessing_context=t.multiprocessing_context,
            worker_init_fn=_worker_init,
        )
    return DataLoader(
        dataset,
        batch_sampler=StreamBatchSampler(dataset.layout, start_step=start_step, rank=rank, num_steps=num_steps),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=t.pin_memory and torch.cuda.is_available(),
        **kwargs,
    )
