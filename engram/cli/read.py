"""`engram inspect`, `engram verify` and `engram bench`: the subcommands that read a table."""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from engram.cli.common import (
    EXIT_CHECK_FAILED,
    Output,
    encoding,
    encoding_text,
    fmt_int,
    human_bytes,
)
from engram.cli.shard import part_text


# -- engram inspect ------------------------------------------------------------------------------
def _row_sample(table: Any, layer_id: int, n: int, rng: np.random.Generator) -> dict[str, Any]:
    """Norm and value statistics of `n` random rows, decoded to float32 (quantized rows dequantized)."""
    import torch

    lo, hi = (0, table.spec.rows(layer_id)) if table.shard is None else table.shard.ranges[layer_id]
    idx = lo + np.sort(rng.choice(hi - lo, size=min(n, hi - lo), replace=False))
    rows = table.rows(layer_id, idx, dtype=torch.float32)
    norms = rows.norm(dim=1)
    n = idx.size
    return {"rows": n, "norm_mean": float(norms.mean()), "norm_std": float(norms.std()) if n > 1 else 0.0,
            "norm_min": float(norms.min()), "norm_max": float(norms.max()),
            "all_zero_rows": int((rows == 0).all(dim=1).sum()),
            "value_mean": float(rows.mean()), "value_std": float(rows.std()) if rows.numel() > 1 else 0.0}


def cmd_inspect(args: argparse.Namespace) -> Output:
    from engram.release.folder import is_release_dir

    if is_release_dir(args.path):
        from engram.cli.checkpoint import cmd_inspect_checkpoint

        return cmd_inspect_checkpoint(args)
    from engram.addressing.hashing import NgramHasher
    from engram.opening import open as open_table

    with open_table(args.path) as table:
        spec = table.spec
        hasher = NgramHasher(spec, table.compression)
        rng = np.random.default_rng(0)
        layers = {}
        for lid in spec.layer_ids:
            lay = table.layout(lid)
            entry: dict[str, Any] = {
                "array": lay.array, "rows": lay.rows, "bytes": lay.rows * spec.stored_row_bytes,
                "disk_bytes": lay.disk_bytes,
                "chunks": lay.n_chunks, "chunk_rows": lay.chunk_rows,
                "checksums": len([c for c in lay.checksums if c]), "scales": None,
                "table_sizes": list(spec.table_sizes(lid)),
            }
            if lay.scales is not None:
                entry["scales"] = {"array": lay.scales.array, "disk_bytes": lay.scales.disk_bytes,
                                   "checksums": len([c for c in lay.scales.checksums if c])}
            if spec.hash == "multiplicative-xor":
                entry["multipliers"] = hasher.multipliers(lid).tolist()
            if args.sample_rows:
                entry["sample"] = _row_sample(table, lid, args.sample_rows, rng)
            layers[lid] = entry
        payload = {"path": args.path, "format_version": table.format_version, "spec": spec.to_dict(),
                   "encoding": encoding(spec),
                   "compression": {"vocab_size": table.compression.vocab_size,
                                   "compressed_vocab_size": table.compression.compressed_vocab_size,
                                   "fingerprint": table.compression.fingerprint},
                   "bytes": sum(e["bytes"] for e in layers.values()),
                   "disk_bytes": sum(e["disk_bytes"] for e in layers.values()), "layers": layers,
                   "shard": None if table.shard is None else table.shard.to_dict()}
    lines = [f"{args.path}: engram table, format version {payload['format_version']}",
             f"  {encoding_text(spec)}",
             f"  N={spec.max_ngram_size}, K={spec.n_head_per_ngram} ({spec.heads_per_layer} heads/layer, "
             f"E={spec.embed_dim}); hash {spec.hash}, seed {spec.seed}, pad_id {spec.pad_id}",
             f"  compression: {table.compression.vocab_size:,} raw ids -> "
             f"{table.compression.compressed_vocab_size:,} (fingerprint {table.compression.fingerprint})",
             f"  {human_bytes(payload['bytes'])} of rows in {len(layers)} layer(s), "
             f"{human_bytes(payload['disk_bytes'])} on disk"]
    if table.shard is not None:
        lines.append(f"  {part_text(table.shard)} (of a sharded table: look it up with engram.distributed)")
    for lid, e in layers.items():
        lines.append(f"  layer {lid}: {fmt_int(e['rows'])} rows, {human_bytes(e['bytes'])} "
                     f"({human_bytes(e['disk_bytes'])} on disk), {e['chunks']} chunk(s) of "
                     f"{fmt_int(e['chunk_rows'])} rows, {e['checksums']}/{e['chunks']} checksums")
        if e["scales"] is not None:
            sc = e["scales"]
            lines.append(f"    scales in {sc['array']}: {human_bytes(sc['disk_bytes'])} on disk, "
                         f"{sc['checksums']}/{e['chunks']} checksums")
        lines.append(f"    head sizes: {e['table_sizes']}")
        if "multipliers" in e:
            lines.append(f"    multipliers: {e['multipliers']}")
        if "sample" in e:
            sm = e["sample"]
            decoded = ", decoded" if spec.quantized else ""
            lines.append(f"    sample of {sm['rows']} rows{decoded}: norm {sm['norm_mean']:.4g} +- "
                         f"{sm['norm_std']:.3g} [{sm['norm_min']:.4g}, {sm['norm_max']:.4g}], "
                         f"{sm['all_zero_rows']} all-zero")
    return Output(payload, "\n".join(lines))


