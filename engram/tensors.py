"""Small conversions between numpy arrays and torch tensors, without importing torch eagerly."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .errors import InputError, TokenIdError

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
        x = x.detach().cpu().numpy()
    else:
        x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.integer)) or x.dtype == np.bool_:
        raise InputError(f"{name} must be integers, got dtype={x.dtype}: pass token ids as int64")
    if x.dtype == np.uint64 and x.size and int(x.max()) > np.iinfo(np.int64).max:   # would wrap negative
        raise TokenIdError(f"{name} holds id {int(x.max())}, beyond every vocabulary: pass the token ids "
                           "of the tokenizer the table was built for")
    return x.astype(np.int64, copy=False)


def check_ids_2d(x: Any, name: str = "token_ids") -> None:
    """Raise InputError unless `x` is shaped [B, T]."""
    if len(x.shape) != 2:
        raise InputError(
            f"{name} must be shaped [B, T] (batch, positions), got shape {tuple(x.shape)}: "
            "add a batch dimension with ids[None] for one sequence"
        )
