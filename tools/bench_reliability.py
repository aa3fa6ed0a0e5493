"""The cost and the limits of the reliability checks, from one run (same table as tools/bench_engine.py).

Sections (--sections, default all):
- blocks: the cost of the "direct" tier's block checks (every 4 KiB block read against its
  recorded xxh3-64): cold `direct` lookups with the checks on (the default) and off, alternating
  in one run, page cache dropped before each (the tier reads with O_DIRECT where it can anyway).
  Ratio = unchecked time / checked time, the median over the on/off pairs (rows/s: best of each).
- window: what a file truncated under an "mmap" reader can still do. The tier checks its files
  (ChunkWatch) before each gather; a truncation after that check, while the gather reads, is the
  window no check made from Python closes (the process then dies of SIGBUS). It is the time from
  the check to the end of the gather, measured per batch shape on a hot "mmap" table (prefault;
  a gather that faults pages in from disk stays open for that long too), with the
  cost of the check itself (one zero-timeout poll of an inotify descriptor) beside it, as a share
  of the tier's gather and of the whole lookup (hashing included).
- sigbus: the same window as odds: a child process looks up batches on "mmap" in a loop while
  this one truncates a chunk file at a random moment; per batch shape, how many of --sigbus-trials
  children were refused (CorruptTableError at their next lookup) and how many died of SIGBUS.
- mmap: the cost of the "mmap" tier's first-serve checks (each 4 KiB block checked against its
  digest the first time a row in it is served, `engram.serving.verified`). The first pass: one
  layer read whole, in slices, on a freshly opened table with the checks and without (pages
  resident: prefault), as a ratio and per block. The hot loop: lookups of a verified working set
  with the checks on and off, alternating, as the median of paired time ratios (checked /
  unchecked); once with the compiled checks (numba) and once on the numpy path.

    python tools/bench_reliability.py [--sections blocks window sigbus mmap] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import xxhash

import engram
from engram.cli.bench import best_time, drop_caches

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import LAYER, global_rows, make_table  # noqa: E402
from tiny_data import TOKENIZER  # noqa: E402

SECTIONS = ("blocks", "window", "sigbus", "mmap")


def blocks(args, path: Path, comp: engram.Compression) -> dict:
    rng = np.random.default_rng(1)
    out = {}
    with engram.open(path, tier="direct", io_threads=args.io_threads[0]) as table:
        reader = table._tier.reader          # the block checks are on by default; off here only to measure them
        assert reader.block_digests, "the bench table has no block checksums"
        block = memoryview(np.random.default_rng(0).bytes(4096))
        hash_s = best_time(lambda: [xxhash.xxh3_64_intdigest(block) for _ in range(1000)], 5) / 1000
        for B, T in ((1, 1024), (1, 4096), (8, 4096)):
            ids = rng.integers(0, comp.vocab_size, (B, T))
            unique = np.unique(global_rows(table, ids)).size
            times: dict[bool, list[float]] = {True: [], False: []}
            for rep in range(2 * args.cold_repeats):         # on, off, on, off, ...: each pair alike
                reader.verify_blocks = rep % 2 == 0
                drop_caches()
                start = time.perf_counter()
                table.lookup(ids, LAYER)
                times[reader.verify_blocks].append(time.perf_counter() - start)
            reader.verify_blocks = True
            table.reset_stats()
            table.lookup(ids, LAYER)
            blocks_read = table.stats().bytes_from_disk // 4096
            # the shared disk's speed drifts between runs: the median of the paired ratios is the figure,
            # and the hashing's CPU time (blocks read x one 4 KiB xxh3) beside it, which the disk does not blur
            ratios = [off / on for on, off in zip(times[True], times[False], strict=True)]
            out[f"{B}x{T}"] = {"unique_rows": int(unique), "o_direct": reader.o_direct,
                               "checked_rows_per_s": unique / min(times[True]),
                               "unchecked_rows_per_s": unique / min(times[False]),
                               "checked_vs_unchecked": float(np.median(ratios)),
                               "ratio_quartiles": [float(q) for q in np.percentile(ratios, [25, 75])],
                               "blocks_read": int(blocks_read), "hash_s_per_block": hash_s,
                               "hash_share": blocks_read * hash_s / float(np.median(times[True]))}
    return out


def window(args, path: Path, comp: engram.Compression) -> dict:
    rng = np.random.default_rng(2)
    out = {}
    with engram.open(path, tier="mmap", prefault=True) as table:                    # hot: every page resident
        tier = table._tier
        check_s = best_time(tier.watch.check, 1000) if tier.watch is not None else 0.0
        for B, T in ((1, 1), (1, 128), (8, 4096)):
            rows = global_rows(table, rng.integers(0, comp.vocab_size, (B, T)))
            dest = torch.empty((rows.size, table.spec.head_dim), dtype=torch.float32)
            spans = []
            for _ in range(args.repeats * 20):
                start = time.perf_counter()
                tier.gather(LAYER, rows, dest)               # the check, then the index_select over mapped pages
                spans.append(time.perf_counter() - start)
            ids = rng.integers(0, comp.vocab_size, (B, T))
            lookup_s = best_time(lambda t=table, i=ids: t.lookup(i, LAYER), args.repeats * 20)
            out[f"{B}x{T}"] = {"rows": int(rows.size), "window_median_s": float(np.median(spans)),
                               "window_max_s": float(np.max(spans)), "check_s": check_s,
                               "check_share": check_s / float(np.median(spans)), "lookup_s": lookup_s,
                               "check_share_of_lookup": check_s / lookup_s}
    return out


_LOOKS_UP = """
import sys, numpy as np, engram
table = engram.open(sys.argv[1], tier="mmap", prefault=True)
ids = np.random.default_rng(0).integers(0, table.compression.vocab_size, (int(sys.argv[2]), int(sys.argv[3])))
print("ready", flush=True)
try:
    while True:
        table.lookup(ids, 1)
