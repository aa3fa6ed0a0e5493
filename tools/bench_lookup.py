"""Lookup throughput of every storage tier, each against its baseline, ratios from one run.

Workload (defaults): B=8, T=4096, N=3, K=8 (H=16 heads), D=64 float32 (256 B rows), two layers,
the per-head base size chosen so the table holds about 1 GiB; one layer is looked up per call.

- hot (`ram` and page-cache-hot `mmap`, torch.set_num_threads(1) throughout):
  * baseline: the straightforward PyTorch way: numpy reference hash (np.pad shifts, `%` per
    head), head offsets, one nn.Embedding over an in-RAM copy of the same rows;
  * bare gather: torch.index_select(weight, 0, rows, out=buf) over the tier's own rows with the
    row ids precomputed (the cost of the gather alone);
  * engram: table.lookup(ids, layer) (fresh result each call, memory recycled) and with out=.
- cold (`direct`, after `sync; echo 3 > /proc/sys/vm/drop_caches` before every repetition):
  * baseline: a plain thread pool of os.pread calls (one per requested row, POSIX_FADV_RANDOM so
    the kernel reads one page per row, not a readahead window) over the same rows, with as many
    threads as the direct tier keeps reads in flight (--io-threads) unless --pread-threads says;
  * engram: table.lookup on the "direct" tier (dedup, block-aligned extents, O_DIRECT).
  Run once on the full workload and once on a sparse one (few rows, little block sharing).

    python tools/bench_lookup.py [--table-gib 1 --repeats 10 --dir out/bench --json]

Dropping caches needs root; without it the cold section is skipped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

import engram
from engram.cli.bench import best_time, drop_caches, reference_hash
from engram.making.build import build_table
from engram.opening import open as open_table
from engram.storage.metadata import read_metadata


def anon_hugepage_bytes() -> int:
    """Bytes of this process's memory backed by transparent hugepages (0 where unknown)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("AnonHugePages:"))
    except (OSError, StopIteration):
        return 0


def pread_pool(table, layer_id: int, rows: np.ndarray, threads: int) -> None:
    """The plain baseline: os.pread of every requested row from `threads` threads."""
    lay = table.layout(layer_id)
    fds = [os.open(p, os.O_RDONLY) for p in table.chunk_files(layer_id)]
    for fd in fds:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    chunk = (rows // lay.chunk_rows).tolist()
    offset = ((rows % lay.chunk_rows) * lay.row_bytes).tolist()

    def work(start: int) -> None:
        for i in range(start, len(chunk), threads):
            os.pread(fds[chunk[i]], lay.row_bytes, offset[i])

    try:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(threads)))
    finally:
        for fd in fds:
            os.close(fd)


def make_table(args, comp: engram.Compression) -> Path:
    layers = tuple(args.layers)
    H = (args.max_ngram - 1) * args.heads
    row_bytes = args.head_dim * 4
    base = int(args.table_gib * 2**30 / (len(layers) * H * row_bytes))
    spec = engram.TableSpec(engram_vocab_size=(base,) * (args.max_ngram - 1), max_ngram_size=args.max_ngram,
                            n_head_per_ngram=args.heads, n_embed_per_ngram=args.heads * args.head_dim,
                            layer_ids=layers, compressed_vocab_size=comp.compressed_vocab_size)
    path = Path(args.dir) / "bench.engram"
    try:
        with open_table(path, spec=spec, compression=comp):
            return path
    except engram.EngramError:
        build_table(path, spec, comp, seed=0, overwrite=path.exists(), progress=not args.json).close()
        return path


def hot(args, path: Path, ids: np.ndarray, comp: engram.Compression) -> dict:
    layer = args.layers[0]
    results = {}
    before = anon_hugepage_bytes()
    with open_table(path, tier="ram") as ram, open_table(path, tier="mmap", prefault=True) as mapped:
        results["ram_hugepage_bytes"] = anon_hugepage_bytes() - before
        spec = ram.spec
        H, D, E = spec.heads_per_layer, spec.head_dim, spec.embed_dim
        B, T = ids.shape
        tokens = ids.size
        # Baseline: reference hash + offsets + one nn.Embedding over an in-RAM copy of the rows.
        hasher = engram.NgramHasher(spec, comp)
        sizes = [list(spec.table_sizes(layer)[i: i + args.heads]) for i in range(0, H, args.heads)]
        mult, pad = hasher.multipliers(layer), int(comp.lookup[spec.pad_id])
        offsets = np.asarray(spec.head_offsets(layer), np.int64)
        embedding = torch.nn.Embedding(spec.rows(layer), D, _weight=ram.rows(layer, np.arange(spec.rows(layer))))
        embedding.requires_grad_(False)

        def baseline() -> torch.Tensor:
            rows = reference_hash(comp.lookup[ids], mult, sizes, pad) + offsets
            return embedding(torch.from_numpy(rows)).reshape(B, T, E)

        expected = baseline()
        base_s = best_time(baseline, args.repeats)
        results["baseline_nn_embedding"] = {"tokens_per_s": tokens / base_s}
        rows = torch.from_numpy((hasher.hash(ids, layer) + offsets).reshape(-1))
        buf = torch.empty(B * T * H, D)
        for table in (ram, mapped):
            if not torch.equal(table.lookup(ids, layer), expected):
                raise SystemExit(f"{table.tier}: lookup differs from the baseline")
            weight = table._tier.weights[layer]
            bare_s = best_time(lambda w=weight: torch.index_select(w, 0, rows, out=buf), args.repeats)
            look_s = best_time(lambda t=table: t.lookup(ids, layer), args.repeats)
            out = torch.empty(B, T, E)
            out_s = best_time(lambda t=table, o=out: t.lookup(ids, layer, out=o), args.repeats)
            results[table.tier] = {
                "tokens_per_s": tokens / look_s, "tokens_per_s_out": tokens / out_s,
                "bare_index_select_tokens_per_s": tokens / bare_s,
                "vs_baseline": base_s / look_s, "vs_bare": bare_s / look_s, "vs_bare_out": bare_s / out_s,
            }
    return results


