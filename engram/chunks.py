"""Chunk files: opening, size-checking, reading, checksumming and writing one chunk file of a table.

Every tier (`engram.tiers`, `engram.direct`), the full check (`verify_chunks`) and the writers
(`engram.writer`) go through here, so each check of a chunk file, and the error naming it, is
written once. A chunk file is exactly `layout.chunk_bytes` bytes (see `engram.format`); its
xxh3-64 digest is recorded in the table's metadata.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from .errors import CorruptTableError
from .format import LayerLayout, TableDir, TableMeta

__all__ = ["checksum", "chunk_error", "open_chunk", "read_chunk", "check_chunk", "verify_chunks", "write_chunk",
           "progress_bar", "fadvise"]

_VERIFY_READ = 8 << 20


def checksum(data: Any) -> str:
    """xxh3-64 hex digest of a bytes-like object (the per-chunk checksum)."""
    return xxhash.xxh3_64_hexdigest(data)


def chunk_error(layout: LayerLayout, index: int, path: str | os.PathLike[str], problem: str) -> CorruptTableError:
    """The CorruptTableError for one damaged chunk file, naming layer, array (for scales), chunk and file."""
    what = "" if layout.role == "rows" else f" scales (array {layout.array!r})"
    return CorruptTableError(
        f"layer {layout.layer_id}{what} chunk {index} ({os.fspath(path)!r}) {problem}: the table is damaged; "
        "rebuild it or restore the file (engram verify checks every chunk)")


def fadvise(fd: int, advice: str) -> None:
    """posix_fadvise(fd, 0, 0, POSIX_FADV_<advice>) over the whole file, where the OS has it."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, getattr(os, f"POSIX_FADV_{advice}"))


def progress_bar(total: int, desc: str, progress: bool | None = None) -> Any:
    """A byte-counting tqdm bar (`progress` None: shown only on a terminal, after a second)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, delay=1.0, mininterval=0.5,
                disable=None if progress is None else not progress)


def open_chunk(tdir: TableDir, lay: LayerLayout, index: int, flags: int = os.O_RDONLY) -> int:
    """A file descriptor of chunk `index` of `lay`, its size checked (a short file would SIGBUS a mapping).

    Raises:
        CorruptTableError: the file is missing or has the wrong size.
        OSError: the file cannot be opened with `flags` (e.g. EINVAL for O_DIRECT).
    """
    try:
        fd = tdir.open(lay.chunk_relpath(index), flags)
    except FileNotFoundError:
        raise chunk_error(lay, index, lay.chunk_path(tdir.path, index), "is missing") from None
    size = os.fstat(fd).st_size
    if size != lay.chunk_bytes:
        os.close(fd)
        raise chunk_error(lay, index, lay.chunk_path(tdir.path, index),
                          f"has {size} bytes, expected {lay.chunk_bytes}")
    return fd


def read_chunk(tdir: TableDir, lay: LayerLayout, index: int, dest: np.ndarray) -> None:
    """Read chunk `index` of `lay` into `dest` (uint8 [chunk_bytes]) and check its size and checksum."""
    path = lay.chunk_path(tdir.path, index)
    fd = open_chunk(tdir, lay, index)
    try:
        view, done = dest.data, 0
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


def check_chunk(tdir: TableDir, lay: LayerLayout, index: int) -> CorruptTableError | None:
    """The problem with one chunk file, if any: missing, wrong size or wrong checksum."""
    try:
        fd = open_chunk(tdir, lay, index)
    except CorruptTableError as exc:
        return exc
    try:
        fadvise(fd, "SEQUENTIAL")
        digest = xxhash.xxh3_64()
        while block := os.read(fd, _VERIFY_READ):
            digest.update(block)
        fadvise(fd, "DONTNEED")   # a full check should not flush the page cache
    finally:
        os.close(fd)
    if digest.hexdigest() != lay.checksums[index]:
        return chunk_error(lay, index, lay.chunk_path(tdir.path, index),
                           f"has xxh3 {digest.hexdigest()}, recorded {lay.checksums[index]} (its contents changed)")
    return None


def verify_chunks(tdir: TableDir, meta: TableMeta, progress: bool | None = None) -> None:
    """Check every chunk file; raise CorruptTableError naming the first bad one and the count."""
    bad: list[CorruptTableError] = []
    with progress_bar(sum(lay.disk_bytes for lay in meta.layers.values()), "verify", progress) as bar:
        for layer in meta.layers.values():
            for lay in layer.arrays():            # the values, then the scales of quantized rows
                for index in range(lay.n_chunks):
                    problem = check_chunk(tdir, lay, index)
                    if problem is not None:
                        bad.append(problem)
                    bar.update(lay.chunk_bytes)
    if bad:
        more = f" ({len(bad) - 1} more bad chunks)" if len(bad) > 1 else ""
        raise CorruptTableError(f"{bad[0]}{more}") from bad[0]


def write_chunk(path: Path, block: np.ndarray, bar: Any) -> str:
    """Write one chunk file (created, written whole, fsynced), advance `bar` and return its checksum."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = block.data.cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        os.fsync(fd)
    finally:
        os.close(fd)
    bar.update(len(data))
    return checksum(data)
