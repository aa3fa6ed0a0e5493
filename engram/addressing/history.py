"""NgramHistory: each sequence's last token ids, so new ids hash against their real predecessors.

A generation loop looks up a few new positions per step. Their n-grams reach back N-1 tokens
into earlier steps; the history holds those tokens (and `max_rollback` more, so rejected drafts
can be undone) for every sequence of the batch:

    hist = NgramHistory(spec, comp, batch_size=B, max_rollback=16)
    rows = table.lookup(new_ids, layer_id, history=hist)   # the rows the full sequence gives there
    hist.append(new_ids)                                   # after the step

`ngram_columns` builds, for new compressed ids, the N columns of each n-gram (the id itself and
its N-1 predecessors): the history's tail followed by the new ids, skipping positions marked as
padding (`mask` False) and stopping at document starts (`doc_start`), where the look-back sees
the pad id as at the start of a sequence. It runs vectorized over the batch; without a mask or
document starts it is one concatenation. The history is plain state (numpy arrays, the spec and
the compression's fingerprint): it pickles small, and lookups only read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engram.addressing.compression import Compression, check_pair
from engram.addressing.history_checks import check_state, rollback_steps, step_ids
from engram.addressing.spec import TableSpec
from engram.args import check_int
from engram.errors import InputError, SpecMismatchError
from engram.tensors import is_torch, to_numpy_ids

__all__ = ["NgramHistory", "PrefetchContext", "check_history", "check_flags", "history_arrays", "last_valid_columns",
           "lookback_columns", "ngram_columns", "prefetch_context"]


class NgramHistory:
    """The last `N-1 + max_rollback` raw token ids of each of `batch_size` sequences.

    Every sequence starts empty: its look-back sees the pad id, as a full-sequence lookup does
    left of position 0. Lookups (`table.lookup`, `table.prefetch`, `hasher.hash`, with
    `history=`) read it and never change it; `append` adds the ids of a step once they are part
    of the sequences, `rollback` takes back the last appended ones, `reorder` follows beam
    search, `reset` starts sequences over.

    Raw ids are kept (not compressed ones), so the state is small and pickles without the
    compression's lookup array; lookups compress the N-1 ids they read. The spec and the
    compression's fingerprint travel with it: a lookup on a table of other addressing or another
    tokenizer is refused. `decoding_rank` is None until a sharded table's lookup claims the
    history for its rank (`engram.distributed.decode`); other ranks are then refused it.

    Args:
        spec: the TableSpec of the tables the history is used with (N = spec.max_ngram_size).
        comp: their token-id compression.
        batch_size: B, the sequences tracked.
        max_rollback: how many of the last appended tokens `rollback` can undo (>= 0).

    Example:
        >>> hist = NgramHistory(table.spec, table.compression, batch_size=1)
        >>> e = table.lookup(prompt, 1, history=hist); hist.append(prompt)     # prefill
        >>> e = table.lookup(next_id, 1, history=hist); hist.append(next_id)   # one decode step
    """

    def __init__(self, spec: TableSpec, comp: Compression, *, batch_size: int, max_rollback: int = 16) -> None:
        check_pair(spec, comp, "pass the spec and compression of one table")
        self.spec = spec
        self.fingerprint = comp.fingerprint         # of the compression
        self.vocab_size = comp.vocab_size
        self.context_size = spec.max_ngram_size - 1   # N-1: ids a new position looks back at
        check_int("max_rollback", max_rollback, 0)
        check_int("batch_size", batch_size, 1)
        self.max_rollback = int(max_rollback)
        self.decoding_rank: int | None = None         # the rank whose sequences these are (sharded decoding)
        self.version = 0                              # changes with every append/rollback/reorder/reset
        self._reset_all(int(batch_size))

    def _reset_all(self, batch_size: int) -> None:
        width = self.context_size + self.max_rollback
        self._ids = np.full((batch_size, width), self.spec.pad_id, np.int64)   # raw ids, newest last
        self._starts = np.zeros((batch_size, width), np.bool_)                 # a document starts there
        self._lengths = np.zeros(batch_size, np.int64)                         # tokens in each sequence
        self._undo = np.zeros(batch_size, np.int64)                            # tokens rollback may undo

    # -- what it holds -------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(self._ids.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        """Tokens appended to each sequence since its start or reset (rollbacks subtracted): [B]."""
        return self._lengths.copy()

    @property
    def undoable(self) -> np.ndarray:
        """How many tokens `rollback` can undo now in each sequence: [B], at most max_rollback."""
        return self._undo.copy()

    def tail(self) -> tuple[np.ndarray, np.ndarray]:
        """The last N-1 raw ids of each sequence [B, N-1] (pad where the sequence is shorter) and
        whether a document starts at each of them [B, N-1]. Read-only views."""
        ids, starts = self._ids[:, -self.context_size:], self._starts[:, -self.context_size:]
        ids.flags.writeable = starts.flags.writeable = False
        return ids, starts

    def __repr__(self) -> str:
        return (f"NgramHistory(batch_size={self.batch_size}, max_ngram_size={self.spec.max_ngram_size}, "
                f"max_rollback={self.max_rollback}, lengths={self._lengths.tolist()})")

    # -- changing it ---------------------------------------------------------------------------
    def append(self, token_ids: Any, mask: Any = None, doc_start: Any = None) -> None:
        """Add a step's token ids to the sequences.

        Args:
            token_ids: raw token ids [B, T] (numpy, torch on any device, or nested lists).
            mask: optional [B, T] bool: False marks padding, which is not part of the sequence
                (ragged steps: sequences adding different numbers of tokens).
            doc_start: optional [B, T] bool: a new document starts at this position; later
                lookups do not look back past it (packed sequences).

        Raises:
            InputError: ids not [B, T] with this history's B; mask or doc_start of another shape.
            TokenIdError: an id outside the compression's vocabulary.
        """
        ids = step_ids(token_ids, self.batch_size, self.vocab_size)
        B, T = ids.shape
        mask = check_flags("mask", mask, (B, T))
        doc_start = check_flags("doc_start", doc_start, (B, T))
        width = self._ids.shape[1]
        window = np.concatenate([self._ids, ids], axis=1)                            # [B, W+T]
        starts = np.concatenate([self._starts, _or_zeros(doc_start, (B, T))], axis=1)  # [B, W+T]
        if mask is None:
            self._ids, self._starts = window[:, -width:].copy(), starts[:, -width:].copy()
            added = np.full(B, T, np.int64)
        else:
            valid = np.concatenate([np.ones((B, width), np.bool_), mask], axis=1)     # [B, W+T]
            cols = last_valid_columns(valid, width)                                    # [B, W]
            self._ids = np.take_along_axis(window, cols, axis=1)
            self._starts = np.take_along_axis(starts & valid, cols, axis=1)
            added = mask.sum(axis=1).astype(np.int64)
        self._lengths = self._lengths + added
        self._undo = np.minimum(self._undo + added, self.max_rollback)
        self.version += 1

    def rollback(self, n: Any) -> np.ndarray:
        """Undo the last `n` appended tokens (rejected draft tokens of speculative decoding).

        Afterwards lookups hash exactly as if those tokens had never been appended.

        Args:
            n: an int for every sequence, or [B] ints (numpy, torch or a list), each
                0 <= n <= `undoable` (at most max_rollback).

        Returns:
            [B] int64: the tokens undone in each sequence.

        Raises:
            InputError: n negative, past max_rollback, past what the sequence can undo, or of
                another shape.
        """
        n = rollback_steps(n, self.batch_size, self.max_rollback, self._undo)
        width = self._ids.shape[1]
        cols = np.arange(width) - n[:, None]                          # [B, W]: old column of each new one
        before = cols < 0                                             # no longer known: never read again
        self._ids = np.take_along_axis(self._ids, np.maximum(cols, 0), axis=1)
        self._starts = np.take_along_axis(self._starts, np.maximum(cols, 0), axis=1)
        self._ids[before], self._starts[before] = self.spec.pad_id, False
        self._lengths = self._lengths - n
        self._undo = self._undo - n
        self.version += 1
        return n

    def reorder(self, beam_idx: Any) -> None:
        """Re-index the sequences: sequence i becomes the old sequence beam_idx[i] (beam search).

        Args:
            beam_idx: [B'] ints in [0, B) (numpy, torch or a list); B' becomes the batch size.
        """
        idx = to_numpy_ids(beam_idx, "beam_idx")
        B = self.batch_size
        if idx.ndim != 1 or idx.size == 0:
            raise InputError(f"beam_idx has shape {tuple(idx.shape)}: pass a 1-D array of sequence indices "
                             f"in [0, {B}), one per new sequence")
        if int(idx.min()) < 0 or int(idx.max()) >= B:
            bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
            raise InputError(f"beam_idx holds {bad}, outside [0, {B}) for this history of batch_size={B}: "
                             "pass indices of the current sequences")
        self._ids, self._starts = self._ids[idx], self._starts[idx]
        self._lengths, self._undo = self._lengths[idx], self._undo[idx]
        self.version += 1

    def reset(self, which: Any = None) -> None:
        """Start sequences over (a new request in their slot): empty, nothing to roll back.

        Args:
            which: [B] bool, True for the sequences to reset; None resets all of them.
        """
        if which is None:
            self._reset_all(self.batch_size)
        else:
            flags = check_flags("which", which, (self.batch_size,))
            assert flags is not None
            self._ids[flags], self._starts[flags] = self.spec.pad_id, False
            self._lengths[flags], self._undo[flags] = 0, 0
        self.version += 1

    # -- pickling -----------------------------------------------------------------------------
    def __setstate__(self, state: Any) -> None:
        """Adopt a pickled state only if it is one a history could hold (`history_checks.check_state`)."""
        self.__dict__.update(check_state(state))


def _or_zeros(flags: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape, np.bool_) if flags is None else flags


def history_arrays(history: NgramHistory) -> tuple[np.ndarray, np.ndarray]:
    """The history's own arrays, for compiled code that reads them (never write to them): raw ids
    and document starts, each [B, N-1 + max_rollback], newest last. A later append, rollback or
    reorder replaces them; reset(which) changes them in place."""
    return history._ids, history._starts


def check_flags(name: str, flags: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """None, or `flags` as a numpy bool array of exactly `shape` (numpy, torch or lists)."""
    if flags is None:
        return None
    arr = flags.detach().cpu().numpy() if is_torch(flags) else np.asarray(flags)
    if arr.dtype != np.bool_ or arr.shape != shape:
        raise InputError(f"{name} has shape {arr.shape} and dtype {arr.dtype}, expected bool of shape {shape}: "
                         f"pass a boolean array with one flag per {'sequence' if len(shape) == 1 else 'position'}")
    return arr


def check_history(history: Any, spec: TableSpec, fingerprint: str, batch_size: int) -> NgramHistory:
    """Raise unless `history` is an NgramHistory for this addressing, compression and batch size."""
    if not isinstance(history, NgramHistory):
        raise InputError(f"history must be an engram.NgramHistory, got {type(history).__name__}: pass "
                         "engram.NgramHistory(table.spec, table.compression, batch_size=B)")
    differ = [] if history.spec == spec else history.spec.row_fields_differ(spec)
    if differ:
        fields = ", ".join(f"{n}={getattr(history.spec, n)!r} (here: {getattr(spec, n)!r})" for n in differ)
        raise SpecMismatchError(f"history was made for another spec: {fields}: make it with this table's spec, "
                                "engram.NgramHistory(table.spec, table.compression, ...)")
    if history.fingerprint != fingerprint:
        raise SpecMismatchError(f"history was made for another compression (fingerprint {history.fingerprint!r}, "
                                f"here: {fingerprint!r}): make it with this table's compression")
    if history.batch_size != batch_size:
        raise InputError(f"history tracks batch_size={history.batch_size} sequences but token_ids has B="
                         f"{batch_size}: pass ids of every tracked sequence, or reorder() the history first")
    return history


def lookback_columns(valid: np.ndarray, starts: np.ndarray | None, first: int,
                     offsets: Sequence[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Where each position's look-back lands, counting only valid positions.

    For window columns j in [first, L) and each offset o: the column of the o-th valid position
    before j (o = 0: j itself), and whether it is cut off: before the window, or in an earlier
    document than j (a document starts at each valid column where `starts` is True).

    Args:
        valid: [B, L] bool. starts: [B, L] bool or None. first: the first column looked up.

    Returns:
        (cols, cut): one [B, L-first] array each per offset.
    """
    B, L = valid.shape
    here = np.broadcast_to(np.arange(first, L), (B, L - first))
    counts = np.cumsum(valid, axis=1)
    before = (counts - valid)[:, first:]                           # [B, T] valid columns before j
    order = np.argsort(~valid, axis=1, kind="stable")              # [B, L] valid columns first, in order
    doc = None if starts is None else np.cumsum(starts & valid, axis=1)   # [B, L] document number
    cols, cuts = [], []
    for o in offsets:
        if o == 0:
            cols.append(here)
            cuts.append(np.zeros((B, L - first), np.bool_))
            continue
        rank = before - o                                          # [B, T] rank among valid columns
        col = np.take_along_axis(order, np.maximum(rank, 0), axis=1)
        cut = rank < 0
        if doc is not None:
            cut |= np.take_along_axis(doc, col, axis=1) != doc[:, first:]
        cols.append(col)
        cuts.append(cut)
    return cols, cuts


def last_valid_columns(valid: np.ndarray, width: int) -> np.ndarray:
    """[B, width]: the columns of each row's last `width` valid positions, oldest first (every
    row of `valid` [B, L] must have at least `width`)."""
    order = np.argsort(~valid, axis=1, kind="stable")                     # [B, L] valid columns first
    keep = (valid.sum(axis=1) - width)[:, None] + np.arange(width)         # [B, width] their ranks
    return np.take_along_axis(order, keep, axis=1)


def ngram_columns(x: np.ndarray, n: int, pad: int, lookup: np.ndarray, history: NgramHistory | None = None,
                  mask: np.ndarray | None = None, doc_start: np.ndarray | None = None) -> list[np.ndarray]:
    """The n columns of every position's n-gram: grams[k][b, t] = the compressed id k valid
    positions before x[b, t] (k = 0: x itself), or `pad` before the sequence or its document.

    Args:
        x: compressed ids [B, T]. n: N. pad: the compressed pad id. lookup: the compression's
        lookup (for the history's raw ids). history, mask, doc_start: checked by the caller.
    """
    B, T = x.shape
    P = n - 1
    tail_starts: np.ndarray | None = None
    if history is None:
        tail = np.full((B, P), pad, np.int64)
    else:
        raw, tail_starts = history.tail()
        tail = lookup[raw]                                                   # [B, P] compressed
        if not tail_starts[:, 1:].any():        # a start at the oldest column cuts nothing in reach
            tail_starts = None
    window = np.concatenate([tail, x], axis=1)                               # [B, P+T]
    if mask is None and doc_start is None and tail_starts is None:
        return [window[:, P - k: P - k + T] for k in range(n)]
    valid = np.concatenate([np.ones((B, P), np.bool_), _ones_if_none(mask, (B, T))], axis=1)
    starts = None
    if doc_start is not None or tail_starts is not None:
        starts = np.concatenate([_or_zeros(tail_starts, (B, P)), _or_zeros(doc_start, (B, T))], axis=1)
    cols, cuts = lookback_columns(valid, starts, P, range(n))
    grams = []
    for col, cut in zip(cols, cuts, strict=True):
        gram = np.take_along_axis(window, col, axis=1)                       # [B, T]
        gram[cut] = pad
        grams.append(gram)
    return grams


def _ones_if_none(flags: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    return np.ones(shape, np.bool_) if flags is None else flags


class PrefetchContext:
    """What a prefetch was made from, for a module that consumes its rows with a cache: the raw
    ids [B, T] and mask (to append to the cache's history), and which history it read, at which
    version (to refuse rows hashed against another state)."""

    def __init__(self, token_ids: np.ndarray, mask: np.ndarray | None, history: NgramHistory) -> None:
        self.token_ids, self.mask = token_ids, mask
        self.history_id, self.version = id(history), history.version

    def matches(self, history: NgramHistory, mask: np.ndarray | None) -> bool:
        """True if the prefetch read `history` in its current state, with this `mask`."""
        same_mask = mask is None if self.mask is None else mask is not None and np.array_equal(mask, self.mask)
        return self.history_id == id(history) and self.version == history.version and same_mask


def prefetch_context(token_ids: Any, history: NgramHistory | None, mask: Any) -> PrefetchContext | None:
    """A PrefetchContext of already checked arguments (the ids and mask are copied); None without a history."""
    if history is None:
        return None
    ids = np.array(to_numpy_ids(token_ids))
    flags = None if mask is None else check_flags("mask", mask, ids.shape)
    return PrefetchContext(ids, None if flags is None else flags.copy(), history)
