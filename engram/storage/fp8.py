"""FP8 bit kernels of the "float8_e4m3" codec: E4M3 values with E8M0 block scales, as bits.

`engram.storage.quant` states the rules (scale choice, rounding, NaN and overflow handling) and checks
arguments; these functions do the bit work on tensors already checked.

Decoding runs on every lookup of a "float8_e4m3" table (DeepSeek-V4.1's rows): per block of
`block` values with scale byte e, a value decodes to `fp8(v) * 2**(e - 127)`, rounded once to the
output dtype. `decode_fp8` has two implementations that give the same bits:

- compiled (numba, the "fast" extra; used on CPU for blocks of 32, as released, whenever every
  scale of the call lies in [10, 246], where every result is a normal number): one pass per value.
  The 4-bit significand of the E4M3 byte becomes an exact float32 integer (`(m | 8) << (e4 - 1)`,
  or `m` for subnormals), one multiply by `2**(e - 136)` places it, and the float32 bits are the
  result (for bfloat16 their top half, exact: at most 4 significant bits); NaN codes (0x7F/0xFF)
  are written as NaN. Where the torch passes below write the output several times (and multiply
  subnormal operands, which x86 runs through a slow microcode path), this reads each byte once
  and writes each result once.
- torch passes (CPU chunks that stay in cache, or any device): the E4M3 bytes sign-extended into
  the output's integer view; one shift and mask make them `fp8(v) * 2**-120` exactly (the sign to
  the top bit, the 7 exponent+mantissa bits to the bottom of the exponent field, subnormals
  included); the factors `2**(e - 7)` built as bit patterns `(e + 120) << mantissa_bits` (no
  float8 conversion, which torch runs element by element on CPU); one broadcast multiply. NaN
  codes are found by two byte-wide reductions over the codes; scales of 135 and above (E8M0's
  NaN, 255, too) take an exact two-step path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engram.fast import NUMBA

__all__ = ["E4M3_MAX", "pow2_float32", "round_e4m3", "encode_fp8", "decode_fp8", "CHUNK_VALUES", "COMPILED",
           "COMPILED_BLOCK"]

E4M3_MAX = 448.0
CHUNK_VALUES = 1 << 18     # values per pass on CPU: a chunk and its codes stay in L2
_SHIFT_EXP = 120           # the bits of step 2 hold fp8 * 2**-120
# output dtype -> (its integer view, shift of step 2, sign + 7-bit mask, mantissa bits)
_LAYOUT = {torch.bfloat16: (torch.int16, 4, 0x87F0 - (1 << 16), 7),
           torch.float32: (torch.int32, 20, 0x87F00000 - (1 << 32), 23)}
_FAST_MAX_SCALE = 255 - _SHIFT_EXP     # e + 120 must stay a finite exponent (<= 254)



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


def decode_fp8(values: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, block: int) -> torch.Tensor:
    """out[r, j] = fp8(values[r, j]) * 2**(scales[r, j // block] - 127), rounded once to out's dtype.

    Args:
        values: [R, D] E4M3 bytes (uint8 or torch.float8_e4m3fn), on out's device.
        scales: [R, D // block] E8M0 bytes (uint8 or torch.float8_e8m0fnu).
        out: contiguous [R, D] bfloat16 or float32.
        block: values per scale.

    Returns:
        `out`. Arguments are not checked here: `engram.storage.quant.decode` is the checked entry point.
    """
    R, D = values.shape
    codes, e = values.view(torch.uint8), scales.view(torch.uint8)
    if R == 0:
        return out
    lo, hi = (int(x) for x in torch.aminmax(e))
    if (COMPILED and block == COMPILED_BLOCK and values.device.type == "cpu" and lo >= _COMPILED_MIN
            and hi <= _COMPILED_MAX):
        _compiled(codes.contiguous(), e.contiguous(), out)
        return out
    fast = hi < _FAST_MAX_SCALE
    step = R if values.device.type != "cpu" else max(1, CHUNK_VALUES // D)
    for start in range(0, R, step):
        _decode_chunk(codes[start:start + step], e[start:start + step], out[start:start + step], block, fast)
    if bool(codes.max() == 0xFF) or bool(codes.view(torch.int8).max() == 0x7F):     # NaN codes present
        out[codes.bitwise_and(0x7F) == 0x7F] = float("nan")
    return out


def _decode_chunk(codes: torch.Tensor, e: torch.Tensor, out: torch.Tensor, block: int, fast: bool) -> None:
    int_dtype, shift, mask, mantissa = _LAYOUT[out.dtype]
    bits = out.view(int_dtype)
    bits.copy_(codes.view(torch.int8))                               # sign-extend each byte
    bits.bitwise_left_shift_(shift).bitwise_and_(mask)               # out = fp8 * 2**-120, exactly
    if fast:
        factor = (e.to(int_dtype) + _SHIFT_EXP).bitwise_left_shift_(mantissa).view(out.dtype)   # 2**(e - 7)
    else:                                                            # 2**(e - 7) would overflow: two steps
        out.mul_(2.0**_SHIFT_EXP)
        factor = e.view(torch.float8_e8m0fnu).to(out.dtype)          # 2**(e - 127), NaN for 255
    out.view(out.shape[0], -1, block).mul_(factor.unsqueeze(2))


# -- the compiled loop ------------------------------------------------------------------------------
_COMPILED_MIN, _COMPILED_MAX = 10, 246     # scales whose every result is a normal float32 / bfloat16
COMPILED_BLOCK = 32    # the block the compiled loop serves (DeepSeek-V4.1's): a constant, so its loops vectorize
# The 2**(e - 136) of each scale byte e: 2**(e - 127) with the 2**-9 of the integer significand folded in.
_FACTORS = np.array([2.0 ** (e - 136) for e in range(256)], np.float32)


_NUMBA = NUMBA
COMPILED = _NUMBA is not None      # whether the compiled loop is available (numba installed)


def _build_kernels() -> tuple[Any, Any] | None:
    """The compiled decodes of [R, D] codes and [R, D // block] scales into float32 bits (uint32)
    and into bfloat16 bits (uint16); None without numba. Two plain functions (no closures), so
    numba's on-disk cache keys each by its own code. The block loop is written out in both: a shared
    jitted helper measured slower (0.6-0.9 against 0.5 ns per value), inlined or not."""
    if _NUMBA is None:
        return None
    jit = _NUMBA.njit(nogil=True, cache=True, boundscheck=False)

    @jit
    def to_float32(codes: np.ndarray, scales: np.ndarray, factors: np.ndarray, out: np.ndarray) -> None:
        rows, D = codes.shape
        tmp = np.empty(D, np.float32)
        bits = tmp.view(np.uint32)
        for r in range(rows):
            for b in range(D // COMPILED_BLOCK):
                f = factors[scales[r, b]]
                for k in range(b * COMPILED_BLOCK, b * COMPILED_BLOCK + COMPILED_BLOCK):
                    c = np.uint32(codes[r, k])
                    e4 = (c >> 3) & 15
                    pos = np.uint32(e4 > 0)           # normal: (8 | m) << (e4 - 1); subnormal: m
                    tmp[k] = np.float32(np.int32(((c & 7) | (pos << 3)) << (e4 - pos))) * f
            for k in range(D):
                c = np.uint32(codes[r, k])
                magnitude = np.uint32(0x7FC00000) if (c & 0x7F) == 0x7F else bits[k]
                out[r, k] = magnitude | ((c & 0x80) << 24)

    @jit
    def to_bfloat16(codes: np.ndarray, scales: np.ndarray, factors: np.ndarray, out: np.ndarray) -> None:
        rows, D = codes.shape
        tmp = np.empty(D, np.float32)
        bits = tmp.view(np.uint32)
        for r in range(rows):
            for b in range(D // COMPILED_BLOCK):
                f = factors[scales[r, b]]
                for k in range(b * COMPILED_BLOCK, b * COMPILED_BLOCK + COMPILED_BLOCK):
                    c = np.uint32(codes[r, k])
                    e4 = (c >> 3) & 15
                    pos = np.uint32(e4 > 0)
                    tmp[k] = np.float32(np.int32(((c & 7) | (pos << 3)) << (e4 - pos))) * f
            for k in range(D):
                c = np.uint32(codes[r, k])
                magnitude = np.uint32(0x7FC0) if (c & 0x7F) == 0x7F else bits[k] >> 16   # exact: <= 4 bits
                out[r, k] = np.uint16(magnitude | ((c & 0x80) << 8))

    return to_float32, to_bfloat16


_KERNELS = _build_kernels()


def _compiled(codes: torch.Tensor, e: torch.Tensor, out: torch.Tensor) -> None:
    assert _KERNELS is not None
    to_float32, to_bfloat16 = _KERNELS
    if out.dtype == torch.float32:
        to_float32(codes.numpy(), e.numpy(), _FACTORS, out.view(torch.int32).numpy().view(np.uint32))
    else:
        to_bfloat16(codes.numpy(), e.numpy(), _FACTORS, out.view(torch.int16).numpy().view(np.uint16))
