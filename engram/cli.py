"""The `engram` command line: parse arguments, call the library, print.

Every subcommand prints a human summary by default and one JSON object with `--json`. Errors go
to stderr; with `--json`, stdout also gets one object {"error": message, "error_type": the
exception's class name, "exit_code": code}.

Exit codes:
    0    success
    1    a check failed (`verify` found a damaged chunk)
    2    arguments that do not parse (usage error: a missing flag, an unknown choice, a count out of
         its range)
    3    engram refused the input, or a file could not be read or written (missing table, mismatched
         spec, bad ids, a missing or damaged tokenizer file, an output folder that does not exist, a
         table already at the output path without --overwrite, a --scale-block that does not divide D,
         a build that would not fit on the disk; a dry run of one prints its plan, then exits 3)
    130  interrupted
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .compression import Compression, load_tokenizer
from .dtypes import ROW_DTYPES as _ROW_DTYPES
from .errors import EngramError, InputError, SpecError
from .spec import HASH_FAMILIES, TableSpec

__all__ = ["main"]

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
ROW_DTYPES = tuple(_ROW_DTYPES)   # every row dtype a table can store: the choices of --dtype
BLOCK_DTYPE = "float8_e4m3"       # the one dtype whose scales cover blocks of --scale-block values


class Output:
    """What a command hands back: a JSON-ready payload and the human text for it."""

    def __init__(self, payload: dict[str, Any], text: str, code: int = EXIT_OK) -> None:
        self.payload, self.text, self.code = payload, text, code


# -- shared argument handling ----------------------------------------------------------------
def _load_compression(args: argparse.Namespace) -> Compression:
    if getattr(args, "tokenizer", None):
        return Compression.from_tokenizer_file(args.tokenizer)
    return Compression.identity(args.vocab_size)


def _read_spec(path: str, comp: Compression | None) -> Any:
    """The JSON of a --spec file; `compressed_vocab_size` may be left out and is then taken from `comp`."""
    if not os.path.isfile(path):
        raise SpecError(f"--spec file {path!r} does not exist: pass a JSON file of TableSpec fields")
    try:
        with open(path) as f:
            d = json.load(f)
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        raise SpecError(f"--spec file {path!r} is not valid JSON: {exc}") from exc
    if isinstance(d, dict) and "compressed_vocab_size" not in d and comp is not None:
        d["compressed_vocab_size"] = comp.compressed_vocab_size
    return d


def _load_spec(path: str, comp: Compression | None) -> TableSpec:
    """A spec from a JSON file of TableSpec fields."""
    return TableSpec.from_dict(_read_spec(path, comp))


def _with_encoding(spec: TableSpec, dtype: str, scale_block: int | None) -> TableSpec:
    """`spec` with rows stored as `dtype` (and `scale_block`, from --scale-block), or a SpecError naming the flag."""
    if scale_block is not None and dtype != BLOCK_DTYPE:
        raise InputError(f"--scale-block {scale_block} applies to {BLOCK_DTYPE} rows only, but the rows are "
                         f"{dtype}: drop --scale-block or pass --dtype {BLOCK_DTYPE}")
    try:
        return spec.replace(dtype=dtype, scale_block=spec.scale_block if scale_block is None else scale_block)
    except SpecError as exc:
        if dtype != BLOCK_DTYPE:
            raise
        raise SpecError(f"{exc}; pass --scale-block B with B a divisor of D={spec.head_dim}") from exc


def _load_build_spec(args: argparse.Namespace, comp: Compression) -> TableSpec:
    """The spec of `build` / `import`: the --spec file with --dtype and --scale-block applied."""
    d = _read_spec(args.spec, comp)
    if not isinstance(d, dict):
        return TableSpec.from_dict(d)            # refused with the reason
    dtype = args.dtype or d.get("dtype", "float32")
    if args.scale_block is not None:
        d["scale_block"] = args.scale_block
    # every other field checked first, so a refused row encoding is named as such
    base = TableSpec.from_dict({**d, "dtype": "float32"} if dtype in ROW_DTYPES else d)
    return _with_encoding(base, dtype, args.scale_block)


def _spec_and_compression(args: argparse.Namespace) -> tuple[TableSpec, Compression]:
    """From --table PATH, or from --spec plus --tokenizer/--vocab-size."""
    if getattr(args, "table", None):
        from .table import open as open_table

        with open_table(args.table) as table:
            return table.spec, table.compression
    comp = _load_compression(args)
    return _load_spec(args.spec, comp), comp


def _add_source(p: argparse.ArgumentParser, table_ok: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    if table_ok:
        src.add_argument("--table", metavar="PATH", help="take spec and compression from this table")
    src.add_argument("--spec", metavar="SPEC.json", help="TableSpec fields as JSON")


def _add_vocab(p: argparse.ArgumentParser, required: bool) -> None:
    vocab = p.add_mutually_exclusive_group(required=required)
    vocab.add_argument("--tokenizer", metavar="TOKENIZER.json", help="Hugging Face tokenizers file")
    vocab.add_argument("--vocab-size", type=_int_at_least(1), metavar="V", help="identity compression over V ids")


def _add_encoding(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=ROW_DTYPES, help="row dtype (default: the spec's)")
    p.add_argument("--scale-block", type=_int_at_least(1), metavar="B",
                   help=f"values per E8M0 scale of {BLOCK_DTYPE} rows, a divisor of D (default: the spec's, 32 "
                        "unless set)")


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= `low` (anything else is a usage error, exit 2)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{n} is invalid: pass an int >= {low}")
        return n

    parse.__name__ = f"int >= {low}"
    return parse


def _check_output_file(flag: str, path: str | None, example: str) -> None:
    """Refuse an output file that could not be written, before any long work starts."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{flag} {path!r}: the folder {folder!r} does not exist: create it first or pass a "
                         "path in an existing folder")
    if os.path.isdir(path):
        raise InputError(f"{flag} {path!r} is a folder: pass a file path, e.g. {os.path.join(path, example)!r}")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{flag} {path!r}: the folder {folder!r} is not writable: pass a path you can write")


