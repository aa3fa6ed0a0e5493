"""Block digests: every 4 KiB block of a table's values has a recorded xxh3-64, and the "direct" tier
checks each block it reads against it; tables written before them keep opening."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import xxhash
import zarr

import engram

from .damage import drop_block_digests, flip_bit

COMP = engram.Compression.identity(200)
SPEC = engram.TableSpec(engram_vocab_size=(3000, 3000), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=16,
                        layer_ids=(1, 2), compressed_vocab_size=200)
ROW_BYTES = 32                    # float32, D=8: 128 rows to a 4 KiB block


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("blocks") / "t.engram"
    engram.build_table(path, SPEC, COMP, seed=4, chunk_rows=2048).close()
    return path


@pytest.fixture
def table(built, tmp_path):
    path = tmp_path / "t.engram"
    shutil.copytree(built, path)
    return path


def test_the_block_digest_array_holds_the_xxh3_of_every_block(built):
    group = zarr.open_group(built, mode="r")
    with engram.open(built) as t:
        for lid in SPEC.layer_ids:
            digests = group[f"layer_{lid}_blocks"][:]                      # [n_chunks, blocks per chunk]
            files = t.chunk_files(lid)
            assert digests.shape == (len(files), 2048 * ROW_BYTES // 4096) and digests.dtype == np.uint64
            for i, f in enumerate(files):
                data = f.read_bytes()
                assert [xxhash.xxh3_64_intdigest(data[b:b + 4096]) for b in range(0, len(data), 4096)] == \
                    digests[i].tolist()


def test_direct_reads_refuse_a_flipped_bit_in_a_block_they_read(built, table):
    with engram.open(built, tier="mmap") as ref:
        expected = ref.rows(1, np.arange(SPEC.rows(1)))
    flip_bit(table / "layer_1" / "c" / "1" / "0", 5 * 4096 + 7)             # chunk 1, block 5
    with engram.open(table, tier="direct") as t:
        row = 2048 + 5 * 128 + 3                                             # a row in that block
        with pytest.raises(engram.CorruptTableError, match=r"layer 1 chunk 1 .* block 5 \(bytes 20480-24575\) has "
                                                           r"xxh3 \w{16}, recorded \w{16}: its contents changed"):
            t.rows(1, np.array([row]))
        with pytest.raises(engram.CorruptTableError, match=r"block 5"):
            t.lookup(np.random.default_rng(0).integers(0, 200, (4, 512)), 1)     # touches every block
        far = np.arange(0, 2048)                                             # chunk 0: untouched, served
        assert torch.equal(t.rows(1, far), expected[far])


def test_a_damaged_block_digest_file_is_refused_at_open_and_by_verify(table):
    flip_bit(table / "layer_2_blocks" / "c" / "0" / "0", 3)
    with pytest.raises(engram.CorruptTableError, match=r"layer 2 .*chunk 0 .*layer_2_blocks.* has xxh3"):
        engram.open(table, tier="direct")
    with pytest.raises(engram.CorruptTableError, match=r"layer 2 .*chunk 0 .*layer_2_blocks.* has xxh3"):
        engram.open(table, tier="mmap")                           # it checks first serves against them
    with engram.open(table, tier="mmap", verify_reads=False) as t, \
            pytest.raises(engram.CorruptTableError, match=r"layer_2_blocks"):
        t.verify(progress=False)


@pytest.mark.parametrize("tier", ["ram", "mmap", "direct"])
def test_a_table_without_block_digests_still_opens(built, table, tier):
    """As written before block digests: no "blocks" entries, no arrays, no metadata checksum."""
    drop_block_digests(table)
    with engram.open(table, tier=tier) as old, engram.open(built, tier="mmap") as ref:
        assert old.layout(1).blocks is None
        ids = np.random.default_rng(1).integers(0, 200, (2, 64))
        assert torch.equal(old.lookup(ids, 2), ref.lookup(ids, 2))
        old.verify(progress=False)


BLOCK_ROWS = 4096 // ROW_BYTES    # 128
CHUNK_ROWS = 2048                 # 16 blocks to a chunk file


def rows_of_blocks(chunk: int, blocks, per_block: int = BLOCK_ROWS) -> np.ndarray:
    """Layer rows lying in the given blocks of a chunk file: all of each block's, or `per_block` spread over it."""
    step = BLOCK_ROWS // per_block
    return np.concatenate([chunk * CHUNK_ROWS + b * BLOCK_ROWS + np.arange(0, BLOCK_ROWS, step) for b in blocks])