except engram.CorruptTableError:
    print("refused", flush=True)
"""


def sigbus(args, comp: engram.Compression) -> dict:
    import shutil
    import signal
    import subprocess

    spec = engram.TableSpec(engram_vocab_size=(1 << 16, 1 << 16), max_ngram_size=3, n_head_per_ngram=8,
                            n_embed_per_ngram=8 * 64, layer_ids=(1,), compressed_vocab_size=comp.compressed_vocab_size)
    source = Path(args.dir) / f"sigbus-{args.sigbus_chunk_rows}.engram"
    if not source.exists():
        engram.build_table(source, spec, comp, seed=0, chunk_rows=args.sigbus_chunk_rows, progress=False).close()
    rng = np.random.default_rng(3)
    out = {}
    for B, T in ((1, 128), (8, 4096)):
        counts = {"refused": 0, "sigbus": 0}
        for trial in range(args.sigbus_trials):
            path = Path(args.dir) / f"sigbus-{trial}.engram"
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(source, path)
            chunk = path / "layer_1" / "c" / "3" / "0"
            os.chmod(chunk, 0o644)
            child = subprocess.Popen([sys.executable, "-c", _LOOKS_UP, str(path), str(B), str(T)], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            time.sleep(float(rng.uniform(0.2, 0.5)))
            os.truncate(chunk, 0)
            stdout, _ = child.communicate(timeout=120)
            outcome = "sigbus" if child.returncode == -signal.SIGBUS else "refused" if "refused" in stdout else "other"
            counts[outcome] = counts.get(outcome, 0) + 1
            shutil.rmtree(path)
        out[f"{B}x{T}"] = counts
    return out


def mmap_checks(args, path: Path, comp: engram.Compression) -> dict:
    from engram.serving import compiled

    rng = np.random.default_rng(4)
    out: dict = {"first_pass": {}, "hot": {}}
    with engram.open(path, tier="mmap", prefault=True) as on, \
            engram.open(path, tier="mmap", prefault=True, verify_reads=False) as off:
        rows, step = on.spec.rows(LAYER), 1 << 16
        on.rows(LAYER, np.arange(1))                          # the compiled checks loaded (one block checked)
        # unchecked first: the allocator and the pages warm up; then the checked table's first pass
        for name, table in (("warm-up", off), ("checked", on), ("unchecked", off), ("checked_again", on)):
            start = time.perf_counter()
            for first in range(0, rows, step):
                table.rows(LAYER, np.arange(first, min(rows, first + step)))
            out["first_pass"][f"{name}_s"] = time.perf_counter() - start
        blocks = on._tier.checks[LAYER].verified.size
        out["first_pass"].update(blocks=blocks, ratio=out["first_pass"]["checked_s"] / out["first_pass"]["unchecked_s"],
                                 us_per_block=(out["first_pass"]["checked_s"] - out["first_pass"]["unchecked_s"])
                                 / blocks * 1e6)
    saved = compiled.COMPILED
    try:
        for kernels in (True, False) if saved else (False,):
            compiled.COMPILED = kernels          # tables opened now: with or without the compiled paths
            with engram.open(path, tier="mmap", prefault=True) as on, \
                    engram.open(path, tier="mmap", prefault=True, verify_reads=False) as off:
                for B, T in ((1, 1), (1, 128), (8, 4096)):
                    ids = rng.integers(0, comp.vocab_size, (B, T))
                    on.lookup(ids, LAYER)                                # its blocks checked: the working set
                    repeats = max(3, args.repeats * (20 if B * T <= 128 else 1))
                    pairs = [(best_time(lambda i=ids: on.lookup(i, LAYER), repeats),
                              best_time(lambda i=ids: off.lookup(i, LAYER), repeats)) for _ in range(9)]
                    ratios = [checked / unchecked for checked, unchecked in pairs]
                    out["hot"][f"{'numba' if kernels else 'numpy'} {B}x{T}"] = {
                        "checked_s": min(p[0] for p in pairs), "unchecked_s": min(p[1] for p in pairs),
                        "ratio": float(np.median(ratios)),
                        "ratio_quartiles": [float(q) for q in np.percentile(ratios, [25, 75])]}
    finally:
        compiled.COMPILED = saved
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="default: all")
    parser.add_argument("--table-gib", type=float, default=1.0, help="table size over both layers (default 1)")
    parser.add_argument("--dir", default="out/bench", help="where the table is built/reused (default out/bench)")
    parser.add_argument("--io-threads", type=int, nargs="+", default=[32], help="reads in flight (default 32)")
    parser.add_argument("--cold-repeats", type=int, default=3, help="cold repetitions, best kept (default 3)")
    parser.add_argument("--repeats", type=int, default=5, help="hot repetitions, best kept (default 5)")
    parser.add_argument("--sigbus-trials", type=int, default=20, help="children per batch shape (default 20)")
    parser.add_argument("--sigbus-chunk-rows", type=int, default=1 << 16,
                        help="rows per chunk file of the sigbus table (default 65536: 16 MiB files)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    comp = engram.Compression.from_tokenizer_file(TOKENIZER)
    path = make_table(args, comp)
    results: dict = {"page_cache_dropped": drop_caches()}
    if "blocks" in args.sections:
        results["blocks"] = blocks(args, path, comp)
    if "window" in args.sections:
        results["window"] = window(args, path, comp)
    if "sigbus" in args.sections:
        results["sigbus"] = sigbus(args, comp)
    if "mmap" in args.sections:
        results["mmap"] = mmap_checks(args, path, comp)
    print(json.dumps(results, indent=1) if args.json else report(results))
    return results


def report(r: dict) -> str:
    lines: list[str] = []
    if "blocks" in r:
        lines.append(f"\n{'direct block checks':<22}{'unique':>9}{'checked rows/s':>16}{'unchecked rows/s':>18}"
                     f"{'ratio (median of pairs, quartiles)':>36}{'blocks':>9}{'hash share':>12}")
        for name, b in r["blocks"].items():
            q1, q3 = b["ratio_quartiles"]
            lines.append(f"{name:<22}{b['unique_rows']:>9}{b['checked_rows_per_s']:>16.3e}"
                         f"{b['unchecked_rows_per_s']:>18.3e}{b['checked_vs_unchecked']:>16.3f} ({q1:.3f}-{q3:.3f})"
                         f"{b['blocks_read']:>9}{b['hash_share']:>12.2%}")
    if "window" in r:
        lines.append(f"\n{'mmap SIGBUS window':<22}{'rows':>8}{'median us':>11}{'max us':>10}{'check us':>10}"
                     f"{'of gather':>11}{'of lookup':>11}")
        for name, w in r["window"].items():
            lines.append(f"{name:<22}{w['rows']:>8}{w['window_median_s'] * 1e6:>11.1f}{w['window_max_s'] * 1e6:>10.1f}"
                         f"{w['check_s'] * 1e6:>10.2f}{w['check_share']:>11.2%}{w['check_share_of_lookup']:>11.2%}")
    if "sigbus" in r:
        lines.append("\nmmap reader, a chunk truncated under its lookup loop: children refused / killed by SIGBUS")
        for name, c in r["sigbus"].items():
            lines.append(f"{name:<22}{c.get('refused', 0):>4} refused {c.get('sigbus', 0):>4} SIGBUS"
                         + (f" {c['other']:>4} other" if c.get("other") else ""))
    if "mmap" in r:
        f = r["mmap"]["first_pass"]
        lines.append(f"\nmmap first-serve checks, first pass over a layer ({f['blocks']} blocks): checked "
                     f"{f['checked_s']:.3f} s, unchecked {f['unchecked_s']:.3f} s ({f['ratio']:.2f}x, "
                     f"{f['us_per_block']:.2f} us per block); checked again {f['checked_again_s']:.3f} s")
        lines.append(f"{'hot lookups':<22}{'checked us':>12}{'unchecked us':>14}"
                     f"{'ratio (median of pairs, quartiles)':>36}")
        for name, h in r["mmap"]["hot"].items():
            q1, q3 = h["ratio_quartiles"]
            lines.append(f"{name:<22}{h['checked_s'] * 1e6:>12.1f}{h['unchecked_s'] * 1e6:>14.1f}"
                         f"{h['ratio']:>16.3f} ({q1:.3f}-{q3:.3f})")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
