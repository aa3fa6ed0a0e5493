"""The "int4" / "int2" codec: decoded by a numpy decoder written here from the documented layout
(little-endian codes, float16 (scale, minimum) pairs, float32 `q * scale + minimum`), the error
bound of round-to-nearest affine quantization for every group, the compiled and torch decodes bit
for bit, the parameter rules, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engram import InputError, SpecError, TableSpec
from engram.storage import intq, quant

BITS = {"int4": 4, "int2": 2}


def reference_decode(codes: np.ndarray, pairs: np.ndarray, bits: int, group: int) -> np.ndarray:
    """float32 rows from packed codes uint8 [R, W] and float16 pairs [R, 2 * D / group], per the layout:
    value j is bits (j*bits) % 8 of byte (j*bits) // 8; pairs are [scale_0, minimum_0, scale_1, ...]."""
    R, W = codes.shape
    per = 8 // bits
    q = np.empty((R, W * per), np.uint8)
    for k in range(per):
        q[:, k::per] = (codes >> (k * bits)) & ((1 << bits) - 1)
    scale = np.repeat(pairs[:, 0::2].astype(np.float32), group, axis=1)
    minimum = np.repeat(pairs[:, 1::2].astype(np.float32), group, axis=1)
    return q.astype(np.float32) * scale + minimum                 # a float32 multiply, then a float32 add


def groups(a: np.ndarray, group: int) -> np.ndarray:
    return a.reshape(a.shape[0], -1, group)


def _next_half(h: np.ndarray, toward: float) -> np.ndarray:
    return np.nextafter(h, np.float16(toward))


# -- the layout, by hand ---------------------------------------------------------------------

def test_codes_are_packed_little_endian_first_value_in_the_low_bits():
    x = np.arange(16, dtype=np.float32)[None] / 16              # one group: minimum 0, scale 1/16, codes 0..15
    q = quant.encode(x, "int4", 16)
    assert q.values.tolist() == [[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]]
    assert q.scales.dtype == np.float16 and q.scales.tolist() == [[1 / 16, 0.0]]
    q2 = quant.encode(np.array([[0, 1, 2, 3, 3, 2, 1, 0]], np.float32), "int2", 8)
    assert q2.values.tolist() == [[0b11100100, 0b00011011]] and q2.scales.tolist() == [[1.0, 0.0]]
    assert torch.equal(quant.decode(q2.values, q2.scales, "int2", block=8), torch.tensor([[0., 1, 2, 3, 3, 2, 1, 0]]))


def test_pairs_follow_group_order_and_zero_rows_stay_zero():
    x = np.concatenate([np.full(8, -2.0), np.full(8, 3.0)]).astype(np.float32)[None]
    q = quant.encode(x, "int4", 8)
    assert q.scales.tolist() == [[0.0, -2.0, 0.0, 3.0]]           # equal values: scale 0, minimum exact
    assert not quant.encode(np.zeros((2, 16), np.float32), "int2", 8).values.any()
    assert not quant.encode(np.zeros((2, 16), np.float32), "int2", 8).scales.any()


# -- the error bound, every group -----------------------------------------------------------

@st.composite
def rows_and_codec(draw):
    dtype = draw(st.sampled_from(sorted(BITS)))
    bits = BITS[dtype]
    group = draw(st.sampled_from([g for g in (2, 4, 8, 12, 16, 32, 64) if g * bits % 8 == 0]))
    n_groups = draw(st.integers(1, 4))
    magnitude = draw(st.sampled_from([1e-6, 1e-3, 0.05, 1.0, 300.0, 3e4]))
    elements = st.floats(-1, 1, width=32, allow_subnormal=False)
    x = draw(hnp.arrays(np.float32, (draw(st.integers(1, 5)), group * n_groups), elements=elements))
    return (x * np.float32(magnitude)).astype(np.float32), dtype, group


