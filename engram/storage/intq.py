"""Sub-8-bit affine rows ("int4", "int2"): pack, encode and decode groups of G values.

`engram.storage.quant` is the checked entry point; these functions work on tensors already checked.

The layout, for rows of D values stored with b bits (4 or 2) in groups of G values (G =
`TableSpec.scale_block`, a divisor of D with G*b a multiple of 8):

- codes: D*b/8 bytes per row. Value j's code q_j (an unsigned int in [0, 2**b - 1]) sits in byte
  (j*b) // 8 at bit offset (j*b) % 8: packed little-endian, the row's first value in the low bits
  of its first byte (the order FBGEMM's fused n-bit row-wise tables use).
- pairs: 2*D/G IEEE float16 per row, (scale_g, minimum_g) for each group g in order:
  [scale_0, minimum_0, scale_1, minimum_1, ...].
- decoded value: x_j = float32(q_j) * float32(scale_g) + float32(minimum_g), in float32 (one
  multiply, then one add, each rounded; no fused multiply-add), then rounded to nearest even once
  for a bfloat16 output.

Encoding, per group of values [lo, hi] (round to nearest):
- minimum = the largest float16 <= lo (rounded down, so no value lies below the grid);
- scale = the smallest float16 >= (hi - minimum) / (2**b - 1) (rounded up, so the top code
  reaches hi); a group of equal values gets scale 0 when lo is a float16;
- q_j = round_half_even((x_j - minimum) / scale) clipped to [0, 2**b - 1] (0 where scale is 0).
Every value then decodes within scale/2 of itself, up to float32 rounding of the arithmetic
(the bound the property tests check). A group whose minimum or scale would not be a finite
float16 (a least value below -65504, or a span over 65504 * (2**b - 1)) is refused.

Decoding runs on every lookup; it has two implementations that give the same bits (the tests
check it):
- compiled (numba, the "fast" extra; CPU, groups of whole 32-bit words: G*b a multiple of 32,
  as with the default G=32): each row's codes are read as little-endian 32-bit words, each word
  giving 32/b values with a constant lane count so that the loop vectorizes: shift, mask,
  convert, multiply, add; a bfloat16 output is rounded from that float32 row, still in cache.
  Each code byte is read once and each result written once.
- torch passes (any device, other groups, or without numba): the codes are shifted into one
  uint8 per value, converted into the output (a float32 scratch for bfloat16), then one
  broadcast multiply and one add, per chunk of rows that stays in cache.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from engram.errors import InputError
from engram.fast import NUMBA

__all__ = ["AFFINE_BITS", "HALF_MAX", "CHUNK_VALUES", "COMPILED", "affine_params", "encode_affine",
           "decode_affine", "pack_codes", "unpack_codes"]

AFFINE_BITS = (4, 2)         # the bit widths offered
HALF_MAX = 65504.0           # float16's largest finite value
CHUNK_VALUES = 1 << 18       # values per torch pass on CPU: a chunk and its codes stay in L2
_SHIFTS = {bits: torch.arange(0, 8, bits, dtype=torch.uint8) for bits in AFFINE_BITS}


def _half_toward(v: torch.Tensor, down: bool) -> torch.Tensor:
    """float32 `v` -> the nearest float16 on one side of it (<= v if `down`, else >= v); +-inf
    where no finite float16 lies on that side."""
    h = v.to(torch.float16)                                   # round to nearest even (inf past the range)
    wrong = h.float() > v if down else h.float() < v
    step = torch.full_like(h, float("-inf") if down else float("inf"))
    return torch.where(wrong, torch.nextafter(h, step), h)


def affine_params(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of finite float32 rows [R, D]: (scale, minimum) as float16 [R, D // group] each,
    by the rule of the module docstring; +-inf (or NaN) where a group lies outside float16's range."""
    R, D = x.shape
    lo, hi = torch.aminmax(x.view(R, D // group, group), dim=2)      # [R, ng] each
    minimum = _half_toward(lo, down=True)
    span = (hi - minimum.float()) / ((1 << bits) - 1)               # inf (or NaN) where minimum is -inf
    return _half_toward(span, down=False), minimum


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes uint8 [R, D] (each < 2**bits) -> packed bytes uint8 [R, D*bits//8], little-endian."""
    R, D = q.shape
    per = 8 // bits
    lanes = q.view(R, D // per, per).to(torch.int32) << _SHIFTS[bits].to(device=q.device, dtype=torch.int32)
    return lanes.sum(dim=2).to(torch.uint8)                   # disjoint bits: the sum is the OR


def unpack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed bytes uint8 [R, W] -> codes uint8 [R, W * 8 // bits]."""
    R, W = codes.shape
    shifts = _SHIFTS[bits].to(codes.device)
    return codes.unsqueeze(2).bitwise_right_shift(shifts).bitwise_and_((1 << bits) - 1).view(R, W * (8 // bits))


def encode_affine(x: torch.Tensor, dtype: str, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite float32 rows [R, D] -> (codes uint8 [R, D*bits//8], pairs float16 [R, 2 * D // group]):
    the rule of the module docstring (round to nearest even, clipped).

    Raises:
        InputError: a group's minimum or scale is not a finite float16 (its least value below
            -65504, or its span over 65504 * (2**bits - 1)), naming the row, the values and `dtype`.
    """
    R, D = x.shape
    scale, minimum = affine_params(x, bits, group)
    held = torch.isfinite(scale) & torch.isfinite(minimum)                     # [R, ng]
    if not bool(held.all()):
        r, g = (int(i) for i in torch.nonzero(~held)[0])
        part = x[r, g * group:(g + 1) * group]
        raise InputError(
            f"rows[{r}] values {g * group}..{(g + 1) * group - 1} span [{float(part.min())!r}, "
            f"{float(part.max())!r}]: {dtype} rows keep a float16 minimum and scale per group, so a group's least "
            f"value must be >= -{HALF_MAX:g} and its span <= {HALF_MAX:g} * {(1 << bits) - 1}; scale the rows "
            "down or store them as int8, float8_e4m3 or bfloat16")
    s, m = scale.float().unsqueeze(2), minimum.float().unsqueeze(2)            # [R, ng, 1]
    q = (x.view(R, D // group, group) - m).div_(torch.where(s > 0, s, 1.0))     # [R, ng, G]
    q = q.round_().clamp_(0, (1 << bits) - 1).to(torch.uint8).view(R, D)
    return pack_codes(q, bits), torch.stack((scale, minimum), dim=2).view(R, 2 * (D // group))


def decode_affine(codes: torch.Tensor, pairs: torch.Tensor, out: torch.Tensor, bits: int,
                  group: int) -> torch.Tensor:
    """out[r, j] = float32(q[r, j]) * scale[r, j // group] + minimum[r, j // group], rounded once to out's dtype.

    Args:
        codes: [R, D*bits//8] packed codes (uint8), on out's device.
        pairs: [R, 2*D//group] float16 (scale, minimum) pairs.
        out: contiguous [R, D] float32 or bfloat16.
        bits: 4 or 2.
        group: values per (scale, minimum) pair.

    Returns:
        `out`. Arguments are not checked here: `engram.storage.quant.decode` is the checked entry point.
    """
    R = codes.shape[0]
    if R == 0:
        return out
    if COMPILED and codes.device.type == "cpu" and (group * bits) % 32 == 0 and sys.byteorder == "little":
        _compiled(codes.contiguous(), pairs.contiguous(), out, bits, group)
        return out
    D = out.shape[1]
    step = R if codes.device.type != "cpu" else max(1, CHUNK_VALUES // D)
    scratch = None if out.dtype == torch.float32 else torch.empty((min(R, step), D), device=out.device)
    for start in range(0, R, step):
        o = out[start:start + step]
        target = o if scratch is None else scratch[: o.shape[0]]
        _decode_chunk(codes[start:start + step], pairs[start:start + step], target, bits, group)
        if scratch is not None:
            o.copy_(target)                                   # the float32 result, rounded once
    return out


def _decode_chunk(codes: torch.Tensor, pairs: torch.Tensor, out: torch.Tensor, bits: int, group: int) -> None:
    R, D = out.shape
    out.copy_(unpack_codes(codes, bits))                      # float32(q)
    sm = pairs.view(R, D // group, 2).float()                 # [R, ng, 2]: scale, minimum
    grouped = out.view(R, D // group, group)
    grouped.mul_(sm[:, :, 0:1]).add_(sm[:, :, 1:2])


# -- the compiled loop ------------------------------------------------------------------------------
# float16 bits -> float32 value, for every 16-bit pattern (exact): the compiled loop reads scales with it.
_HALVES = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


_NUMBA = NUMBA
COMPILED = _NUMBA is not None      # whether the compiled loop is available (numba installed)


def _build_kernel() -> Any:
    """The compiled decode of [R, W/4] code words (uint32) and [R, 2*ng] float16 pair bits into float32
    bits (uint32 out) or bfloat16 bits (uint16 out); numba compiles one version per output type. None
    without numba."""
    if _NUMBA is None:
        return None

    @_NUMBA.njit(nogil=True, cache=True, boundscheck=False)
    def affine_rows(words: np.ndarray, pairs: np.ndarray, halves: np.ndarray, bits: int, group: int,
                    to_bfloat16: bool, out: np.ndarray) -> None:
        rows, n_words = words.shape
        per_word = 32 // bits
        words_per_group = group // per_word
        scale = np.empty(n_words, np.float32)       # each word's scale and minimum
        minimum = np.empty(n_words, np.float32)
        row = np.empty(n_words * per_word, np.float32)
        row_bits = row.view(np.uint32)
        for r in range(rows):
            for g in range(pairs.shape[1] // 2):
                s, m = halves[pairs[r, 2 * g]], halves[pairs[r, 2 * g + 1]]
                for k in range(g * words_per_group, (g + 1) * words_per_group):
                    scale[k] = s
                    minimum[k] = m
            if bits == 4:        # constant lane counts, so the lane loops vectorize
                for k in range(n_words):
                    w, s, m = words[r, k], scale[k], minimum[k]
                    for i in range(8):
                        row[8 * k + i] = np.float32((w >> np.uint32(4 * i)) & np.uint32(15)) * s + m
            else:
                for k in range(n_words):
                    w, s, m = words[r, k], scale[k], minimum[k]
                    for i in range(16):
                        row[16 * k + i] = np.float32((w >> np.uint32(2 * i)) & np.uint32(3)) * s + m
            if to_bfloat16:      # round to nearest even into the top half
                for j in range(row.size):
                    b = row_bits[j]
                    out[r, j] = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            else:
                for j in range(row.size):
                    out[r, j] = row_bits[j]

    return affine_rows


_KERNEL = _build_kernel()


def _compiled(codes: torch.Tensor, pairs: torch.Tensor, out: torch.Tensor, bits: int, group: int) -> None:
    assert _KERNEL is not None
    words = codes.numpy().view(np.uint32)                    # little-endian: value j at bits (j * bits) % 32
    half_bits = pairs.view(torch.int16).numpy().view(np.uint16)
    if out.dtype == torch.float32:
        _KERNEL(words, half_bits, _HALVES, bits, group, False, out.view(torch.int32).numpy().view(np.uint32))
    else:
        _KERNEL(words, half_bits, _HALVES, bits, group, True, out.view(torch.int16).numpy().view(np.uint16))
