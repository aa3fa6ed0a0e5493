"""What the memory tiers cost: the "ram" tier leaves none of the table's files in the page cache."""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
import pytest
import torch

import engram

COMP = engram.Compression.identity(100)
SPEC = engram.TableSpec(engram_vocab_size=(3000, 3000), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=64,
                        layer_ids=(1,), compressed_vocab_size=100, dtype="int8")   # values and scales files

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def cached_pages(path) -> int:
    """Pages of the file in the page cache: mincore(2) over a fresh mapping (which faults nothing in)."""
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    vec = ctypes.create_string_buffer(pages)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        view = np.frombuffer(m, np.uint8)
        status = _libc.mincore(view.ctypes.data, size, vec)
        del view                                      # before the mapping closes
    assert status == 0, os.strerror(ctypes.get_errno())
    return int((np.frombuffer(vec.raw, np.uint8) & 1).sum())


def files(table: engram.Table) -> list:
    return [*table.chunk_files(1), *table.chunk_files(1, scales=True)]


def test_the_ram_tier_drops_the_files_from_the_page_cache(tmp_path):
    path = tmp_path / "t.engram"
    engram.build_table(path, SPEC, COMP, seed=1).close()
    with engram.open(path, tier="mmap") as t:
        paths = files(t)
        expected = t.lookup(np.arange(60).reshape(2, 30), 1)
    for p in paths:                                   # every page cached, as after a first read
        p.read_bytes()
    if any(cached_pages(p) == 0 for p in paths):
        pytest.skip("this filesystem does not report cached pages")
    with engram.open(path, tier="ram") as t:
        assert [cached_pages(p) for p in paths] == [0] * len(paths)
        assert torch.equal(t.lookup(np.arange(60).reshape(2, 30), 1), expected)   # served from its own copy
