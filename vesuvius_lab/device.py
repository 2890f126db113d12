"""Which device a process computes on, in which precision, and how much memory it holds.

One definition for the trainer, the planner and inference: mixed precision (``optim.amp``) applies
on CUDA only; on the CPU everything runs in float32.
"""

from __future__ import annotations

import warnings

import psutil
import torch

AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def default_device(local_rank: int = 0) -> torch.device:
    """This rank's GPU when there is one, else the CPU."""
    return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


def amp_dtype(amp: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``optim.amp`` on ``device`` (None: float32)."""
    return AMP_DTYPES[amp] if torch.device(device).type == "cuda" else None


def autocast_supported(amp: str, device: torch.device | str) -> bool:
    """Whether ``device`` computes in ``amp``'s dtype under autocast: a small 3-D convolution comes
    out in it (GPUs before Ampere have no bf16 but emulate it; a CPU build may lack fp16)."""
    dtype, device = AMP_DTYPES[amp], torch.device(device)
    if dtype is None:
        return True
    if (device.type == "cuda" and dtype == torch.bfloat16
            and not torch.cuda.is_bf16_supported(including_emulation=False)):
        return False
    x = torch.ones(1, 1, 3, 3, 3, device=device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # autocast warns and disables itself for a dtype it lacks
            with torch.autocast(device.type, dtype=dtype):
                return torch.nn.functional.conv3d(x, x).dtype == dtype
    except RuntimeError:
        return False


def memory_mb(device: torch.device) -> float:
    """Peak memory allocated on a GPU, or this process's resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


def memory_capacity_mb(device: torch.device) -> float:
    """What ``memory_mb`` can grow to: the GPU's memory, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**20
    return psutil.virtual_memory().total / 2**20
