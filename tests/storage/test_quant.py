"""Row codecs: decode is checked bit for bit against a dequantization written here from the formats'
definitions (FP8 E4M3 "fn" and E8M0 of the OCP specs, int8 times a float32 scale)."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engram import InputError
from engram.dtypes import ROW_DTYPES
from engram.storage import fp8, quant
from engram.storage.quant import bytes_per_row, decode, encode, scale_shape

# -- the reference, from the format definitions -----------------------------------------------


def e4m3_value(byte: int) -> float:
    """Value of one FP8 E4M3 ("fn": bias 7, no infinities, S.1111.111 = NaN) byte."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0xF and man == 0x7:
        return math.nan
    if exp == 0:
        return sign * man / 8 * 2.0**-6  # subnormal
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


E4M3 = np.array([e4m3_value(b) for b in range(256)])  # float64, exact
E4M3_POS = E4M3[:0x7F]  # magnitudes of codes 0x00..0x7E, strictly increasing


def e8m0_value(byte: int) -> float:
    return math.nan if byte == 255 else 2.0 ** (byte - 127)


def ref_decode_fp8(values: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """float64 product (exact: 4-bit significands times powers of two), rounded once to float32."""
    R, D = values.shape
    scale = np.array([e8m0_value(int(e)) for e in scales.ravel()]).reshape(scales.shape)
    exact = E4M3[values] * np.repeat(scale, block, axis=1)
    with np.errstate(over="ignore"):
        return exact.astype(np.float32)


def bf16_rne(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 (round to nearest even on the bits), returned as float32 values."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), out)


def nearest_e4m3(y: np.ndarray) -> np.ndarray:
    """Round to the nearest E4M3 byte, ties to the even code, saturating at 448."""
    mag = np.minimum(np.abs(y), 448.0)
    hi = np.clip(np.searchsorted(E4M3_POS, mag), 0, 0x7E)
    lo = np.maximum(hi - 1, 0)
    d_lo, d_hi = mag - E4M3_POS[lo], E4M3_POS[hi] - mag
    code = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return (code | np.where(np.signbit(y), 0x80, 0)).astype(np.uint8)


def assert_same(got: torch.Tensor, want: np.ndarray) -> None:
    got = got.float().numpy()
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].astype(np.float32).view(np.uint32))


# -- decode: exact ------------------------------------------------------------------------------

EXPONENTS = [0, 1, 2, 100, 117, 127, 134, 135, 200, 246, 247, 254, 255]


