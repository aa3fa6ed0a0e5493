"""Training steps/s of table rows offloaded to disk (engram.OffloadedRows) against all rows in RAM, in one run.

Workload (defaults): one layer of N=3, K=2 (H=4 heads) rows of D=64 float32; every step looks up
[B, T] = [8, 256] token ids drawn from a Zipf distribution (exponent --zipf over a --vocab id
vocabulary, as text tokens are), multiplies the rows by a fixed random projection, backward,
then Adam on the rows touched. Rows-only: no model, so the rows' own cost is all that is timed.

- ram: every row in an nn.Embedding(sparse=True) trained by torch.optim.SparseAdam (the usual
  in-memory way, and the arithmetic OffloadedRows reproduces);
- offload: OffloadedRows with a cache of --cache-mib, the table 1x, 4x and 16x the rows the cache
  holds, each without and with `prefetch` of the next step's ids (issued before the step computes).

Each of --repeats rounds times the three back to back (--steps steps after --warmup steps), so a
busy moment of the machine slows all three; the ratio reported is the median over rounds of each
run's steps/s over its round's "ram" run, on the same table. Also reported: the cache's hit rate (rows a lookup found
in the cache) and the seconds a step waited for rows. The working copies live in --dir (default: a
temporary directory, removed at the end); the machine's page cache holds them unless they exceed RAM.

    python tools/bench_offload.py [--ratios 1 4 16 --cache-mib 32 --steps 40 --json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import engram
from engram.offload.records import RecordLayout
from engram.offload.store import cache_rows

D, K, N = 64, 2, 3


def zipf_batches(steps: int, shape: tuple[int, int], vocab: int, exponent: float, seed: int = 0) -> list[np.ndarray]:
    """Token ids [B, T] per step, Zipf-distributed over a shuffled vocabulary."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(vocab)
    out = []
    for _ in range(steps):
        ranks = rng.zipf(exponent, shape)
        out.append(order[np.minimum(ranks, vocab) - 1])
    return out


def make_table(root: Path, rows: int, vocab: int) -> engram.Table:
    base = max(2, rows // ((N - 1) * K))
    spec = engram.TableSpec(engram_vocab_size=(base,) * (N - 1), max_ngram_size=N, n_head_per_ngram=K,
                            n_embed_per_ngram=K * D, layer_ids=(0,), compressed_vocab_size=vocab)
    return engram.build_table(root / f"table-{rows}.engram", spec, engram.Compression.identity(vocab), seed=0)


def time_ram(table: engram.Table, batches: list[np.ndarray], warmup: int, lr: float) -> dict[str, Any]:
    spec = table.spec
    emb = torch.nn.Embedding(spec.rows(0), D, sparse=True)
    emb.weight.data.copy_(table.rows(0, np.arange(spec.rows(0)), dtype=torch.float32))
    opt = torch.optim.SparseAdam(emb.parameters(), lr=lr)
    hasher = engram.NgramHasher(spec, table.compression)
    w = torch.randn(*batches[0].shape, spec.embed_dim, generator=torch.Generator().manual_seed(1))
    start = 0.0
    for i, ids in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        idx = torch.from_numpy(hasher.global_rows(ids, 0))                    # [B, T, H]
        (emb(idx).flatten(2) * w).sum().backward()
        opt.step()
        opt.zero_grad()
    return {"steps_per_s": (len(batches) - warmup) / (time.perf_counter() - start)}


def time_offload(table: engram.Table, work: Path, cache_bytes: int, batches: list[np.ndarray], warmup: int,
                 lr: float, prefetch: bool) -> dict[str, Any]:
    rows = engram.OffloadedRows.create(table.path, work, cache_bytes=cache_bytes, lr=lr, overwrite=True)
    w = torch.randn(*batches[0].shape, table.spec.embed_dim, generator=torch.Generator().manual_seed(1))
    start = 0.0
    if prefetch:
        rows.prefetch(batches[0])
    for i, ids in enumerate(batches):
        if i == warmup:
            rows.reset_stats()
            start = time.perf_counter()
        if prefetch and i + 1 < len(batches):
            rows.prefetch(batches[i + 1])
        (rows.lookup(ids, 0) * w).sum().backward()
        rows.step()
    seconds = time.perf_counter() - start
    stats = rows.stats()
    rows.close(flush=False)
    return {"steps_per_s": (len(batches) - warmup) / seconds, "hit_rate": stats.hit_rate,
            "wait_s_per_step": stats.wait_seconds / (len(batches) - warmup),
            "rows_read_per_step": stats.rows_read / (len(batches) - warmup)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", type=float, nargs="+", default=[1, 4, 16], help="table rows / cache rows")
    p.add_argument("--cache-mib", type=float, default=32)
    p.add_argument("--batch", type=int, nargs=2, default=[8, 256], metavar=("B", "T"))
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the token ids")
    p.add_argument("--steps", type=int, default=40, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache_bytes = int(args.cache_mib * 2**20)
    slots = cache_rows(cache_bytes, RecordLayout(D, "float32"))
    root = Path(tempfile.mkdtemp(prefix="bench-offload-", dir=args.dir))
    batches = zipf_batches(args.warmup + args.steps, tuple(args.batch), args.vocab, args.zipf)
    results: dict[str, Any] = {"cache_mib": args.cache_mib, "cache_rows": slots, "batch": args.batch,
                               "runs": []}
    try:
        for ratio in args.ratios:
            table = make_table(root, int(ratio * slots), args.vocab)
            run: dict[str, Any] = {"ratio": ratio, "table_rows": table.spec.total_rows,
                                   "working_copy_mib": table.spec.total_rows * 12 * D / 2**20}
            rounds = []
            for _ in range(args.repeats):         # interleaved, so a slow moment of the machine hits all three
                ram = time_ram(table, batches, args.warmup, 5e-3)["steps_per_s"]
                outs = {name: time_offload(table, root / "work", cache_bytes, batches, args.warmup, 5e-3, prefetch)
                        for name, prefetch in (("no_prefetch", False), ("prefetch", True))}
                rounds.append((ram, outs))
            run["ram_steps_per_s"] = statistics.median(r for r, _ in rounds)
            for name in ("no_prefetch", "prefetch"):
                ratios = [o[name]["steps_per_s"] / r for r, o in rounds]
                mid = sorted(range(len(rounds)), key=lambda i: ratios[i])[len(rounds) // 2]
                run[name] = {**rounds[mid][1][name], "ratio_to_ram": ratios[mid], "ratios": ratios}
            results["runs"].append(run)
            table.close()
            shutil.rmtree(root / "work", ignore_errors=True)
            shutil.rmtree(table.path, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(f"cache {args.cache_mib} MiB = {slots} rows; batch {args.batch}, Zipf {args.zipf} over {args.vocab} ids")
        print(f"{'table/cache':>11} {'ram st/s':>9} {'no-pf st/s':>10} {'ratio':>6} {'hit':>5} "
              f"{'pf st/s':>8} {'ratio':>6} {'hit':>5} {'wait ms':>8}")
        for r in results["runs"]:
            a, b = r["no_prefetch"], r["prefetch"]
            print(f"{r['ratio']:>11g} {r['ram_steps_per_s']:>9.1f} {a['steps_per_s']:>10.1f} {a['ratio_to_ram']:>6.2f} "
                  f"{a['hit_rate']:>5.2f} {b['steps_per_s']:>8.1f} {b['ratio_to_ram']:>6.2f} {b['hit_rate']:>5.2f} "
                  f"{1e3 * b['wait_s_per_step']:>8.2f}")
    return results


if __name__ == "__main__":
    main()
