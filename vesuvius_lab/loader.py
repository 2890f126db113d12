"""DataLoader construction from config: workers, prefetch, persistence, start method, pinning.

Sample randomness comes from the global sample index (see ``sampling``), so worker seeding here
only pins down libraries that use global RNGs; the stream does not depend on the worker count.
"""

from __future__ import annotations

import random
import signal
import threading

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


GRACE_S = 10  # past the DataLoader's own timeout, before the deadline below kills the workers


class Batches:
    """A loader's iterator with a deadline on every batch, and a way to kill its workers.

    The DataLoader's ``timeout`` covers only the wait for a batch to arrive. A worker that stops
    while it hands a batch over (the main process fetching the tensors' file descriptors from it)
    blocks the main process inside the hand-over, where no timeout reaches. A batch that takes
    ``timeout_s`` + ``grace_s`` kills the workers, which ends that wait with an error; ``hung``
    then says why."""

    def __init__(self, loader: DataLoader, timeout_s: float, grace_s: float = GRACE_S):
        self._it = iter(loader)
        self.timeout_s = timeout_s if loader.num_workers > 0 else 0
        self.grace_s = grace_s
        self.hung = False

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict:
        if not self.timeout_s:
            return next(self._it)
        timer = threading.Timer(self.timeout_s + self.grace_s, self._expire)
        timer.daemon = True
        timer.start()
        try:
            return next(self._it)
        finally:
            timer.cancel()
            if self.hung:  # the deadline fired: its kill and reaping finish before the error goes on
                timer.join()

    def _expire(self) -> None:
        self.hung = True
        self.kill_workers()

    def kill_workers(self) -> None:
        """SIGKILL this iterator's own worker processes, none other.

        From the main thread, torch's SIGCHLD handler is set aside until each worker is reaped:
        it would report the kill as a worker death from whatever line runs next (the checkpoint
        write, say). From the deadline's thread that report is wanted: it ends the blocked wait."""
        workers = [w for w in getattr(self._it, "_workers", []) if w.is_alive()]
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if main else None
        try:
            for worker in workers:
                worker.kill()
            for worker in workers:
                worker.join(timeout=10)  # reaps it: the handler finds no dead child afterwards
        finally:
            if main:
                signal.signal(signal.SIGCHLD, previous if previous is not None else signal.SIG_DFL)
