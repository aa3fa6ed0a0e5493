"""`engram build`, `engram import` and `engram convert`: the subcommands that write a table."""

from __future__ import annotations

import argparse
import time
from typing import Any

from engram.addressing.spec import TableSpec
from engram.cli.common import (
    BLOCK_DTYPES,
    EXIT_OK,
    EXIT_REFUSED,
    Output,
    check_build_args,
    check_disk,
    encoding,
    encoding_text,
    fmt_int,
    free_bytes,
    human_bytes,
    layer_plan,
    load_build_spec,
    load_compression,
    plan_text,
    with_encoding,
)


def cmd_build(args: argparse.Namespace) -> Output:
    from engram.making.build import build_table

    comp = load_compression(args)
    spec = load_build_spec(args, comp)
    check_build_args(args, spec, comp)
    plan = layer_plan(spec, args.chunk_rows, args.shard)
    needed, free = sum(p["disk_bytes"] for p in plan.values()), free_bytes(args.path)
    payload: dict[str, Any] = {"path": args.path, "spec": spec.to_dict(), "encoding": encoding(spec),
                               "layers": plan, "bytes": sum(p["bytes"] for p in plan.values()), "disk_bytes": needed,
                               "free_bytes": free, "dry_run": args.dry_run,
                               "shard": None if args.shard is None else list(args.shard)}
    part = "" if args.shard is None else f" (part {args.shard[0]} of {args.shard[1]})"
    head = [f"{'would build' if args.dry_run else 'built'} {args.path}{part}: {encoding_text(spec)}, "
            f"{spec.heads_per_layer} heads per layer, {spec.hash} hash"]
    head += plan_text(plan)
    head.append(f"  disk: {human_bytes(needed)} needed, {human_bytes(free)} free")
    if args.dry_run:
        payload["fits"] = needed <= free
        if needed > free:
            head.append("  it would NOT fit on this disk")
        return Output(payload, "\n".join(head), EXIT_OK if needed <= free else EXIT_REFUSED)
    check_disk(args.path, needed, free)
    start = time.perf_counter()
    table = build_table(args.path, spec, comp, init=args.init, std=args.std, seed=args.seed,
                        overwrite=args.overwrite, chunk_rows=args.chunk_rows,
                        progress=None if not args.json else False, shard=args.shard)
    table.close()
    payload["seconds"] = time.perf_counter() - start
    head.append(f"  written in {payload['seconds']:.1f} s")
    return Output(payload, "\n".join(head))


# -- engram import -------------------------------------------------------------------------------
def cmd_import(args: argparse.Namespace) -> Output:
    from engram.making.build import build_table
    from engram.making.checkpoint import open_checkpoint

    comp = load_compression(args)
    spec = load_build_spec(args, comp)
    plan = layer_plan(spec, args.chunk_rows)
    needed, free = sum(p["disk_bytes"] for p in plan.values()), free_bytes(args.path)
    payload: dict[str, Any] = {"path": args.path, "spec": spec.to_dict(), "encoding": encoding(spec),
                               "layers": plan, "bytes": spec.total_bytes, "disk_bytes": needed, "free_bytes": free,
                               "sources": list(args.weights), "dry_run": args.dry_run}
    with open_checkpoint(args.weights, weight_pattern=args.weight_pattern, scale_pattern=args.scale_pattern) as ckpt:
        weights = {lid: ckpt.rows(lid) for lid in spec.layer_ids}
        check_build_args(args, spec, comp, weights)      # layers, shapes and dtypes of the checkpoint's tensors
        payload["source_dtypes"] = {lid: rows.stored_dtype for lid, rows in weights.items()}
        sources = ", ".join(f"layer {lid}: {dtype}" for lid, dtype in payload["source_dtypes"].items())
        if args.dry_run:
            payload["fits"] = needed <= free
            lines = [f"would import {len(weights)} layer(s) from {', '.join(args.weights)} ({sources}) into "
                     f"{args.path}", f"  {encoding_text(spec)}", *plan_text(plan),
                     f"  disk: {human_bytes(needed)} needed, {human_bytes(free)} free"]
            if needed > free:
                lines.append("  it would NOT fit on this disk")
            return Output(payload, "\n".join(lines), EXIT_OK if needed <= free else EXIT_REFUSED)
        check_disk(args.path, needed, free)
        start = time.perf_counter()
        build_table(args.path, spec, comp, weights=weights, overwrite=args.overwrite, chunk_rows=args.chunk_rows,
                    progress=None if not args.json else False).close()
    payload["seconds"] = seconds = time.perf_counter() - start
    lines = [f"imported {len(weights)} layer(s) from {', '.join(args.weights)} ({sources}) into {args.path} "
             f"in {seconds:.1f} s", f"  {encoding_text(spec)}"]
    return Output(payload, "\n".join(lines + plan_text(plan)))


# -- engram convert ------------------------------------------------------------------------------
def _rel_error(e: float | None) -> str:
    return "-" if e is None else f"{e:.3g}"