def _fmt_int(n: int) -> str:
    return f"{n:,}"


# -- engram hash -------------------------------------------------------------------------------
def cmd_hash(args: argparse.Namespace) -> Output:
    from .hashing import NgramHasher

    spec, comp = _spec_and_compression(args)
    tokenizer = load_tokenizer(args.tokenizer)
    encoding = tokenizer.encode(args.text, add_special_tokens=False)
    ids = np.array([encoding.ids], dtype=np.int64)
    hasher = NgramHasher(spec, comp)
    K = spec.n_head_per_ngram
    layers = {}
    lines = [f"{len(encoding.ids)} tokens: " + " ".join(f"{t!r}" for t in encoding.tokens),
             "raw ids:        " + " ".join(map(str, ids[0])),
             "compressed ids: " + " ".join(map(str, comp(ids)[0]))]
    for layer_id in spec.layer_ids:
        rows = hasher.hash(ids, layer_id)[0]  # [T, H]
        offsets = np.array(spec.head_offsets(layer_id))
        heads = [{"order": 2 + h // K, "head": h % K, "size": spec.table_sizes(layer_id)[h],
                  "rows": rows[:, h].tolist(), "global_rows": (rows[:, h] + offsets[h]).tolist()}
                 for h in range(spec.heads_per_layer)]
        layers[layer_id] = heads
        lines.append(f"\nlayer {layer_id} (row in each head's table; global row = + head offset)")
        for head in heads:
            lines.append(f"  n={head['order']} k={head['head']} (size {head['size']:>9}): "
                         + " ".join(map(str, head["rows"])))
    payload = {"tokens": encoding.tokens, "ids": ids[0].tolist(), "compressed_ids": comp(ids)[0].tolist(),
               "hash": spec.hash, "layers": layers}
    return Output(payload, "\n".join(lines))


