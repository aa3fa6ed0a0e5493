"""Table: one contract suite run against every storage tier, plus lifetime, pickling, threads,
processes and integrity checks."""

from __future__ import annotations

import concurrent.futures
import functools
import gc
import multiprocessing
import os
import pickle
import shutil
import threading

import numpy as np
import pytest
import torch

import engram
from engram.dtypes import scale_dtype, storage_dtype, torch_dtype
from engram.serving import direct
from engram.storage import metadata, quant

VOCAB = 600
COMP = engram.Compression(np.arange(VOCAB) // 2)   # merges id pairs
# dtype: (D, chunk_rows, scale_block): rows of 64, 40, 80, 24 and 48 bytes (some straddle 4 KiB
# blocks), 2-5 chunks a layer. Quantized layers are larger (chunks must also hold whole 64 KiB of
# scales: 4 bytes a row here) and float8_e4m3 uses blocks of 12 values (4 E8M0 scales a row).
# int4 rows: 12 bytes of codes + 2 groups of 12 values (their 48 bits decode through the torch
# passes); int2 rows: 12 bytes + 3 groups of 16 (whole 32-bit words: the compiled loop, if numba).
DTYPES = {"float32": (16, 2048, 32), "bfloat16": (20, 8192, 32), "float16": (40, 4096, 32),
          "int8": (24, 16384, 32), "float8_e4m3": (48, 16384, 12), "int4": (24, 16384, 12), "int2": (48, 16384, 16)}
QUANTIZED = ("int8", "float8_e4m3", "int4", "int2")
TIERS = ["ram", "mmap", "mmap-prefault", "direct", "direct-buffered"]


def make_spec(dtype: str = "float32") -> engram.TableSpec:
    D, _, block = DTYPES[dtype]
    vocab = (5000, 5100) if dtype in QUANTIZED else (2000, 2100)
    return engram.TableSpec(engram_vocab_size=vocab, max_ngram_size=3, n_head_per_ngram=2,
                            n_embed_per_ngram=2 * D, layer_ids=(1, 5),
                            compressed_vocab_size=COMP.compressed_vocab_size, dtype=dtype, scale_block=block)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    out = {}
    for dtype in DTYPES:
        out[dtype] = root / f"{dtype}.engram"
        engram.build_table(out[dtype], make_spec(dtype), COMP, seed=1, chunk_rows=DTYPES[dtype][1]).close()
    return out


def test_quantized_rows_decode_as_torch_float8_does(paths):
    """The float8_e4m3 reference (quant.decode) agrees with torch's own float8 types on these rows."""
    spec = make_spec("float8_e4m3")
    values = read_array(paths["float8_e4m3"], "layer_1", np.uint8, spec.head_dim, spec.rows(1))
    scales = read_array(paths["float8_e4m3"], "layer_1_scales", np.uint8, spec.scales_per_row, spec.rows(1))
    fp8 = torch.from_numpy(values).view(torch.float8_e4m3fn).float()                  # [rows, D]
    factor = torch.from_numpy(scales).view(torch.float8_e8m0fnu).float()              # [rows, D // block]
    expected = fp8 * factor.repeat_interleave(spec.scale_block, dim=1)
    assert torch.equal(reference_rows(paths["float8_e4m3"], 1), expected)
    assert expected.abs().max() > 0 and len(list((paths["float8_e4m3"] / "layer_1" / "c").iterdir())) == 2


@pytest.fixture
def opener(request, monkeypatch):
    """open(path, **kw) for the tier under test (direct-buffered: as on filesystems without O_DIRECT)."""
    name = request.param
    if name == "direct-buffered":
        monkeypatch.setattr(direct, "_O_DIRECT", 0)

    def open_(path, **kw):
        tier = name.split("-")[0]
        return engram.open(path, tier=tier, prefault=name == "mmap-prefault", **kw)

    open_.name = name
    return open_


tiers = pytest.mark.parametrize("opener", TIERS, indirect=True)


def read_array(path, array: str, dtype: np.dtype, width: int, rows: int) -> np.ndarray:
    """One array's rows [rows, width], read straight from its chunk files with numpy."""
    files = sorted((path / array / "c").iterdir(), key=lambda p: int(p.name))
    return np.concatenate([np.fromfile(f / "0", dtype) for f in files]).reshape(-1, width)[:rows].copy()


@functools.lru_cache(maxsize=32)
def reference_rows(path, layer_id: int) -> torch.Tensor:
    """All rows of a layer from the chunk files with numpy (quantized ones decoded by quant.decode);
    read once per table and layer (tests that change a table work on a copy at another path)."""
    spec = spec_of(path)
    values = read_array(path, f"layer_{layer_id}", storage_dtype(spec.dtype), spec.value_width, spec.rows(layer_id))
    if spec.quantized:
        scales = read_array(path, f"layer_{layer_id}_scales", scale_dtype(spec.dtype), spec.scales_per_row,
                            spec.rows(layer_id))
        return quant.decode(values, scales, spec.dtype, block=spec.scale_block)
    rows = torch.from_numpy(values)
    return rows.view(torch_dtype(spec.dtype))


@functools.lru_cache(maxsize=32)
def spec_of(path) -> engram.TableSpec:
    with engram.open(path, tier="direct") as table:
        return make_spec(table.spec.dtype)


def reference_lookup(path, ids, layer_id: int) -> torch.Tensor:
    spec = spec_of(path)
    idx = engram.NgramHasher(spec, COMP).hash(np.asarray(ids), layer_id) + np.asarray(spec.head_offsets(layer_id))
    B, T = idx.shape[:2]
    return reference_rows(path, layer_id)[torch.from_numpy(idx)].reshape(B, T, spec.embed_dim)


def token_ids(seed: int, shape=(3, 37)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape)


# -- the contract, per tier ---------------------------------------------------------------
@tiers
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_lookup_returns_the_addressed_rows(paths, opener, dtype, lookup_path):
    ids = token_ids(0)
    expected = reference_lookup(paths[dtype], ids, 5)
    with opener(paths[dtype]) as table:
        result = table.lookup(ids, 5)
        assert result.shape == (3, 37, make_spec(dtype).embed_dim) and result.dtype == torch_dtype(dtype)
        assert torch.equal(result, expected)
        assert torch.equal(table.lookup(torch.from_numpy(ids).to(torch.int32), 5), expected)
        assert torch.equal(engram.lookup(ids.tolist(), table, 5), expected)


@tiers
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_rows_returns_raw_rows(paths, opener, dtype):
    spec = make_spec(dtype)
    expected = reference_rows(paths[dtype], 1)
    with opener(paths[dtype]) as table:
        assert torch.equal(table.rows(1, np.arange(spec.rows(1))), expected)
        pick = np.random.default_rng(1).integers(0, spec.rows(1), 500)
        pick[:3] = [0, spec.rows(1) - 1, 0]                      # ends and a duplicate
        assert torch.equal(table.rows(1, pick), expected[torch.from_numpy(pick)])
        assert table.rows(1, []).shape == (0, spec.head_dim)


@tiers
def test_every_layer_at_once(paths, opener, lookup_path):
    ids = token_ids(2)
    with opener(paths["float32"]) as table:
        result = table.lookup(ids, None)
        assert list(result) == [1, 5]
        for layer_id, rows in result.items():
            assert torch.equal(rows, reference_lookup(paths["float32"], ids, layer_id))


@tiers
def test_out_and_dtype(paths, opener, lookup_path):
    ids = token_ids(3)
    expected = reference_lookup(paths["bfloat16"], ids, 1)
    with opener(paths["bfloat16"]) as table:
        out = torch.empty(3, 37, table.spec.embed_dim, dtype=torch.bfloat16)
        assert table.lookup(ids, 1, out=out) is out and torch.equal(out, expected)
        assert torch.equal(table.lookup(ids, 1, dtype=torch.float32), expected.float())
        out32 = torch.empty(3, 37, table.spec.embed_dim)
        assert table.lookup(ids, 1, out=out32, dtype=torch.float32) is out32
        assert torch.equal(out32, expected.float())


@tiers
def test_empty_batch(paths, opener):
    with opener(paths["float32"]) as table:
        assert table.lookup(np.zeros((2, 0), np.int64), 1).shape == (2, 0, table.spec.embed_dim)
        assert table.lookup(np.zeros((0, 5), np.int64), 1).shape == (0, 5, table.spec.embed_dim)


@tiers
def test_lookups_from_many_threads(paths, opener):
    path = paths["float16"]
    batches = [token_ids(seed, (2, 50)) for seed in range(6)]
    expected = [reference_lookup(path, ids, 5) for ids in batches]
    failures = []
    with opener(path) as table:
        def work(i: int) -> None:
            for _ in range(5):
                if not torch.equal(table.lookup(batches[i], 5), expected[i]):
                    failures.append(i)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []


@tiers
def test_closed_table_refuses_lookups(paths, opener):
    with opener(paths["float32"]) as table:
        assert not table.closed
    assert table.closed
    table.close()                                   # idempotent
    with pytest.raises(engram.InputError, match=r"table at .*float32.engram' is closed: open it again"):
        table.lookup(token_ids(0), 1)
    with pytest.raises(engram.InputError, match="is closed"):
        table.rows(1, [0])
    assert "closed" in repr(table)


@tiers
def test_pickles_by_path_and_tier(paths, opener):
    ids = token_ids(4)
    with opener(paths["float32"]) as table:
        data = pickle.dumps(table)
        assert len(data) < 1000                   # never the rows
        with pickle.loads(data) as copy:
            assert (copy.path, copy.tier) == (table.path.absolute(), table.tier)
            assert torch.equal(copy.lookup(ids, 1), table.lookup(ids, 1))


def check_damaged_chunk_is_refused(opener, source, tmp_path, array: str, truncated: str, missing: str) -> None:
    """Chunk 1 of `array` (layer 5) cut 4 KiB short, then removed: opening refuses both, matching
    `truncated` and then `missing`."""
    path = tmp_path / "t.engram"
    shutil.copytree(source, path)
    chunk = path / array / "c" / "1" / "0"
    os.truncate(chunk, os.path.getsize(chunk) - 4096)
    with pytest.raises(engram.CorruptTableError, match=truncated):
        opener(path)
    os.remove(chunk)
    with pytest.raises(engram.CorruptTableError, match=missing):
        opener(path)


@tiers
def test_truncated_or_missing_chunk_is_an_error_at_open(paths, opener, tmp_path):
    check_damaged_chunk_is_refused(
        opener, paths["float32"], tmp_path, "layer_5",
        r"layer 5 chunk 1 \(.*layer_5/c/1/0'\) has 126976 bytes, expected 131072: the table is damaged",
        r"layer 5 chunk 1 .* is missing")


@tiers
def test_verify_checks_every_chunk(paths, opener, tmp_path):
    path = tmp_path / "t.engram"
    shutil.copytree(paths["float32"], path)
    with opener(path) as table:
        table.verify()
    for name in ("layer_1/c/0/0", "layer_5/c/1/0"):
        with open(path / name, "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 1]))
    if opener.name == "ram":
        with pytest.raises(engram.CorruptTableError, match=r"layer 1 chunk 0 .* has xxh3 \w+, recorded"):
            opener(path)                            # ram checks every chunk while loading
        return
    with opener(path) as table:
        with pytest.raises(engram.CorruptTableError, match=r"layer 1 chunk 0 .* has xxh3 \w+, recorded \w+ "
                           r"\(its contents changed\): .* \(1 more bad chunks\)"):
            table.verify(progress=False)


def test_processes_share_a_table(paths):
    ids = token_ids(5)
    expected = reference_lookup(paths["float32"], ids, 1)
    tables = [engram.open(paths["float32"], tier=tier) for tier in ("ram", "mmap", "direct")]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool:
        futures = [pool.submit(engram.lookup, ids, table, 1) for table in tables for _ in range(2)]
        results = [f.result() for f in futures]
    for table in tables:
        table.close()
    assert all(torch.equal(result, expected) for result in results)


# -- the same rows through every gather path: tier x {no cache, cache} x dedup --------------
@pytest.fixture(scope="module")
def plans():
    """Per dtype, a hot-row plan counted on a corpus that holds the test batches and more."""
    corpus = [token_ids(seed, (1, 200))[0] for seed in range(40)]
    return {dtype: engram.corpus_stats(corpus, make_spec(dtype), COMP).hot_row_plan() for dtype in DTYPES}


@tiers
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "float8_e4m3"])
@pytest.mark.parametrize("dedup", [None, True, False])
@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
def test_every_gather_path_returns_the_addressed_rows(paths, plans, opener, dtype, dedup, cached, lookup_path):
    ids = np.concatenate([token_ids(3, (2, 40)), token_ids(3, (2, 40))[:, :25]], axis=1)   # repeats n-grams
    with opener(paths[dtype], dedup=dedup) as table:
        assert table.dedup == (opener.name.startswith("direct") if dedup is None else dedup)
        if cached:
            loaded = table.load_hot_rows(plans[dtype], fraction=0.3)
            assert set(loaded) == {1, 5} and all(n > 0 for n in loaded.values())
        for layer_id, rows in table.lookup(ids, None).items():
            assert torch.equal(rows, reference_lookup(paths[dtype], ids, layer_id))
        assert torch.equal(table.prefetch(ids, layer_ids=5).result(5), reference_lookup(paths[dtype], ids, 5))
        pick = np.random.default_rng(2).integers(0, table.spec.rows(1), 300)
        assert torch.equal(table.rows(1, pick), reference_rows(paths[dtype], 1)[torch.from_numpy(pick)])
        stats = table.stats()
        assert stats.rows_from_cache + stats.rows_from_memory + stats.rows_from_disk == stats.rows_unique
        assert (stats.rows_unique < stats.rows_requested) == table.dedup
        assert (0 < stats.rows_from_cache < stats.rows_unique) == cached


