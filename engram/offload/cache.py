"""RowCache: a fixed number of slots holding rows and their Adam moments in float32, with CLOCK eviction.

Every array is allocated once, at open, for `slots` rows: the rows [S, D], both moments [S, 2D]
(exp_avg then exp_avg_sq), and per slot the row key it holds (-1: free), a dirty bit (changed since
it was last written back), a CLOCK reference bit, and three kinds of hold that keep a slot from
eviction:

- `busy`: a call is reading the slot or loading it right now (a count);
- `step_pin`: the slot's row was looked up for a gradient in step `tick` (kept until that step's
  gradients are dropped: `step()` or `zero_grad()`);
- `prefetch_pin` / `prefetch_until`: the slot's row was asked for by a prefetch (its number) made
  for a step up to `prefetch_until`; held while that step is not over and the prefetch is one of
  the last two (the one for the step in progress and the one for the next).

`victims(k)` sweeps the CLOCK hand over the slots: a free or unreferenced slot that is not held is
taken, a referenced one loses its bit (a second chance). The caller (engram.offload.store) owns
the lock and the index from keys to slots.
"""

from __future__ import annotations

import numpy as np
import torch

from engram.offload.keyindex import INDEX_BYTES_PER_KEY, KeyIndex

__all__ = ["RowCache", "CacheFull", "SLOT_OVERHEAD_BYTES"]

SLOT_OVERHEAD_BYTES = 8 + 1 + 1 + 4 + 8 + 8 + 8 + 1 + INDEX_BYTES_PER_KEY   # per-slot arrays below, and the index


class CacheFull(Exception):
    """Fewer slots can be freed than a call needs (`needed` more, `free` possible); the caller words the error."""

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(needed, free)
        self.needed, self.free = needed, free


class RowCache:
    """`slots` rows of D float32 values with their moments."""

    def __init__(self, slots: int, head_dim: int) -> None:
        self.slots = slots
        self.rows = torch.zeros((slots, head_dim), dtype=torch.float32)           # [S, D]
        self.moments = torch.zeros((slots, 2 * head_dim), dtype=torch.float32)    # [S, 2D]
        self.exp_avg = self.moments[:, :head_dim]                                  # [S, D] views
        self.exp_avg_sq = self.moments[:, head_dim:]
        self.key = np.full(slots, -1, np.int64)
        self.dirty = np.zeros(slots, bool)
        self.ref = np.zeros(slots, bool)
        self.busy = np.zeros(slots, np.int32)
        self.step_pin = np.zeros(slots, np.int64)
        self.prefetch_pin = np.zeros(slots, np.int64)
        self.prefetch_until = np.zeros(slots, np.int64)
        self.loading = np.zeros(slots, bool)
        self.index = KeyIndex(slots)
        self.hand = 0

    def evictable(self, sl: slice | np.ndarray, tick: int, prefetch: int) -> np.ndarray:
        """Which slots of `sl` may be evicted at step `tick` with `prefetch` the latest prefetch's number."""
        prefetched = (self.prefetch_pin[sl] >= max(prefetch - 1, 1)) & (self.prefetch_until[sl] >= tick)
        return (self.busy[sl] == 0) & (self.step_pin[sl] < tick) & ~self.loading[sl] & ~prefetched

    def victims(self, k: int, tick: int, prefetch: int) -> np.ndarray:
        """`k` distinct slots to reuse, found by the CLOCK hand (free slots count as unreferenced).

        Raises:
            CacheFull: fewer than `k` slots may be evicted (nothing was taken).
        """
        if k > self.slots:
            raise CacheFull(k, int(np.count_nonzero(self.evictable(slice(None), tick, prefetch))))
        found: list[np.ndarray] = []
        need, swept = k, 0
        try:
            while need:
                if swept >= 2 * self.slots:         # two full turns: every unheld slot lost its bit already
                    raise CacheFull(k, int(np.count_nonzero(self.evictable(slice(None), tick, prefetch))) + k - need)
                start = self.hand
                stop = min(self.slots, start + max(2 * need, 4096))
                ok = self.evictable(slice(start, stop), tick, prefetch)
                take = np.flatnonzero(ok & ~self.ref[start:stop])[:need]
                end = (int(take[-1]) + 1) if take.size == need else stop - start
                passed = self.ref[start: start + end]
                passed[ok[:end]] = False            # a second chance for the referenced ones passed over
                take += start
                self.busy[take] += 1                # taken: not taken again when the hand comes round
                found.append(take)
                need -= take.size
                swept += end
                self.hand = (start + end) % self.slots
        finally:
            for take in found:
                self.busy[take] -= 1
        return np.concatenate(found) if len(found) > 1 else found[0]
