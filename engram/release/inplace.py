"""Rows served where a DeepSeek-V4.1 checkpoint has them: the storage tiers over shard byte ranges.

    table = engram.open("V4.1/", tier="mmap")     # a read-only Table; nothing copied or written

Each layer's rows are one contiguous tensor of a safetensors shard (`engram.release.folder`): FP8 E4M3
values [rows, D] and E8M0 scales [rows, D/32], row-major, exactly the bytes an engram
"float8_e4m3" table stores in its chunk files. So the tiers serve them the same way:

- "mmap": each tensor's byte range of its shard is mapped read-only (from the page holding its
  first byte, at an address that agrees with its file offset modulo 2 MiB; advised as the "mmap"
  tier advises tables: MADV_HUGEPAGE where the rows are to stay in memory, else MADV_RANDOM;
  `prefault` populates it), and viewed as [rows, width] uint8;
- "ram": each range is read into an anonymous hugepage-backed buffer, then made read-only (and
  dropped from the page cache);
- "direct": values are read with pread at their offsets in the shard (`engram.serving.direct`), scales
  read into memory at open, as for engram tables.

Everything above the tier (hashing, dedup, the hot-row cache, prefetch, counters, FP8 decoding)
is the Table's own, so a lookup here equals the same lookup in a table imported from these rows,
byte for byte. Shard sizes are checked again when a shard is opened: a file that shrank since
its header was read is refused before anything is mapped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.errors import CorruptTableError, InputError
from engram.release.folder import ReleaseCheckpoint, ReleaseLayer, read_release
from engram.serving.direct import DirectReader
from engram.serving.mapping import PROT_READ, anonymous, map_file_range
from engram.serving.table import Table
from engram.serving.tiers import DirectTier, Tier, resident
from engram.storage.chunks import ChunkWatch, progress_bar
from engram.storage.format import TableMeta
from engram.storage.safetensors_header import TensorRange, read_header
from engram.storage.tabledir import TableDir

__all__ = ["ReleaseTable", "open_release", "RangeLayout"]

RELEASE_FORMAT_VERSION = 0     # `Table.format_version` of a checkpoint served in place (no engram format)
_READ_BYTES = 64 << 20         # bytes per read when loading or scanning a range


def _open_checked(tdir: TableDir, t: TensorRange) -> int:
    """A descriptor of the shard holding `t`, refused if the file changed size since its header was read."""
    where = os.fspath(tdir.path / t.file)
    try:
        fd = tdir.open(t.file)
    except FileNotFoundError:
        raise CorruptTableError(f"checkpoint shard {where!r} disappeared after its header was read: "
                                "restore it") from None
    size = os.fstat(fd).st_size
    if size != t.file_bytes:
        os.close(fd)
        raise CorruptTableError(f"checkpoint shard {where!r} has {size} bytes, but {t.file_bytes} when its header was "
                                f"read (tensor {t.name!r} ends at byte {t.offset + t.nbytes}): the file was truncated "
                                "or replaced; download it again")
    return fd


def _mapped(tdir: TableDir, t: TensorRange, prefault: bool, watch: ChunkWatch, layer_id: int,
            hugepages: bool) -> torch.Tensor:
    fd = _open_checked(tdir, t)
    try:
        lay: Any = RangeLayout(layer_id, t)          # what ChunkWatch needs of a LayerLayout
        watch.add(fd, lay, 0)                         # a shard written in place is refused, not read
        region, delta = map_file_range(fd, t.offset, t.nbytes, populate=prefault, hugepages=hugepages)
    finally:
        os.close(fd)                 # the mapping keeps the file open
    arr = region.array(np.uint8, t.shape, offset=delta, writable=True)   # pages are read-only
    return torch.from_numpy(arr)


def _read_range(fd: int, t: TensorRange, dest: np.ndarray, where: str) -> None:
    view, done = dest.data, 0
    while done < t.nbytes:
        got = os.preadv(fd, [view[done: done + _READ_BYTES]], t.offset + done)
        if got == 0:
            raise CorruptTableError(f"checkpoint shard {where!r} ended after {t.offset + done} bytes, inside tensor "
                                    f"{t.name!r}: the file was truncated; download it again")
        done += got


def _loaded(tdir: TableDir, t: TensorRange) -> torch.Tensor:
    region = anonymous(max(t.nbytes, 1))
    data = region.array(np.uint8, (t.nbytes,), writable=True)
    fd = _open_checked(tdir, t)
    try:
        _read_range(fd, t, data, os.fspath(tdir.path / t.file))
        if hasattr(os, "posix_fadvise"):       # the range is in the region now: its cached copy goes
            os.posix_fadvise(fd, t.offset, t.nbytes, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    region.protect(PROT_READ)
    return torch.from_numpy(region.array(np.uint8, t.shape, writable=True))


class InPlaceMemoryTier:
    """"mmap" (mapped byte ranges) or "ram" (ranges loaded): one index_select per gather."""

    def __init__(self, name: str, tdir: TableDir, release: ReleaseCheckpoint, prefault: bool) -> None:
        self.name = name
        self.weights: dict[int, torch.Tensor] = {}
        self.scales: dict[int, torch.Tensor] = {}
        self.watch = ChunkWatch(tdir) if name == "mmap" else None     # "ram" reads nothing after open
        huge = resident(sum(t.nbytes for layer in release.layers.values() for t in (layer.values, layer.scales)),
                        prefault)
        try:
            for lid, layer in release.layers.items():
                for t, into in ((layer.values, self.weights), (layer.scales, self.scales)):
                    into[lid] = _loaded(tdir, t) if self.watch is None else \
                        _mapped(tdir, t, prefault, self.watch, lid, huge)
        except BaseException:
            self.close()
            raise

    def gather(self, layer_id: int, rows: np.ndarray, out: torch.Tensor, sorted_unique: bool = False) -> None:
        if self.watch is not None:
            self.watch.check()
        torch.index_select(self.weights[layer_id], 0, torch.from_numpy(rows), out=out)

    def close(self) -> None:
        self.weights, self.scales = {}, {}      # mappings go once no tensor refers to them
        if self.watch is not None:
            self.watch.close()


class RangeLayout:
    """One layer's rows as `engram.serving.direct` reads them: one "chunk", the tensor's byte range of its shard."""

    role = "rows"
    n_chunks = 1

    def __init__(self, layer_id: int, t: TensorRange) -> None:
        self.layer_id, self.array, self.file = layer_id, t.name, t.file
        self.rows = self.chunk_rows = t.shape[0]
        self.row_bytes = t.nbytes // max(t.shape[0], 1)
        self.file_offset = t.offset              # where row 0 starts in the file
        self.chunk_bytes = t.file_bytes          # the size the file must still have

    def chunk_relpath(self, index: int) -> str:
        return self.file

    def chunk_path(self, root: str | os.PathLike[str], index: int) -> Path:
        return Path(root, self.file)


class InPlaceDirectTier(DirectTier):
    """"direct": values pread at their offsets in the shard; scales resident (read at open).

    A DirectTier (its gather, extent planning and close) over the shards' byte ranges instead of
    chunk files."""

    def __init__(self, tdir: TableDir, release: ReleaseCheckpoint, io_threads: int) -> None:
        layouts: dict[int, Any] = {lid: RangeLayout(lid, layer.values) for lid, layer in release.layers.items()}
        self.scales = {}
        self.reader = DirectReader(tdir, layouts, io_threads=io_threads)
        self.watch = ChunkWatch(tdir)
        try:
            for lay, index, fd in self.reader.files():
                self.watch.add(fd, lay, index)
            self.scales = {lid: _loaded(tdir, layer.scales) for lid, layer in release.layers.items()}
        except BaseException:
            self.close()
            raise


class ReleaseTable(Table):
    """A Table over a V4.1 checkpoint's rows, in place. Make one with `engram.open(checkpoint_dir)`.

    Lookups, prefetch, the hot-row cache and stats are the Table's; what differs: there are no
    chunk files or checksums (`layout`, `chunk_files` and `checksums` raise), `tensors(layer_id)`
    says where a layer's rows are, and `verify()` rereads the shard headers and scans every row and
    scale for NaN codes (safetensors files carry no checksums).
    """

    def __init__(self, tdir: TableDir, release: ReleaseCheckpoint, tier: str, prefault: bool, io_threads: int,
                 dedup: bool | None = None) -> None:
        self.release = release
        meta = TableMeta(RELEASE_FORMAT_VERSION, release.spec, release.compression, {})
        self.release_meta = meta       # format version 0, spec, compression, no chunk layouts
        if tier == "direct":
            rows: Tier = InPlaceDirectTier(tdir, release, io_threads)
        else:
            rows = InPlaceMemoryTier(tier, tdir, release, prefault)
        super().__init__(tdir, meta, tier, prefault, io_threads, dedup, rows=rows)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # By path and tier, as a Table: the receiving process opens the checkpoint in place itself.
        return open_release, (os.path.abspath(self.path), self._tier_name, *self._open_args[:3])

    def tensors(self, layer_id: int) -> ReleaseLayer:
        """Where one layer's rows are: its values and scales tensors (shard file, byte offset, size)."""
        return self.release.layers[self.spec.check_layer(layer_id)]

    def _no_chunks(self, what: str) -> InputError:
        return InputError(f"{what} is not defined for a checkpoint served in place ({os.fspath(self.path)!r} holds "
                          "safetensors shards, not engram chunk files): use table.tensors(layer_id)")

    def layout(self, layer_id: int) -> Any:
        raise self._no_chunks("layout()")

    def chunk_files(self, layer_id: int, scales: bool = False) -> list[Path]:
        raise self._no_chunks("chunk_files()")

    def checksums(self, layer_id: int, scales: bool = False) -> tuple[str, ...]:
        raise self._no_chunks("checksums()")

    def verify(self, progress: bool | None = None) -> None:
        """Reread every shard header (same tensors at the same bytes?) and scan the rows for NaN codes.

        Raises:
            CorruptTableError: a changed header or file size, or a NaN value (E4M3 0x7F/0xFF) or
                scale (E8M0 0xFF) in the rows, naming the tensor and the first bad row.
        """
        tdir = TableDir(self.path, checkpoint=True)
        try:
            total = sum(t.nbytes for layer in self.release.layers.values() for t in (layer.values, layer.scales))
            with progress_bar(total, "verify", progress) as bar:
                for layer in self.release.layers.values():
                    _scan(tdir, layer.values, 0x7F, bar)      # E4M3 NaN: every exponent and mantissa bit set
                    _scan(tdir, layer.scales, 0xFF, bar)      # E8M0 NaN
        finally:
            tdir.close()


