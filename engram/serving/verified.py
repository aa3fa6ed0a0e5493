"""First-serve checks of mapped rows: the "mmap" tier serves only bytes checked against their digests.

The "direct" tier checks every 4 KiB block it reads (`engram.serving.extent_reads`). The "mmap"
tier serves rows straight from mapped files, so it checks each unit of a file the first time a row
in it is served and remembers that in one byte per unit (`UnitChecks.verified`); later lookups of
those rows only test the bytes. The units:

- the values of a table with block digests: 4 KiB blocks, against the recorded block digests
  (`engram.storage.format.CHECKED_BLOCK`; 1/512 of the values, read at open);
- the values of tables written before block digests, and every scale array: whole chunk files,
  against the chunk checksums in the metadata (the first row served from a chunk reads all of it).

A unit whose digest is not the recorded one raises CorruptTableError naming layer, chunk, block
and file, at every lookup that needs it; its rows are never served, other units' still are. A
unit stays verified until its chunk file changes in place: the tier's ChunkWatch then forgets the
chunk (`forget`), and its units are checked again when next served (a backup tool that only
touched the file costs one more check; a rewrite is refused).

The test of a served row costs one byte load per unit it spans, inside the compiled decode
kernels (`engram.serving.compiled`), or one compiled pass (numpy without numba) over a gather's rows.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import xxhash

from engram.serving import compiled
from engram.serving.mapping import MADV_WILLNEED, Region
from engram.storage.chunks import block_error, chunk_error
from engram.storage.format import CHECKED_BLOCK, LayerLayout

__all__ = ["UnitChecks"]


class UnitChecks:
    """The first-serve checks of one mapped array (a layer's values or scales).

    Args:
        region: the array's chunk files mapped back to back (`engram.serving.mapping.stitch_files`).
        lay: the array's layout (its chunk checksums, row and chunk sizes).
        root: the table directory (errors name the file).
        block_digests: uint64 [n_chunks, chunk_bytes // 4096], the recorded digest of every 4 KiB
            block of the values; None to check whole chunk files against `lay.checksums`.
    """

    def __init__(self, region: Region, lay: LayerLayout, root: Path, block_digests: np.ndarray | None = None) -> None:
        self._region, self._lay, self._root = region, lay, root
        if block_digests is not None:
            self.unit = CHECKED_BLOCK
            self.digests = np.ascontiguousarray(block_digests, np.uint64).reshape(-1)
        else:
            self.unit = lay.chunk_bytes
            self.digests = np.array([int(c, 16) for c in lay.checksums], np.uint64)
        self.per_chunk = lay.chunk_bytes // self.unit
        self.row_bytes = lay.row_bytes
        self.verified = np.zeros(lay.n_chunks * self.per_chunk, np.uint8)      # 1: checked since the last change
        self._bytes = region.array(np.uint8, (region.length,)).data
        self._lock = threading.Lock()       # one thread checks a unit; the others wait for its verdict

    def check(self, rows: np.ndarray) -> None:
        """Check every unit holding a byte of `rows` (int64 [n], in range) not checked yet.

        Raises:
            CorruptTableError: a unit's bytes are not the recorded ones (naming it and its file).
        """
        if compiled.COMPILED:
            if compiled.all_checked(rows, self.row_bytes, self.unit, self.verified):
                return
        elif self._all_verified(rows):
            return
        units = self._units(rows)
        self._verify(np.unique(units[self.verified[units] == 0]))

    def forget(self, chunk: int) -> None:
        """Check the units of chunk file `chunk` again when next served (the file changed in place)."""
        with self._lock:
            self.verified[chunk * self.per_chunk: (chunk + 1) * self.per_chunk] = 0

    def _all_verified(self, rows: np.ndarray) -> bool:
        """`compiled.all_checked` in numpy (without numba)."""
        if self.unit % self.row_bytes == 0:              # no row spans two units
            per = self.unit // self.row_bytes
            units = rows >> (per.bit_length() - 1) if per & (per - 1) == 0 else rows // per    # a shift where it can
            return bool(self.verified.take(units).all())
        start = rows * self.row_bytes                    # longer rows may span a unit between first and last
        return self.row_bytes <= self.unit and bool(self.verified[start // self.unit].all()) \
            and bool(self.verified[(start + self.row_bytes - 1) // self.unit].all())

    def _units(self, rows: np.ndarray) -> np.ndarray:
        """Every unit holding a byte of `rows` (with repeats)."""
        start = rows * self.row_bytes
        first, last = start // self.unit, (start + self.row_bytes - 1) // self.unit
        count = last - first + 1
        if (count == 1).all():
            return first
        ends = np.cumsum(count)
        return np.repeat(first - (ends - count), count) + np.arange(int(ends[-1]))

    def _verify(self, units: np.ndarray) -> None:
        """Check `units` (distinct), marking each whose digest is the recorded one; raise at the first that is not."""
        unit, digest, view, verified = self.unit, xxhash.xxh3_64_intdigest, self._bytes, self.verified
        good: list[int] = []
        with self._lock:
            try:
                for u, recorded, done in zip(units.tolist(), self.digests[units].tolist(), verified[units].tolist(),
                                             strict=True):
                    if done:                         # checked by another thread meanwhile
                        continue
                    if unit > CHECKED_BLOCK:         # a whole chunk: one readahead, not a fault per page
                        try:
                            self._region.advise(MADV_WILLNEED, u * unit, unit)
                        except OSError:
                            pass
                    got = digest(view[u * unit: (u + 1) * unit])
                    if got != recorded:
                        raise self._error(u, got)
                    good.append(u)
            finally:
                verified[good] = 1

    def _error(self, u: int, got: int) -> Exception:
        chunk, block = divmod(u, self.per_chunk)
        path = self._lay.chunk_path(self._root, chunk)
        if self.unit == CHECKED_BLOCK:
            return block_error(self._lay, path, chunk, block, got, int(self.digests[u]))
        return chunk_error(self._lay, chunk, path, f"has xxh3 {got:016x}, recorded {int(self.digests[u]):016x}: "
                           "its contents changed since the table was written")
