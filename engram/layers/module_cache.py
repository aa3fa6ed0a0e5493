"""EngramCache: what an Engram layer keeps between generation steps, so steps equal the full pass.

Two parts, changed together: the layer's `NgramHistory` (the ids its n-grams reach back to) and,
for a layer with a ShortConv, the convolution's past inputs: the last (k-1)*d normalized values
of each sequence (k taps, dilation d), plus `max_rollback` more so rejected drafts can be undone.

    cache = mem.new_cache(batch_size=B)
    y = mem(hidden_new, new_ids, cache=cache)    # equals the full forward there; appends to cache
    cache.rollback(n); cache.reorder(beam_idx); cache.reset(which)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engram.addressing.history import NgramHistory, check_flags, last_valid_columns, lookback_columns
from engram.errors import InputError

__all__ = ["EngramCache", "new_cache", "check_prefetch_context", "check_step", "commit", "conv_step"]


class EngramCache:
    """One Engram layer's generation state for B sequences (make it with `mem.new_cache`).

    Attributes:
        history: the layer's NgramHistory (lookups with `history=` read it).
        conv: the ShortConv's past inputs [B, (k-1)*d + max_rollback, G*C], newest last (zeros
            before each sequence's start), or None for a layer without ShortConv.

    `rollback`, `reorder` and `reset` change both parts alike; the layer's forward appends to
    both. Pickles like its parts (move it to another process with its tensors).
    """

    def __init__(self, history: NgramHistory, conv: torch.Tensor | None = None) -> None:
        self.history = history
        self.conv = conv

    @property
    def batch_size(self) -> int:
        return self.history.batch_size

    def rollback(self, n: Any) -> None:
        """Undo the last `n` tokens (int or [B] ints) of each sequence: see NgramHistory.rollback."""
        steps = self.history.rollback(n)
        if self.conv is not None and steps.any():
            width = self.conv.shape[1]
            cols = torch.from_numpy(np.arange(width) - steps[:, None])                  # [B, W] old columns
            past = self.conv.gather(1, cols.clamp_min(0).to(self.conv.device)[..., None].expand_as(self.conv))
            self.conv = past.masked_fill((cols < 0).to(past.device)[..., None], 0.0)   # [B, W, GC]

    def reorder(self, beam_idx: Any) -> None:
        """Sequence i becomes the old sequence beam_idx[i] (beam search); B may change."""
        self.history.reorder(beam_idx)
        if self.conv is not None:
            idx = torch.as_tensor(np.asarray(beam_idx.cpu() if torch.is_tensor(beam_idx) else beam_idx))
            self.conv = self.conv[idx.to(self.conv.device)]

    def reset(self, which: Any = None) -> None:
        """Start the flagged sequences ([B] bool; None: all) over."""
        flags = check_flags("which", which, (self.batch_size,))
        self.history.reset(flags)
        if self.conv is not None:
            if flags is None:
                self.conv = torch.zeros_like(self.conv)
            else:
                self.conv = self.conv.masked_fill(torch.from_numpy(flags).to(self.conv.device)[:, None, None], 0.0)

    def commit(self, token_ids: Any, mask: np.ndarray | None, conv: torch.Tensor | None) -> None:
        """After a layer's step: append its ids to the history and take the ShortConv's new past."""
        self.history.append(token_ids, mask)
        if conv is not None:
            self.conv = conv

    def __repr__(self) -> str:
        conv = None if self.conv is None else tuple(self.conv.shape)
        return f"EngramCache({self.history!r}, conv={conv})"


def new_cache(layer: Any, batch_size: int, max_rollback: int) -> EngramCache:
    """An empty cache for an Engram layer (`layer.spec`, `layer.comp`, and `layer.short_conv` if it has one).

    `cache.rollback` can undo up to `max_rollback` tokens per sequence (speculative drafts).
    """
    history = NgramHistory(layer.spec, layer.comp, batch_size=batch_size, max_rollback=max_rollback)
    conv = getattr(layer, "short_conv", None)
    return EngramCache(history, None if conv is None else conv.new_past(batch_size, history.max_rollback))


def check_step(cache: Any, mask: Any, doc_start: Any, B: int, T: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Check a layer forward's `cache`, `mask` and `doc_start` for a [B, T] step; the flags as numpy
    bool arrays or None."""
    if cache is not None and not isinstance(cache, EngramCache):
        raise InputError(f"cache must be an EngramCache, got {type(cache).__name__}: pass mem.new_cache(batch_size=B)")
    if cache is not None and cache.batch_size != B:
        raise InputError(f"cache holds batch_size={cache.batch_size} sequences but hidden_states has B={B}: "
                         "pass the cache made for this batch (mem.new_cache(batch_size=B)) or reorder it")
    if cache is not None and doc_start is not None:
        raise InputError("doc_start with a cache is not supported: a generation step continues its sequences; "
                         "start a new one in a slot with cache.reset(which) instead")
    return check_flags("mask", mask, (B, T)), check_flags("doc_start", doc_start, (B, T))