# -- outputs are never overwritten while referenced -----------------------------------------
def test_results_are_recycled_only_when_unreferenced(paths):
    ids_a, ids_b = token_ids(6), token_ids(7)
    want_a, want_b = reference_lookup(paths["float32"], ids_a, 1), reference_lookup(paths["float32"], ids_b, 1)
    with engram.open(paths["float32"]) as table:
        a = table.lookup(ids_a, 1)
        ptr_a = a.data_ptr()
        b = table.lookup(ids_b, 1)
        assert b.data_ptr() != ptr_a and torch.equal(a, want_a)
        del a
        c = table.lookup(ids_b, 1)                  # a's memory is free again: reused
        assert c.data_ptr() == ptr_a
        view = c[1]
        del c
        d = table.lookup(ids_a, 1)                  # c lives on in `view`: d gets other memory
        assert d.data_ptr() not in (ptr_a, b.data_ptr())
        assert torch.equal(view, want_b[1]) and torch.equal(b, want_b) and torch.equal(d, want_a)


def test_results_saved_for_backward_are_not_overwritten(paths):
    ids_a, ids_b = token_ids(8), token_ids(9)
    with engram.open(paths["float32"]) as table:
        weight = torch.randn(table.spec.embed_dim, 3, requires_grad=True)
        e = table.lookup(ids_a, 1)
        loss = (e @ weight).sum()                   # autograd keeps `e` for weight's gradient
        twin = weight.detach().clone().requires_grad_()
        (e.clone() @ twin).sum().backward()
        del e
        for _ in range(3):
            table.lookup(ids_b, 1)
        loss.backward()
        assert torch.equal(weight.grad, twin.grad)


