"""Opening a table: `engram.open` (argument checks, metadata, the expected spec and compression)
and `engram.lookup`, the function form of `Table.lookup`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from engram.addressing.compression import Compression
from engram.addressing.spec import TableSpec
from engram.errors import InputError, SpecMismatchError
from engram.release.folder import is_release_dir
from engram.release.inplace import open_release
from engram.serving.table import Table
from engram.serving.tiers import TIERS
from engram.storage.format import TableMeta
from engram.storage.metadata import open_published
from engram.storage.shard_set import check_part
from engram.storage.tabledir import TableDir

__all__ = ["open", "lookup"]

def open(path: str | os.PathLike[str], tier: str = "mmap", *, prefault: bool = False,
         compression: Compression | None = None, spec: TableSpec | None = None, io_threads: int = 32,
         dedup: bool | None = None, verify_reads: bool = True) -> Table:
    """Open a table read-only.

    Args:
        path: the table directory written by `engram.build_table`, or a DeepSeek-V4.1 checkpoint
            directory (config.json, tokenizer.json, safetensors shards): its rows are then served
            in place from the shards, nothing copied or written (see `engram.release.inplace`).
        tier: where rows are read from: "ram" (loaded into hugepage-backed memory, checksums
            verified while loading), "mmap" (chunk files mapped into one address range), or
            "direct" (pread from a thread pool, bypassing the page cache; for cold tables).
        prefault: "mmap" only: fault every page in at open (MAP_POPULATE), so the first
            lookups do not pay for page faults.
        compression: if given, the compression the caller expects the table to use.
        spec: if given, the spec the caller expects the table to be built with.
        io_threads: "direct" only: reads kept in flight (the queue depth; see `engram.serving.direct`).
        dedup: read each distinct row of a batch once and scatter it back; None (default) turns
            it on for "direct" only (it costs more than it saves where rows are in memory; see
            `engram.serving.gather`).
        verify_reads: check the bytes served against the digests recorded when the table was
            written: "mmap" checks each 4 KiB block (each chunk file, for scales and tables
            written before block digests) the first time a row in it is served, "direct" every
            block it reads; a bad block is `CorruptTableError`, never served. False serves the
            bytes unchecked ("ram" checks every chunk while loading, either way; a checkpoint
            folder served in place has no digests to check). See docs/reliability.md.

    Returns:
        The open Table (a context manager).

    Raises:
        TableNotFoundError: no table at `path`.
        CorruptTableError: unknown format version, damaged metadata, missing or short chunk files.
        SpecMismatchError: the table was built with another spec or compression.
        ShardMismatchError: `path` is a part of a shard set whose manifest, beside it, names
            another part there (a split that replaced the set was interrupted; see
            `engram.storage.shard_set`).

    Example:
        >>> with engram.open("table.engram", tier="ram") as table:
        ...     e = table.lookup(token_ids, layer_id=1)
    """
    if tier not in TIERS:
        raise InputError(f"tier={tier!r} is not a storage tier: expected one of {TIERS}")
    if not isinstance(io_threads, int) or isinstance(io_threads, bool) or io_threads < 1:
        raise InputError(f"io_threads={io_threads!r} is invalid: expected an int >= 1")
    if dedup not in (None, True, False):
        raise InputError(f"dedup={dedup!r} is invalid: expected True, False or None (per tier)")
    if not isinstance(verify_reads, bool):
        raise InputError(f"verify_reads={verify_reads!r} is invalid: expected True (check served bytes) or False")
    path = _check_path(path)
    if is_release_dir(path):          # a DeepSeek-V4.1 checkpoint directory: its rows in place
        table = open_release(path, tier, prefault, io_threads, dedup)
        try:
            _check_expected(table.path, table.release_meta, spec, compression)
        except BaseException:
            table.close()
            raise
        return table
    def make(tdir: TableDir, meta: TableMeta) -> Table:
        _check_expected(tdir.path, meta, spec, compression)
        check_part(tdir.path, meta)        # a part of a shard set: the one its manifest names
        return Table(tdir, meta, tier, prefault, io_threads, dedup, verify_reads=verify_reads)

    return open_published(path, make)


def _check_path(path: Any) -> str | os.PathLike[str]:
    """`path` if it can name a table directory, else InputError (None, bytes, a NUL inside)."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path={path!r} is invalid: expected a str or os.PathLike naming a table directory")
    text = os.fspath(path)
    if not isinstance(text, str) or "\0" in text or not text:
        raise InputError(f"path={path!r} is invalid: expected a non-empty text path without NUL characters")
    return path


def _check_expected(root: Path, meta: TableMeta, spec: TableSpec | None, compression: Compression | None) -> None:
    if spec is not None and not isinstance(spec, TableSpec):
        raise InputError(f"spec must be an engram.TableSpec or None, got {type(spec).__name__}")
    if compression is not None and not isinstance(compression, Compression):
        raise InputError(f"compression must be an engram.Compression or None, got {type(compression).__name__}")
    if spec is not None and spec != meta.spec:
        differ = [f.name for f in dataclasses.fields(spec) if getattr(meta.spec, f.name) != getattr(spec, f.name)]
        fields = ", ".join(f"{k}={getattr(meta.spec, k)!r} (expected {getattr(spec, k)!r})" for k in differ)
        raise SpecMismatchError(
            f"table at {os.fspath(root)!r} was built for another spec: {fields}: open the table built for "
            "this spec, or use table.spec")
    if compression is not None and compression != meta.compression:
        raise SpecMismatchError(
            f"table at {os.fspath(root)!r} was built with another compression (fingerprint "
            f"{meta.compression.fingerprint!r}, expected {compression.fingerprint!r}): open the table built "
            "with this tokenizer's compression, or use table.compression")


def lookup(token_ids: Any, table: Table, layer_id: int | None, out: torch.Tensor | None = None,
           dtype: torch.dtype | None = None, **context: Any) -> torch.Tensor | dict[int, torch.Tensor]:
    """The rows `token_ids` address in `table`: the same as `table.lookup(token_ids, layer_id)`
    (`history`, `mask`, `doc_start` passed on).

    Example:
        >>> e = engram.lookup(token_ids, engram.open("table.engram"), layer_id=1)   # [B, T, E]
    """
    if not isinstance(table, Table):
        raise InputError(f"table must be an engram.Table, got {type(table).__name__}: pass engram.open(path)")
    return table.lookup(token_ids, layer_id, out=out, dtype=dtype, **context)
