"""Out-of-memory on the accelerator: the exception types to catch and how to give the memory back."""

from __future__ import annotations

import gc

import torch

OUT_OF_MEMORY: tuple[type[BaseException], ...] = tuple(
    {cls for cls in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if cls}
)
"""torch.cuda.OutOfMemoryError (an alias of torch.OutOfMemoryError in recent torch)."""


def free_device_memory() -> None:
    """Drops unreachable tensors and returns the allocator's cached blocks to the device."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def memory_note(device: str) -> str:
    """A short 'x GiB free of y GiB' for error messages, or '' off CUDA."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return ""
    try:
        free, total = torch.cuda.mem_get_info(torch.device(device))
    except Exception:
        return ""
    return f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"
