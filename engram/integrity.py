"""Integrity checks of a table's chunk files (values and scale arrays) against the checksums recorded at build."""

from __future__ import annotations

import os

from .direct import fadvise
from .errors import CorruptTableError
from .format import LayerLayout, TableDir, TableMeta, chunk_error, read_metadata

__all__ = ["verify_chunks", "check_chunk"]

_VERIFY_READ = 8 << 20


def verify_chunks(tdir: TableDir, meta: TableMeta, progress: bool | None = None) -> None:
    """Check the metadata (its checksum, and that it still is what the table was opened with), then
    every chunk file; raise CorruptTableError naming the first problem (and the count of bad chunks)."""
    from tqdm.auto import tqdm

    if read_metadata(tdir) != meta:
        raise CorruptTableError(
            f"the metadata of the table at {str(tdir.path)!r} changed after it was opened (zarr.json or the "
            "compression file was rewritten in place): restore it or rebuild the table, then open it again")

    bad: list[CorruptTableError] = []
    total = sum(lay.disk_bytes for lay in meta.layers.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", delay=1.0, mininterval=0.5,
              disable=None if progress is None else not progress) as bar:
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


def check_chunk(tdir: TableDir, lay: LayerLayout, index: int) -> CorruptTableError | None:
    """The problem with one chunk file, if any: missing, wrong size or wrong checksum."""
    import xxhash

    path = lay.chunk_path(tdir.path, index)
    try:
        fd = tdir.open(lay.chunk_relpath(index))
    except FileNotFoundError:
        return chunk_error(lay, index, path, "is missing")
    try:
        size = os.fstat(fd).st_size
        if size != lay.chunk_bytes:
            return chunk_error(lay, index, path, f"has {size} bytes, expected {lay.chunk_bytes}")
        fadvise(fd, "SEQUENTIAL")
        digest = xxhash.xxh3_64()
        while block := os.read(fd, _VERIFY_READ):
            digest.update(block)
        fadvise(fd, "DONTNEED")   # a full check should not flush the page cache
    finally:
        os.close(fd)
    if digest.hexdigest() != lay.checksums[index]:
        return chunk_error(lay, index, path, f"has xxh3 {digest.hexdigest()}, recorded {lay.checksums[index]} "
                           "(its contents changed)")
    return None