def test_row_views_survive_close(paths):
    # The mapping is released only once nothing refers to it: a view held past close stays valid.
    table = engram.open(paths["float32"], tier="mmap")
    rows = table._tier.weights[1]
    table.close()
    assert torch.equal(rows, reference_rows(paths["float32"], 1))
    del rows
    gc.collect()


def test_direct_reads_split_into_small_extents_and_windows(paths, monkeypatch):
    monkeypatch.setattr(direct, "EXTENT_BYTES", 8192)
    monkeypatch.setattr(direct, "STAGE_BYTES", 3 * 8192)
    spec = make_spec("float16")
    with engram.open(paths["float16"], tier="direct", io_threads=3) as table:
        assert torch.equal(table.rows(5, np.arange(spec.rows(5))), reference_rows(paths["float16"], 5))


def test_open_reads_one_table_even_if_the_path_is_swapped_meanwhile(paths, tmp_path, monkeypatch):
    # Another table replaces the path between reading the metadata and opening the chunk files.
    path, other = tmp_path / "t.engram", tmp_path / "other.engram"
    shutil.copytree(paths["float32"], path)
    engram.build_table(other, make_spec(), COMP, seed=99, chunk_rows=2048).close()
    expected = reference_rows(paths["float32"], 1)
    real = metadata.read_metadata

    def read_then_swap(tdir):
        meta = real(tdir)
        os.rename(path, tmp_path / "old.engram")
        os.rename(other, path)
        return meta

    monkeypatch.setattr(metadata, "read_metadata", read_then_swap)
    with engram.open(path, tier="ram") as table:     # "ram" checks every chunk against the metadata
        assert torch.equal(table.rows(1, np.arange(table.spec.rows(1))), expected)