def _convert_plan(args: argparse.Namespace) -> tuple[dict[str, Any], TableSpec, TableSpec]:
    """What converting would write, per layer: bytes before and after (scales included), chunk files."""
    from engram.making.build import plan_layout
    from engram.making.conversion import check_whole_source
    from engram.opening import open as open_table

    with open_table(args.src) as table:
        check_whole_source(table)
        source = table.spec
        spec = with_encoding(source, args.dtype, args.scale_block)
        after = plan_layout(spec)
        layers = {lid: {"rows": source.rows(lid), "bytes_before": source.layer_bytes(lid),
                        "bytes_after": spec.layer_bytes(lid), "disk_bytes_before": table.layout(lid).disk_bytes,
                        "disk_bytes_after": lay.disk_bytes} for lid, lay in after.items()}
    plan = {"src": args.src, "dst": args.dst, "src_dtype": source.dtype, "dst_dtype": spec.dtype,
            "scale_block": spec.scale_block if spec.dtype in BLOCK_DTYPES else None, "layers": layers}
    for key in ("bytes_before", "bytes_after", "disk_bytes_before", "disk_bytes_after"):
        plan[key] = sum(layer[key] for layer in layers.values())
    return plan, source, spec


def cmd_convert(args: argparse.Namespace) -> Output:

    from engram.making.conversion import check_convert, convert

    plan, source, spec = _convert_plan(args)
    check_convert(source, args.dst, dtype=spec.dtype, scale_block=args.scale_block, overwrite=args.overwrite)
    needed, free = plan["disk_bytes_after"], free_bytes(args.dst)
    target = f"{spec.dtype}" + (f", scale_block {spec.scale_block}" if spec.dtype in BLOCK_DTYPES else "")
    if args.dry_run:
        ratio = plan["bytes_after"] / max(1, plan["bytes_before"])
        payload = {**plan, "disk_bytes": needed, "free_bytes": free, "fits": needed <= free, "dry_run": True}
        lines = [f"would convert {args.src} ({plan['src_dtype']}) -> {args.dst} ({target}): "
                 f"{encoding_text(spec)}"]
        lines += [f"  layer {lid}: {fmt_int(p['rows'])} rows, {human_bytes(p['bytes_before'])} -> "
                  f"{human_bytes(p['bytes_after'])}" for lid, p in plan["layers"].items()]
        lines.append(f"  total: {human_bytes(plan['bytes_before'])} -> {human_bytes(plan['bytes_after'])} "
                     f"({ratio:.2f}x); disk: {human_bytes(needed)} needed, {human_bytes(free)} free")
        if needed > free:
            lines.append("  it would NOT fit on this disk")
        return Output(payload, "\n".join(lines), EXIT_OK if needed <= free else EXIT_REFUSED)
    check_disk(args.dst, needed, free)
    from engram.cli.quality import convert_gate, report_lines

    gate = convert_gate(args)
    report = convert(args.src, args.dst, dtype=args.dtype, scale_block=args.scale_block, overwrite=args.overwrite,
                     sample_rows=args.sample_rows, seed=args.seed, progress=None if not args.json else False,
                     accept=gate)
    payload = report.to_dict()
    if gate is not None:
        payload["quality"] = gate.report.to_dict()
    payload.update(disk_bytes_before=sum(r.disk_bytes_before for r in report.layers.values()),
                   disk_bytes_after=sum(r.disk_bytes_after for r in report.layers.values()), dry_run=False)
    lines = [f"converted {report.src} ({report.src_dtype}) -> {report.dst} ({target}) in {report.seconds:.1f} s"
             + (": stored bytes copied unchanged" if report.copied else ""),
             f"  relative error ||converted - source|| / ||source|| per row, over a sample of up to "
             f"{fmt_int(report.sample_rows)} rows per layer (seed {report.seed}):",
             f"  {'layer':>6} {'rows':>12} {'sampled':>10} {'max error':>10} {'RMS error':>10} "
             f"{'bytes before':>13} {'bytes after':>13}"]
    for lid, r in report.layers.items():
        lines.append(f"  {lid:>6} {fmt_int(r.rows):>12} {fmt_int(r.sampled_rows):>10} "
                     f"{_rel_error(r.max_rel_error):>10} {_rel_error(r.rms_rel_error):>10} "
                     f"{human_bytes(r.bytes_before):>13} {human_bytes(r.bytes_after):>13}")
        if r.nonfinite_rows:
            lines.append(f"  {'':>6} {fmt_int(r.nonfinite_rows)} sampled source row(s) hold NaN or inf: left out")
    lines.append(f"  total: {human_bytes(report.bytes_before)} -> {human_bytes(report.bytes_after)} "
                 f"({report.bytes_after / max(1, report.bytes_before):.2f}x), "
                 f"{human_bytes(payload['disk_bytes_after'])} on disk")
    if gate is not None:
        lines += ["  the gate model's next-token distributions, converted against source:", *report_lines(gate.report)]
    return Output(payload, "\n".join(lines))


