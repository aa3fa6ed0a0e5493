"""Opening a table: `engram.open` (argument checks, metadata, the expected spec and compression)
and `engram.lookup`, the function form of `Table.lookup`."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch

from .compression import Compression
from .errors import CorruptTableError, InputError, SpecMismatchError, TableNotFoundError
from .format import TableMeta
from .metadata import read_metadata
from .spec import TableSpec
from .table import Table
from .tabledir import TableDir
from .tiers import TIERS

__all__ = ["open", "lookup", "reopen"]

_OPEN_ATTEMPTS = 8   # opens of a table that is being replaced meanwhile, before giving up


def open(path: str | os.PathLike[str], tier: str = "mmap", *, prefault: bool = False,
         compression: Compression | None = None, spec: TableSpec | None = None, io_threads: int = 32,
         dedup: bool | None = None) -> Table:
    """Open a table read-only.

    Args:
        path: the table directory written by `engram.build_table`.
        tier: where rows are read from: "ram" (loaded into hugepage-backed memory, checksums
            verified while loading), "mmap" (chunk files mapped into one address range), or
            "direct" (pread from a thread pool, bypassing the page cache; for cold tables).
        prefault: "mmap" only: fault every page in at open (MAP_POPULATE), so the first
            lookups do not pay for page faults.
        compression: if given, the compression the caller expects the table to use.
        spec: if given, the spec the caller expects the table to be built with.
        io_threads: "direct" only: reads kept in flight (the queue depth; see `engram.direct`).
        dedup: read each distinct row of a batch once and scatter it back; None (default) turns
            it on for "direct" only (it costs more than it saves where rows are in memory; see
            `engram.gather`).

    Returns:
        The open Table (a context manager).

    Raises:
        TableNotFoundError: no table at `path`.
        CorruptTableError: unknown format version, damaged metadata, missing or short chunk files.
        SpecMismatchError: the table was built with another spec or compression.

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
    path = _check_path(path)
    for attempt in range(_OPEN_ATTEMPTS):
        try:
            tdir = TableDir(path)   # every file of this table is opened relative to this directory handle
        except TableNotFoundError:
            if attempt == 0:
                raise
            time.sleep(0.001 * attempt)   # between the two renames of a replacement: nothing there yet
            continue
        try:
            meta = read_metadata(tdir)
            _check_expected(tdir.path, meta, spec, compression)
            return Table(tdir, meta, tier, prefault, io_threads, dedup)
        except (CorruptTableError, TableNotFoundError):
            # A table replaced at `path` while it was read (build_table(..., overwrite=True) swaps the
            # directories, then deletes the old one file by file) looks incomplete: open the new one.
            swapped = tdir.replaced()
            tdir.close()
            if not swapped or attempt == _OPEN_ATTEMPTS - 1:
                raise
        except BaseException:
            tdir.close()
            raise
    raise TableNotFoundError(f"no table at path={os.fspath(path)!r}: it was removed while it was being opened")


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


def reopen(path: str, tier: str, prefault: bool, io_threads: int, dedup: bool | None = None) -> Table:
    """`open` with positional arguments: how a pickled Table is opened again in the receiving process."""
    return open(path, tier, prefault=prefault, io_threads=io_threads, dedup=dedup)


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
