"""The compiled path of small lookups (engram.serving.decode_step, engram.serving.compiled): its
hashes equal the xxhash / mmh3 libraries and the batched hasher with every kind of history; small
lookups take it on every tier and dtype, and anything unusual falls back to the checked path; the
rows, counters and errors are those of the batched path."""

from __future__ import annotations

import mmh3
import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

import engram
from engram.serving import cache as cache_module
from engram.serving import compiled, decode_step

pytestmark = pytest.mark.skipif(not compiled.COMPILED, reason="the compiled path needs numba (the 'fast' extra)")

FAMILIES = ["multiplicative-xor", "xxh64", "murmur3"]
VOCAB = 600
COMP = engram.Compression(np.arange(VOCAB) // 2)      # merges id pairs
TIERS = ["ram", "mmap", "direct"]


def make_spec(n: int = 3, family: str = "multiplicative-xor", dtype: str = "float32") -> engram.TableSpec:
    return engram.TableSpec(engram_vocab_size=(2000,) * (n - 1), max_ngram_size=n, n_head_per_ngram=2,
                            n_embed_per_ngram=64, layer_ids=(1, 5), compressed_vocab_size=COMP.compressed_vocab_size,
                            hash=family, dtype=dtype)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    out = {}
    for dtype in ("float32", "bfloat16", "float8_e4m3"):
        out[dtype] = root / f"{dtype}.engram"
        engram.build_table(out[dtype], make_spec(dtype=dtype), COMP, seed=2).close()
    return out


class Calls:
    """Counts the kernel calls of the compiled path: stands in for the kernels module where
    decode_step reads it (the kernels themselves stay untouched: they call each other)."""

    def __init__(self, monkeypatch) -> None:
        self.names: list[str] = []
        monkeypatch.setattr(decode_step, "compiled", self)

    def __getattr__(self, name):
        real = getattr(compiled, name)
        if not name.startswith("step_") or name == "step_constants":
            return real

        def call(*args):
            self.names.append(name)
            return real(*args)
        return call

    def take(self) -> list[str]:
        names, self.names = self.names, []
        return names


def batched(table, *args, **kwargs):
    """table.lookup on the batched path."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decode_step, "SMALL_LOOKUP_TOKENS", 0)
        return table.lookup(*args, **kwargs)


# -- the hashes ------------------------------------------------------------------------------------
@given(words=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=24), seed=st.integers(0, 2**32 - 1))
def test_compiled_hashes_equal_the_libraries(words, seed):
    key = np.asarray(words, "<u4").tobytes()
    w = np.asarray(words, np.uint64)
    assert int(compiled.xxh64_words(w, len(words), np.uint64(seed))) == xxhash.xxh64_intdigest(key, seed=seed)
    assert int(compiled.murmur3_words(w, len(words), np.uint64(seed))) == \
        mmh3.hash64(key, seed=seed, x64arch=True, signed=False)[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [2, 3, 5])
@settings(max_examples=12)
@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), steps=st.lists(st.integers(1, 4), min_size=1, max_size=5),
       p_start=st.sampled_from([0.0, 0.3]))
def test_step_rows_equal_the_hasher_after_any_history(family, n, seed, B, steps, p_start):
    """Appends (with document starts), rollbacks and resets: the compiled rows of the next ids are
    the batched hasher's, which the history tests pin to the full sequence."""
    spec = make_spec(n, family)
    hasher, rng = engram.NgramHasher(spec, COMP), np.random.default_rng(seed)
    hist = engram.NgramHistory(spec, COMP, batch_size=B, max_rollback=3)
    consts = compiled.step_constants(spec, COMP, 5)
    for size in steps:
        new = rng.integers(0, VOCAB, (B, size))
        rows = np.empty((B, size, spec.heads_per_layer), np.int64)
        ids, starts = engram.addressing.history.history_arrays(hist)
        assert compiled.step_rows(new, ids, starts, COMP.lookup, consts, rows) == 0
        np.testing.assert_array_equal(rows, hasher.global_rows(new, 5, history=hist))
        hist.append(new, doc_start=rng.random((B, size)) < p_start)
        if rng.random() < 0.3:
            hist.rollback(rng.integers(0, hist.undoable + 1))
        if rng.random() < 0.2:
            hist.reset(rng.random(B) < 0.5)


def test_step_rows_report_bad_ids_and_batches():
    spec = make_spec()
    hist = engram.NgramHistory(spec, COMP, batch_size=2)
    ids, starts = engram.addressing.history.history_arrays(hist)
    consts, rows = compiled.step_constants(spec, COMP, 1), np.empty((2, 1, 4), np.int64)
    assert compiled.step_rows(np.array([[1], [VOCAB]]), ids, starts, COMP.lookup, consts, rows) == compiled.BAD_IDS
    assert compiled.step_rows(np.array([[1], [-1]]), ids, starts, COMP.lookup, consts, rows) == compiled.BAD_IDS
    assert compiled.step_rows(np.array([[1]]), ids, starts, COMP.lookup, consts, rows[:1]) == compiled.BAD_BATCH


# -- which path a lookup takes ------------------------------------------------------------------------
@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3"])
def test_small_lookups_take_the_compiled_path(paths, tier, dtype, monkeypatch):
    calls = Calls(monkeypatch)
    copies = tier != "direct" and dtype != "float8_e4m3"            # rows copied in the kernel, else read by the engine
    kernel = "step_gather" if copies else "step_rows"
    ids = np.random.default_rng(0).integers(0, VOCAB, (3, 8))
    with engram.open(paths[dtype], tier=tier) as table:
        hist = engram.NgramHistory(table.spec, table.compression, batch_size=3)
        hist.append(ids[:, :5])
        expected = batched(table, ids[:, 5:], 1, history=hist)
        assert calls.take() == []
        assert torch.equal(table.lookup(ids[:, 5:], 1, history=hist), expected)          # a non-contiguous view
        assert torch.equal(table.lookup(torch.from_numpy(ids[:, 5:]).int(), 1, history=hist), expected)
        frozen = ids[:, 5:].copy()
        frozen.flags.writeable = False
        assert torch.equal(table.lookup(frozen, 1, history=hist), expected)
        assert calls.take() == [kernel, kernel, kernel]
        assert torch.equal(table.lookup(ids[:, 5:].astype(">i8"), 1, history=hist), expected)   # byte-swapped:
        assert calls.take() == []                                                                # the checked path
        every = table.lookup(ids[:, 5:], None, history=hist)
        assert torch.equal(every[1], expected) and calls.take() == [kernel, kernel]
        assert torch.equal(table.prefetch(ids[:, 5:], 1, history=hist).result(1), expected)
        assert calls.take() == ["step_rows"]                          # hashed at once, gathered on the thread
        half = table.lookup(ids[:, 5:], 1, history=hist, dtype=torch.float16)
        assert torch.equal(half, batched(table, ids[:, 5:], 1, history=hist, dtype=torch.float16))
        assert calls.take() == [kernel]
        # the checked path: a mask, lists, an out= tensor, more ids than a small lookup
        table.lookup(ids[:, 5:], 1, history=hist, mask=np.ones((3, 3), bool))
        table.lookup(ids[:, 5:].tolist(), 1, history=hist)
        table.lookup(ids[:, 5:], 1, history=hist, out=torch.empty_like(expected))
        monkeypatch.setattr(decode_step, "SMALL_LOOKUP_TOKENS", 8)
        table.lookup(ids[:, 5:], 1, history=hist)
        assert calls.take() == []


def test_histories_of_equal_specs_and_no_history(paths, monkeypatch):
    calls = Calls(monkeypatch)
    with engram.open(paths["float32"], tier="ram") as table:
        equal = engram.TableSpec.from_dict(table.spec.to_dict())        # another object, the same rows
        hist = engram.NgramHistory(equal, table.compression, batch_size=1)
        hist.append(np.array([[4, 5, 6]]))
        assert torch.equal(table.lookup(np.array([[7]]), 5, history=hist), batched(table, np.array([[7]]), 5,
                                                                                    history=hist))
        assert torch.equal(table.lookup(np.array([[7, 8]]), 5), batched(table, np.array([[7, 8]]), 5))
        assert calls.take() == ["step_gather", "step_gather"]


# -- the same errors, rows and counters as the batched path ---------------------------------------
def test_bad_arguments_of_small_lookups_raise_the_checked_errors(paths):
    with engram.open(paths["float32"], tier="ram") as table:
        hist = engram.NgramHistory(table.spec, table.compression, batch_size=2)
        with pytest.raises(engram.TokenIdError, match=r"outside \[0, 600\)"):
            table.lookup(np.array([[VOCAB]]), 1)
        with pytest.raises(engram.InputError, match=r"history tracks batch_size=2 sequences but token_ids has B=1"):
            table.lookup(np.array([[3]]), 1, history=hist)
        other = engram.NgramHistory(table.spec.replace(seed=7), table.compression, batch_size=1)
        with pytest.raises(engram.SpecMismatchError, match=r"history was made for another spec: seed=7"):
            table.lookup(np.array([[3]]), 1, history=other)
        with pytest.raises(engram.InputError, match=r"layer_id=2 has no table"):
            table.lookup(np.array([[3]]), 2)
        with pytest.raises(engram.InputError, match=r"dtype=torch.int64 is invalid"):
            table.lookup(np.array([[3]]), 1, dtype=torch.int64)
        assert table.stats().lookups == 0
    with pytest.raises(engram.InputError, match=r"is closed"):
        table.lookup(np.array([[3]]), 1)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("probe", ["none", "dense", "bitmap"])
def test_rows_and_counters_equal_the_batched_path(paths, tier, dedup, probe, monkeypatch):
    """With and without a hot-row cache (both probe structures) and batch dedup."""
    monkeypatch.setattr(cache_module, "DENSE_MAX_ROWS", 0 if probe == "bitmap" else cache_module.DENSE_MAX_ROWS)
    rng = np.random.default_rng(1)
    context, steps = rng.integers(0, VOCAB, (4, 30)), rng.integers(0, VOCAB, (4, 6))
    context[1], steps[1] = context[0], steps[0]                         # sequences 0 and 1 repeat each row
    corpus = [rng.integers(0, VOCAB, 200) for _ in range(10)] + [np.r_[context[b], steps[b]] for b in range(4)]
    plan = engram.corpus_stats(corpus, make_spec(), COMP).hot_row_plan()
    got = {}
    for path_name, limit in (("batched", 0), ("compiled", 1 << 20)):
        monkeypatch.setattr(decode_step, "SMALL_LOOKUP_TOKENS", limit)
        with engram.open(paths["float32"], tier=tier, dedup=dedup) as table:
            if probe != "none":
                table.load_hot_rows(plan, fraction=0.5)
            hist = engram.NgramHistory(table.spec, table.compression, batch_size=4)
            hist.append(context)
            rows = []
            for t in range(steps.shape[1]):
                rows.append(table.lookup(steps[:, t:t + 1], 5, history=hist))
                hist.append(steps[:, t:t + 1])
            got[path_name] = torch.cat(rows, dim=1), table.stats()
    assert torch.equal(got["batched"][0], got["compiled"][0])
    assert got["batched"][1] == got["compiled"][1]
    stats = got["compiled"][1]
    assert (stats.rows_from_cache > 0) == (probe != "none") and (stats.rows_unique < stats.rows_requested) == dedup


@pytest.mark.parametrize("tier", TIERS)
def test_prefetches_of_a_few_tokens_from_memory_run_at_once(paths, tier):
    """Cheaper than waking the prefetch thread; disk tiers and larger prefetches still go to it."""
    ids = np.random.default_rng(3).integers(0, VOCAB, (4, 8))
    with engram.open(paths["float32"], tier=tier) as table:
        hist = engram.NgramHistory(table.spec, table.compression, batch_size=4)
        hist.append(ids[:, :4])
        small = table.prefetch(ids[:, 4:5], history=hist)
        if tier != "direct":                                           # done, and no thread was started
            assert small.done() and table._prefetcher._pool is None
        assert torch.equal(small.result(5), batched(table, ids[:, 4:5], 5, history=hist))
        large = table.prefetch(np.tile(ids, (1, 4)), history=hist)          # 128 tokens: on the thread
        assert torch.equal(large.result(1), batched(table, np.tile(ids, (1, 4)), 1, history=hist))
        assert table.stats().prefetches == 2
