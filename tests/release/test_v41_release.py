"""DeepSeek-V4.1 checkpoint directories as released: the spec from config.json, rows served in place.

The checkpoint is synthetic (the `v41_release` fixture in conftest.py) but in exactly the release
layout: names, dtypes F8_E4M3 / F8_E8M0 / BF16, two shards with an index, config.json with the
fields in "text_config", tokenizer.json; tiny sizes.
"""

from __future__ import annotations

import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch

import engram
from engram import CorruptTableError, InputError, MissingFileError, SpecError, SpecMismatchError, TableSpec
from engram.making.checkpoint import open_checkpoint
from engram.release.folder import read_release
from engram.serving.hotrows import HotRowPlan

TIERS = ("ram", "mmap", "direct")
RELEASE_TEXT_CONFIG = {   # DeepSeek-V4.1-Flash's config.json, the Engram fields of its text_config
    "engram_layer_ids": [1, 14], "engram_num_embeddings": [384006168, 384016682], "engram_max_ngram_size": 4,
    "engram_n_heads": 8, "engram_head_dim": 256, "engram_vocab_size": 16000000, "engram_pad_token_id": 2,
    "engram_compressed_vocab_size": 99092, "hidden_size": 5120, "hc_mult": 4, "rms_norm_eps": 1e-6}


def token_ids(comp, B=3, T=40, seed=0):
    return np.random.default_rng(seed).integers(0, comp.vocab_size, (B, T))


