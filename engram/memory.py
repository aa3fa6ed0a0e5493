"""Engram layers: look up hashed n-gram rows and gate them into hidden states.

Two variants share the hashing, the row lookup (in-module rows or a table), the input checks and
the gate; they differ in how rows become keys and a value, and in what follows the gate. Per
branch g of the hidden states h [B,T,G,C], with e [B,T,E] the concatenated rows of the position's
n-grams, and gate(q, k) = sigmoid(sign(s) * sqrt(max(|s|, 1e-6))) with s = <q, k> / sqrt(C):

EngramMemory, the reference layer (arXiv 2601.07372; DESIGN.md "The algorithm"):

    k_g = RMSNorm(W_K,g e),  q_g = RMSNorm(h_g),  u_g = gate(q_g, k_g) * (W_V e)
    output = u + ShortConv(u)

EngramMemoryV41, the DeepSeek-V4.1 layer (DESIGN.md item 8): one fused projection, no ShortConv:

    [k_0; ...; k_{G-1}; v] = wkv(e),  output_g = gate(q_g * k'_g * rms(h_g), rms(k_g)) * v

where rms normalizes without a weight and q_g, k'_g are the learned `q_weight`, `k_weight`
(see engram.memory_v41).
"""

from __future__ import annotations

import math
import os
from typing import Any, ClassVar, Self

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .args import check_int, check_real
from .compression import Compression
from .errors import InputError, SpecMismatchError
from .hashing import NgramHasher
from .module_cache import EngramCache, check_prefetch_context, check_step, commit, new_cache
from .norm import BranchRMSNorm
from .prefetch import Prefetch
from .shortconv import ShortConv
from .spec import TableSpec
from .tensors import check_ids_2d, is_torch, to_numpy_ids

__all__ = ["EngramMemoryBase", "EngramMemory", "signed_sqrt_gate"]

_GATE_FLOOR = 1e-6  # |s| is clamped to this before the square root (keeps the gradient finite)


