"""EngramMemoryV41: the Engram layer as DeepSeek-V4.1-Flash ships it (see the class docstring)."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from engram.addressing.compression import Compression
from engram.addressing.spec import TableSpec
from engram.args import is_real
from engram.errors import InputError, SpecMismatchError
from engram.layers.layer_inputs import check_layer_inputs
from engram.layers.memory import EngramMemoryBase
from engram.layers.module_cache import EngramCache, check_step, commit

__all__ = ["EngramMemoryV41", "v41_gate", "upgrade_state_dict", "LEGACY_NAMES"]

_GATE_FLOOR = 1e-6  # |s| is clamped to this before the square root
# State-dict names engram used before the release's names were public -> the release's.
LEGACY_NAMES = {"key_value_proj.weight": "wkv.weight", "key_value_proj.bias": "wkv.bias", "gate_weight": "q_weight"}


def v41_gate(h: torch.Tensor, k: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The V4.1 gate of hidden states and keys [..., G, C] with gate weights [G, C]: [..., G] in (0, 1).

    `s = <h * weight, k> * rsqrt(mean(h^2) + eps) * rsqrt(mean(k^2) + eps) / sqrt(C)`, then
    `sigmoid(copysign(sqrt(max(|s|, 1e-6)), s))` (copysign: s = +0 takes the positive branch, as
    DeepSeek's reference code does).
    """
    rstd = torch.rsqrt(h.square().mean(-1) + eps) * torch.rsqrt(k.square().mean(-1) + eps)   # [..., G]
    s = (h * weight * k).sum(-1) * rstd / math.sqrt(h.shape[-1])                             # [..., G]
    return torch.sigmoid(torch.copysign(s.abs().clamp_min(_GATE_FLOOR).sqrt(), s))          # [..., G]


