"""Publishing a working copy's rows as an ordinary engram table (metadata checksum, block digests, atomic).

The rows are read from the rows file in pieces (after a flush, it holds every row), rounded or
encoded to the snapshot's dtype, and written by the table writer (`engram.storage.writer.write_table`),
which publishes the table atomically. A working copy of one part of a sharded table publishes that
part (servable with `engram.distributed.ShardedTable` beside the other ranks' parts).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engram.addressing.compression import Compression
from engram.dtypes import ROW_DTYPES
from engram.errors import InputError
from engram.offload.datafile import DataFile
from engram.offload.workdir import Identity
from engram.storage.format import LayerLayout
from engram.storage.publish import clean_stale
from engram.storage.writer import (
    Chunk,
    check_target,
    chunk_buffers,
    encode_into,
    plan_layout,
    store_rows,
    write_table,
    zero_tail,
)

__all__ = ["write_snapshot", "check_snapshot"]

PIECE_BYTES = 4 << 20       # records read per piece


def check_snapshot(path: Any, dtype: Any, overwrite: Any, ident: Identity) -> tuple[Path, str]:
    """The target and the dtype of a snapshot, or InputError / TableExistsError (writes nothing)."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str) or not os.fspath(path):
        raise InputError(f"path={path!r} is invalid: expected a non-empty str or os.PathLike naming the new table")
    if dtype is not None and dtype not in ROW_DTYPES:
        raise InputError(f"dtype={dtype!r} is not a row dtype: expected one of {tuple(ROW_DTYPES)}, or None (the "
                         f"working copy's, {ident.dtype!r})")
    if not isinstance(overwrite, bool):
        raise InputError(f"overwrite={overwrite!r} is invalid: expected True or False")
    target = Path(path)
    check_target(target, overwrite)
    return target, dtype or ident.dtype


def write_snapshot(data: DataFile, ident: Identity, comp: Compression, target: Path, dtype: str, overwrite: bool,
                   progress: bool | None, table_id: str | None = None) -> None:
    """Write the rows of `data` (flushed) as a table of `dtype` at `target`; `table_id`: the id every
    part of one sharded snapshot shares (None: a new one)."""
    spec = ident.spec.replace(dtype=dtype)
    layout, bases = ident.layout, ident.bases
    step = max(1, PIECE_BYTES // layout.record_bytes)

    def chunks(lay: LayerLayout) -> Iterator[Chunk]:
        chunk = chunk_buffers(lay, spec)
        base = bases[lay.layer_id]
        for index in range(lay.n_chunks):
            start, stop = lay.chunk_span(index)
            for p in range(start, stop, step):
                q = min(p + step, stop)
                values = layout.values(data.span(base + p, base + q))        # [q - p, D] stored rows, a view
                if spec.quantized:
                    encode_into(values, chunk, p - start, spec, "the working copy", p)
                else:
                    store_rows(values, chunk[0][p - start: q - start], dtype)
                data.release()
            yield zero_tail(chunk, stop - start)

    clean_stale(target)
    write_table(target, spec, comp, plan_layout(spec, None, ident.shard), chunks, overwrite, progress,
                desc="snapshot", shard=ident.shard, table_id=table_id)