def signed_sqrt_gate(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The Engram gate of queries and keys [..., G, C]: one value in (0, 1) per branch, [..., G].

    `sigmoid(sign(s) * sqrt(max(|s|, 1e-6)))` with `s = <q, k> / sqrt(C)` over the last dimension.
    """
    s = (k * q).sum(dim=-1) / math.sqrt(q.shape[-1])                        # [..., G]
    return torch.sigmoid(s.sign() * s.abs().clamp_min(_GATE_FLOOR).sqrt())   # [..., G]


class EngramMemoryBase(nn.Module):
    """What every Engram layer variant shares; a variant adds its projections and `forward`.

    Rows live either inside the module (`table=None`: one trainable `rows` parameter
    [spec.rows(layer_id), D], all heads stacked at `spec.head_offsets(layer_id)`, initialized
    from N(0, init_std^2)) or in a table on disk (`table=engram.open(...)`: read with
    `table.lookup(..., dtype=<the module's dtype>)`, so rows stored in any dtype arrive in the
    module's; no gradient, no `rows` parameter). Same rows give the same output either way.
    `param_groups` and `export_rows` treat the `rows` of every variant alike.

    A variant sets `_weight` (the parameter whose dtype and device the module computes in) and
    `scale_names` (parameters that scale rather than project, like norm weights: `param_groups`
    keeps them out of weight decay), builds its parts after `super().__init__`, then calls
    `reset_parameters()`.

    Args:
        spec: the table spec; `layer_id` must be one of `spec.layer_ids`.
        comp: the token-id compression the spec was built for.
        layer_id: which of the spec's tables this layer reads.
        hidden_size: C, the model width.
        hc_mult: G, hyper-connection branches of the hidden states (1 for a dense model).
        table: an open `engram.Table` built for `spec` and `comp`, or None for in-module rows;
            also `engram.distributed.ShardedTable` (rows sharded over ranks) or `ShardedRows`
            (sharded and trainable: its lookups carry gradients to the rows' owners).
        init_std: standard deviation of the initial in-module rows (build_table's default).
    """

    scale_names: ClassVar[tuple[str, ...]] = ()
    spec: TableSpec
    comp: Compression
    table: Any
    rows: nn.Parameter | None
    init_std: float

    def __init__(self, spec: TableSpec, comp: Compression, *, layer_id: int, hidden_size: int,
                 hc_mult: int = 1, table: Any = None, init_std: float = 0.02) -> None:
        super().__init__()
        self.hasher = NgramHasher(spec, comp)   # validates spec and comp
        self.layer_id = spec.check_layer(layer_id)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.hc_mult = _positive_int("hc_mult", hc_mult)
        check_real("init_std", init_std, 0, " (e.g. 0.02)")
        self.init_std = float(init_std)
        self.spec, self.comp, self.table = spec, comp, table
        if table is not None:
            _check_table(table, spec, comp, type(self).__name__)
        if table is None:
            self.rows = nn.Parameter(torch.empty(spec.rows(self.layer_id), spec.head_dim))
        else:
            self.register_parameter("rows", None)

    @classmethod
    def from_table(cls, table: Any, *, layer_id: int, hidden_size: int, hc_mult: int = 1,
                   **kwargs: Any) -> Self:
        """A module that reads its rows from `table`, with the table's own spec and compression.

        Other keyword arguments go to the constructor (e.g. EngramMemory's `kernel_size`).

        Example:
            >>> mem = EngramMemory.from_table(engram.open(path), layer_id=1, hidden_size=C)
        """
        return cls(table.spec, table.compression, layer_id=layer_id, hidden_size=hidden_size,
                   hc_mult=hc_mult, table=table, **kwargs)

    def reset_parameters(self) -> None:
        """Rows ~ N(0, init_std^2); a variant resets its own parts after this."""
        if self.rows is not None:
            nn.init.normal_(self.rows, mean=0.0, std=self.init_std)

    @property
    def _weight(self) -> torch.Tensor:
        """A projection weight of the variant: the module computes in its dtype, on its device."""
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        """E: width of one position's concatenated rows."""
        return self.spec.embed_dim

    def new_cache(self, batch_size: int, max_rollback: int = 16) -> EngramCache:
        """An empty generation cache of `batch_size` sequences for forward(..., cache=); see engram.module_cache."""
        return new_cache(self, batch_size, max_rollback)

    def lookup(self, token_ids: Any, device: torch.device | str | None = None, *, cache: EngramCache | None = None,
               mask: Any = None, doc_start: Any = None) -> torch.Tensor:
        """The rows that `token_ids` [B,T] address, heads concatenated: [B, T, E].

        Hashes on the host (NgramHasher), then gathers from the in-module rows (differentiable)
        or reads the table (no gradient). `token_ids` may also be a `Prefetch` handle from
        `table.prefetch` on this module's table: its rows for this layer are collected
        (`handle.result(layer_id)`). The result is on `device` (default: the module's) in the
        module's dtype. With a `cache` the ids continue its history; `mask` and `doc_start` as for table.lookup.
        """
        dtype = self._weight.dtype
        device = self._weight.device if device is None else device
        history = None if cache is None else cache.history
        if isinstance(token_ids, Prefetch):
            check_prefetch_context(token_ids, history, mask, type(self).__name__)
            return self._prefetched(token_ids).to(device=device, dtype=dtype)
        context = {k: v for k, v in (("history", history), ("mask", mask), ("doc_start", doc_start)) if v is not None}
        if self.table is not None:
            return self.table.lookup(token_ids, self.layer_id, dtype=dtype, **context).to(device)
        assert self.rows is not None, "a module without a table holds its rows"
        idx = self.hasher.global_rows(to_numpy_ids(token_ids), self.layer_id, **context)   # [B, T, H] rows of `rows`
        idx = torch.from_numpy(idx).to(self.rows.device)
        return F.embedding(idx, self.rows).flatten(2).to(device=device, dtype=dtype)   # [B, T, H*D]

    def _prefetched(self, handle: Prefetch) -> torch.Tensor:
        """This layer's rows [B, T, E] from a prefetch of this module's table."""
        name = type(self).__name__
        if self.table is None:
            raise InputError(
                f"this {name} keeps its rows in the module (table=None), so a prefetch handle cannot "
                "supply them (table rows get no gradient): pass token_ids, or build the module with table=")
        theirs, ours = handle.table_path, _table_path(self.table)
        if theirs is not None and ours is not None and os.path.realpath(theirs) != os.path.realpath(ours):
            raise InputError(
                f"the prefetch handle holds rows of the table at {os.fspath(theirs)!r} but this {name} reads "
                f"{ours!r}: prefetch from the table this module reads (mem.table.prefetch(token_ids))")
        if self.layer_id not in handle.layer_ids:
            raise InputError(
                f"the prefetch handle holds layers {handle.layer_ids} but this {name} reads layer "
                f"{self.layer_id}: pass layer_ids=None (all layers) or include {self.layer_id} in table.prefetch")
        rows = handle.result(self.layer_id)
        lossless = (self._weight.dtype, self.table.dtype)          # the module's dtype, or the rows as stored
        if rows.dtype not in lossless:
            raise InputError(
                f"the prefetched rows are {rows.dtype} but this {name} computes in {self._weight.dtype} and the "
                f"table stores {self.table.dtype}: prefetch with dtype={self._weight.dtype} (or the default)")
        if rows.ndim != 3 or rows.shape[-1] != self.embed_dim:
            raise InputError(
                f"the prefetched rows have shape {tuple(rows.shape)}, expected [B, T, {self.embed_dim}]: "
                "prefetch from the table this module reads (mem.table.prefetch(token_ids))")
        return rows

    def _check_inputs(self, hidden_states: Any, token_ids: Any) -> tuple[int, int, int, int]:
        """Raise InputError unless forward's arguments fit this module; return (B, T, G, C)."""
        name = type(self).__name__
        if not isinstance(hidden_states, torch.Tensor) or not hidden_states.is_floating_point():
            is_tensor = isinstance(hidden_states, torch.Tensor)
            got = hidden_states.dtype if is_tensor else type(hidden_states).__name__
            raise InputError(f"hidden_states must be a floating-point torch.Tensor, got {got}: "
                             "pass the model's hidden states")
        shape = tuple(hidden_states.shape)
        if len(shape) != 4:
            raise InputError(
                f"hidden_states must be shaped [B, T, G, C] (batch, positions, hc_mult, hidden_size), "
                f"got shape {shape}: for a dense model (hc_mult=1) pass hidden.unsqueeze(2)")
        B, T, G, C = shape
        if (G, C) != (self.hc_mult, self.hidden_size):
            raise InputError(
                f"hidden_states has shape {shape} (hc_mult G={G}, hidden_size C={C}) but this "
                f"{name} has hc_mult={self.hc_mult}, hidden_size={self.hidden_size}: pass "
                f"hidden states shaped [B, T, {self.hc_mult}, {self.hidden_size}] or build the module "
                f"with hc_mult={G}, hidden_size={C}")
        if T == 0:
            raise InputError(f"hidden_states has shape {shape}, with no positions (T=0): pass at least one position")
        dtype = self._weight.dtype
        if hidden_states.dtype != dtype and not torch.is_autocast_enabled(hidden_states.device.type):
            raise InputError(
                f"hidden_states has dtype {hidden_states.dtype} but this {name} computes in {dtype}: pass "
                f"hidden_states.to({dtype}), convert the module with mem.to({hidden_states.dtype}), "
                "or run under torch.autocast")
        param_device = self._weight.device
        if hidden_states.device != param_device:
            raise InputError(
                f"hidden_states is on device {hidden_states.device} but this {name} is on "
                f"{param_device}: move the module with mem.to({str(hidden_states.device)!r})")
        if isinstance(token_ids, Prefetch):
            rows_shape = tuple(self._prefetched(token_ids).shape)
            if rows_shape[:2] != (B, T):
                raise InputError(
                    f"the prefetched rows have [B, T] = {rows_shape[:2]} but hidden_states has {(B, T)}: "
                    "prefetch the token ids of the same batch and positions as the hidden states")
            return B, T, G, C
        if is_torch(token_ids) and token_ids.device.type != "cpu" and token_ids.device != param_device:
            raise InputError(
                f"token_ids is on device {token_ids.device} but hidden_states is on "
                f"{hidden_states.device}: pass the ids on {hidden_states.device} or on the CPU "
                "(hashing runs on the host)")
        if not hasattr(token_ids, "shape"):
            token_ids = np.asarray(token_ids)
        check_ids_2d(token_ids)
        if tuple(token_ids.shape) != (B, T):
            raise InputError(
                f"token_ids has shape {tuple(token_ids.shape)} but hidden_states has [B, T] = {(B, T)}: "
                "pass the token ids of the same batch and positions as the hidden states")
        return B, T, G, C

    def export_rows(self) -> torch.Tensor:
        """A CPU copy of the trained rows [spec.rows(layer_id), D], ready for build_table.

        Example:
            >>> engram.build_table(path, mem.spec, mem.comp, weights={mem.layer_id: mem.export_rows()})
        """
        if self.rows is None:
            raise InputError(
                f"this {type(self).__name__} reads its rows from the table at {_table_path(self.table)!r}: "
                "there are no in-module rows to export; copy the table instead")
        return self.rows.detach().to("cpu", copy=True)

    def extra_repr(self) -> str:
        rows = f"table={_table_path(self.table)!r}" if self.table is not None else (
            f"rows={self.spec.rows(self.layer_id)}x{self.spec.head_dim}")
        return (f"layer_id={self.layer_id}, embed_dim={self.embed_dim}, hidden_size={self.hidden_size}, "
                f"hc_mult={self.hc_mult}, {rows}")


class EngramMemory(EngramMemoryBase):
    """One Engram layer as in the reference: per-branch keys, a shared value, a gate and a ShortConv.

    Rows as in EngramMemoryBase: in the module (trainable) or read from a table. The ShortConv
    weight starts at zero, so a fresh module outputs the gated value alone.

    State dict: rows [spec.rows(layer_id), D] (in-module rows only), key_proj.{weight,bias}
    (the G key projections stacked row-wise, [G*C, E] and [G*C]), key_norm.weight and
    query_norm.weight [G, C], value_proj.{weight,bias} ([C, E], [C]), short_conv.norm.weight
    [G, C], short_conv.weight [G*C, 1, kernel_size]. `reference_state_dict` and
    `load_reference_state_dict` use the reference's own names instead.

    Args:
        spec, comp, layer_id, hidden_size, hc_mult, table, init_std: as EngramMemoryBase.
        kernel_size: taps of the ShortConv (its dilation is spec.max_ngram_size).

    Example:
        >>> comp = Compression.identity(100)
        >>> spec = TableSpec(engram_vocab_size=(50, 50), max_ngram_size=3, n_head_per_ngram=2,
        ...                  n_embed_per_ngram=16, layer_ids=(0,), compressed_vocab_size=100)
        >>> mem = EngramMemory(spec, comp, layer_id=0, hidden_size=32, hc_mult=1)
        >>> h = torch.randn(2, 5, 32)
        >>> y = mem(h.unsqueeze(2), torch.randint(0, 100, (2, 5)))   # [B, T, 1, C]
        >>> (h + y.squeeze(2)).shape                                   # residual add
        torch.Size([2, 5, 32])
    """

    def __init__(self, spec: TableSpec, comp: Compression, *, layer_id: int, hidden_size: int,
                 hc_mult: int = 1, kernel_size: int = 4, table: Any = None,
                 init_std: float = 0.02) -> None:
        kernel_size = _positive_int("kernel_size", kernel_size)
        super().__init__(spec, comp, layer_id=layer_id, hidden_size=hidden_size, hc_mult=hc_mult,
                         table=table, init_std=init_std)
        self.kernel_size = kernel_size
        E, C, G = spec.embed_dim, self.hidden_size, self.hc_mult
        self.key_proj = nn.Linear(E, G * C)      # the G per-branch key projections, stacked
        self.key_norm = BranchRMSNorm(G, C)
        self.query_norm = BranchRMSNorm(G, C)
        self.value_proj = nn.Linear(E, C)        # one value, shared by the branches
        self.short_conv = ShortConv(C, G, kernel_size=self.kernel_size, dilation=spec.max_ngram_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Rows ~ N(0, init_std^2); projections as nn.Linear; norms to one; ShortConv to zero."""
        super().reset_parameters()
        self.key_proj.reset_parameters()
        self.value_proj.reset_parameters()
        self.key_norm.reset_parameters()
        self.query_norm.reset_parameters()
        self.short_conv.reset_parameters()

    @property
    def _weight(self) -> torch.Tensor:
        return self.value_proj.weight

    def forward(self, hidden_states: torch.Tensor, token_ids: Any, *, cache: EngramCache | None = None,
                mask: Any = None, doc_start: Any = None) -> torch.Tensor:
        """The Engram branch for `hidden_states` [B,T,G,C] at positions holding `token_ids` [B,T].

        Args:
            hidden_states: [B, T, G, C] floating tensor on the module's device.
            token_ids: [B, T] raw (uncompressed) token ids: numpy, or a torch tensor on the CPU
                or on the hidden states' device (ids are hashed on the host either way); or the
                `Prefetch` handle of `table.prefetch(token_ids)` on this module's table, started
                before the preceding layers so the rows are ready when this layer runs.
            cache: from `new_cache`: the positions continue its sequences (the output equals the full
                forward's there) and are appended to it. A prefetch handle must then come from
                `table.prefetch(ids, history=cache.history)`.
            mask: [B, T] bool, False at padding (ragged steps): later positions skip it.
            doc_start: [B, T] bool, without a cache: documents start there (packed rows); each
                document's outputs equal those of the document alone.

        Returns:
            [B, T, G, C]: add it to the residual stream (before the block's attention).
        """
        B, T, G, C = self._check_inputs(hidden_states, token_ids)
        mask, starts = check_step(cache, mask, doc_start, B, T)       # [B, T] bool or None each
        e = self.lookup(token_ids, device=hidden_states.device, cache=cache, mask=mask, doc_start=starts)   # [B,T,E]
        k = self.key_norm(self.key_proj(e).view(B, T, G, C))           # [B, T, G, C] key per branch
        q = self.query_norm(hidden_states)                             # [B, T, G, C]
        gate = signed_sqrt_gate(q, k)                                  # [B, T, G]
        v = self.value_proj(e)                                         # [B, T, C] shared value
        u = gate.unsqueeze(-1) * v.unsqueeze(2)                        # [B, T, G, C]
        if cache is None and mask is None and starts is None:
            return u + self.short_conv(u)                              # [B, T, G, C]
        conv, past = self.short_conv.step(u, None if cache is None else cache.conv, mask, starts)   # [B,T,G,C]
        commit(cache, token_ids, mask, past)
        return u + conv                                                # [B, T, G, C]

    def load_reference_state_dict(self, state_dict: Any) -> None:
        """Load weights saved under the reference's names (deepseek-ai/Engram `Engram` module).

        Keys: multi_head_embedding.embedding.weight, multi_head_embedding.offsets,
        short_conv.conv.weight, short_conv.norms.{g}.weight, value_proj.{weight,bias},
        key_projs.{g}.{weight,bias}, norm1.{g}.weight, norm2.{g}.weight. Shapes and the offsets
        buffer are checked against this module; a table-backed module takes no embedding key.

        Raises:
            InputError: keys missing or unexpected (all of them are named).
            SpecMismatchError: a shape differs, or the offsets differ from spec.head_offsets.
        """
        from .reference import load_reference_state_dict

        load_reference_state_dict(self, state_dict)

    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """This module's weights under the reference's names (detached CPU copies)."""
        from .reference import reference_state_dict

        return reference_state_dict(self)


def _positive_int(name: str, value: Any) -> int:
    check_int(name, value, 1)
    return int(value)


def _table_path(table: Any) -> str | None:
    path = getattr(table, "path", None)
    return None if path is None else os.fspath(path)


def _check_table(table: Any, spec: TableSpec, comp: Compression, owner: str) -> None:
    """Raise unless `table` was built for `spec` (its row encoding aside) and `comp`."""
    if not (hasattr(table, "lookup") and isinstance(getattr(table, "spec", None), TableSpec)):
        raise InputError(f"table={table!r} is not an engram table: pass engram.open(path) or None")
    path = _table_path(table)
    differ = table.spec.row_fields_differ(spec)
    if differ:
        fields = ", ".join(f"{n}={getattr(table.spec, n)!r} (module: {getattr(spec, n)!r})" for n in differ)
        raise SpecMismatchError(
            f"table at {path!r} was built for another spec: {fields}: build the module with "
            f"spec=table.spec ({owner}.from_table) or open the table built for this spec")
    if table.compression != comp:
        raise SpecMismatchError(
            f"table at {path!r} was built with another compression (fingerprint "
            f"{table.compression.fingerprint!r}, module: {comp.fingerprint!r}): build the module with "
            f"comp=table.compression ({owner}.from_table) or open the table built for this tokenizer")
