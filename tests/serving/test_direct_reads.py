"""The "direct" tier's reads: io_uring (one submission for a batch) and the thread pool read the same
extents, return the same rows and refuse the same damaged blocks."""

from __future__ import annotations

import mmap
import os
import shutil

import numpy as np
import pytest
import torch

import engram
from engram.serving.extent_reads import read_ring
from engram.serving.uring import Ring

from .damage import flip_bit

COMP = engram.Compression.identity(300)
SPEC = engram.TableSpec(engram_vocab_size=(5000, 5000), max_ngram_size=3, n_head_per_ngram=4, n_embed_per_ngram=64,
                        layer_ids=(1, 2), compressed_vocab_size=300)      # 64-byte rows, 8 heads a token
HAS_RING = Ring.create(8) is not None
needs_ring = pytest.mark.skipif(not HAS_RING, reason="this kernel or sandbox offers no io_uring")
ENGINES = ["io_uring", "threads"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("direct") / "t.engram"
    engram.build_table(path, SPEC, COMP, seed=7, chunk_rows=4096).close()
    return path


@pytest.fixture(scope="module")
def expected(built):
    with engram.open(built, tier="mmap") as ref:
        return {lid: ref.rows(lid, np.arange(SPEC.rows(lid))) for lid in SPEC.layer_ids}


def direct(path, engine: str) -> engram.Table:
    table = engram.open(path, tier="direct")
    if engine == "io_uring" and table._tier.reader.io_engine != "io_uring":
        table.close()
        pytest.skip("this kernel or sandbox offers no io_uring")
    table._tier.reader.io_engine = engine
    return table


@needs_ring
def test_io_uring_is_chosen_where_the_kernel_offers_it(built):
    with engram.open(built, tier="direct") as t:
        assert t._tier.reader.io_engine == "io_uring"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("n", [1, 8, 64, 65, 3000])        # a decode step's few rows, and the numpy-planned path
def test_both_engines_return_the_rows_of_the_mmap_tier(built, expected, engine, n):
    rng = np.random.default_rng(n)
    with direct(built, engine) as t:
        for lid in SPEC.layer_ids:
            rows = rng.integers(0, SPEC.rows(lid), n)
            rows[n // 2:] = rows[: n - n // 2]             # repeats: gathered once, copied to each place
            assert torch.equal(t.rows(lid, rows), expected[lid][rows])
            for given in (rows, np.unique(rows)):          # the tier itself: unsorted with repeats, sorted distinct
                out = torch.empty(given.size, 16)
                t._tier.gather(lid, given, out, sorted_unique=given is not rows)
                assert torch.equal(out, expected[lid][given])


@pytest.mark.parametrize("shape", [(1, 1), (8, 1), (2, 300)])
def test_lookups_and_counters_agree_between_engines(built, shape):
    ids = np.random.default_rng(3).integers(0, 300, shape)
    results, stats = {}, {}
    for engine in ENGINES if HAS_RING else ["threads"]:
        with direct(built, engine) as t:
            results[engine] = t.lookup(ids, 1)
            s = t.stats()
            stats[engine] = (s.rows_from_disk, s.bytes_from_disk, s.disk_reads)
    with engram.open(built, tier="ram") as ram:
        for engine, got in results.items():
            assert torch.equal(got, ram.lookup(ids, 1)), engine
    assert len(set(stats.values())) == 1          # the same extents, whichever engine reads them


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("n", [1, 200])
def test_a_flipped_block_is_refused_by_both_engines(built, expected, tmp_path, engine, n):
    path = tmp_path / "t.engram"
    shutil.copytree(built, path)
    flip_bit(path / "layer_2" / "c" / "1" / "0", 3 * 4096 + 100, 0x01)  # chunk 1, block 3: rows 4096+192..
    bad_row = 4096 + 3 * 64 + 1
    rows = np.sort(np.random.default_rng(n).choice(SPEC.rows(2), n, replace=False))
    rows[0] = bad_row
    with direct(path, engine) as t:
        with pytest.raises(engram.CorruptTableError, match=r"layer 2 chunk 1 .* block 3 \(bytes 12288-16383\) has "
                                                           r"xxh3 \w{16}, recorded \w{16}"):
            t.rows(2, rows)
        fine = np.array([0, 5, 4095, 4096 + 4 * 64])                    # other blocks: still served
        assert torch.equal(t.rows(2, fine), expected[2][fine])


@needs_ring
def test_a_ring_reads_batches_deeper_than_its_depth(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 64 * 4096, dtype=np.uint8)
    (tmp_path / "f").write_bytes(data.tobytes())
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    buf = np.frombuffer(mmap.mmap(-1, 100 * 4096), np.uint8)
    try:
        ring = Ring.create(4)
        assert ring is not None and ring.entries == 4
        blocks = np.random.default_rng(1).integers(0, 64, 100)
        sqes = Ring.reads(np.full(100, fd), blocks * 4096, np.full(100, 4096), buf.ctypes.data + np.arange(100) * 4096)
        seen = []
        for done, res in ring.run(sqes, depth=3):
            assert (res == 4096).all()
            seen += done.tolist()
        assert sorted(seen) == list(range(100))
        assert np.array_equal(buf.reshape(100, 4096), data.reshape(64, 4096)[blocks])
    finally:
        os.close(fd)


@needs_ring
def test_a_failed_ring_read_raises_oserror_naming_the_file(tmp_path):
    ring = Ring.create(4)
    buf = np.frombuffer(mmap.mmap(-1, 4096), np.uint8)
    fd = os.open(tmp_path, os.O_RDONLY)        # a directory: read() fails with EISDIR
    try:
        sqes = np.array([Ring.entry(fd, 0, 4096, buf.ctypes.data, 0)], np.int64)
        with pytest.raises(IsADirectoryError, match=r"reading 4096 bytes at byte 0.*'somewhere'"):
            read_ring(ring, sqes, [(0, 0, 4096, 0, 4096)], buf.data, None, 4, lambda chunk: "somewhere")
        data = tmp_path / "f"
        data.write_bytes(b"x" * 4096)
        fd2 = os.open(data, os.O_RDONLY)
        sqes = np.array([Ring.entry(fd2, 0, 4096, buf.ctypes.data, 0)], np.int64)
        assert read_ring(ring, sqes, [(0, 0, 4096, 0, 4096)], buf.data, None, 4, str) is None   # the ring still works
        assert bytes(buf) == b"x" * 4096
        os.close(fd2)
    finally:
        os.close(fd)
