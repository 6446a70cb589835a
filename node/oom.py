"""Out-of-memory never kills a node: the phase that ran out retries the same work with half the micro-batch.

An allocation failure in generation or training (CUDA, MPS or CPU) leaves no partial state behind as long as no
optimizer step was taken, so the same step is run again with a micro-batch half as large; the new size is logged and
kept for the rest of the run. Only when the micro-batch is already 1 (or a step was already applied) is it re-raised.
"""
from __future__ import annotations

import gc
import logging
from typing import Callable, TypeVar

import torch

log = logging.getLogger("swarm_node.oom")
T = TypeVar("T")

_OOM_TEXT = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate")


def is_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), MemoryError, and the RuntimeErrors MPS and the CPU allocator raise."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXT)


def free_cached_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def halving_on_oom(run: Callable[[], T], size: Callable[[], int], set_size: Callable[[int], None], phase: str,
                   safe_to_retry: Callable[[], bool] = lambda: True) -> T:
    """run(); on OOM, set_size(size() // 2) and run() again, until it fits or the size is 1."""
    while True:
        try:
            return run()
        except BaseException as e:
            if not is_oom(e) or size() <= 1 or not safe_to_retry():
                raise
            new = max(1, size() // 2)
            log.warning("out of memory in %s: micro-batch %d -> %d, retrying the same step (%s)", phase, size(), new,
                        str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            del e
            free_cached_memory()
            set_size(new)
