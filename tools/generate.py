"""Greedy generation with the tiny LM, token by token: a KV cache for attention and an
EngramCache per Engram layer, checked against recomputing the whole sequence every step.

    python tools/generate.py --prompt "def main(" --tokens 24
    python tools/generate.py --hf        # the same through Hugging Face transformers' generate()

Each step feeds only the newest token: attention reads the cached keys and values, each Engram
layer hashes the token against its cache's n-gram history and continues its ShortConv from the
cached inputs. With `prefetch=True` (table-backed models) each step's rows are fetched from the
table in the background as soon as its token is chosen, before the step's first block. The
weights are untrained (the text is noise): what the tool shows is that every way chooses the
same tokens (in-module rows; the same rows read from a table with prefetch; recomputing the whole
sequence each step) and what a token costs each way.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_data import TOKENIZER  # noqa: E402
from tiny_lm import Block, TinyLM, TinyLMConfig  # noqa: E402

import engram  # noqa: E402
from engram.layers.module_cache import EngramCache  # noqa: E402


class StepCache:
    """What the model keeps between steps: keys and values per block, one EngramCache per
    Engram block, and the positions so far."""

    def __init__(self, model: TinyLM, batch_size: int) -> None:
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(model.blocks)
        self.engram: dict[int, EngramCache] = {
            i: block.engram.new_cache(batch_size=batch_size)
            for i, block in enumerate(model.blocks) if block.engram is not None}
        self.length = 0


def attend(block: Block, x: torch.Tensor, cache: StepCache, i: int) -> torch.Tensor:
    """Causal self-attention of new positions x [B, T, C] over the cached ones and themselves."""
    attn = block.attn
    B, T, C = x.shape
    q, k, v = attn.qkv(x).split(C, dim=2)                                        # 3 x [B, T, C]
    q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))
    past = cache.kv[i]
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)    # [B, nh, P+T, hs]
    cache.kv[i] = (k, v)
    P = k.shape[2] - T
    allowed = torch.arange(T)[:, None] + P >= torch.arange(P + T)[None, :]       # [T, P+T] causal
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.to(q.device))  # [B, nh, T, hs]
    return attn.proj(y.transpose(1, 2).reshape(B, T, C))                         # [B, T, C]


@torch.no_grad()
def step(model: TinyLM, ids: torch.Tensor, cache: StepCache, prefetched: dict[int, Any] | None = None) -> torch.Tensor:
    """Logits [B, T, V] of new positions `ids` [B, T] that continue the cached sequences."""
    B, T = ids.shape
    pos = torch.arange(cache.length, cache.length + T, device=ids.device)
    x = model.tok_emb(ids) + model.pos_emb(pos)                                   # [B, T, C]
    for i, block in enumerate(model.blocks):
        if block.engram is not None:
            source = ids if prefetched is None else prefetched[i]                # ids, or a Prefetch handle
            x = x + block.engram(x.unsqueeze(2), source, cache=cache.engram[i]).squeeze(2)
        x = x + attend(block, block.ln1(x), cache, i)
        x = x + block.mlp(block.ln2(x))
    cache.length += T
    return model.head(model.ln_f(x))                                             # [B, T, V]


def prefetch_next(model: TinyLM, ids: torch.Tensor, cache: StepCache) -> dict[int, Any]:
    """Start the table lookups of the next step's ids, one per Engram block, against its history."""
    handles = {}
    for i, block in enumerate(model.blocks):
        mem = block.engram
        if mem is not None:
            handles[i] = mem.table.prefetch(ids, layer_ids=mem.layer_id, history=cache.engram[i].history)
    return handles


@torch.no_grad()
def generate(model: TinyLM, prompt: torch.Tensor, n_tokens: int, prefetch: bool = False) -> torch.Tensor:
    """Greedy continuation of `prompt` [B, T0] by `n_tokens`, one cached step per token: [B, T0+n]."""
    cache = StepCache(model, prompt.shape[0])
    ids, logits = prompt, step(model, prompt, cache)                             # prefill
    for _ in range(n_tokens):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)                       # [B, 1]
        ids = torch.cat([ids, token], dim=1)
        if len(ids[0]) == prompt.shape[1] + n_tokens:
            break
        handles = prefetch_next(model, token, cache) if prefetch else None       # before the first block
        logits = step(model, token, cache, handles)
    return ids