def open_direct(path, engine: str):
    t = engram.open(path, tier="direct")
    reader = t._tier.reader
    if engine == "threads":
        reader.io_engine = "threads"
    elif reader.io_engine != engine:
        t.close()
        pytest.skip(f"{engine} unavailable here (reads go through {reader.io_engine})")
    return t


def block_message(chunk: int, block: int) -> str:
    return (rf"layer 1 chunk {chunk} .* block {block} \(bytes {block * 4096}-{block * 4096 + 4095}\) has "
            r"xxh3 \w{16}, recorded \w{16}")


@pytest.mark.parametrize("engine", ["io_uring", "threads"])
@pytest.mark.parametrize("per_block", [BLOCK_ROWS, 1], ids=["every-row", "one-row-a-block"])
def test_direct_reads_check_the_last_block_of_a_multi_block_extent(built, table, engine, per_block):
    """Rows in blocks 8..15 of a chunk file are one read of 8 blocks; a bit flipped in its last block
    is refused, naming that block of the file (1024 rows or 8: large and small gathers plan apart)."""
    rows = rows_of_blocks(0, range(8, 16), per_block)                       # chunk 0, blocks 8..15
    head = rows_of_blocks(0, range(8, 15), per_block)                       # blocks 8..14
    with engram.open(built, tier="mmap") as ref:
        expected = ref.rows(1, np.arange(SPEC.rows(1)))
    flip_bit(table / "layer_1" / "c" / "0" / "0", 15 * 4096 + 100)
    with open_direct(table, engine) as t:
        assert t._tier.reader.extent_ids(1, rows).tolist() == [0] * rows.size      # one extent of 8 blocks
        with pytest.raises(engram.CorruptTableError, match=block_message(0, 15)):
            t.rows(1, rows)
        assert torch.equal(t.rows(1, head), expected[head])                 # an extent that ends at block 14
        other = rows_of_blocks(1, range(16))                                 # another chunk file, every block
        assert torch.equal(t.rows(1, other), expected[other])


@pytest.mark.parametrize("engine", ["io_uring", "threads"])
@pytest.mark.parametrize("chunk", [0, 1])
@pytest.mark.parametrize(("first", "second", "bad", "per_block"), [
    (range(1, 3), range(10, 13), 11, BLOCK_ROWS),     # two multi-block extents; the bad block inside the second
    (range(1, 2), range(13, 14), 13, 4),              # two one-block extents of a few rows each
], ids=["multi-block", "one-block"])
def test_direct_reads_check_the_blocks_of_a_second_extent(built, table, engine, chunk, first, second, bad, per_block):
    """A gather read as two extents far apart in one chunk file: a bad block of the second one is
    refused by its number in the file, not in the extent; rows of other blocks are still served."""
    head = rows_of_blocks(chunk, first, per_block)
    rows = np.concatenate([head, rows_of_blocks(chunk, second, per_block)])
    # every block at least 3 from the bad one: its extents never reach it (a gap over GAP_BYTES)
    untouched = rows_of_blocks(chunk, [b for b in range(16) if abs(b - bad) >= 3], per_block)
    with engram.open(built, tier="mmap") as ref:
        expected = ref.rows(1, np.arange(SPEC.rows(1)))
    flip_bit(table / "layer_1" / "c" / str(chunk) / "0", bad * 4096 + 4095)
    with open_direct(table, engine) as t:
        assert t._tier.reader.extent_ids(1, rows).tolist() == [0] * head.size + [1] * (rows.size - head.size)
        with pytest.raises(engram.CorruptTableError, match=block_message(chunk, bad)):
            t.rows(1, rows)
        with pytest.raises(engram.CorruptTableError, match=block_message(chunk, bad)):
            t.rows(1, np.concatenate([rows[::-1], rows[:3]]))                # any order, duplicates too
        assert torch.equal(t.rows(1, untouched), expected[untouched])
        other = rows_of_blocks(1 - chunk, range(16))                         # the other chunk file, every block
        assert torch.equal(t.rows(1, other), expected[other])
