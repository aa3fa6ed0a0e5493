"""Memory-versus-compute experiments on the tiny language model (notebook 04).

Every variant trains on the same token stream for the same number of steps and is scored on the
same validation windows, so the only differences are the model's shape:

    corpus = load_corpus(max_chars=6_000_000)
    budget = Budget(steps=800)
    base = TinyLMConfig(vocab_size=corpus.vocab_size, n_embd=64, engram_layers=())
    dense = train_variant("dense", base, corpus, budget)
    wide = train_variant("wide FFN", widen_ffn(base, 1_000_000), corpus, budget)
    mem = train_variant("Engram", with_engram(base, 1_000_000), corpus, budget)

Training FLOPs are counted analytically (`train_flops`): 6 per token for every weight that takes
part in a matrix product (2 forward, 4 backward), plus the attention scores and mixing;
Engram rows are gathered, not multiplied, and count zero.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_data import TOKENIZER, random_batch, read_texts, split_tokens, stdlib_files  # noqa: E402
from tiny_lm import MoE, TinyLM, TinyLMConfig  # noqa: E402

import engram  # noqa: E402


@dataclasses.dataclass
class Corpus:
    train: np.ndarray                      # int64 training token stream
    val: np.ndarray                        # int64 held-out token stream (other files)
    comp: engram.Compression               # the tokenizer's compression, for Engram layers

    @property
    def vocab_size(self) -> int:
        return self.comp.vocab_size


def load_corpus(max_chars: int, val_fraction: float = 0.1, seed: int = 0) -> Corpus:
    """The Python standard library's sources, up to `max_chars`, split by file into train/val."""
    train, val = split_tokens(read_texts(stdlib_files(), max_chars, seed), val_fraction)
    return Corpus(train, val, engram.Compression.from_tokenizer_file(TOKENIZER))


