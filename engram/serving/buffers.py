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


# numpy dtype holding each torch dtype's values (bfloat16 as its uint16 bits)
_STORAGE: dict[torch.dtype, np.dtype[Any]] = {torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16),
            torch.bfloat16: np.dtype(np.uint16)}


def _loop_refcount(bufs: list[np.ndarray]) -> int:
    for buf in bufs:
        return sys.getrefcount(buf)
    return 0


# The count of a buffer referenced only by the pool's list, measured as take_array checks it: the
# list, the loop variable and getrefcount's argument.
_UNREFERENCED = _loop_refcount([np.empty(0)])


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
        tensor = torch.from_numpy(self.take_array(shape, dtype))   # holds a reference to the array while it lives
        return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor

    def take_array(self, shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
        """The numpy array behind `take` (bfloat16 as uint16 bits): make the tensor with
        `torch.from_numpy` before the array is dropped, or the buffer counts as free again."""
        key = (shape, dtype)
        with self._lock:
            bufs = self._bufs.get(key)
            if bufs is None:
                bufs = self._bufs[key] = []
                while len(self._bufs) > self._shapes:
                    self._bufs.popitem(last=False)
            else:
                self._bufs.move_to_end(key)
            for buf in bufs:
                if sys.getrefcount(buf) == _UNREFERENCED:
                    return buf      # the caller's reference marks it taken for concurrent callers
            buf = np.empty(shape, _STORAGE[dtype])
            if len(bufs) < self._per_shape:
                bufs.append(buf)
            return buf

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
