"""Decode steps through the other paths, for bench_decode.py: transformers' generate loop and sharded tables.

`hf_step_costs` times one B = 1 decode step of a tiny LlamaForCausalLM three ways in interleaved
rounds: with two Engram layers added by `add_engram` (hooks, the Engram state carried in
transformers' cache), the same model without them, and the two Engram layers stepped by engram's
own loop (`mem(h, token, cache=mem.new_cache(1))`, as tools/generate.py does). The Engram part of
the transformers step is `with - without`; what the integration adds is that minus engram's own.

`sharded_step_costs` times a B = 1 lookup + append step with an NgramHistory on a table sharded over
2 gloo ranks on this machine, against the same step on the whole table in the same process (rank 0).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import engram


def _median_us(fn: Callable[[], object], steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


def _time_hooks(model: Any, spent: list[float]) -> None:
    """Add to spent[0] the seconds each Engram hook of `model` takes: a pre-hook put first starts a
    clock, one put last (after add_engram's) stops it, on the decoder model and each Engram layer."""
    clock: dict[int, float] = {}

    def start(module: Any, args: Any) -> None:
        clock[id(module)] = time.perf_counter()

    def stop(module: Any, args: Any) -> None:
        spent[0] += time.perf_counter() - clock[id(module)]

    for module in (model.model, *(layer for layer in model.model.layers if hasattr(layer, "engram"))):
        module.register_forward_pre_hook(start, prepend=True)
        module.register_forward_pre_hook(stop)


def hf_step_costs(table: Any, context: int, steps: int, rounds: int = 5, hidden: int = 128) -> dict[str, float]:
    """Median microseconds of one decode step (B = 1) each way, and the integration's overhead (module doc).

    "engram_in_transformers" is the time spent in add_engram's hooks during a step (timed by hooks
    around them); "engram_part_of_transformers_step" the difference of the model's step with and
    without the Engram layers (noisier: a difference of two larger numbers).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from engram.integrations.transformers import add_engram

    spec, comp = table.spec, table.compression
    config = LlamaConfig(vocab_size=comp.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=len(spec.layer_ids), num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=context + steps + 8)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config).eval()
    with_engram = LlamaForCausalLM(config).eval()
    with_engram.load_state_dict(plain.state_dict())
    add_engram(with_engram, table, at_layers=tuple(range(len(spec.layer_ids))))
    spent = [0.0]
    _time_hooks(with_engram, spent)
    mems = [layer.engram for layer in with_engram.model.layers]
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, comp.vocab_size, (1, context + steps + 1)))
    us: dict[str, list[float]] = {"transformers_with_engram": [], "transformers_without": [],
                                  "engram_in_transformers": [], "engram_own_loop": []}

    def model_steps(model: Any) -> tuple[float, float]:
        out = model(ids[:, :context], use_cache=True)
        kwarg = "cache" if getattr(out, "cache", None) is not None else "past_key_values"
        cache = getattr(out, kwarg)
        step_us, hook_us = [], []
        for p in range(context, context + steps):
            spent[0] = 0.0
            start = time.perf_counter()
            model(ids[:, p: p + 1], use_cache=True, **{kwarg: cache})
            step_us.append(time.perf_counter() - start)
            hook_us.append(spent[0])
        return float(np.median(step_us)) * 1e6, float(np.median(hook_us)) * 1e6

    def own_steps() -> float:
        caches = [mem.new_cache(batch_size=1) for mem in mems]
        for mem, cache in zip(mems, caches, strict=True):                 # prefill
            mem(torch.randn(1, context, 1, hidden), ids[:, :context], cache=cache)
        x = torch.randn(1, 1, hidden)
        pos = iter(range(context, context + steps))

        def step() -> torch.Tensor:
            p, y = next(pos), x
            for mem, cache in zip(mems, caches, strict=True):
                y = y + mem(y.unsqueeze(2), ids[:, p: p + 1], cache=cache).squeeze(2)
            return y
        return _median_us(step, steps)

    with torch.no_grad():
        for _ in range(rounds):                     # interleaved, so load changes hit every way alike
            step_us, hook_us = model_steps(with_engram)
            us["transformers_with_engram"].append(step_us)
            us["engram_in_transformers"].append(hook_us)
            us["transformers_without"].append(model_steps(plain)[0])
            us["engram_own_loop"].append(own_steps())
    r = {name: float(np.median(v)) for name, v in us.items()}
    r["engram_part_of_transformers_step"] = r["transformers_with_engram"] - r["transformers_without"]
    r["integration_overhead"] = r["engram_in_transformers"] / r["engram_own_loop"] - 1
    return r


def _rank(rank: int, port: int, root: str, layer: int, steps: int, rounds: int) -> None:
    import torch.distributed as dist

    from engram.distributed import ShardedTable
    from engram.making.sharding import shard_path

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    whole = engram.open(Path(root) / "t.engram", tier="ram")
    st = ShardedTable(shard_path(Path(root) / "t.engram", rank, 2), tier="ram")
    spec, comp = whole.spec, whole.compression
    ids = np.random.default_rng(rank).integers(0, comp.vocab_size, (1, 1024 + steps * rounds))
    tables = {"sharded_2_ranks": st, "unsharded": whole}
    us: dict[str, list[float]] = {name: [] for name in tables}
    hists, pos = {}, dict.fromkeys(tables, 1024)
    for name in tables:
        hists[name] = engram.NgramHistory(spec, comp, batch_size=1)
        hists[name].append(ids[:, :1024])                                      # 1024 tokens of context

    def step(name: str) -> None:
        p = pos[name]
        tables[name].lookup(ids[:, p: p + 1], layer, history=hists[name])
        hists[name].append(ids[:, p: p + 1])
        pos[name] = p + 1

    for _ in range(rounds):
        us["sharded_2_ranks"].append(_median_us(lambda: step("sharded_2_ranks"), steps))
        if rank == 0:                             # rank 1 waits in the next sharded step meanwhile
            us["unsharded"].append(_median_us(lambda: step("unsharded"), steps))
    if rank == 0:
        Path(root, "sharded.json").write_text(json.dumps({k: float(np.median(v)) for k, v in us.items()}))
    st.close()
    dist.destroy_process_group()


def sharded_step_costs(spec: engram.TableSpec, comp: engram.Compression, steps: int,
                       rounds: int = 5) -> dict[str, float]:
    """Median microseconds of a B = 1 decode step (lookup + append) on 2 ranks and on the whole table."""
    import socket

    import torch.multiprocessing as mp

    from engram.making.sharding import shard_table

    with tempfile.TemporaryDirectory() as tmp:
        table = engram.build_table(Path(tmp) / "t.engram", spec, comp, seed=0)
        shard_table(table, Path(tmp) / "t.engram", 2)
        table.close()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_rank, args=(port, tmp, spec.layer_ids[0], steps, rounds), nprocs=2, start_method="spawn")
        r = json.loads(Path(tmp, "sharded.json").read_text())
    r["sharded_over_unsharded"] = r["sharded_2_ranks"] / r["unsharded"]
    return r
