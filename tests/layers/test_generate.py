"""Engram layers with a generation cache equal their full forward at every step (both variants,
a non-zero ShortConv), through rollback, reorder, reset, ragged steps and prefetched rows; the
tiny LM generates the same tokens with caches as by recomputing the whole sequence."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import engram
from engram import EngramMemory, EngramMemoryV41

TOOLS = Path(__file__).parents[2] / "tools"
COMP = engram.Compression.identity(70)
SPEC = engram.TableSpec(engram_vocab_size=(60, 60), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=16,
                        layer_ids=(0,), compressed_vocab_size=70)
VARIANTS = [EngramMemory, EngramMemoryV41]


def make(cls, table=None, seed=0):
    torch.manual_seed(seed)
    mem = cls(SPEC, COMP, layer_id=0, hidden_size=16, hc_mult=2, table=table)
    if cls is EngramMemory:
        torch.nn.init.normal_(mem.short_conv.weight, std=0.5)       # a ShortConv that carries state
    return mem


def inputs(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 2, 16, generator=g), torch.randint(0, 70, (B, T), generator=g)


def close(got, full):
    torch.testing.assert_close(got, full, rtol=1e-6, atol=1e-6 * full.abs().max().item())


def run(mem, hidden, ids, bounds, cache):
    return torch.cat([mem(hidden[:, a:b], ids[:, a:b], cache=cache) for a, b in bounds], dim=1)


def split(T, sizes):
    bounds, a, i = [], 0, 0
    while a < T:
        bounds.append((a, min(T, a + sizes[i % len(sizes)])))
        a, i = bounds[-1][1], i + 1
    return bounds


@pytest.mark.parametrize("cls", VARIANTS)
@settings(max_examples=12)
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4), B=st.integers(1, 3), T=st.integers(1, 16),
       seed=st.integers(0, 1000))
def test_steps_with_a_cache_equal_the_full_forward(cls, sizes, B, T, seed):
    mem = make(cls)
    hidden, ids = inputs(B, T, seed)
    with torch.no_grad():
        close(run(mem, hidden, ids, split(T, sizes), mem.new_cache(batch_size=B)), mem(hidden, ids))


@pytest.mark.parametrize("cls", VARIANTS)
def test_ragged_steps_equal_each_sequence_alone(cls):
    mem = make(cls)
    hidden, ids = inputs(3, 12, seed=1)
    mask = torch.rand(3, 12, generator=torch.Generator().manual_seed(2)) < 0.6
    cache = mem.new_cache(batch_size=3)
    with torch.no_grad():
        got = torch.cat([mem(hidden[:, a:b], ids[:, a:b], cache=cache, mask=mask[:, a:b])
                         for a, b in split(12, [5, 1, 2])], dim=1)
        for row in range(3):
            m = mask[row]
            close(got[row, m][None], mem(hidden[row, m][None], ids[row, m][None]))
    assert cache.history.lengths.tolist() == mask.sum(dim=1).tolist()


@pytest.mark.parametrize("cls", VARIANTS)
def test_packed_documents_equal_each_document_alone(cls):
    mem = make(cls)
    hidden, ids = inputs(2, 14, seed=5)
    starts = torch.zeros(2, 14, dtype=torch.bool)
    starts[0, [3, 4, 9]] = True
    starts[1, 7] = True
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[1, 2] = False                                              # padding inside a packed row too
    with torch.no_grad():
        got = mem(hidden, ids, doc_start=starts, mask=mask)
        for row, bounds in ((0, [0, 3, 4, 9, 14]), (1, [0, 7, 14])):
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                keep = mask[row, a:b]
                alone = mem(hidden[row, a:b][keep][None], ids[row, a:b][keep][None])
                close(got[row, a:b][keep][None], alone)
        with pytest.raises(engram.InputError, match=r"doc_start with a cache is not supported: .* cache.reset"):
            mem(hidden, ids, doc_start=starts, cache=mem.new_cache(batch_size=2))


@pytest.mark.parametrize("cls", VARIANTS)
def test_rolled_back_drafts_and_beams_leave_the_cache_as_recompute_would(cls):
    mem = make(cls)
    hidden, ids = inputs(2, 14, seed=3)
    with torch.no_grad():
        full = mem(hidden, ids)
        cache = mem.new_cache(batch_size=2, max_rollback=4)
        mem(hidden[:, :8], ids[:, :8], cache=cache)
        drafts = ids[:, 8:12].clone()
        drafts[0, 2:] = (drafts[0, 2:] + 1) % 70                    # sequence 0: only 2 drafts right
        mem(hidden[:, 8:12], drafts, cache=cache)
        cache.rollback(np.array([2, 0]))
        y0 = mem(hidden[:1, 10:], ids[:1, 10:], cache=_row(cache, 0))
        close(y0, full[:1, 10:])
        cache.reorder(torch.tensor([1, 1]))                         # both beams continue sequence 1
        close(mem(hidden[1:, 12:].expand(2, -1, -1, -1), ids[1:, 12:].expand(2, -1), cache=cache),
              full[1:, 12:].expand(2, -1, -1, -1))
        cache.reset(np.array([True, False]))
        close(mem(hidden[:, :3], ids[:, :3], cache=cache)[:1], full[:1, :3])


def _row(cache, row):
    """A copy of one sequence's cache (reorder on a copy leaves the original alone)."""
    import copy

    single = copy.deepcopy(cache)
    single.reorder([row])
    return single


