"""Row codecs on the lookup path: bytes per row and gather + decode throughput per row dtype.

For each row width D (64: the demo config; 256: DeepSeek-V4.1 rows) a table of random rows is
encoded in every dtype; one lookup's worth of random row ids (B*T*H, default 8*4096*16) is then
gathered with `index_select(..., out=)` into reused buffers (values and scales) and decoded with
`engram.quant.decode(..., out=)`. The float32 baseline is the gather straight into the output,
with nothing to decode. Reports rows/s for the gather, the decode and both, and the ratio of the
total to the float32 baseline; decoded rows are first checked against a decode of the whole table.

    python tools/bench_quant.py [--batch 8 --seq 4096 --heads 16 --dims 64,256 --repeats 5 --json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from engram import quant

DTYPES = ("float32", "bfloat16", "int8", "float8_e4m3")


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_dtype(dtype: str, rows: torch.Tensor, idx: torch.Tensor, block: int, out_dtype: torch.dtype,
                repeats: int) -> dict:
    """Gather and decode timings of one dtype; rows [table_rows, D] float32, idx [n] int64."""
    n, D = idx.numel(), rows.shape[1]
    out = torch.empty(n, D, dtype=out_dtype)
    if dtype == "float32" and out_dtype == torch.float32:   # the baseline: a plain gather
        gather_s = best_time(lambda: torch.index_select(rows, 0, idx, out=out), repeats)
        return {"bytes_per_row": quant.bytes_per_row(dtype, D), "gather_rows_per_s": n / gather_s,
                "decode_rows_per_s": None, "rows_per_s": n / gather_s}
    q = quant.encode(rows, dtype, block)
    values = torch.from_numpy(q.values)
    scales = None if q.scales is None else torch.from_numpy(q.scales)
    g_values = torch.empty((n, D), dtype=values.dtype)
    g_scales = None if scales is None else torch.empty((n, *scales.shape[1:]), dtype=scales.dtype)

    def gather() -> None:
        torch.index_select(values, 0, idx, out=g_values)
        if scales is not None:
            torch.index_select(scales, 0, idx, out=g_scales)

    def decode() -> None:
        quant.decode(g_values, g_scales, dtype, block=block, out=out)

    gather()
    decode()
    check = idx[:4096]
    want = quant.decode(values[check], None if scales is None else scales[check], dtype, block=block,
                        out_dtype=out_dtype)
    if not torch.equal(out[:4096].nan_to_num(), want.nan_to_num()):
        raise AssertionError(f"{dtype}: decoding gathered rows differs from decoding the table's rows")
    gather_s, decode_s = best_time(gather, repeats), best_time(decode, repeats)
    total_s = best_time(lambda: (gather(), decode()), repeats)
    return {"bytes_per_row": quant.bytes_per_row(dtype, D, block), "gather_rows_per_s": n / gather_s,
            "decode_rows_per_s": n / decode_s, "rows_per_s": n / total_s}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="B")
    parser.add_argument("--seq", type=int, default=4096, help="T")
    parser.add_argument("--heads", type=int, default=16, help="H: rows gathered per token")
    parser.add_argument("--dims", default="64,256", help="row widths D, comma separated")
    parser.add_argument("--table-rows", type=int, default=1 << 18, help="rows of the table gathered from")
    parser.add_argument("--block", type=int, default=32, help="values per E8M0 scale (float8_e4m3)")
    parser.add_argument("--out-dtype", choices=("float32", "bfloat16"), default="float32", help="decoded dtype")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (best is kept)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dtype = getattr(torch, args.out_dtype)
    n = args.batch * args.seq * args.heads
    results: dict = {"batch": args.batch, "seq": args.seq, "heads": args.heads, "rows_per_lookup": n,
                     "table_rows": args.table_rows, "block": args.block, "out_dtype": args.out_dtype,
                     "threads": args.threads, "dims": {}}
    gen = torch.Generator().manual_seed(0)
    for D in (int(d) for d in args.dims.split(",")):
        rows = torch.randn(args.table_rows, D, generator=gen) * 0.02
        idx = torch.randint(0, args.table_rows, (n,), generator=gen)
        entries = {dtype: bench_dtype(dtype, rows, idx, args.block, out_dtype, args.repeats) for dtype in DTYPES}
        base = entries["float32"]["rows_per_s"]
        for entry in entries.values():
            entry["ratio_to_float32"] = entry["rows_per_s"] / base
        results["dims"][str(D)] = entries
        del rows, idx

    if args.json:
        print(json.dumps(results, indent=2))
        return results
    print(f"gather + decode of B*T*H = {args.batch}*{args.seq}*{args.heads} = {n} random rows "
          f"from {args.table_rows} rows, out {args.out_dtype}, {args.threads} thread(s)")
    for D, entries in results["dims"].items():
        print(f"D={D}: {'dtype':12s} {'B/row':>6s} {'gather':>9s} {'decode':>9s} {'total':>9s}  (M rows/s)")
        for dtype, e in entries.items():
            dec = "-" if e["decode_rows_per_s"] is None else f"{e['decode_rows_per_s'] / 1e6:9.1f}"
            print(f"       {dtype:12s} {e['bytes_per_row']:6d} {e['gather_rows_per_s'] / 1e6:9.1f} {dec:>9s} "
                  f"{e['rows_per_s'] / 1e6:9.1f}  {e['ratio_to_float32']:.2f}x float32")
    return results


if __name__ == "__main__":
    main()
