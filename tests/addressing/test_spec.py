from __future__ import annotations

import json

import pytest

from engram import SpecError, TableSpec

BASE = dict(engram_vocab_size=(646400, 646400), max_ngram_size=3, n_head_per_ngram=8,
            n_embed_per_ngram=512, layer_ids=(1, 15), compressed_vocab_size=129280)


def make(**changes):
    return TableSpec(**{**BASE, **changes})


def test_defaults_and_derived_sizes(golden):
    spec = make()
    g = golden("hash_deepseek_default")
    assert spec.pad_id == 2 and spec.seed == 0 and spec.hash == "multiplicative-xor"
    assert spec.n_orders == 2 and spec.heads_per_layer == 16
    assert spec.head_dim == 64 and spec.embed_dim == 1024
    for layer_id in (1, 15):
        sizes = [p for order in g["table_sizes"][str(layer_id)] for p in order]
        assert spec.table_sizes(layer_id) == tuple(sizes)
        assert spec.rows(layer_id) == sum(sizes)
        assert spec.head_offsets(layer_id)[1] == sizes[0]
        assert spec.layer_bytes(layer_id) == sum(sizes) * 64 * 4
    assert spec.total_rows == spec.rows(1) + spec.rows(15)
    assert make(dtype="bfloat16").row_bytes == 128


def test_frozen_and_hashable():
    spec = make()
    with pytest.raises(AttributeError):
        spec.seed = 3
    assert hash(spec) == hash(make(engram_vocab_size=[646400, 646400], layer_ids=[1, 15]))


def test_dict_round_trip_through_json():
    spec = make(hash="xxh64", dtype="bfloat16", seed=9)
    d = json.loads(json.dumps(spec.to_dict()))
    assert d["format_version"] == 1
    assert TableSpec.from_dict(d) == spec


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_ngram_size", 1, r"TableSpec.max_ngram_size=1 is invalid: expected an int in \[2, 32\]"),
        ("max_ngram_size", True, r"max_ngram_size=True is invalid"),
        ("engram_vocab_size", (646400,),
         r"engram_vocab_size=\(646400,\) is invalid: expected 2 ints in \[2, 1099511627776\]"),
        ("engram_vocab_size", (646400, 1), r"engram_vocab_size=\(646400, 1\) is invalid"),
        ("n_head_per_ngram", 0, r"n_head_per_ngram=0 is invalid: expected an int in \[1, 4096\]"),
        ("n_embed_per_ngram", 500, r"n_embed_per_ngram=500 is invalid: expected a positive multiple "
                                   r"of n_head_per_ngram=8"),
        ("layer_ids", (), r"layer_ids=\(\) is invalid: expected a non-empty sequence of distinct ints"),
        ("layer_ids", (1, 1), r"layer_ids=\(1, 1\) is invalid"),
        ("layer_ids", (-1,), r"layer_ids=\(-1,\) is invalid"),
        ("compressed_vocab_size", 0, r"compressed_vocab_size=0 is invalid: .*comp.compressed_vocab_size"),
        ("pad_id", -1, r"pad_id=-1 is invalid: expected a raw token id in \[0, 134217728\)"),
        ("seed", -5, r"seed=-5 is invalid: expected an int in \[0, 9223372036854775807\]"),
        ("hash", "crc32", r"hash='crc32' is invalid: expected one of \('multiplicative-xor', 'xxh64', 'murmur3'\)"),
        ("dtype", "float64", r"dtype='float64' is invalid: expected one of"),
    ],
)
def test_bad_fields_name_field_value_and_fix(field, value, message):
    with pytest.raises(SpecError, match=message):
        make(**{field: value})


def test_spec_error_is_a_value_error():
    with pytest.raises(ValueError):
        make(seed=-1)


def test_from_dict_refuses_unknown_version_and_fields():
    d = make().to_dict()
    with pytest.raises(SpecError, match=r"format_version=99 is not supported: this engram reads version 1"):
        TableSpec.from_dict({**d, "format_version": 99})
    with pytest.raises(SpecError, match=r"unknown fields \['colour'\]"):
        TableSpec.from_dict({**d, "colour": "red"})
    del d["layer_ids"]
    with pytest.raises(SpecError, match=r"missing required fields \['layer_ids'\]"):
        TableSpec.from_dict(d)
    with pytest.raises(SpecError, match="expected a mapping, got list"):
        TableSpec.from_dict([1, 2])


def test_unknown_layer_is_an_input_error():
    from engram import InputError

    with pytest.raises(InputError, match=r"layer_id=2 has no table: this spec has layer_ids=\(1, 15\)"):
        make().table_sizes(2)


