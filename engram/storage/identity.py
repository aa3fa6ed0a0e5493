"""Table identity: the id a table gets when it is written, which every part of a sharded table shares.

A table's metadata records `table_id`, 32 lowercase hex digits (128 bits), fixed when the table
is written and sealed by the metadata checksum. Every part of a sharded table records the whole
table's id (and, in its shard range, its index and the count of parts), so parts of two tables
that share a spec (two trainings, or a split interrupted while it replaced another) are told
apart: `engram.distributed.ShardedTable` and `ShardedRows` refuse parts whose ids differ.

Where ids come from:
- a seeded build (`build_table` without `weights`): derived from what fixes its rows (spec,
  compression, init, std, seed: `derived_table_id`), so parts built separately on each rank
  (`engram build --shard r/W`) share the id of the whole table the same build would write;
- a build from `weights`: random, or given (`table_id=`, which parts built from weights need);
- `engram shard`: the parts take the source table's id (they hold its bytes unchanged);
- `engram convert` and `OffloadedRows.snapshot`: a new random id; `source_id` links a
  conversion to the table it was made from.

Tables written before ids have none: they keep opening, and parts without ids are accepted
together only if none of them has one (with the older checks: spec, compression, ranges).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import xxhash

from engram.errors import InputError

__all__ = ["new_table_id", "derived_table_id", "is_table_id", "check_table_id"]

ID_HEX_DIGITS = 32


def new_table_id() -> str:
    """A fresh random table id: 32 lowercase hex digits."""
    return secrets.token_hex(ID_HEX_DIGITS // 2)


def derived_table_id(kind: str, recipe: dict[str, Any]) -> str:
    """The id of a table that `recipe` determines byte for byte (the xxh3-128 of its canonical
    JSON, with `kind` naming the recipe), e.g. a seeded build: the same recipe gives the same id."""
    text = json.dumps({"kind": kind, **recipe}, sort_keys=True, separators=(",", ":"))
    return xxhash.xxh3_128_hexdigest(text.encode())


def is_table_id(value: Any) -> bool:
    """True if `value` is a table id: a str of 32 lowercase hex digits."""
    return (isinstance(value, str) and len(value) == ID_HEX_DIGITS
            and all(c in "0123456789abcdef" for c in value))


def check_table_id(value: Any, name: str = "table_id") -> str | None:
    """`value` if it is a table id or None, else InputError naming `name`."""
    if value is not None and not is_table_id(value):
        raise InputError(f"{name}={value!r} is invalid: expected {ID_HEX_DIGITS} lowercase hex digits (e.g. "
                         "secrets.token_hex(16), or another table's table_id), or None")
    return value
