"""Decode-step lookups per tier: the compiled path of small lookups against a bare compiled kernel
and against the batched path, and how much of a 2-layer decode step prefetch leaves exposed.

One float32 table (N=3, 16 heads of D=64, layers 1 and 14), each tier in turn ("ram", "mmap",
"direct"; "direct" reads with O_DIRECT, so every row comes from the disk: it is the cold case). All
in one run on one thread, interleaved rounds, medians of per-call times:

  latency (per layer lookup, T_new = 1, B = 1, 8, 64, 1024 tokens of context in the history)
    compiled   table.lookup(new, 1, history=hist) (the compiled path of small lookups)
    batched    the same lookup on the batched path (engram.serving.decode_step.SMALL_LOOKUP_TOKENS = 0)
    bare       a numba kernel given the n-gram's compressed ids that hashes each token and copies its
               16 rows from the "ram" tier's memory of the layer into a preallocated output: the
               arithmetic and the copies of the step, with no history, checks or table
  ratios compiled/bare and batched/compiled; the three are checked to return the same rows first.

  exposed share (--prefetch): a 2-layer decode step as DeepSeek-V4.1 places Engram (layers 1 and 14 of
  a model stood in for by `--blocks` matmuls of width --width, one per block), B = 1 and 8:
    lookup     each Engram layer looks its rows up when it is reached
    prefetch   table.prefetch(next_ids, history=hist) the moment the token is known; each layer
               collects its rows (handle.result)
  the share of the step spent in engram calls (lookup, or prefetch + result), median over steps.

    python tools/bench_decode_tiers.py [--steps 300 --prefetch --json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
import torch

import engram
from engram.serving import decode_step

LAYERS = (1, 14)


@numba.njit(nogil=True, boundscheck=False)
def bare_kernel(window: np.ndarray, c: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """window [B, N] compressed ids (oldest first); c = multipliers [N], primes [H], offsets [H];
    out [B, H*D] = the H rows of each token (multiplicative-xor): the rows first, then one copy loop
    (flat output indices, a loop-invariant row: it vectorizes)."""
    B, N = window.shape
    D = rows.shape[1]
    H = (c.size - N) // 2
    K = H // (N - 1)
    picked = np.empty(B * H, np.int64)
    for b in range(B):
        mix = window[b, N - 1] * c[0]
        for order in range(2, N + 1):
            mix ^= window[b, N - order] * c[order - 1]
            h = np.uint64(mix)
            for k in range((order - 2) * K, (order - 1) * K):
                picked[b * H + k] = np.int64(h % np.uint64(c[N + k])) + c[N + H + k]
    flat = out.reshape(-1)
    for i in range(picked.size):
        row = picked[i]
        for d in range(D):
            flat[i * D + d] = rows[row, d]


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    """Median microseconds of one call over `calls` calls."""
    times = np.empty(calls)
    for i in range(calls):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    return float(np.median(times)) * 1e6


def batched_path(fn: Callable[[], object]) -> Callable[[], object]:
    """fn with the compiled path of small lookups switched off."""
    def run() -> object:
        keep, decode_step.SMALL_LOOKUP_TOKENS = decode_step.SMALL_LOOKUP_TOKENS, 0
        try:
            return fn()
        finally:
            decode_step.SMALL_LOOKUP_TOKENS = keep
    return run


def latency(table: engram.Table, rows: np.ndarray, B: int, context: int, steps: int) -> dict:
    spec, comp = table.spec, table.compression
    hasher = engram.NgramHasher(spec, comp)
    N = spec.max_ngram_size
    consts = np.concatenate([hasher.multipliers(1), np.asarray(spec.table_sizes(1), np.int64),
                             np.asarray(spec.head_offsets(1), np.int64)])
    ids = np.random.default_rng(B).integers(0, comp.vocab_size, (B, context + 1))
    new = np.ascontiguousarray(ids[:, -1:])
    hist = engram.NgramHistory(spec, comp, batch_size=B)
    hist.append(ids[:, :-1])
    window = np.ascontiguousarray(comp.lookup[ids[:, -N:]])                      # [B, N] compressed
    out = np.empty((B, spec.embed_dim), np.float32)
    ways = {"compiled": lambda: table.lookup(new, 1, history=hist),
            "batched": batched_path(lambda: table.lookup(new, 1, history=hist)),
            "bare": lambda: bare_kernel(window, consts, rows, out)}
    expected = ways["batched"]()
    ways["bare"]()
    assert torch.equal(ways["compiled"](), expected) and torch.equal(torch.from_numpy(out)[:, None], expected)
    us: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(5):                                  # interleaved rounds: load changes hit all alike
        for name, fn in ways.items():
            us[name].append(per_call_us(fn, max(20, steps // 5)))
    result = {name: float(np.median(v)) for name, v in us.items()}
    result["compiled_over_bare"] = result["compiled"] / result["bare"]
    result["batched_over_compiled"] = result["batched"] / result["compiled"]
    return result


def exposed(table: engram.Table, B: int, steps: int, blocks: int, width: int) -> dict:
    """Median share of a 2-layer decode step spent in engram calls, without and with prefetch."""
    spec, comp = table.spec, table.compression
    rng = np.random.default_rng(7)
    weight = torch.randn(width, width) / width**0.5
    x = torch.randn(B, width)

    def compute(n: int) -> None:
        for _ in range(n):
            torch.mm(x, weight)

    def run(prefetch: bool) -> list[float]:
        hist = engram.NgramHistory(spec, comp, batch_size=B)
        hist.append(rng.integers(0, comp.vocab_size, (B, 64)))
        shares = []
        for _ in range(steps):
            ids = rng.integers(0, comp.vocab_size, (B, 1))        # the token just sampled
            start = time.perf_counter()
            inside = 0.0
            t = time.perf_counter()
            handle = table.prefetch(ids, history=hist) if prefetch else None
            inside += time.perf_counter() - t
            for layer, before in zip(LAYERS, (1, LAYERS[1] - LAYERS[0]), strict=True):
                compute(before)
                t = time.perf_counter()
                rows = handle.result(layer) if handle is not None else table.lookup(ids, layer, history=hist)
                inside += time.perf_counter() - t
                del rows
            compute(blocks - LAYERS[1])
            hist.append(ids)
            shares.append(inside / (time.perf_counter() - start))
        return shares

    run(False), run(True)                                 # warm-up
    got: dict[str, list[float]] = {"lookup": [], "prefetch": []}
    for _ in range(3):
        got["lookup"] += run(False)
        got["prefetch"] += run(True)
    step_us = per_call_us(lambda: compute(blocks), 20)
    return {"compute_us": step_us, **{k: float(np.median(v)) for k, v in got.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=1024, help="tokens in the history before the step")
    parser.add_argument("--steps", type=int, default=300, help="timed calls per way, tier and batch size")
    parser.add_argument("--batches", default="1,8,64", help="batch sizes B of the latency table")
    parser.add_argument("--tiers", default="ram,mmap,direct", help="tiers to measure")
    parser.add_argument("--prefetch", action="store_true", help="also the exposed share of a 2-layer step")
    parser.add_argument("--blocks", type=int, default=20, help="model blocks of a decode step (--prefetch)")
    parser.add_argument("--width", type=int, default=1024, help="width of a block's matmul (--prefetch)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    comp = engram.Compression.identity(32000)
    spec = engram.TableSpec(engram_vocab_size=(20_000, 20_000), max_ngram_size=3, n_head_per_ngram=8,
                            n_embed_per_ngram=512, layer_ids=LAYERS, compressed_vocab_size=comp.compressed_vocab_size)
    results: dict = {"context": args.context, "heads": spec.heads_per_layer, "D": spec.head_dim, "threads": 1,
                     "latency": {}, "exposed": {}}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        path = Path(tmp) / "decode.engram"
        engram.build_table(path, spec, comp, seed=0).close()
        with engram.open(path, tier="ram") as ram:
            rows = ram._tier.weights[1].numpy()       # layer 1's rows where the ram tier holds them (huge pages)
            for tier in args.tiers.split(","):
                with engram.open(path, tier=tier) as table:
                    results["latency"][tier] = {B: latency(table, rows, B, args.context, args.steps)
                                                for B in (int(b) for b in args.batches.split(","))}
                    if args.prefetch:
                        results["exposed"][tier] = {B: exposed(table, B, args.steps // 3, args.blocks, args.width)
                                                    for B in (1, 8)}
            del rows
    if args.json:
        print(json.dumps(results, indent=2))
        return results
    print(f"decode step, T_new=1, context {args.context}, N=3, H={spec.heads_per_layer} heads of D={spec.head_dim}, "
          "float32, 1 thread; median us per layer lookup")
    print(f"{'tier':>7} {'B':>3} {'compiled':>9} {'batched':>9} {'bare':>7} {'compiled/bare':>14} "
          f"{'batched/compiled':>17}")
    for tier, per_b in results["latency"].items():
        for B, r in per_b.items():
            print(f"{tier:>7} {B:>3} {r['compiled']:9.1f} {r['batched']:9.1f} {r['bare']:7.2f} "
                  f"{r['compiled_over_bare']:13.1f}x {r['batched_over_compiled']:16.1f}x")
    if args.prefetch:
        print(f"\nshare of a 2-layer decode step in engram calls ({args.blocks} blocks of a {args.width}-wide matmul)")
        print(f"{'tier':>7} {'B':>3} {'compute us':>11} {'lookup':>8} {'prefetch':>9}")
        for tier, per_b in results["exposed"].items():
            for B, r in per_b.items():
                print(f"{tier:>7} {B:>3} {r['compute_us']:11.0f} {r['lookup']:8.1%} {r['prefetch']:9.1%}")
    return results


if __name__ == "__main__":
    main()