# -- refusals -----------------------------------------------------------------------------
def test_open_checks_the_expected_spec_and_compression(paths):
    path = paths["float32"]
    engram.open(path, spec=make_spec(), compression=COMP).close()
    with pytest.raises(engram.SpecMismatchError, match=r"built for another spec: seed=0 \(expected 7\)"):
        engram.open(path, spec=make_spec().replace(seed=7))
    with pytest.raises(engram.SpecMismatchError, match="built with another compression"):
        engram.open(path, compression=engram.Compression.identity(300))


def test_bad_arguments(paths):
    path = paths["float32"]
    with pytest.raises(engram.InputError, match=r"tier='disk' is not a storage tier: expected one of \('ram', "):
        engram.open(path, tier="disk")
    with pytest.raises(engram.InputError, match="io_threads=0 is invalid"):
        engram.open(path, tier="direct", io_threads=0)
    with engram.open(path) as table:
        E = table.spec.embed_dim
        with pytest.raises(engram.InputError, match=r"token_ids must be shaped \[B, T\]"):
            table.lookup(np.arange(5), 1)
        with pytest.raises(engram.InputError, match="token_ids must be integers"):
            table.lookup(np.zeros((2, 3)), 1)
        with pytest.raises(engram.TokenIdError, match=r"token_ids holds id 600, outside \[0, 600\)"):
            table.lookup(np.full((1, 2), VOCAB), 1)
        with pytest.raises(engram.InputError, match=r"layer_id=3 has no table"):
            table.lookup(token_ids(0), 3)
        with pytest.raises(engram.InputError, match=r"out has shape \(3, 37\), .* expected a contiguous CPU "
                           rf"tensor of shape \(3, 37, {E}\)"):
            table.lookup(token_ids(0), 1, out=torch.empty(3, 37))
        with pytest.raises(engram.InputError, match=r"dtype=torch.int64 is invalid: expected a floating-point"):
            table.lookup(token_ids(0), 1, dtype=torch.int64)
        with pytest.raises(engram.InputError, match="out= needs one layer_id"):
            table.lookup(token_ids(0), None, out=torch.empty(3, 37, E))
        with pytest.raises(engram.InputError, match=r"row_indices holds -1, outside \[0, 8238\) for layer 1"):
            table.rows(1, [0, -1])
        with pytest.raises(engram.InputError, match="row_indices must be 1-D"):
            table.rows(1, [[0]])
        with pytest.raises(engram.InputError, match="table must be an engram.Table, got str"):
            engram.lookup(token_ids(0), str(path), 1)


