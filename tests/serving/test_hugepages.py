"""The "mmap" tier on 2 MiB pages: new tables' chunk files are whole 2 MiB multiples, mappings place
addresses and file offsets alike modulo 2 MiB, and the tier says how much is on huge pages."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import engram
from engram.serving.mapping import HUGEPAGE, hugepage_bytes, map_file_range
from engram.serving.tiers import resident
from engram.storage.format import CHUNK_ALIGN
from engram.storage.writer import plan_layout

COMP = engram.Compression.identity(100)


def spec(base: int, dtype: str = "float32", D: int = 16) -> engram.TableSpec:
    return engram.TableSpec(engram_vocab_size=(base, base), max_ngram_size=3, n_head_per_ngram=2,
                            n_embed_per_ngram=2 * D, layer_ids=(1,), compressed_vocab_size=100, dtype=dtype)


@pytest.mark.parametrize("dtype,D", [("float32", 64), ("bfloat16", 96), ("int8", 64), ("float8_e4m3", 128)])
def test_new_large_layers_get_chunk_files_of_whole_2_mib(dtype, D):
    lay = plan_layout(spec(2_000_000, dtype, D))[1]                 # hundreds of MiB: planned, not written
    assert lay.n_chunks > 1 and lay.chunk_bytes % HUGEPAGE == 0
    assert lay.n_chunks * lay.chunk_rows - lay.rows < lay.n_chunks * HUGEPAGE     # padding: under 2 MiB a chunk
    if lay.scales is not None:
        assert lay.scales.chunk_rows == lay.chunk_rows and lay.scales.chunk_bytes % CHUNK_ALIGN == 0


def test_small_layers_and_explicit_chunk_rows_keep_64_kib_multiples():
    small = plan_layout(spec(3000))[1]                               # 0.4 MiB: not padded to 2 MiB
    assert small.chunk_bytes % CHUNK_ALIGN == 0 and small.chunk_bytes < HUGEPAGE
    assert plan_layout(spec(2_000_000), chunk_rows=1024)[1].chunk_bytes == 1024 * 64


def test_a_table_with_64_kib_chunks_still_opens_on_every_memory_tier(tmp_path):
    path = tmp_path / "old.engram"
    engram.build_table(path, spec(20_000), COMP, seed=2, chunk_rows=1024).close()     # 64 KiB chunk files
    ids = np.random.default_rng(0).integers(0, 100, (3, 40))
    with engram.open(path, tier="mmap") as mapped, engram.open(path, tier="ram") as ram:
        assert mapped.layout(1).chunk_bytes == 1 << 16
        assert torch.equal(mapped.lookup(ids, 1), ram.lookup(ids, 1))


@pytest.fixture(scope="module")
def huge_table(tmp_path_factory):
    path = tmp_path_factory.mktemp("huge") / "t.engram"                 # 64-byte rows, 2 MiB chunk files
    engram.build_table(path, spec(20_000), COMP, seed=3, chunk_rows=HUGEPAGE // 64).close()
    return path


def test_stitched_chunk_files_start_at_2_mib_boundaries(huge_table):
    with engram.open(huge_table, tier="mmap") as t:
        lay = t.layout(1)
        assert lay.n_chunks == 3 and lay.chunk_bytes == HUGEPAGE
        start = t._tier.weights[1].data_ptr()
        # chunk i sits at start + i * chunk_bytes: address and file offset (0) agree modulo 2 MiB
        assert [(start + i * lay.chunk_bytes) % HUGEPAGE for i in range(lay.n_chunks)] == [0, 0, 0]


@pytest.mark.parametrize("offset", [0, 4096, 3 * 4096 + 100, HUGEPAGE + 12345, 5 * HUGEPAGE - 8])
def test_a_mapped_file_range_agrees_with_its_offsets_modulo_2_mib(tmp_path, offset):
    data = np.random.default_rng(offset).integers(0, 256, 6 * HUGEPAGE, dtype=np.uint8)
    (tmp_path / "f").write_bytes(data.tobytes())
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        region, delta = map_file_range(fd, offset, 4096, hugepages=True)
    finally:
        os.close(fd)
    assert (region.addr + delta) % HUGEPAGE == offset % HUGEPAGE
    assert np.array_equal(region.array(np.uint8, (4096,), offset=delta), data[offset: offset + 4096])


def test_huge_pages_are_asked_for_where_the_table_stays_in_memory():
    assert resident(1 << 20, prefault=False) and resident(1 << 60, prefault=True)
    assert not resident(1 << 60, prefault=False)                     # larger than memory: 4 KiB faults


def thp_enabled() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def test_a_table_says_how_much_of_it_is_on_huge_pages_on_every_tier(huge_table):
    with engram.open(huge_table, tier="direct") as t:
        assert t.hugepage_bytes() == 0                   # nothing kept mapped
    for tier in ("ram", "mmap"):
        with engram.open(huge_table, tier=tier, prefault=True) as t:
            got = t.hugepage_bytes()
            padded = (t.nbytes // HUGEPAGE + len(t.spec.layer_ids)) * HUGEPAGE    # a layer's last page padded
            assert isinstance(got, int) and 0 <= got <= padded and got % HUGEPAGE == 0


def test_the_tier_reports_its_rows_on_huge_pages(huge_table):
    if not thp_enabled():
        pytest.skip("transparent huge pages are off on this system")
    with engram.open(huge_table, tier="mmap") as t:
        files = t.chunk_files(1)
    for p in files:                       # read again through the huge-page mapping, not the writes' pages
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    with engram.open(huge_table, tier="mmap", prefault=True) as t:
        assert t._tier.hugepages
        on_huge = t._tier.hugepage_bytes()
        assert t.hugepage_bytes() == on_huge
        weight = t._tier.weights[1]
        assert on_huge == hugepage_bytes(weight.data_ptr(), weight.numel() * weight.element_size())
        if on_huge == 0:
            pytest.skip("this filesystem does not map file pages with 2 MiB pages")
        assert on_huge % HUGEPAGE == 0 and on_huge <= t.layout(1).disk_bytes
