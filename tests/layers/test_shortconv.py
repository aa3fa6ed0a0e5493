"""ShortConv refuses inputs its convolution cannot take, naming the argument and the fix."""

from __future__ import annotations

import pytest
import torch

from engram import InputError
from engram.layers.shortconv import ShortConv


@pytest.fixture
def conv():
    conv = ShortConv(hidden_size=8, hc_mult=2, kernel_size=4, dilation=3)
    torch.nn.init.normal_(conv.weight)
    return conv


def test_causal_output_in_the_input_dtype(conv):
    x = torch.randn(2, 5, 2, 8)
    y = conv(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    x2 = x.clone()
    x2[:, 4] += 1.0                                    # the last position cannot change earlier outputs
    assert torch.equal(conv(x2)[:, :4], y[:, :4])


def test_no_positions(conv):
    with pytest.raises(InputError, match=r"ShortConv input x has shape \(2, 0, 2, 8\): T=0 positions; pass at "
                                         r"least one position"):
        conv(torch.randn(2, 0, 2, 8))


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_dtype_other_than_the_weights(conv, x_dtype, w_dtype):
    conv.to(w_dtype)
    with pytest.raises(InputError, match=rf"ShortConv input x has dtype {x_dtype} but its weight is {w_dtype}: "
                                         rf"cast one to the other \(x.to\({w_dtype}\) or conv.to\({x_dtype}\)\)"):
        conv(torch.randn(1, 3, 2, 8, dtype=x_dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the convolution
        assert conv(torch.randn(1, 3, 2, 8, dtype=x_dtype)).shape == (1, 3, 2, 8)


def test_shape_other_than_the_modules(conv):
    with pytest.raises(InputError, match=r"ShortConv input x has shape \(1, 3, 1, 8\), expected \[B, T, 2, 8\]"):
        conv(torch.randn(1, 3, 1, 8))
