"""Prefetch: lookups that run in the background, started before the layer that needs them.

    handle = table.prefetch(token_ids)           # returns at once; hashing and gathers run on
    ...                                          # the table's prefetch thread meanwhile
    e = handle.result(layer_id)                  # [B, T, E], the same rows table.lookup returns

Row addresses depend only on token ids, so model code can start the lookup before layer 0 and
collect it at the Engram layer. The work (numpy hashing, torch gathers, preadv) releases the
GIL, so it overlaps the model's compute on another core. With a CUDA device the rows are
gathered into pinned host buffers and copied to the device on a side stream without blocking;
`result()` makes the caller's current stream wait for that copy.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from engram.errors import InputError
from engram.serving.stats import StatsCounter

__all__ = ["Prefetch", "Prefetcher", "CudaTransfer"]


class Prefetch:
    """A background lookup made by `Table.prefetch`.

    `result()` returns {layer_id: tensor} exactly as `table.lookup(token_ids, None)` would (only
    the requested layers), `result(layer_id)` one tensor. `table_path` is the path of the table
    the rows come from, so a consumer can check they are the rows it expects. Exceptions raised by the lookup are
    raised again by `result()`, with their original type. The handle holds the rows until it is
    dropped; the table keeps no reference to a finished handle, so dropping the handle and the
    tensors returns their memory to the table's output pool.
    """

    def __init__(self, future: concurrent.futures.Future, layer_ids: tuple[int, ...], stats: StatsCounter,
                 table_path: Any = None, context: Any = None) -> None:
        self._future, self._stats = future, stats
        self.layer_ids = layer_ids
        self.table_path = table_path            # the table the rows come from
        self.context = context                  # ids, mask and history state (addressing.history.PrefetchContext)

    def done(self) -> bool:
        """True once the lookup finished, failed or was cancelled."""
        return self._future.done()

    def cancelled(self) -> bool:
        return self._future.cancelled()

    def cancel(self) -> bool:
        """Cancel the lookup if it has not started (True); a running one finishes (False)."""
        return self._future.cancel()

    def result(self, layer_id: int | None = None, timeout: float | None = None) -> Any:
        """The rows: {layer_id: tensor} for every prefetched layer, or one layer's tensor.

        Args:
            layer_id: one of `layer_ids`, or None for all of them.
            timeout: seconds to wait at most (None: until done).

        Raises:
            TimeoutError: not done within `timeout`.
            concurrent.futures.CancelledError: the prefetch was cancelled (or its table closed
                before it started).
            InputError: `layer_id` was not prefetched.
            Whatever the lookup raised (e.g. CorruptTableError), unchanged.
        """
        if layer_id is not None and layer_id not in self.layer_ids:
            raise InputError(f"layer_id={layer_id!r} was not prefetched: expected one of {self.layer_ids}, "
                             "or pass layer_ids= to table.prefetch")
        if self._future.done():
            rows = self._future.result()
        else:
            start = time.perf_counter()
            try:
                rows = self._future.result(timeout)
            finally:
                self._stats.add(blocked_seconds=time.perf_counter() - start)
        rows = {i: _on_current_stream(t) for i, t in rows.items()}
        return rows if layer_id is None else rows[layer_id]

    def __repr__(self) -> str:
        state = ("cancelled" if self._future.cancelled() else "done" if self._future.done() else "pending")
        return f"Prefetch(layer_ids={self.layer_ids}, {state})"


def _on_current_stream(rows: Any) -> torch.Tensor:
    """A device copy made on the side stream, made safe to use on the caller's current stream."""
    if not isinstance(rows, tuple):
        return rows
    tensor, event = rows
    stream = torch.cuda.current_stream(tensor.device)
    stream.wait_event(event)
    tensor.record_stream(stream)     # its memory is not reused before `stream` is done with it
    return tensor