@settings(max_examples=300, deadline=None)
@given(rows_and_codec())
def test_every_group_decodes_within_half_a_step_rounding_to_nearest(case):
    x, dtype, group = case
    bits = BITS[dtype]
    levels = (1 << bits) - 1
    q = quant.encode(x, dtype, group)
    y = reference_decode(q.values, q.scales, bits, group)
    assert np.array_equal(quant.decode(q.values, q.scales, dtype, block=group).numpy(), y)
    scale = q.scales[:, 0::2].astype(np.float64)[:, :, None]          # [R, ng, 1]
    minimum = q.scales[:, 1::2].astype(np.float64)[:, :, None]
    xg, yg = groups(x.astype(np.float64), group), groups(y.astype(np.float64), group)
    # float32 rounding of (x - minimum) / scale and of the decode arithmetic
    slack = 2.0**-22 * (np.abs(xg) + np.abs(minimum) + levels * scale) + 1e-44
    assert np.all(np.abs(yg - xg) <= scale / 2 + slack)
    # round to nearest: no other code of the grid lies closer to x
    codes = np.rint((yg - minimum) / np.where(scale > 0, scale, 1))
    for step in (-1, 1):
        other = codes + step
        inside = (other >= 0) & (other <= levels)
        assert np.all(~inside | (np.abs(minimum + other * scale - xg) >= np.abs(yg - xg) - slack))


@settings(max_examples=100, deadline=None)
@given(rows_and_codec())
def test_minimum_and_scale_are_the_tightest_float16s(case):
    """minimum: the largest float16 <= the group's least value; scale: the smallest float16 that
    reaches its largest value from that minimum in 2**bits - 1 steps (float32 arithmetic)."""
    x, dtype, group = case
    levels = (1 << BITS[dtype]) - 1
    q = quant.encode(x, dtype, group)
    scale, minimum = q.scales[:, 0::2], q.scales[:, 1::2]
    lo, hi = groups(x, group).min(axis=2), groups(x, group).max(axis=2)
    assert np.all(minimum.astype(np.float32) <= lo) and np.all(_next_half(minimum, np.inf).astype(np.float32) > lo)
    span = (hi - minimum.astype(np.float32)) / np.float32(levels)
    assert np.all(scale.astype(np.float32) >= span)
    assert np.all((scale == 0) | (_next_half(scale, -np.inf).astype(np.float32) < span))


# -- the two decodes ------------------------------------------------------------------------

