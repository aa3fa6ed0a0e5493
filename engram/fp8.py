"""FP8 bit kernels of the "float8_e4m3" codec: E4M3 values with E8M0 block scales, as bits.

`engram.quant` states the rules (scale choice, rounding, NaN and overflow handling) and checks
arguments; these functions do the bit work on tensors already checked.
"""

from __future__ import annotations

import torch

__all__ = ["E4M3_MAX", "pow2_float32", "round_e4m3", "encode_fp8", "decode_fp8"]

E4M3_MAX = 448.0

# E4M3 byte -> float bits with the same value times 2**-120: the sign goes to the top bit, the 7
# exponent+mantissa bits land at the bottom of the 8-bit exponent field (bias 127 instead of 7),
# which keeps subnormals exact. (shift, mask keeping the sign and those 7 bits) per output dtype.
_E4M3_BITS = {torch.float32: (torch.int32, 20, 0x87F00000 - (1 << 32)),
              torch.bfloat16: (torch.int16, 4, 0x87F0 - (1 << 16))}
_E4M3_SHIFT = 120  # decoded bits are fp8 * 2**-120
_E8M0_SHIFTED_MAX = 255 - _E4M3_SHIFT  # e + 120 must still fit an E8M0 byte below 255 (NaN)


def pow2_float32(exponent: torch.Tensor) -> torch.Tensor:
    """2.0**exponent as float32 for int exponents in [-126, 127], built from the bits (exact)."""
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float32 -> E4M3 bytes (uint8): round to nearest even, saturate to +-448."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def encode_fp8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 rows [R, D] -> (E4M3 bytes uint8 [R, D], E8M0 scale bytes uint8 [R, D // block])."""
    R, D = x.shape
    xb = x.view(R, D // block, block)                        # [R, nb, block]
    amax = xb.abs().amax(dim=2)                              # [R, nb]
    # amax = m * 2**k with m in [0.5, 1) (exact); 448 = 0.875 * 2**9, so the smallest s with
    # amax <= 448 * 2**s is k - 9, or k - 8 when m > 0.875.
    m, k = torch.frexp(amax)
    s = k - 9 + (m > 0.875).to(torch.int32)
    s = torch.where(amax > 0, s, -127).clamp(min=-127)      # amax <= float32 max keeps s <= 120
    values = round_e4m3(xb * pow2_float32(-s).unsqueeze(2))  # [R, nb, block]
    # Only with s = 120 can rounding up overflow float32 on decode (256 * 2**120 = 2**128): step
    # those values down to 240, the largest finite neighbour.
    top = (values.bitwise_and(0x7F) == 0x78) & (s == 120).unsqueeze(2)
    values = torch.where(top, values - 1, values)
    return values.view(R, D), (s + 127).to(torch.uint8)


def decode_fp8(values: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, block: int) -> None:
    """out [R, D] (float32 or bfloat16) = E4M3 bytes [R, D] times their E8M0 block scales [R, D // block]."""
    R, D = values.shape
    nb = D // block
    e = scales.view(torch.uint8)                              # [R, nb] biased exponents
    int_dtype, shift, mask = _E4M3_BITS[out.dtype]
    bits = out.view(int_dtype)
    bits.copy_(values.view(torch.int8))                       # sign-extend each byte
    bits.bitwise_left_shift_(shift).bitwise_and_(mask)        # out = fp8 * 2**-120, exactly
    lo, hi = torch.aminmax(out)                               # NaN bytes decode to +-480 * 2**-120 here
    has_nan = bool(hi > E4M3_MAX * 2.0**-_E4M3_SHIFT) or bool(lo < -E4M3_MAX * 2.0**-_E4M3_SHIFT)
    out3 = out.view(R, nb, block)
    if int(e.max()) < _E8M0_SHIFTED_MAX:
        factor = (e + _E4M3_SHIFT).view(torch.float8_e8m0fnu).to(out.dtype)   # 2**(e - 7)
    else:                                                     # 2**(e - 7) would overflow: two steps
        out.mul_(2.0**_E4M3_SHIFT)
        factor = e.view(torch.float8_e8m0fnu).to(out.dtype)  # 2**(e - 127), NaN for 255
    out3.mul_(factor.unsqueeze(2))
    if has_nan:
        out[values.view(torch.uint8).bitwise_and(0x7F) == 0x7F] = float("nan")