def test_table_describes_its_storage(paths):
    with engram.open(paths["float32"], tier="direct") as table:
        lay = table.layout(1)
        assert (table.format_version, table.tier, table.dtype) == (1, "direct", torch.float32)
        assert table.spec == make_spec() and table.compression == COMP
        assert lay.n_chunks == len(table.checksums(1)) == len(table.chunk_files(1))
        assert all(f.stat().st_size == lay.chunk_bytes for f in table.chunk_files(1))
        assert table.nbytes == make_spec().total_bytes
        assert repr(table).startswith("Table(path=") and "tier='direct'" in repr(table)


# -- quantized tables -----------------------------------------------------------------------
@tiers
@pytest.mark.parametrize("dtype", QUANTIZED)
def test_quantized_lookup_dtypes_and_out(paths, opener, dtype, lookup_path):
    ids = token_ids(10)
    expected = reference_lookup(paths[dtype], ids, 5)                       # float32, decoded
    E = make_spec(dtype).embed_dim
    with opener(paths[dtype]) as table:
        assert table.dtype == torch.float32
        assert torch.equal(table.lookup(ids, 5), expected)
        bf16 = table.lookup(ids, 5, dtype=torch.bfloat16)                   # decoded straight into bfloat16
        assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, expected.to(torch.bfloat16))
        out = torch.empty(3, 37, E, dtype=torch.bfloat16)
        assert table.lookup(ids, 5, out=out, dtype=torch.bfloat16) is out and torch.equal(out, bf16)
        out32 = torch.empty(3, 37, E)
        assert table.lookup(ids, 5, out=out32) is out32 and torch.equal(out32, expected)
        half = table.lookup(ids, 5, dtype=torch.float16)
        assert half.dtype == torch.float16 and torch.equal(half, expected.half())
        every = table.prefetch(ids, dtype=torch.bfloat16).result()
        assert torch.equal(every[5], bf16) and torch.equal(every[1].float(), reference_lookup(paths[dtype], ids, 1)
                                                           .to(torch.bfloat16).float())
        pick = np.array([0, table.spec.rows(1) - 1, 77, 77])
        assert torch.equal(table.rows(1, pick, dtype=torch.bfloat16),
                           reference_rows(paths[dtype], 1)[torch.from_numpy(pick)].to(torch.bfloat16))


