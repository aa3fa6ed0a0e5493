"""ShortConv: the causal depthwise convolution that follows the Engram gate."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engram.errors import InputError
from engram.layers.module_cache import conv_step
from engram.layers.norm import BranchRMSNorm

__all__ = ["ShortConv"]


class ShortConv(nn.Module):
    """Per-branch RMSNorm, then a causal depthwise Conv1d over all G*C channels, then SiLU.

    Position t sees positions t, t-d, ..., t-(k-1)*d (d = dilation; the reference uses d = N,
    the largest n-gram order). The weight starts at zero, so a fresh ShortConv outputs zeros
    and the Engram branch starts as the gated value alone.

    Args:
        hidden_size: C, the model width.
        hc_mult: G, the hyper-connection branches.
        kernel_size: k, taps per channel.
        dilation: d, the distance between taps.
        eps: epsilon of the per-branch RMSNorm (1e-5 as in the reference).

    Example:
        >>> conv = ShortConv(hidden_size=8, hc_mult=2, kernel_size=4, dilation=3)
        >>> conv(torch.randn(1, 5, 2, 8)).abs().max().item()   # zero weight: zero output
        0.0
    """

    def __init__(self, hidden_size: int, hc_mult: int = 1, kernel_size: int = 4, dilation: int = 1,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.norm = BranchRMSNorm(hc_mult, hidden_size, eps=eps)
        # Conv1d's weight layout for a depthwise convolution: [channels, 1, k].
        self.weight = nn.Parameter(torch.zeros(hc_mult * hidden_size, 1, kernel_size))

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, G, C = self._check_input(x)
        x = self.norm(x).reshape(B, T, G * C).transpose(1, 2)                # [B, G*C, T]
        x = F.pad(x, ((self.kernel_size - 1) * self.dilation, 0))            # [B, G*C, pad+T], causal
        y = F.conv1d(x, self.weight, dilation=self.dilation, groups=G * C)   # [B, G*C, T]
        return F.silu(y).transpose(1, 2).reshape(B, T, G, C)                 # [B, T, G, C]

    def new_past(self, batch_size: int, extra: int = 0) -> torch.Tensor:
        """Zero past inputs for `step`: [B, (k-1)*d + extra, G*C] in the weight's dtype and device."""
        width = (self.kernel_size - 1) * self.dilation + extra
        return self.weight.new_zeros(batch_size, width, self.weight.shape[0])

    def step(self, x: torch.Tensor, past: torch.Tensor | None, mask: np.ndarray | None = None,
             starts: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` of new positions that continue sequences whose earlier inputs are `past`.

        Args:
            x: [B, T, G, C] new inputs. past: [B, W, G*C] the last W >= (k-1)*d normalized inputs
                of each sequence, newest last (zeros before its start), or None (new sequences).
                mask: [B, T] bool or None; False marks padding, which later positions do not see.
                starts: [B, T] bool or None; True where a document starts: no tap reaches before it.

        Returns:
            ([B, T, G, C] output, [B, W, G*C] the past after these positions).
        """
        B, T, G, C = self._check_input(x)
        past = self.new_past(B) if past is None else past
        x = self.norm(x).reshape(B, T, G * C)                                  # [B, T, G*C]
        y, past = conv_step(x, past.to(x), self.weight, self.dilation, mask, starts)   # [B, T, G*C], [B, W, G*C]
        return F.silu(y).reshape(B, T, G, C), past                             # [B, T, G, C]

    def _check_input(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        """Raise InputError unless `x` is [B, T>=1, G, C] in the weight's dtype (autocast aside)."""
        G, C = self.norm.weight.shape
        if x.ndim != 4 or tuple(x.shape[2:]) != (G, C):
            raise InputError(f"ShortConv input x has shape {tuple(x.shape)}, expected [B, T, {G}, {C}] "
                             f"(hc_mult={G}, hidden_size={C}): pass the gated values [B, T, G, C]")
        if x.shape[1] == 0:
            raise InputError(f"ShortConv input x has shape {tuple(x.shape)}: T=0 positions; pass at least one "
                             "position (skip the layer for empty sequences)")
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise InputError(f"ShortConv input x has dtype {x.dtype} but its weight is {self.weight.dtype}: "
                             f"cast one to the other (x.to({self.weight.dtype}) or conv.to({x.dtype})), "
                             "or run under torch.autocast")
        return x.shape[0], x.shape[1], G, C

    def extra_repr(self) -> str:
        return f"channels={self.weight.shape[0]}, kernel_size={self.kernel_size}, dilation={self.dilation}"
