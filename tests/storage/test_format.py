"""The on-disk format: a zarr v3 group of plain-bytes chunk files any zarr reader can open."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import xxhash
import zarr

import engram
from engram.storage import quant
from engram.storage.format import (
    CHUNK_ALIGN,
    FORMAT_VERSION,
    FORMAT_VERSIONS,
    METADATA_CHECKSUM,
    metadata_checksum,
)
from engram.storage.metadata import read_metadata

VOCAB = 600
# Merges id pairs, so compression is not the identity.
COMP = engram.Compression(np.arange(VOCAB) // 2)


def make_spec(dtype: str = "float32", head_dim: int = 16, layer_ids=(1, 5)) -> engram.TableSpec:
    return engram.TableSpec(engram_vocab_size=(2000, 2100), max_ngram_size=3, n_head_per_ngram=2,
                            n_embed_per_ngram=2 * head_dim, layer_ids=layer_ids,
                            compressed_vocab_size=COMP.compressed_vocab_size, dtype=dtype)


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("format") / "t.engram"
    engram.build_table(path, make_spec(), COMP, seed=3, chunk_rows=4096).close()
    return path


def engram_attrs(path) -> dict:
    return json.loads((path / "zarr.json").read_text())["attributes"]["engram"]


def test_group_attributes_hold_version_spec_compression_and_checksums(table_dir):
    attrs = engram_attrs(table_dir)
    assert attrs["format_version"] == 1 and FORMAT_VERSIONS == (1, 2, FORMAT_VERSION) == (1, 2, 3)   # float rows: 1
    assert "scales" not in attrs["layers"][0] and "scale_block" not in attrs["spec"]
    assert attrs["spec"] == make_spec().to_dict()
    assert attrs["compression"] == {"array": "compression", "xxh3": COMP.fingerprint}
    assert [layer["layer_id"] for layer in attrs["layers"]] == [1, 5]
    layer = attrs["layers"][0]
    assert layer["array"] == "layer_1" and layer["chunk_rows"] == 4096
    assert len(layer["checksums"]) == -(-make_spec().rows(1) // 4096) == 3


def test_zarr_reads_every_row_and_the_compression(table_dir):
    spec = make_spec()
    group = zarr.open_group(table_dir, mode="r")
    with engram.open(table_dir) as table:
        for layer_id in spec.layer_ids:
            array = group[f"layer_{layer_id}"]
            assert array.shape == (spec.rows(layer_id), spec.head_dim)
            assert array.chunks == (4096, spec.head_dim)
            assert array.dtype == np.float32
            rows = array[:]
            np.testing.assert_array_equal(rows, table.rows(layer_id, np.arange(spec.rows(layer_id))).numpy())
            np.testing.assert_array_equal(array[100:103], rows[100:103])
    np.testing.assert_array_equal(group["compression"][:], COMP.lookup)


def test_chunk_files_are_plain_little_endian_row_major_bytes(table_dir):
    spec = make_spec()
    rows = zarr.open_group(table_dir, mode="r")["layer_1"][:]
    attrs = engram_attrs(table_dir)["layers"][0]
    n_chunks = len(attrs["checksums"])
    for index in range(n_chunks):
        path = table_dir / "layer_1" / "c" / str(index) / "0"
        data = path.read_bytes()
        assert len(data) == 4096 * spec.row_bytes and len(data) % CHUNK_ALIGN == 0
        assert xxhash.xxh3_64_hexdigest(data) == attrs["checksums"][index]
        block = np.frombuffer(data, "<f4").reshape(4096, spec.head_dim)
        start, stop = index * 4096, min((index + 1) * 4096, spec.rows(1))
        np.testing.assert_array_equal(block[: stop - start], rows[start:stop])
        assert not block[stop - start:].any()     # the last chunk is zero-padded to full size


@pytest.mark.parametrize(("dtype", "zarr_dtype", "torch_dtype"), [
    ("bfloat16", np.uint16, torch.bfloat16), ("float16", np.float16, torch.float16)])
def test_half_dtypes_are_stored_natively_or_as_bf16_bits(tmp_path, dtype, zarr_dtype, torch_dtype):
    spec = make_spec(dtype, head_dim=32, layer_ids=(2,))
    weights = torch.randn(spec.rows(2), 32, generator=torch.Generator().manual_seed(0))
    with engram.build_table(tmp_path / "t", spec, COMP, weights={2: weights}) as table:
        stored = zarr.open_group(tmp_path / "t", mode="r")["layer_2"][:]
        assert stored.dtype == zarr_dtype
        assert engram_attrs(tmp_path / "t")["spec"]["dtype"] == dtype
        expected = weights.to(torch_dtype)
        assert torch.equal(torch.from_numpy(stored).view(torch_dtype), expected)
        assert torch.equal(table.rows(2, np.arange(spec.rows(2))), expected)


def test_metadata_reads_back_as_written(table_dir):
    meta = read_metadata(table_dir)
    assert meta.spec == make_spec() and meta.compression == COMP
    lay = meta.layers[5]
    assert (lay.rows, lay.row_bytes, lay.chunk_rows) == (make_spec().rows(5), 64, 4096)
    assert lay.chunk_path(table_dir, 2) == table_dir / "layer_5" / "c" / "2" / "0"
    assert lay.chunk_span(lay.n_chunks - 1) == ((lay.n_chunks - 1) * 4096, lay.rows)


# -- refusals -----------------------------------------------------------------------------
@pytest.fixture
def copy(table_dir, tmp_path):
    dest = tmp_path / "copy.engram"
    shutil.copytree(table_dir, dest)
    return dest


def rewrite_json(path, edit, reseal: bool = True) -> None:
    """Edit a zarr.json; `reseal` also updates the metadata checksum (as a deliberate editor would), so
    the checks behind it are reached."""
    doc = json.loads(path.read_text())
    edit(doc)
    attrs = doc.get("attributes", {}).get("engram")
    if reseal and isinstance(attrs, dict) and METADATA_CHECKSUM in attrs:
        attrs[METADATA_CHECKSUM] = metadata_checksum(attrs)
    path.write_text(json.dumps(doc))


def test_missing_path_is_table_not_found(tmp_path):
    with pytest.raises(engram.TableNotFoundError, match=r"no table at path=.*nope.*build one with engram.build_table"):
        engram.open(tmp_path / "nope")


def test_directory_without_a_table_is_table_not_found(tmp_path):
    with pytest.raises(engram.TableNotFoundError, match="is not an engram table"):
        engram.open(tmp_path)
    zarr.open_group(tmp_path / "plain", mode="w", zarr_format=3)
    with pytest.raises(engram.TableNotFoundError, match="holds zarr metadata but no engram table"):
        engram.open(tmp_path / "plain")


@pytest.mark.parametrize("version", [4, 0, "1", None])
def test_unknown_format_version_is_refused(copy, version):
    rewrite_json(copy / "zarr.json", lambda d: d["attributes"]["engram"].update(format_version=version))
    with pytest.raises(engram.CorruptTableError, match=rf"format_version={version!r}, but this engram reads only "
                       r"format_version in \(1, 2, 3\): upgrade engram"):
        engram.open(copy)


def test_a_float_table_written_as_version_2_still_opens(copy):
    rewrite_json(copy / "zarr.json", lambda d: d["attributes"]["engram"].update(format_version=2))
    with engram.open(copy) as table:
        assert table.format_version == 2 and table.spec == make_spec()


def test_compressed_chunks_are_refused(copy):
    rewrite_json(copy / "layer_1" / "zarr.json",
                 lambda d: d["codecs"].append({"name": "gzip", "configuration": {"level": 1}}))
    with pytest.raises(engram.CorruptTableError, match=r"layer 1: array 'layer_1' has codecs=.*gzip.*expected"):
        engram.open(copy)


def test_checksum_count_must_match_chunks(copy):
    rewrite_json(copy / "zarr.json", lambda d: d["attributes"]["engram"]["layers"][1]["checksums"].pop())
    with pytest.raises(engram.CorruptTableError, match="layer 5: 2 chunk checksums recorded for 3 chunks"):
        engram.open(copy)


def test_damaged_compression_is_refused(copy):
    path = copy / "compression" / "c" / "0"
    lookup = np.fromfile(path, "<i8")
    lookup[[0, 2]] = lookup[[2, 0]]
    lookup.tofile(path)
    with pytest.raises(engram.CorruptTableError, match=r"compression chunk .* does not match its recorded xxh3"):
        engram.open(copy)


def test_unreadable_metadata_is_corrupt(copy):
    (copy / "layer_5" / "zarr.json").write_text("{not json")
    with pytest.raises(engram.CorruptTableError, match=r"layer 5 array metadata .* is unreadable"):
        engram.open(copy)
    os.remove(copy / "layer_5" / "zarr.json")
    with pytest.raises(engram.CorruptTableError, match=r"layer 5 array metadata .* is missing"):
        engram.open(copy)


# -- golden bytes ---------------------------------------------------------------------------
# Chunk digests of tables built with seed 0: they pin the byte layout and the seeded init (a
# change here means the same seed now builds different tables).
GOLDEN = {
    "float32": {1: ("daa9d742934106d5", "340a6d83be309fd8", "7781425d148f4b50"),
                5: ("28798b14b74a1289", "136dc64681d06e72", "1b61d642a4d16d62")},
    "bfloat16": {1: ("7f5a87129cc8866e", "3441305edd6d7f3c", "7ab6749f249d0ede")},
}


@pytest.mark.parametrize("dtype", list(GOLDEN))
def test_golden_chunk_digests(tmp_path, dtype):
    spec = make_spec() if dtype == "float32" else make_spec(dtype, head_dim=32, layer_ids=(1,))
    with engram.build_table(tmp_path / "t", spec, COMP, seed=0, chunk_rows=4096) as table:
        assert {lid: table.checksums(lid) for lid in spec.layer_ids} == GOLDEN[dtype]


# -- quantized rows: a scale array beside the values --------------------------------------
QUANT = {"int8": {}, "float8_e4m3": {"scale_block": 8}}     # D = 16: two E8M0 scales per row


def quant_spec(dtype: str) -> engram.TableSpec:
    return make_spec(layer_ids=(2,)).replace(dtype=dtype, **QUANT[dtype])


@pytest.fixture(scope="module")
def quant_tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    weights = torch.randn(quant_spec("int8").rows(2), 16, generator=torch.Generator().manual_seed(0)) * 0.05
    weights[7] = 0                                               # a zero row
    for dtype in QUANT:
        engram.build_table(root / dtype, quant_spec(dtype), COMP, weights={2: weights}).close()
    return root, weights


@pytest.mark.parametrize("dtype", list(QUANT))
def test_zarr_reads_quantized_values_and_scales(quant_tables, dtype):
    root, weights = quant_tables
    spec = quant_spec(dtype)
    group = zarr.open_group(root / dtype, mode="r")
    values, scales = group["layer_2"], group["layer_2_scales"]
    assert values.dtype == quant.STORAGE_DTYPES[dtype] and scales.dtype == quant.SCALE_DTYPES[dtype]
    assert values.shape == (spec.rows(2), 16) and scales.shape == (spec.rows(2), spec.scales_per_row)
    assert values.chunks[0] == scales.chunks[0]                       # the same row chunking
    assert scales.attrs["scales_of"] == "layer_2" and values.attrs["dtype"] == dtype
    decoded = quant.decode(values[:], scales[:], dtype, block=spec.scale_block)
    encoded = quant.encode(weights, dtype, spec.scale_block)
    np.testing.assert_array_equal(values[:], encoded.values)
    np.testing.assert_array_equal(scales[:], encoded.scales)
    with engram.open(root / dtype) as table:
        assert table.format_version == 2
        assert torch.equal(table.rows(2, np.arange(spec.rows(2))), decoded)
    assert not decoded[7].any()
    rel = (decoded - weights).norm(dim=1) / weights.norm(dim=1).clamp_min(1e-30)
    assert float(rel.max()) < (0.01 if dtype == "int8" else 0.07)


@pytest.mark.parametrize("dtype", list(QUANT))
def test_scale_chunks_are_plain_bytes_with_their_own_checksums(quant_tables, dtype):
    root, _ = quant_tables
    spec = quant_spec(dtype)
    layer = engram_attrs(root / dtype)["layers"][0]
    assert layer["scales"]["array"] == "layer_2_scales" and len(layer["scales"]["checksums"]) == len(layer["checksums"])
    assert engram_attrs(root / dtype)["format_version"] == 2
    scales = zarr.open_group(root / dtype, mode="r")["layer_2_scales"][:]
    chunk_rows = layer["chunk_rows"]
    for index, digest in enumerate(layer["scales"]["checksums"]):
        data = (root / dtype / "layer_2_scales" / "c" / str(index) / "0").read_bytes()
        assert len(data) == chunk_rows * spec.scale_row_bytes and len(data) % CHUNK_ALIGN == 0
        assert xxhash.xxh3_64_hexdigest(data) == digest
        block = np.frombuffer(data, quant.SCALE_DTYPES[dtype]).reshape(chunk_rows, spec.scales_per_row)
        start, stop = index * chunk_rows, min((index + 1) * chunk_rows, spec.rows(2))
        np.testing.assert_array_equal(block[: stop - start], scales[start:stop])
        assert not block[stop - start:].any()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["attributes"]["engram"].update(format_version=1),
     r"format_version=1, which cannot hold int8 rows \(their scales need format_version 2\)"),
    (lambda d: d["attributes"]["engram"]["layers"][0].pop("scales"),
     r"layer 2: int8 rows, but the metadata records no scale array"),
    (lambda d: d["attributes"]["engram"]["layers"][0]["scales"]["checksums"].append("0"),
     r"layer 2: 2 chunk checksums of array 'layer_2_scales' recorded for 1 chunks"),
])
def test_damaged_quantized_metadata_is_refused(quant_tables, tmp_path, edit, message):
    path = tmp_path / "t"
    shutil.copytree(quant_tables[0] / "int8", path)
    rewrite_json(path / "zarr.json", edit)
    with pytest.raises(engram.CorruptTableError, match=message):
        engram.open(path)


def test_scale_array_metadata_is_checked(quant_tables, tmp_path):
    path = tmp_path / "t"
    shutil.copytree(quant_tables[0] / "int8", path)
    rewrite_json(path / "layer_2_scales" / "zarr.json", lambda d: d.update(data_type="float16"))
    with pytest.raises(engram.CorruptTableError, match=r"array 'layer_2_scales' has data_type='float16', "
                       r"expected 'float32'"):
        engram.open(path)
    os.remove(path / "layer_2_scales" / "zarr.json")
    with pytest.raises(engram.CorruptTableError, match=r"layer 2 scale array metadata .* is missing"):
        engram.open(path)


# Seeded quantized tables (D = 32, default scale_block): digests of the value and scale chunks.
GOLDEN_QUANT = {"int8": (("e7658c262632f53d",), ("ca9a86fa94023339",)),
                "float8_e4m3": (("3103ad582e8b0f2e",), ("a83390e2094c9321",))}


@pytest.mark.parametrize("dtype", list(GOLDEN_QUANT))
def test_golden_quantized_chunk_digests(tmp_path, dtype):
    spec = make_spec(dtype, head_dim=32, layer_ids=(1,))
    with engram.build_table(tmp_path / "t", spec, COMP, seed=0) as table:
        assert (table.checksums(1), table.checksums(1, scales=True)) == GOLDEN_QUANT[dtype]
        table.verify()


def test_an_edited_scale_block_is_refused_naming_it(tmp_path):
    path = tmp_path / "fp8.engram"
    spec = make_spec().replace(dtype="float8_e4m3", scale_block=8)  # D=16: 2 scale bytes a row
    engram.build_table(path, spec, COMP, seed=1, chunk_rows=32768).close()
    rewrite_json(path / "zarr.json", lambda d: d["attributes"]["engram"]["spec"].update(scale_block=16))
    with pytest.raises(engram.CorruptTableError, match=r"scale rows of 1 B \(scale_block=16: if the spec's "
                       r"scale_block was edited, it no longer matches the stored scales\)"):
        engram.open(path)
