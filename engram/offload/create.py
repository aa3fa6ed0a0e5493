"""Making a working copy: a table's rows (decoded to float32, stored float32 or bfloat16) and zero Adam moments.

Sources: an engram table of any row dtype (quantized rows are decoded to float32, as
`Table.rows(..., dtype=torch.float32)` gives them), or a DeepSeek-V4.1 release folder (its FP8
rows decoded the same way; `engram.open` reads them in place). One part of a sharded table is
refused here (its rows cannot answer a whole table's lookups): `engram.distributed.ShardedRows`
offloads parts (`offload=`). The source is read with the "direct" tier, so the copy does not
fill this process's memory with the table's pages, and it is never written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.errors import InputError, TableExistsError
from engram.offload.adam import AdamSettings
from engram.offload.records import ROW_DTYPES
from engram.offload.workdir import ROWS, Identity, fill_rows, is_working_copy, lock_workdir, write_identity
from engram.opening import open as open_table
from engram.storage.chunks import progress_bar
from engram.storage.publish import clean_stale, fsync_path, partial_dir, publish

__all__ = ["make_working_copy", "default_dtype", "check_workdir_path"]


def default_dtype(source_dtype: str) -> str:
    """The working copy's row dtype for a source of `source_dtype`: bfloat16 for bfloat16, else float32."""
    return "bfloat16" if source_dtype == "bfloat16" else "float32"


def check_workdir_path(workdir: Any) -> Path:
    """`workdir` as a Path, or InputError."""
    if not isinstance(workdir, (str, os.PathLike)) or not isinstance(os.fspath(workdir), str) or not os.fspath(workdir):
        raise InputError(f"workdir={workdir!r} is invalid: expected a non-empty str or os.PathLike naming a directory")
    return Path(workdir)


def _replaceable(path: Path) -> bool:
    return is_working_copy(path) or (path.is_dir() and not path.is_symlink() and not any(path.iterdir()))


def _check_target(workdir: Path, overwrite: bool) -> None:
    if not os.path.lexists(workdir) or (workdir.is_dir() and not workdir.is_symlink() and not any(workdir.iterdir())):
        return
    if not is_working_copy(workdir):
        raise TableExistsError(f"workdir={os.fspath(workdir)!r} exists and is not a working copy: choose another "
                               "workdir (an empty or new directory); overwrite=True replaces only working copies")
    if not overwrite:
        raise TableExistsError(f"workdir={os.fspath(workdir)!r} holds a working copy already: reopen it with "
                               "engram.OffloadedRows(workdir, cache_bytes=...), pass overwrite=True to start over, "
                               "or choose another workdir")
    os.close(lock_workdir(workdir))           # refuses a working copy some process has open


def make_working_copy(source: Any, workdir: Path, *, dtype: str | None, settings: AdamSettings, overwrite: bool,
                      progress: bool | None = None, part: bool = False) -> None:
    """Write the working copy of `source` (a table path, or an open engram Table) at `workdir`, atomically.

    Args:
        source: the table (or V4.1 release folder) whose rows start the training; never written.
        workdir: where the working copy goes: a new or empty directory (or a working copy, with overwrite).
        dtype: "float32" or "bfloat16" rows (None: bfloat16 for a bfloat16 source, else float32).
        settings: the Adam settings recorded with it.
        overwrite: replace a working copy at `workdir`.
        progress: show a progress bar (None: only on a terminal, after a second).
        part: accept one part of a sharded table (engram.distributed.ShardedRows).

    Raises:
        InputError: a bad source or dtype; a part of a sharded table (unless `part`); the working copy
            at `workdir` is open.
        TableExistsError: something is at `workdir` (a working copy, without overwrite).
    """
    path = getattr(source, "path", source)
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"source={source!r} is invalid: expected the path of an engram table (or an open "
                         "engram.Table)")
    if dtype is not None and dtype not in ROW_DTYPES:
        raise InputError(f"dtype={dtype!r} is not a working-copy row dtype: expected one of {tuple(ROW_DTYPES)} or "
                         "None (the source's, where it is one of them)")
    clean_stale(workdir)            # partials of killed creates (a working copy set aside by one is put back)
    _check_target(workdir, overwrite)
    with open_table(path, tier="direct") as table:
        shard = table.shard
        if shard is not None and not part:
            raise InputError(
                f"source={os.fspath(path)!r} is {shard} of a sharded table: OffloadedRows trains a whole table; "
                "train the parts with engram.distributed.ShardedRows(part, offload=workdir, ...) on every rank, or "
                "offload the whole table")
        if shard is None and part:
            raise InputError(f"source={os.fspath(path)!r} is a whole table, not a part of a sharded table: split it "
                             "with `engram shard` (one part per rank)")
        spec = table.spec
        ranges = {lid: (0, spec.rows(lid)) if shard is None else shard.ranges[lid] for lid in spec.layer_ids}
        ident = Identity(spec, table.compression.fingerprint, dtype or default_dtype(spec.dtype), ranges, shard,
                         os.path.abspath(path))

        def read(layer_id: int, rows: np.ndarray) -> torch.Tensor:
            return table.rows(layer_id, rows, dtype=torch.float32)

        total = ident.total_rows * ident.layout.record_bytes
        with partial_dir(workdir) as tmp, progress_bar(total, "offload", progress) as bar:
            fill_rows(tmp / ROWS, ident, read, bar.update)
            write_identity(tmp, ident, table.compression, settings)
            fsync_path(tmp)
            publish(tmp, workdir, overwrite, replaceable=_replaceable)
