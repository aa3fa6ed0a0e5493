"""A small causal transformer with Engram layers, for the example trainer and the notebooks.

Pre-norm blocks (attention + MLP, GPT-2 style); the MLP can be given another width
(`ffn_hidden`) or replaced by a top-k mixture of experts (`n_expert`). At the blocks listed in
`engram_layers` an EngramMemory adds its branch to the residual stream before attention, as the reference
TransformerBlock does; the model is dense (hc_mult=1), so the hidden states enter Engram as
[B, T, 1, C].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import engram
from engram.layers.memory import EngramMemory


@dataclasses.dataclass
class TinyLMConfig:
    vocab_size: int = 4000                 # raw token ids of the tokenizer
    block_size: int = 128                  # longest sequence (learned positions)
    n_layer: int = 4                       # transformer blocks
    n_head: int = 4                        # attention heads
    n_embd: int = 128                      # C, the model width
    engram_layers: tuple[int, ...] = (1,)  # blocks that carry an EngramMemory (may be empty)
    engram_vocab_size: int = 20_000        # base table size per head, for every n-gram order
    max_ngram_size: int = 3                # N: orders 2..N
    n_head_per_ngram: int = 4              # K: hash heads per order
    n_embed_per_ngram: int = 64            # K*D: row width summed over one order's heads
    engram_seed: int = 0                   # hash seed of the spec
    ffn_hidden: int = 0                    # hidden width of the MLP, or of each expert (0: 4 * n_embd)
    n_expert: int = 0                      # 0: dense MLP; else a top-k mixture of n_expert MLPs per block
    expert_top_k: int = 2                  # experts each token is routed to (with n_expert > 0)


def engram_spec(config: TinyLMConfig, comp: engram.Compression) -> engram.TableSpec | None:
    """The TableSpec of the model's Engram layers (None when it has none)."""
    if not config.engram_layers:
        return None
    return engram.TableSpec(
        engram_vocab_size=(config.engram_vocab_size,) * (config.max_ngram_size - 1),
        max_ngram_size=config.max_ngram_size, n_head_per_ngram=config.n_head_per_ngram,
        n_embed_per_ngram=config.n_embed_per_ngram, layer_ids=tuple(config.engram_layers),
        seed=config.engram_seed, compressed_vocab_size=comp.compressed_vocab_size)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)                                # 3 x [B, T, C]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)         # [B, nh, T, hs]
        return self.proj(y.transpose(1, 2).reshape(B, T, C))                # [B, T, C]


class MLP(nn.Module):
    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        hidden = config.ffn_hidden or 4 * config.n_embd
        self.fc = nn.Linear(config.n_embd, hidden)
        self.proj = nn.Linear(hidden, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class MoE(nn.Module):
    """Top-k mixture of `n_expert` MLPs: a linear router picks k experts per token and their
    outputs are summed with the renormalized router probabilities as weights.

    After each forward, `aux_loss` holds the Switch Transformer load-balancing loss
    `n_expert * sum_e f_e * P_e` (f_e: share of routed slots sent to expert e, P_e: mean router
    probability of e); it is 1 for a perfectly even load. Add a small multiple of it to the
    training loss (TinyLM.aux_loss) to keep the experts in use.
    """

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        if not 1 <= config.expert_top_k <= config.n_expert:
            raise ValueError(f"expert_top_k={config.expert_top_k} must be in 1..n_expert={config.n_expert}")
        self.top_k = config.expert_top_k
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList([MLP(config) for _ in range(config.n_expert)])
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        E, k = len(self.experts), self.top_k
        flat = x.reshape(B * T, C)                                          # [BT, C]
        probs = self.router(flat).softmax(dim=-1)                           # [BT, E]
        weight, chosen = probs.topk(k, dim=-1)                              # [BT, k] each
        weight = weight / weight.sum(dim=-1, keepdim=True)
        # Dispatch: group the BT*k routed slots by expert, pad every group to the largest, and
        # run all experts as one batched matrix product (no Python loop over experts).
        slots = chosen.flatten()                                            # [BTk] expert per slot
        order = slots.argsort(stable=True)                                  # [BTk] slots by expert
        expert = slots[order]
        counts = torch.bincount(slots, minlength=E)                         # [E]
        place = torch.arange(slots.numel(), device=x.device) - (counts.cumsum(0) - counts)[expert]
        token = order // k                                                  # [BTk] token of each slot
        grouped = flat.new_zeros(E, int(counts.max()), C)                   # [E, cap, C]
        grouped[expert, place] = flat[token]
        w1 = torch.stack([e.fc.weight for e in self.experts]).transpose(1, 2)     # [E, C, H]
        b1 = torch.stack([e.fc.bias for e in self.experts]).unsqueeze(1)           # [E, 1, H]
        w2 = torch.stack([e.proj.weight for e in self.experts]).transpose(1, 2)   # [E, H, C]
        b2 = torch.stack([e.proj.bias for e in self.experts]).unsqueeze(1)         # [E, 1, C]
        y = torch.baddbmm(b2, F.gelu(torch.baddbmm(b1, grouped, w1)), w2)         # [E, cap, C]
        y = y[expert, place] * weight.flatten()[order, None]                # [BTk, C]
        out = flat.new_zeros(B * T, C).index_add_(0, token, y)              # [BT, C]
        load = counts.to(probs.dtype) / slots.numel()                       # [E] share of slots
        self.aux_loss = E * (load * probs.mean(dim=0)).sum()
        return out.view(B, T, C)


class Block(nn.Module):
    def __init__(self, config: TinyLMConfig, memory: EngramMemory | None = None) -> None:
        super().__init__()
        self.engram = memory
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = MoE(config) if config.n_expert else MLP(config)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.engram is not None:
            x = x + self.engram(x.unsqueeze(2), ids).squeeze(2)   # [B, T, 1, C] -> [B, T, C]
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """GPT-style language model; blocks in `config.engram_layers` carry an EngramMemory.

    Args:
        config: sizes and Engram placement.
        comp: the tokenizer's compression (needed when the model has Engram layers).
        table: an open engram table to read rows from instead of training them in the model.

    Example:
        >>> model = TinyLM(TinyLMConfig(), comp)
        >>> logits, loss = model(ids, targets)
    """

    def __init__(self, config: TinyLMConfig, comp: engram.Compression | None = None,
                 table: Any = None) -> None:
        super().__init__()
        self.config = config
        spec = engram_spec(config, comp) if comp is not None else None
        if config.engram_layers and spec is None:
            raise ValueError("TinyLM with engram_layers needs comp=engram.Compression(...)")
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight           # tied input and output embeddings
        self._init_weights()
        for layer_id in config.engram_layers:             # Engram keeps its own initialization
            self.blocks[layer_id].engram = EngramMemory(
                spec, comp, layer_id=layer_id, hidden_size=config.n_embd, hc_mult=1, table=table)

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.ndim >= 2:   # residual output projections scaled down as in GPT-2
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def engram_modules(self) -> list[EngramMemory]:
        return [m for m in self.modules() if isinstance(m, EngramMemory)]

    def aux_loss(self) -> torch.Tensor:
        """The summed load-balancing losses of the mixture-of-experts blocks in the last forward
        (zero for a dense model)."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoE)]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = ids.shape
        pos = torch.arange(T, device=ids.device)
        x = self.tok_emb(ids) + self.pos_emb(pos)                          # [B, T, C]
        for block in self.blocks:
            x = block(x, ids)                                              # [B, T, C]
        logits = self.head(self.ln_f(x))                                   # [B, T, V]
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())
