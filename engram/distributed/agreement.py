"""The open-time check that the parts opened on every rank form one table.

Every rank opens its own part, then all ranks exchange what they opened (one all_gather_object)
and run the same check on the same list (`check_parts`), so a mismatch raises the same typed error
on every rank at once: nothing waits on a rank that already gave up. A rank that cannot open its
part at all still takes part in the exchange (with its error), and every rank raises that error.

The check: one spec, one compression, one table id (`engram.storage.identity`: parts of two
tables with the same spec, say two trainings, differ there), parts of one split into as many
parts as ranks, covering every row once. Parts written before table ids have none: they are
accepted together only if none of the parts has one (with the other checks).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from engram import errors
from engram.addressing.spec import TableSpec
from engram.errors import EngramError, ShardMismatchError
from engram.storage.shards import ShardRange, check_ranges

__all__ = ["agree", "agreed", "describe_part", "check_parts"]


def describe_part(table: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """What `check_parts` compares of one rank's open part (`table`, an engram.Table, opened from `path`)."""
    return {"path": os.fspath(path), "spec": table.spec.to_dict(), "compression": table.compression.fingerprint,
            "shard": None if table.shard is None else table.shard.to_dict(), "table_id": table.table_id}


def agree(group: dist.ProcessGroup | None, describe: Callable[[], dict[str, Any]]) -> list[ShardRange]:
    """Run `describe()` on this rank (it opens the part), gather every rank's answer, check them.

    `describe` returns `describe_part`'s dict (extra keys are passed along: see `agreed`).

    Returns:
        The ShardRange of every rank, by group rank.

    Raises:
        ShardMismatchError: the parts do not form one table (other specs or compressions, other
            part counts, rows in no part or in two); the same message on every rank.
        The error a rank met opening its part (same type, e.g. TableNotFoundError), on every rank.
    """
    return agreed(group, describe)[0]


def agreed(group: dist.ProcessGroup | None,
           describe: Callable[[], dict[str, Any]]) -> tuple[list[ShardRange], list[dict[str, Any]]]:
    """`agree`, also returning every rank's description (by group rank)."""
    try:
        mine: dict[str, Any] = describe()
    except (EngramError, OSError) as exc:
        mine = {"error": (type(exc).__name__, str(exc))}
    world = dist.get_world_size(group)
    seen: list[Any] = [None] * world
    dist.all_gather_object(seen, mine, group=group)
    for rank, d in enumerate(seen):
        if "error" in d:
            name, message = d["error"]
            kind = getattr(errors, name, None)
            kind = kind if isinstance(kind, type) and issubclass(kind, EngramError) else ShardMismatchError
            raise kind(f"rank {rank} could not open its part of the sharded table: {message}")
    return check_parts(seen), seen


def check_parts(seen: list[dict[str, Any]]) -> list[ShardRange]:
    """The ShardRange of each part described in `seen` (one `describe_part` dict per rank, in rank
    order), or ShardMismatchError saying why they are not the parts of one table.

    Pure (no collective): every rank runs it on the same list and raises the same error.
    """
    world = len(seen)
    first = seen[0]
    spec = TableSpec.from_dict(first["spec"])
    for rank, d in enumerate(seen[1:], start=1):
        if d["spec"] != first["spec"]:
            other = TableSpec.from_dict(d["spec"])
            fields = ", ".join(f"{f.name}={getattr(other, f.name)!r} (rank 0: {getattr(spec, f.name)!r})"
                               for f in dataclasses.fields(spec) if getattr(other, f.name) != getattr(spec, f.name))
            raise ShardMismatchError(
                f"rank {rank}'s part {os.fspath(d['path'])!r} was built for another spec than rank 0's: {fields}: "
                "open parts of one table (engram shard, or engram build --shard with one spec)")
        if d["compression"] != first["compression"]:
            raise ShardMismatchError(
                f"rank {rank}'s part {os.fspath(d['path'])!r} was built with another compression than rank 0's "
                f"(fingerprint {d['compression']!r}, rank 0: {first['compression']!r}): open parts of one table")
    _check_ids(seen)
    parts = []
    for rank, d in enumerate(seen):
        if d["shard"] is None:
            if world == 1:            # a whole table is the one part of a group of one
                parts.append(ShardRange(0, 1, {lid: (0, spec.rows(lid)) for lid in spec.layer_ids}))
                continue
            raise ShardMismatchError(
                f"rank {rank} opened {os.fspath(d['path'])!r}, a whole table, in a group of {world} ranks: give "
                f"each rank its part (engram shard SRC PREFIX --parts {world})")
        part = ShardRange.from_dict(d["shard"], spec)
        if part.parts != world:
            raise ShardMismatchError(
                f"rank {rank} opened {os.fspath(d['path'])!r}, {part}, in a group of {world} ranks: split the "
                f"table into {world} parts (engram shard SRC PREFIX --parts {world}), one per rank")
        parts.append(part)
    problem = check_ranges(spec, parts)
    if problem is not None:
        held = "; ".join(f"rank {r}: {os.fspath(d['path'])!r} ({p})"
                         for r, (d, p) in enumerate(zip(seen, parts, strict=True)))
        raise ShardMismatchError(f"the parts opened do not cover every row once: {problem}. Opened: {held}: "
                                 "give each rank a different part of one split")
    return parts


def _check_ids(seen: list[dict[str, Any]]) -> None:
    """Refuse parts of different tables: all parts have one table id, or (written before ids) none."""
    ids = [d.get("table_id") for d in seen]
    if len(set(ids)) == 1:
        return
    held = "; ".join(f"rank {r}: {os.fspath(d['path'])!r} (table id {d.get('table_id') or 'none: written before ids'})"
                     for r, d in enumerate(seen))
    raise ShardMismatchError(
        f"the parts opened are parts of different tables (the same spec, but other table ids): {held}: give every "
        "rank a part of one table (the parts one engram shard wrote, or parts built with one seed or one table_id)")
