"""The working copy's rows file: every row's record, mapped shared, read and written in place.

Record `key` of the file is row `key - base` of a layer (`engram.offload.workdir.Identity.bases`).
Reads and writes are torch `index_select` / `index_copy_` over the mapping, which release the
GIL, so several threads read (and page faults wait for the disk) at once. The mapping asks for
random access (no readahead), and every caller drops its pages from this process after use
(`release`): the file's pages stay in the page cache, not in the process's resident memory, so
memory stays bounded by the row cache whatever the file's size. The file is never truncated
while mapped.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import torch

from engram.errors import CorruptTableError

__all__ = ["DataFile"]


class DataFile:
    """The mapped rows file of `n_records` records of `record_bytes` bytes.

    Raises:
        CorruptTableError: the file is missing or does not hold exactly that many records.
    """

    def __init__(self, path: Path, n_records: int, record_bytes: int) -> None:
        self.path, self.record_bytes = path, record_bytes
        try:
            self._fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise CorruptTableError(f"{os.fspath(path)!r} is missing: the working copy is damaged; create it "
                                    "again (OffloadedRows.create) or restore it from a copy") from None
        size = os.fstat(self._fd).st_size
        if size != n_records * record_bytes:
            os.close(self._fd)
            raise CorruptTableError(
                f"{os.fspath(path)!r} holds {size} bytes, expected {n_records * record_bytes} ({n_records} records "
                f"of {record_bytes} bytes): the working copy is damaged; create it again or restore it from a copy")
        self._map = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._map.madvise(mmap.MADV_RANDOM)
        self._records = torch.frombuffer(self._map, dtype=torch.uint8).view(n_records, record_bytes)

    def read(self, keys: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """Records of `keys` [k] into out uint8 [k, record_bytes]; returns out."""
        return torch.index_select(self._records, 0, torch.from_numpy(keys), out=out)

    def span(self, start: int, stop: int) -> torch.Tensor:
        """Records start <= key < stop, a view of the mapping (read it, then `release`)."""
        return self._records[start:stop]

    def write(self, keys: np.ndarray, records: torch.Tensor) -> None:
        """Write records uint8 [k, record_bytes] at `keys` [k] (distinct) in place."""
        self._records.index_copy_(0, torch.from_numpy(keys), records)

    def release(self) -> None:
        """Drop the file's pages from this process (they stay in the page cache; written ones stay dirty there)."""
        self._map.madvise(mmap.MADV_DONTNEED)

    def sync(self) -> None:
        """Everything written so far is on disk."""
        self._map.flush()
        os.fsync(self._fd)

    def close(self) -> None:
        del self._records
        try:
            self._map.close()
        except BufferError:      # a view is still alive somewhere: the mapping goes with it
            pass
        os.close(self._fd)