def test_numpy_integers_become_python_ints():
    import numpy as np

    spec = make(max_ngram_size=np.int64(3), n_head_per_ngram=np.int32(8), n_embed_per_ngram=np.int64(512),
                engram_vocab_size=tuple(np.array([646400, 646400])),
                layer_ids=[np.int64(1), np.int16(15)], compressed_vocab_size=np.uint32(129280), pad_id=np.int8(2),
                seed=np.int64(0), scale_block=np.int64(32))
    assert spec == make()
    for name in ("max_ngram_size", "n_head_per_ngram", "n_embed_per_ngram", "compressed_vocab_size", "pad_id",
                 "seed", "scale_block"):
        assert type(getattr(spec, name)) is int, name
    assert all(type(v) is int for v in spec.engram_vocab_size + spec.layer_ids)
    assert json.loads(json.dumps(spec.to_dict())) == make().to_dict()      # numpy ints would not serialize
    assert spec.table_sizes(1) == make().table_sizes(1)


@pytest.mark.parametrize("field", ["dtype", "hash"])
@pytest.mark.parametrize("value", [{}, [], 3, None])
def test_non_string_dtype_or_hash_is_a_spec_error(field, value):
    d = {**make().to_dict(), field: value}
    with pytest.raises(SpecError, match=rf"TableSpec.{field}=.* is invalid: expected one of"):
        TableSpec.from_dict(d)


def test_scale_block_is_validated_and_saved_only_where_it_matters():
    fp8 = make(dtype="float8_e4m3")                        # D = 64: blocks of 32 by default
    assert (fp8.scale_block, fp8.scales_per_row, fp8.scale_row_bytes, fp8.stored_row_bytes) == (32, 2, 2, 66)
    assert make(dtype="int8").scale_row_bytes == 4 and make(dtype="int8").stored_row_bytes == 68
    assert make().scale_row_bytes == 0 and not make().quantized and fp8.quantized
    assert fp8.layer_bytes(1) == fp8.rows(1) * 66
    assert fp8.to_dict()["scale_block"] == 32
    assert "scale_block" not in make().to_dict() and "scale_block" not in make(dtype="int8").to_dict()
    # other dtypes have no blocks: any valid value becomes the default, so equal rows give equal specs
    assert make(scale_block=16) == make() and "scale_block" not in make(dtype="int8", scale_block=16).to_dict()
    for spec in (fp8, make(dtype="float8_e4m3", scale_block=8), make(scale_block=16)):
        assert TableSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    old = make(dtype="float8_e4m3").to_dict()
    del old["scale_block"]                                   # a dict written before scale_block existed
    assert TableSpec.from_dict(old).scale_block == 32
    with pytest.raises(SpecError, match=r"TableSpec.scale_block=0 is invalid: expected an int >= 1"):
        make(scale_block=0)
    with pytest.raises(SpecError, match=r"scale_block=True is invalid"):
        make(scale_block=True)
    with pytest.raises(SpecError, match=r"TableSpec.scale_block=48 is invalid: .* must divide D=64: pick a "
                       r"divisor of 64"):
        make(dtype="float8_e4m3", scale_block=48)
    assert make(scale_block=48).scale_block == 32          # other dtypes ignore it


def test_row_fields_differ_ignores_the_row_encoding():
    spec = TableSpec(engram_vocab_size=(50, 60), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=64,
                     layer_ids=(0,), compressed_vocab_size=40)
    assert spec.row_fields_differ(spec.replace(dtype="float8_e4m3", scale_block=16)) == []
    assert spec.row_fields_differ(spec.replace(dtype="int8")) == []
    assert spec.row_fields_differ(spec.replace(seed=3, hash="xxh64")) == ["seed", "hash"]


def test_row_fields_differ_reports_every_addressing_field():
    spec = make()
    other = {"engram_vocab_size": (646400, 700001), "max_ngram_size": 4, "n_head_per_ngram": 4,
             "n_embed_per_ngram": 1024, "layer_ids": (1, 16), "compressed_vocab_size": 1234, "pad_id": 3, "seed": 1,
             "hash": "murmur3"}
    fields = {f for f in TableSpec.__dataclass_fields__ if f not in ("dtype", "scale_block")}
    assert set(other) == fields            # a new addressing field needs a case here
    for field, value in other.items():
        changes = {field: value}
        if field == "max_ngram_size":
            changes["engram_vocab_size"] = (646400,) * 3
        assert field in spec.row_fields_differ(spec.replace(**changes)), field
