"""WriteBack: evicted dirty rows on their way to the rows file, written in order by one thread.

Evicting a dirty row copies its record out of the cache into a batch and hands the batch to this
thread, so the evicting call (a prefetch, or a lookup that missed) does not wait for the disk.
Until a batch is written, its rows are "in flight": a call that needs one of them again takes its
record from the batch (`newest`), not from the file, which does not hold it yet. One thread writes
the batches in the order they were made (all those queued at once: their old records go to the undo
log with one sync), so a row evicted twice ends up with its newer record.
A failed write stops the thread; its batches stay in flight (their rows are not lost) and the
error is raised by the store's next call.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["WriteBack", "Batch"]


@dataclasses.dataclass(frozen=True)
class Batch:
    """Records uint8 [k, record_bytes] of rows `keys` [k] (sorted), as they are to be written."""

    keys: np.ndarray
    records: torch.Tensor


class WriteBack:
    """The write-back thread of one store; every method but the thread's own runs under `cond`."""

    def __init__(self, cond: threading.Condition, write: Callable[[list[Batch]], None]) -> None:
        self._cond, self._write = cond, write
        self._queue: list[Batch] = []          # oldest first; the first is being written
        self.pending_bytes = 0
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stop = False

    def submit(self, keys: np.ndarray, records: torch.Tensor) -> None:
        """Queue records [k, record_bytes] of rows `keys` [k] (distinct) for writing."""
        order = np.argsort(keys)
        self._queue.append(Batch(keys[order], records.index_select(0, torch.from_numpy(order))))
        self.pending_bytes += records.numel()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engram-writeback", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def idle(self) -> bool:
        """Nothing in flight."""
        return not self._queue

    def newest(self, keys: np.ndarray) -> list[tuple[np.ndarray, Batch, np.ndarray]]:
        """Which of `keys` [m] are in flight: (indices into keys, their batch, positions in it), newest batch first."""
        out = []
        remaining = np.arange(keys.size)
        for batch in reversed(self._queue):
            if not remaining.size:
                break
            pos = np.searchsorted(batch.keys, keys[remaining])
            pos[pos == batch.keys.size] = 0
            match = batch.keys[pos] == keys[remaining]
            if match.any():
                out.append((remaining[match], batch, pos[match]))
                remaining = remaining[~match]
        return out

    def stop(self) -> None:
        """Stop the thread once the queue is empty (or failed) and wait for it (called without the lock)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._stop)
                if not self._queue:
                    return
                batches = list(self._queue)    # every batch queued: written with one sync of the undo log
            try:
                self._write(batches)
            except BaseException as exc:       # kept in flight; raised by the store's next call
                with self._cond:
                    self.error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                del self._queue[: len(batches)]
                self.pending_bytes -= sum(b.records.numel() for b in batches)
                self._cond.notify_all()
