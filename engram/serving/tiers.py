"""Storage tiers: where a table's rows are read from.

- "ram": every layer loaded into one anonymous, hugepage-backed buffer (checksums verified while
  loading), then made read-only; the files' pages are then dropped from the page cache
  (POSIX_FADV_DONTNEED), so the table takes its size in memory once, not twice.
- "mmap": the chunk files of each layer mapped back to back into one contiguous read-only
  address range, 2 MiB-aligned (`prefault` populates every page at open). Each 4 KiB block (each
  chunk file, for scales and older tables) is checked against its recorded digest the first time
  a row in it is served (`engram.serving.verified`; `verify_reads=False` turns that off). Where the table is to
  stay in memory (`prefault`, or its files fit in available memory) the range is advised
  MADV_HUGEPAGE: whole 2 MiB of the files are then mapped as huge pages (new tables' chunk files
  are whole multiples of 2 MiB), as the "ram" tier's buffer is, and lookups cost what they cost
  there. A table larger than memory is advised MADV_RANDOM instead: a fault reads 4 KiB, not the
  2 MiB around it (see `engram.serving.mapping`).
- "direct": no mapping; rows are read with `pread` from a thread pool, bypassing the page cache
  (see `engram.serving.direct`); every 4 KiB block read is checked (`verify_reads=False`: not).

Every tier answers `gather(layer_id, rows, out, sorted_unique=False)`: out[i] = stored row
rows[i] of the layer (`sorted_unique`: the caller promises sorted, distinct rows), in the stored
dtype (`engram.dtypes.storage_torch_dtype`: int8 / uint8 bytes for quantized rows). Disk tiers
return (bytes read, read calls), memory tiers None; the table's gather engine (`engram.serving.gather`)
adds batch dedup and the hot-row cache on top, and the table decodes quantized rows after it.

Scales of quantized rows are resident in every tier (`tier.scales[layer_id]`, a read-only
[rows, S] tensor): "ram" loads them with the values, "mmap" maps them the same way, and "direct"
reads them into memory at open, sequentially, checking their checksums. They are 1/33 of a
DeepSeek-V4.1 table (8 B of 264 per row): keeping them resident costs that much RAM but lets the
cold tier read each row once (its values) instead of twice (values and scales from two files,
two random reads per row at the disk's IOPS limit), and the scale gather is one in-memory
`index_select` of a few bytes per row.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np
import torch

from engram.dtypes import row_dtype, storage_dtype, storage_torch_dtype, torch_dtype
from engram.serving.direct import DirectReader
from engram.serving.mapping import PROT_READ, Region, anonymous, hugepage_bytes, stitch_files
from engram.serving.placement import HEADROOM, memory_info
from engram.serving.verified import UnitChecks
from engram.storage.chunks import ChunkWatch, fadvise, open_chunk, progress_bar, read_chunk
from engram.storage.format import LayerLayout, TableMeta
from engram.storage.tabledir import TableDir

__all__ = ["TIERS", "Tier", "open_tier", "torch_dtype", "storage_dtype"]

TIERS = ("ram", "mmap", "direct")


class Tier(Protocol):
    name: str
    scales: dict[int, torch.Tensor]

    def gather(self, layer_id: int, rows: np.ndarray, out: torch.Tensor,
               sorted_unique: bool = False) -> tuple[int, int] | None: ...

    def close(self) -> None: ...


def _array_tensor(region: Region, lay: LayerLayout, np_dtype: np.dtype | str, width: int,
                  torch_view: torch.dtype | None = None) -> torch.Tensor:
    """A torch view [rows, width] of the region's rows (padding rows excluded)."""
    # The internal view is writable only for torch.from_numpy; the pages themselves are read-only.
    arr = region.array(np_dtype, (lay.rows, width), writable=True)
    weight = torch.from_numpy(arr)
    return weight if torch_view is None else weight.view(torch_view)


def _values_tensor(region: Region, lay: LayerLayout, meta: TableMeta) -> torch.Tensor:
    dtype = meta.spec.dtype      # viewed as the stored torch dtype (bfloat16 rows: their uint16 bits)
    return _array_tensor(region, lay, storage_dtype(dtype), meta.spec.value_width, storage_torch_dtype(dtype))


