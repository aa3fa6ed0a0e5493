"""Sharded lookup throughput at 1, 2 and 4 ranks on one host, against the unsharded table, in one run.

Workload (defaults): N=3, K=8 (H=16 heads), D=64 float32 (256 B rows), one layer of about
--table-mib MiB, page-cache hot on "mmap"; every rank looks up its own [B, T] = [8, 1024] ids.

- baseline: the unsharded table in this process, `table.lookup(ids, layer)` (one thread);
- sharded: W ranks (torch.multiprocessing, gloo over localhost TCP, one thread each), each with
  its part (`engram.making.sharding.shard_table`), all calling `ShardedTable.lookup` together; the time
  of a step is the slowest rank's, tokens/s = W*B*T / that time. Also reported: bytes each rank
  sends and receives per token of its own (`wire_stats`: row ids out, rows back; self-sends
  excluded) and the share of distinct rows.
- plan: DeepSeek-V4.1's table (188.8 GiB, FP8 rows of 264 B stored, 48 rows per token; DESIGN.md
  item 8) split over hosts with --host-ram-gib of RAM (--usable of it for the table, one copy
  per host shared by its processes over mmap): parts needed, bytes on the wire per token (rows
  travel as stored FP8; decoded bf16 rows shown for comparison), and tokens/s per rank expected
  from this run's measured per-rank row rate and the link speed.

    python tools/bench_sharded.py [--ranks 1 2 4 --table-mib 256 --repeats 10 --json]

On a host with fewer cores than ranks the ranks share cores: read per-rank figures with that in mind.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import engram
from engram.making.sharding import shard_path, shard_table

V41_BYTES = 188.8 * 2**30       # DESIGN.md item 8
V41_ROW_BYTES = 264             # FP8 E4M3 values + E8M0 scales, as stored
V41_DECODED_ROW_BYTES = 512     # the same row decoded to bfloat16 (what sending decoded rows would cost)
V41_ROWS_PER_TOKEN = 48


def _rank(rank: int, world: int, port: int, root: str, batch: int, seq: int, repeats: int, out: str,
          wire_dedup: bool) -> None:
    import torch.distributed as dist

    from engram.distributed import ShardedTable

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    path = Path(root, "table") if world == 1 else shard_path(Path(root, "table"), rank, world)
    st = ShardedTable(path, tier="mmap", wire_dedup=wire_dedup)
    vocab = st.compression.vocab_size
    ids = [np.random.default_rng([rank, i]).integers(0, vocab, (batch, seq)) for i in range(repeats + 1)]
    st.lookup(ids[0], 1)                                   # warm: pages, buffers, connections
    st.reset_stats()                                      # count the timed lookups only
    times = []
    for i in range(1, repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        st.lookup(ids[i], 1)
        times.append(time.perf_counter() - start)
    slowest = [0.0] * repeats
    gathered: list = [None] * world
    dist.all_gather_object(gathered, times)
    for t in gathered:
        slowest = [max(a, b) for a, b in zip(slowest, t, strict=True)]
    wire = st.wire_stats()
    if rank == 0:
        Path(out).write_text(json.dumps({"step_seconds": statistics.median(slowest), "wire": wire}))
    st.close()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, root: Path, batch: int, seq: int, repeats: int, wire_dedup: bool) -> dict:
    import torch.multiprocessing as mp

    out = root / f"result-{world}.json"
    mp.start_processes(_rank, args=(world, _free_port(), os.fspath(root), batch, seq, repeats, os.fspath(out),
                                    wire_dedup),
                       nprocs=world, join=True, start_method="spawn")
    return json.loads(out.read_text())


def baseline(root: Path, batch: int, seq: int, repeats: int) -> float:
    """Median seconds of one unsharded lookup of [batch, seq] ids in this process."""
    torch.set_num_threads(1)
    with engram.open(root / "table", tier="mmap") as table:
        vocab = table.compression.vocab_size
        ids = [np.random.default_rng([0, i]).integers(0, vocab, (batch, seq)) for i in range(repeats + 1)]
        table.lookup(ids[0], 1)
        times = []
        for i in range(1, repeats + 1):
            start = time.perf_counter()
            table.lookup(ids[i], 1)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def plan_v41(unsharded_rows_per_s: float, sharded_rows_per_s: float, host_ram_gib: float, usable: float,
             link_gbit: float, unique_fraction: float) -> dict:
    """V4.1's table over hosts of `host_ram_gib`: parts, wire bytes per token, expected tokens/s per rank.

    Bounds per rank, in tokens/s: the gather (this run's unsharded rows/s in one process, over 48
    rows a token), the transport (this run's sharded rows/s per rank at the most ranks that each
    have a core: hashing, gloo over loopback TCP, gathers and scatters), and the link
    (--link-gbit over the wire bytes of a token). Expected: the least of the three.
    """
    per_host = host_ram_gib * 2**30 * usable
    parts = max(1, math.ceil(V41_BYTES / per_host))
    remote = (parts - 1) / parts                        # share of a token's rows held by another host
    rows = V41_ROWS_PER_TOKEN * unique_fraction          # rows a rank sends per token
    wire = {name: rows * remote * (8 + row) for name, row in
            (("decoded_bf16", V41_DECODED_ROW_BYTES), ("stored_fp8", V41_ROW_BYTES))}
    link = {k: link_gbit * 1e9 / 8 / v if v else math.inf for k, v in wire.items()}
    gather = unsharded_rows_per_s / V41_ROWS_PER_TOKEN
    transport = sharded_rows_per_s / V41_ROWS_PER_TOKEN if parts > 1 else math.inf
    return {"host_ram_gib": host_ram_gib, "parts": parts, "gib_per_part": V41_BYTES / parts / 2**30,
            "remote_share": remote, "wire_bytes_per_token": wire, "gather_bound": gather,
            "transport_bound": transport, "link_bound": link,
            "expected_tokens_per_s": {k: min(gather, transport, v) for k, v in link.items()}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--table-mib", type=int, default=256, help="size of the one layer looked up")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--wire-dedup", action="store_true", help="send each distinct row of a lookup once")
    p.add_argument("--host-ram-gib", type=float, nargs="+", default=[64.0, 128.0, 256.0],
                   help="plan: RAM of one host (one plan per value)")
    p.add_argument("--usable", type=float, default=0.75, help="plan: share of a host's RAM for the table")
    p.add_argument("--link-gbit", type=float, default=100.0, help="plan: network bandwidth per host, Gbit/s")
    p.add_argument("--dir", help="where to build the table (default: a temporary directory)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        K, N, D = 8, 3, 64
        base = max(1000, (args.table_mib << 20) // (4 * D) // ((N - 1) * K))
        spec = engram.TableSpec(engram_vocab_size=(base,) * (N - 1), max_ngram_size=N, n_head_per_ngram=K,
                                n_embed_per_ngram=K * D, layer_ids=(1,), compressed_vocab_size=50000)
        engram.build_table(root / "table", spec, engram.Compression.identity(50000), progress=False).close()
        for w in args.ranks:
            if w > 1:
                shard_table(root / "table", root / "table", w, progress=False)
        tokens = args.batch * args.seq
        base_s = baseline(root, args.batch, args.seq, args.repeats)
        result = {"workload": {"batch": args.batch, "seq": args.seq, "heads": spec.heads_per_layer,
                               "row_bytes": spec.row_bytes, "table_bytes": spec.total_bytes,
                               "cpus": os.cpu_count(), "wire_dedup": args.wire_dedup},
                  "unsharded_tokens_per_s": tokens / base_s, "ranks": {}}
        for w in args.ranks:
            r = run_ranks(w, root, args.batch, args.seq, args.repeats, args.wire_dedup)
            own = tokens * args.repeats                   # tokens rank 0 looked up in the timed steps
            wire = r["wire"]
            result["ranks"][w] = {
                "tokens_per_s": w * tokens / r["step_seconds"],
                "per_rank_tokens_per_s": tokens / r["step_seconds"],
                "vs_unsharded": (w * tokens / r["step_seconds"]) / (tokens / base_s),
                "bytes_sent_per_token": wire["bytes_sent"] / own,
                "bytes_received_per_token": wire["bytes_received"] / own,
                "unique_fraction": wire["rows_unique"] / max(1, wire["rows_requested"]),
            }
        fit = [w for w in args.ranks if w <= (os.cpu_count() or 1)]    # ranks that each have a core
        top = result["ranks"][max(fit or args.ranks)]
        H = spec.heads_per_layer
        rates = (result["unsharded_tokens_per_s"] * H, top["per_rank_tokens_per_s"] * H)   # rows/s
        result["plan_v41"] = [plan_v41(*rates, ram, args.usable, args.link_gbit, top["unique_fraction"])
                              for ram in args.host_ram_gib]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result, args)
    return result


def _print(r: dict, args: argparse.Namespace) -> None:
    w = r["workload"]
    print(f"lookup of [{w['batch']}, {w['seq']}] ids per rank, one layer of {w['table_bytes'] / 2**20:.0f} MiB, "
          f"{w['heads']} heads x {w['row_bytes']} B rows, mmap (hot), {w['cpus']} CPUs, "
          f"wire_dedup={w['wire_dedup']}")
    print(f"  unsharded, one process        {r['unsharded_tokens_per_s'] / 1e6:7.3f} M tokens/s")
    for n, e in r["ranks"].items():
        print(f"  {n} rank(s), sharded            {e['tokens_per_s'] / 1e6:7.3f} M tokens/s  "
              f"({e['vs_unsharded']:.2f}x unsharded; {e['per_rank_tokens_per_s'] / 1e6:.3f} M per rank; "
              f"{e['bytes_sent_per_token']:.0f} B out + {e['bytes_received_per_token']:.0f} B in per token, "
              f"{e['unique_fraction']:.2f} distinct)")
    print(f"plan, V4.1 (188.8 GiB, 48 rows of 264 B a token): {args.usable:.0%} of each host's RAM for the table, "
          f"{args.link_gbit:.0f} Gbit/s links; per rank, M tokens/s:")
    print("  host RAM  parts  GiB/part  remote  wire B/token (bf16 / fp8)  gather  transport  link (bf16 / fp8)  "
          "expected (bf16 / fp8)")
    for p in r["plan_v41"]:
        wire, link, exp = p["wire_bytes_per_token"], p["link_bound"], p["expected_tokens_per_s"]
        print(f"  {p['host_ram_gib']:5.0f} GiB  {p['parts']:5d}  {p['gib_per_part']:8.1f}  {p['remote_share']:6.0%}  "
              f"{wire['decoded_bf16']:12.0f} / {wire['stored_fp8']:5.0f}  {p['gather_bound'] / 1e6:6.3f}  "
              f"{p['transport_bound'] / 1e6:9.3f}  {link['decoded_bf16'] / 1e6:7.2f} / "
              f"{link['stored_fp8'] / 1e6:5.2f}  "
              f"{exp['decoded_bf16'] / 1e6:9.3f} / {exp['stored_fp8'] / 1e6:5.3f}")

if __name__ == "__main__":
    main(sys.argv[1:])
