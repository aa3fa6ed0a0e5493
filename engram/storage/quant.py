"""Row codecs: how each row dtype is stored (values plus per-row or per-block scales) and decoded.

Every dtype of `TableSpec.dtype` has a codec. Float dtypes store values only ("bfloat16" as its
uint16 bits, numpy having no bfloat16). The quantized ones store scales beside the values:

- "int8": one float32 scale per row, `scale = max|x| / 127`; values `round_half_even(x / scale)`
  clipped to [-127, 127]. A zero row has scale 0 and decodes to exact zeros. Decoded value:
  `float32(v) * scale`, rounded to the output dtype.
- "float8_e4m3" (the DeepSeek-V4.1 layout): values are FP8 E4M3 in the OCP "fn" variant (max 448,
  no infinities, NaN = 0x7F/0xFF) stored as raw uint8 bytes; one E8M0 scale per `block` values
  (default 32), stored as a uint8 biased exponent `e` meaning `2**(e - 127)` (255 = NaN, as in
  the OCP MX spec). Decoded value: `fp8(v) * 2**(e - 127)`, rounded once to the output dtype.
- "int4" / "int2" (affine, per group of `block` values): unsigned codes of 4 / 2 bits packed
  little-endian (D * bits / 8 bytes a row), and per group a (scale, minimum) pair of float16
  (2 * D / block values a row). The minimum is the group's least value rounded down to float16,
  the scale its span / (2**bits - 1) rounded up; codes round to nearest. Decoded value:
  `float32(q) * scale + minimum` in float32, rounded once to the output dtype. Groups whose
  minimum or scale float16 cannot hold are refused. The layout and its rules: `engram.storage.intq`.

Scale rule for "float8_e4m3": the smallest power of two `s` with `max|x| / s <= 448`, that is
`s = 2**ceil(log2(max|x| / 448))`, clamped to E8M0's smallest scale 2**-127 (a zero block gets
e = 0). The OCP MX spec (v1.0, section 6.3) instead takes `2**(floor(log2(max|x|)) - 8)` (8 = the
largest E4M3 exponent) and clamps whatever then exceeds 448. The two agree unless the block
maximum's significand lies in (1.75, 2), where the OCP rule saturates the largest values of the
block (relative error up to 12.5%) and this rule takes the next larger scale, so that no value is
ever clipped and every value in E4M3's normal range keeps a relative error <= 2**-4; it costs one
binade at the small end of the block. Encoding here picks this rule for that error bound.
Values are then rounded to nearest-even E4M3 and saturated to +-448 (with this rule the
saturation never triggers for finite input; it is there for the rounding helper itself). Encoded
rows always decode to finite float32: the rare value that would round up past float32's max
(block max above 248 * 2**120) keeps the largest finite neighbour instead; likewise int8 scales.

Decoding runs on every lookup, so it is a few whole-tensor torch passes without Python loops
over rows: the E4M3 bytes are turned into float32/bfloat16 bit patterns with integer shifts (an
exact rescaling by 2**-120, subnormals included), then one multiply applies the block scales,
built as bit patterns too (`engram.storage.fp8`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from engram.addressing.spec import DEFAULT_SCALE_BLOCK, DTYPES
from engram.args import check_int
from engram.dtypes import QUANTIZED_DTYPES, ROW_DTYPES
from engram.errors import InputError
from engram.storage.fp8 import E4M3_MAX, decode_fp8, encode_fp8
from engram.storage.intq import decode_affine, encode_affine

__all__ = [
    "QUANTIZED_DTYPES",
    "DEFAULT_BLOCK",
    "E4M3_MAX",
    "STORAGE_DTYPES",
    "SCALE_DTYPES",
    "QuantizedRows",
    "scale_shape",
    "bytes_per_row",
    "value_width",
    "decoded_shape",
    "encode",
    "decode",
    "decode_into",
]

DEFAULT_BLOCK = DEFAULT_SCALE_BLOCK
# Row dtype -> numpy dtype of the stored values ("bfloat16": its bits; "float8_e4m3": raw bytes).
STORAGE_DTYPES = {name: np.dtype(d.storage) for name, d in ROW_DTYPES.items()}
# Quantized row dtype -> numpy dtype of the stored scales (float32 per row; E8M0 exponent bytes).
SCALE_DTYPES = {name: np.dtype(d.scale) for name, d in ROW_DTYPES.items() if d.scale is not None}
_OUT_DTYPES = (torch.float32, torch.bfloat16)
_CHUNK_VALUES = 1 << 19  # values decoded per pass on CPU (2 MiB of float32)

@dataclasses.dataclass(frozen=True)
class QuantizedRows:
    """Encoded rows: what a table stores for a block of rows.

    Attributes:
        values: [R, W] numpy array of `STORAGE_DTYPES[dtype]`: W = D, or D * bits / 8 packed
            bytes for "int4" / "int2" (`value_width`).
        scales: [R, *scale_shape(dtype, D, block)] numpy array of `SCALE_DTYPES[dtype]`, or
            None for float dtypes.
        dtype: the row dtype, one of `TableSpec` dtypes.
        block: values per scale ("float8_e4m3") or per group ("int4", "int2"); recorded for the others too.
    """

    values: np.ndarray
    scales: np.ndarray | None
    dtype: str
    block: int = DEFAULT_BLOCK

    @property
    def nbytes(self) -> int:
        """Stored bytes: values plus scales."""
        return self.values.nbytes + (0 if self.scales is None else self.scales.nbytes)


def _check_dtype(dtype: Any) -> str:
    if dtype not in DTYPES:
        raise InputError(f"dtype={dtype!r} is not a row dtype: expected one of {tuple(DTYPES)}")
    return dtype


def _check_block(dtype: str, D: Any, block: Any) -> None:
    check_int("D", D, 1, " (values per row)")
    check_int("block", block, 1, " (values per scale; V4.1 uses 32)")
    row = ROW_DTYPES[dtype]
    if row.per_block and D % block:
        raise InputError(
            f"D={D} is not a multiple of block={block}: {dtype} rows keep one scale per block (group) of "
            f"values; pick a block that divides D (V4.1: D=256, block=32)"
        )
    if row.bits and block * row.bits % 8:
        per = 8 // row.bits
        raise InputError(f"block={block} is invalid for {dtype} rows: {per} values share a byte, so a group must "
                         f"fill whole bytes; pick a divisor of D={D} that is a multiple of {per}")


def value_width(dtype: str, D: int) -> int:
    """Stored elements per row of D values: D, or D * bits / 8 bytes for "int4" / "int2"."""
    return ROW_DTYPES[dtype].value_width(D)


def scale_shape(dtype: str, D: int, block: int = DEFAULT_BLOCK) -> tuple[int, ...]:
    """The per-row shape of the stored scales.

    Args:
        dtype: row dtype.
        D: values per row.
        block: values per scale ("float8_e4m3" only).

    Returns:
        (1,) for "int8", (D // block,) for "float8_e4m3", (2 * D // block,) for "int4" / "int2"
        (scale and minimum of each group), () for float dtypes (no scales).

    Example:
        >>> scale_shape("float8_e4m3", 256, 32)
        (8,)
    """
    _check_dtype(dtype)
    _check_block(dtype, D, block)
    row = ROW_DTYPES[dtype]
    return (row.scales_per_row(D, block),) if row.quantized else ()


def bytes_per_row(dtype: str, D: int, block: int = DEFAULT_BLOCK) -> int:
    """Stored bytes of one row: values plus scales.

    Args:
        dtype: row dtype.
        D: values per row.
        block: values per scale ("float8_e4m3" only).

    Returns:
        The byte count, e.g. 256 + 8 = 264 for V4.1 rows.

    Example:
        >>> bytes_per_row("float8_e4m3", 256, 32), bytes_per_row("int8", 64), bytes_per_row("bfloat16", 64)
        (264, 68, 128)
        >>> bytes_per_row("int4", 256, 32), bytes_per_row("int2", 256, 64)
        (160, 80)
    """
    scale_shape(dtype, D, block)                              # checks the arguments
    row = ROW_DTYPES[dtype]
    return row.value_width(D) * row.value_bytes + row.scale_row_bytes(D, block)


# -- encode -----------------------------------------------------------------------------------

def _rows_float32(rows: Any) -> torch.Tensor:
    """rows as a float32 CPU torch tensor [R, D], refusing non-float input and non-finite rows."""
    if isinstance(rows, np.ndarray):
        if not np.issubdtype(rows.dtype, np.floating):
            raise InputError(f"rows must be floating point, got numpy dtype={rows.dtype}: pass float32 rows")
        with np.errstate(over="ignore"):  # out-of-range values become inf, refused below
            rows = torch.from_numpy(np.array(rows, dtype=np.float32))
    elif isinstance(rows, torch.Tensor):
        if not rows.dtype.is_floating_point:
            raise InputError(f"rows must be floating point, got dtype={rows.dtype}: pass float32 rows")
        rows = rows.detach().to("cpu", torch.float32)
    else:
        raise InputError(f"rows must be a numpy array or torch.Tensor, got {type(rows).__name__}")
    if rows.dim() != 2:
        raise InputError(f"rows must be shaped [R, D], got shape {tuple(rows.shape)}: reshape to (-1, D)")
    finite = finite_rows(rows)
    if not bool(finite.all()):
        bad = int(torch.nonzero(~finite)[0, 0])
        raise InputError(
            f"rows[{bad}] contains NaN or inf (after conversion to float32): quantized rows must be "
            f"finite; fix or drop that row before encoding"
        )
    return rows


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Per row of a float tensor [R, D], whether every value is finite (bool [R]).

    max|x| per row is NaN or inf exactly when the row holds one (amax propagates NaN); that is
    several times faster than `isfinite(x).all(dim=1)` on CPU.
    """
    if x.shape[1] == 0:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.isfinite(x.abs().amax(dim=1))


def _encode_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=1, keepdim=True) / 127         # [R, 1] float32
    # near float32's max, a scale rounded up would decode 127 * scale to inf: take the one below
    scale = torch.where(torch.isinf(scale * 127), torch.nextafter(scale, torch.zeros_like(scale)), scale)
    q = (x / torch.where(scale > 0, scale, 1.0)).round().clamp(-127, 127)  # round half to even
    return q.to(torch.int8), scale


