"""Checks of a table read's arguments (`dtype=`, `out=`), made once where the public call enters."""

from __future__ import annotations

from typing import Any

import torch

from .errors import InputError

__all__ = ["check_dtype", "check_out"]


def check_dtype(dtype: Any) -> None:
    """Refuse a lookup's `dtype=` that is neither None nor a floating-point torch.dtype."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputError(f"dtype={dtype!r} is invalid: expected a floating-point torch.dtype or None")


def check_out(out: Any, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    """Refuse a lookup's `out=` unless it is a contiguous CPU tensor of `shape` and `dtype`."""
    if not isinstance(out, torch.Tensor):
        raise InputError(f"out must be a torch.Tensor, got {type(out).__name__}: pass torch.empty({shape})")
    if tuple(out.shape) != shape or out.dtype != dtype or out.device.type != "cpu" or not out.is_contiguous():
        raise InputError(
            f"out has shape {tuple(out.shape)}, dtype {out.dtype}, device {out.device} (contiguous="
            f"{out.is_contiguous()}), expected a contiguous CPU tensor of shape {shape} and dtype {dtype}: "
            f"pass torch.empty({shape}, dtype={dtype})")
