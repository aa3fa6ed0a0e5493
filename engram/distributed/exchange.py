"""The row exchange behind sharded lookups and their gradients: all_to_all_single, counts first.

One exchange, called by every rank of the group together, each with its own request:

1. the requester dedups its global rows (each distinct row travels once) and groups them by
   owning rank (the rank whose range holds the row);
2. headers: one all_to_all_single of [count, layer, dtype code, operation] per pair of ranks, so
   every rank learns how many rows each peer asks of it, and every rank sees every rank's
   (layer, dtype, operation): a mismatch is refused on every rank alike instead of exchanging
   garbage;
3. ids: one all_to_all_single of the local row indices (global row minus the owner's start);
4. payload: rows go back to the requesters (lookups), or gradients go to the owners
   (backward), as one all_to_all_single of raw bytes, so any row dtype travels unchanged.

A rank with nothing to ask sends zero counts and still takes part in every collective.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from engram.errors import EngramError, InputError, RankFailureError
from engram.serving.gather import unique_inverse
from engram.storage.shards import ShardRange, owners

__all__ = ["RowExchange", "Routed", "WireCounter", "DTYPE_CODES", "all_to_all"]

# Wire codes of the dtypes rows and gradients travel in (headers carry the code, payloads raw bytes).
DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.int8: 4, torch.uint8: 5,
               torch.float64: 6}
OP_REFUSED, OP_LOOKUP, OP_GRAD = 0, 1, 2
_OP_NAMES = {OP_LOOKUP: "lookup", OP_GRAD: "backward"}


def all_to_all(out: torch.Tensor, send: torch.Tensor, group: dist.ProcessGroup | None, what: str,
               out_split: list[int] | None = None, in_split: list[int] | None = None) -> None:
    """`dist.all_to_all_single`, with a rank lost mid-exchange reported as RankFailureError.

    When a rank dies or leaves during a collective, the backend raises a bare RuntimeError on the
    others (gloo: "Connection closed by peer", "Connection reset by peer", a timeout). The group is
    then unusable: every later collective on it fails or hangs, so the error says to rebuild it.
    """
    try:
        dist.all_to_all_single(out, send, out_split, in_split, group=group)
    except RuntimeError as exc:
        if isinstance(exc, EngramError):
            raise
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        raise RankFailureError(
            f"rank {rank} of {world}: the all_to_all of {what} failed ({str(exc).strip()[:300]}): another rank of "
            "the group died or left mid-exchange; the process group cannot be used again: destroy it, restart "
            "the failed rank, and build the group and the ShardedTable / ShardedRows anew") from exc


class WireCounter:
    """Thread-safe totals of what this rank's exchanges moved between ranks (self-sends excluded)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.totals = dict.fromkeys(("exchanges", "rows_requested", "rows_unique", "rows_remote",
                                     "bytes_sent", "bytes_received"), 0)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                self.totals[name] += value

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.totals)

    def reset(self) -> None:
        with self._lock:
            self.totals = dict.fromkeys(self.totals, 0)


@dataclasses.dataclass
class Routed:
    """One rank's request, grouped by owner: what it sends and how to put the answers back."""

    uniq: np.ndarray            # int64 [u] the global rows sent (distinct where deduplicated), grouped by owner
    inverse: torch.Tensor | None  # int64 [n]: request i is uniq[inverse[i]]; None: uniq is the request
    local: np.ndarray           # int64 [u] the rows as their owners' local indices
    send_counts: list[int]      # [W] rows asked of each rank
    recv_counts: list[int]      # [W] rows each rank asks of this one (after the headers)
    recv_local: np.ndarray      # int64 [sum(recv_counts)] local rows asked of this rank, by rank