@tiers
@pytest.mark.parametrize("dtype", ["bfloat16", *QUANTIZED])
def test_stored_rows_are_the_bytes_on_disk(paths, opener, dtype):
    spec = make_spec(dtype)
    values = read_array(paths[dtype], "layer_5", storage_dtype(dtype), spec.value_width, spec.rows(5))
    pick = np.random.default_rng(3).integers(0, spec.rows(5), 200)
    with opener(paths[dtype]) as table:
        q = table.stored_rows(5, pick)
        assert (q.dtype, q.block) == (dtype, spec.scale_block)
        np.testing.assert_array_equal(q.values, values[pick])
        if spec.quantized:
            scales = read_array(paths[dtype], "layer_5_scales", scale_dtype(dtype), spec.scales_per_row, spec.rows(5))
            np.testing.assert_array_equal(q.scales, scales[pick])
        else:
            assert q.scales is None
        assert torch.equal(quant.decode(q.values, q.scales, dtype, block=q.block, out_dtype=torch.float32),
                           table.rows(5, pick).float())


@tiers
def test_truncated_or_missing_scale_chunk_is_an_error_at_open(paths, opener, tmp_path):
    check_damaged_chunk_is_refused(
        opener, paths["int8"], tmp_path, "layer_5_scales",
        r"layer 5 scales \(array 'layer_5_scales'\) chunk 1 \(.*layer_5_scales/c/1/0'\) has 61440 bytes, "
        r"expected 65536: the table is damaged",
        r"layer 5 scales \(array 'layer_5_scales'\) chunk 1 .* is missing")


@tiers
def test_verify_checks_scale_chunks(paths, opener, tmp_path):
    path = tmp_path / "t.engram"
    shutil.copytree(paths["float8_e4m3"], path)
    with open(path / "layer_1_scales" / "c" / "1" / "0", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    problem = r"layer 1 scales \(array 'layer_1_scales'\) chunk 1 .* has xxh3 \w+, recorded \w+"
    if opener.name in ("ram", "direct", "direct-buffered"):          # scales are read and checked at open
        with pytest.raises(engram.CorruptTableError, match=problem):
            opener(path)
        return
    with opener(path) as table:
        with pytest.raises(engram.CorruptTableError, match=problem + r" \(its contents changed\)"):
            table.verify(progress=False)


def test_quantized_table_describes_its_storage(paths):
    spec = make_spec("float8_e4m3")
    with engram.open(paths["float8_e4m3"], tier="direct") as table:
        lay = table.layout(1)
        assert (table.format_version, table.dtype) == (2, torch.float32)
        assert lay.scales.array == "layer_1_scales" and lay.scales.chunk_rows == lay.chunk_rows
        assert table.nbytes == spec.total_bytes == spec.total_rows * (48 + 4)
        files = table.chunk_files(1, scales=True)
        assert len(files) == len(table.checksums(1, scales=True)) == lay.n_chunks == 2
        assert all(f.stat().st_size == lay.chunk_rows * 4 for f in files)
    with engram.open(paths["float32"]) as table, pytest.raises(engram.InputError, match="stores no scales"):
        table.checksums(1, scales=True)
