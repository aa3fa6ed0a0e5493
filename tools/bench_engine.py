"""The lookup engine, each part against its baseline, ratios from one run.

Table (built once under --dir, reused): the shipped 4k tokenizer's compression, N=3, K=8
(H=16 heads), D=64 float32 (256 B rows), layers 1 and 15, about --table-gib GiB. Layer 1 is
looked up. Cold measurements drop the page cache first (`sync; echo 3 > /proc/sys/vm/drop_caches`,
root only; without root those sections are skipped).

Sections (--sections, default all):
- cold: `direct` lookups (dedup, rows sorted by offset, block-coalesced reads, --io-threads in
  flight) against a plain thread pool of os.pread calls, one per distinct row, with as many
  threads as the engine has reads in flight (POSIX_FADV_RANDOM: one page per read). Random
  token ids, batches 1x1024 and 1x4096 (sparse rows) and 8x4096. Ratio = pool time / engine time
  for the same distinct rows (the engine also hashes and returns every requested row in order).
- cache: real text (the Python standard library's sources, shipped tokenizer). A hot-row plan
  from `engram.corpus_stats` holds the rows that corpus touches; the cache keeps the most used
  --fractions of them. A pass looks up --cache-tokens tokens of consecutive text in batches;
  the page cache is dropped before each pass; `direct` tier with and without the cache.
  "in-sample": plan counted on the whole corpus; "held-out": plan counted on 4/5 of the pieces,
  passes over the other fifth. "lookups served" is the share of the pass's lookups (every
  requested row, repeats included) that the cached rows hold, and "ideal" 1/(1 - share): the
  speedup a free cache would give a disk-bound tier that read every requested row; batch dedup
  already reads a repeated row once, so the cache's measured gain stays below it.
- pipeline: a CPU model step: --layers-total matmul layers, the Engram layer at index 2, its
  lookup prefetched before layer 0. torch.set_num_threads(1) so the compute takes one core and
  the prefetch thread the other. Sweeps the compute per layer from a fraction of the lookup time
  to several times it; reports the lookup time left exposed (time blocked in result()) as a share
  of the step time (median and worst step), and the step without prefetch (lookup called at
  layer 2), steps of both kinds alternating.
- dedup: when reading each distinct row once pays on the in-memory tiers: np.unique vs
  torch.unique, and "ram" lookups with dedup on vs off, on random and real-text batches.

    python tools/bench_engine.py [--sections cold cache pipeline dedup] [--json]

The reliability sections (block checks, the mmap SIGBUS window) are tools/bench_reliability.py.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import engram
from engram.cli.bench import best_time, drop_caches
from engram.serving.cache import select_hot_rows

sys.path.insert(0, str(Path(__file__).parent))
from tiny_data import TOKENIZER, stdlib_files  # noqa: E402

LAYER = 1
SECTIONS = ("cold", "cache", "pipeline", "dedup")


def make_table(args, comp: engram.Compression) -> Path:
    H, row_bytes, layers = 16, 256, (1, 15)
    base = int(args.table_gib * 2**30 / (len(layers) * H * row_bytes))
    spec = engram.TableSpec(engram_vocab_size=(base, base), max_ngram_size=3, n_head_per_ngram=8,
                            n_embed_per_ngram=8 * 64, layer_ids=layers,
                            compressed_vocab_size=comp.compressed_vocab_size)
    path = Path(args.dir) / "engine.engram"
    try:
        with engram.open(path, spec=spec, compression=comp) as table:
            if table.layout(LAYER).blocks is not None:     # tables written before block checksums are rebuilt
                return path
    except engram.EngramError:
        pass
    engram.build_table(path, spec, comp, seed=0, overwrite=path.exists(), progress=not args.json).close()
    return path


def global_rows(table, ids: np.ndarray) -> np.ndarray:
    return engram.NgramHasher(table.spec, table.compression).global_rows(ids, LAYER).reshape(-1)


class PreadPool:
    """The plain baseline: `threads` threads, each os.pread-ing its share of the rows, one call per row."""

    def __init__(self, table, threads: int) -> None:
        self.lay, self.threads = table.layout(LAYER), threads
        self.fds = [os.open(p, os.O_RDONLY) for p in table.chunk_files(LAYER)]
        for fd in self.fds:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.pool = concurrent.futures.ThreadPoolExecutor(threads)

    def read(self, rows: np.ndarray) -> None:
        chunk = (rows // self.lay.chunk_rows).tolist()
        offset = ((rows % self.lay.chunk_rows) * self.lay.row_bytes).tolist()
        fds, size = self.fds, self.lay.row_bytes

        def work(start: int) -> None:
            for i in range(start, len(chunk), self.threads):
                os.pread(fds[chunk[i]], size, offset[i])

        list(self.pool.map(work, range(self.threads)))

    def close(self) -> None:
        self.pool.shutdown()
        for fd in self.fds:
            os.close(fd)


def cold(args, path: Path, comp: engram.Compression) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for q in args.io_threads:
        with engram.open(path, tier="direct", io_threads=q) as table:
            pool = PreadPool(table, q)
            try:
                for B, T in ((1, 1024), (1, 4096), (8, 4096)):
                    ids = rng.integers(0, comp.vocab_size, (B, T))
                    uniq = np.unique(global_rows(table, ids))
                    table.reset_stats()
                    engine_s = best_time(lambda t=table, i=ids: t.lookup(i, LAYER), args.cold_repeats,
                                         before=drop_caches)
                    s = table.stats()
                    pool_s = best_time(lambda u=uniq, p=pool: p.read(u), args.cold_repeats, before=drop_caches)
                    out[f"{B}x{T}_q{q}"] = {
                        "batch": [B, T], "reads_in_flight": q, "rows": B * T * 16, "unique_rows": int(uniq.size),
                        "engine_reads": s.disk_reads // s.lookups, "engine_bytes": s.bytes_from_disk // s.lookups,
                        "o_direct": table._tier.reader.o_direct,
                        "engine_unique_rows_per_s": uniq.size / engine_s, "engine_tokens_per_s": B * T / engine_s,
                        "pread_pool_rows_per_s": uniq.size / pool_s, "vs_pread_pool": pool_s / engine_s}
            finally:
                pool.close()
    return out


def corpus(args, comp: engram.Compression) -> list[np.ndarray]:
    files = stdlib_files()[: args.corpus_files or None]
    return engram.tokenize_files(files, TOKENIZER, progress=not args.json)


def cache(args, path: Path, seqs: list[np.ndarray]) -> dict:
    out: dict = {}
    with engram.open(path, tier="direct") as table:
        spec, comp = table.spec, table.compression
        splits = {"in-sample": (seqs, seqs),
                  "held-out": ([s for i, s in enumerate(seqs) if i % 5], [s for i, s in enumerate(seqs) if not i % 5])}
        for split, (plan_seqs, eval_seqs) in splits.items():
            plan = engram.corpus_stats(plan_seqs, spec, comp).hot_row_plan()
            stream = np.concatenate(eval_seqs)
            start = int(np.random.default_rng(1).integers(0, stream.size - args.cache_tokens))
            text = stream[start: start + args.cache_tokens]
            entry: dict = {"touched_rows": int(plan.rows[LAYER].size)}
            for B, T in ((1, 1024), (1, 4096), (8, 4096)):
                n = text.size // (B * T)
                if n == 0:       # --cache-tokens holds less than one batch of this shape
                    continue
                batches = [text[i * B * T: (i + 1) * B * T].reshape(B, T) for i in range(n)]

                def one_pass(bs=batches) -> None:
                    for ids in bs:
                        table.lookup(ids, LAYER)

                table.clear_hot_rows()
                table.reset_stats()
                base_s = best_time(one_pass, 1, before=drop_caches)
                base = table.stats()
                shape = {"batches": n, "tokens": n * B * T, "uncached_tokens_per_s": n * B * T / base_s,
                         "uncached_disk_reads": base.disk_reads, "unique_fraction": base.unique_fraction}
                requested = global_rows(table, text[: n * B * T].reshape(-1, T))
                for fraction in args.fractions:
                    cached = table.load_hot_rows(plan, fraction=fraction)
                    chosen = select_hot_rows(plan, spec, comp, fraction=fraction)[LAYER]
                    # Share of the pass's lookups (not distinct rows) the cached rows serve: a cache that
                    # cost nothing on a disk-bound tier without dedup would speed it up 1/(1 - share).
                    share = float(np.isin(requested, chosen, assume_unique=False).mean())
                    table.reset_stats()
                    cached_s = best_time(one_pass, 1, before=drop_caches)
                    s = table.stats()
                    shape[f"cached_{fraction}"] = {
                        "cached_rows": cached[LAYER], "cache_mib_all_layers": s.cached_rows * spec.row_bytes / 2**20,
                        "tokens_per_s": n * B * T / cached_s, "vs_uncached": base_s / cached_s,
                        "cache_hit_rate": s.cache_hit_rate, "lookup_share": share,
                        "ideal_vs_uncached": 1 / max(1e-9, 1 - share), "disk_reads": s.disk_reads,
                        "reads_vs_uncached": base.disk_reads / max(1, s.disk_reads)}
                entry[f"{B}x{T}"] = shape
            out[split] = entry
    return out


def pipeline(args, path: Path, comp: engram.Compression) -> dict:
    torch.set_num_threads(1)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, comp.vocab_size, (args.pipe_batch, args.pipe_seq))
    M, C, L = 256, args.pipe_width, args.layers_total
    x0 = torch.randn(M, C)
    weights = [torch.randn(C, C) / C**0.5 for _ in range(L)]
    out: dict = {"tier": args.pipe_tier, "tokens": ids.size, "torch_threads": 1, "sweep": []}
    with engram.open(path, tier=args.pipe_tier) as table:
        lookup_s = best_time(lambda: table.lookup(ids, LAYER), 5)
        matmul_s = best_time(lambda: x0 @ weights[0], 20)
        out["lookup_s"], out["matmul_s"] = lookup_s, matmul_s
        for ratio in args.compute_ratios:          # compute before the Engram layer / lookup time
            reps = max(1, round(ratio * lookup_s / (2 * matmul_s)))

            def layer(x, w, r=reps):
                for _ in range(r):
                    x = torch.tanh(x @ w)
                return x

            def step(prefetch: bool, r=reps) -> None:
                handle = table.prefetch(ids, layer_ids=LAYER) if prefetch else None
                x = x0
                for i in range(L):
                    if i == 2:
                        e = handle.result(LAYER) if prefetch else table.lookup(ids, LAYER)
                        x = x + e[0, :M, :C].float() if C <= e.shape[-1] else x + e[0, 0, 0]
                    x = layer(x, weights[i], r)

            compute_s = best_time(lambda: [layer(x0, w) for w in weights[:2]], 3)
            step(True)
            timed = {True: [], False: []}
            blocked = []
            for _ in range(args.pipe_steps):          # alternate, so both see the same machine load
                for prefetch in (True, False):
                    before = table.stats().blocked_seconds
                    start = time.perf_counter()
                    step(prefetch)
                    timed[prefetch].append(time.perf_counter() - start)
                    if prefetch:
                        blocked.append(table.stats().blocked_seconds - before)
            step_s, plain_s = float(np.median(timed[True])), float(np.median(timed[False]))
            shares = np.array(blocked) / np.array(timed[True])
            out["sweep"].append({
                "compute_before_engram_s": compute_s, "compute_vs_lookup": compute_s / lookup_s,
                "step_s": step_s, "blocked_s": float(np.median(blocked)),
                "exposed_share": float(np.median(shares)), "exposed_share_max": float(shares.max()),
                "step_without_prefetch_s": plain_s, "speedup_vs_no_prefetch": plain_s / step_s})
    return out


def dedup(args, path: Path, seqs: list[np.ndarray] | None, comp: engram.Compression) -> dict:
    torch.set_num_threads(1)
    rng = np.random.default_rng(3)
    workloads = {"random_1x1024": rng.integers(0, comp.vocab_size, (1, 1024)),
                 "random_8x4096": rng.integers(0, comp.vocab_size, (8, 4096))}
    if seqs is not None:
        stream = np.concatenate(seqs)
        workloads["text_1x1024"] = stream[:1024].reshape(1, 1024)
        if stream.size >= 8 * 4096:      # a window past the first files' licence headers where there is text
            start = min(100_000, stream.size - 8 * 4096)
            workloads["text_8x4096"] = stream[start: start + 8 * 4096].reshape(8, 4096)
    out = {}
    with engram.open(path, tier="ram", dedup=False) as plain, engram.open(path, tier="ram", dedup=True) as deduped:
        for name, ids in workloads.items():
            rows = global_rows(plain, ids)
            t_rows = torch.from_numpy(rows)
            off_s = best_time(lambda i=ids: plain.lookup(i, LAYER), args.repeats)
            on_s = best_time(lambda i=ids: deduped.lookup(i, LAYER), args.repeats)
            out[name] = {
                "rows": int(rows.size), "unique_fraction": np.unique(rows).size / rows.size,
                "np_unique_s": best_time(lambda r=rows: np.unique(r, return_inverse=True), args.repeats),
                "torch_unique_s": best_time(lambda r=t_rows: torch.unique(r, sorted=True, return_inverse=True),
                                            args.repeats),
                "ram_lookup_dedup_off_s": off_s, "ram_lookup_dedup_on_s": on_s, "dedup_on_vs_off": off_s / on_s}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="default: all")
    parser.add_argument("--table-gib", type=float, default=1.0, help="table size over both layers (default 1)")
    parser.add_argument("--dir", default="out/bench", help="where the table is built/reused (default out/bench)")
    parser.add_argument("--io-threads", type=int, nargs="+", default=[32],
                        help="reads in flight, engine and pread pool alike (default 32)")
    parser.add_argument("--cold-repeats", type=int, default=3, help="cold repetitions, best kept (default 3)")
    parser.add_argument("--repeats", type=int, default=5, help="hot repetitions, best kept (default 5)")
    parser.add_argument("--corpus-files", type=int, default=0, help="stdlib files to tokenize (default 0: all)")
    parser.add_argument("--cache-tokens", type=int, default=32768, help="tokens per cache pass (default 32768)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5],
                        help="hot-row cache sizes, share of the touched rows (default 0.1 0.25 0.5)")
    parser.add_argument("--pipe-tier", default="ram", choices=("ram", "mmap", "direct"), help="default ram")
    parser.add_argument("--pipe-batch", type=int, default=4, help="pipeline B (default 4)")
    parser.add_argument("--pipe-seq", type=int, default=4096, help="pipeline T (default 4096)")
    parser.add_argument("--pipe-width", type=int, default=512, help="pipeline matmul width (default 512)")
    parser.add_argument("--layers-total", type=int, default=6, help="pipeline layers (default 6)")
    parser.add_argument("--pipe-steps", type=int, default=10, help="pipeline steps per point, each way (default 10)")
    parser.add_argument("--compute-ratios", type=float, nargs="+", default=[0.25, 0.5, 0.8, 1.25, 2.0, 4.0],
                        help="compute before the Engram layer / lookup time (default 0.25 ... 4)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    comp = engram.Compression.from_tokenizer_file(TOKENIZER)
    path = make_table(args, comp)
    can_drop = drop_caches()
    with engram.open(path, tier="direct") as table:
        results: dict = {"table_bytes": table.nbytes, "page_cache_dropped": can_drop}
    seqs = corpus(args, comp) if {"cache", "dedup"} & set(args.sections) else None
    if "cold" in args.sections and can_drop:
        results["cold"] = cold(args, path, comp)
    if "cache" in args.sections and can_drop:
        results["cache"] = cache(args, path, seqs)
    if "pipeline" in args.sections:
        results["pipeline"] = pipeline(args, path, comp)
    if "dedup" in args.sections:
        results["dedup"] = dedup(args, path, seqs, comp)
    print(json.dumps(results, indent=1) if args.json else report(results))
    return results


def report(r: dict) -> str:
    lines = [f"table {r['table_bytes'] / 2**30:.2f} GiB, 256 B rows, layer {LAYER}"]
    if not r["page_cache_dropped"]:
        lines.append("cold and cache sections skipped: dropping the page cache needs root")
    if "cold" in r:
        lines.append(f"\n{'cold direct vs pread pool':<28}{'unique':>9}{'reads':>8}{'engine rows/s':>15}"
                     f"{'pool rows/s':>13}{'x pool':>8}")
        for name, c in r["cold"].items():
            lines.append(f"{name:<28}{c['unique_rows']:>9}{c['engine_reads']:>8}{c['engine_unique_rows_per_s']:>15.3e}"
                         f"{c['pread_pool_rows_per_s']:>13.3e}{c['vs_pread_pool']:>8.2f}")
    if "cache" in r:
        for split, entry in r["cache"].items():
            lines.append(f"\nreal text, {split} plan ({entry['touched_rows']} rows touched): tokens/s, cold direct")
            for shape, s in entry.items():
                if not isinstance(s, dict):
                    continue
                cells = [f"uncached {s['uncached_tokens_per_s']:.3e}"]
                for key, c in s.items():
                    if key.startswith("cached_"):
                        cells.append(f"{key[7:]}: {c['tokens_per_s']:.3e} x{c['vs_uncached']:.2f} "
                                     f"(hits {c['cache_hit_rate']:.2f}, reads /{c['reads_vs_uncached']:.1f}, "
                                     f"lookups served {c['lookup_share']:.2f}: ideal x{c['ideal_vs_uncached']:.1f})")
                lines.append(f"  {shape:<7} " + " | ".join(cells))
    if "pipeline" in r:
        p = r["pipeline"]
        lines.append(f"\npipeline ({p['tier']}, {p['tokens']} tokens, lookup {p['lookup_s'] * 1e3:.1f} ms, "
                     "torch threads 1)")
        lines.append(f"{'compute/lookup':>15}{'step ms':>10}{'blocked ms':>12}{'exposed':>9}{'(max)':>8}"
                     f"{'no-prefetch ms':>16}{'speedup':>9}")
        for s in p["sweep"]:
            lines.append(f"{s['compute_vs_lookup']:>15.2f}{s['step_s'] * 1e3:>10.1f}{s['blocked_s'] * 1e3:>12.2f}"
                         f"{s['exposed_share']:>9.1%}{s['exposed_share_max']:>8.1%}"
                         f"{s['step_without_prefetch_s'] * 1e3:>16.1f}{s['speedup_vs_no_prefetch']:>9.2f}")
    if "dedup" in r:
        lines.append(f"\n{'dedup (ram tier)':<16}{'unique':>8}{'np.unique ms':>14}{'torch.unique ms':>17}"
                     f"{'off ms':>9}{'on ms':>9}{'on vs off':>11}")
        for name, d in r["dedup"].items():
            lines.append(f"{name:<16}{d['unique_fraction']:>8.2f}{d['np_unique_s'] * 1e3:>14.2f}"
                         f"{d['torch_unique_s'] * 1e3:>17.2f}{d['ram_lookup_dedup_off_s'] * 1e3:>9.2f}"
                         f"{d['ram_lookup_dedup_on_s'] * 1e3:>9.2f}{d['dedup_on_vs_off']:>11.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