class RowExchange:
    """All-to-all of row ids and rows over one process group, for the shards of one table.

    Args:
        group: the process group (its size equals the number of parts).
        parts: the ShardRange each rank of the group holds, by group rank.
    """

    def __init__(self, group: dist.ProcessGroup | None, parts: Sequence[ShardRange], dedup: bool = True) -> None:
        self.group, self.dedup = group, dedup
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.counter = WireCounter()
        self._starts: dict[int, np.ndarray] = {}
        self._rank_of: dict[int, np.ndarray] = {}
        for lid in parts[0].ranges:
            by_start = sorted(range(len(parts)), key=lambda r: parts[r].ranges[lid])
            self._starts[lid] = np.asarray([parts[r].ranges[lid][0] for r in by_start], np.int64)
            self._rank_of[lid] = np.asarray(by_start, np.int64)

    # -- routing ----------------------------------------------------------------------------
    def route(self, layer_id: int, rows: np.ndarray, dtype: torch.dtype, op: int) -> Routed:
        """Group `rows` (int64 [n] global rows; deduplicated first if `dedup`) by owner, then
        exchange headers and ids."""
        inverse: torch.Tensor | None = None
        if self.dedup:
            uniq_np, inverse = unique_inverse(rows)
        else:
            uniq_np = rows
        slot = owners(self._starts[layer_id], uniq_np)               # [u] index into starts
        owner = self._rank_of[layer_id][slot]                         # [u] owning rank
        if owner.size > 1 and np.any(owner[1:] < owner[:-1]):         # not yet grouped by owner
            keys = owner.astype(np.int16) if self.world < 2**15 else owner
            perm = np.argsort(keys, kind="stable")                    # a radix sort of int16 keys: O(n)
            uniq_np, owner, slot = uniq_np[perm], owner[perm], slot[perm]
            back = np.empty_like(perm)
            back[perm] = np.arange(perm.size)                         # request i went out at back[i]
            inverse = torch.from_numpy(back) if inverse is None else torch.from_numpy(back)[inverse]
        local = uniq_np - self._starts[layer_id][slot]
        send_counts = np.bincount(owner, minlength=self.world).tolist()
        recv_counts = self.headers(send_counts, layer_id, dtype, op)
        recv_local = self._all_to_all(torch.from_numpy(np.ascontiguousarray(local)), recv_counts, send_counts,
                                      f"the row ids of layer {layer_id}")
        self.counter.add(exchanges=1, rows_requested=int(rows.size), rows_unique=int(uniq_np.size),
                         rows_remote=int(uniq_np.size - send_counts[self.rank]),
                         bytes_sent=8 * (sum(send_counts) - send_counts[self.rank]),
                         bytes_received=8 * (sum(recv_counts) - recv_counts[self.rank]))
        return Routed(uniq_np, inverse, local, send_counts, recv_counts, recv_local.numpy())

    def headers(self, send_counts: list[int], layer_id: int, dtype: torch.dtype, op: int) -> list[int]:
        """Exchange [count, layer, dtype, op] with every rank; refuse a mismatch on every rank."""
        mine = [layer_id, DTYPE_CODES[dtype], op]
        send = torch.tensor([[c, *mine] for c in send_counts], dtype=torch.int64)      # [W, 4]
        recv = torch.empty_like(send)
        all_to_all(recv, send, self.group, f"the {_OP_NAMES.get(op, 'refused call')} headers of layer {layer_id}")
        rows = recv.tolist()                                                            # [W][count, layer, dtype, op]
        refused = [r for r, row in enumerate(rows) if row[3] == OP_REFUSED]
        if refused:
            raise InputError(f"rank {refused[0]} refused its arguments to this {_OP_NAMES[op]} (its own error says "
                             "why), so no rank looked anything up: fix the call on that rank")
        calls = {tuple(row[1:]) for row in rows}
        if len(calls) > 1:
            names = {code: str(d).removeprefix("torch.") for d, code in DTYPE_CODES.items()}
            seen = "; ".join(f"rank {r}: {_OP_NAMES.get(o, o)} of layer {lid}, {names.get(c, c)}"
                             for r, (_, lid, c, o) in enumerate(rows))
            raise InputError(f"the ranks of a ShardedTable made different calls together ({seen}): every rank must "
                             "call the same lookup, prefetch or backward with the same layer and dtype, in the "
                             "same order")
        return [row[0] for row in rows]

    def refuse(self, op: int) -> None:
        """Take part in one exchange's headers for a call this rank refused, so no peer waits."""
        send = torch.tensor([[0, -1, 0, OP_REFUSED]] * self.world, dtype=torch.int64)
        all_to_all(torch.empty_like(send), send, self.group, f"the headers of a refused {_OP_NAMES.get(op, op)}")

    def _all_to_all(self, send: torch.Tensor, recv_counts: list[int], send_counts: list[int],
                    what: str = "row ids") -> torch.Tensor:
        """all_to_all_single of rows of `send` [sum(send_counts), ...] split by rank."""
        out = send.new_empty((sum(recv_counts), *send.shape[1:]))
        all_to_all(out, send, self.group, what, recv_counts, send_counts)
        return out

    # -- payloads ---------------------------------------------------------------------------
    def answer(self, routed: Routed, serve: Callable[[np.ndarray], torch.Tensor],
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows back: `serve(recv_local)` gives this rank's answers [m, D]; returns [u, D] for `uniq`
        (into `out` if given)."""
        served = serve(routed.recv_local)                                     # [m, D] in request order
        return self.send_bytes(served, routed.recv_counts, routed.send_counts, out)

    def send_bytes(self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """all_to_all_single of row tensors [sum(send_counts), D] as raw bytes; returns [sum(recv_counts), D]
        (into `out`, a contiguous tensor of that shape and the rows' dtype, if given)."""
        width = rows.shape[1]
        raw = rows.contiguous().view(torch.uint8).reshape(rows.shape[0], -1)  # [n, D*itemsize]
        if out is None:
            back = self._all_to_all(raw, recv_counts, send_counts, "rows")
        else:
            back = out.view(torch.uint8).reshape(sum(recv_counts), raw.shape[1])
            all_to_all(back, raw, self.group, "rows", recv_counts, send_counts)
        row_bytes = raw.shape[1]
        self.counter.add(bytes_sent=row_bytes * (sum(send_counts) - send_counts[self.rank]),
                         bytes_received=row_bytes * (sum(recv_counts) - recv_counts[self.rank]))
        return back.view(rows.dtype).reshape(-1, width)

