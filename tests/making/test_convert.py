"""engram.convert: any dtype to any dtype, chunk by chunk, atomically, with a seeded error report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import engram
from engram.making.conversion import ConvertReport
from engram.storage import quant, writer

VOCAB = 600
COMP = engram.Compression(np.arange(VOCAB) // 2)
SOURCES = ("float32", "bfloat16", "int8", "float8_e4m3")
TARGETS = ("float32", "bfloat16", "float16", "int8", "float8_e4m3")
ZERO_ROWS = np.arange(0, 8000, 50)                     # rows set to zero in every source table


def make_spec(dtype: str = "float32", **changes) -> engram.TableSpec:
    # D = 16; float8_e4m3 in blocks of 8 (2 scales a row)
    spec = engram.TableSpec(engram_vocab_size=(2000, 2100), max_ngram_size=3, n_head_per_ngram=2,
                            n_embed_per_ngram=32, layer_ids=(1, 5), compressed_vocab_size=COMP.compressed_vocab_size)
    return spec.replace(dtype=dtype, scale_block=8, **changes)


def all_rows(table, layer_id: int) -> torch.Tensor:
    return table.rows(layer_id, np.arange(table.spec.rows(layer_id)), dtype=torch.float32)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    spec = make_spec()
    gen = torch.Generator().manual_seed(0)
    weights = {lid: torch.randn(spec.rows(lid), 16, generator=gen) * 0.03 for lid in spec.layer_ids}
    for rows in weights.values():
        rows[ZERO_ROWS] = 0
    out = {}
    for dtype in SOURCES:
        out[dtype] = root / f"{dtype}.engram"
        engram.build_table(out[dtype], make_spec(dtype), COMP, weights=weights).close()
    return out


def rel_errors(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per row ||y - x|| / ||x|| in float64 (0 where both are zero rows)."""
    x, y = x.double(), y.double()
    norm, diff = x.norm(dim=1), (y - x).norm(dim=1)
    return torch.where(norm == 0, diff, diff / norm).numpy()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", SOURCES)
def test_any_dtype_converts_to_any_dtype(sources, tmp_path, source, target):
    dst = tmp_path / "out.engram"
    # a float8_e4m3 source keeps its blocks; from the other dtypes D=16 needs a block set (32 > D)
    block = 8 if target == "float8_e4m3" and source != target else None
    report = engram.convert(sources[source], dst, dtype=target, scale_block=block, sample_rows=3000, seed=7)
    spec = make_spec(target)
    with engram.open(sources[source]) as src, engram.open(dst, tier="ram") as out:
        assert out.spec == spec and out.compression == COMP
        assert out.format_version == (2 if spec.quantized else 1)
        out.verify()
        for layer_id in spec.layer_ids:
            x = all_rows(src, layer_id)
            if spec.quantized:
                q = quant.encode(x, target, spec.scale_block)
                expected = quant.decode(q.values, q.scales, target, block=spec.scale_block)
            else:
                expected = x.to(out.dtype).float()
            got = all_rows(out, layer_id)
            assert torch.equal(got, expected)
            # the report: the documented error over the documented sample
            sample = np.sort(np.random.default_rng([7, layer_id]).choice(spec.rows(layer_id), 3000, replace=False))
            e = rel_errors(x[sample], got[sample])
            layer = report.layers[layer_id]
            assert (layer.rows, layer.sampled_rows) == (spec.rows(layer_id), 3000)
            assert layer.zero_rows == np.isin(sample, ZERO_ROWS).sum() > 0 and layer.nonfinite_rows == 0
            assert layer.max_rel_error == pytest.approx(e.max(), rel=1e-12, abs=1e-300)
            assert layer.rms_rel_error == pytest.approx(np.sqrt(np.mean(e**2)), rel=1e-9, abs=1e-300)
            assert layer.bytes_before == make_spec(source).layer_bytes(layer_id)
            assert layer.bytes_after == spec.layer_bytes(layer_id)
            assert layer.disk_bytes_after == out.layout(layer_id).disk_bytes
    assert report.copied == (source == target)
    assert (report.src_dtype, report.dst_dtype) == (source, target)
    assert report.scale_block == (8 if target == "float8_e4m3" else None)
    bound = {"float32": 0.0, "bfloat16": 2**-8, "float16": 2**-10, "int8": 0.02, "float8_e4m3": 0.07}[target]
    assert report.max_rel_error <= bound


def test_same_encoding_is_copied_bit_for_bit(sources, tmp_path, monkeypatch):
    def no_codec(*args, **kwargs):
        raise AssertionError("a table converted to its own encoding must be copied, not re-encoded")

    monkeypatch.setattr(writer, "encode", no_codec)
    report = engram.convert(sources["float8_e4m3"], tmp_path / "copy", dtype="float8_e4m3")
    assert report.copied and report.max_rel_error == 0.0
    with engram.open(sources["float8_e4m3"]) as src, engram.open(tmp_path / "copy") as out:
        for layer_id in src.spec.layer_ids:
            rows = np.arange(src.spec.rows(layer_id))
            a, b = src.stored_rows(layer_id, rows), out.stored_rows(layer_id, rows)
            assert a.values.tobytes() == b.values.tobytes() and a.scales.tobytes() == b.scales.tobytes()
    monkeypatch.undo()
    other = engram.convert(sources["float8_e4m3"], tmp_path / "blocks", dtype="float8_e4m3", scale_block=16)
    assert not other.copied and other.scale_block == 16 and other.max_rel_error > 0


