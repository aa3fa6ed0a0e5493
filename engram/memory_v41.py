"""EngramMemoryV41: the Engram layer as DeepSeek-V4.1-Flash ships it (see the class docstring)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .compression import Compression
from .memory import EngramMemoryBase, signed_sqrt_gate
from .module_cache import EngramCache, check_step, commit
from .spec import TableSpec

__all__ = ["EngramMemoryV41"]


class EngramMemoryV41(EngramMemoryBase):
    """One Engram layer as in DeepSeek-V4.1-Flash: one fused key/value projection, no ShortConv.

    Per branch g, with e [B,T,E] the position's rows and h [B,T,G,C] the hidden states:

        [k_0; ...; k_{G-1}; v] = W_KV e + b_KV      one Linear(E -> (G+1)*C)
        q_g = w_g * rms(h_g),   s_g = <q_g, rms(k_g)> / sqrt(C)
        output_g = sigmoid(sign(s_g) * sqrt(max(|s_g|, 1e-6))) * v

    The output is the gated value itself (no ShortConv); add it to the residual stream.

    Split of the fused projection's (G+1)*C output features: [g*C, (g+1)*C) is branch g's key
    for g < G, and the last C, [G*C, (G+1)*C), are the value shared by the branches.

    Gate weights: `rms(x) = x / sqrt(mean(x^2) + eps)` has no weight (eps = torch.finfo(dtype).eps,
    nn.RMSNorm's default). The reference scales the normalized key and the normalized query each
    by a learned vector (its norm1 and norm2 weights); the two meet only in the dot product s, so
    only their elementwise product matters. This layer learns that product directly: one vector
    w_g of C weights per branch (`gate_weight` [G, C], starting at one), applied to the query.
    A reference layer maps onto this one exactly: W_KV stacks the G key projections, then the
    value projection, and w_g = norm1.{g}.weight * norm2.{g}.weight; with a zero ShortConv (as a
    fresh reference layer has) both give the same output.

    Rows as in EngramMemoryBase: in the module (trainable) or read from a table; a quantized table
    (e.g. FP8 E4M3 rows with E8M0 scales) dequantizes in `table.lookup` to the module's dtype.

    State dict (engram's own names: DeepSeek's names for V4.1 weights are not public):
        rows                   [spec.rows(layer_id), D]   in-module rows only
        key_value_proj.weight  [(G+1)*C, E]               split as above
        key_value_proj.bias    [(G+1)*C]
        gate_weight            [G, C]

    Args:
        spec, comp, layer_id, hidden_size, hc_mult, table, init_std: as EngramMemoryBase.

    Example:
        >>> mem = EngramMemoryV41(spec, comp, layer_id=0, hidden_size=32, hc_mult=4)
        >>> mem(torch.randn(2, 5, 4, 32), torch.randint(0, 100, (2, 5))).shape   # [B, T, G, C]
        torch.Size([2, 5, 4, 32])
    """

    scale_names = ("gate_weight",)

    def __init__(self, spec: TableSpec, comp: Compression, *, layer_id: int, hidden_size: int,
                 hc_mult: int = 1, table: Any = None, init_std: float = 0.02) -> None:
        super().__init__(spec, comp, layer_id=layer_id, hidden_size=hidden_size, hc_mult=hc_mult,
                         table=table, init_std=init_std)
        E, C, G = spec.embed_dim, self.hidden_size, self.hc_mult
        self.key_value_proj = nn.Linear(E, (G + 1) * C)      # G keys, then the value
        self.gate_weight = nn.Parameter(torch.empty(G, C))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Rows ~ N(0, init_std^2); the projection as nn.Linear; gate weights to one."""
        super().reset_parameters()
        self.key_value_proj.reset_parameters()
        nn.init.ones_(self.gate_weight)

    @property
    def _weight(self) -> torch.Tensor:
        return self.key_value_proj.weight

    def forward(self, hidden_states: torch.Tensor, token_ids: Any, *, cache: EngramCache | None = None,
                mask: Any = None, doc_start: Any = None) -> torch.Tensor:
        """The Engram branch for `hidden_states` [B,T,G,C] at positions holding `token_ids` [B,T].

        Arguments (`cache` from `new_cache`, `mask`, `doc_start`) and result as EngramMemory.forward: add the
        [B, T, G, C] result to the residual.
        """
        B, T, G, C = self._check_inputs(hidden_states, token_ids)
        mask, starts = check_step(cache, mask, doc_start, B, T)       # [B, T] bool or None each
        e = self.lookup(token_ids, device=hidden_states.device, cache=cache, mask=mask, doc_start=starts)   # [B,T,E]
        kv = self.key_value_proj(e).view(B, T, G + 1, C)               # [B, T, G+1, C]: G keys, value
        k, v = F.rms_norm(kv[:, :, :G], (C,)), kv[:, :, G]             # [B, T, G, C], [B, T, C]
        q = F.rms_norm(hidden_states, (C,)) * self.gate_weight         # [B, T, G, C]
        gate = signed_sqrt_gate(q, k)                                  # [B, T, G]
        commit(cache, token_ids, mask, None)                          # generation: append the ids
        return gate.unsqueeze(-1) * v.unsqueeze(2)                     # [B, T, G, C]
