"""Checks of what an NgramHistory is given: a step's ids, a rollback count, and its pickled state.

A history moves between processes by pickle (prefill on one, decode on another), so its state
can arrive damaged or altered. Unpickling trusts nothing: the state must be what the constructor
and `append` could have made (the same fields, int64 ids inside the vocabulary, the width
N-1 + max_rollback, counts that `rollback` can honour), or it is refused with InputError instead
of wrapping a negative id around to another row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engram.addressing.compression import check_id_range
from engram.addressing.spec import TableSpec
from engram.args import is_int
from engram.errors import InputError, TokenIdError
from engram.limits import MAX_VOCAB_SIZE
from engram.tensors import check_ids_2d, to_numpy_ids

__all__ = ["STATE_FIELDS", "check_state", "step_ids", "rollback_steps"]

# The attributes of an NgramHistory: its pickled state is exactly these.
STATE_FIELDS = frozenset({"spec", "fingerprint", "vocab_size", "context_size", "max_rollback", "decoding_rank",
                          "version", "_ids", "_starts", "_lengths", "_undo"})
_FIX = "the pickled history is damaged or was altered: pickle it again from the live history"


def _refuse(problem: str) -> InputError:
    return InputError(f"NgramHistory state {problem}: {_FIX}")


def _array(state: dict[str, Any], name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    value = state[name]
    if type(value) is not np.ndarray or value.dtype != dtype or value.shape != shape:
        got = (f"{type(value).__name__} of dtype {value.dtype} and shape {value.shape}" if isinstance(value, np.ndarray)
               else type(value).__name__)
        raise _refuse(f"field {name} is a {got}, expected {np.dtype(dtype)} of shape {shape}")
    return np.array(value, dtype=dtype, copy=True)          # its own memory, writable


def check_state(state: Any) -> dict[str, Any]:
    """The pickled `state` of an NgramHistory, checked as the constructor and `append` check theirs.

    Returns:
        The state to adopt (arrays copied into fresh int64 / bool arrays).

    Raises:
        InputError: another set of fields, a field of another type, or values no history could
            hold: ids outside the vocabulary, another width, negative or inconsistent counts.
        SpecError: a spec whose fields a TableSpec refuses.
    """
    if not isinstance(state, dict) or set(state) != STATE_FIELDS:
        fields = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise _refuse(f"has fields {fields}, expected {sorted(STATE_FIELDS)}")
    spec = state["spec"]
    if not isinstance(spec, TableSpec):
        raise _refuse(f"field spec is a {type(spec).__name__}, expected an engram.TableSpec")
    spec = TableSpec.from_dict(spec.to_dict())       # every field validated again (unpickling skips __init__)
    ints = {name: state[name] for name in ("vocab_size", "context_size", "max_rollback", "version")}
    bad = [f"{name}={value!r}" for name, value in ints.items() if not is_int(value) or value < 0]
    rank = state["decoding_rank"]
    if rank is not None and (not is_int(rank) or rank < 0):
        bad.append(f"decoding_rank={rank!r}")
    if not isinstance(state["fingerprint"], str) or len(state["fingerprint"]) != 16:
        bad.append(f"fingerprint={state['fingerprint']!r}")
    if bad:
        raise _refuse(f"has {', '.join(bad)}: expected non-negative ints (decoding_rank may be None) and a "
                      "16-digit compression fingerprint")
    vocab, width = int(ints["vocab_size"]), int(ints["context_size"]) + int(ints["max_rollback"])
    if not 1 <= vocab <= MAX_VOCAB_SIZE or ints["context_size"] != spec.max_ngram_size - 1:
        raise _refuse(f"has vocab_size={vocab} and context_size={ints['context_size']}, expected a vocabulary in "
                      f"[1, {MAX_VOCAB_SIZE}] and the spec's N-1={spec.max_ngram_size - 1}")
    ids = state["_ids"]
    B = ids.shape[0] if isinstance(ids, np.ndarray) and ids.ndim == 2 and ids.shape[0] >= 1 else 1
    out = dict(state, spec=spec, _ids=_array(state, "_ids", np.int64, (B, width)),
               _starts=_array(state, "_starts", np.bool_, (B, width)),
               _lengths=_array(state, "_lengths", np.int64, (B,)), _undo=_array(state, "_undo", np.int64, (B,)))
    foreign = (out["_ids"] < 0) | ((out["_ids"] >= vocab) & (out["_ids"] != spec.pad_id))
    if foreign.any():
        raise _refuse(f"holds token id {int(out['_ids'][foreign][0])}, outside [0, {vocab}) and not the pad id "
                      f"{spec.pad_id}")
    lengths, undo = out["_lengths"], out["_undo"]
    if (lengths < 0).any() or (undo < 0).any() or (undo > np.minimum(lengths, ints["max_rollback"])).any():
        raise _refuse(f"has lengths {lengths.tolist()[:8]} and undoable counts {undo.tolist()[:8]}: expected "
                      f"0 <= undoable <= min(length, max_rollback={ints['max_rollback']})")
    return out


def step_ids(token_ids: Any, batch_size: int, vocab_size: int) -> np.ndarray:
    """A step's raw ids [B, T] as int64 numpy, or InputError (not ids, ragged, another B) / TokenIdError."""
    ids = to_numpy_ids(token_ids)         # ragged lists, None, strings and floats are refused here
    check_ids_2d(ids)
    if ids.shape[0] != batch_size:
        raise InputError(f"token_ids has shape {tuple(ids.shape)} but the history tracks batch_size="
                         f"{batch_size} sequences: pass [{batch_size}, T] ids, or reorder() the history to the new "
                         "batch")
    check_id_range(ids, vocab_size)
    return ids


def rollback_steps(n: Any, batch_size: int, max_rollback: int, undoable: np.ndarray) -> np.ndarray:
    """`n` (an int or [B] ints) as int64 [B] tokens to undo, each 0 <= n <= what its sequence can undo."""
    B = batch_size
    if is_int(n):
        if not 0 <= n <= max_rollback:     # checked before an int64 array is made (2**63 would overflow)
            steps = np.array([-1 if n < 0 else max_rollback + 1], np.int64)
        else:
            steps = np.full(B, int(n), np.int64)
    else:
        try:
            steps = to_numpy_ids(n, "n")
        except TokenIdError:        # counts past int64
            raise InputError(f"rollback n={_show(n)} exceeds max_rollback={max_rollback}: pass how many tokens "
                             "to undo") from None
        if steps.shape != (B,):
            raise InputError(f"rollback n has shape {tuple(steps.shape)}: pass one int, or [{B}] ints "
                             "(one per sequence)")
    if B and int(steps.min()) < 0:
        raise InputError(f"rollback n={_show(n)} is negative: pass how many tokens to undo (>= 0)")
    if B and int(steps.max()) > max_rollback:
        most = int(steps.max()) if not is_int(n) else n
        raise InputError(f"rollback n={_show(n)} exceeds max_rollback={max_rollback}: make the history "
                         f"with max_rollback>={most}, or append fewer draft tokens per step")
    short = np.flatnonzero(steps > undoable)
    if short.size:
        b = int(short[0])
        raise InputError(
            f"rollback n={_show(n)}: sequence {b} can undo only {int(undoable[b])} tokens (those appended since "
            f"its start, last reset or rollback, at most max_rollback={max_rollback}): undo at most that")
    return steps


def _show(n: Any) -> str:
    return repr(n.tolist() if hasattr(n, "tolist") else n)
