"""DecodeStep: a table's small lookups (decode steps) in one compiled call.

A lookup of at most SMALL_LOOKUP_TOKENS positions (B*T: a decode step looks up one or a few new
tokens per sequence) without `mask`, `doc_start` or `out` takes this path when numba is installed
(`engram.serving.compiled.COMPILED`), with or without a history:

- float rows on the "ram" and "mmap" tiers: hashing (with the history's look-back), the hot-row
  cache probe and the row copies are one compiled call (`step_gather`, `step_gather_cached`)
  writing into an output buffer of the table's pool; on "mmap" a row in a unit not checked yet
  (`engram.serving.verified`) sends the lookup to the checked path, which checks it;
- every other table (the "direct" tier, quantized rows): one compiled call computes the rows, and
  the table's gather engine reads them as for any lookup (dedup, hot-row cache, verified reads,
  decoding through the codec).

The rows are the batched path's, bit for bit, and the counters count the same. Arguments get
checks of type and identity only: anything else (ids in lists or on a GPU, ids outside the
vocabulary, a history of another batch size or spec, an unusual dtype) makes `lookup` return
None, and the table takes its checked path, which computes the rows the batched way or raises the
error it names. Without numba every lookup takes that path.

SMALL_LOOKUP_TOKENS: the compiled path is single-threaded and hashes token by token; the batched
path hashes whole arrays and gathers with torch. tools/bench_decode.py compares them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engram.addressing.history import NgramHistory, history_arrays
from engram.addressing.spec import TableSpec
from engram.serving import compiled
from engram.serving.buffers import OutputPool, Scratch
from engram.serving.gather import DecodingGatherer, RowGatherer
from engram.serving.stats import StatsCounter
from engram.serving.table_info import gathered_dtype
from engram.serving.tiers import Tier
from engram.serving.usage import Usage
from engram.storage.format import TableMeta

__all__ = ["SMALL_LOOKUP_TOKENS", "PREFETCH_NOW_TOKENS", "DecodeStep"]

SMALL_LOOKUP_TOKENS = 1024
_ID_KINDS = frozenset(np.dtype(c).num for c in "ilq")      # int32 / int64 ids: the kernels' specializations
_MEMORY_TIERS = ("ram", "mmap")
_NO_CHECKS = (np.zeros(0, np.uint8), 1)      # the kernels' (verified, unit) of rows served unchecked
PREFETCH_NOW_TOKENS = 16   # prefetches of small lookups up to this many tokens from memory run at once (runs_now)


class DecodeStep:
    """The compiled path of one table's small lookups (see the module notes); made by the Table.

    Args:
        meta: the table's metadata (its spec and compression).
        tier: the table's open tier.
        engine: its gather engine (dedup, hot-row cache, counters).
        decoder: its gather of quantized rows (None for float rows).
        stats, outputs, scratch, usage: the table's counters, output pool, index scratch and calls in flight.
        dtype: what the table's lookups return by default.
    """

    def __init__(self, meta: TableMeta, tier: Tier, engine: RowGatherer,
                 decoder: DecodingGatherer | None, stats: StatsCounter, outputs: OutputPool,
                 scratch: Scratch, usage: Usage, dtype: torch.dtype) -> None:
        self.spec = spec = meta.spec
        comp = meta.compression
        self._lookup, self._fingerprint = comp.lookup, comp.fingerprint
        self._tier, self._engine, self._decoder = tier, engine, decoder
        self._stats, self._outputs, self._scratch, self._usage = stats, outputs, scratch, usage
        self._dtype, self._default = dtype, gathered_dtype(spec, dtype, dtype)
        self._consts = {lid: compiled.step_constants(spec, comp, lid, engine.dedup) for lid in spec.layer_ids}
        memory = tier.name in _MEMORY_TIERS and not spec.quantized and hasattr(tier, "weights")
        # layer -> its rows as numpy, on memory tiers (empty otherwise: the gather engine reads them)
        self._weights = {lid: _as_numpy(rows) for lid, rows in tier.weights.items()} if memory else {}  # type: ignore
        self._watch = getattr(tier, "watch", None)
        # layer -> (a byte per unit: checked, unit bytes) of the "mmap" tier's first-serve checks
        self._checks = {lid: (c.verified, c.unit) for lid, c in getattr(tier, "checks", {}).items()}
        self._bits = self._default if self._default.itemsize == 2 else None    # 16-bit rows: copied as uint16
        self._specs: list[TableSpec] = []                # other spec objects that address rows as this one
        self._empty: dict[int, tuple[np.ndarray, np.ndarray]] = {}    # B -> an empty history's arrays
        self._shape = (spec.heads_per_layer, spec.head_dim, spec.embed_dim)

    @classmethod
    def create(cls, meta: TableMeta, *args: Any) -> DecodeStep | None:
        """A DecodeStep for a whole table (not a part of a sharded one), or None without numba."""
        return cls(meta, *args) if compiled.COMPILED and meta.shard is None else None

    # -- the lookup ---------------------------------------------------------------------------
    def lookup(self, token_ids: Any, layer_id: Any, dtype: Any,
               history: Any) -> torch.Tensor | dict[int, torch.Tensor] | None:
        """`table.lookup(token_ids, layer_id, dtype=dtype, history=history)`, or None where this path
        does not apply (nothing was read or counted then)."""
        ids = _small_ids(token_ids)
        if ids is None:
            return None
        hist = self._history(history, ids.shape[0])
        if hist is None:
            return None
        weights = self._weights.get(layer_id) if type(layer_id) is int else None
        if weights is None or dtype is not None or self._engine.cache is not None:
            return self._general(ids, hist, layer_id, dtype)
        # the common decode step, kept flat: float rows in memory, no cache, the table's dtype
        B, T = ids.shape
        E = self._shape[2]
        if not self._usage.enter():
            return None
        try:
            if self._watch is not None:
                self._watch.check()
            out = self._outputs.take_array((B, T, E), self._default)
            if self._bits is not None:
                out = out.view(weights.dtype)                # 16-bit floats: their uint16 bits
            unique = compiled.step_gather(ids, hist[0], hist[1], self._lookup, self._consts[layer_id], weights, out,
                                          *self._checks.get(layer_id, _NO_CHECKS))
            if unique < 0:
                return None
            self._stats.add_memory_gather(B * T * self._shape[0], unique, 0)
        finally:
            self._usage.exit()
        result = torch.from_numpy(out)
        return result if self._bits is None else result.view(self._bits)

    def _general(self, ids: np.ndarray, hist: tuple[np.ndarray, np.ndarray], layer_id: Any,
                 dtype: Any) -> torch.Tensor | dict[int, torch.Tensor] | None:
        """lookup for every other case: a dtype, a hot-row cache, every layer, other tiers and dtypes."""
        dtypes = (self._default, self._dtype) if dtype is None else self._dtypes(dtype)
        if dtypes is None or not (layer_id is None or (type(layer_id) is int and layer_id in self._consts)):
            return None
        if not self._usage.enter():
            return None
        try:
            out = {}
            for lid in self.spec.layer_ids if layer_id is None else (layer_id,):
                rows = self._layer(ids, hist, lid, self._consts[lid], *dtypes)
                if rows is None:                     # bad ids (the same for every layer), rows not checked yet
                    return None
                out[lid] = rows
            return out if layer_id is None else out[layer_id]
        finally:
            self._usage.exit()

    def rows(self, token_ids: Any, layer_ids: Any, history: Any, mask: Any = None,
             doc_start: Any = None) -> dict[int, np.ndarray] | None:
        """The global rows [B, T, H] of each layer (None: every layer; or one int) in new arrays, for
        a prefetch; None where this path does not apply (a mask or document starts among them)."""
        if mask is not None or doc_start is not None:
            return None
        ids = _small_ids(token_ids)
        if ids is None:
            return None
        hist = self._history(history, ids.shape[0])
        layers = self.spec.layer_ids if layer_ids is None else (layer_ids,) if type(layer_ids) is int else ()
        if hist is None or not layers or not all(lid in self._consts for lid in layers):
            return None
        B, T = ids.shape
        out = {}
        for lid in layers:
            rows = out[lid] = np.empty((B, T, self._shape[0]), np.int64)
            if compiled.step_rows(ids, hist[0], hist[1], self._lookup, self._consts[lid], rows) < 0:
                return None
        return out

    def runs_now(self, rows: dict[int, np.ndarray]) -> bool:
        """Whether a prefetch of these rows (from `rows`) should run on the calling thread: up to
        PREFETCH_NOW_TOKENS tokens on a memory tier cost microseconds, less than waking the prefetch
        thread (tens of microseconds idle, milliseconds on a loaded machine)."""
        tokens = next(iter(rows.values())).shape[:2]
        return self._tier.name in _MEMORY_TIERS and tokens[0] * tokens[1] <= PREFETCH_NOW_TOKENS

    def _layer(self, ids: np.ndarray, hist: tuple[np.ndarray, np.ndarray], layer_id: int, consts: np.ndarray,
               gathered: torch.dtype, want: torch.dtype) -> torch.Tensor | None:
        B, T = ids.shape
        H, D, E = self._shape
        out = self._outputs.take_array((B, T, E), gathered)
        if self._weights:
            if not self._copy(ids, hist, layer_id, consts, out):
                return None
            result = torch.from_numpy(out)
            if gathered is torch.bfloat16:
                result = result.view(torch.bfloat16)
        else:
            rows = self._scratch.get(H, B, T)[1]                                  # [B, T, H]
            if compiled.step_rows(ids, hist[0], hist[1], self._lookup, consts, rows) < 0:
                return None
            result = torch.from_numpy(out)
            if gathered is torch.bfloat16:
                result = result.view(torch.bfloat16)
            (self._engine if self._decoder is None else self._decoder).gather(layer_id, rows.reshape(-1),
                                                                               result.view(B * T * H, D))
        return result if want is gathered else result.to(want)

    def _copy(self, ids: np.ndarray, hist: tuple[np.ndarray, np.ndarray], layer_id: int, consts: np.ndarray,
              out: np.ndarray) -> bool:
        """Hash and copy one layer's rows of a memory tier into `out` [B, T, E], counting them."""
        weights = self._weights[layer_id]
        if self._watch is not None:
            self._watch.check()
        cache = self._engine.cache
        layer_cache = None if cache is None else cache.layers.get(layer_id)
        checks = self._checks.get(layer_id, _NO_CHECKS)
        if layer_cache is None:
            unique = compiled.step_gather(ids, hist[0], hist[1], self._lookup, consts, weights, out.view(weights.dtype),
                                          *checks)
            hits = 0
        else:
            got = compiled.step_gather_cached(ids, hist[0], hist[1], self._lookup, consts, weights,
                                              out.view(weights.dtype), *checks, *layer_cache.kernel_args)
            unique, hits = got >> 32, got & 0xFFFFFFFF
        if unique < 0:
            return False
        self._stats.add_memory_gather(out.size // self._shape[1], unique, hits)
        return True

    # -- argument checks (type and identity only) ---------------------------------------------
    def _history(self, history: Any, batch: int) -> tuple[np.ndarray, np.ndarray] | None:
        if history is None:
            empty = self._empty.get(batch)
            if empty is None:
                P = self.spec.max_ngram_size - 1
                empty = self._empty[batch] = (np.full((batch, P), self.spec.pad_id, np.int64),
                                              np.zeros((batch, P), np.bool_))
            return empty
        if type(history) is not NgramHistory or history.fingerprint != self._fingerprint:
            return None
        spec = history.spec
        if spec is not self.spec and not any(spec is s for s in self._specs):
            if spec != self.spec and spec.row_fields_differ(self.spec):
                return None
            if len(self._specs) < 8:
                self._specs.append(spec)
        return history_arrays(history)

    def _dtypes(self, dtype: Any) -> tuple[torch.dtype, torch.dtype] | None:
        """(gathered, returned) dtypes of a lookup asking for `dtype` (not None)."""
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            return None
        return gathered_dtype(self.spec, self._dtype, dtype), dtype


def _small_ids(token_ids: Any) -> np.ndarray | None:
    """`token_ids` as a numpy array the kernels take (int32 / int64 in native byte order, [B, T] with
    0 < B*T <= SMALL_LOOKUP_TOKENS), or None."""
    ids = token_ids if type(token_ids) is np.ndarray else _tensor_ids(token_ids)
    if (ids is None or ids.ndim != 2 or ids.dtype.num not in _ID_KINDS or not ids.dtype.isnative
            or not 0 < ids.size <= SMALL_LOOKUP_TOKENS):
        return None
    return ids


def _tensor_ids(token_ids: Any) -> np.ndarray | None:
    """The numpy view of a CPU tensor of ids; None for anything else."""
    if type(token_ids) is not torch.Tensor:
        return None
    try:
        return token_ids.numpy()                         # CPU tensors only
    except (TypeError, RuntimeError):
        return None


def _as_numpy(rows: torch.Tensor) -> np.ndarray:
    """A numpy view of a tier's rows for the kernels, which copy bits: 16-bit floats as uint16
    (numba has no bfloat16 and no float16 arrays)."""
    return (rows.view(torch.uint16) if rows.element_size() == 2 else rows).numpy()
