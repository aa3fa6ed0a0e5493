"""int4 / int2 tables through the paths that write and split tables: convert from every dtype (with
its error report), the regrouping refusal, a gate before publishing, import from a checkpoint,
sharding, and zarr reading the plain chunk bytes with the codec its metadata names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import engram
from engram.making.sharding import shard_table
from engram.storage import quant
from tests.cli.test_cli import _v41_checkpoint, run

COMP = engram.Compression(np.arange(300))


def make_spec(dtype: str = "float32", block: int = 32) -> engram.TableSpec:
    return engram.TableSpec(engram_vocab_size=(3000, 3100), max_ngram_size=3, n_head_per_ngram=2,
                            n_embed_per_ngram=128, layer_ids=(1, 4), compressed_vocab_size=300, dtype=dtype,
                            scale_block=block)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "f32.engram"
    engram.build_table(path, make_spec(), COMP, seed=3).close()
    return path


@pytest.mark.parametrize("via", ["float32", "bfloat16", "int8", "float8_e4m3"])
@pytest.mark.parametrize("dtype", ["int4", "int2"])
def test_convert_from_any_dtype_reports_the_error_per_layer(source, tmp_path, via, dtype):
    src = source
    if via != "float32":
        src = tmp_path / f"{via}.engram"
        engram.convert(source, src, dtype=via)
    report = engram.convert(src, tmp_path / "q.engram", dtype=dtype, sample_rows=500)
    assert (report.src_dtype, report.dst_dtype, report.scale_block, report.copied) == (via, dtype, 32, False)
    spec = make_spec(dtype)
    assert report.bytes_after == spec.total_bytes and spec.stored_row_bytes == (32 if dtype == "int4" else 16) + 8
    with engram.open(src) as a, engram.open(tmp_path / "q.engram", tier="ram") as b:
        for lid, layer in report.layers.items():
            rows = np.arange(a.spec.rows(lid))
            x, y = a.rows(lid, rows), b.rows(lid, rows)
            e = (y.double() - x.double()).norm(dim=1) / x.double().norm(dim=1)
            assert 0 < layer.rms_rel_error <= float(e.max()) and layer.max_rel_error <= float(e.max())
            assert layer.rms_rel_error < (0.12 if dtype == "int4" else 0.6)
            if via == "float32":                                   # the bytes are the codec's encoding
                stored, expected = b.stored_rows(lid, rows), quant.encode(x, dtype, 32)
                np.testing.assert_array_equal(stored.values, expected.values)
                np.testing.assert_array_equal(stored.scales, expected.scales)


def test_regrouping_int2_rows_into_int2_is_refused_other_paths_are_not(source, tmp_path):
    engram.convert(source, tmp_path / "a.engram", dtype="int2", scale_block=32)
    with pytest.raises(engram.InputError, match=r"scale_block=64 would re-quantize int2 rows grouped by 32 into "
                                                r"other groups of int2, adding a second rounding error: convert the "
                                                r"original"):
        engram.convert(tmp_path / "a.engram", tmp_path / "b.engram", dtype="int2", scale_block=64)
    assert not (tmp_path / "b.engram").exists()
    same = engram.convert(tmp_path / "a.engram", tmp_path / "c.engram", dtype="int2")
    assert same.copied and same.max_rel_error == 0.0
    wider = engram.convert(tmp_path / "a.engram", tmp_path / "d.engram", dtype="int4", scale_block=64)
    assert not wider.copied and wider.scale_block == 64


def test_a_gate_that_refuses_leaves_nothing_written(source, tmp_path):
    seen = []

    def refuse(converted, src):
        seen.append((converted.spec.dtype, src.spec.dtype, torch.equal(converted.rows(1, [0]), src.rows(1, [0]))))
        raise engram.InputError("refused by the gate")

    with pytest.raises(engram.InputError, match="refused by the gate"):
        engram.convert(source, tmp_path / "g.engram", dtype="int4", accept=refuse)
    assert seen == [("int4", "float32", False)]
    assert list(tmp_path.iterdir()) == []                      # no table, no partial directory
    engram.convert(source, tmp_path / "g.engram", dtype="int4", accept=lambda converted, src: None)
    assert (tmp_path / "g.engram").is_dir()


def test_import_a_checkpoint_into_int4(capsys, tmp_path):
    spec, q = _v41_checkpoint(tmp_path)
    path = tmp_path / "int4.engram"
    code, _, err = run(capsys, "import", str(path), "--spec", str(tmp_path / "spec.json"), "--vocab-size", "300",
                       "--weights", str(tmp_path / "v41.safetensors"), "--dtype", "int4", "--scale-block", "16")
    assert code == 0, err
    x = quant.decode(q.values, q.scales, "float8_e4m3")
    expected = quant.encode(x, "int4", 16)
    with engram.open(path) as table:
        assert (table.spec.dtype, table.spec.scale_block) == ("int4", 16)
        stored = table.stored_rows(1, np.arange(spec.rows(1)))
        np.testing.assert_array_equal(stored.values, expected.values)
        np.testing.assert_array_equal(stored.scales, expected.scales)


def test_parts_of_a_sharded_int4_table_serve_its_rows(source, tmp_path):
    engram.convert(source, tmp_path / "q.engram", dtype="int4", scale_block=16)
    paths = shard_table(tmp_path / "q.engram", tmp_path / "part", 2)
    with engram.open(tmp_path / "q.engram") as whole:
        for path in paths:
            with engram.open(path, tier="ram") as part:
                start = part.shard.start(4)
                rows = np.arange(start, start + min(100, part.shard.rows(4)))
                assert torch.equal(part.rows(4, rows), whole.rows(4, rows))


def test_zarr_reads_the_plain_bytes_and_the_codec_decodes_them(source, tmp_path):
    zarr = pytest.importorskip("zarr")
    engram.convert(source, tmp_path / "q.engram", dtype="int2", scale_block=16)
    group = zarr.open_group(tmp_path / "q.engram", mode="r")
    values, pairs = group["layer_1"], group["layer_1_scales"]
    codec = values.attrs["codec"]
    assert (values.dtype, values.shape[1], pairs.dtype, pairs.shape[1]) == (np.uint8, 16, np.float16, 8)
    assert codec["name"] == "engram.affine" and codec["bits"] == 2 and codec["group_size"] == 16
    assert codec["scales"] == "layer_1_scales" and json.loads(json.dumps(codec)) == codec
    codes, halves = values[:200], pairs[:200]
    q = np.stack([(codes >> (2 * k)) & 3 for k in range(4)], axis=2).reshape(200, 64)     # little-endian
    scale = np.repeat(halves[:, 0::2].astype(np.float32), 16, axis=1)
    y = q.astype(np.float32) * scale + np.repeat(halves[:, 1::2].astype(np.float32), 16, axis=1)
    with engram.open(tmp_path / "q.engram") as table:
        assert torch.equal(table.rows(1, np.arange(200)), torch.from_numpy(y))