@torch.no_grad()
def generate_by_recompute(model: TinyLM, prompt: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """The same greedy continuation, running the whole sequence through the model every step."""
    ids = prompt
    for _ in range(n_tokens):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return ids


def table_backed(model: TinyLM, comp: engram.Compression, path: Path) -> TinyLM:
    """The same model with its Engram rows written to a table at `path` and read from there."""
    mems = model.engram_modules()
    engram.build_table(path, mems[0].spec, comp, weights={m.layer_id: m.export_rows() for m in mems})
    twin = TinyLM(model.config, comp, table=engram.open(path, tier="ram")).eval()
    twin.load_state_dict(model.state_dict(), strict=False)        # every weight but the rows
    return twin


def generate_hf(prompt: torch.Tensor, comp: engram.Compression, n: int, layers: tuple[int, ...]) -> dict[str, Any]:
    """Greedy and 3-beam generate() of a tiny LlamaForCausalLM with Engram layers, with and without a cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engram.integrations.transformers import add_engram

    spec = engram.TableSpec(engram_vocab_size=(5000, 5000), max_ngram_size=3, n_head_per_ngram=4,
                            n_embed_per_ngram=128, layer_ids=layers, compressed_vocab_size=comp.compressed_vocab_size)
    config = LlamaConfig(vocab_size=comp.vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=None)
    model = add_engram(LlamaForCausalLM(config).eval(), spec=spec, compression=comp, at_layers=layers)
    for layer in model.model.layers:
        if hasattr(layer, "engram"):                 # a fresh ShortConv is zero: give it weights to carry state
            torch.nn.init.normal_(layer.engram.short_conv.weight, std=0.2)
    timings, outs = {}, {}
    for beams in (1, 3):
        for use_cache in (True, False):
            name = f"{'greedy' if beams == 1 else '3 beams'}, {'cached' if use_cache else 'full recompute'}"
            start = time.perf_counter()
            with torch.no_grad():
                outs[name] = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                            num_beams=beams, do_sample=False, use_cache=use_cache)
            timings[name] = time.perf_counter() - start
    same = all(torch.equal(outs[f"{w}, cached"], outs[f"{w}, full recompute"]) for w in ("greedy", "3 beams"))
    print(f"transformers generate(), {n} tokens, Engram layers before decoder layers {list(layers)}: "
          + "; ".join(f"{k}: {s / n * 1e3:.2f} ms/token" for k, s in timings.items()) + f"; same tokens: {same}")
    return {"same": same, "tokens": outs["greedy, cached"][0].tolist(), **timings}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--prompt", default="def main(argv):\n    ", help="text to continue")
    parser.add_argument("--tokens", type=int, default=24, help="tokens to generate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the (untrained) weights")
    parser.add_argument("--engram-layers", default="1,3", help="blocks with an Engram layer")
    parser.add_argument("--hf", action="store_true", help="a transformers LlamaForCausalLM with add_engram instead")
    args = parser.parse_args(argv)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    comp = engram.Compression.from_tokenizer_file(TOKENIZER)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    config = TinyLMConfig(engram_layers=tuple(int(i) for i in args.engram_layers.split(",") if i))
    model = TinyLM(config, comp).eval()
    for mem in model.engram_modules():          # a fresh ShortConv is zero: give it weights to carry state
        torch.nn.init.normal_(mem.short_conv.weight, std=0.2)
    prompt = torch.tensor([tokenizer.encode(args.prompt).ids])
    if args.hf:
        return generate_hf(prompt, comp, args.tokens, config.engram_layers)
    n = min(args.tokens, config.block_size - prompt.shape[1])
    with tempfile.TemporaryDirectory() as tmp:
        backed = table_backed(model, comp, Path(tmp) / "rows.engram")
        ways = {"cached": lambda k: generate(model, prompt, k),
                "cached, rows prefetched from a table": lambda k: generate(backed, prompt, k, prefetch=True),
                "full recompute": lambda k: generate_by_recompute(model, prompt, k)}
        timings = {}
        for name, fn in ways.items():
            fn(2)                                                                # warm up
            start = time.perf_counter()
            out = fn(n)
            timings[name] = (time.perf_counter() - start, out)
        for mem in backed.engram_modules():
            mem.table.close()
    cached = timings["cached"][1]
    same = all(torch.equal(out, cached) for _, out in timings.values())
    text = tokenizer.decode(cached[0, prompt.shape[1]:].tolist())
    print(f"prompt {args.prompt!r} ({prompt.shape[1]} tokens) + {n} generated (untrained weights): {text!r}")
    costs = "; ".join(f"{name}: {s / n * 1e3:.2f} ms/token" for name, (s, _) in timings.items())
    print(f"{costs}; same tokens: {same}")
    return {"same": same, "tokens": cached[0].tolist(), **{name: s for name, (s, _) in timings.items()}}


if __name__ == "__main__":
    main()
