"""Decode-step lookups: the cost of one step's rows (T_new = 1) with an NgramHistory, against the
bare work and against recomputing the whole context.

For B = 1, 8, 64 sequences, each with --context tokens so far, one step looks up the rows of one
new token per sequence, three ways, interleaved in one run on one thread (a "ram" table):

  history    table.lookup(new, layer, history=hist); "+append": then hist.append(new) as well
  bare       NgramHasher.hash_compressed of each sequence's last N compressed ids, then one
             torch.index_select of the new position's rows from the layer's rows in a tensor:
             the same rows with no argument checks, no history and no table
  recompute  table.lookup(all ids so far, layer)[:, -1:]: hashing and gathering the full context
  plain      table.lookup(new, layer) without a history: the table API's own cost per step (its
             rows are those of the token after padding, not the sequence's: for reference only)

Reported: the median microseconds per step of each and the ratios history/bare and
recompute/history; the three are checked to return the same rows first.

With --hf (transformers installed), also a B = 1 decode step of a tiny LlamaForCausalLM with two
Engram layers added by `add_engram`, against the same model without them and against the two
Engram layers stepped by engram's own loop: what the integration (hooks, the state in transformers'
cache) adds to the Engram part of a step. With --sharded, a B = 1 lookup + append step on the table
sharded over 2 gloo ranks against the whole table (see tools/decode_paths.py).

    python tools/bench_decode.py [--context 1024 --steps 400 --hf --sharded --json]
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import engram

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_paths import hf_step_costs, sharded_step_costs  # noqa: E402


def median_us(fn: Callable[[], object], steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


def measure(table: engram.Table, rows: torch.Tensor, B: int, context: int, steps: int, layer: int) -> dict:
    spec, comp = table.spec, table.compression
    hasher = engram.NgramHasher(spec, comp)
    N = spec.max_ngram_size
    offsets = np.asarray(spec.head_offsets(layer), np.int64)
    ids = np.random.default_rng(B).integers(0, comp.vocab_size, (B, context + 1))
    new = ids[:, -1:]
    hist = engram.NgramHistory(spec, comp, batch_size=B, max_rollback=16)
    hist.append(ids[:, :-1])
    step_hist = pickle.loads(pickle.dumps(hist))
    out = torch.empty(B, spec.heads_per_layer, spec.head_dim, dtype=rows.dtype)

    def history() -> torch.Tensor:
        return table.lookup(new, layer, history=hist)

    def appended() -> None:           # the history's width is fixed: every append costs the same
        table.lookup(new, layer, history=step_hist)
        step_hist.append(new)

    def bare() -> torch.Tensor:
        window = comp.lookup[ids[:, -N:]]                                   # [B, N] compressed
        heads = hasher.hash_compressed(window, layer)[:, -1]                # [B, H]
        idx = torch.from_numpy(heads + offsets).reshape(-1)                 # [B*H] global rows
        return torch.index_select(rows, 0, idx, out=out.view(-1, spec.head_dim))

    def recompute() -> torch.Tensor:
        return table.lookup(ids, layer)[:, -1:]

    def plain() -> torch.Tensor:
        return table.lookup(new, layer)

    expected = recompute()
    assert torch.equal(history(), expected) and torch.equal(bare().reshape(B, 1, -1), expected)
    ways = {"history": history, "history_and_append": appended, "bare": bare, "recompute": recompute,
            "plain": plain}
    us = {name: [] for name in ways}
    for _ in range(5):                        # rounds, interleaved, so load changes hit all alike
        for name, fn in ways.items():
            us[name].append(median_us(fn, max(10, steps // (5 * (1 + 7 * (name == "recompute"))))))
    result = {name: float(np.median(v)) for name, v in us.items()}
    result["history_over_bare"] = result["history"] / result["bare"]
    result["recompute_over_history"] = result["recompute"] / result["history"]
    result["history_over_plain"] = result["history"] / result["plain"]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=1024, help="tokens per sequence before the step")
    parser.add_argument("--steps", type=int, default=400, help="timed steps per way and batch size")
    parser.add_argument("--batches", default="1,8,64", help="batch sizes B")
    parser.add_argument("--hf", action="store_true", help="also the transformers path against engram's own loop")
    parser.add_argument("--sharded", action="store_true", help="also a step on 2 gloo ranks against the whole table")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    comp = engram.Compression.identity(32000)
    spec = engram.TableSpec(engram_vocab_size=(50_000, 50_000), max_ngram_size=3, n_head_per_ngram=8,
                            n_embed_per_ngram=512, layer_ids=(1,), compressed_vocab_size=comp.compressed_vocab_size)
    results: dict = {"context": args.context, "N": 3, "heads": spec.heads_per_layer, "D": spec.head_dim,
                     "threads": 1, "batches": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "decode.engram"
        engram.build_table(path, spec, comp, seed=0)
        with engram.open(path, tier="ram") as table:
            rows = table.rows(1, np.arange(spec.rows(1)))                   # the layer's rows, in a tensor
            for B in (int(b) for b in args.batches.split(",") if b):
                results["batches"][B] = measure(table, rows, B, args.context, args.steps, 1)
        if args.hf or args.sharded:
            small_comp = engram.Compression.identity(4096)         # a small model vocabulary: a cheap LM head
            two = spec.replace(engram_vocab_size=(5_000, 5_000), layer_ids=(1, 2), compressed_vocab_size=4096)
            engram.build_table(Path(tmp) / "two.engram", two, small_comp, seed=0).close()   # two Engram layers
            if args.hf:
                with engram.open(Path(tmp) / "two.engram", tier="ram") as small:
                    results["hf"] = hf_step_costs(small, min(args.context, 256), max(20, args.steps // 10))
            if args.sharded:
                results["sharded"] = sharded_step_costs(two, small_comp, max(20, args.steps // 5))
    if args.json:
        print(json.dumps(results, indent=2))
        return results
    print(f"decode step, T_new=1, context {args.context}, N=3, H={spec.heads_per_layer} heads of D={spec.head_dim}, "
          "float32 'ram' table, 1 thread; median us per step")
    print(f"{'B':>4} {'history':>9} {'+append':>9} {'bare':>9} {'plain':>9} {'recompute':>10} {'history/bare':>13} "
          f"{'history/plain':>14} {'recompute/history':>18}")
    for B, r in results["batches"].items():
        print(f"{B:>4} {r['history']:9.1f} {r['history_and_append']:9.1f} {r['bare']:9.1f} {r['plain']:9.1f} "
              f"{r['recompute']:10.1f} {r['history_over_bare']:12.2f}x {r['history_over_plain']:13.2f}x "
              f"{r['recompute_over_history']:17.1f}x")
    if "hf" in results:
        r = results["hf"]
        print(f"transformers, B=1, 2 Engram layers: a step {r['transformers_with_engram']:.0f} us with them "
              f"({r['engram_in_transformers']:.0f} us in add_engram's hooks), {r['transformers_without']:.0f} us "
              f"without; the same 2 layers in engram's own loop {r['engram_own_loop']:.0f} us: integration "
              f"overhead {r['integration_overhead']:+.0%}")
    if "sharded" in results:
        r = results["sharded"]
        print(f"sharded decode step (lookup + append, B=1): {r['sharded_2_ranks']:.0f} us on 2 ranks against "
              f"{r['unsharded']:.0f} us on the whole table ({r['sharded_over_unsharded']:.2f}x)")
    return results


if __name__ == "__main__":
    main()