def cold(args, path: Path, ids: np.ndarray, name: str) -> dict:
    layer = args.layers[0]
    with open_table(path, tier="direct", io_threads=args.io_threads) as table:
        spec = table.spec
        rows = engram.NgramHasher(spec, table.compression).global_rows(ids, layer).reshape(-1)
        n_rows, n_unique = rows.size, np.unique(rows).size
        direct_s = best_time(lambda: table.lookup(ids, layer), args.cold_repeats, before=drop_caches)
        pread_s = best_time(lambda: pread_pool(table, layer, rows, args.pread_threads), args.cold_repeats,
                            before=drop_caches)
        return {name: {"tokens": ids.size, "rows": n_rows, "unique_rows": n_unique,
                       "o_direct": table._tier.reader.o_direct, "tokens_per_s": ids.size / direct_s,
                       "rows_per_s": n_rows / direct_s, "pread_pool_rows_per_s": n_rows / pread_s,
                       "vs_pread_pool": pread_s / direct_s}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="B (default 8)")
    parser.add_argument("--seq", type=int, default=4096, help="T (default 4096)")
    parser.add_argument("--max-ngram", type=int, default=3, help="N (default 3)")
    parser.add_argument("--heads", type=int, default=8, help="K heads per order (default 8)")
    parser.add_argument("--head-dim", type=int, default=64, help="D float32 values per row (default 64)")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 15], help="layer ids (default 1 15)")
    parser.add_argument("--table-gib", type=float, default=1.0, help="table size over all layers (default 1)")
    parser.add_argument("--vocab", type=int, default=129280, help="vocabulary size (default 129280)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions, hot (default 10)")
    parser.add_argument("--cold-repeats", type=int, default=3, help="timed repetitions, cold (default 3)")
    parser.add_argument("--sparse-seq", type=int, default=1024, help="T of the sparse cold workload, B=1 "
                        "(default 1024)")
    parser.add_argument("--io-threads", type=int, default=32, help="direct tier reads in flight (default 32)")
    parser.add_argument("--pread-threads", type=int, default=None,
                        help="baseline pread threads (default: --io-threads, the same reads in flight)")
    parser.add_argument("--dir", default="out/bench", help="where the table is built/reused (default out/bench)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold direct section")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.pread_threads is None:
        args.pread_threads = args.io_threads

    torch.set_num_threads(1)
    comp = engram.Compression.identity(args.vocab)
    path = make_table(args, comp)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, (args.batch, args.seq))
    results: dict = {"batch": args.batch, "seq": args.seq, "heads": (args.max_ngram - 1) * args.heads,
                     "head_dim": args.head_dim, "table_bytes": read_metadata(path).spec.total_bytes,
                     "torch_threads": 1}
    results["hot"] = hot(args, path, ids, comp)
    if not args.no_cold and drop_caches():
        results["cold"] = {**cold(args, path, ids, "full"),
                           **cold(args, path, rng.integers(0, args.vocab, (1, args.sparse_seq)), "sparse")}
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        report(results)
    return results


def report(r: dict) -> None:
    print(f"B={r['batch']} T={r['seq']} H={r['heads']} D={r['head_dim']} float32, table "
          f"{r['table_bytes'] / 2**30:.2f} GiB, torch threads=1 (one layer per lookup)")
    hot = r["hot"]
    print(f"ram tier: {hot['ram_hugepage_bytes'] / 2**20:.0f} MiB in transparent hugepages")
    print(f"\n{'hot':<24}{'tokens/s':>12}{'out= tok/s':>12}{'bare gather':>13}{'x baseline':>12}"
          f"{'x bare':>9}{'x bare out=':>12}")
    print(f"{'baseline nn.Embedding':<24}{hot['baseline_nn_embedding']['tokens_per_s']:>12.3e}")
    for tier in ("ram", "mmap"):
        h = hot[tier]
        print(f"{tier:<24}{h['tokens_per_s']:>12.3e}{h['tokens_per_s_out']:>12.3e}"
              f"{h['bare_index_select_tokens_per_s']:>13.3e}{h['vs_baseline']:>12.2f}{h['vs_bare']:>9.2f}"
              f"{h['vs_bare_out']:>12.2f}")
    if "cold" not in r:
        print("\ncold: skipped (needs root to drop the page cache, or --no-cold)")
        return
    print(f"\n{'cold direct':<24}{'rows':>9}{'unique':>9}{'rows/s':>12}{'pread rows/s':>14}{'x pread':>9}")
    for name, c in r["cold"].items():
        print(f"{name + (' (O_DIRECT)' if c['o_direct'] else ''):<24}{c['rows']:>9}{c['unique_rows']:>9}"
              f"{c['rows_per_s']:>12.3e}{c['pread_pool_rows_per_s']:>14.3e}{c['vs_pread_pool']:>9.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