@dataclasses.dataclass(frozen=True)
class Budget:
    """The training recipe every variant shares."""

    steps: int = 800                 # optimizer steps
    batch_size: int = 16             # sequences per step (of config.block_size tokens)
    lr: float = 2e-3                 # base learning rate (Engram rows: 5x, engram.param_groups)
    warmup: int = 40                 # linear warmup steps, then cosine decay to lr / 10
    weight_decay: float = 0.1        # AdamW decay of matrices (not of rows, norms, biases)
    aux_loss_coef: float = 0.01      # weight of the experts' load-balancing loss
    eval_batches: int = 40           # validation batches (fixed windows, the same for every run)
    seed: int = 0                    # seed of the weights and of the training batches

    def learning_rate(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


# -- sizing ------------------------------------------------------------------------------------

def ffn_hidden(config: TinyLMConfig) -> int:
    return config.ffn_hidden or 4 * config.n_embd


def mlp_params(config: TinyLMConfig, hidden: int) -> int:
    """Parameters of one MLP (or one expert) of `hidden` width: two matrices and two biases."""
    return 2 * config.n_embd * hidden + hidden + config.n_embd


def widen_ffn(config: TinyLMConfig, extra_params: int) -> TinyLMConfig:
    """`config` with every block's dense MLP widened so the model holds ~`extra_params` more."""
    per_unit = config.n_layer * (2 * config.n_embd + 1)      # one more hidden unit in every block
    return dataclasses.replace(config, ffn_hidden=ffn_hidden(config) + round(extra_params / per_unit))


def engram_overhead(config: TinyLMConfig) -> int:
    """Parameters an Engram layer adds besides its rows (key/value projections, norms, conv)."""
    E, C = (config.max_ngram_size - 1) * config.n_embed_per_ngram, config.n_embd
    return 2 * (E * C + C) + 2 * C + C + 4 * C


def engram_row_params(config: TinyLMConfig) -> int:
    """Values in the Engram tables of `config` (every layer, every head's prime-sized table)."""
    if not config.engram_layers:
        return 0
    spec = engram.TableSpec(
        engram_vocab_size=(config.engram_vocab_size,) * (config.max_ngram_size - 1),
        max_ngram_size=config.max_ngram_size, n_head_per_ngram=config.n_head_per_ngram,
        n_embed_per_ngram=config.n_embed_per_ngram, layer_ids=tuple(config.engram_layers),
        compressed_vocab_size=config.vocab_size)
    return spec.total_rows * spec.head_dim


def with_engram(config: TinyLMConfig, params: int, layers: tuple[int, ...] = (1,)) -> TinyLMConfig:
    """`config` with Engram at `layers`, sized so they add ~`params` in all (rows and projections).

    Every head of every order gets the same base size; its table is the next unused prime above
    it, so the base is corrected (a few rounds) for the primes' excess.
    """
    rows = params - len(layers) * engram_overhead(config)
    per_base = len(layers) * (config.max_ngram_size - 1) * config.n_embed_per_ngram   # H * D per layer
    if rows < per_base:
        raise ValueError(f"params={params:,} is too small for an Engram layer of this config "
                         f"(its projections alone take {engram_overhead(config):,})")
    best = dataclasses.replace(config, engram_layers=layers, engram_vocab_size=round(rows / per_base))
    base = best.engram_vocab_size
    for _ in range(3):
        base -= round((engram_row_params(dataclasses.replace(best, engram_vocab_size=base)) - rows) / per_base)
        candidate = dataclasses.replace(best, engram_vocab_size=max(1, base))
        if abs(engram_row_params(candidate) - rows) < abs(engram_row_params(best) - rows):
            best = candidate
    return best


def allocate(config: TinyLMConfig, sparse_params: int, engram_share: float, *, expert_hidden: int,
             top_k: int = 2, layers: tuple[int, ...] = (1,)) -> TinyLMConfig:
    """Split a budget of `sparse_params` between inactive experts and Engram layers.

    The model is a top-`top_k` mixture of experts of `expert_hidden` width in every block (so the
    active FFN width is top_k * expert_hidden whatever the split); `1 - engram_share` of the
    budget buys experts beyond the top_k active ones (whole experts in every block, rounded),
    and the rest, to the parameter, goes to Engram. The total count is then the same for every
    share, up to the prime rounding of the table sizes.
    """
    if not 0.0 <= engram_share <= 1.0:
        raise ValueError(f"engram_share={engram_share!r} must be in [0, 1]")
    moe = dataclasses.replace(config, ffn_hidden=expert_hidden, expert_top_k=top_k, engram_layers=())
    per_expert = config.n_layer * (mlp_params(config, expert_hidden) + config.n_embd)   # + its router column
    extra = round((1.0 - engram_share) * sparse_params / per_expert)
    moe = dataclasses.replace(moe, n_expert=top_k + extra)
    left = sparse_params - extra * per_expert
    return with_engram(moe, left, layers) if left > 0 and engram_share > 0 else moe


# -- counting ----------------------------------------------------------------------------------

def count_params(model: TinyLM) -> dict[str, int]:
    """Parameters by kind: "engram_rows" (the tables), "dense" (everything else, tied embedding
    once), "active" (the weights one token multiplies: every matrix, the output head included,
    experts weighted by top_k / n_expert; embedding lookups, norms, biases and rows left out)."""
    groups = engram.param_groups(model, lr=1.0)
    rows = sum(p.numel() for g in groups if g["name"] == "engram_rows" for p in g["params"])
    total = sum(p.numel() for g in groups for p in g["params"])
    return {"dense": total - rows, "engram_rows": rows, "active": round(_active_params(model))}


def _active_params(model: TinyLM) -> float:
    share = {id(m): 1.0 for m in model.modules()}
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        for m in moe.experts.modules():
            share[id(m)] = moe.top_k / len(moe.experts)
    n = 0.0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            n += share[id(m)] * m.weight.numel()
        elif type(m).__name__ == "ShortConv":            # depthwise: kernel taps per channel
            n += m.weight.numel()
    return n


def train_flops(config: TinyLMConfig, active_params: int, tokens: int) -> float:
    """6 * active params * tokens (matrix products: 2 forward, 4 backward), plus attention:
    6 * n_layer * block_size * n_embd per token (scores and mixing over the causal half of the
    window, forward and backward). Engram rows cost a gather, no multiply: zero."""
    return 6.0 * tokens * (active_params + config.n_layer * config.block_size * config.n_embd)


# -- training ----------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: TinyLM, tokens: np.ndarray, budget: Budget, block_size: int) -> float:
    """Mean cross-entropy over `budget.eval_batches` fixed windows of `tokens` (seed 1234, the same
    windows for every variant and seed)."""
    model.eval()
    rng = np.random.default_rng(1234)
    losses = [model(*random_batch(tokens, budget.batch_size, block_size, rng))[1].item()
              for _ in range(budget.eval_batches)]
    model.train()
    return float(np.mean(losses))


def train_step(model: TinyLM, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               aux_loss_coef: float) -> float:
    """One optimizer step on the language-model loss (plus the experts' balancing loss, if any);
    returns the language-model loss."""
    _, loss = model(x, y)
    total = loss + aux_loss_coef * model.aux_loss() if model.config.n_expert else loss
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return loss.item()


def train_variant(name: str, config: TinyLMConfig, corpus: Corpus, budget: Budget, *,
                  keep_model: bool = False) -> dict[str, Any]:
    """Train one variant from `budget.seed` and measure it.

    Returns a dict: name, seed, config (as a dict), params_dense, params_engram_rows,
    params_active, tokens, flops, val_loss, train_loss (mean of the last tenth of the steps),
    wall_s (training steps only), tokens_per_s, loss_curve (per step); and the trained model
    under "model" with `keep_model=True`.
    """
    torch.manual_seed(budget.seed)
    rng = np.random.default_rng(budget.seed)
    model = TinyLM(config, corpus.comp if config.engram_layers else None)
    groups = engram.param_groups(model, lr=budget.lr, weight_decay=budget.weight_decay)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    mults = [g["lr"] / budget.lr for g in optimizer.param_groups]
    curve, wall = [], 0.0
    for step in range(budget.steps):
        for group, mult in zip(optimizer.param_groups, mults, strict=True):
            group["lr"] = budget.learning_rate(step) * mult
        x, y = random_batch(corpus.train, budget.batch_size, config.block_size, rng)
        start = time.perf_counter()
        loss = train_step(model, optimizer, x, y, budget.aux_loss_coef)
        wall += time.perf_counter() - start
        curve.append(loss)
    params = count_params(model)
    tokens = budget.steps * budget.batch_size * config.block_size
    result = {
        "name": name, "seed": budget.seed, "config": dataclasses.asdict(config),
        "params_dense": params["dense"], "params_engram_rows": params["engram_rows"],
        "params_active": params["active"], "tokens": tokens,
        "flops": train_flops(config, params["active"], tokens),
        "val_loss": evaluate(model, corpus.val, budget, config.block_size),
        "train_loss": float(np.mean(curve[-max(1, budget.steps // 10):])),
        "wall_s": wall, "tokens_per_s": tokens / wall, "loss_curve": curve,
    }
    return {**result, "model": model} if keep_model else result


def throughput(configs: dict[str, TinyLMConfig], corpus: Corpus, budget: Budget, *, steps: int = 5,
               rounds: int = 3) -> dict[str, float]:
    """Training tokens/s of each config, measured round-robin (`rounds` x `steps` timed steps of
    each model in turn, after one untimed step) so background load hits every config alike;
    the median round counts. Fresh models: a trained router may load its experts less evenly."""
    models = {}
    for name, config in configs.items():
        torch.manual_seed(budget.seed)
        model = TinyLM(config, corpus.comp if config.engram_layers else None)
        optimizer = torch.optim.AdamW(engram.param_groups(model, lr=budget.lr, weight_decay=budget.weight_decay))
        models[name] = (model, optimizer, config)
    rng = np.random.default_rng(budget.seed)
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(rounds + 1):
        for name, (model, optimizer, config) in models.items():
            batches = [random_batch(corpus.train, budget.batch_size, config.block_size, rng)
                       for _ in range(steps if r else 1)]
            start = time.perf_counter()
            for x, y in batches:
                train_step(model, optimizer, x, y, budget.aux_loss_coef)
            if r:
                seconds[name].append(time.perf_counter() - start)
    return {name: steps * budget.batch_size * models[name][2].block_size / float(np.median(s))
            for name, s in seconds.items()}