@pytest.mark.skipif(not intq.COMPILED, reason="needs numba (the fast extra)")
@pytest.mark.parametrize("dtype, group", [("int4", 8), ("int4", 32), ("int4", 64), ("int2", 16), ("int2", 32),
                                          ("int2", 128)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_compiled_and_torch_decodes_give_the_same_bits(monkeypatch, dtype, group, out_dtype):
    rng = np.random.default_rng(group)
    x = (rng.standard_normal((300, 256)) * rng.choice([1e-4, 0.02, 5.0], size=(300, 1))).astype(np.float32)
    x[7] = 0.0
    q = quant.encode(x, dtype, group)
    compiled = quant.decode(q.values, q.scales, dtype, block=group, out_dtype=out_dtype)
    monkeypatch.setattr(intq, "COMPILED", False)
    passes = quant.decode(q.values, q.scales, dtype, block=group, out_dtype=out_dtype)
    bits = torch.int16 if out_dtype == torch.bfloat16 else torch.int32
    assert torch.equal(compiled.view(bits), passes.view(bits))
    reference = torch.from_numpy(reference_decode(q.values, q.scales, BITS[dtype], group))
    assert torch.equal(passes.view(bits), reference.to(out_dtype).view(bits))    # bfloat16: rounded once


def test_decode_chunks_and_odd_groups_through_the_torch_passes(monkeypatch):
    monkeypatch.setattr(intq, "CHUNK_VALUES", 64)                       # several chunks of 2 rows
    x = np.random.default_rng(1).standard_normal((9, 24)).astype(np.float32)
    for dtype, group in (("int4", 6), ("int2", 12)):                     # groups of 24 bits: not whole words
        q = quant.encode(x, dtype, group)
        out = torch.empty(9, 24, dtype=torch.bfloat16)
        quant.decode(q.values, q.scales, dtype, block=group, out=out)
        reference = reference_decode(q.values, q.scales, BITS[dtype], group)
        assert torch.equal(out, torch.from_numpy(reference).to(torch.bfloat16))


def test_decode_takes_packed_values_and_gives_rows_of_D():
    q = quant.encode(np.ones((3, 64), np.float32), "int2", 32)
    assert q.values.shape == (3, 16) and q.scales.shape == (3, 4) == (3, *quant.scale_shape("int2", 64, 32))
    assert quant.decode(q.values, q.scales, "int2", block=32).shape == (3, 64)
    assert quant.bytes_per_row("int4", 256, 32) == 128 + 32 and quant.bytes_per_row("int2", 256, 64) == 64 + 16
    with pytest.raises(InputError, match=r"scales for 3 rows of dtype='int2', D=64, block=32 must be shaped \(3, 4\)"):
        quant.decode(q.values, q.scales[:, :2], "int2", block=32)
    with pytest.raises(InputError, match=r"out must be a contiguous \(3, 64\) tensor"):
        quant.decode(q.values, q.scales, "int2", block=32, out=torch.empty(3, 16))


# -- errors ---------------------------------------------------------------------------------

def test_group_size_must_divide_D_and_fill_whole_bytes():
    base = dict(engram_vocab_size=(100,), max_ngram_size=2, n_head_per_ngram=1, n_embed_per_ngram=48,
                layer_ids=(0,), compressed_vocab_size=50)
    with pytest.raises(SpecError, match=r"TableSpec.scale_block=32 is invalid: int4 rows keep one scale per group "
                                        r"of values \(scale and minimum\), and the block must divide D=48"):
        TableSpec(**base, dtype="int4")
    with pytest.raises(SpecError, match=r"scale_block=6 is invalid: int2 packs 4 values a byte, so a group must "
                                        r"fill whole bytes: pick a divisor of D=48 that is a multiple of 4"):
        TableSpec(**base, dtype="int2", scale_block=6)
    assert TableSpec(**base, dtype="int4", scale_block=16).stored_row_bytes == 24 + 12
    with pytest.raises(InputError, match=r"block=3 is invalid for int4 rows: 2 values share a byte"):
        quant.encode(np.ones((1, 12), np.float32), "int4", 3)
    with pytest.raises(InputError, match=r"D=12 is not a multiple of block=8: int4 rows keep one scale per block"):
        quant.encode(np.ones((1, 12), np.float32), "int4", 8)


def test_a_bit_width_not_offered_is_refused_naming_the_offered_ones():
    with pytest.raises(SpecError, match=r"TableSpec.dtype='int3' is invalid: expected one of \(.*'int4', 'int2'\)"):
        TableSpec(engram_vocab_size=(100,), max_ngram_size=2, n_head_per_ngram=1, n_embed_per_ngram=16,
                  layer_ids=(0,), compressed_vocab_size=50, dtype="int3")
    with pytest.raises(InputError, match=r"dtype='int1' is not a row dtype"):
        quant.encode(np.ones((1, 16), np.float32), "int1", 8)


def test_groups_float16_cannot_hold_are_refused_and_the_rest_kept():
    x = np.zeros((2, 16), np.float32)
    x[1, 9] = -7e4
    with pytest.raises(InputError, match=r"rows\[1\] values 8..15 span \[-70000.0, 0.0\]: int4 rows keep a float16 "
                                         r"minimum and scale per group, so a group's least value must be >= -65504"):
        quant.encode(x, "int4", 8)
    x[1, 9] = 1e5                                   # above float16's max, but minimum 0 and scale 1e5 / 15 fit
    y = quant.decode(*(lambda q: (q.values, q.scales))(quant.encode(x, "int4", 8)), "int4", block=8)
    assert abs(float(y[1, 9]) - 1e5) <= 1e5 / 15 / 2 * 1.01


def test_group_size_is_the_specs_scale_block_saved_with_it():
    base = dict(engram_vocab_size=(100,), max_ngram_size=2, n_head_per_ngram=2, n_embed_per_ngram=128,
                layer_ids=(0,), compressed_vocab_size=50)
    spec = TableSpec(**base, dtype="int2", scale_block=16)
    d = spec.to_dict()
    assert d["dtype"] == "int2" and d["scale_block"] == 16 and TableSpec.from_dict(d) == spec
    assert (spec.value_width, spec.row_bytes, spec.scales_per_row, spec.scale_row_bytes) == (16, 16, 8, 16)
    assert "scale_block" not in TableSpec(**base).to_dict()            # float specs' dictionaries are unchanged
    assert TableSpec(**base, dtype="int4").scale_block == 32           # the default group