def encode(rows: np.ndarray | torch.Tensor, dtype: str, block: int = DEFAULT_BLOCK) -> QuantizedRows:
    """Encode float rows into the stored values (and scales) of `dtype`.

    Rows are converted to float32 first; rows with NaN or inf (also after that conversion) are
    refused. See the module docstring for the int8, float8_e4m3, int4 and int2 rules. An int8
    row whose max|x| is below 127 * 2**-126 (~1.5e-36) gets a subnormal scale and loses precision.

    Args:
        rows: [R, D] floating-point numpy array or torch tensor (any device).
        dtype: row dtype, one of `TableSpec` dtypes.
        block: values per scale for "float8_e4m3", per group for "int4" / "int2" (must divide D).

    Returns:
        QuantizedRows with numpy values [R, value_width(dtype, D)] and scales
        [R, *scale_shape(dtype, D, block)].

    Raises:
        InputError: unknown dtype, bad block or shape, non-float or non-finite rows; "int4" /
            "int2" groups whose minimum or scale is beyond float16's range.

    Example:
        >>> q = encode(np.ones((2, 64), np.float32), "float8_e4m3")
        >>> q.values.shape, q.scales.shape, int(q.scales[0, 0])
        ((2, 64), (2, 2), 119)
    """
    _check_dtype(dtype)
    x = _rows_float32(rows)
    _check_block(dtype, int(x.shape[1]), block)
    if dtype == "float8_e4m3":
        values, scales = encode_fp8(x, block)
        return QuantizedRows(values.numpy(), scales.numpy(), dtype, block)
    if ROW_DTYPES[dtype].bits:
        values, scales = encode_affine(x, dtype, ROW_DTYPES[dtype].bits, block)
        return QuantizedRows(values.numpy(), scales.numpy(), dtype, block)
    if dtype == "int8":
        values, scales = _encode_int8(x)
        return QuantizedRows(values.numpy(), scales.numpy(), dtype, block)
    if dtype == "bfloat16":
        return QuantizedRows(x.to(torch.bfloat16).view(torch.uint16).numpy(), None, dtype, block)
    return QuantizedRows(x.to(getattr(torch, dtype)).numpy(), None, dtype, block)


