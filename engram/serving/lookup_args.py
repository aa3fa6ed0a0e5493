"""Checks of a table read's arguments (`dtype=`, `out=`, row indices), made once where the public call enters."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from engram.addressing.spec import TableSpec
from engram.errors import InputError
from engram.storage.shards import ShardRange
from engram.tensors import to_numpy_ids

__all__ = ["check_dtype", "check_out", "check_row_indices", "check_whole"]


def check_dtype(dtype: Any) -> None:
    """Refuse a lookup's `dtype=` that is neither None nor a floating-point torch.dtype."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputError(f"dtype={dtype!r} is invalid: expected a floating-point torch.dtype or None")


def check_out(out: Any, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    """Refuse a lookup's `out=` unless it is a contiguous CPU tensor of `shape` and `dtype`."""
    if not isinstance(out, torch.Tensor):
        raise InputError(f"out must be a torch.Tensor, got {type(out).__name__}: pass torch.empty({shape})")
    if tuple(out.shape) != shape or out.dtype != dtype or out.device.type != "cpu" or not out.is_contiguous():
        raise InputError(
            f"out has shape {tuple(out.shape)}, dtype {out.dtype}, device {out.device} (contiguous="
            f"{out.is_contiguous()}), expected a contiguous CPU tensor of shape {shape} and dtype {dtype}: "
            f"pass torch.empty({shape}, dtype={dtype})")


def check_row_indices(spec: TableSpec, shard: ShardRange | None, layer_id: Any,
                      row_indices: Any) -> tuple[int, np.ndarray]:
    """The checked layer and the global `row_indices` as rows of the table's arrays (contiguous
    int64 [n]): the rows themselves, or for a part of a sharded table, rows inside its range
    minus the range's start."""
    layer_id = spec.check_layer(layer_id)
    if isinstance(row_indices, (list, tuple)) and not row_indices:
        row_indices = np.empty(0, np.int64)              # np.asarray([]) is float64
    idx = to_numpy_ids(row_indices, name="row_indices")
    lo, hi = (0, spec.rows(layer_id)) if shard is None else shard.ranges[layer_id]
    if idx.ndim != 1:
        raise InputError(f"row_indices must be 1-D, got shape {idx.shape}: flatten them first")
    if idx.size and (idx.min() < lo or idx.max() >= hi):
        bad = int(idx.min()) if idx.min() < lo else int(idx.max())
        where = f"spec.rows({layer_id})" if shard is None else f"{hi}, the rows this part holds"
        raise InputError(f"row_indices holds {bad}, outside [{lo}, {hi}) for layer {layer_id}: "
                         f"use global rows {lo} <= row < {where}")
    return layer_id, np.ascontiguousarray(idx - lo if lo else idx, dtype=np.int64)


def check_whole(path: os.PathLike[str], shard: ShardRange | None) -> None:
    """Refuse to look token ids up in one part of a sharded table (its rows are not all there)."""
    if shard is not None:
        raise InputError(
            f"table at {os.fspath(path)!r} is {shard} of a sharded table, so it cannot look up token ids "
            "alone: open every part with engram.distributed.ShardedTable, one per rank")