class Prefetcher:
    """A table's single prefetch thread and the prefetches not yet finished.

    One worker keeps prefetches in submission order and leaves the other core to the model; the
    direct tier's reads run on its own I/O pool. Made on first use, again in a forked child.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pid = -1
        self._pending: set[concurrent.futures.Future] = set()
        self._transfers: dict[torch.device, CudaTransfer] = {}

    def target(self, device: Any) -> torch.device | CudaTransfer | None:
        """Where results go: None for CPU, a CudaTransfer for a CUDA device, else that device."""
        if device is None:
            return None
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InputError(f"device={device!r} is not a torch device: pass e.g. 'cpu' or 'cuda:0'") from exc
        if dev.type == "cpu":
            return None
        if dev.type != "cuda":
            return dev                               # copied there (blocking) on the prefetch thread
        if not torch.cuda.is_available():
            raise InputError(f"device={device!r} needs CUDA, which this torch cannot use: pass device=None")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        with self._lock:
            if dev not in self._transfers:
                self._transfers[dev] = CudaTransfer(dev)
            return self._transfers[dev]

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = concurrent.futures.ThreadPoolExecutor(1, "engram-prefetch")
                self._pid, self._pending = os.getpid(), set()
            future = self._pool.submit(fn)
            self._pending.add(future)
        future.add_done_callback(self._finished)
        return future

    @staticmethod
    def finished(fn: Callable[[], Any]) -> concurrent.futures.Future:
        """`fn()` run on the calling thread, as a finished future: for work that costs less than
        waking the prefetch thread (a decode step's few rows from memory)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn())
        except Exception as exc:          # raised again by result(), as from the thread
            future.set_exception(exc)
        return future

    def _finished(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def shutdown(self) -> None:
        """Cancel the prefetches not started, wait for the running one, stop the thread."""
        with self._lock:
            pool, pending, self._pool = self._pool, list(self._pending), None
        for future in pending:
            future.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class CudaTransfer:
    """Pinned host buffers and a side stream for copying prefetched rows to one CUDA device.

    A pinned buffer is reused once the copy out of it has finished (its event has completed);
    at most `per_shape` are kept per (shape, dtype), for the `shapes` keys used last. (A dropped
    buffer stays valid until its copy is done: torch's pinned-memory allocator tracks the copy.)
    """

    def __init__(self, device: torch.device, per_shape: int = 4, shapes: int = 4) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._per_shape, self._shapes = per_shape, shapes
        self._lock = threading.Lock()
        # key -> [[pinned tensor, state], ...]; state: None free, False taken, an Event: copying
        self._buffers: collections.OrderedDict[tuple, list[list[Any]]] = collections.OrderedDict()

    def fill_and_copy(self, shape: Sequence[int], dtype: torch.dtype,
                      fill: Callable[[torch.Tensor], Any]) -> tuple[torch.Tensor, torch.cuda.Event]:
        """fill(pinned host tensor), then start its copy to the device: (device tensor, done event)."""
        host = self.host_buffer(shape, dtype)
        try:
            fill(host)
        except BaseException:
            self._set_state(host, None)           # never copied: free again
            raise
        return self.to_device(host)

    def host_buffer(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A pinned CPU tensor no unfinished copy reads from (contents undefined)."""
        key = (tuple(shape), dtype)
        with self._lock:
            entries = self._buffers.setdefault(key, [])
            self._buffers.move_to_end(key)
            while len(self._buffers) > self._shapes:
                self._buffers.popitem(last=False)
            for entry in entries:
                if isinstance(entry[1], torch.cuda.Event) and entry[1].query():
                    entry[1] = None
                if entry[1] is None:
                    entry[1] = False          # taken: the copy records its event here
                    return entry[0]
            buf = torch.empty(tuple(shape), dtype=dtype, pin_memory=True)
            if len(entries) < self._per_shape:
                entries.append([buf, False])
            return buf

    def to_device(self, host: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Start a non-blocking copy of `host` to the device; returns (device tensor, done event)."""
        with torch.cuda.stream(self.stream):
            dev = torch.empty(host.shape, dtype=host.dtype, device=self.device)
            dev.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self._set_state(host, event)
        return dev, event

    def _set_state(self, host: torch.Tensor, state: Any) -> None:
        with self._lock:
            for entry in self._buffers.get((tuple(host.shape), host.dtype), []):
                if entry[0] is host:
                    entry[1] = state
