"""Reusable buffers for lookups: output tensors recycled only when no one holds them, and
per-thread scratch for row indices.

Writing gathered rows into a fresh tensor costs more than the gather itself (every new page is
faulted in and zeroed), so lookups reuse their output memory. Handing out a buffer that the next
call overwrites would be a trap, so the pool recycles an output only once nothing refers to it
any more: each output tensor is made with `torch.from_numpy` over a pooled numpy array, and
every tensor, view or autograd-saved tensor sharing that memory keeps a reference to the array.
While such a reference exists the pool allocates another buffer instead.
"""

from __future__ import annotations

import collections
import sys
import threading
from typing import Any

import numpy as np
import torch

__all__ = ["OutputPool", "Scratch"]


def _refcounts(bufs: list[np.ndarray]) -> list[int]:
    return [sys.getrefcount(buf) for buf in bufs]


# numpy dtype holding each torch dtype's values (bfloat16 as its uint16 bits)
_STORAGE: dict[torch.dtype, np.dtype[Any]] = {torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16),
            torch.bfloat16: np.dtype(np.uint16)}
# The count of a buffer referenced only by the pool's list, measured the same way it is checked.
_UNREFERENCED = _refcounts([np.empty(0)])[0]


class OutputPool:
    """Output tensors whose memory is reused once the caller has dropped every reference.

    Args:
        per_shape: buffers kept per (shape, dtype); further concurrent outputs are allocated
            and simply not kept.
        shapes: distinct (shape, dtype) keys kept, least recently used dropped first.
    """

    def __init__(self, per_shape: int = 2, shapes: int = 4) -> None:
        self._per_shape, self._shapes = per_shape, shapes
        self._bufs: collections.OrderedDict[tuple, list[np.ndarray]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `shape` and `dtype` that no one else references (contents undefined)."""
        storage = _STORAGE[dtype]
        key = (shape, dtype)
        with self._lock:
            bufs = self._bufs.setdefault(key, [])
            self._bufs.move_to_end(key)
            counts = _refcounts(bufs)
            free = [i for i, count in enumerate(counts) if count == _UNREFERENCED]
            if free:
                buf = bufs[free[0]]   # this reference marks it taken for concurrent callers
            else:
                buf = np.empty(shape, storage)
                if len(bufs) < self._per_shape:
                    bufs.append(buf)
                while len(self._bufs) > self._shapes:
                    self._bufs.popitem(last=False)
        tensor = torch.from_numpy(buf)   # holds a reference to `buf` for as long as it lives
        return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor

    def clear(self) -> None:
        with self._lock:
            self._bufs.clear()


class Scratch:
    """Per-thread int64 arrays for head rows ([H,B,T]) and global rows ([B,T,H]), reused by shape."""

    def __init__(self, shapes: int = 4) -> None:
        self._local = threading.local()
        self._shapes = shapes

    def get(self, heads: int, batch: int, positions: int) -> tuple[np.ndarray, np.ndarray]:
        cache = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = {}
        key = (heads, batch, positions)
        pair = cache.get(key)
        if pair is None:
            if len(cache) >= self._shapes:
                cache.clear()
            pair = cache[key] = (np.empty((heads, batch, positions), np.int64),
                                 np.empty((batch, positions, heads), np.int64))
        return pair