# -- decode -----------------------------------------------------------------------------------

def _as_tensor(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        # torch.from_numpy warns on read-only arrays (memory maps): copy those.
        return torch.from_numpy(a if a.flags.writeable else a.copy())
    raise InputError(f"{name} must be a numpy array or torch.Tensor, got {type(a).__name__}")


# Row dtype -> the torch dtypes accepted for its stored values and (quantized rows) scales.
_VALUE_TORCH = {name: tuple(getattr(torch, t) for t in d.value_torch) for name, d in ROW_DTYPES.items()}
_SCALE_TORCH = {name: tuple(getattr(torch, t) for t in d.scale_torch) for name, d in ROW_DTYPES.items() if d.quantized}


def decoded_shape(values_shape: tuple[int, ...], dtype: str) -> tuple[int, int]:
    """[R, D] of rows decoded from stored values [R, W] (W = D, or D * bits / 8 packed bytes)."""
    R, W = values_shape
    bits = ROW_DTYPES[dtype].bits
    return R, (W * 8 // bits if bits else W)


def _check_decode_args(values: torch.Tensor, scales: torch.Tensor | None, dtype: str, block: int) -> None:
    if values.dim() != 2:
        raise InputError(f"values must be shaped [R, W], got shape {tuple(values.shape)}")
    if values.dtype not in _VALUE_TORCH[dtype]:
        raise InputError(f"values of dtype={dtype!r} rows must have dtype in {_VALUE_TORCH[dtype]}, "
                         f"got {values.dtype}: pass the stored values unchanged")
    R, D = decoded_shape(tuple(values.shape), dtype)
    shape = (R, *scale_shape(dtype, D, block))
    if dtype not in _SCALE_TORCH:
        if scales is not None:
            raise InputError(f"scales must be None for dtype={dtype!r} rows (they store no scales)")
        return
    if scales is None or tuple(scales.shape) != shape or scales.dtype not in _SCALE_TORCH[dtype]:
        got = None if scales is None else (tuple(scales.shape), scales.dtype)
        raise InputError(f"scales for {R} rows of dtype={dtype!r}, D={D}, block={block} must be shaped {shape} "
                         f"with dtype in {_SCALE_TORCH[dtype]}, got {got!r}")
    if scales.device != values.device:
        raise InputError(f"scales are on {scales.device} but values on {values.device}: put both on one device")


def _output(values: torch.Tensor, dtype: str, out: torch.Tensor | None,
            out_dtype: torch.dtype | None) -> torch.Tensor:
    shape = decoded_shape(tuple(values.shape), dtype)
    if out is None:
        out_dtype = torch.float32 if out_dtype is None else out_dtype
        if out_dtype not in _OUT_DTYPES:
            raise InputError(f"out_dtype={out_dtype!r} is not supported: expected one of {_OUT_DTYPES}")
        return torch.empty(shape, dtype=out_dtype, device=values.device)
    if out_dtype is not None and out_dtype != out.dtype:
        raise InputError(f"out_dtype={out_dtype!r} differs from out.dtype={out.dtype}: pass one of them")
    if (out.dtype not in _OUT_DTYPES or tuple(out.shape) != shape or out.device != values.device
            or not out.is_contiguous()):
        raise InputError(
            f"out must be a contiguous {shape} tensor of dtype in {_OUT_DTYPES} on {values.device}, "
            f"got shape {tuple(out.shape)}, dtype {out.dtype}, device {out.device}: allocate it with "
            f"torch.empty({shape}, dtype=torch.float32)"
        )
    return out


def decode(
    values: np.ndarray | torch.Tensor,
    scales: np.ndarray | torch.Tensor | None,
    dtype: str,
    *,
    block: int = DEFAULT_BLOCK,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Decode stored rows to float32 or bfloat16: float8_e4m3 exactly with one rounding to the
    output dtype; int8 as the float32 product `v * scale`, int4 / int2 as the float32
    `q * scale + minimum`, each then rounded to bfloat16 if asked.

    Vectorized: a few whole-tensor passes per chunk of ~512K values (no Python loop over rows);
    pass `out` to reuse a buffer across lookups (a fresh buffer costs page faults). Read-only
    numpy inputs (memory maps) are copied first; the lookup path passes gathered torch tensors.

    Args:
        values: [R, W] stored values (`STORAGE_DTYPES[dtype]`; torch.float8_e4m3fn and
            torch.bfloat16 views are accepted too), on any device; W = D, or D * bits / 8 packed
            bytes for "int4" / "int2".
        scales: [R, *scale_shape(dtype, D, block)] stored scales (torch.float8_e8m0fnu accepted
            for E8M0 bytes), or None for float dtypes.
        dtype: row dtype.
        block: values per scale ("float8_e4m3") or per group ("int4", "int2").
        out: optional contiguous [R, D] float32/bfloat16 tensor on the values' device to write into.
        out_dtype: torch.float32 (default) or torch.bfloat16 when `out` is not given.

    Returns:
        `out` (or a new tensor) holding the decoded rows.

    Raises:
        InputError: unknown dtype, bad shapes, dtypes or devices.

    Example:
        >>> q = encode(np.full((1, 32), 0.5, np.float32), "float8_e4m3")
        >>> decode(q.values, q.scales, "float8_e4m3")[0, :3]
        tensor([0.5000, 0.5000, 0.5000])
    """
    _check_dtype(dtype)
    values = _as_tensor(values, "values")
    scales = None if scales is None else _as_tensor(scales, "scales")
    _check_decode_args(values, scales, dtype, block)
    return decode_into(values, scales, dtype, block, _output(values, dtype, out, out_dtype))


def decode_into(values: torch.Tensor, scales: torch.Tensor | None, dtype: str, block: int,
                out: torch.Tensor) -> torch.Tensor:
    """`decode` without its checks, for arguments already known to fit (the table's gather engine):
    `values`/`scales` as stored ([R, W], [R, S]) and `out` a contiguous float32 or bfloat16 tensor
    [R, D] on the values' device. Returns `out`."""
    R, D = out.shape
    if dtype == "bfloat16":
        return out.copy_(values.view(torch.bfloat16))
    if dtype not in QUANTIZED_DTYPES:
        return out.copy_(values)
    assert scales is not None
    if dtype == "float8_e4m3":
        return decode_fp8(values, scales, out, block)
    bits = ROW_DTYPES[dtype].bits
    if bits:
        return decode_affine(values, scales, out, bits, block)
    # Quantized rows decode in chunks of ~_CHUNK_VALUES values: each pass then runs in cache.
    step = R if values.device.type != "cpu" else max(1, _CHUNK_VALUES // D)
    scratch = None
    if dtype == "int8" and out.dtype != torch.float32:
        scratch = torch.empty((min(R, step), D), dtype=torch.float32, device=values.device)
    for start in range(0, R, step):
        v, s, o = values[start:start + step], scales[start:start + step], out[start:start + step]
        if scratch is None:
            o.copy_(v).mul_(s)                                # float32(v) * scale
        else:                                                 # float32 product, rounded once into out
            o.copy_(scratch[: len(v)].copy_(v).mul_(s))
    return out
