"""EngramCache: reset with no argument is a fresh cache, and rolling back exactly max_rollback
tokens (the most it allows) leaves the cache as if those tokens had never been seen, for any
prefix length, limit and split of the drafts into steps."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import engram
from engram import EngramMemory

COMP = engram.Compression.identity(70)
SPEC = engram.TableSpec(engram_vocab_size=(60, 60), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=16,
                        layer_ids=(0,), compressed_vocab_size=70)


def make() -> EngramMemory:
    torch.manual_seed(0)
    mem = EngramMemory(SPEC, COMP, layer_id=0, hidden_size=16, hc_mult=2)
    torch.nn.init.normal_(mem.short_conv.weight, std=0.5)          # a ShortConv that carries state
    return mem


MEM = make()


def inputs(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 2, 16, generator=g), torch.randint(0, 70, (B, T), generator=g)


def history_state(cache):
    h = cache.history
    return h.lengths.tolist(), h.undoable.tolist(), h.tail()[0].tolist(), h.tail()[1].tolist()


def test_reset_without_which_equals_a_fresh_cache():
    hidden, ids = inputs(2, 9, seed=1)
    with torch.no_grad():
        cache = MEM.new_cache(batch_size=2, max_rollback=3)
        MEM(hidden[:, :6], ids[:, :6], cache=cache)
        cache.rollback(2)
        cache.reset()
        fresh = MEM.new_cache(batch_size=2, max_rollback=3)
        assert history_state(cache) == history_state(fresh)
        assert torch.equal(cache.conv, fresh.conv)
        torch.testing.assert_close(MEM(hidden[:, 6:], ids[:, 6:], cache=cache), MEM(hidden[:, 6:], ids[:, 6:]),
                                   rtol=1e-6, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(prefix=st.integers(0, 9), limit=st.integers(1, 5), splits=st.lists(st.integers(1, 3), max_size=3),
       seed=st.integers(0, 1000))
def test_rolling_back_exactly_max_rollback_leaves_no_trace(prefix, limit, splits, seed):
    hidden, ids = inputs(2, prefix + limit + 3, seed)
    drafts = ids[:, prefix:prefix + limit].clone()
    drafts[0] = (drafts[0] + 1) % 70                                   # drafts that are not the sequence's tokens
    with torch.no_grad():
        cache = MEM.new_cache(batch_size=2, max_rollback=limit)
        if prefix:
            MEM(hidden[:, :prefix], ids[:, :prefix], cache=cache)
        at = 0
        for size in [*splits, limit]:                                  # the drafts in steps, `limit` in all
            step = min(size, limit - at)
            if step:
                MEM(hidden[:, prefix + at:prefix + at + step], drafts[:, at:at + step], cache=cache)
                at += step
        assert cache.history.undoable.tolist() == [limit, limit]
        assert cache.rollback(limit) is None and cache.history.lengths.tolist() == [prefix, prefix]
        assert cache.history.undoable.tolist() == [0, 0]
        fresh = MEM.new_cache(batch_size=2, max_rollback=limit)
        if prefix:
            MEM(hidden[:, :prefix], ids[:, :prefix], cache=fresh)
        assert history_state(cache)[::2] == history_state(fresh)[::2]      # lengths and the ids looked back at
        tail = MEM.short_conv.dilation * (MEM.short_conv.kernel_size - 1)    # what the next ShortConv step reads
        assert torch.equal(cache.conv[:, -tail:], fresh.conv[:, -tail:])
        rest = slice(prefix, prefix + 3)
        full = MEM(hidden[:, :prefix + 3], ids[:, :prefix + 3])[:, rest]
        torch.testing.assert_close(MEM(hidden[:, rest], ids[:, rest], cache=cache), full, rtol=1e-6,
                                   atol=1e-6 * float(full.abs().max()))
    np.testing.assert_array_equal(cache.history.lengths, [prefix + 3] * 2)