def _scan(tdir: TableDir, t: TensorRange, nan_bits: int, bar: Any) -> None:
    """Check `t`'s header is unchanged, then that no byte of it has all of `nan_bits` set (a NaN code)."""
    where = os.fspath(tdir.path / t.file)
    fd = _open_checked(tdir, t)
    try:
        now = read_header(fd, t.file, where).get(t.name)
        if now != t:
            raise CorruptTableError(f"checkpoint shard {where!r}: tensor {t.name!r} is now {now!r}, was {t!r} when "
                                    "the table was opened: the file was replaced; open it again")
        row_bytes = t.nbytes // t.shape[0]
        step = max(1, _READ_BYTES // row_bytes) * row_bytes
        buf = np.empty(step, np.uint8)
        for start in range(0, t.nbytes, step):
            n = min(step, t.nbytes - start)
            got = os.preadv(fd, [buf.data[:n]], t.offset + start)
            if got != n:
                raise CorruptTableError(f"checkpoint shard {where!r} ended inside tensor {t.name!r}: the file was "
                                        "truncated; download it again")
            bad = (buf[:n] & nan_bits) == nan_bits
            if bad.any():
                row = (start + int(np.argmax(bad))) // row_bytes
                raise CorruptTableError(f"checkpoint shard {where!r}: tensor {t.name!r} row {row} holds a NaN code: "
                                        "the file is damaged; download it again")
            bar.update(n)
    finally:
        os.close(fd)


def open_release(path: str | os.PathLike[str], tier: str, prefault: bool, io_threads: int,
                 dedup: bool | None) -> ReleaseTable:
    """Open a V4.1 checkpoint directory's rows in place (the headers are checked first; see `engram.open`)."""
    tdir = TableDir(path, checkpoint=True)
    try:
        release = read_release(tdir.path, tdir)
        return ReleaseTable(tdir, release, tier, prefault, io_threads, dedup)
    except BaseException:
        tdir.close()
        raise
