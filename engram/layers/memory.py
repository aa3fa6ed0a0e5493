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
(see engram.layers.memory_v41).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from torch import nn

from engram.addressing.compression import Compression
from engram.addressing.hashing import NgramHasher
from engram.addressing.spec import TableSpec
from engram.args import check_int, check_real
from engram.errors import InputError
from engram.layers.layer_inputs import check_layer_inputs, check_table, prefetched_rows, table_path
from engram.layers.module_cache import EngramCache, check_prefetch_context, check_step, commit, new_cache
from engram.layers.norm import BranchRMSNorm
from engram.layers.reference import load_reference_state_dict, reference_state_dict
from engram.layers.shortconv import ShortConv
from engram.serving.prefetch import Prefetch
from engram.tensors import to_numpy_ids

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
            check_table(table, spec, comp, type(self).__name__)
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
    def compute_dtype(self) -> torch.dtype:
        """The dtype the module computes in (its projection weight's): rows and hidden states arrive in it."""
        return self._weight.dtype

    @property
    def compute_device(self) -> torch.device:
        """The device the module's parameters are on."""
        return self._weight.device

    @property
    def embed_dim(self) -> int:
        """E: width of one position's concatenated rows."""
        return self.spec.embed_dim

    def new_cache(self, batch_size: int, max_rollback: int = 16) -> EngramCache:
        """An empty generation cache of `batch_size` sequences for forward(..., cache=).

        See engram.layers.module_cache.
        """
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
        rows = prefetched_rows(self, token_ids) if isinstance(token_ids, Prefetch) else None
        return self.gather_rows(token_ids, rows, self.compute_device if device is None else device,
                                cache, mask, doc_start)

    def gather_rows(self, token_ids: Any, prefetched: torch.Tensor | None, device: torch.device | str,
              cache: EngramCache | None, mask: Any, doc_start: Any) -> torch.Tensor:
        """lookup without its argument checks, as forward calls it: `prefetched` holds a handle's rows, else None."""
        dtype = self.compute_dtype
        history = None if cache is None else cache.history
        if prefetched is not None:
            check_prefetch_context(token_ids, history, mask, type(self).__name__)
            return prefetched.to(device=device, dtype=dtype)
        context = {k: v for k, v in (("history", history), ("mask", mask), ("doc_start", doc_start)) if v is not None}
        if self.table is not None:
            return self.table.lookup(token_ids, self.layer_id, dtype=dtype, **context).to(device)
        assert self.rows is not None, "a module without a table holds its rows"
        idx = self.hasher.global_rows(to_numpy_ids(token_ids), self.layer_id, **context)   # [B, T, H] rows of `rows`
        idx = torch.from_numpy(idx).to(self.rows.device)
        return F.embedding(idx, self.rows).flatten(2).to(device=device, dtype=dtype)   # [B, T, H*D]

    def export_rows(self) -> torch.Tensor:
        """A CPU copy of the trained rows [spec.rows(layer_id), D], ready for build_table.

        Example:
            >>> engram.build_table(path, mem.spec, mem.comp, weights={mem.layer_id: mem.export_rows()})
        """
        if self.rows is None:
            raise InputError(
                f"this {type(self).__name__} reads its rows from the table at {table_path(self.table)!r}: "
                "there are no in-module rows to export; copy the table instead")
        return self.rows.detach().to("cpu", copy=True)

    def extra_repr(self) -> str:
        rows = f"table={table_path(self.table)!r}" if self.table is not None else (
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
        (B, T, G, C), prefetched = check_layer_inputs(self, hidden_states, token_ids)
        mask, starts = check_step(cache, mask, doc_start, B, T)       # [B, T] bool or None each
        e = self.gather_rows(token_ids, prefetched, hidden_states.device, cache, mask, starts)   # [B, T, E]
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
        load_reference_state_dict(self, state_dict)

    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """This module's weights under the reference's names (detached CPU copies)."""
        return reference_state_dict(self)


def _positive_int(name: str, value: Any) -> int:
    check_int(name, value, 1)
    return int(value)
