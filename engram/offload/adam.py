"""The lazy SparseAdam arithmetic on table rows: one implementation for every trainer of rows.

`engram.distributed.ShardedRows` (rows in memory) and `engram.OffloadedRows` (rows in a cache over
disk) both update only the rows a step touched, exactly as `torch.optim.SparseAdam` does: the
moments of untouched rows stay as they are, and the step count (so the bias correction) is the
caller's, advanced once per step of each layer that had a backward. No weight decay.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from engram.args import check_real, is_real
from engram.errors import InputError

__all__ = ["AdamSettings", "sum_by_row", "sparse_adam_"]


@dataclasses.dataclass(frozen=True)
class AdamSettings:
    """Adam's settings for table rows: learning rate, betas and eps, as `torch.optim.SparseAdam`'s."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    @classmethod
    def checked(cls, lr: Any, betas: Any = (0.9, 0.999), eps: Any = 1e-8) -> AdamSettings:
        """The settings, or InputError naming the argument that is invalid."""
        check_real("lr", lr, 0.0)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(is_real(b) and 0.0 <= b < 1.0 for b in betas)):
            raise InputError(f"betas={betas!r} is invalid: expected two floats in [0, 1)")
        if not is_real(eps) or not eps > 0:
            raise InputError(f"eps={eps!r} is invalid: expected a float > 0")
        return cls(float(lr), (float(betas[0]), float(betas[1])), float(eps))


def sum_by_row(index: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One summed gradient per distinct row: index [n] ints, grads [n, D] -> rows [u] (sorted), [u, D]."""
    rows, inverse = torch.unique(index, sorted=True, return_inverse=True)
    summed = torch.zeros((rows.numel(), grads.shape[1]), dtype=torch.float32)
    summed.index_add_(0, inverse, grads.to(torch.float32))
    return rows, summed


@torch.no_grad()
def sparse_adam_(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, rows: torch.Tensor,
                 grad: torch.Tensor, step: int, settings: AdamSettings) -> None:
    """Adam on `rows` [u] (distinct) of param, exp_avg and exp_avg_sq [n, D], in place, with their
    summed gradient `grad` [u, D] at step `step` (>= 1), as torch.optim.SparseAdam computes it."""
    beta1, beta2 = settings.betas
    # index_select / index_copy_ move the same values as indexing does, several times faster
    old_m, old_v = exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows)
    m_update = grad.sub(old_m).mul_(1 - beta1)
    exp_avg.index_copy_(0, rows, old_m + m_update)
    v_update = grad.pow(2).sub_(old_v).mul_(1 - beta2)
    exp_avg_sq.index_copy_(0, rows, old_v + v_update)
    numer = m_update.add_(old_m)
    denom = v_update.add_(old_v).sqrt_().add_(settings.eps)
    step_size = settings.lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    param.index_copy_(0, rows, param.index_select(0, rows) + (-step_size * numer.div_(denom)))
