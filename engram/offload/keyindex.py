"""KeyIndex: a hash index from int64 keys to int64 values, every operation vectorized over a batch.

The row cache finds which of a batch's rows it holds, and in which slot, with one `find` of the
batch's distinct row keys. A Python dict would cost a call per row; a dense array indexed by row
would grow with the table, not the cache. This is open addressing with linear probing in numpy
arrays sized for `capacity` live keys: a batch probes in rounds, each round one vectorized step for
every key still unresolved. Deleted keys leave tombstones (probes pass over them, inserts reuse
them); the arrays are rebuilt from the live keys once tombstones and keys fill three quarters.

Memory: 16 bytes per position, 2 to 4 positions per key of `capacity`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KeyIndex", "INDEX_BYTES_PER_KEY"]

_EMPTY, _TOMB = -1, -2
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)        # Fibonacci hashing multiplier (2**64 / golden ratio)
INDEX_BYTES_PER_KEY = 64                        # the most a key of `capacity` costs (4 positions x 16 bytes)


class KeyIndex:
    """Keys (int64 >= 0) to values (int64), at most `capacity` keys at a time.

    Callers keep the rules: `insert` only keys not present, `delete` only keys present, never
    more than `capacity` keys at once. Not thread-safe: the owner serializes calls.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self._bits = max(4, int(2 * max(self.capacity, 1) - 1).bit_length())   # 2**bits >= 2 * capacity
        size = 1 << self._bits
        self._keys = np.full(size, _EMPTY, np.int64)
        self._values = np.zeros(size, np.int64)
        self._mask = size - 1
        self._live = 0
        self._tombs = 0

    def __len__(self) -> int:
        return self._live

    def _home(self, keys: np.ndarray) -> np.ndarray:
        """First probe position of each key [n] (the top bits of key * golden)."""
        mixed = keys.astype(np.uint64) * _GOLDEN                    # wraps modulo 2**64
        return (mixed >> np.uint64(64 - self._bits)).astype(np.int64)

    def _positions(self, keys: np.ndarray) -> np.ndarray:
        """Where each key [n] sits, or -1 where it is absent."""
        out = np.full(keys.shape, -1, np.int64)
        todo = np.arange(keys.size)
        pos = self._home(keys)
        while todo.size:
            found = self._keys[pos]
            hit = found == keys[todo]
            out[todo[hit]] = pos[hit]
            go = ~hit & (found != _EMPTY)
            todo, pos = todo[go], (pos[go] + 1) & self._mask
        return out

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The value of each key [n] (int64), or -1 where the key is absent."""
        pos = self._positions(keys)
        out = np.full(keys.shape, -1, np.int64)
        held = pos >= 0
        out[held] = self._values[pos[held]]
        return out

    def insert(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Add keys [n] (distinct, absent) with their values [n]."""
        if self._live + self._tombs + keys.size > 3 * (self._mask + 1) // 4:
            self._rebuild()
        self._place(keys, values)
        self._live += keys.size

    def delete(self, keys: np.ndarray) -> None:
        """Remove keys [n] (distinct, present)."""
        pos = self._positions(keys)
        pos = pos[pos >= 0]
        self._keys[pos] = _TOMB
        self._live -= pos.size
        self._tombs += pos.size

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live key and its value (copies, in no particular order)."""
        live = self._keys >= 0
        return self._keys[live], self._values[live]

    def clear(self) -> None:
        self._keys.fill(_EMPTY)
        self._live = self._tombs = 0

    def _place(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Write keys into free positions; keys racing for one position: the first wins, the rest probe on."""
        todo = np.arange(keys.size)
        pos = self._home(keys)
        while todo.size:
            found = self._keys[pos]
            free = np.flatnonzero(found < 0)                        # empty or tombstone
            _, first = np.unique(pos[free], return_index=True)
            win = free[first]
            self._tombs -= int(np.count_nonzero(found[win] == _TOMB))
            self._keys[pos[win]] = keys[todo[win]]
            self._values[pos[win]] = values[todo[win]]
            rest = np.ones(todo.size, bool)
            rest[win] = False
            todo, pos = todo[rest], (pos[rest] + 1) & self._mask

    def _rebuild(self) -> None:
        keys, values = self.items()
        self.clear()
        self._place(keys, values)
        self._live = keys.size