# -- engram verify -------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> Output:
    from engram.errors import CorruptTableError
    from engram.opening import open as open_table

    start = time.perf_counter()
    try:
        with open_table(args.path) as table:
            in_place = hasattr(table, "tensors")        # a checkpoint served in place: tensors, not chunks
            chunks = 2 * len(table.spec.layer_ids) if in_place else \
                sum(arr.n_chunks for lid in table.spec.layer_ids for arr in table.layout(lid).arrays())
            table.verify(progress=None if not args.json else False)
    except CorruptTableError as exc:
        payload = {"path": args.path, "ok": False, "error": str(exc), "error_type": type(exc).__name__,
                   "exit_code": EXIT_CHECK_FAILED}
        return Output(payload, f"{args.path}: CORRUPT: {exc}", EXIT_CHECK_FAILED)
    seconds = time.perf_counter() - start
    payload = {"path": args.path, "ok": True, "chunks": chunks, "seconds": seconds}
    if in_place:
        return Output(payload, f"{args.path}: ok, {chunks} row and scale tensor(s): headers unchanged, no NaN "
                               f"codes ({seconds:.1f} s)")
    return Output(payload, f"{args.path}: ok, {chunks} chunk file(s) match their checksums ({seconds:.1f} s)")


# -- engram bench -------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> Output:
    from engram.cli.bench import bench_table

    r = bench_table(args.path, tiers=args.tier, batch=args.batch, seq=args.seq, layer_id=args.layer,
                    repeats=args.repeats, cold=args.cold)
    w = r["workload"]
    stored = f" (scales included, decoded to {w['decoded_dtype']})" if w["quantized"] else ""
    lines = [f"lookup of B={w['batch']} x T={w['seq']} tokens, layer {w['layer_id']}, {w['heads']} heads x "
             f"{w['dtype']} rows of {w['row_bytes']} B{stored}, one thread"]
    if w["baselines_skipped"]:
        lines.append(f"  (baselines skipped: their in-RAM copy of the layer, {human_bytes(w['baseline_bytes'])}, "
                     "is over their budget)")
    elif w["quantized"]:
        lines.append(f"  baselines gather the rows decoded once to {w['decoded_dtype']} in RAM "
                     f"({w['baseline_row_bytes']} B per row); the tiers decode every lookup")
    for name, rate in r["baselines"].items():
        lines.append(f"  baseline {name:13s} {rate / 1e6:8.3f} M tokens/s")
    for tier, e in r["tiers"].items():
        ratios = ", ".join(f"{e[k]:.2f}x {k[3:]}" for k in e if k.startswith("vs_"))
        # "direct" reads its rows from the files on every lookup, page cache or not: neither hot nor cold
        state = "cold" if e["cold"] else ("disk" if tier == "direct" else "hot")
        lines.append(f"  {tier:6s} ({state:4s})         {e['tokens_per_s'] / 1e6:8.3f} M tokens/s"
                     + (f"  ({ratios})" if ratios else ""))
    return Output(r, "\n".join(lines))