@pytest.mark.parametrize("cls", VARIANTS)
def test_prefetched_decode_steps_equal_the_full_forward(cls, tmp_path, lookup_path):
    rows = make(cls).export_rows()
    engram.build_table(tmp_path / "t.engram", SPEC, COMP, weights={0: rows})
    with engram.open(tmp_path / "t.engram") as table:
        mem = make(cls, table=table)
        hidden, ids = inputs(2, 9, seed=4)
        cache = mem.new_cache(batch_size=2)
        with torch.no_grad():
            full = mem(hidden, ids)
            steps = [mem(hidden[:, :5], ids[:, :5], cache=cache)]
            for t in range(5, 9):
                handle = table.prefetch(ids[:, t:t + 1], history=cache.history)   # once token t is known
                steps.append(mem(hidden[:, t:t + 1], handle, cache=cache))
            close(torch.cat(steps, dim=1), full)
            stale = table.prefetch(ids[:, :1])                       # made without the history
            with pytest.raises(engram.InputError, match=r"the prefetch handle was made without a history, but this "
                               rf"{cls.__name__} step uses a cache: prefetch with history=cache.history"):
                mem(hidden[:, :1], stale, cache=cache)
            early = table.prefetch(ids[:, :1], history=cache.history)
            mem(hidden[:, :1], ids[:, :1], cache=cache)              # the cache moved on since
            with pytest.raises(engram.InputError, match=r"made with another history, history state or mask"):
                mem(hidden[:, :1], early, cache=cache)
            lengths = cache.history.lengths
            with pytest.raises(engram.InputError, match=r"made with another history, history state or mask"):
                mem(hidden[:, :1], table.prefetch(ids[:, :1], history=cache.history), cache=cache,
                    mask=np.array([[True], [False]]))
            assert (cache.history.lengths == lengths).all()          # refused steps appended nothing


def test_cache_errors_name_the_fix():
    mem = make(EngramMemory)
    hidden, ids = inputs(2, 3)
    with pytest.raises(engram.InputError, match=r"cache holds batch_size=3 sequences but hidden_states has B=2"):
        mem(hidden, ids, cache=mem.new_cache(batch_size=3))
    with pytest.raises(engram.InputError, match=r"cache must be an EngramCache, got NgramHistory"):
        mem(hidden, ids, cache=engram.NgramHistory(SPEC, COMP, batch_size=2))
    other = engram.EngramMemoryV41(SPEC.replace(seed=9), COMP, layer_id=0, hidden_size=16, hc_mult=2)
    with pytest.raises(engram.SpecMismatchError, match=r"history was made for another spec: seed=9 \(here: 0\)"):
        mem(hidden, ids, cache=other.new_cache(batch_size=2))
    cache = mem.new_cache(batch_size=2, max_rollback=1)
    with pytest.raises(engram.InputError, match=r"rollback n=2 exceeds max_rollback=1"):
        cache.rollback(2)


def test_greedy_generation_with_caches_equals_full_recompute(monkeypatch, tmp_path, lookup_path):
    monkeypatch.syspath_prepend(str(TOOLS))
    import generate
    from tiny_lm import TinyLM, TinyLMConfig

    torch.manual_seed(0)
    config = TinyLMConfig(n_layer=3, n_embd=32, n_head=2, engram_layers=(0, 2), engram_vocab_size=500)
    model = TinyLM(config, engram.Compression.identity(config.vocab_size)).eval()
    for mem in model.engram_modules():
        torch.nn.init.normal_(mem.short_conv.weight, std=0.3)
    prompt = torch.randint(0, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    cached = generate.generate(model, prompt, 12)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, generate.generate_by_recompute(model, prompt, 12))
    backed = generate.table_backed(model, model.engram_modules()[0].comp, tmp_path / "rows.engram")
    assert torch.equal(generate.generate(backed, prompt, 12, prefetch=True), cached)   # rows prefetched per step
    # Untrained weights soon repeat one token; teacher forcing random tokens checks every step's
    # logits (prefill of 4, then single tokens) against the full forward.
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    cache = generate.StepCache(model, batch_size=2)
    steps = [generate.step(model, ids[:, :4], cache)] + [generate.step(model, ids[:, t:t + 1], cache)
                                                        for t in range(4, 16)]
    with torch.no_grad():
        full, _ = model(ids)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    sys.modules.pop("generate", None)