@pytest.mark.parametrize("with_nan", [True, False])
def test_fp8_decode_all_bytes_all_exponents_exact(with_nan):
    bytes_ = np.arange(256, dtype=np.uint8) if with_nan else np.array([b for b in range(256) if b & 0x7F != 0x7F],
                                                                       dtype=np.uint8)
    bytes_ = bytes_[: len(bytes_) // 32 * 32]
    rng = np.random.default_rng(0)
    for e_fixed in [None, *EXPONENTS]:
        # every byte in every block position, under fixed or random exponents
        values = np.stack([np.roll(bytes_, k) for k in range(0, len(bytes_), 7)])
        nb = values.shape[1] // 32
        if e_fixed is None:
            scales = rng.integers(0, 135 if not with_nan else 256, size=(len(values), nb), dtype=np.uint8)
        else:
            scales = np.full((len(values), nb), e_fixed, np.uint8)
        want = ref_decode_fp8(values, scales, 32)
        assert_same(decode(values, scales, "float8_e4m3"), want)
        assert_same(decode(values, scales, "float8_e4m3", out_dtype=torch.bfloat16), bf16_rne(want))


def test_fp8_decode_accepts_float8_views_and_block_sizes():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 256, size=(50, 64), dtype=np.uint8)
    for block in (1, 8, 16, 64):
        scales = rng.integers(110, 140, size=(50, 64 // block), dtype=np.uint8)
        want = ref_decode_fp8(values, scales, block)
        got = decode(torch.from_numpy(values).view(torch.float8_e4m3fn),
                     torch.from_numpy(scales).view(torch.float8_e8m0fnu), "float8_e4m3", block=block)
        assert_same(got, want)


def test_fp8_decode_matches_torch_float8_conversion():
    rng = np.random.default_rng(9)
    values = torch.from_numpy(rng.integers(0, 256, size=(64, 256), dtype=np.uint8))
    scales = torch.from_numpy(rng.integers(90, 160, size=(64, 8), dtype=np.uint8))
    scale = scales.view(torch.float8_e8m0fnu).float()[..., None]                   # [64, 8, 1]
    want = (values.view(torch.float8_e4m3fn).float().view(64, 8, 32) * scale).view(64, 256)
    torch.testing.assert_close(decode(values, scales, "float8_e4m3"), want, rtol=0, atol=0, equal_nan=True)


def test_int8_decode_exact():
    rng = np.random.default_rng(2)
    values = rng.integers(-128, 128, size=(300, 48), dtype=np.int8)
    scales = (rng.standard_normal((300, 1)) * 10.0 ** rng.integers(-30, 30, size=(300, 1))).astype(np.float32)
    scales[::7] = 0
    want = values.astype(np.float32) * scales  # IEEE single multiply: one rounding
    assert_same(decode(values, scales, "int8"), want)
    assert_same(decode(values, scales, "int8", out_dtype=torch.bfloat16), bf16_rne(want))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_decode_in_several_chunks(monkeypatch, out_dtype):
    monkeypatch.setattr(quant, "_CHUNK_VALUES", 3 * 64 + 5)  # 3 rows of 64 per chunk, a short last one
    rng = np.random.default_rng(8)
    values = rng.integers(0, 256, size=(10, 64), dtype=np.uint8)
    values[values & 0x7F == 0x7F] = 0
    values[7, 3] = 0xFF  # NaN in one chunk only
    scales = rng.integers(100, 140, size=(10, 2), dtype=np.uint8)
    scales[4] = 250  # an exponent needing the two-step scaling, in another chunk
    want = ref_decode_fp8(values, scales, 32)
    round_ = bf16_rne if out_dtype == torch.bfloat16 else (lambda a: a)
    assert_same(decode(values, scales, "float8_e4m3", out_dtype=out_dtype), round_(want))
    ints = rng.integers(-127, 128, size=(10, 64), dtype=np.int8)
    int_scales = rng.random((10, 1), dtype=np.float32)
    assert_same(decode(ints, int_scales, "int8", out_dtype=out_dtype), round_(ints.astype(np.float32) * int_scales))


def test_float_dtypes_decode():
    x = np.random.default_rng(3).standard_normal((20, 16)).astype(np.float32)
    for dtype in ("float32", "float16", "bfloat16"):
        q = encode(x, dtype)
        assert q.scales is None and q.values.dtype == quant.STORAGE_DTYPES[dtype]
        want = torch.from_numpy(x).to(torch.bfloat16 if dtype == "bfloat16" else getattr(torch, dtype)).float()
        assert torch.equal(decode(q.values, None, dtype), want)


def test_decode_reuses_out_and_reads_read_only_arrays():
    q = encode(np.random.default_rng(4).standard_normal((10, 64)).astype(np.float32), "float8_e4m3")
    q.values.flags.writeable = False  # as a memory map hands them out
    out = torch.full((10, 64), 7.0)
    assert decode(q.values, q.scales, "float8_e4m3", out=out) is out
    assert torch.equal(out, decode(q.values.copy(), q.scales, "float8_e4m3"))
    empty = decode(np.zeros((0, 64), np.uint8), np.zeros((0, 2), np.uint8), "float8_e4m3")
    assert empty.shape == (0, 64)


# -- encode -------------------------------------------------------------------------------------


def test_fp8_encode_rounds_to_nearest_even_and_picks_the_scale():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((400, 64)) * 10.0 ** rng.integers(-8, 8, size=(400, 1))).astype(np.float32)
    # every midpoint between neighbouring codes (exact ties, subnormal ones included), with
    # either sign, in block 0 of rows 0..8, whose last value 448 fixes the block scale at 2**0
    mids = (E4M3_POS[:-1] + E4M3_POS[1:]) / 2
    mids = np.concatenate([mids, -mids, np.zeros(31 * 9 - 2 * len(mids))])
    x[:9, :31] = mids.reshape(9, 31)
    x[:9, 31] = 448.0
    q = encode(x, "float8_e4m3")
    amax = np.abs(x).reshape(400, 2, 32).max(axis=2)
    s = 2.0 ** (q.scales.astype(np.float64) - 127)
    assert np.all(amax / s <= 448) and np.all(amax / (s / 2) > 448)  # smallest power of two
    y = x.astype(np.float64) / np.repeat(s, 32, axis=1)
    np.testing.assert_array_equal(q.values, nearest_e4m3(y))


def test_fp8_scale_rule_against_ocp_rule():
    # significand 1.9 > 1.75: the OCP rule 2**(floor(log2 amax) - 8) would clip 1.9*2**8 to 448
    x = np.full((1, 32), 1.9 * 2.0**-3, np.float32)
    q = encode(x, "float8_e4m3")
    assert int(q.scales[0, 0]) - 127 == math.floor(math.log2(1.9 * 2.0**-3)) - 8 + 1
    # significand 1.5 <= 1.75: both rules agree
    q = encode(np.full((1, 32), 1.5 * 2.0**-3, np.float32), "float8_e4m3")
    assert int(q.scales[0, 0]) - 127 == -3 - 8


def test_fp8_saturation():
    got = fp8.round_e4m3(torch.tensor([447.0, 448.0, 449.0, 464.0, 480.0, 1e30, -500.0, -1e30]))
    assert got.tolist() == [0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0xFE]


def test_fp8_round_trip_bounds():
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((500, 256)) * 10.0 ** rng.integers(-20, 20, size=(500, 1))).astype(np.float32)
    x[:, :8] *= 1e-4  # some values deep in the subnormal range of their block
    q = encode(x, "float8_e4m3")
    y = decode(q.values, q.scales, "float8_e4m3").numpy().astype(np.float64)
    check_fp8_bounds(x, y, q.scales, 32)


