"""Hot-row cache: a RAM-resident copy of a table's most-used rows, consulted before its tier.

    table.load_hot_rows("hot.npz", fraction=0.1)   # or rows=..., or max_bytes=...

The cache holds rows as the tier stores them: float rows in their dtype, quantized rows as their
encoded values (int8 / E4M3 bytes: four times the rows of float32 per byte of cache), decoded
with the resident scales after the gather like every other read (see `engram.serving.gather`).
`max_bytes` counts those stored bytes.

The rows come from a hot-row plan (`engram stats --hot-rows`, `CorpusStats.hot_row_plan()`). A
lookup probes a whole batch of row ids at once and gets, per id, the cache slot holding it or
-1. Two probe structures, chosen per layer by its row count: a dense int32 slot per table row
answers with one gather at 4 bytes per table row, many times faster than `np.searchsorted` over
the sorted cached ids. Layers up to DENSE_MAX_ROWS rows (64 MiB of slots) use the dense array;
larger ones a bitmap of the cached rows (1 bit per table row) that sends only the hits to
`searchsorted`. README ("Design measurements") has the timings.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from engram.addressing.compression import Compression
from engram.addressing.spec import TableSpec
from engram.errors import InputError
from engram.serving.hotrows import HotRowPlan

__all__ = ["DENSE_MAX_ROWS", "HotRowCache", "LayerCache", "select_hot_rows"]

DENSE_MAX_ROWS = 1 << 24


class LayerCache:
    """Cached rows of one layer: sorted global row ids, their data [n, D], and a probe structure.

    Args:
        rows: sorted, distinct int64 global row ids.
        data: the rows' contents [n, D], in the order of `rows`.
        n_rows: rows in the layer's table (bounds every probed id).
        dense: use a dense slot array (default: when n_rows <= DENSE_MAX_ROWS).
    """

    def __init__(self, rows: np.ndarray, data: torch.Tensor, n_rows: int, dense: bool | None = None) -> None:
        self.rows, self.data = rows, data
        self.dense = n_rows <= DENSE_MAX_ROWS if dense is None else dense
        if self.dense:
            self._slots = np.full(n_rows, -1, np.int32)
            self._slots[rows] = np.arange(rows.size, dtype=np.int32)
        else:
            member = np.zeros(n_rows, bool)
            member[rows] = True
            self._bits = np.packbits(member, bitorder="little")

    @property
    def nbytes(self) -> int:
        """Bytes held: row data plus the probe structure."""
        probe = self._slots.nbytes if self.dense else self._bits.nbytes + self.rows.nbytes
        return self.data.numel() * self.data.element_size() + probe

    @functools.cached_property
    def kernel_args(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The cache as compiled code reads it (`engram.serving.compiled.step_gather_cached`): the
        dense int32 slot of every table row (empty for a bitmap), the bitmap (empty for dense
        slots), the sorted cached rows, and their data as a numpy array (16-bit floats as uint16 bits)."""
        data = (self.data.view(torch.uint16) if self.data.element_size() == 2 else self.data).numpy()
        if self.dense:
            return self._slots, np.zeros(0, np.uint8), self.rows, data
        return np.zeros(0, np.int32), self._bits, self.rows, data

    def probe(self, keys: np.ndarray) -> np.ndarray:
        """The slot of each id in `keys` (int64 [n], in range), -1 where it is not cached."""
        if self.dense:
            return self._slots[keys].astype(np.int64)
        byte = self._bits[keys >> 3]
        hit = np.flatnonzero((byte >> (keys & 7).astype(np.uint8)) & 1)
        slots = np.full(keys.size, -1, np.int64)
        slots[hit] = np.searchsorted(self.rows, keys[hit])
        return slots


class HotRowCache:
    """The cached rows of every layer that has some."""

    def __init__(self, layers: dict[int, LayerCache]) -> None:
        self.layers = layers

    @property
    def n_rows(self) -> int:
        return sum(layer.rows.size for layer in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())

    @classmethod
    def load(cls, chosen: dict[int, np.ndarray], spec: TableSpec, dtype: torch.dtype,
             read: Callable[[int, np.ndarray, torch.Tensor], Any]) -> HotRowCache:
        """Read the chosen rows of each layer with `read(layer_id, sorted_rows, out)`; `dtype` is the
        torch dtype the tier stores rows in (`engram.dtypes.storage_torch_dtype`)."""
        layers = {}
        for layer_id, rows in chosen.items():
            if rows.size == 0:
                continue
            data = torch.empty((rows.size, spec.value_width), dtype=dtype)    # stored values [n, W]
            read(layer_id, rows, data)
            layers[layer_id] = LayerCache(rows, data, spec.rows(layer_id))
        return cls(layers)


def select_hot_rows(plan: HotRowPlan | str | os.PathLike[str], spec: TableSpec, comp: Compression,
                    fraction: float | None = None, rows: int | None = None,
                    max_bytes: int | None = None) -> dict[int, np.ndarray]:
    """The rows to cache per layer, sorted: the plan's top `fraction` of each layer's touched
    rows, its top `rows` rows of each layer, or the most-used rows over all layers that fit in
    `max_bytes` of row data.

    Raises:
        SpecMismatchError: the plan was counted for another spec or compression.
        InputError: not exactly one of fraction/rows/max_bytes, or a plan row outside its layer.
    """
    if not isinstance(plan, HotRowPlan):
        if not isinstance(plan, (str, os.PathLike)):
            raise InputError(f"plan must be an engram.HotRowPlan or a path, got {type(plan).__name__}")
        plan = HotRowPlan.load(plan)
    given = [name for name, value in (("fraction", fraction), ("rows", rows), ("max_bytes", max_bytes))
             if value is not None]
    if len(given) != 1:
        raise InputError(f"pass exactly one of fraction=, rows= or max_bytes=, got {given or 'none'}")
    plan.check_matches(spec, comp)      # the row encoding aside: a float table's plan serves its conversions
    for name, value in (("rows", rows), ("max_bytes", max_bytes)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise InputError(f"{name}={value!r} is invalid: expected an int >= 0")
    if max_bytes is not None:
        chosen = _by_bytes(plan, max_bytes // spec.row_bytes)
    else:
        chosen = {i: plan.top(i, fraction=fraction, count=rows) for i in plan.rows}
    out = {}
    for layer_id, picked in chosen.items():
        picked = np.unique(np.asarray(picked, np.int64))             # sorted, distinct
        if picked.size and (picked[0] < 0 or picked[-1] >= spec.rows(layer_id)):
            raise InputError(f"hot-row plan holds row {int(picked[-1] if picked[-1] >= 0 else picked[0])} "
                             f"outside [0, {spec.rows(layer_id)}) for layer {layer_id}: the plan is damaged")
        out[layer_id] = picked
    return out


def _by_bytes(plan: HotRowPlan, budget_rows: int) -> dict[int, np.ndarray]:
    """The `budget_rows` rows with the most lookups over all layers, per layer."""
    layer_ids = list(plan.rows)
    lookups = np.concatenate([plan.lookups[i] for i in layer_ids]) if layer_ids else np.zeros(0, np.int64)
    owner = np.concatenate([np.full(plan.rows[i].size, k) for k, i in enumerate(layer_ids)]) if layer_ids else lookups
    best = np.argsort(-lookups, kind="stable")[:budget_rows]
    taken = np.bincount(owner[best], minlength=len(layer_ids))
    # Each layer's rows are stored most-used first, so a layer's share is a prefix of its list.
    return {i: plan.rows[i][: int(taken[k])] for k, i in enumerate(layer_ids)}
