"""engram.storage.fp8: both decodes of E4M3 values with E8M0 block scales give the exact products, bit for bit."""

from __future__ import annotations

import pytest
import torch

from engram.storage import fp8
from engram.storage.quant import decode

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def every_code_and_scale(scales: range, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of all 256 E4M3 codes, one row per scale byte in `scales` (the same scale for every block)."""
    e = torch.tensor(list(scales), dtype=torch.uint8)
    values = torch.arange(256, dtype=torch.uint8).repeat(e.numel(), 1)                 # [len(scales), 256]
    return values, e.unsqueeze(1).expand(-1, 256 // block).contiguous()


def exact(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, block: int = 32) -> torch.Tensor:
    """fp8(v) * 2**(e - 127) in float64 (exact), rounded once to `dtype`; NaN codes and scale 255 give NaN."""
    factor = torch.exp2(scales.double() - 127).repeat_interleave(block, 1)
    out = (values.view(torch.float8_e4m3fn).double() * factor).to(dtype)
    out[(scales == 255).repeat_interleave(block, 1)] = float("nan")
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a.view(BITS[a.dtype]) == b.view(BITS[b.dtype])) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scales", [range(10, 247), range(0, 135), range(0, 256)], ids=["compiled", "one-step", "all"])
def test_every_code_at_every_scale_decodes_exactly(dtype, scales):
    values, e = every_code_and_scale(scales)
    out = torch.empty(values.shape, dtype=dtype)
    fp8.decode_fp8(values, e, out, 32)
    assert same_bits(out, exact(values, e, dtype))
    finite = e[:, 0] != 255                                                      # scale 255 is NaN
    assert not out[finite, 0].signbit().any() and out[finite, 0x80].signbit().all()   # +0 and -0 kept apart


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_loop_and_the_torch_passes_agree(dtype, monkeypatch):
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 256, (300, 256), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 140, (300, 8), dtype=torch.uint8, generator=g)
    compiled = decode(values, scales, "float8_e4m3", out=torch.empty(300, 256, dtype=dtype))
    monkeypatch.setattr(fp8, "COMPILED", False)
    passes = decode(values, scales, "float8_e4m3", out=torch.empty(300, 256, dtype=dtype))
    assert same_bits(compiled, passes) and same_bits(compiled, exact(values, scales, dtype))


@pytest.mark.parametrize("block", [8, 64])
def test_other_blocks_decode_exactly(block):
    values, e = every_code_and_scale(range(20, 40), block)
    out = torch.empty(values.shape, dtype=torch.bfloat16)
    fp8.decode_fp8(values, e, out, block)
    assert same_bits(out, exact(values, e, torch.bfloat16, block))


def test_compiled_loop_is_installed_by_the_dev_setup():
    assert fp8.COMPILED, "numba (the 'fast' extra) is part of the dev install: make setup"


@pytest.mark.parametrize("compiled", [False, True], ids=["torch-passes", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [0, 9, 10, 120, 133, 134, 135, 136, 245, 246, 247, 254, 255])
def test_every_scale_alone_decodes_exactly_on_either_path(dtype, scale, compiled, monkeypatch):
    """One scale for the whole call, so the lowest and highest scale are that one: each path's limits
    (the compiled loop's [10, 246], the one-step torch pass below 135) are met exactly at their edges."""
    monkeypatch.setattr(fp8, "COMPILED", compiled and fp8.COMPILED)
    values, e = every_code_and_scale(range(scale, scale + 1))
    values = values.repeat(3, 1)                                            # [3, 256]
    e = e.repeat(3, 1)
    out = torch.empty(values.shape, dtype=dtype)
    fp8.decode_fp8(values, e, out, 32)
    assert same_bits(out, exact(values, e, dtype))


@pytest.mark.parametrize("compiled", [False, True], ids=["torch-passes", "compiled"])
@pytest.mark.parametrize("half", ["positive", "negative"])
def test_nan_codes_of_either_sign_decode_to_nan_alone(half, compiled, monkeypatch):
    """0x7F without any 0xFF in the call (and 0xFF without 0x7F): each NaN code is found on its own."""
    monkeypatch.setattr(fp8, "COMPILED", compiled and fp8.COMPILED)
    codes = torch.arange(128, dtype=torch.uint8) + (0 if half == "positive" else 128)      # 0x00..0x7F or 0x80..0xFF
    values = codes.repeat(4, 2)                                                               # [4, 256]
    e = torch.full((4, 8), 127, dtype=torch.uint8)
    for dtype in (torch.float32, torch.bfloat16):
        out = fp8.decode_fp8(values, e, torch.empty(values.shape, dtype=dtype), 32)
        nan = out.isnan()
        assert nan.sum() == 8 and bool(nan[:, [127, 255]].all())                            # the 0x7F / 0xFF slots
        assert same_bits(out, exact(values, e, dtype))