def test_report_to_dict_is_json(sources, tmp_path):
    report = engram.convert(sources["float32"], tmp_path / "t", dtype="int8", sample_rows=0)
    assert isinstance(report, ConvertReport) and report.layers[1].max_rel_error is None
    d = json.loads(json.dumps(report.to_dict()))
    assert d["dst_dtype"] == "int8" and d["layers"]["1"]["sampled_rows"] == 0
    assert d["bytes_before"] == make_spec().total_bytes and d["bytes_after"] == make_spec("int8").total_bytes
    assert d["bytes_after"] * 3 < d["bytes_before"]        # 16 + 4 bytes a row instead of 64


def test_convert_in_place_and_existing_targets(sources, tmp_path):
    import shutil

    path = tmp_path / "t.engram"
    shutil.copytree(sources["float32"], path)
    with pytest.raises(engram.TableExistsError, match="already exists: pass overwrite=True"):
        engram.convert(path, path, dtype="bfloat16")
    with engram.open(path) as before:
        expected = all_rows(before, 5).to(torch.bfloat16)
        engram.convert(path, path, dtype="bfloat16", overwrite=True)
        assert before.spec.dtype == "float32" and all_rows(before, 5).dtype == torch.float32   # old files still read
    with engram.open(path) as after:
        assert after.spec.dtype == "bfloat16" and torch.equal(after.rows(5, np.arange(after.spec.rows(5))), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.engram"]


def test_a_failed_conversion_leaves_nothing(sources, tmp_path, disk_full_at_third_chunk):
    with pytest.raises(OSError, match="No space left"):
        engram.convert(sources["float32"], tmp_path / "t", dtype="int8")
    assert list(tmp_path.iterdir()) == []


def test_non_finite_rows_are_refused_by_quantized_targets(tmp_path):
    spec = make_spec()
    rows = np.zeros((spec.rows(1), 16), np.float32)
    rows[4321, 0] = np.nan
    engram.build_table(tmp_path / "nan", spec, COMP, weights={1: rows}).close()
    with pytest.raises(engram.InputError, match=r"source table layer 1 row 4321 contains NaN or inf .*: int8 rows "
                       r"must be finite"):
        engram.convert(tmp_path / "nan", tmp_path / "q", dtype="int8")
    assert not (tmp_path / "q").exists()
    report = engram.convert(tmp_path / "nan", tmp_path / "half", dtype="float16", sample_rows=10**6)
    assert report.layers[1].nonfinite_rows == 1 and report.layers[1].max_rel_error == 0.0


def test_rows_that_overflow_the_target_report_an_infinite_error(tmp_path):
    spec = make_spec()
    rows = np.full((spec.rows(1), 16), 0.01, np.float32)
    rows[7, 3] = 1e6                                          # past float16's largest value, 65504
    engram.build_table(tmp_path / "big", spec, COMP, weights={1: rows}).close()
    report = engram.convert(tmp_path / "big", tmp_path / "half", dtype="float16", sample_rows=10**6)
    assert report.layers[1].max_rel_error == float("inf") and report.layers[1].nonfinite_rows == 0
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["layers"]["1"]["max_rel_error"] == "inf" and d["max_rel_error"] == "inf"


def test_bad_arguments(sources, tmp_path):
    src = sources["float32"]
    with pytest.raises(engram.SpecError, match=r"dtype='float64' is not a row dtype: expected one of"):
        engram.convert(src, tmp_path / "t", dtype="float64")
    with pytest.raises(engram.InputError,
                       match=r"scale_block=16 applies to dtypes \('float8_e4m3', 'int4', 'int2'\) only"):
        engram.convert(src, tmp_path / "t", dtype="int8", scale_block=16)
    with pytest.raises(engram.SpecError, match=r"cannot convert to dtype='float8_e4m3': .*scale_block=32 is invalid"
                       r".*must divide D=16.*pass scale_block="):
        engram.convert(src, tmp_path / "t", dtype="float8_e4m3", scale_block=32)
    with pytest.raises(engram.InputError, match=r"sample_rows=-1 is invalid"):
        engram.convert(src, tmp_path / "t", dtype="int8", sample_rows=-1)
    with pytest.raises(engram.TableNotFoundError):
        engram.convert(tmp_path / "missing", tmp_path / "t", dtype="int8")
    assert not (tmp_path / "t").exists()


def test_convert_is_the_public_function_even_after_importing_its_module():
    import engram.making.conversion

    assert "convert" in engram.__all__ and "ConvertReport" in engram.__all__
    assert engram.convert is engram.making.conversion.convert


def test_opening_with_a_spec_of_other_blocks_names_scale_block(sources):
    other = make_spec("float8_e4m3").replace(scale_block=4)
    with pytest.raises(engram.SpecMismatchError, match=r"built for another spec: scale_block=8 \(expected 4\)"):
        engram.open(sources["float8_e4m3"], spec=other)


def test_check_convert_refuses_what_convert_would_and_writes_nothing(sources, tmp_path):
    from engram.making.conversion import check_convert

    with engram.open(sources["float32"]) as src:
        spec = check_convert(src.spec, tmp_path / "t", dtype="float8_e4m3", scale_block=8)
        assert spec == make_spec("float8_e4m3") and list(tmp_path.iterdir()) == []
        with pytest.raises(engram.TableExistsError, match="already exists: pass overwrite=True"):
            check_convert(src.spec, sources["int8"], dtype="int8")
        with pytest.raises(engram.SpecError, match=r"scale_block=32 is invalid.*pass scale_block="):
            check_convert(src.spec, tmp_path / "t", dtype="float8_e4m3")
