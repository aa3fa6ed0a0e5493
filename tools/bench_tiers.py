"""The tiers at their limits, each against its baseline in the same run: hot batched lookups on
"mmap" against "ram", and cold decode-step reads on "direct" against the disk itself.

Table (defaults): two layers, N=3, K=8 (H=16 heads), D=64 float32 (256 B rows), about 1 GiB,
built with the default chunk files (whole 2 MiB multiples).

- hot: table.lookup of [8, 4096] token ids, one layer, torch.set_num_threads(1), on "ram" and on
  "mmap" with prefault (2 MiB pages where the kernel maps file pages so), interleaved; reported:
  median ms of each, mmap / ram, and the bytes of each table on 2 MiB pages (whole mappings
  counted, chunk padding included); and "mmap old": the same rows in chunk files of 64 MiB + 64 KiB,
  as tables were split before chunk files of whole 2 MiB (stitched back to back, only the first
  file lines up with 2 MiB of the mapping).
- cold: decode steps ([1, 1] and [8, 1] token ids) on "direct" (O_DIRECT, every block checked):
  * disk: the same extents read at the same depth (all at once) with one bare io_uring
    submission, no planning, checking or copying: the disk's own latency for those reads;
  * io_uring: the tier's gather of the step's rows (engine: dedup, plan, one submission,
    block checks, row copies), and the whole table.lookup (hashing included);
  * threads: the same with the thread-pool reads (the tier's path where io_uring is refused,
    and the only path before it);
  reported: median us and the ratios to the disk. Also the disk as `engram inspect` probes it
  (random 4 KiB reads/s at depth 1 and 32, `engram.serving.placement.random_reads`).

    python tools/bench_tiers.py [--table-gib 1 --steps 300 --dir DIR --json]

The machine's other load shows in every figure: each pair is measured interleaved, so ratios hold
better than absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import engram
from engram.making.build import build_table
from engram.opening import open as open_table
from engram.serving.direct import _plan_extents
from engram.serving.placement import random_reads
from engram.serving.uring import Ring


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each function, called in turn `rounds` times (after one warm-up call each)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def make_table(root: Path, gib: float, vocab: int) -> Path:
    H, D, layers = 16, 64, (1, 2)
    base = int(gib * 2**30 / (len(layers) * H * D * 4))
    comp = engram.Compression.identity(vocab)
    spec = engram.TableSpec(engram_vocab_size=(base, base), max_ngram_size=3, n_head_per_ngram=8,
                            n_embed_per_ngram=8 * D, layer_ids=layers, compressed_vocab_size=vocab)
    path = root / f"tiers-{gib}.engram"
    try:
        with open_table(path, spec=spec, compression=comp):
            return path
    except engram.EngramError:
        build_table(path, spec, comp, seed=0, overwrite=path.exists()).close()
        return path


def old_layout(path: Path) -> Path:
    """The table at `path` again, in chunk files of 64 MiB + 64 KiB (built once, beside it)."""
    with open_table(path) as table:
        spec, comp = table.spec, table.compression
    old = path.with_name(path.stem + "-old.engram")
    chunk_rows = ((64 << 20) + (64 << 10)) // spec.row_bytes
    try:
        with open_table(old, spec=spec, compression=comp) as table:
            if table.layout(spec.layer_ids[0]).chunk_rows == chunk_rows:
                return old
    except engram.EngramError:
        pass
    build_table(old, spec, comp, seed=0, chunk_rows=chunk_rows, overwrite=old.exists()).close()
    return old


def hot(path: Path, rounds: int, vocab: int) -> dict:
    ids = np.random.default_rng(0).integers(0, vocab, (8, 4096))
    with contextlib.ExitStack() as stack:
        ram = stack.enter_context(open_table(path, tier="ram"))
        mapped = stack.enter_context(open_table(path, tier="mmap", prefault=True))
        old = stack.enter_context(open_table(old_layout(path), tier="mmap", prefault=True))
        for table in (mapped, old):
            if not torch.equal(ram.lookup(ids, 1), table.lookup(ids, 1)):
                raise SystemExit("mmap and ram lookups differ")
        t = interleaved({"ram": lambda: ram.lookup(ids, 1), "mmap": lambda: mapped.lookup(ids, 1),
                         "mmap_old": lambda: old.lookup(ids, 1)}, rounds)
        return {"ram_ms": t["ram"] * 1e3, "mmap_ms": t["mmap"] * 1e3, "mmap_vs_ram": t["mmap"] / t["ram"],
                "mmap_old_ms": t["mmap_old"] * 1e3, "mmap_old_vs_ram": t["mmap_old"] / t["ram"],
                "mmap_old_hugepage_bytes": old._tier.hugepage_bytes(),
                "ram_hugepage_bytes": ram._tier.hugepage_bytes(), "mmap_hugepage_bytes": mapped._tier.hugepage_bytes(),
                "table_disk_bytes": sum(ram.layout(lid).disk_bytes for lid in ram.spec.layer_ids),
                "mmap_madv_hugepage": mapped._tier.hugepages}


def cold(path: Path, steps: int, vocab: int, batch: int) -> dict:
    rng = np.random.default_rng(batch)
    with open_table(path, tier="direct") as table:
        reader, spec, layer = table._tier.reader, table.spec, 1
        if reader.io_engine != "io_uring":
            raise SystemExit("no io_uring here: the direct tier reads with threads only")
        hasher = engram.NgramHasher(spec, table.compression)
        offsets = np.asarray(spec.head_offsets(layer), np.int64)
        lay, ring = table.layout(layer), Ring.create(reader._io_threads)
        assert ring is not None
        stage = reader._staging(64 << 20)
        state: dict = {}

        def next_step() -> None:      # a fresh step: new ids, so no read is served twice in a row
            ids = rng.integers(0, vocab, (batch, 1))
            rows = (hasher.hash(ids, layer) + offsets).reshape(-1)
            plan = _plan_extents(np.unique(rows), lay)
            n = plan["ext_len"].size
            state.update(ids=ids, rows=rows, out=torch.empty(rows.size, spec.head_dim), sqes=Ring.reads(
                reader._fd_arrays[layer][plan["ext_chunk"]], plan["ext_start"], plan["ext_len"],
                stage.ctypes.data + np.arange(n) * 131072))
            state["reads"] = n

        def disk() -> None:
            for _, res in ring.run(state["sqes"], depth=reader._io_threads):
                assert (res > 0).all()

        def engine(name: str) -> Callable[[], object]:
            def gather() -> None:
                reader.io_engine = name
                table._engine.gather(layer, state["rows"], state["out"])
            return gather

        def lookup(name: str) -> Callable[[], object]:
            def run() -> None:
                reader.io_engine = name
                table.lookup(state["ids"], layer)
            return run

        fns = {"disk": disk, "gather_io_uring": engine("io_uring"), "gather_threads": engine("threads"),
               "lookup_io_uring": lookup("io_uring"), "lookup_threads": lookup("threads")}
        times: dict[str, list[float]] = {name: [] for name in fns}
        reads = []
        for _ in range(steps):
            next_step()
            reads.append(state["reads"])
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        med = {name: float(np.median(t)) for name, t in times.items()}
    out = {f"{name}_us": s * 1e6 for name, s in med.items()}
    out.update({f"{name}_vs_disk": s / med["disk"] for name, s in med.items() if name != "disk"})
    out.update(reads_per_step=float(np.mean(reads)), batch=batch,
               threads_vs_io_uring_gather=med["gather_threads"] / med["gather_io_uring"],
               threads_vs_io_uring_lookup=med["lookup_threads"] / med["lookup_io_uring"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table-gib", type=float, default=1.0, help="table size (default 1)")
    parser.add_argument("--rounds", type=int, default=15, help="hot lookups timed per tier (default 15)")
    parser.add_argument("--steps", type=int, default=300, help="cold decode steps timed (default 300)")
    parser.add_argument("--vocab", type=int, default=50_000, help="token ids drawn from [0, vocab) (default 50000)")
    parser.add_argument("--dir", help="where the table is built (kept for the next run); default a temporary one")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        root = Path(args.dir) if args.dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.mkdir(parents=True, exist_ok=True)
        path = make_table(root, args.table_gib, args.vocab)
        lay = engram.open(path, tier="direct")
        first = lay.chunk_files(1)[0]
        lay.close()
        results = {"hot": hot(path, args.rounds, args.vocab),
                   "cold": {f"[{b}, 1]": cold(path, args.steps, args.vocab, b) for b in (1, 8)},
                   "inspect_probe": random_reads(first, 0, first.stat().st_size)}
    if args.json:
        print(json.dumps(results, indent=1))
        return
    h = results["hot"]
    print(f"hot [8, 4096] lookup, one layer: ram {h['ram_ms']:.1f} ms, mmap {h['mmap_ms']:.1f} ms "
          f"(mmap/ram {h['mmap_vs_ram']:.2f}), mmap old {h['mmap_old_ms']:.1f} ms ({h['mmap_old_vs_ram']:.2f}); "
          f"on 2 MiB pages: ram {h['ram_hugepage_bytes'] >> 20} MiB, mmap {h['mmap_hugepage_bytes'] >> 20} MiB, "
          f"mmap old {h['mmap_old_hugepage_bytes'] >> 20} MiB, of {h['table_disk_bytes'] >> 20} MiB of chunk files")
    print(f"\n{'cold decode step':<18}{'reads':>6}{'disk us':>9}{'gather io_uring':>17}{'gather threads':>16}"
          f"{'lookup io_uring':>17}{'lookup threads':>16}")
    for name, c in results["cold"].items():
        cells = "".join(f"{c[k + '_us']:>9.0f} ({c[k + '_vs_disk']:.2f}x)" for k in
                        ("gather_io_uring", "gather_threads", "lookup_io_uring", "lookup_threads"))
        print(f"{name:<18}{c['reads_per_step']:>6.1f}{c['disk_us']:>9.0f}{cells}")
    p = results["inspect_probe"]
    print(f"\nthe disk as engram inspect probes it: {p['reads_per_s_qd1']:,.0f} reads/s at depth 1, "
          f"{p['reads_per_s']:,.0f} at {p['in_flight']} (O_DIRECT: {p['o_direct']})")


if __name__ == "__main__":
    main()