def check_fp8_bounds(x: np.ndarray, y: np.ndarray, scales: np.ndarray, block: int) -> None:
    s = np.repeat(2.0 ** (scales.astype(np.float64) - 127), block, axis=1)
    err = np.abs(y - x.astype(np.float64))
    normal = np.abs(x) >= 2.0**-6 * s
    assert np.all(err[normal] <= 2.0**-4 * np.abs(x.astype(np.float64))[normal])
    assert np.all(err[~normal] <= 2.0**-10 * s[~normal])  # half the subnormal spacing 2**-9


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3"])
def test_rows_near_float32_max_decode_finite(dtype):
    big = np.finfo(np.float32).max
    x = np.array([[big] * 32, [-big] * 32, [np.float32(248 * 2.0**120)] * 32, [-np.float32(3.3e38)] * 32], np.float32)
    q = encode(x, dtype)
    y = decode(q.values, q.scales, dtype).numpy().astype(np.float64)
    assert np.isfinite(y).all()
    if dtype == "int8":
        assert np.all(np.abs(y - x) <= q.scales.astype(np.float64) * (0.5 + 1e-5))
    else:
        check_fp8_bounds(x, y, q.scales, 32)


def test_int8_round_trip_bound_and_rounding():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((300, 64)) * 10.0 ** rng.integers(-20, 20, size=(300, 1))).astype(np.float32)
    q = encode(x, "int8")
    assert q.values.dtype == np.int8 and q.scales.shape == (300, 1) and q.scales.dtype == np.float32
    np.testing.assert_array_equal(q.scales[:, 0], np.abs(x).max(axis=1) / np.float32(127))
    assert np.abs(q.values).max() <= 127
    y = decode(q.values, q.scales, "int8").numpy()
    assert np.all(np.abs(y - x) <= q.scales * (0.5 + 1e-5))
    # half-way values round to even
    q = encode(np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5]], np.float32), "int8")
    assert q.values.tolist() == [[127, 0, 2, 2, 0, -2]]


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3"])
def test_zero_rows(dtype):
    x = np.zeros((3, 64), np.float32)
    x[1, 5] = 1.0
    q = encode(x, dtype)
    y = decode(q.values, q.scales, dtype)
    assert torch.equal(y[[0, 2]], torch.zeros(2, 64)) and y[1, 5] == 1.0
    if dtype == "int8":
        assert q.scales[0, 0] == 0
    else:
        assert q.scales[0].tolist() == [0, 0] and q.values[0].tolist() == [0] * 64


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3", "float32"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e300])
def test_non_finite_rows_refused(dtype, bad):
    x = np.ones((5, 32))
    x[3, 7] = bad
    with pytest.raises(InputError, match=r"rows\[3\] contains NaN or inf \(after conversion to float32\)"):
        encode(x, dtype)


FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6).map(
    lambda s: (s[0], 32 * s[1])), elements=FLOAT32))
