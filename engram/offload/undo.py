"""The undo log: what makes the working copy's last flush recoverable after a crash at any moment.

Between flushes, rows are written back in place into the rows file (an evicted dirty row must go
somewhere, and the cache is bounded). Before any row is overwritten, the record it replaces goes
into this log and the log is made durable (fdatasync), so the bytes of the last flush are on disk
somewhere until the next flush completes. A flush writes every dirty row the same way, syncs the
rows file, then commits (a new generation in the state file, renamed into place) and empties the
log. Reopening after a crash replays the log of the committed generation backwards, restoring
the last flush exactly (a row logged twice: its older record, the flushed one, is written last).

A batch in the log (little-endian):

    header (64 bytes): magic b"ENGUNDO1", generation u64, count u64, record_bytes u64,
                       body xxh3-64 u64, header xxh3-64 (of the 40 bytes before it) u64, 16 zero bytes
    keys:    count x int64
    records: count x record_bytes bytes (the records as they were before the overwrite)

A batch that ends the log and fails its checks was being written when the process died: none of
its rows were overwritten yet (that waits for the fdatasync), so it is dropped. A damaged batch
with more log after it cannot be a torn write: reopening raises CorruptTableError.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import xxhash

from engram.errors import CorruptTableError

__all__ = ["UndoLog", "MAGIC"]

MAGIC = b"ENGUNDO1"
_HEAD = struct.Struct("<8sQQQQ")            # magic, generation, count, record_bytes, body digest (40 bytes)
_HEADER_BYTES = 64


class UndoLog:
    """The undo log file of a working copy whose records are `record_bytes` long."""

    def __init__(self, path: Path, record_bytes: int) -> None:
        self.path, self.record_bytes = path, record_bytes
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.end = os.fstat(self._fd).st_size        # appends go here (0 once reset)

    def append(self, generation: int, keys: np.ndarray, records: np.ndarray) -> int:
        """Log `records` uint8 [k, record_bytes] (the bytes of rows `keys` [k] now); returns bytes written.
        Durable once `sync` returns."""
        keys_bytes = np.ascontiguousarray(keys, dtype="<i8").data.cast("B")
        records_bytes = np.ascontiguousarray(records).data.cast("B")
        body = xxhash.xxh3_64()
        body.update(keys_bytes)
        body.update(records_bytes)
        head = _HEAD.pack(MAGIC, generation, len(keys_bytes) // 8, self.record_bytes, body.intdigest())
        header = head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)) + bytes(_HEADER_BYTES - _HEAD.size - 8)
        total = _HEADER_BYTES + len(keys_bytes) + len(records_bytes)
        written = os.pwritev(self._fd, [header, keys_bytes, records_bytes], self.end)
        if written != total:
            raise OSError(f"short write to {os.fspath(self.path)!r}: {written} of {total} bytes")
        self.end += total
        return total

    def sync(self) -> None:
        """Everything appended so far is on disk."""
        os.fdatasync(self._fd)

    def intact(self, generation: int) -> list[tuple[int, int]]:
        """The log's intact batches of `generation`, in the order they were written: (offset, rows).

        Raises:
            CorruptTableError: a damaged batch with more of the log after it.
        """
        size, at, found = os.fstat(self._fd).st_size, 0, []
        while at + _HEADER_BYTES <= size:
            header = os.pread(self._fd, _HEADER_BYTES, at)
            magic, gen, count, record_bytes, digest = _HEAD.unpack_from(header)
            (check,) = struct.unpack_from("<Q", header, _HEAD.size)
            if magic != MAGIC or check != xxhash.xxh3_64_intdigest(header[: _HEAD.size]) or gen != generation:
                break                               # a torn header, or the log of an older generation
            if record_bytes != self.record_bytes:
                raise self._damaged(at, f"records of {record_bytes} bytes, expected {self.record_bytes}")
            end = at + _HEADER_BYTES + count * (8 + record_bytes)
            if end > size:
                break                               # torn: the process died while writing it
            if xxhash.xxh3_64_intdigest(os.pread(self._fd, end - at - _HEADER_BYTES, at + _HEADER_BYTES)) != digest:
                if end == size:
                    break                           # torn at the end of the log
                raise self._damaged(at, "its contents do not match their digest")
            found.append((at, count))
            at = end
        return found

    def read(self, at: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch at byte `at` of `count` rows (see `intact`): keys int64 [count], records uint8 [count, R]."""
        body = bytearray(count * (8 + self.record_bytes))
        os.preadv(self._fd, [body], at + _HEADER_BYTES)
        keys = np.frombuffer(body, "<i8", count).astype(np.int64)
        return keys, np.frombuffer(body, np.uint8, offset=8 * count).reshape(count, self.record_bytes)

    def _damaged(self, at: int, what: str) -> CorruptTableError:
        return CorruptTableError(
            f"{os.fspath(self.path)!r}: the undo batch at byte {at} is damaged ({what}), so the working copy "
            "cannot be restored to its last flush: restore the working copy from a copy, or create it again "
            "from a snapshot (OffloadedRows.create)")

    def reset(self) -> None:
        """Empty the log (after a flush committed: its batches belong to an older generation now)."""
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self.end = 0

    def close(self) -> None:
        os.close(self._fd)
