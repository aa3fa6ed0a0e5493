"""Row codecs on the lookup path: bytes per row, gather + decode throughput, and table lookups per row dtype.

Codecs: for each row width D (64: the demo config; 256: DeepSeek-V4.1 rows) a table of random rows
is encoded in every dtype; one lookup's worth of random row ids (B*T*H, default 8*4096*16) is then
gathered with `index_select(..., out=)` into reused buffers (values and scales) and decoded with
`engram.storage.quant.decode(..., out=)`. The float32 baseline is the gather straight into the output,
with nothing to decode. Reports rows/s for the gather, the decode and both, and the ratio of the
total to the float32 baseline; decoded rows are first checked against a decode of the whole table.

Tables (`--tables`): a float32 table (N=3, K=8: 16 heads, base size `--table-base` per order) is
built once per D and converted with `engram.convert` to every other dtype, so all tables hold the
same rows; then `table.lookup(ids, layer)` of random [B, T] ids is timed per dtype and tier ("ram",
and "mmap" with the page cache hot), as tokens/s and relative to float32, bfloat16 and float8_e4m3
on the same tier in the same run (int4 / int2 use groups of `--block` values, as FP8 its blocks). The
dequantization share is the time of `quant.decode` alone on one lookup's gathered rows (values and
scales already in memory) over the lookup's time.

    python tools/bench_quant.py [--batch 8 --seq 4096 --heads 16 --dims 64,256 --repeats 5 --json]
    python tools/bench_quant.py --tables [--table-base 8192 --tiers ram,mmap --dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

import engram
from engram.cli.bench import best_time
from engram.storage import quant

DTYPES = ("float32", "bfloat16", "int8", "float8_e4m3", "int4", "int2")
BASELINES = ("float32", "bfloat16", "float8_e4m3")    # each dtype's lookup speed is reported relative to these


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
    g_values = torch.empty((n, values.shape[1]), dtype=values.dtype)      # [n, W]: packed int4 / int2 codes
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


def time_decode(q: quant.QuantizedRows, repeats: int) -> float:
    """Best time of decoding stored rows to float32 into a reused buffer."""
    values, scales = torch.from_numpy(q.values), torch.from_numpy(q.scales)
    out = torch.empty(quant.decoded_shape(tuple(values.shape), q.dtype), dtype=torch.float32)
    return best_time(lambda: quant.decode(values, scales, q.dtype, block=q.block, out=out), repeats)


def bench_tables(D: int, args: argparse.Namespace, root: Path) -> dict:
    """Lookup tokens/s per dtype and tier on tables holding the same rows; bytes per row; decode share."""
    comp = engram.Compression.identity(50000)
    spec = engram.TableSpec(engram_vocab_size=(args.table_base, args.table_base), max_ngram_size=3,
                            n_head_per_ngram=8, n_embed_per_ngram=8 * D, layer_ids=(1,),
                            compressed_vocab_size=comp.compressed_vocab_size, scale_block=args.block)
    ids = np.random.default_rng(0).integers(0, comp.vocab_size, (args.batch, args.seq))
    paths = {"float32": root / f"float32-{D}.engram"}
    engram.build_table(paths["float32"], spec, comp, seed=0, progress=False).close()
    out: dict = {"rows": spec.rows(1), "heads": spec.heads_per_layer, "dtypes": {}}
    for dtype in DTYPES[1:]:
        paths[dtype] = root / f"{dtype}-{D}.engram"
        report = engram.convert(paths["float32"], paths[dtype], dtype=dtype, sample_rows=65536)
        out["dtypes"][dtype] = {"rms_rel_error": report.layers[1].rms_rel_error,
                                "max_rel_error": report.layers[1].max_rel_error}
    out["dtypes"]["float32"] = {"rms_rel_error": 0.0, "max_rel_error": 0.0}
    tokens = ids.size
    for dtype, path in paths.items():
        entry = out["dtypes"][dtype]
        with engram.open(path, tier="mmap") as table:
            entry["bytes_per_row"] = table.spec.stored_row_bytes
            entry["table_bytes"] = table.nbytes
            rows = engram.NgramHasher(table.spec, comp).global_rows(ids, 1)
            q = table.stored_rows(1, rows.reshape(-1))                  # one lookup's rows, as stored
            decode_s = 0.0 if q.scales is None else time_decode(q, args.repeats)
            del q
        for tier in args.tiers.split(","):
            with engram.open(path, tier=tier) as table:
                seconds = best_time(lambda t=table: t.lookup(ids, 1), args.repeats)   # warm-up first: hot pages
            entry[tier] = {"tokens_per_s": tokens / seconds, "decode_share": decode_s / seconds}
    for entry in out["dtypes"].values():
        for tier in args.tiers.split(","):
            for base in BASELINES:
                entry[tier][f"vs_{base}"] = entry[tier]["tokens_per_s"] / out["dtypes"][base][tier]["tokens_per_s"]
    for path in paths.values():
        shutil.rmtree(path)
    return out


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
    parser.add_argument("--tables", action="store_true", help="time table lookups per dtype and tier instead")
    parser.add_argument("--table-base", type=int, default=8192, help="base table size per order (--tables)")
    parser.add_argument("--tiers", default="ram,mmap", help="tiers timed (--tables), comma separated")
    parser.add_argument("--dir", default=None, help="where the --tables tables are built (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if args.tables:
        return main_tables(args)
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


def main_tables(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    results: dict = {"batch": args.batch, "seq": args.seq, "block": args.block, "threads": args.threads,
                     "table_base": args.table_base, "dims": {}}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for D in (int(d) for d in args.dims.split(",")):
            results["dims"][str(D)] = bench_tables(D, args, Path(tmp))
    if args.json:
        print(json.dumps(results, indent=2))
        return results
    tiers = args.tiers.split(",")
    print(f"table.lookup of [B, T] = [{args.batch}, {args.seq}] random ids, 16 heads (N=3, K=8), one layer, "
          f"{args.threads} thread(s); same rows in every dtype (engram.convert from float32)")
    for D, res in results["dims"].items():
        print(f"D={D}, {res['rows']} rows: {'dtype':12s} {'B/row':>6s} {'rms err':>8s} "
              + " ".join(f"{t + ' Mtok/s':>12s} {'vs f32':>6s} {'vs bf16':>7s} {'vs fp8':>6s} {'decode':>6s}"
                         for t in tiers))
        for dtype, e in res["dtypes"].items():
            cells = " ".join(f"{e[t]['tokens_per_s'] / 1e6:12.3f} {e[t]['vs_float32']:6.2f} {e[t]['vs_bfloat16']:7.2f} "
                             f"{e[t]['vs_float8_e4m3']:6.2f} {e[t]['decode_share']:6.0%}" for t in tiers)
            print(f"{'':{len(D) + 15}s}{dtype:12s} {e['bytes_per_row']:6d} {e['rms_rel_error']:8.2e} {cells}")
    return results


if __name__ == "__main__":
    main()