def snapshot(root):
    return {os.fspath(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*"))}


def imported(ck, path):
    """The checkpoint's rows imported into an engram table (values and scales copied as stored)."""
    with open_checkpoint(ck.path) as c:
        return engram.build_table(path, ck.spec, ck.comp, weights={lid: c.rows(lid) for lid in ck.spec.layer_ids})


# -- the spec -----------------------------------------------------------------------------------
def test_the_release_config_gives_its_row_counts():
    spec = TableSpec.from_hf_config({"text_config": RELEASE_TEXT_CONFIG})
    assert (spec.rows(1), spec.rows(14)) == (384006168, 384016682)     # the primes agree with the release
    assert (spec.head_dim, spec.heads_per_layer, spec.embed_dim) == (256, 24, 6144)
    assert (spec.dtype, spec.scale_block, spec.stored_row_bytes, spec.hash, spec.seed, spec.pad_id) == \
        ("float8_e4m3", 32, 264, "multiplicative-xor", 0, 2)
    assert spec.engram_vocab_size == (16000000,) * 3 and spec.compressed_vocab_size == 99092
    renamed = {k: v for k, v in RELEASE_TEXT_CONFIG.items() if k != "engram_pad_token_id"}
    assert TableSpec.from_hf_config({**renamed, "engram_pad_id": 2}) == spec   # flat, other pad name


def test_spec_from_a_config_file_its_directory_or_a_dict(v41_release):
    ck = v41_release()
    for source in (ck.path / "config.json", ck.path, str(ck.path), ck.config):
        assert TableSpec.from_hf_config(source) == ck.spec
    assert TableSpec.from_hf_config(ck.path, compression=ck.comp) == ck.spec


def test_mismatches_name_the_field_and_both_values(v41_release):
    ck = v41_release()
    text = ck.config["text_config"]
    rows = text["engram_num_embeddings"]
    with pytest.raises(SpecMismatchError, match=rf"engram_num_embeddings\[1\]={rows[1] + 1} \(layer 14\) differs "
                                                rf"from the {rows[1]} rows .* every n-gram would land in the wrong "
                                                "row"):
        TableSpec.from_hf_config({**text, "engram_num_embeddings": [rows[0], rows[1] + 1]})
    other = engram.Compression.identity(ck.comp.vocab_size)
    with pytest.raises(SpecMismatchError, match=rf"engram_compressed_vocab_size={ck.comp.compressed_vocab_size} "
                                                rf"differs from the compression's compressed_vocab_size="
                                                rf"{other.compressed_vocab_size}"):
        TableSpec.from_hf_config(ck.config, compression=other)
    with pytest.raises(SpecError, match="config has no field 'engram_head_dim'"):
        TableSpec.from_hf_config({k: v for k, v in text.items() if k != "engram_head_dim"})
    with pytest.raises(SpecError, match=r"engram_num_embeddings=\[5\] has 1 entries but engram_layer_ids"):
        TableSpec.from_hf_config({**text, "engram_num_embeddings": [5]})
    with pytest.raises(MissingFileError, match="config file .*nowhere.json' does not exist"):
        TableSpec.from_hf_config(ck.path / "nowhere.json")


# -- rows in place ------------------------------------------------------------------------------
@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("naming, index", [("release", True), ("hf", True), ("release", False)])
def test_lookups_in_place_equal_the_imported_table(v41_release, tmp_path, tier, naming, index):
    ck = v41_release(naming, index)
    x = token_ids(ck.comp)
    with engram.open(ck.path, tier=tier) as table, imported(ck, tmp_path / "imp.engram") as built:
        assert table.spec == ck.spec and table.compression == ck.comp and table.tier == tier
        other = engram.open(tmp_path / "imp.engram", tier=tier)
        for lid in ck.spec.layer_ids:
            for dtype in (None, torch.bfloat16):
                assert torch.equal(table.lookup(x, lid, dtype=dtype), other.lookup(x, lid, dtype=dtype))
            stored = table.stored_rows(lid, np.arange(ck.spec.rows(lid)))
            assert stored.values.tobytes() == ck.rows[lid][0].tobytes()
            assert stored.scales.tobytes() == ck.rows[lid][1].tobytes()
        got, want = table.prefetch(x).result(), built.lookup(x, None)
        assert all(torch.equal(got[lid], want[lid]) for lid in ck.spec.layer_ids)
        other.close()


def test_nothing_is_copied_or_written(v41_release):
    ck = v41_release()
    before = snapshot(ck.path)
    with engram.open(ck.path, tier="mmap") as table:
        table.lookup(token_ids(ck.comp), None)
        with open("/proc/self/maps") as f:                # the rows are the shards' own pages
            mapped = {line.split()[-1] for line in f if ".safetensors" in line}
        assert {os.path.basename(p) for p in mapped} == {"model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"}
        table.verify()
    for tier in ("ram", "direct"):
        with engram.open(ck.path, tier=tier) as table:
            table.prefetch(token_ids(ck.comp)).result()
    assert snapshot(ck.path) == before


def test_prefetch_dedup_hot_rows_and_stats_work_as_on_engram_tables(v41_release):
    ck = v41_release()
    x = np.tile(token_ids(ck.comp, B=1, T=30), (4, 1))             # every row asked for four times
    with engram.open(ck.path, tier="direct") as table:
        assert table.dedup
        want = table.lookup(x, 1)
        s = table.stats()
        distinct = np.unique(engram.NgramHasher(ck.spec, ck.comp).global_rows(x, 1))
        H = ck.spec.heads_per_layer
        assert (s.rows_requested, s.rows_unique, s.rows_from_disk) == (x.size * H, distinct.size, distinct.size)
        assert s.disk_reads > 0 and s.bytes_from_disk >= distinct.size * 256
        hot = distinct[:10]
        plan = HotRowPlan(ck.spec, ck.comp.fingerprint, 120, {1: hot, 14: hot}, {1: hot * 0 + 4, 14: hot * 0 + 4})
        assert table.load_hot_rows(plan, rows=10) == {1: 10, 14: 10}
        table.reset_stats()
        assert torch.equal(table.lookup(x, 1), want)
        s = table.stats()
        assert s.rows_from_cache == 10 and s.rows_from_disk == s.rows_unique - 10 and s.cached_rows == 20
        handle = table.prefetch(x, layer_ids=1)
        assert torch.equal(handle.result(1), want) and table.stats().prefetches == 1


def test_pickles_by_path_and_refuses_chunk_file_questions(v41_release):
    ck = v41_release()
    x = token_ids(ck.comp)
    with engram.open(ck.path, tier="mmap") as table:
        again = pickle.loads(pickle.dumps(table))
        assert again.tier == "mmap" and torch.equal(again.lookup(x, 14), table.lookup(x, 14))
        again.close()
        where = table.tensors(1)
        assert (where.values.name, where.scales.name) == ("layers.1.engram.embed.weight", "layers.1.engram.embed.scale")
        assert where.values.file == "model-00001-of-00002.safetensors" and where.values.offset % 4096 != 0
        for call in (lambda: table.layout(1), lambda: table.chunk_files(1), lambda: table.checksums(1)):
            with pytest.raises(InputError, match=r"not defined for a checkpoint served in place .* use "
                                                 r"table.tensors\(layer_id\)"):
                call()


def test_open_checks_the_expected_spec_and_compression(v41_release):
    ck = v41_release()
    with pytest.raises(SpecMismatchError, match="built for another spec: dtype='float8_e4m3'"):
        engram.open(ck.path, spec=ck.spec.replace(dtype="float32"))
    engram.open(ck.path, spec=ck.spec, compression=ck.comp).close()


# -- damaged checkpoints ------------------------------------------------------------------------
def shard(ck, n):
    return ck.path / f"model-0000{n}-of-00002.safetensors"


def rewrite_header(path, edit):
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = edit(bytes(data[8:8 + n]))
    assert len(header) == n
    data[8:8 + n] = header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tier", TIERS)
def test_a_truncated_shard_is_refused_before_anything_is_mapped(v41_release, tier):
    ck = v41_release()
    os.truncate(shard(ck, 2), shard(ck, 2).stat().st_size - 100)
    with pytest.raises(CorruptTableError, match=r"model-00002-of-00002.safetensors': tensor '.*' ends at byte \d+, "
                                                r"past the end of the file .* download it again"):
        engram.open(ck.path, tier=tier)


@pytest.mark.parametrize("damage, error, message", [
    (lambda h: h.replace(b'"F8_E4M3"', b'"F8_E5M2"', 1), CorruptTableError,
     r"tensor 'layers.1.engram.embed.weight' in 'model-00001-of-00002.safetensors' is F8_E5M2 \[\d+, 256\], but "
     r"config.json gives F8_E4M3"),
    (lambda h: h.replace(b'"data_offsets":[0,', b'"data_offsets":[1,', 1), CorruptTableError,
     r"has data_offsets \[1, \d+\] \(\d+ bytes\), expected \d+ bytes"),
    (lambda h: b"[]" + b" " * (len(h) - 2), CorruptTableError, "has a header that is not a JSON object"),
    (lambda h: b"{" * len(h), CorruptTableError, "has a header that is not valid JSON"),
])
def test_an_altered_header_is_refused(v41_release, damage, error, message):
    ck = v41_release()
    rewrite_header(shard(ck, 1), damage)
    with pytest.raises(error, match=message):
        engram.open(ck.path, tier="mmap")


def test_other_damage_is_refused_with_its_cause(v41_release):
    ck = v41_release()
    data = bytearray(shard(ck, 2).read_bytes())
    shard(ck, 2).write_bytes(struct.pack("<Q", len(data)) + bytes(data[8:]))
    with pytest.raises(CorruptTableError, match=r"declares a \d+-byte header but has \d+ bytes in all"):
        engram.open(ck.path)
    ck = v41_release(naming="hf")
    shard(ck, 2).unlink()
    with pytest.raises(MissingFileError, match="checkpoint shard .*model-00002-of-00002.safetensors' does not exist"):
        engram.open(ck.path)
    ck = v41_release(index=False)
    (ck.path / "tokenizer.json").unlink()
    with pytest.raises(MissingFileError, match="has no tokenizer.json"):
        engram.open(ck.path)
    ck = v41_release(naming="hf", index=False)
    text = ck.config["text_config"]                      # a consistent config of other rows than the shards
    other = ck.spec.replace(engram_vocab_size=(97, 97))
    text.update(engram_vocab_size=97, engram_num_embeddings=[other.rows(1), other.rows(14)])
    (ck.path / "config.json").write_text(json.dumps(ck.config))
    with pytest.raises(CorruptTableError, match=rf"'model.layers.1.engram.embed.weight' .* is F8_E4M3 "
                                                rf"\[{ck.spec.rows(1)}, 256\], but config.json gives F8_E4M3 "
                                                rf"\[{other.rows(1)}, 256\]"):
        engram.open(ck.path)


@pytest.mark.parametrize("tier", ["mmap", "direct"])
def test_a_shard_truncated_after_open_is_refused_not_read(v41_release, tier):
    ck = v41_release()
    with engram.open(ck.path, tier=tier) as table:
        os.truncate(shard(ck, 1), read_release(ck.path).layers[1].values.offset + 512)
        with pytest.raises(CorruptTableError, match=r"model-00001-of-00002.safetensors'\) changed after the table "
                                                    r"was opened: its size went from \d+ to \d+ bytes"):
            table.lookup(token_ids(ck.comp), 1)


def test_verify_rereads_headers_and_finds_nan_codes(v41_release):
    ck = v41_release()
    with engram.open(ck.path, tier="mmap") as table:
        table.verify()
        values = table.tensors(14).values
    data = bytearray(shard(ck, 2).read_bytes())
    data[values.offset + 5 * 256 + 17] = 0xFF                       # an E4M3 NaN in row 5
    shard(ck, 2).write_bytes(bytes(data))
    with engram.open(ck.path, tier="mmap") as table:
        with pytest.raises(CorruptTableError, match="tensor 'layers.14.engram.embed.weight' row 5 holds a NaN code"):
            table.verify()


# -- the checkpoint reader ----------------------------------------------------------------------
@pytest.mark.parametrize("naming", ["release", "hf"])
def test_open_checkpoint_finds_both_namings_without_patterns(v41_release, naming):
    ck = v41_release(naming)
    prefix = "model." if naming == "hf" else ""
    with open_checkpoint(ck.path) as c:
        assert c.layers() == [1, 14]
        assert c.tensor_names(14) == (f"{prefix}layers.14.engram.embed.weight", f"{prefix}layers.14.engram.embed.scale")
        assert (c.dtype(1), c.block(1), c.shape(1)) == ("float8_e4m3", 32, (ck.spec.rows(1), 256))
        values, scales = c.read(14, 0, ck.spec.rows(14))
        assert values.tobytes() == ck.rows[14][0].tobytes() and scales.tobytes() == ck.rows[14][1].tobytes()


@pytest.mark.parametrize("where, code, tensor", [("values", 0x7F, "embed.weight"), ("values", 0xFF, "embed.weight"),
                                                 ("scales", 0xFF, "embed.scale")])
def test_verify_finds_each_nan_code_alone(v41_release, where, code, tensor):
    ck = v41_release()
    os.chmod(shard(ck, 2), 0o644)
    with engram.open(ck.path, tier="mmap") as table:
        t = getattr(table.tensors(14), where)
    data = bytearray(shard(ck, 2).read_bytes())
    data[t.offset + 7 * (t.nbytes // t.shape[0]) + 1] = code                  # row 7
    shard(ck, 2).write_bytes(bytes(data))
    with engram.open(ck.path, tier="mmap") as table:
        with pytest.raises(CorruptTableError, match=rf"tensor 'layers.14.engram.{tensor}' row 7 holds a NaN code"):
            table.verify()


def test_a_shard_grown_by_one_byte_is_refused(v41_release):
    ck = v41_release()
    os.chmod(shard(ck, 1), 0o644)
    size = shard(ck, 1).stat().st_size
    with engram.open(ck.path, tier="ram") as table:
        with open(shard(ck, 1), "ab") as f:
            f.write(b"\0")
        with pytest.raises(CorruptTableError, match=rf"model-00001-of-00002.safetensors' has {size + 1} bytes, but "
                                                    rf"{size} when its header was read"):
            table.verify()
    with pytest.raises(CorruptTableError, match=r"model-00001-of-00002.safetensors' has 1 bytes after its last tensor "
                                                r"ends"):
        engram.open(ck.path)
