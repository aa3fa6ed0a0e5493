"""`engram shard`: split a table into parts of contiguous row ranges, one table per rank."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from engram.cli.common import Output, human_bytes


def shard_arg(text: str) -> tuple[int, int]:
    """An argparse type: "RANK/PARTS" with 0 <= RANK < PARTS (anything else is a usage error)."""
    from engram.errors import InputError
    from engram.storage.shards import parse_shard

    try:
        return parse_shard(text)
    except InputError:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: pass RANK/PARTS with 0 <= RANK < PARTS, "
                                         "e.g. 0/4") from None


def part_text(part: Any) -> str:
    """E.g. "part 1 of 4: layer 1 rows [2, 4), layer 15 rows [3, 6)"."""
    spans = ", ".join(f"layer {lid} rows [{lo:,}, {hi:,})" for lid, (lo, hi) in part.ranges.items())
    return f"part {part.rank} of {part.parts}: {spans}"


def cmd_shard(args: argparse.Namespace) -> Output:
    from engram.making.sharding import check_shard_table, shard_path, shard_table
    from engram.opening import open as open_table

    with open_table(args.src) as src:
        parts = check_shard_table(src, args.prefix, args.parts, overwrite=args.overwrite)
        spec = src.spec
        listing: list[dict[str, Any]] = [{"path": os.fspath(shard_path(args.prefix, p.rank, p.parts)), "rank": p.rank,
                    "ranges": {lid: list(span) for lid, span in p.ranges.items()},
                    "bytes": sum(p.rows(lid) * spec.stored_row_bytes for lid in spec.layer_ids)} for p in parts]
        payload: dict[str, Any] = {"src": args.src, "parts": listing, "bytes": spec.total_bytes,
                                   "dry_run": args.dry_run}
        verb = "would split" if args.dry_run else "split"
        lines = [f"{verb} {args.src} ({human_bytes(spec.total_bytes)} of rows) into {args.parts} parts:"]
        lines += [f"  {e['path']}: {part_text(p)} ({human_bytes(e['bytes'])})"
                  for e, p in zip(listing, parts, strict=True)]
        if args.dry_run:
            return Output(payload, "\n".join(lines))
        start = time.perf_counter()
        shard_table(src, args.prefix, args.parts, overwrite=args.overwrite, progress=None if not args.json else False)
    payload["seconds"] = time.perf_counter() - start
    lines.append(f"  written in {payload['seconds']:.1f} s")
    return Output(payload, "\n".join(lines))
