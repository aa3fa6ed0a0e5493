"""shard_table: split a table into parts of contiguous row ranges, one table per part.

Each part is an ordinary table of its rows (the stored bytes copied unchanged: values and scales
of quantized rows alike) whose metadata records the rows it holds (`engram.storage.shards.ShardRange`)
and the source table's id (`engram.storage.identity`: the parts are that table, split).
`engram.distributed.ShardedTable` serves the parts together, one per rank; `engram.open` on a
part reports its range (`table.shard`).

The parts are published as a set (`engram.storage.shard_set`): every part is written and synced
into a partial directory first, then the parts are published one after another, then the set's
manifest "{prefix}-set-of-{parts}.json" last. A split killed at any point leaves the old parts
(whole: nothing is replaced before every new part is complete), the new ones, or, if it died
while publishing them, a mix that `engram.open` and `ShardedTable` refuse (ShardMismatchError)
until the split is run again. Disk: the new set is written whole beside the old one.

    paths = engram.making.sharding.shard_table("big.engram", "big", parts=4)   # big-0-of-4 ... big-3-of-4
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from engram.errors import InputError
from engram.making.build import check_build
from engram.opening import open as open_table
from engram.serving.table import Table
from engram.storage.format import LayerLayout, TableMeta
from engram.storage.identity import new_table_id
from engram.storage.shard_set import part_path, write_manifest
from engram.storage.shards import ShardRange, plan_shards
from engram.storage.writer import Chunk, chunk_buffers, plan_layout, publish_table, written_table, zero_tail

__all__ = ["shard_table", "shard_path", "check_shard_table"]


def shard_path(prefix: str | os.PathLike[str], rank: int, parts: int) -> Path:
    """Where `shard_table` writes part `rank` of `parts`: "{prefix}-{rank}-of-{parts}"."""
    return part_path(prefix, rank, parts)


def check_shard_table(src: Table, prefix: str | os.PathLike[str], parts: int,
                      overwrite: bool = False) -> list[ShardRange]:
    """Every check `shard_table` makes before it writes, writing nothing: a dry run.

    Returns:
        The ShardRange of each part, in rank order.
    """
    if not isinstance(src, Table):
        raise InputError(f"src must be an engram.Table, got {type(src).__name__}: pass engram.open(path)")
    if src.shard is not None:
        raise InputError(f"src is already {src.shard} of a sharded table: split the whole table instead")
    shards = plan_shards(src.spec, parts)
    for part in shards:
        check_build(shard_path(prefix, part.rank, part.parts), src.spec, src.compression, overwrite=overwrite,
                    shard=(part.rank, part.parts))
    return shards


def shard_table(src: Table | str | os.PathLike[str], prefix: str | os.PathLike[str], parts: int, *,
                overwrite: bool = False, progress: bool | None = None) -> list[Path]:
    """Split a table into `parts` tables of contiguous row ranges (`engram.storage.shards.plan_shards`).

    Args:
        src: the whole table (open, or its path).
        prefix: part r is written to `shard_path(prefix, r, parts)`, i.e. "{prefix}-{r}-of-{parts}".
        parts: how many parts (1 to the rows of the smallest layer).
        overwrite: replace existing tables at those paths.
        progress: show a progress bar (None: only on a terminal, after a second).

    Returns:
        The paths of the parts, in rank order. Every part is complete before the first is
        published; the set's manifest ("{prefix}-set-of-{parts}.json") is published last (see the
        module doc for what a crash leaves).

    Raises:
        InputError: bad `parts`, or `src` is itself a part.
        TableExistsError: a part's path is taken and `overwrite` is False.

    Example:
        >>> shard_table("big.engram", "big", parts=2)
        [PosixPath('big-0-of-2'), PosixPath('big-1-of-2')]
    """
    if not isinstance(src, Table):
        with open_table(src) as table:
            return shard_table(table, prefix, parts, overwrite=overwrite, progress=progress)
    shards = check_shard_table(src, prefix, parts, overwrite)
    table_id = src.table_id or new_table_id()       # the parts are the source table, split
    paths = [shard_path(prefix, part.rank, part.parts) for part in shards]
    with contextlib.ExitStack() as stack:
        written: list[tuple[Path, TableMeta]] = []
        for part, path in zip(shards, paths, strict=True):       # every part complete, none published yet
            chunks = functools.partial(_copied_chunks, src, part=part)
            written.append(stack.enter_context(written_table(
                path, src.spec, src.compression, plan_layout(src.spec, shard=part), chunks, progress,
                desc=f"shard {part.rank}/{part.parts}", shard=part, table_id=table_id)))
        for (tmp, _), path in zip(written, paths, strict=True):
            publish_table(tmp, path, overwrite)
        write_manifest(prefix, [meta for _, meta in written])    # last: the set is complete
    return paths


def _copied_chunks(src: Table, lay: LayerLayout, part: ShardRange) -> Iterator[Chunk]:
    """The part's chunks of one layer: the source's stored values (and scales), zero rows past the end."""
    spec = src.spec
    first = part.start(lay.layer_id)
    chunk = chunk_buffers(lay, spec)
    values, scales = chunk
    for index in range(lay.n_chunks):
        start, stop = lay.chunk_span(index)
        stored = src.stored_rows(lay.layer_id, np.arange(first + start, first + stop, dtype=np.int64))
        values[: stop - start] = stored.values.view(values.dtype)
        if scales is not None:
            scales[: stop - start] = stored.scales
        yield zero_tail(chunk, stop - start)