def test_fp8_round_trip_property(x):
    q = encode(x, "float8_e4m3")
    y = decode(q.values, q.scales, "float8_e4m3").numpy().astype(np.float64)
    assert np.isfinite(y).all()
    check_fp8_bounds(x, y, q.scales, 32)
    np.testing.assert_array_equal(decode(q.values, q.scales, "float8_e4m3", out_dtype=torch.bfloat16).float(),
                                  bf16_rne(y.astype(np.float32)))


@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
                  elements=FLOAT32))
def test_int8_round_trip_property(x):
    q = encode(x, "int8")
    y = decode(q.values, q.scales, "int8").numpy().astype(np.float64)
    assert np.isfinite(y).all()
    normal = np.abs(x).max(axis=1) >= 127 * 2.0**-126  # below: subnormal scales (documented)
    err = np.abs(y - x)[normal]
    assert np.all(err <= q.scales[normal].astype(np.float64) * (0.5 + 1e-5))


@given(st.sampled_from(sorted(quant.STORAGE_DTYPES)), st.integers(1, 8), st.sampled_from([1, 2, 4, 8, 16, 32]))
def test_bytes_per_row_matches_encoded_bytes(dtype, n_blocks, block):
    assume(block * ROW_DTYPES[dtype].bits % 8 == 0)       # int4 / int2 groups fill whole bytes
    D = n_blocks * block
    q = encode(np.ones((3, D), np.float32), dtype, block)
    assert q.nbytes == 3 * bytes_per_row(dtype, D, block)
    assert (q.scales.shape[1:] if q.scales is not None else ()) == scale_shape(dtype, D, block)


def test_v41_row_size():
    assert bytes_per_row("float8_e4m3", 256, 32) == 264
    assert scale_shape("float8_e4m3", 256) == (8,) and scale_shape("int8", 64) == (1,)
    assert scale_shape("bfloat16", 64) == ()


# -- errors -------------------------------------------------------------------------------------


def test_errors():
    x = np.ones((2, 100), np.float32)
    with pytest.raises(InputError, match=r"dtype='fp8' is not a row dtype: expected one of \('float32'"):
        encode(x, "fp8")
    with pytest.raises(InputError, match="D=100 is not a multiple of block=32: float8_e4m3 rows keep one scale"):
        encode(x, "float8_e4m3")
    with pytest.raises(InputError, match=r"block=0 is invalid: expected an int >= 1"):
        bytes_per_row("float8_e4m3", 64, 0)
    with pytest.raises(InputError, match=r"D=0 is invalid"):
        scale_shape("int8", 0)
    with pytest.raises(InputError, match=r"rows must be shaped \[R, D\], got shape \(100,\)"):
        encode(x[0], "int8")
    with pytest.raises(InputError, match="rows must be floating point, got numpy dtype=int64"):
        encode(np.ones((2, 32), np.int64), "int8")
    q = encode(np.ones((2, 64), np.float32), "float8_e4m3")
    with pytest.raises(InputError, match=r"scales for 2 rows of dtype='float8_e4m3', D=64, block=32 must be shaped "
                                         r"\(2, 2\)"):
        decode(q.values, q.scales[:, :1], "float8_e4m3")
    with pytest.raises(InputError, match=r"scales for 2 rows .* got None"):
        decode(q.values, None, "float8_e4m3")
    with pytest.raises(InputError, match=r"values of dtype='int8' rows must have dtype in \(torch.int8,\)"):
        decode(q.values, q.scales, "int8")
    with pytest.raises(InputError, match="scales must be None for dtype='float32' rows"):
        decode(np.ones((2, 64), np.float32), q.scales, "float32")
    with pytest.raises(InputError, match=r"out_dtype=torch.float16 is not supported"):
        decode(q.values, q.scales, "float8_e4m3", out_dtype=torch.float16)
    with pytest.raises(InputError, match=r"out must be a contiguous \(2, 64\) tensor .* got shape \(2, 32\)"):
        decode(q.values, q.scales, "float8_e4m3", out=torch.empty(2, 32))
    with pytest.raises(InputError, match="out_dtype=torch.bfloat16 differs from out.dtype=torch.float32"):
        decode(q.values, q.scales, "float8_e4m3", out=torch.empty(2, 64), out_dtype=torch.bfloat16)
    with pytest.raises(InputError, match="values must be a numpy array or torch.Tensor, got list"):
        decode([[1]], None, "float32")


def test_docstring_examples():
    assert doctest.testmod(quant, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0