def commit(cache: EngramCache | None, token_ids: Any, mask: np.ndarray | None, conv: torch.Tensor | None) -> None:
    """After a layer's step: append its ids (a prefetch handle's own) and the ShortConv's past to `cache`."""
    if cache is not None:
        context = getattr(token_ids, "context", None)
        cache.commit(token_ids if context is None else context.token_ids, mask, conv)


def check_prefetch_context(handle: Any, history: NgramHistory | None, mask: np.ndarray | None, owner: str) -> None:
    """Raise unless a prefetch handle read `history` as it is now, with `mask` (or neither has a history)."""
    context = handle.context
    made_with = context is not None
    if history is None and not made_with:
        return
    if history is None or context is None or not context.matches(history, mask):
        made = "with another history, history state or mask" if made_with else "without a history"
        step = "uses a cache" if history is not None else "has no cache"
        raise InputError(f"the prefetch handle was made {made}, but this {owner} step {step}: prefetch with "
                         "history=cache.history after the previous step (table.prefetch(ids, history=cache.history))")


def conv_step(x: torch.Tensor, past: torch.Tensor, weight: torch.Tensor, dilation: int,
              mask: np.ndarray | None, starts: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal depthwise convolution that continues from `past` inputs, skipping padding.

    Args:
        x: new inputs [B, T, GC]. past: the last W inputs of each sequence [B, W, GC], W >= (k-1)*d.
        weight: [GC, 1, k]. dilation: d. mask: [B, T] bool (False: padding, not an input) or None.
        starts: [B, T] bool or None: a document starts there; taps do not reach before it (zeros).

    Returns:
        (y [B, T, GC] before the activation, the new past [B, W, GC]).
    """
    B, T, GC = x.shape
    W, k = past.shape[1], weight.shape[-1]
    S = (k - 1) * dilation
    window = torch.cat([past, x], dim=1)                                     # [B, W+T, GC]
    if mask is None and starts is None:       # k shifted slices: cheaper than conv1d for a step's few positions
        y = x.new_zeros(B, T, GC)
        for i in range(k):
            start = W - S + i * dilation
            y = y + window[:, start: start + T] * weight[:, 0, i]                # [B, T, GC]
        return y, window[:, T:]
    new = np.ones((B, T), np.bool_) if mask is None else mask
    valid = np.concatenate([np.ones((B, W), np.bool_), new], axis=1)          # [B, W+T]
    doc = None if starts is None else np.concatenate([np.zeros((B, W), np.bool_), starts], axis=1)
    offsets = [(k - 1 - i) * dilation for i in range(k)]                      # tap i reads o positions back
    cols, cuts = lookback_columns(valid, doc, W, offsets)                     # cut only at document starts
    y = x.new_zeros(B, T, GC)
    for i, (col, cut) in enumerate(zip(cols, cuts, strict=True)):
        idx = torch.from_numpy(np.ascontiguousarray(col)).to(x.device)        # [B, T]
        tap = window.gather(1, idx[..., None].expand(B, T, GC))               # [B, T, GC]
        if cut.any():
            tap = tap.masked_fill(torch.from_numpy(cut).to(x.device)[..., None], 0.0)
        y = y + tap * weight[:, 0, i]
    keep = torch.from_numpy(last_valid_columns(valid, W)).to(x.device)      # [B, W]
    return y, window.gather(1, keep[..., None].expand(B, W, GC))
