"""Small conversions between numpy arrays and torch tensors, without importing torch eagerly."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from engram.errors import InputError, TokenIdError

__all__ = ["is_torch", "to_numpy_ids", "check_ids_2d"]


def is_torch(x: Any) -> bool:
    """True for a torch.Tensor (checked without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def to_numpy_ids(x: Any, name: str = "token_ids") -> np.ndarray:
    """An int64 numpy view (or copy) of integer ids from numpy, torch (any device) or lists."""
    if is_torch(x):
        if x.dtype.is_floating_point or x.dtype.is_complex or str(x.dtype) == "torch.bool":
            raise InputError(f"{name} must be integers, got dtype={x.dtype}: pass token ids as int64")
        if str(x.layout) != "torch.strided":
            raise InputError(f"{name} is a {x.layout} tensor: pass dense ids ({name}.to_dense())")
        if x.device.type == "meta":
            raise InputError(f"{name} is on the meta device and holds no values: pass ids on a real device")
        x = x.detach().cpu().numpy()
    elif isinstance(x, (list, tuple)):
        x = _list_ids(x, name)
    else:
        x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.integer)) or x.dtype == np.bool_:
        raise InputError(f"{name} must be integers, got dtype={x.dtype}: pass token ids as int64")
    if x.dtype == np.uint64 and x.size and int(x.max()) > np.iinfo(np.int64).max:   # would wrap negative
        raise _beyond_every_vocabulary(name, int(x.max()))
    return x.astype(np.int64, copy=False)


def _list_ids(x: list[Any] | tuple[Any, ...], name: str) -> np.ndarray:
    """Nested lists of ints as an array: empty rows are int64, and ids past int64 are named as such
    (numpy would make both float64)."""
    try:
        arr = np.asarray(x)
    except ValueError:      # rows of different lengths
        raise InputError(f"{name} is a ragged list (rows of different lengths): pad every sequence to one "
                         "length T (and mask the padding)") from None
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind in "fO":
        items = np.asarray(x, dtype=object).reshape(-1)
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in items):
            big = max(items, key=abs)
            raise _beyond_every_vocabulary(name, int(big))
    return arr


def _beyond_every_vocabulary(name: str, token_id: int) -> Exception:
    return TokenIdError(f"{name} holds id {token_id}, beyond every vocabulary: pass the token ids "
                        "of the tokenizer the table was built for")


def check_ids_2d(x: Any, name: str = "token_ids") -> None:
    """Raise InputError unless `x` is shaped [B, T]."""
    if len(x.shape) != 2:
        raise InputError(
            f"{name} must be shaped [B, T] (batch, positions), got shape {tuple(x.shape)}: "
            "add a batch dimension with ids[None] for one sequence"
        )