def _scales_tensor(region: Region, lay: LayerLayout, meta: TableMeta) -> torch.Tensor:
    scale = row_dtype(meta.spec.dtype).scale
    assert scale is not None, "only quantized rows have a scale array"
    return _array_tensor(region, lay, scale, meta.spec.scales_per_row)


def _load_array(tdir: TableDir, lay: LayerLayout, bar: Any = None) -> Region:
    """Read every chunk file of one array into a new read-only anonymous region (checksums checked)."""
    for index in range(lay.n_chunks):      # every file there and of its size before memory is reserved for them
        os.close(open_chunk(tdir, lay, index))
    region = anonymous(lay.n_chunks * lay.chunk_bytes)
    data = region.array(np.uint8, (region.length,), writable=True)
    for index in range(lay.n_chunks):
        read_chunk(tdir, lay, index, data[index * lay.chunk_bytes: (index + 1) * lay.chunk_bytes])
        fd = open_chunk(tdir, lay, index)      # its bytes are in the region now: the cached copy goes
        try:
            fadvise(fd, "DONTNEED")
        finally:
            os.close(fd)
        if bar is not None:
            bar.update(lay.chunk_bytes)
    region.protect(PROT_READ)
    return region


def _load_block_digests(tdir: TableDir, blocks: LayerLayout) -> np.ndarray:
    """The recorded block digests of a layer's chunk files: uint64 [n_chunks, blocks per chunk] (the
    files' own checksums checked)."""
    digests = np.empty((blocks.n_chunks, blocks.row_bytes // 8), "<u8")
    for index in range(blocks.n_chunks):
        read_chunk(tdir, blocks, index, digests[index].view(np.uint8))
    return digests


class _InAddressSpace:
    """A tier whose rows are addressable memory: one index_select per gather."""

    name = ""

    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}
        self.scales: dict[int, torch.Tensor] = {}
        self.watch: ChunkWatch | None = None      # files read after open: refuse them once changed
        # layer -> the first-serve checks of its values / scales ("mmap" with verify_reads; else empty)
        self.checks: dict[int, UnitChecks] = {}
        self.scale_checks: dict[int, UnitChecks] = {}

    def gather(self, layer_id: int, rows: np.ndarray, out: torch.Tensor, sorted_unique: bool = False) -> None:
        if self.watch is not None:
            self.watch.check()
        checks = self.checks.get(layer_id)
        if checks is not None:
            checks.check(rows)
        torch.index_select(self.weights[layer_id], 0, torch.from_numpy(rows), out=out)

    def hugepage_bytes(self) -> int:
        """Bytes of the rows (values and scales) mapped with 2 MiB pages now (see `mapping.hugepage_bytes`)."""
        return sum(hugepage_bytes(t.data_ptr(), t.numel() * t.element_size())
                   for t in (*self.weights.values(), *self.scales.values()))

    def close(self) -> None:
        # The address range is released once no tensor (or check) refers to it any more (see mapping.Region).
        self.weights, self.scales = {}, {}
        self.checks, self.scale_checks = {}, {}
        if self.watch is not None:
            self.watch.close()


class RamTier(_InAddressSpace):
    name = "ram"

    def __init__(self, tdir: TableDir, meta: TableMeta) -> None:
        super().__init__()
        with progress_bar(sum(lay.disk_bytes for lay in meta.layers.values()), "load") as bar:
            for lay in meta.layers.values():
                self.weights[lay.layer_id] = _values_tensor(_load_array(tdir, lay, bar), lay, meta)
                if lay.scales is not None:
                    self.scales[lay.layer_id] = _scales_tensor(_load_array(tdir, lay.scales, bar), lay.scales, meta)


def resident(nbytes: int, prefault: bool) -> bool:
    """Whether a mapping of `nbytes` is meant to stay in memory, so 2 MiB pages pay: `prefault`
    asked for, or it fits in available memory (with placement.HEADROOM to spare)."""
    return prefault or nbytes <= HEADROOM * memory_info()["ram_available"]


def _map_array(tdir: TableDir, lay: LayerLayout, prefault: bool, watch: ChunkWatch, hugepages: bool) -> Region:
    """Map every chunk file of one array back to back (sizes checked: a short file would SIGBUS),
    each watched for changes from now on."""
    fds: list[int] = []
    try:
        for index in range(lay.n_chunks):
            fds.append(open_chunk(tdir, lay, index))
            watch.add(fds[-1], lay, index)
        return stitch_files(fds, lay.chunk_bytes, populate=prefault, hugepages=hugepages)
    finally:
        for fd in fds:      # the mappings keep the files open
            os.close(fd)


class MmapTier(_InAddressSpace):
    name = "mmap"

    def __init__(self, tdir: TableDir, meta: TableMeta, prefault: bool = False, verify_reads: bool = True) -> None:
        super().__init__()
        self.watch = ChunkWatch(tdir, self._forget)
        self.hugepages = resident(sum(lay.disk_bytes for lay in meta.layers.values()), prefault)
        try:
            for lay in meta.layers.values():
                values = _map_array(tdir, lay, prefault, self.watch, self.hugepages)
                self.weights[lay.layer_id] = _values_tensor(values, lay, meta)
                if verify_reads:
                    digests = None if lay.blocks is None else _load_block_digests(tdir, lay.blocks)
                    self.checks[lay.layer_id] = UnitChecks(values, lay, tdir.path, digests)
                if lay.scales is not None:
                    scales = _map_array(tdir, lay.scales, prefault, self.watch, self.hugepages)
                    self.scales[lay.layer_id] = _scales_tensor(scales, lay.scales, meta)
                    if verify_reads:
                        self.scale_checks[lay.layer_id] = UnitChecks(scales, lay.scales, tdir.path)
        except BaseException:
            self.close()
            raise

    def _forget(self, lay: LayerLayout, index: int) -> bool:
        """The watch's recheck: a chunk file touched or rewritten in place is checked again when next served."""
        checks = (self.checks if lay.role == "rows" else self.scale_checks).get(lay.layer_id)
        if checks is None:
            return False
        checks.forget(index)
        return True


class DirectTier:
    name = "direct"

    def __init__(self, tdir: TableDir, meta: TableMeta, io_threads: int = 32, o_direct: bool | None = None,
                 verify_reads: bool = True) -> None:
        self.scales: dict[int, torch.Tensor] = {}
        self.reader = DirectReader(tdir, meta.layers, io_threads=io_threads, o_direct=o_direct)
        self.reader.verify_blocks = verify_reads
        # a chunk file touched or rewritten in place: its blocks are checked as they are read
        self.watch = ChunkWatch(tdir, lambda lay, index: self.reader.verify_blocks and
                                lay.layer_id in self.reader.block_digests)
        try:
            for lay, index, fd in self.reader.files():
                self.watch.add(fd, lay, index)
            for lay in meta.layers.values():   # block digests: 1/512 of the values, checked on every read
                if lay.blocks is not None:
                    self.reader.block_digests[lay.layer_id] = _load_block_digests(tdir, lay.blocks)
            for lay in meta.layers.values():   # resident: one sequential read at open (see the module notes)
                if lay.scales is not None:
                    self.scales[lay.layer_id] = _scales_tensor(_load_array(tdir, lay.scales), lay.scales, meta)
        except BaseException:
            self.close()
            raise

    def gather(self, layer_id: int, rows: np.ndarray, out: torch.Tensor,
               sorted_unique: bool = False) -> tuple[int, int]:
        self.watch.check()
        return self.reader.gather(layer_id, rows, out, sorted_unique=sorted_unique)

    def extent_ids(self, layer_id: int, uniq: np.ndarray) -> np.ndarray:
        return self.reader.extent_ids(layer_id, uniq)

    def close(self) -> None:
        self.reader.close()
        self.watch.close()
        self.scales = {}


def open_tier(tier: str, tdir: TableDir, meta: TableMeta, prefault: bool, io_threads: int,
              verify_reads: bool = True) -> Tier:
    """Open the rows of the table in `tdir` in one of TIERS."""
    if tier == "ram":
        return RamTier(tdir, meta)
    if tier == "mmap":
        return MmapTier(tdir, meta, prefault=prefault, verify_reads=verify_reads)
    return DirectTier(tdir, meta, io_threads=io_threads, verify_reads=verify_reads)
