"""Storage tiers: where a table's rows are read from.

- "ram": every layer loaded into one anonymous, hugepage-backed buffer (checksums verified while
  loading), then made read-only.
- "mmap": the chunk files of each layer mapped back to back into one contiguous read-only
  address range (MADV_RANDOM; `prefault` populates every page at open).
- "direct": no mapping; rows are read with `pread` from a thread pool, bypassing the page cache
  (see `engram.direct`).

Every tier answers `gather(layer_id, rows, out, sorted_unique=False)`: out[i] = row rows[i] of
the layer (`sorted_unique`: the caller promises sorted, distinct rows). Disk tiers return
(bytes read, read calls), memory tiers None; the table's gather engine (`engram.gather`) adds
batch dedup and the hot-row cache on top.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np
import torch

from .direct import DirectReader
from .format import LayerLayout, TableDir, TableMeta, checksum, chunk_error
from .mapping import PROT_READ, Region, anonymous, stitch_files

__all__ = ["TIERS", "Tier", "open_tier", "torch_dtype", "storage_dtype"]

TIERS = ("ram", "mmap", "direct")
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STORAGE_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a logical row dtype ("bfloat16" -> torch.bfloat16)."""
    return _TORCH_DTYPES[dtype]


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of the stored values (bfloat16 rows are uint16 bits)."""
    return _STORAGE_DTYPES[dtype]


class Tier(Protocol):
    name: str

    def gather(self, layer_id: int, rows: np.ndarray, out: torch.Tensor,
               sorted_unique: bool = False) -> tuple[int, int] | None: ...

    def close(self) -> None: ...


def _rows_tensor(region: Region, lay: LayerLayout, dtype: str, head_dim: int) -> torch.Tensor:
    """A torch view [rows, D] of the region's rows (padding rows excluded)."""
    # The internal view is writable only for torch.from_numpy; the pages themselves are read-only.
    arr = region.array(storage_dtype(dtype), (lay.rows, head_dim), writable=True)
    weight = torch.from_numpy(arr)
    return weight.view(torch.bfloat16) if dtype == "bfloat16" else weight


class _InAddressSpace:
    """A tier whose rows are addressable memory: one index_select per gather."""

    name = ""

    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}

    def gather(self, layer_id: int, rows: np.ndarray, out: torch.Tensor, sorted_unique: bool = False) -> None:
        torch.index_select(self.weights[layer_id], 0, torch.from_numpy(rows), out=out)

    def close(self) -> None:
        # The address range is released once no tensor refers to it any more (see mapping.Region).
        self.weights = {}


class RamTier(_InAddressSpace):
    name = "ram"

    def __init__(self, tdir: TableDir, meta: TableMeta) -> None:
        from tqdm.auto import tqdm

        super().__init__()
        total = sum(lay.n_chunks * lay.chunk_bytes for lay in meta.layers.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc="load", delay=1.0, mininterval=0.5,
                  disable=None) as bar:
            for lay in meta.layers.values():
                region = anonymous(lay.n_chunks * lay.chunk_bytes)
                data = region.array(np.uint8, (region.length,), writable=True)
                for index in range(lay.n_chunks):
                    _load_chunk(tdir, lay, index, data[index * lay.chunk_bytes: (index + 1) * lay.chunk_bytes])
                    bar.update(lay.chunk_bytes)
                region.protect(PROT_READ)
                self.weights[lay.layer_id] = _rows_tensor(region, lay, meta.spec.dtype, meta.spec.head_dim)


def _load_chunk(tdir: TableDir, lay: LayerLayout, index: int, dest: np.ndarray) -> None:
    """Read one chunk file into `dest` and check its size and checksum."""
    path = lay.chunk_path(tdir.path, index)
    try:
        fd = tdir.open(lay.chunk_relpath(index))
    except FileNotFoundError:
        raise chunk_error(lay, index, path, "is missing") from None
    try:
        size = os.fstat(fd).st_size
        if size != lay.chunk_bytes:
            raise chunk_error(lay, index, path, f"has {size} bytes, expected {lay.chunk_bytes}")
        view, done = memoryview(dest), 0
        while done < lay.chunk_bytes:
            got = os.readv(fd, [view[done:]])
            if got == 0:
                raise chunk_error(lay, index, path, f"ended after {done} of {lay.chunk_bytes} bytes")
            done += got
    finally:
        os.close(fd)
    digest = checksum(dest)
    if digest != lay.checksums[index]:
        raise chunk_error(lay, index, path, f"has xxh3 {digest}, recorded {lay.checksums[index]}")


class MmapTier(_InAddressSpace):
    name = "mmap"

    def __init__(self, tdir: TableDir, meta: TableMeta, prefault: bool = False) -> None:
        super().__init__()
        for lay in meta.layers.values():
            fds: list[int] = []
            try:
                for index in range(lay.n_chunks):
                    path = lay.chunk_path(tdir.path, index)
                    try:
                        fds.append(tdir.open(lay.chunk_relpath(index)))
                    except FileNotFoundError:
                        raise chunk_error(lay, index, path, "is missing") from None
                    size = os.fstat(fds[-1]).st_size   # a short file would raise SIGBUS when read
                    if size != lay.chunk_bytes:
                        raise chunk_error(lay, index, path, f"has {size} bytes, expected {lay.chunk_bytes}")
                region = stitch_files(fds, lay.chunk_bytes, populate=prefault)
            finally:
                for fd in fds:      # the mappings keep the files open
                    os.close(fd)
            self.weights[lay.layer_id] = _rows_tensor(region, lay, meta.spec.dtype, meta.spec.head_dim)


class DirectTier:
    name = "direct"

    def __init__(self, tdir: TableDir, meta: TableMeta, io_threads: int = 32, o_direct: bool | None = None) -> None:
        self.reader = DirectReader(tdir, meta.layers, io_threads=io_threads, o_direct=o_direct)

    def gather(self, layer_id: int, rows: np.ndarray, out: torch.Tensor,
               sorted_unique: bool = False) -> tuple[int, int]:
        return self.reader.gather(layer_id, rows, out, sorted_unique=sorted_unique)

    def close(self) -> None:
        self.reader.close()


def open_tier(tier: str, tdir: TableDir, meta: TableMeta, prefault: bool, io_threads: int) -> Tier:
    """Open the rows of the table in `tdir` in one of TIERS."""
    if tier == "ram":
        return RamTier(tdir, meta)
    if tier == "mmap":
        return MmapTier(tdir, meta, prefault=prefault)
    return DirectTier(tdir, meta, io_threads=io_threads)
