"""The "mmap" tier serves only checked bytes: each 4 KiB block (each chunk file, for scales and tables
without block digests) is checked against its recorded digest the first time a row in it is served,
on the batched and the compiled path; a chunk file touched under an open table is served on
(checked again), one rewritten in place is refused (engram.serving.verified, ChunkWatch)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

import engram
from engram.serving import compiled
from engram.storage import chunks

from .damage import drop_block_digests, flip_bit

COMP = engram.Compression.identity(200)
SPEC = engram.TableSpec(engram_vocab_size=(3000, 3000), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=16,
                        layer_ids=(1, 2), compressed_vocab_size=200)
PER_BLOCK = 128                   # float32, D=8: 32-byte rows, 128 to a 4 KiB block; 2048 rows (16 blocks) per chunk


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmap-checks")
    out = {}
    out["float32"] = root / "float32.engram"
    engram.build_table(out["float32"], SPEC, COMP, seed=4, chunk_rows=2048).close()
    out["int8"] = root / "int8.engram"                       # 8-byte rows, 4-byte scales: 3 chunks of 16384 rows
    engram.build_table(out["int8"], SPEC.replace(dtype="int8", engram_vocab_size=(10000, 10000)), COMP, seed=4,
                       chunk_rows=16384).close()
    return out


def copy_of(built, tmp_path, dtype="float32"):
    path = tmp_path / f"{dtype}.engram"
    shutil.copytree(built[dtype], path)
    return path


def damage_every_row(path, layer: int = 1) -> None:
    for chunk in sorted((path / f"layer_{layer}" / "c").iterdir()):       # a bit of every 32-byte row
        data = np.fromfile(chunk / "0", np.uint8)
        data[1::32] ^= 0x10
        os.chmod(chunk / "0", 0o644)
        data.tofile(chunk / "0")


def reference(built, dtype="float32", layer=1):
    with engram.open(built[dtype], tier="ram") as t:
        return t.rows(layer, np.arange(t.spec.rows(layer)))


def test_a_block_damaged_before_open_is_refused_on_first_serve_and_the_rest_served(built, tmp_path, lookup_path):
    path = copy_of(built, tmp_path)
    flip_bit(path / "layer_1" / "c" / "1" / "0", 5 * 4096 + 7)            # chunk 1, block 5
    expected = reference(built)
    with engram.open(path, tier="mmap") as t:
        with pytest.raises(engram.CorruptTableError, match=r"layer 1 chunk 1 .*layer_1/c/1/0.* block 5 \(bytes "
                                                           r"20480-24575\) has xxh3 \w{16}, recorded \w{16}"):
            t.rows(1, np.array([2048 + 5 * PER_BLOCK + 3]))
        with pytest.raises(engram.CorruptTableError, match=r"block 5"):              # and at every later lookup
            t.lookup(np.random.default_rng(0).integers(0, 200, (4, 512)), 1)         # touches every block
        fine = np.setdiff1d(np.arange(SPEC.rows(1)), 2048 + 5 * PER_BLOCK + np.arange(PER_BLOCK))
        assert torch.equal(t.rows(1, fine), expected[fine])
        checks = t._tier.checks[1]
        served = (SPEC.rows(1) - 1) // PER_BLOCK + 1                            # blocks holding rows (then padding)
        assert checks.verified[:served].sum() == served - 1 and checks.verified[16 + 5] == 0
        for ids in np.random.default_rng(1).integers(0, 200, (40, 1, 1)):            # decode steps
            try:
                got = t.lookup(ids, 1)
            except engram.CorruptTableError as exc:
                assert "block 5" in str(exc)
                continue
            with engram.open(built["float32"], tier="ram") as ref:
                assert torch.equal(got, ref.lookup(ids, 1))


def test_small_lookups_on_the_compiled_path_never_copy_a_damaged_block(built, tmp_path):
    """Every block of layer 1 damaged: every decode step of layer 1 is refused, on the compiled path
    too (its kernel tests each row's unit); layer 2 is served, from the kernel once its blocks are checked."""
    path = copy_of(built, tmp_path)
    damage_every_row(path)
    ids = np.random.default_rng(2).integers(0, 200, (1, 1))
    with engram.open(path, tier="mmap") as t, engram.open(built["float32"], tier="ram") as ref:
        for _ in range(2):
            with pytest.raises(engram.CorruptTableError, match=r"layer 1 chunk \d+ .* block \d+"):
                t.lookup(ids, 1)
        for _ in range(2):
            assert torch.equal(t.lookup(ids, 2), ref.lookup(ids, 2))
        with engram.open(path, tier="mmap", verify_reads=False) as unchecked:       # the opt-out serves them
            assert not torch.equal(unchecked.lookup(ids, 1), ref.lookup(ids, 1))
            assert unchecked._tier.checks == {}


@pytest.mark.skipif(not compiled.COMPILED, reason="the compiled path needs numba (the 'fast' extra)")
def test_the_compiled_path_copies_rows_once_their_blocks_are_checked(built, monkeypatch):
    calls = []
    real = compiled.step_gather

    def spy(*args):
        calls.append(real(*args))
        return calls[-1]
    from engram.serving import decode_step
    monkeypatch.setattr(decode_step.compiled, "step_gather", spy)
    ids = np.random.default_rng(3).integers(0, 200, (1, 1))
    with engram.open(built["float32"], tier="mmap") as t, engram.open(built["float32"], tier="ram") as ref:
        first = t.lookup(ids, 1)                  # the kernel stops at an unchecked unit: the checked path
        again = t.lookup(ids, 1)                  # now from the kernel
        assert calls[0] == compiled.UNVERIFIED and calls[-1] >= 0
        assert torch.equal(first, ref.lookup(ids, 1)) and torch.equal(again, first)


def test_a_table_without_block_digests_and_scales_are_checked_a_chunk_file_at_a_time(built, tmp_path):
    path = copy_of(built, tmp_path, "int8")
    drop_block_digests(path)
    flip_bit(path / "layer_1" / "c" / "1" / "0", 100)                          # values, chunk 1
    flip_bit(path / "layer_2_scales" / "c" / "0" / "0", 9)                     # scales, chunk 0
    with engram.open(path, tier="mmap") as t:
        assert t._tier.checks[1].unit == t.layout(1).chunk_bytes
        with pytest.raises(engram.CorruptTableError, match=r"layer 1 chunk 1 .* has xxh3 \w{16}, recorded \w{16}: "
                                                           r"its contents changed"):
            t.rows(1, np.array([16384 + 12]))
        with pytest.raises(engram.CorruptTableError, match=r"layer 2 scales \(array 'layer_2_scales'\) chunk 0"):
            t.rows(2, np.array([2]))
        with engram.open(built["int8"], tier="ram") as ref:
            for layer, rows in ((1, np.arange(16384)), (2, np.arange(16384, 32768))):
                assert torch.equal(t.rows(layer, rows), ref.rows(layer, rows))


@pytest.mark.parametrize("compiled_checks", [True, False])
def test_rows_that_span_blocks_check_every_block_they_touch(tmp_path, monkeypatch, compiled_checks):
    """48-byte rows straddle block boundaries, 8 KiB rows span two whole blocks: a damaged block
    refuses every row with a byte in it, whether the first, middle or last block of the row."""
    if compiled_checks and not compiled.COMPILED:
        pytest.skip("needs numba")
    monkeypatch.setattr(compiled, "COMPILED", compiled_checks)
    for embed, vocab, chunk_rows, offset in ((24, 3000, 4096, 4096 + 5), (4096, 100, 64, 3 * 4096 + 1)):
        spec = SPEC.replace(n_embed_per_ngram=embed, engram_vocab_size=(vocab, vocab))   # D = 12 (48 B), 2048 (8 KiB)
        path = tmp_path / f"{embed}.engram"
        engram.build_table(path, spec, COMP, seed=1, chunk_rows=chunk_rows).close()
        rows = np.arange(chunk_rows)                                          # chunk 0
        with engram.open(path, tier="ram") as ref:
            expected = ref.rows(1, rows)
        flip_bit(path / "layer_1" / "c" / "0" / "0", offset)
        row_bytes = spec.head_dim * 4
        bad = offset // 4096 * 4096
        hit = [r for r in rows if r * row_bytes < bad + 4096 and bad < (r + 1) * row_bytes]
        assert hit
        with engram.open(path, tier="mmap") as t:
            for r in hit:
                with pytest.raises(engram.CorruptTableError, match=rf"block {bad // 4096} "):
                    t.rows(1, np.array([r]))
            fine = np.setdiff1d(rows, hit)
            assert torch.equal(t.rows(1, fine), expected[fine])


def test_verify_reads_must_be_a_bool(built):
    with pytest.raises(engram.InputError, match=r"verify_reads=1 is invalid: expected True"):
        engram.open(built["float32"], verify_reads=1)


# -- a chunk file changed under an open table ------------------------------------------------------------------
@pytest.mark.parametrize("tier,verify_reads", [("mmap", True), ("mmap", False), ("direct", True), ("direct", False)])
def test_a_touched_chunk_file_is_served_on_and_a_rewritten_one_refused(built, tmp_path, tier, verify_reads):
    path = copy_of(built, tmp_path)
    expected = reference(built)
    everything = np.arange(SPEC.rows(1))
    chunk = path / "layer_1" / "c" / "1" / "0"
    with engram.open(path, tier=tier, verify_reads=verify_reads) as t:
        assert torch.equal(t.rows(1, everything), expected)                    # every block checked and served
        os.utime(chunk, ns=(1, 1))                                              # a backup tool's touch
        assert torch.equal(t.rows(1, everything), expected)
        ids = np.random.default_rng(4).integers(0, 200, (1, 1))
        with engram.open(built["float32"], tier="ram") as ref:
            assert torch.equal(t.lookup(ids, 1), ref.lookup(ids, 1))            # a decode step, too
        flip_bit(chunk, 3 * 4096 + 1)                                           # same size, other bytes
        if verify_reads:           # the chunk's blocks are checked again: the changed one is refused
            message = r"layer 1 chunk 1 .* block 3 \(bytes 12288-16383\) has xxh3"
        else:                      # nothing checks reads: the whole file is compared once, and refused for good
            message = r"layer 1 chunk 1 .* changed after the table was opened: it was rewritten in place"
        for _ in range(2):
            with pytest.raises(engram.CorruptTableError, match=message):
                t.rows(1, np.array([2048 + 3 * PER_BLOCK]))
        if verify_reads:                                                        # the other chunks: served
            fine = np.r_[0:2048, 4096:SPEC.rows(1)]
            assert torch.equal(t.rows(1, fine), expected[fine])
        else:
            with pytest.raises(engram.CorruptTableError, match=message):
                t.rows(1, everything[:10])


@pytest.mark.parametrize("tier", ["mmap", "direct"])
def test_a_touched_file_is_compared_once_not_at_every_lookup(built, tmp_path, monkeypatch, tier):
    """Without inotify every gather stats every file: after a touch the file is compared once (its
    new modification time recorded), not at each later gather."""
    path = copy_of(built, tmp_path)
    compared = []
    real = chunks.check_chunk
    monkeypatch.setattr(chunks, "check_chunk", lambda *a, **k: compared.append(a[2]) or real(*a, **k))
    with engram.open(path, tier=tier, verify_reads=False) as t:
        t._tier.watch._notify = None                                  # as on systems without inotify
        os.utime(path / "layer_2" / "c" / "0" / "0", ns=(5, 5))
        for _ in range(3):
            t.rows(2, np.arange(100))
        assert compared == [0]


def test_a_table_truncated_under_a_reader_is_still_refused_for_good(built, tmp_path):
    path = copy_of(built, tmp_path)
    with engram.open(path, tier="mmap") as t:
        t.rows(1, np.arange(10))
        chunk = path / "layer_1" / "c" / "0" / "0"
        os.chmod(chunk, 0o644)
        os.truncate(chunk, 4096)
        for _ in range(2):
            with pytest.raises(engram.CorruptTableError, match=r"its size went from 65536 to 4096 bytes"):
                t.rows(2, np.arange(10))


def test_a_pickled_table_reopens_with_its_checks_on_or_off(built):
    import pickle

    for verify_reads in (True, False):
        with engram.open(built["float32"], tier="mmap", verify_reads=verify_reads) as t:
            with pickle.loads(pickle.dumps(t)) as again:
                assert bool(again._tier.checks) == verify_reads


def test_every_layer_and_other_dtypes_on_the_compiled_path_are_checked_too(built, tmp_path):
    path = copy_of(built, tmp_path)
    damage_every_row(path)
    ids = np.random.default_rng(5).integers(0, 200, (1, 1))
    with engram.open(path, tier="mmap") as t:
        for _ in range(2):
            for call in (lambda: t.lookup(ids, None), lambda: t.lookup(ids, 1, dtype=torch.float64)):
                with pytest.raises(engram.CorruptTableError, match=r"layer 1 chunk \d+ .* block \d+"):
                    call()


def test_a_row_whose_first_block_is_checked_and_last_is_not_is_checked(tmp_path, monkeypatch):
    """48-byte rows: row 85 (bytes 4080-4127) starts in block 0 and ends in block 1."""
    monkeypatch.setattr(compiled, "COMPILED", False)                         # the numpy checks
    spec = SPEC.replace(n_embed_per_ngram=24)
    path = tmp_path / "t.engram"
    engram.build_table(path, spec, COMP, seed=1, chunk_rows=4096).close()
    flip_bit(path / "layer_1" / "c" / "0" / "0", 4096 + 5)
    with engram.open(path, tier="mmap") as t:
        t.rows(1, np.array([0]))                                             # block 0 checked
        for _ in range(2):
            with pytest.raises(engram.CorruptTableError, match=r"chunk 0 .* block 1 "):
                t.rows(1, np.array([85]))


def test_a_layer_of_one_unit_is_checked(built, tmp_path):
    """One chunk file and no block digests: one unit for the whole layer, checked like any other."""
    path = tmp_path / "t.engram"
    engram.build_table(path, SPEC, COMP, seed=4, chunk_rows=1 << 16).close()
    drop_block_digests(path)
    flip_bit(path / "layer_1" / "c" / "0" / "0", 100)
    ids = np.random.default_rng(6).integers(0, 200, (1, 1))
    with engram.open(path, tier="mmap") as t:
        assert t._tier.checks[1].verified.size == 1
        for _ in range(2):
            with pytest.raises(engram.CorruptTableError, match=r"layer 1 chunk 0 "):
                t.lookup(ids, 1)


def test_a_scale_file_rewritten_after_it_was_served_is_refused(built, tmp_path):
    path = copy_of(built, tmp_path, "int8")
    with engram.open(path, tier="mmap") as t:
        t.rows(2, np.arange(100))                                            # scales chunk 0 checked
        flip_bit(path / "layer_2_scales" / "c" / "0" / "0", 9)              # same size, a new mtime
        for _ in range(2):
            with pytest.raises(engram.CorruptTableError, match=r"layer 2 scales \(array 'layer_2_scales'\) chunk 0"):
                t.rows(2, np.array([2]))


def test_comparing_a_touched_file_keeps_its_pages_cached(built, tmp_path, monkeypatch):
    """The file is being served: its check must not evict its pages (POSIX_FADV_DONTNEED), as `verify` does."""
    path = copy_of(built, tmp_path)
    advice = []
    real = chunks.fadvise
    monkeypatch.setattr(chunks, "fadvise", lambda fd, what: advice.append(what) or real(fd, what))
    with engram.open(path, tier="mmap", verify_reads=False) as t:
        os.utime(path / "layer_2" / "c" / "0" / "0", ns=(5, 5))
        t.rows(2, np.arange(100))
    assert "SEQUENTIAL" in advice and "DONTNEED" not in advice


@pytest.mark.skipif(not compiled.COMPILED, reason="the compiled path needs numba (the 'fast' extra)")
def test_the_cached_kernel_stops_at_a_row_of_an_unchecked_block(built):
    ids = np.array([[7]])
    plan = engram.corpus_stats([np.arange(100, 160)], SPEC, COMP).hot_row_plan()
    with engram.open(built["float32"], tier="mmap") as t:
        t.load_hot_rows(plan, rows=8)
        step, layer_cache = t._fast, t._engine.cache.layers[1]
        hist = step._history(None, 1)
        rows = np.empty((1, 1, SPEC.heads_per_layer), np.int64)
        assert compiled.step_rows(ids, *hist, step._lookup, step._consts[1], rows) == 0
        target = next(int(r) for r in rows.ravel() if layer_cache.probe(np.array([r]))[0] < 0 and r >= PER_BLOCK)
        verified = np.ones_like(t._tier.checks[1].verified)
        out = np.empty((1, 1, SPEC.embed_dim), np.float32)

        def gather():
            return compiled.step_gather_cached(ids, *hist, step._lookup, step._consts[1], step._weights[1], out,
                                               verified, 4096, *layer_cache.kernel_args)
        assert gather() >= 0
        verified[target // PER_BLOCK] = 0                                    # the block of a row not cached
        assert gather() == compiled.UNVERIFIED


def test_closing_an_mmap_table_lets_go_of_its_checks(built):
    t = engram.open(built["float32"], tier="mmap")
    tier = t._tier
    t.rows(1, np.arange(10))
    t.close()
    assert tier.checks == {} and tier.scale_checks == {}