def upgrade_state_dict(state_dict: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Rename a state dict saved with engram's earlier EngramMemoryV41 names to the release's, in place.

    `key_value_proj.weight` -> `wkv.weight`, `key_value_proj.bias` -> `wkv.bias` (load it into a
    module built with `bias=True`), `gate_weight` -> `q_weight`, and `k_weight` = ones (the earlier
    layer learned one gate vector; the release learns two whose product is what counts). Such a
    module gives the earlier outputs when built with `bias=True, eps=None` (eps was
    `torch.finfo(dtype).eps`). Dicts already in the release's names are returned unchanged.
    `load_state_dict` applies this itself.
    """
    old = prefix + "gate_weight"
    if old in state_dict and prefix + "k_weight" not in state_dict:
        state_dict[prefix + "k_weight"] = torch.ones_like(state_dict[old])
    for before, after in LEGACY_NAMES.items():
        if prefix + before in state_dict:
            state_dict[prefix + after] = state_dict.pop(prefix + before)
    return state_dict


class EngramMemoryV41(EngramMemoryBase):
    """One Engram layer as in DeepSeek-V4.1-Flash: one fused key/value projection, no ShortConv.

    Per branch g, with e [B,T,E] the position's rows (heads concatenated in hash order) and h
    [B,T,G,C] the hidden states:

        [k_0; ...; k_{G-1}; v] = wkv(e)              Linear(E -> (G+1)*C), no bias
        s_g = <h_g * q_weight_g * k_weight_g, k_g> * rsqrt(mean(h_g^2) + eps) * rsqrt(mean(k_g^2) + eps) / sqrt(C)
        output_g = sigmoid(copysign(sqrt(max(|s_g|, 1e-6)), s_g)) * v

    The output is the gated value itself (no ShortConv); add it to stream g of the residual. The
    first G*C outputs of wkv are the G keys ([g*C, (g+1)*C) is branch g's), the last C the value
    shared by the branches. The gate is computed in float32 (float64 modules: float64), as DeepSeek's
    reference code does, whatever the module's dtype.

    `q_weight` and `k_weight` meet only in their product (the reference's query and key norm
    weights); the release ships both, so both are parameters here. A reference layer
    (EngramMemory) maps onto this one with a zero ShortConv: wkv stacks the G key projections,
    then the value projection (biases: `bias=True`), q_weight = query norm weights, k_weight = key
    norm weights.

    Rows as in EngramMemoryBase: in the module (trainable) or read from a table; a quantized table
    (e.g. FP8 E4M3 rows with E8M0 scales, or a V4.1 checkpoint served in place) dequantizes in
    `table.lookup` to the module's dtype. `from_checkpoint` builds the released layer.

    State dict (DeepSeek-V4.1's names):
        rows          [spec.rows(layer_id), D]   in-module rows only
        wkv.weight    [(G+1)*C, E]               split as above
        wkv.bias      [(G+1)*C]                  only with bias=True
        q_weight      [G, C]
        k_weight      [G, C]
    State dicts saved with the earlier names (key_value_proj.*, gate_weight) load too: see
    `upgrade_state_dict`.

    Args:
        spec, comp, layer_id, hidden_size, hc_mult, table, init_std: as EngramMemoryBase.
        eps: added to the mean squares of the gate's norms (the config's rms_norm_eps; None: the
            machine epsilon of the hidden states' dtype, as earlier versions of this layer did).
        bias: give wkv a bias (the release has none; earlier versions of this layer had one).

    Example:
        >>> mem = EngramMemoryV41(spec, comp, layer_id=0, hidden_size=32, hc_mult=4)
        >>> mem(torch.randn(2, 5, 4, 32), torch.randint(0, 100, (2, 5))).shape   # [B, T, G, C]
        torch.Size([2, 5, 4, 32])
    """

    scale_names = ("q_weight", "k_weight")

    def __init__(self, spec: TableSpec, comp: Compression, *, layer_id: int, hidden_size: int,
                 hc_mult: int = 1, table: Any = None, init_std: float = 0.02, eps: float | None = 1e-6,
                 bias: bool = False) -> None:
        super().__init__(spec, comp, layer_id=layer_id, hidden_size=hidden_size, hc_mult=hc_mult,
                         table=table, init_std=init_std)
        if eps is not None and (not is_real(eps) or not eps > 0):
            raise InputError(f"eps={eps!r} is invalid: expected a float > 0 (the config's rms_norm_eps) or None")
        if not isinstance(bias, bool):
            raise InputError(f"bias={bias!r} is invalid: expected True or False (the release has no bias)")
        E, C, G = spec.embed_dim, self.hidden_size, self.hc_mult
        self.eps = None if eps is None else float(eps)
        self.wkv = nn.Linear(E, (G + 1) * C, bias=bias)       # G keys, then the value
        self.q_weight = nn.Parameter(torch.empty(G, C))
        self.k_weight = nn.Parameter(torch.empty(G, C))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Rows ~ N(0, init_std^2); wkv as nn.Linear; gate weights to one."""
        super().reset_parameters()
        self.wkv.reset_parameters()
        nn.init.ones_(self.q_weight)
        nn.init.ones_(self.k_weight)

    @property
    def _weight(self) -> torch.Tensor:
        return self.wkv.weight

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        upgrade_state_dict(state_dict, prefix)
        if prefix + "wkv.bias" in state_dict and self.wkv.bias is None:
            raise InputError(
                f"the state dict holds {prefix}wkv.bias (or key_value_proj.bias, saved by an earlier version) but "
                "this EngramMemoryV41 has no bias: build it with bias=True (and eps=None for the earlier outputs)")
        super()._load_from_state_dict(state_dict, prefix, *args)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | os.PathLike[str], layer_id: int, table: Any = None,
                        dtype: torch.dtype = torch.bfloat16) -> EngramMemoryV41:
        """The layer as released, from a DeepSeek-V4.1 checkpoint directory.

        Reads config.json (C = hidden_size, G = hc_mult, eps = rms_norm_eps, the spec),
        tokenizer.json, and the layer's wkv (FP8, dequantized from its 32x32 E8M0 blocks),
        q_weight and k_weight.

        Args:
            checkpoint_dir: the checkpoint directory (config.json, tokenizer.json, shards).
            layer_id: an Engram layer of the config (`engram_layer_ids`).
            table: where rows come from: an open Table of the same rows (e.g. `engram.open(
                checkpoint_dir, tier="direct")`, or an imported engram table); None opens the
                checkpoint's own rows in place with tier "mmap".
            dtype: the module's dtype.

        Raises:
            SpecMismatchError: `table` holds other rows than the checkpoint.
            CorruptTableError, MissingFileError: as `engram.open` on the directory.

        Example:
            >>> mem = EngramMemoryV41.from_checkpoint("DeepSeek-V4.1-Flash/", layer_id=1)   # doctest: +SKIP
            >>> branch = mem(hidden_states, token_ids)           # [B, T, 4, 5120]
        """
        from engram.addressing.hf_config import model_dims
        from engram.opening import open as open_table
        from engram.release.folder import is_release_dir, read_release
        from engram.release.v41_weights import read_layer_weights

        if table is None and is_release_dir(checkpoint_dir):
            table = open_table(checkpoint_dir, tier="mmap")      # rows in place; reads the release once
            release = table.release
        else:
            release = read_release(checkpoint_dir)
        layer_id = release.spec.check_layer(layer_id)
        C, G, eps = model_dims(release.config)
        weights = read_layer_weights(release, layer_id, C, G, dtype)
        if table is not None and (release.spec.row_fields_differ(table.spec)
                                  or table.compression != release.compression):
            raise SpecMismatchError(
                f"table={table!r} holds other rows than checkpoint {os.fspath(checkpoint_dir)!r} (differing: "
                f"{release.spec.row_fields_differ(table.spec) or ['compression']}): pass a table of this "
                "checkpoint's rows, or None")
        table = open_table(checkpoint_dir, tier="mmap") if table is None else table
        mem = cls(table.spec, table.compression, layer_id=layer_id, hidden_size=C, hc_mult=G, table=table, eps=eps)
        mem.to(dtype)
        mem.load_state_dict(weights)
        return mem

    def forward(self, hidden_states: torch.Tensor, token_ids: Any, *, cache: EngramCache | None = None,
                mask: Any = None, doc_start: Any = None) -> torch.Tensor:
        """The Engram branch for `hidden_states` [B,T,G,C] at positions holding `token_ids` [B,T].

        Arguments (`cache` from `new_cache`, `mask`, `doc_start`) and result as EngramMemory.forward: add the
        [B, T, G, C] result to the residual.
        """
        (B, T, G, C), prefetched = check_layer_inputs(self, hidden_states, token_ids)
        mask, starts = check_step(cache, mask, doc_start, B, T)       # [B, T] bool or None each
        e = self.gather_rows(token_ids, prefetched, hidden_states.device, cache, mask, starts)   # [B, T, E]
        kv = self.wkv(e).view(B, T, G + 1, C)                          # [B, T, G+1, C]: G keys, value
        k, v = kv[:, :, :G], kv[:, :, G]                               # [B, T, G, C], [B, T, C]
        acc = torch.promote_types(kv.dtype, torch.float32)             # the gate in float32 (float64 stays)
        eps = torch.finfo(hidden_states.dtype).eps if self.eps is None else self.eps
        weight = (self.q_weight * self.k_weight).to(acc)               # [G, C]
        gate = v41_gate(hidden_states.to(acc), k.to(acc), weight, eps)  # [B, T, G]
        commit(cache, token_ids, mask, None)                          # generation: append the ids
        return (gate.unsqueeze(-1) * v.unsqueeze(2).to(acc)).to(kv.dtype)   # [B, T, G, C]
