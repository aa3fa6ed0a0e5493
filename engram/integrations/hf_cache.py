"""The Engram layers' generation state inside a Hugging Face transformers `Cache`.

`generate()` keeps one `Cache` per call and changes it in place: beam search reorders it
(`reorder_cache`), `num_return_sequences` and contrastive search repeat or select sequences
(`batch_repeat_interleave`, `batch_select_indices`), assisted decoding crops rejected draft tokens
(`crop`), and `reset` starts over. The Engram layers' `EngramCache`s must follow every one of those
changes, so they ride on the cache object itself: the first Engram layer that sees a cache gives
it an `engram_state` (one EngramCache per Engram layer) and makes its class a subclass of its own
class (`carrier_class`) whose five methods call the original and then change the Engram state alike.
Nothing else about the cache changes (it stays an instance of its class); `is_compileable` turns
False, since the Engram step hashes on the host.

The state also keeps, for the last `max_rollback` positions, which were tokens and which padding
(`attention_mask` 0), while any padding is in reach: a crop counts positions, a history rolls back tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engram.errors import InputError
from engram.layers.module_cache import EngramCache

__all__ = ["EngramCacheState", "carrier_class"]


class EngramCacheState:
    """One EngramCache per Engram layer (keyed by decoder layer index), and the positions so far.

    Args:
        layers: {decoder layer index: that layer's EngramCache}, all of one batch size.
        owner: what made it (the model's hooks): a cache is refused by another model.
    """

    def __init__(self, layers: dict[int, EngramCache], owner: object) -> None:
        self.layers, self.owner = layers, owner
        first = next(iter(layers.values()))
        self.batch_size = first.batch_size
        self.max_rollback = first.history.max_rollback
        self.seen = 0                                              # positions appended, padding included
        self.undoable = 0                                          # of them, how many a crop may take back
        self.padding: np.ndarray | None = None    # [B, undoable]: token (True) or padding; None: all tokens
        self.step: object = None                                   # the forward whose positions were counted last

    def begin(self, step: object, batch: int, flags: np.ndarray | None, T: int, kv_length: int) -> None:
        """Count a forward's T new positions once (the first Engram layer of the forward calls it)."""
        if step is self.step:
            return
        if batch != self.batch_size:
            raise InputError(f"the cache's Engram state holds batch_size={self.batch_size} sequences but this step "
                             f"has {batch}: pass the cache made for this batch (or none: generate() makes one)")
        if kv_length != self.seen:
            raise InputError(f"the cache's keys and values hold {kv_length} positions but its Engram state "
                             f"{self.seen}: the cache was changed without it (e.g. cropped layer by layer); pass a "
                             "fresh cache, or change it only through the Cache's own methods")
        undoable = min(self.undoable + T, self.max_rollback)
        if flags is not None or self.padding is not None:        # a step with padding in reach: keep the flags
            old = np.ones((batch, self.undoable), np.bool_) if self.padding is None else self.padding
            new = np.ones((batch, T), np.bool_) if flags is None else flags
            self.padding = np.concatenate([old, new], axis=1)[:, old.shape[1] + T - undoable:]
            if self.padding.all():
                self.padding = None
        self.seen, self.undoable, self.step = self.seen + T, undoable, step

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last positions: -n removes n; 0 nothing; a positive n keeps the first n (the older rule)."""
        if tokens_to_remove > 0:
            tokens_to_remove = min(0, tokens_to_remove - self.seen)
        n = -tokens_to_remove
        if n == 0:
            return
        if n > self.undoable:
            raise InputError(f"cannot crop {n} positions from the Engram state: it can undo at most "
                             f"{self.undoable} (max_rollback={self.max_rollback}); pass "
                             "add_engram(..., max_rollback=) at least as large as the drafts")
        if self.padding is None:
            tokens: Any = n                                                # every position a token
        else:
            tokens = self.padding[:, -n:].sum(axis=1).astype(np.int64)     # [B] tokens among those positions
            self.padding = self.padding[:, :-n]
        for cache in self.layers.values():
            cache.rollback(tokens)
        self.seen, self.undoable, self.step = self.seen - n, self.undoable - n, None

    def reorder(self, index: Any) -> None:
        """Sequence i becomes old sequence index[i] (ints, or a [B] bool mask of those kept)."""
        idx = index.detach().cpu().numpy() if torch.is_tensor(index) else np.asarray(index)
        if idx.dtype == np.bool_:
            idx = np.flatnonzero(idx)
        for cache in self.layers.values():
            cache.reorder(idx)
        if self.padding is not None:
            self.padding = self.padding[idx]
        self.batch_size = int(idx.size)

    def reset(self) -> None:
        """Every sequence starts over."""
        for cache in self.layers.values():
            cache.reset()
        self.seen, self.undoable, self.step, self.padding = 0, 0, None, None


_Base: Any = object


class _Carrier(_Base):
    """Mixed in ahead of a Cache class: its batch and length changes reach `engram_state` too."""

    engram_state: EngramCacheState

    @property
    def is_compileable(self) -> bool:
        return False

    def reset(self) -> None:
        super().reset()
        self.engram_state.reset()

    def reorder_cache(self, beam_idx: Any) -> None:
        super().reorder_cache(beam_idx)
        self.engram_state.reorder(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.engram_state.crop(int(tokens_to_remove))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.engram_state.reorder(np.repeat(np.arange(self.engram_state.batch_size), int(repeats)))

    def batch_select_indices(self, indices: Any) -> None:
        super().batch_select_indices(indices)
        self.engram_state.reorder(indices)


_CLASSES: dict[type, type] = {}


def carrier_class(cls: type) -> type:
    """`cls` with the Engram state carried along (made once per cache class)."""
    if issubclass(cls, _Carrier):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Engram{cls.__name__}", (_Carrier, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]