# -- engram stats ------------------------------------------------------------------------------
def _plot_coverage(stats: Any, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - matplotlib is in the dev and plot extras
        raise SpecError("--plot needs matplotlib: pip install 'engram[plot]'") from exc
    fig, ax = plt.subplots(figsize=(6, 4))
    for layer_id, (_, lookups) in stats.layer_rows.items():
        share = np.cumsum(lookups) / max(1, lookups.sum())
        ax.plot(np.arange(1, share.size + 1), share, label=f"layer {layer_id}")
    ax.set_xscale("log")
    ax.set_xlabel("rows, most used first")
    ax.set_ylabel("share of lookups served")
    ax.set_title(f"row coverage over {stats.tokens:,} tokens ({stats.spec.hash})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_stats(args: argparse.Namespace) -> Output:
    from .corpus import corpus_stats, tokenize_files

    _check_output_file("--hot-rows", args.hot_rows, "hot_rows.npz")
    _check_output_file("--plot", args.plot, "coverage.png")
    spec, comp = _spec_and_compression(args)
    sequences = tokenize_files(args.corpus, args.tokenizer, progress=None if not args.json else False)
    families = HASH_FAMILIES if args.all_families else None
    stats = corpus_stats(sequences, spec, comp, families=families)
    payload = stats.to_dict()
    if args.hot_rows:
        stats.hot_row_plan().save(args.hot_rows)
        payload["hot_rows_file"] = args.hot_rows
    if args.plot:
        _plot_coverage(stats, args.plot)
        payload["plot_file"] = args.plot
    lines = [f"{_fmt_int(payload['tokens'])} tokens in {len(args.corpus)} file(s)"]
    for n, o in payload["orders"].items():
        lines.append(f"  order {n}: {_fmt_int(o['distinct'])} distinct n-grams, Zipf exponent "
                     f"{o['zipf_exponent']:.3f}")
    for layer_id, layer in payload["layers"].items():
        cov = ", ".join(f"{level:.0%}: {_fmt_int(rows)}" for level, rows in layer["coverage"].items())
        lines.append(f"layer {layer_id}: {_fmt_int(layer['rows_touched'])} of {_fmt_int(layer['rows'])} rows "
                     f"touched; rows serving {cov} of lookups")
        for family, fam in layer["families"].items():
            touched = np.mean([h["share_touched"] for h in fam["heads"]])
            lines.append(f"  {family:18s} collision rate {fam['collision_rate']:.4f}, "
                         f"mean share of head rows touched {touched:.4f}")
    if args.hot_rows:
        lines.append(f"hot-row plan written to {args.hot_rows}")
    if args.plot:
        lines.append(f"coverage plot written to {args.plot}")
    return Output(payload, "\n".join(lines))


# -- engram build ------------------------------------------------------------------------------
def _layer_plan(spec: TableSpec, chunk_rows: int | None) -> dict[int, dict[str, int]]:
    from .build import plan_layout

    return {lid: {"rows": lay.rows, "bytes": spec.layer_bytes(lid), "chunks": lay.n_chunks,
                  "chunk_rows": lay.chunk_rows, "disk_bytes": lay.disk_bytes}
            for lid, lay in plan_layout(spec, chunk_rows).items()}


def _free_bytes(path: str) -> int:
    """Free bytes on the filesystem a table at `path` goes to (build creates missing parents)."""
    import shutil

    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):    # the nearest existing ancestor; "/" always is one
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _plan_text(plan: dict[int, dict[str, int]]) -> list[str]:
    return [f"  layer {lid}: {_fmt_int(p['rows'])} rows, {_human_bytes(p['bytes'])} "
            f"({_human_bytes(p['disk_bytes'])} on disk), {p['chunks']} chunk(s) of {_fmt_int(p['chunk_rows'])} rows"
            for lid, p in plan.items()]


def _encoding(spec: TableSpec) -> dict[str, Any]:
    """How the spec stores a row: dtype, scales and bytes (the same keys for every dtype)."""
    return {"dtype": spec.dtype, "quantized": spec.quantized,
            "scale_block": spec.scale_block if spec.dtype == BLOCK_DTYPE else None,
            "scales_per_row": spec.scales_per_row, "value_bytes_per_row": spec.row_bytes,
            "scale_bytes_per_row": spec.scale_row_bytes, "stored_row_bytes": spec.stored_row_bytes}


def _encoding_text(spec: TableSpec) -> str:
    """E.g. "float8_e4m3 rows of D=256 (256 B of values + 8 B of E8M0 scales, one per 32 values: 264 B stored)"."""
    D = spec.head_dim
    if not spec.quantized:
        return f"{spec.dtype} rows of D={D} ({spec.stored_row_bytes} B stored per row)"
    if spec.dtype == BLOCK_DTYPE:
        scales = f"{spec.scale_row_bytes} B of E8M0 scales, one per {spec.scale_block} values"
    else:
        scales = f"{spec.scale_row_bytes} B float32 scale"
    return (f"{spec.dtype} rows of D={D} ({spec.row_bytes} B of values + {scales}: {spec.stored_row_bytes} B "
            f"stored per row, decoded to {_ROW_DTYPES[spec.dtype].torch})")


def _check_disk(path: str, needed: int, free: int) -> None:
    if needed > free:
        raise SpecError(
            f"the table needs {_human_bytes(needed)} on disk but only {_human_bytes(free)} is free beside "
            f"{path!r}: free space, build elsewhere, or pick a smaller spec / dtype")


def _check_build(args: argparse.Namespace, spec: TableSpec, comp: Compression, weights: Any = None) -> None:
    """What build_table checks before it writes, so `--dry-run` refuses what a real build would."""
    from .build import check_build

    check_build(args.path, spec, comp, init=getattr(args, "init", "normal"), std=getattr(args, "std", 0.02),
                seed=getattr(args, "seed", 0), weights=weights, overwrite=args.overwrite, chunk_rows=args.chunk_rows)


def cmd_build(args: argparse.Namespace) -> Output:
    from .build import build_table

    comp = _load_compression(args)
    spec = _load_build_spec(args, comp)
    _check_build(args, spec, comp)
    plan = _layer_plan(spec, args.chunk_rows)
    needed, free = sum(p["disk_bytes"] for p in plan.values()), _free_bytes(args.path)
    payload: dict[str, Any] = {"path": args.path, "spec": spec.to_dict(), "encoding": _encoding(spec),
                               "layers": plan, "bytes": spec.total_bytes, "disk_bytes": needed, "free_bytes": free,
                               "dry_run": args.dry_run}
    head = [f"{'would build' if args.dry_run else 'built'} {args.path}: {_encoding_text(spec)}, "
            f"{spec.heads_per_layer} heads per layer, {spec.hash} hash"]
    head += _plan_text(plan)
    head.append(f"  disk: {_human_bytes(needed)} needed, {_human_bytes(free)} free")
    if args.dry_run:
        payload["fits"] = needed <= free
        if needed > free:
            head.append("  it would NOT fit on this disk")
        return Output(payload, "\n".join(head), EXIT_OK if needed <= free else EXIT_REFUSED)
    _check_disk(args.path, needed, free)
    start = time.perf_counter()
    table = build_table(args.path, spec, comp, init=args.init, std=args.std, seed=args.seed,
                        overwrite=args.overwrite, chunk_rows=args.chunk_rows,
                        progress=None if not args.json else False)
    table.close()
    payload["seconds"] = time.perf_counter() - start
    head.append(f"  written in {payload['seconds']:.1f} s")
    return Output(payload, "\n".join(head))


# -- engram import -------------------------------------------------------------------------------
def cmd_import(args: argparse.Namespace) -> Output:
    from .build import build_table
    from .checkpoint import open_checkpoint

    comp = _load_compression(args)
    spec = _load_build_spec(args, comp)
    plan = _layer_plan(spec, args.chunk_rows)
    needed, free = sum(p["disk_bytes"] for p in plan.values()), _free_bytes(args.path)
    payload: dict[str, Any] = {"path": args.path, "spec": spec.to_dict(), "encoding": _encoding(spec),
                               "layers": plan, "bytes": spec.total_bytes, "disk_bytes": needed, "free_bytes": free,
                               "sources": list(args.weights), "dry_run": args.dry_run}
    with open_checkpoint(args.weights, weight_pattern=args.weight_pattern, scale_pattern=args.scale_pattern) as ckpt:
        weights = {lid: ckpt.rows(lid) for lid in spec.layer_ids}
        _check_build(args, spec, comp, weights)      # layers, shapes and dtypes of the checkpoint's tensors
        payload["source_dtypes"] = {lid: rows.stored_dtype for lid, rows in weights.items()}
        sources = ", ".join(f"layer {lid}: {dtype}" for lid, dtype in payload["source_dtypes"].items())
        if args.dry_run:
            payload["fits"] = needed <= free
            lines = [f"would import {len(weights)} layer(s) from {', '.join(args.weights)} ({sources}) into "
                     f"{args.path}", f"  {_encoding_text(spec)}", *_plan_text(plan),
                     f"  disk: {_human_bytes(needed)} needed, {_human_bytes(free)} free"]
            if needed > free:
                lines.append("  it would NOT fit on this disk")
            return Output(payload, "\n".join(lines), EXIT_OK if needed <= free else EXIT_REFUSED)
        _check_disk(args.path, needed, free)
        start = time.perf_counter()
        build_table(args.path, spec, comp, weights=weights, overwrite=args.overwrite, chunk_rows=args.chunk_rows,
                    progress=None if not args.json else False).close()
    payload["seconds"] = seconds = time.perf_counter() - start
    lines = [f"imported {len(weights)} layer(s) from {', '.join(args.weights)} ({sources}) into {args.path} "
             f"in {seconds:.1f} s", f"  {_encoding_text(spec)}"]
    return Output(payload, "\n".join(lines + _plan_text(plan)))


# -- engram convert ------------------------------------------------------------------------------
def _rel_error(e: float | None) -> str:
    return "-" if e is None else f"{e:.3g}"


def _convert_plan(args: argparse.Namespace) -> tuple[dict[str, Any], TableSpec]:
    """What converting would write, per layer: bytes before and after (scales included), chunk files."""
    from .build import plan_layout
    from .table import open as open_table

    with open_table(args.src) as table:
        source = table.spec
        spec = _with_encoding(source, args.dtype, args.scale_block)
        after = plan_layout(spec)
        layers = {lid: {"rows": source.rows(lid), "bytes_before": source.layer_bytes(lid),
                        "bytes_after": spec.layer_bytes(lid), "disk_bytes_before": table.layout(lid).disk_bytes,
                        "disk_bytes_after": lay.disk_bytes} for lid, lay in after.items()}
    plan = {"src": args.src, "dst": args.dst, "src_dtype": source.dtype, "dst_dtype": spec.dtype,
            "scale_block": spec.scale_block if spec.dtype == BLOCK_DTYPE else None, "layers": layers}
    for key in ("bytes_before", "bytes_after", "disk_bytes_before", "disk_bytes_after"):
        plan[key] = sum(layer[key] for layer in layers.values())
    return plan, spec


def cmd_convert(args: argparse.Namespace) -> Output:
    from pathlib import Path

    from .build import _check_target
    from .conversion import convert

    plan, spec = _convert_plan(args)
    _check_target(Path(args.dst), args.overwrite)
    needed, free = plan["disk_bytes_after"], _free_bytes(args.dst)
    target = f"{spec.dtype}" + (f", scale_block {spec.scale_block}" if spec.dtype == BLOCK_DTYPE else "")
    if args.dry_run:
        ratio = plan["bytes_after"] / max(1, plan["bytes_before"])
        payload = {**plan, "disk_bytes": needed, "free_bytes": free, "fits": needed <= free, "dry_run": True}
        lines = [f"would convert {args.src} ({plan['src_dtype']}) -> {args.dst} ({target}): "
                 f"{_encoding_text(spec)}"]
        lines += [f"  layer {lid}: {_fmt_int(p['rows'])} rows, {_human_bytes(p['bytes_before'])} -> "
                  f"{_human_bytes(p['bytes_after'])}" for lid, p in plan["layers"].items()]
        lines.append(f"  total: {_human_bytes(plan['bytes_before'])} -> {_human_bytes(plan['bytes_after'])} "
                     f"({ratio:.2f}x); disk: {_human_bytes(needed)} needed, {_human_bytes(free)} free")
        if needed > free:
            lines.append("  it would NOT fit on this disk")
        return Output(payload, "\n".join(lines), EXIT_OK if needed <= free else EXIT_REFUSED)
    _check_disk(args.dst, needed, free)
    report = convert(args.src, args.dst, dtype=args.dtype, scale_block=args.scale_block, overwrite=args.overwrite,
                     sample_rows=args.sample_rows, seed=args.seed, progress=None if not args.json else False)
    payload = report.to_dict()
    payload.update(disk_bytes_before=sum(r.disk_bytes_before for r in report.layers.values()),
                   disk_bytes_after=sum(r.disk_bytes_after for r in report.layers.values()), dry_run=False)
    lines = [f"converted {report.src} ({report.src_dtype}) -> {report.dst} ({target}) in {report.seconds:.1f} s"
             + (": stored bytes copied unchanged" if report.copied else ""),
             f"  relative error ||converted - source|| / ||source|| per row, over a sample of up to "
             f"{_fmt_int(report.sample_rows)} rows per layer (seed {report.seed}):",
             f"  {'layer':>6} {'rows':>12} {'sampled':>10} {'max error':>10} {'RMS error':>10} "
             f"{'bytes before':>13} {'bytes after':>13}"]
    for lid, r in report.layers.items():
        lines.append(f"  {lid:>6} {_fmt_int(r.rows):>12} {_fmt_int(r.sampled_rows):>10} "
                     f"{_rel_error(r.max_rel_error):>10} {_rel_error(r.rms_rel_error):>10} "
                     f"{_human_bytes(r.bytes_before):>13} {_human_bytes(r.bytes_after):>13}")
        if r.nonfinite_rows:
            lines.append(f"  {'':>6} {_fmt_int(r.nonfinite_rows)} sampled source row(s) hold NaN or inf: left out")
    lines.append(f"  total: {_human_bytes(report.bytes_before)} -> {_human_bytes(report.bytes_after)} "
                 f"({report.bytes_after / max(1, report.bytes_before):.2f}x), "
                 f"{_human_bytes(payload['disk_bytes_after'])} on disk")
    return Output(payload, "\n".join(lines))


# -- engram inspect ------------------------------------------------------------------------------
def _row_sample(table: Any, layer_id: int, n: int, rng: np.random.Generator) -> dict[str, Any]:
    """Norm and value statistics of `n` random rows, decoded to float32 (quantized rows dequantized)."""
    import torch

    rows_in_layer = table.spec.rows(layer_id)
    idx = np.sort(rng.choice(rows_in_layer, size=min(n, rows_in_layer), replace=False))
    rows = table.rows(layer_id, idx, dtype=torch.float32)
    norms = rows.norm(dim=1)
    n = idx.size
    return {"rows": n, "norm_mean": float(norms.mean()), "norm_std": float(norms.std()) if n > 1 else 0.0,
            "norm_min": float(norms.min()), "norm_max": float(norms.max()),
            "all_zero_rows": int((rows == 0).all(dim=1).sum()),
            "value_mean": float(rows.mean()), "value_std": float(rows.std()) if rows.numel() > 1 else 0.0}


def cmd_inspect(args: argparse.Namespace) -> Output:
    from .hashing import NgramHasher
    from .table import open as open_table

    with open_table(args.path) as table:
        spec = table.spec
        hasher = NgramHasher(spec, table.compression)
        rng = np.random.default_rng(0)
        layers = {}
        for lid in spec.layer_ids:
            lay = table.layout(lid)
            entry: dict[str, Any] = {
                "array": lay.array, "rows": lay.rows, "bytes": spec.layer_bytes(lid), "disk_bytes": lay.disk_bytes,
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
                   "encoding": _encoding(spec),
                   "compression": {"vocab_size": table.compression.vocab_size,
                                   "compressed_vocab_size": table.compression.compressed_vocab_size,
                                   "fingerprint": table.compression.fingerprint},
                   "bytes": spec.total_bytes, "disk_bytes": sum(e["disk_bytes"] for e in layers.values()),
                   "layers": layers}
    lines = [f"{args.path}: engram table, format version {payload['format_version']}",
             f"  {_encoding_text(spec)}",
             f"  N={spec.max_ngram_size}, K={spec.n_head_per_ngram} ({spec.heads_per_layer} heads/layer, "
             f"E={spec.embed_dim}); hash {spec.hash}, seed {spec.seed}, pad_id {spec.pad_id}",
             f"  compression: {table.compression.vocab_size:,} raw ids -> "
             f"{table.compression.compressed_vocab_size:,} (fingerprint {table.compression.fingerprint})",
             f"  {_human_bytes(spec.total_bytes)} of rows in {len(layers)} layer(s), "
             f"{_human_bytes(payload['disk_bytes'])} on disk"]
    for lid, e in layers.items():
        lines.append(f"  layer {lid}: {_fmt_int(e['rows'])} rows, {_human_bytes(e['bytes'])} "
                     f"({_human_bytes(e['disk_bytes'])} on disk), {e['chunks']} chunk(s) of "
                     f"{_fmt_int(e['chunk_rows'])} rows, {e['checksums']}/{e['chunks']} checksums")
        if e["scales"] is not None:
            sc = e["scales"]
            lines.append(f"    scales in {sc['array']}: {_human_bytes(sc['disk_bytes'])} on disk, "
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
    from .errors import CorruptTableError
    from .table import open as open_table

    start = time.perf_counter()
    try:
        with open_table(args.path) as table:
            chunks = sum(arr.n_chunks for lid in table.spec.layer_ids for arr in table.layout(lid).arrays())
            table.verify(progress=None if not args.json else False)
    except CorruptTableError as exc:
        payload = {"path": args.path, "ok": False, "error": str(exc)}
        return Output(payload, f"{args.path}: CORRUPT: {exc}", EXIT_CHECK_FAILED)
    seconds = time.perf_counter() - start
    payload = {"path": args.path, "ok": True, "chunks": chunks, "seconds": seconds}
    return Output(payload, f"{args.path}: ok, {chunks} chunk file(s) match their checksums ({seconds:.1f} s)")


# -- engram bench -------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> Output:
    from .benchmark import bench_table

    r = bench_table(args.path, tiers=args.tier, batch=args.batch, seq=args.seq, layer_id=args.layer,
                    repeats=args.repeats, cold=args.cold)
    w = r["workload"]
    stored = f" (scales included, decoded to {w['decoded_dtype']})" if w["quantized"] else ""
    lines = [f"lookup of B={w['batch']} x T={w['seq']} tokens, layer {w['layer_id']}, {w['heads']} heads x "
             f"{w['dtype']} rows of {w['row_bytes']} B{stored}, one thread"]
    if w["baselines_skipped"]:
        lines.append(f"  (baselines skipped: their in-RAM copy of the layer, {_human_bytes(w['baseline_bytes'])}, "
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


# -- parser ------------------------------------------------------------------------------------
class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when it has a default worth stating: not None or
    False (nothing given, a flag left off), and not already described in the help text."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text, default = action.help or "", action.default
        if (not action.option_strings or default is None or default is False or default is argparse.SUPPRESS
                or "default" in text):
            return action.help
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"

    def _split_lines(self, text: str, width: int) -> list[str]:
        # long names (a tensor name pattern) stay whole instead of being cut mid-word
        return textwrap.wrap(re.sub(r"\s+", " ", text).strip(), width, break_long_words=False,
                             break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a: Any, **kw: Any) -> None:
        kw.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*a, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="engram", description="Build, check and measure Engram memory tables.",
                     epilog="exit codes: 0 ok, 1 a check failed, 2 bad arguments, 3 input refused or a file "
                            "not readable or writable, 130 interrupted")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("build", help="build a table with seeded rows")
    p.add_argument("path", metavar="PATH", help="table directory to create")
    p.add_argument("--spec", required=True, metavar="SPEC.json",
                   help="TableSpec fields as JSON (compressed_vocab_size may be left out)")
    _add_vocab(p, required=True)
    p.add_argument("--init", default="normal", choices=("normal", "zeros"), help="initial rows")
    p.add_argument("--std", type=float, default=0.02, help="standard deviation of --init normal")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial rows")
    _add_encoding(p)
    p.add_argument("--chunk-rows", type=_int_at_least(1), metavar="ROWS",
                   help="rows per chunk file (default: ~64 MiB chunks)")
    p.add_argument("--dry-run", action="store_true", help="print what would be written; write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing table at PATH")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("import", help="build a table from trained rows in checkpoint files")
    p.add_argument("path", metavar="PATH", help="table directory to create")
    p.add_argument("--spec", required=True, metavar="SPEC.json", help="TableSpec fields as JSON")
    _add_vocab(p, required=True)
    p.add_argument("--weights", required=True, nargs="+", metavar="FILE",
                   help="*.safetensors or torch.save files (shards allowed)")
    p.add_argument("--weight-pattern", metavar="PATTERN",
                   help="tensor name of a layer's rows, {layer_id} replaced (default: the V4.1 name, then "
                        "'layers.{layer_id}.engram.multi_head_embedding.embedding.weight')")
    p.add_argument("--scale-pattern", metavar="PATTERN",
                   help="tensor name of FP8 rows' E8M0 scales (default: the weight name with weight_scale_inv)")
    _add_encoding(p)
    p.add_argument("--chunk-rows", type=_int_at_least(1), metavar="ROWS",
                   help="rows per chunk file (default: ~64 MiB chunks)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the checkpoint's tensors and print rows, bytes and chunks per layer; write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing table at PATH")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("convert", help="re-encode a table's rows as another dtype, with the error it costs")
    p.add_argument("src", metavar="SRC", help="table directory to read")
    p.add_argument("dst", metavar="DST", help="table directory to create (SRC itself with --overwrite)")
    p.add_argument("--dtype", required=True, choices=ROW_DTYPES, help="row dtype of the new table")
    p.add_argument("--scale-block", type=_int_at_least(1), metavar="B",
                   help=f"values per E8M0 scale of {BLOCK_DTYPE} rows, a divisor of D (default: SRC's, 32 unless "
                        "set)")
    p.add_argument("--sample-rows", type=_int_at_least(0), default=65536, metavar="N",
                   help="rows per layer the error is measured on, 0 for none")
    p.add_argument("--seed", type=_int_at_least(0), default=0, metavar="S", help="seed of the error sample")
    p.add_argument("--dry-run", action="store_true", help="print the bytes before and after; write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing table at DST")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="describe a table")
    p.add_argument("path", metavar="PATH", help="table directory")
    p.add_argument("--sample-rows", type=_int_at_least(0), default=1000, metavar="N",
                   help="rows sampled per layer for norm statistics, 0 for none")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check every chunk of a table against its checksum")
    p.add_argument("path", metavar="PATH", help="table directory")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bench", help="lookup throughput of a table on this machine, with baselines")
    p.add_argument("path", metavar="PATH", help="table directory")
    p.add_argument("--tier", nargs="+", default=["ram", "mmap", "direct"], choices=("ram", "mmap", "direct"),
                   help="tiers to measure")
    p.add_argument("--batch", type=_int_at_least(1), default=8, metavar="B", help="sequences per lookup")
    p.add_argument("--seq", type=_int_at_least(1), default=4096, metavar="T", help="tokens per sequence")
    p.add_argument("--layer", type=int, metavar="LAYER_ID", help="layer to look up (default: the first)")
    p.add_argument("--repeats", type=_int_at_least(1), default=5, help="best of this many lookups")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each mmap/direct lookup (root)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("hash", help="show the rows a text addresses")
    _add_source(p)
    p.add_argument("--tokenizer", required=True, metavar="TOKENIZER.json", help="tokenizer of the table")
    p.add_argument("--text", required=True, help="text to tokenize and hash")
    p.set_defaults(func=cmd_hash)

    p = sub.add_parser("stats", help="n-gram and row statistics of a corpus")
    _add_source(p)
    p.add_argument("--tokenizer", required=True, metavar="TOKENIZER.json", help="tokenizer of the table")
    p.add_argument("corpus", nargs="+", metavar="CORPUS_FILE", help="text files")
    p.add_argument("--all-families", action="store_true", help="compare collision rates of all hash families")
    p.add_argument("--plot", metavar="FILE.png", help="draw the row coverage curve (matplotlib)")
    p.add_argument("--hot-rows", metavar="FILE", help="write the hot-row plan (.npz) for the lookup cache")
    p.set_defaults(func=cmd_stats)

    for p in sub.choices.values():
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    return parser


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# Library keyword arguments named in error messages, and the flag that sets each here.
_KEYWORD_FLAGS = {"overwrite=True": "--overwrite"}


def _flag_wording(message: str) -> str:
    """An error message of the library, with its keyword-argument advice given as flags."""
    for keyword, flag in _KEYWORD_FLAGS.items():
        message = message.replace(keyword, flag)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    func: Callable[[argparse.Namespace], Output] = args.func
    try:
        out = func(args)
    except (EngramError, OSError) as exc:   # OSError: a file engram was not the first to look at
        return _fail(args, EXIT_REFUSED, _flag_wording(str(exc)), type(exc).__name__)
    except KeyboardInterrupt:
        return _fail(args, EXIT_INTERRUPTED, "interrupted", "KeyboardInterrupt")
    try:
        if args.json:
            print(json.dumps(_jsonable(out.payload), indent=2))
        else:
            print(out.text)
        sys.stdout.flush()
    except BrokenPipeError:      # the reader went away (`engram inspect T | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return out.code


def _fail(args: argparse.Namespace, code: int, message: str, kind: str) -> int:
    """Report an error on stderr (and, with --json, as one JSON object on stdout); return `code`."""
    print(f"engram {args.command}: {'error: ' if code == EXIT_REFUSED else ''}{message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": message, "error_type": kind, "exit_code": code}, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
