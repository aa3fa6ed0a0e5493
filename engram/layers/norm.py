"""BranchRMSNorm: RMSNorm over the model width, with its own weight per hyper-connection branch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BranchRMSNorm"]


class BranchRMSNorm(nn.Module):
    """RMSNorm of `x [..., G, C]` over C, scaled by a weight of shape [G, C] (one row per branch).

    Equivalent to G separate `nn.RMSNorm(C, eps)` modules applied to `x[..., g, :]`, in one call.

    Args:
        hc_mult: G, the number of branches.
        hidden_size: C, the normalized width.
        eps: added to the mean square; None uses `torch.finfo(x.dtype).eps` (nn.RMSNorm's default).

    Example:
        >>> norm = BranchRMSNorm(2, 8)
        >>> norm(torch.randn(3, 5, 2, 8)).shape
        torch.Size([3, 5, 2, 8])
    """

    def __init__(self, hc_mult: int, hidden_size: int, eps: float | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hc_mult, hidden_size))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight

    def extra_repr(self) -> str:
        return f"hc_mult={self.weight.shape[0]}, hidden_size={self.weight.shape[1]}, eps={self.eps}"
