"""Row ranges of a sharded table: which rows of every layer one part holds.

A table split into W parts gives part r one contiguous row range of every layer,
`[rows * r // W, rows * (r + 1) // W)`: rows of one layer all have the same size, so equal row
counts are equal bytes, and every part holds about `spec.total_bytes / W` (within one row per
layer). A part is an ordinary table of its rows (`engram shard`, `engram build --shard r/W`)
whose metadata records its `ShardRange`; `engram.distributed.ShardedTable` serves the parts
together over torch.distributed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from engram.addressing.spec import TableSpec
from engram.args import is_int
from engram.errors import CorruptTableError, InputError

__all__ = ["ShardRange", "plan_shards", "parse_shard", "owners", "check_ranges", "read_shard"]


@dataclasses.dataclass(frozen=True)
class ShardRange:
    """The rows one part of a sharded table holds.

    Attributes:
        rank: this part's index, 0 <= rank < parts.
        parts: how many parts the table was split into.
        ranges: {layer_id: (start, stop)}: the part holds global rows start <= row < stop of each
            layer, stored as its local rows 0 .. stop - start.
    """

    rank: int
    parts: int
    ranges: Mapping[int, tuple[int, int]]

    def start(self, layer_id: int) -> int:
        """The first global row of `layer_id` this part holds."""
        return self.ranges[layer_id][0]

    def rows(self, layer_id: int) -> int:
        """How many rows of `layer_id` this part holds."""
        lo, hi = self.ranges[layer_id]
        return hi - lo

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in the table's metadata."""
        return {"rank": self.rank, "parts": self.parts,
                "ranges": [[lid, lo, hi] for lid, (lo, hi) in self.ranges.items()]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], spec: TableSpec) -> ShardRange:
        """Read and check the stored form against the table's spec.

        Raises:
            ValueError: a malformed entry or a range outside a layer (the caller names the table).
        """
        rank, parts = d["rank"], d["parts"]
        if not (is_int(rank) and is_int(parts)) or not 0 <= rank < parts:
            raise ValueError(f"shard rank={rank!r} of parts={parts!r} is not a part index")
        ranges: dict[int, tuple[int, int]] = {}
        for lid, lo, hi in d["ranges"]:
            if lid not in spec.layer_ids or lid in ranges or not 0 <= lo <= hi <= spec.rows(lid):
                raise ValueError(f"shard range [{lo!r}, {hi!r}) of layer {lid!r} is not inside a layer of the spec")
            ranges[int(lid)] = (int(lo), int(hi))
        if tuple(ranges) != spec.layer_ids:
            raise ValueError(f"shard ranges cover layers {tuple(ranges)}, the spec has {spec.layer_ids}")
        return cls(int(rank), int(parts), ranges)

    def __str__(self) -> str:
        spans = ", ".join(f"layer {lid}: rows [{lo}, {hi})" for lid, (lo, hi) in self.ranges.items())
        return f"part {self.rank} of {self.parts} ({spans})"


def plan_shards(spec: TableSpec, parts: int) -> list[ShardRange]:
    """The balanced split of a table into `parts` contiguous row ranges per layer.

    Args:
        spec: the table's spec.
        parts: how many parts (>= 1; at most the rows of the smallest layer).

    Returns:
        One ShardRange per part, in rank order; together they cover every row once.

    Example:
        >>> [str(p) for p in plan_shards(spec, 2)]
        ['part 0 of 2 (layer 1: rows [0, 5003))', 'part 1 of 2 (layer 1: rows [5003, 10007))']
    """
    smallest = min(spec.rows(lid) for lid in spec.layer_ids)
    if not is_int(parts) or not 1 <= parts <= smallest:
        raise InputError(f"parts={parts!r} is invalid: expected an int from 1 to {smallest} (the rows of the "
                         "smallest layer)")
    return [ShardRange(r, int(parts), {lid: (spec.rows(lid) * r // parts, spec.rows(lid) * (r + 1) // parts)
                                       for lid in spec.layer_ids}) for r in range(parts)]


def parse_shard(text: str) -> tuple[int, int]:
    """"r/W" -> (r, W), e.g. for `engram build --shard 1/4`.

    Raises:
        InputError: not two ints with 0 <= r < W.
    """
    rank, _, parts = str(text).partition("/")
    try:
        r, w = int(rank), int(parts)
    except ValueError:
        r, w = -1, 0
    if not 0 <= r < w:
        raise InputError(f"shard={text!r} is invalid: expected RANK/PARTS with 0 <= RANK < PARTS, e.g. 0/4")
    return r, w


def owners(starts: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Which part holds each global row: `starts` [W] sorted first rows of the parts (starts[0] == 0),
    `rows` int64 [n] -> int64 [n] indices into `starts`."""
    return np.searchsorted(starts, rows, side="right") - 1


def check_ranges(spec: TableSpec, shards: Sequence[ShardRange]) -> str | None:
    """Why `shards` (one per rank) do not tile every layer of `spec` exactly once, or None if they do."""
    for lid in spec.layer_ids:
        spans = sorted((s.ranges[lid], i) for i, s in enumerate(shards))
        edge = 0
        for (lo, hi), i in spans:
            if lo > edge:
                return f"rows [{edge}, {lo}) of layer {lid} are in no shard (rank {i} starts at {lo})"
            if lo < edge:
                return f"rows [{lo}, {min(edge, hi)}) of layer {lid} are in two shards (rank {i} among them)"
            edge = hi
        if edge != spec.rows(lid):
            return f"rows [{edge}, {spec.rows(lid)}) of layer {lid} are in no shard"
    return None


def read_shard(entry: Any, spec: TableSpec, version: int, where: str) -> ShardRange | None:
    """The shard range stored in a table's metadata (format version 3 only), checked against its spec.

    Raises:
        CorruptTableError: a range where the version has none or none where it needs one, or a
            range that is not inside the spec's layers (`where` names the table).
    """
    if (entry is not None) != (version >= 3):
        raise CorruptTableError(f"{where} has format_version={version!r} {'with' if entry is not None else 'without'} "
                                "a shard range: the metadata is damaged; rebuild the table")
    if entry is None:
        return None
    try:
        return ShardRange.from_dict(entry, spec)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptTableError(f"{where} has an invalid shard range ({exc}): the metadata is damaged; "
                                "split the table again with engram shard") from exc
