"""Checkpoint reader: synthetic checkpoints in the V4.1 and reference layouts, read back block by block."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engram import CorruptTableError, InputError, MissingFileError, SpecMismatchError
from engram.making.checkpoint import INDEX_NAME, open_checkpoint

W = "model.layers.{}.engram.embedding.weight"
S = "model.layers.{}.engram.embedding.weight_scale_inv"
REF = "layers.{}.engram.multi_head_embedding.embedding.weight"
ROWS = {1: 3001, 14: 2003}


def fp8(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).view(torch.float8_e4m3fn)


def e8m0(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).view(torch.float8_e8m0fnu)


@pytest.fixture
def v41(tmp_path):
    """Two shards + index, V4.1 layout: layer 1's weight and scales sit in different shards."""
    rng = np.random.default_rng(0)
    data = {layer: (rng.integers(0, 256, (rows, 256), dtype=np.uint8), rng.integers(0, 256, (rows, 8), dtype=np.uint8))
            for layer, rows in ROWS.items()}
    shards = {
        "model-00001-of-00002.safetensors": {W.format(1): fp8(data[1][0]),
                                             "model.layers.1.self_attn.o_proj.weight": torch.ones(4, 4)},
        "model-00002-of-00002.safetensors": {S.format(1): e8m0(data[1][1]), W.format(14): fp8(data[14][0]),
                                             S.format(14): e8m0(data[14][1])},
    }
    for file, tensors in shards.items():
        save_file(tensors, str(tmp_path / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {name: file for file, t in shards.items() for name in t}}
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    return tmp_path, data


def read_all(ckpt, layer_id, rows_per_block):
    starts, values, scales = [], [], []
    for start, v, s in ckpt.iter_blocks(layer_id, rows_per_block):
        starts.append(start)
        values.append(v)
        scales.append(s)
    return starts, np.concatenate(values), None if scales[0] is None else np.concatenate(scales)


@pytest.mark.parametrize("how", ["directory", "index", "shards", "directory-without-index"])
def test_v41_shards_read_back_exactly(v41, how):
    root, data = v41
    shards = sorted(root.glob("*.safetensors"))
    if how == "directory-without-index":
        (root / INDEX_NAME).unlink()
    paths = {"index": root / INDEX_NAME, "shards": [str(p) for p in shards]}.get(how, root)
    with open_checkpoint(paths) as ckpt:
        assert ckpt.layers() == [1, 14]
        assert ckpt.files == tuple(shards)
        for layer, rows in ROWS.items():
            assert ckpt.shape(layer) == (rows, 256) and ckpt.dtype(layer) == "float8_e4m3" and ckpt.block(layer) == 32
            assert ckpt.tensor_names(layer) == (W.format(layer), S.format(layer))
            starts, values, scales = read_all(ckpt, layer, 512)
            assert starts == list(range(0, rows, 512))
            assert values.dtype == np.uint8 and scales.dtype == np.uint8
            assert values.tobytes() == data[layer][0].tobytes() and scales.tobytes() == data[layer][1].tobytes()


def test_row_ranges_and_uint8_scales(tmp_path):
    rng = np.random.default_rng(1)
    values, scales = rng.integers(0, 256, (100, 64), dtype=np.uint8), rng.integers(0, 256, (100, 4), dtype=np.uint8)
    path = tmp_path / "ckpt.safetensors"
    save_file({"emb.7.w": fp8(values), "emb.7.s": torch.from_numpy(scales)}, str(path))  # U8 scales, block 16
    with open_checkpoint(path, weight_pattern="emb.{layer_id}.w", scale_pattern="emb.{layer_id}.s") as ckpt:
        assert ckpt.layers() == [7] and ckpt.block(7) == 16
        got = list(ckpt.iter_blocks(7, 30, start=10, stop=75))
        assert [start for start, _, _ in got] == [10, 40, 70]
        np.testing.assert_array_equal(np.concatenate([v for _, v, _ in got]), values[10:75])
        np.testing.assert_array_equal(np.concatenate([s for _, _, s in got]), scales[10:75])
        v, s = ckpt.read(7, 99, 100)
        np.testing.assert_array_equal(v, values[99:]) and np.testing.assert_array_equal(s, scales[99:])
        assert ckpt.read(7, 5, 5)[0].shape == (0, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_format_safetensors(tmp_path, dtype):
    weights = {layer: torch.randn(rows, 64).to(dtype) for layer, rows in ((2, 700), (15, 301))}
    save_file({REF.format(k): w for k, w in weights.items()} | {"layers.2.attn.weight": torch.ones(3)},
              str(tmp_path / "model.safetensors"))
    with open_checkpoint(tmp_path / "model.safetensors") as ckpt:
        assert ckpt.layers() == [2, 15] and ckpt.block(2) is None
        assert ckpt.dtype(2) == {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
        _, values, scales = read_all(ckpt, 15, 128)
        assert scales is None
        assert values.dtype == (np.float16 if dtype == torch.float16 else np.float32)  # bfloat16 widened exactly
        assert torch.equal(torch.from_numpy(values), weights[15].to(torch.from_numpy(values).dtype))


def test_torch_save_files(tmp_path):
    rows = torch.randn(500, 32)
    values = np.random.default_rng(2).integers(0, 256, (500, 64), dtype=np.uint8)
    scales = np.random.default_rng(3).integers(0, 256, (500, 2), dtype=np.uint8)
    torch.save({"model": {REF.format(3): rows, "step": 10}}, tmp_path / "ref.pt")
    torch.save({W.format(4): fp8(values), S.format(4): e8m0(scales)}, tmp_path / "v41.pt")
    with open_checkpoint(tmp_path / "ref.pt", weight_pattern="model." + REF.replace("{}", "{layer_id}")) as ckpt:
        assert ckpt.layers() == [3] and ckpt.dtype(3) == "float32"
        _, got, _ = read_all(ckpt, 3, 64)
        assert torch.equal(torch.from_numpy(got), rows)
        got[:] = 0  # blocks are copies: the file's rows stay as they were
        assert torch.equal(torch.from_numpy(ckpt.read(3, 0, 500)[0]), rows)
    with open_checkpoint([tmp_path / "v41.pt"]) as ckpt:
        _, got_v, got_s = read_all(ckpt, 4, 99)
        assert got_v.tobytes() == values.tobytes() and got_s.tobytes() == scales.tobytes()


MEMORY_SCRIPT = textwrap.dedent("""
    import sys
    from engram.making.checkpoint import open_checkpoint

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    path, key = sys.argv[1], sys.argv[2]
    with open_checkpoint(path, weight_pattern="t.{layer_id}.w", scale_pattern="t.{layer_id}.s") as ckpt:
        blocks = ckpt.iter_blocks(0, 4096)
        next(blocks)
        base = peak = status(key)
        total = 0
        for _, values, scales in blocks:
            total += values.nbytes + scales.nbytes
            peak = max(peak, status(key))
    print(peak - base, total)
""")


def test_iterating_keeps_memory_far_below_file_size(tmp_path):
    rows = 1 << 18  # 64 MiB of FP8 rows plus 2 MiB of scales
    values = (torch.arange(rows * 256, dtype=torch.int32) % 251).to(torch.uint8).view(rows, 256)
    scales = torch.full((rows, 8), 120, dtype=torch.uint8)
    st, pt = tmp_path / "big.safetensors", tmp_path / "big.pt"
    save_file({"t.0.w": values.view(torch.float8_e4m3fn), "t.0.s": scales.view(torch.float8_e8m0fnu)}, str(st))
    torch.save({"t.0.w": values[: rows // 2].view(torch.float8_e4m3fn), "t.0.s": scales[: rows // 2]}, pt)
    del values, scales
    # safetensors: all resident memory; torch.save: anonymous memory (its map's pages are file-backed)
    for path, key, size in ((st, "VmRSS", 66 << 20), (pt, "RssAnon", 33 << 20)):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path), key], capture_output=True, text=True,
                             check=True).stdout
        growth, total = map(int, out.split())
        assert total >= size - (4096 * 264) and growth < 16 << 20, (path.name, growth, total)
        path.unlink()


# -- errors -------------------------------------------------------------------------------------


def test_missing_files_and_tensors(v41, tmp_path):
    root, _ = v41
    with pytest.raises(MissingFileError, match=r"checkpoint path '.*nope.safetensors' does not exist"):
        open_checkpoint(root / "nope.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingFileError, match=r"checkpoint directory '.*empty' holds no \*.safetensors"):
        open_checkpoint(empty)
    with open_checkpoint(root) as ckpt:
        with pytest.raises(InputError, match=r"layer_id=2: tensor 'model.layers.2.engram.embedding.weight' is not "
                                             r"in the checkpoint files \['.*model-00001-of-00002.safetensors', "
                                             r"'.*model-00002-of-00002.safetensors'\]: this checkpoint has layers "
                                             r"\[1, 14\]"):
            ckpt.shape(2)
        with pytest.raises(InputError, match=r"row range start=0, stop=3002 is invalid for layer 1 with 3001 rows"):
            ckpt.iter_blocks(1, 10, stop=3002)
        with pytest.raises(InputError, match="rows_per_block=0 is invalid"):
            ckpt.iter_blocks(1, 0)
        with pytest.raises(InputError, match=r"layer_id='1' is invalid: expected an int, one of \[1, 14\]"):
            ckpt.shape("1")
    with pytest.raises(InputError, match="this Checkpoint is closed"):
        ckpt.read(14, 0, 1)
    with open_checkpoint(root, scale_pattern="model.layers.{layer_id}.engram.scale") as ckpt:
        with pytest.raises(InputError, match=r"float8_e4m3 tensor 'model.layers.1.engram.embedding.weight' needs E8M0 "
                                             r"scales; tensor 'model.layers.1.engram.scale' is not in the checkpoint "
                                             r"files \[.*\]: pass scale_pattern="):
            ckpt.dtype(1)
    index = json.loads((root / INDEX_NAME).read_text())
    index["weight_map"][S.format(14)] = "model-00003-of-00003.safetensors"
    (root / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(MissingFileError, match=r"checkpoint shard '.*model-00003-of-00003.safetensors' named in "
                                                 r"'.*model.safetensors.index.json' does not exist"):
        open_checkpoint(root)
    (root / INDEX_NAME).write_text("{}")
    with pytest.raises(CorruptTableError, match=r"has no valid \"weight_map\""):
        open_checkpoint(root)


def test_bad_files_and_patterns(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CorruptTableError, match="'.*junk.safetensors' is not a readable safetensors file"):
        open_checkpoint(tmp_path / "junk.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="is neither safetensors nor a torch.save"):
        open_checkpoint(tmp_path / "notes.txt")
    path = tmp_path / "m.safetensors"
    zeros = fp8(np.zeros((10, 64), np.uint8))
    save_file({"a.1.weight": zeros, "a.1.weight_scale_inv": torch.zeros(10, 3, dtype=torch.uint8),
               "b.1.weight": zeros.clone(), "b.1.weight_scale_inv": torch.zeros(10, 2),
               "c.1.weight": torch.zeros(10, 4, 4)}, str(path))
    with pytest.raises(InputError, match=r"weight_pattern='a.weight' is invalid: expected a tensor name with one "
                                         r"'\{layer_id\}' placeholder"):
        open_checkpoint(path, weight_pattern="a.weight")
    with pytest.raises(InputError, match=r"no tensor in \['.*m.safetensors'\] matches weight_pattern in \["
                                         r"'layers.\{layer_id\}.engram.embed.weight', 'model.layers.*names "
                                         r"look like"):
        open_checkpoint(path)
    with open_checkpoint(path, weight_pattern="a.{layer_id}.weight") as ckpt:
        with pytest.raises(SpecMismatchError, match=r"scale tensor 'a.1.weight_scale_inv' has shape \(10, 3\), weight "
                                                    r"'a.1.weight' has shape \(10, 64\)"):
            ckpt.dtype(1)
    with open_checkpoint(path, weight_pattern="b.{layer_id}.weight") as ckpt:
        with pytest.raises(InputError, match="scale tensor 'b.1.weight_scale_inv' has dtype F32: expected E8M0"):
            ckpt.dtype(1)
    with open_checkpoint(path, weight_pattern="c.{layer_id}.weight") as ckpt:
        with pytest.raises(InputError, match=r"tensor 'c.1.weight' has dtype F32 and shape \(10, 4, 4\): expected a "
                                             r"2-D"):
            ckpt.dtype(1)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    with pytest.raises(InputError, match=r"tensor 'a.1.weight' is in both '.*m.safetensors' and '.*copy.safetensors'"):
        open_checkpoint([path, copy])


# -- into tables ----------------------------------------------------------------------------
def v41_spec(**changes):
    import engram

    # D = 256 as in DeepSeek-V4.1: 256 FP8 values + 8 E8M0 scales (blocks of 32) per row, 264 B
    spec = engram.TableSpec(engram_vocab_size=(1000, 1000), max_ngram_size=3, n_head_per_ngram=2,
                            n_embed_per_ngram=512, layer_ids=(1,), compressed_vocab_size=300, dtype="float8_e4m3")
    return spec.replace(**changes) if changes else spec


@pytest.fixture
def v41_table_checkpoint(tmp_path):
    """A V4.1-layout safetensors checkpoint for v41_spec(): arbitrary (non-NaN) E4M3 bytes and E8M0
    scales, which a decode + re-encode would not reproduce."""
    rows = v41_spec().rows(1)
    rng = np.random.default_rng(5)
    values = rng.integers(0, 256, (rows, 256), dtype=np.uint8)
    values[(values & 0x7F) == 0x7F] = 0                            # no NaN bytes
    scales = rng.integers(110, 130, (rows, 8), dtype=np.uint8)
    save_file({W.format(1): fp8(values), S.format(1): e8m0(scales)}, str(tmp_path / "model.safetensors"))
    return tmp_path / "model.safetensors", values, scales


def test_v41_rows_are_copied_into_a_table_bit_for_bit(v41_table_checkpoint, tmp_path, monkeypatch):
    import engram
    from engram.storage import quant, writer

    path, values, scales = v41_table_checkpoint
    spec, comp = v41_spec(), engram.Compression(np.arange(600) // 2)

    def no_codec(*args, **kwargs):
        raise AssertionError("FP8 checkpoint rows must be copied, not decoded and re-encoded")

    monkeypatch.setattr(writer, "encode", no_codec)
    with open_checkpoint(path) as ckpt:
        table = engram.build_table(tmp_path / "t.engram", spec, comp, weights={1: ckpt.rows(1)})
    monkeypatch.undo()
    with table:
        stored = table.stored_rows(1, np.arange(spec.rows(1)))
        assert stored.values.tobytes() == values.tobytes() and stored.scales.tobytes() == scales.tobytes()
        decoded = quant.decode(values, scales, "float8_e4m3")                    # [rows, 256] float32
        ids = np.random.default_rng(0).integers(0, 600, (2, 9))
        idx = engram.NgramHasher(spec, comp).hash(ids, 1) + np.asarray(spec.head_offsets(1))
        assert torch.equal(table.lookup(ids, 1), decoded[torch.from_numpy(idx)].reshape(2, 9, spec.embed_dim))
        table.verify()


@pytest.mark.parametrize("changes", [{"scale_block": 64}, {"dtype": "int8"}, {"dtype": "bfloat16"}])
def test_v41_rows_into_another_layout_are_decoded_then_encoded(v41_table_checkpoint, tmp_path, changes):
    import engram
    from engram.storage import quant

    path, values, scales = v41_table_checkpoint
    spec, comp = v41_spec(**changes), engram.Compression(np.arange(600) // 2)
    decoded = quant.decode(values, scales, "float8_e4m3")
    with open_checkpoint(path) as ckpt, engram.build_table(tmp_path / "t", spec, comp,
                                                           weights={1: ckpt.rows(1)}) as table:
        got = table.rows(1, np.arange(spec.rows(1)))
    if spec.quantized:
        want = quant.encode(decoded, spec.dtype, spec.scale_block)
        assert torch.equal(got, quant.decode(want.values, want.scales, spec.dtype, block=spec.scale_block))
    else:
        assert torch.equal(got, decoded.to(torch.bfloat16))
