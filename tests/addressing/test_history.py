"""NgramHistory: lookups that continue sequences hash exactly as the full sequence, for every
split into steps, ragged steps, packed documents, rollback, reorder and reset; the history is
small plain state that lookups never change; bad arguments get typed errors."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import engram
from engram import NgramHistory

FAMILIES = ["multiplicative-xor", "xxh64", "murmur3"]
VOCAB = 90
COMP = engram.Compression(np.r_[np.arange(60), np.arange(30) * 2])   # raw ids 60.. merge into even ids


def make_spec(n: int = 3, family: str = "multiplicative-xor", **changes) -> engram.TableSpec:
    spec = engram.TableSpec(engram_vocab_size=(40,) * (n - 1), max_ngram_size=n, n_head_per_ngram=2,
                            n_embed_per_ngram=8, layer_ids=(0, 2), pad_id=7, hash=family,
                            compressed_vocab_size=COMP.compressed_vocab_size)
    return spec.replace(**changes) if changes else spec


def chunks(total: int, sizes: list[int]) -> list[tuple[int, int]]:
    """[start, stop) of consecutive chunks of the given sizes (cycled) covering `total` positions."""
    out, start, i = [], 0, 0
    while start < total:
        stop = min(total, start + sizes[i % len(sizes)])
        out.append((start, stop))
        start, i = stop, i + 1
    return out


def alone(hasher: engram.NgramHasher, seq: np.ndarray, starts: np.ndarray, layer: int) -> np.ndarray:
    """Rows [len(seq), H] of one sequence whose documents are each hashed alone."""
    bounds = [0, *np.flatnonzero(starts[1:]) + 1, len(seq)]
    parts = [hasher.hash(seq[None, a:b], layer)[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    return np.concatenate(parts) if parts else np.zeros((0, hasher.spec.heads_per_layer), np.int64)


steps = st.lists(st.integers(1, 7), min_size=1, max_size=5)


# -- 1. exactness over random splits ------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [2, 3, 4])
@settings(max_examples=15)
@given(seed=st.integers(0, 2**16), sizes=steps, B=st.integers(1, 3), T=st.integers(1, 20))
def test_any_split_hashes_like_the_full_sequence(family, n, seed, sizes, B, T):
    hasher = engram.NgramHasher(make_spec(n, family), COMP)
    ids = np.random.default_rng(seed).integers(0, VOCAB, (B, T))
    hist = NgramHistory(hasher.spec, COMP, batch_size=B)
    parts = []
    for a, b in chunks(T, sizes):
        parts.append(hasher.hash(ids[:, a:b], 2, history=hist))
        hist.append(ids[:, a:b])
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), hasher.hash(ids, 2))
    assert hist.lengths.tolist() == [T] * B


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [2, 3, 4])
@settings(max_examples=15)
@given(seed=st.integers(0, 2**16), sizes=steps, B=st.integers(1, 3), T=st.integers(1, 20),
       p_pad=st.sampled_from([0.0, 0.3, 0.7]), p_start=st.sampled_from([0.0, 0.2]))
def test_ragged_packed_steps_hash_like_each_document_alone(family, n, seed, sizes, B, T, p_pad, p_start):
    """Steps with padding (mask False) anywhere and document starts: every real position gets the
    rows of its document hashed alone."""
    hasher = engram.NgramHasher(make_spec(n, family), COMP)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (B, T))
    mask, starts = rng.random((B, T)) >= p_pad, rng.random((B, T)) < p_start
    hist = NgramHistory(hasher.spec, COMP, batch_size=B)
    got = np.zeros((B, T, hasher.spec.heads_per_layer), np.int64)
    for a, b in chunks(T, sizes):
        context = {"mask": mask[:, a:b], "doc_start": starts[:, a:b]}
        got[:, a:b] = hasher.hash(ids[:, a:b], 0, history=hist, **context)
        hist.append(ids[:, a:b], **context)
    for row in range(B):
        m = mask[row]
        np.testing.assert_array_equal(got[row, m], alone(hasher, ids[row, m], starts[row, m], 0))
    assert hist.lengths.tolist() == mask.sum(axis=1).tolist()


def test_doc_start_without_history_and_in_the_history_tail():
    hasher = engram.NgramHasher(make_spec(4), COMP)
    ids = np.arange(12)[None] + 3
    starts = np.zeros((1, 12), bool)
    starts[0, [4, 6]] = True
    expected = alone(hasher, ids[0], starts[0], 0)
    np.testing.assert_array_equal(hasher.hash(ids, 0, doc_start=starts)[0], expected)
    hist = NgramHistory(hasher.spec, COMP, batch_size=1)
    hist.append(ids[:, :7], doc_start=starts[:, :7])         # a start two positions back stays in force
    np.testing.assert_array_equal(hasher.hash(ids[:, 7:], 0, history=hist)[0], expected[7:])


# -- 2. speculative rollback, beams, reset --------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=20)
@given(seed=st.integers(0, 2**16), prefix=st.integers(0, 9), drafts=st.integers(1, 5), rounds=st.integers(1, 4))
def test_rejected_drafts_rolled_back_leave_no_trace(family, seed, prefix, drafts, rounds):
    rng = np.random.default_rng(seed)
    B = 3
    hasher = engram.NgramHasher(make_spec(4, family), COMP)
    spec_hist = NgramHistory(hasher.spec, COMP, batch_size=B, max_rollback=5)
    plain = NgramHistory(hasher.spec, COMP, batch_size=B, max_rollback=0)
    start = rng.integers(0, VOCAB, (B, prefix))
    spec_hist.append(start)
    plain.append(start)
    for _ in range(rounds):
        draft = rng.integers(0, VOCAB, (B, drafts))
        np.testing.assert_array_equal(hasher.hash(draft, 2, history=spec_hist), hasher.hash(draft, 2, history=plain))
        spec_hist.append(draft)
        accepted = rng.integers(0, drafts + 1, B)
        spec_hist.rollback(drafts - accepted)                  # per sequence
        for row in range(B):                                   # what plain decoding would have appended
            keep = np.zeros((B, drafts), bool)
            keep[row, : accepted[row]] = True
            plain.append(draft, mask=keep)
    probe = rng.integers(0, VOCAB, (B, 3))
    np.testing.assert_array_equal(hasher.hash(probe, 0, history=spec_hist), hasher.hash(probe, 0, history=plain))
    np.testing.assert_array_equal(spec_hist.lengths, plain.lengths)


def test_rollback_limits():
    hist = NgramHistory(make_spec(3), COMP, batch_size=2, max_rollback=3)
    hist.append(np.ones((2, 5), np.int64))
    assert hist.undoable.tolist() == [3, 3]
    hist.rollback([1, 3])
    assert hist.undoable.tolist() == [2, 0] and hist.lengths.tolist() == [4, 2]
    with pytest.raises(engram.InputError, match=r"rollback n=4 exceeds max_rollback=3: make the history with "
                       r"max_rollback>=4"):
        hist.rollback(4)
    with pytest.raises(engram.InputError, match=r"rollback n=1: sequence 1 can undo only 0 tokens"):
        hist.rollback(1)
    with pytest.raises(engram.InputError, match=r"rollback n=\[-1, 0\] is negative"):
        hist.rollback(np.array([-1, 0]))
    with pytest.raises(engram.InputError, match=r"rollback n has shape \(3,\): pass one int, or \[2\] ints"):
        hist.rollback([0, 0, 0])
    assert hist.lengths.tolist() == [4, 2]                     # refused calls changed nothing


def test_reorder_follows_beam_search():
    hasher = engram.NgramHasher(make_spec(3), COMP)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (3, 6))
    hist = NgramHistory(hasher.spec, COMP, batch_size=3)
    hist.append(ids)
    beams = np.array([2, 2, 0, 1])                             # B changes from 3 to 4
    hist.reorder(torch.from_numpy(beams))
    step = rng.integers(0, VOCAB, (4, 2))
    full = hasher.hash(np.concatenate([ids[beams], step], axis=1), 0)
    np.testing.assert_array_equal(hasher.hash(step, 0, history=hist), full[:, 6:])
    with pytest.raises(engram.InputError, match=r"beam_idx holds 4, outside \[0, 4\)"):
        hist.reorder([0, 4])


def test_reset_starts_the_flagged_sequences_over():
    hasher = engram.NgramHasher(make_spec(3), COMP)
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 5))
    hist = NgramHistory(hasher.spec, COMP, batch_size=2)
    hist.append(ids)
    hist.reset(np.array([False, True]))
    new = ids[:, :3]
    got = hasher.hash(new, 0, history=hist)
    np.testing.assert_array_equal(got[1], hasher.hash(new[1:], 0)[0])                  # fresh
    np.testing.assert_array_equal(got[0], hasher.hash(np.c_[ids, new][:1], 0)[0, 5:])  # kept
    assert hist.lengths.tolist() == [5, 0] and hist.undoable.tolist() == [5, 0]
    with pytest.raises(engram.InputError, match=r"which has shape \(3,\) and dtype bool, expected bool of shape "
                       r"\(2,\)"):
        hist.reset(np.ones(3, bool))


# -- 3. tables: lookup and prefetch --------------------------------------------------------------
@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("history") / "t.engram"
    engram.build_table(path, make_spec(3, "xxh64"), COMP, seed=1)
    with engram.open(path, tier="mmap") as t:
        yield t


def test_table_lookup_and_prefetch_with_history_equal_the_full_lookup(table, lookup_path):
    ids = torch.from_numpy(np.random.default_rng(3).integers(0, VOCAB, (2, 9)))
    full = table.lookup(ids, 2)
    hist = NgramHistory(table.spec, table.compression, batch_size=2)
    got = []
    for a, b in chunks(9, [4, 1, 1, 3]):
        handle = table.prefetch(ids[:, a:b], history=hist)     # as soon as the ids are known
        hist.append(ids[:, a:b])                               # appending after it changes nothing
        got.append(handle.result(2))
    assert torch.equal(torch.cat(got, dim=1), full)
    fresh = NgramHistory(table.spec, table.compression, batch_size=2)
    assert torch.equal(engram.lookup(ids[:, 8:], table, None, history=fresh)[0], table.lookup(ids[:, 8:], 0))


def test_lookups_never_change_the_history(table, lookup_path):
    hist = NgramHistory(table.spec, table.compression, batch_size=2, max_rollback=2)
    hist.append(np.arange(10).reshape(2, 5))
    before = pickle.dumps(hist)
    ids = np.arange(4).reshape(2, 2)
    table.lookup(ids, 0, history=hist, mask=np.array([[True, False], [False, True]]))
    table.prefetch(ids, history=hist).result()
    engram.NgramHasher(table.spec, table.compression).hash(ids, 2, history=hist, doc_start=np.ones((2, 2), bool))
    assert pickle.dumps(hist) == before


def test_history_pickles_small_and_continues_in_another_process(table):
    """Prefill on one instance, decode on another: the state moves by pickle and hashes alike."""
    ids = np.random.default_rng(4).integers(0, VOCAB, (2, 12))
    hist = NgramHistory(table.spec, table.compression, batch_size=2)
    hist.append(ids[:, :10])
    blob = pickle.dumps(hist)
    assert len(blob) < 3000                                    # no compression lookup array inside
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        rows = pool.submit(engram.lookup, ids[:, 10:], table, 0, history=pickle.loads(blob)).result()
    assert torch.equal(rows, table.lookup(ids, 0)[:, 10:])


# -- 4. errors ---------------------------------------------------------------------------------
def test_history_of_another_spec_compression_or_batch_is_refused(table):
    ids = np.zeros((2, 1), np.int64)
    other = NgramHistory(make_spec(3, "xxh64", seed=5), COMP, batch_size=2)
    with pytest.raises(engram.SpecMismatchError, match=r"history was made for another spec: seed=5 \(here: 0\)"):
        table.lookup(ids, 0, history=other)
    comp = engram.Compression(np.r_[np.arange(60), np.arange(30) * 2][::-1].copy())
    with pytest.raises(engram.SpecMismatchError, match=r"history was made for another compression"):
        table.prefetch(ids, history=NgramHistory(table.spec, comp, batch_size=2))
    hist = NgramHistory(table.spec, table.compression, batch_size=3)
    with pytest.raises(engram.InputError, match=r"history tracks batch_size=3 sequences but token_ids has B=2"):
        table.lookup(ids, 0, history=hist)
    with pytest.raises(engram.InputError, match=r"token_ids has shape \(2, 1\) but the history tracks batch_size=3"):
        hist.append(ids)
    with pytest.raises(engram.InputError, match=r"history must be an engram.NgramHistory, got list"):
        table.lookup(ids, 0, history=[])


def test_bad_masks_ids_and_sizes_are_refused():
    hist = NgramHistory(make_spec(3), COMP, batch_size=2)
    with pytest.raises(engram.InputError, match=r"mask has shape \(2, 2\) and dtype int64, expected bool of shape "
                       r"\(2, 3\)"):
        hist.append(np.zeros((2, 3), np.int64), mask=np.ones((2, 2), np.int64))
    with pytest.raises(engram.TokenIdError, match=r"token_ids holds id 90, outside \[0, 90\)"):
        hist.append(np.full((2, 1), 90))
    with pytest.raises(engram.InputError, match=r"max_rollback=-1 is invalid: expected an int >= 0"):
        NgramHistory(make_spec(3), COMP, batch_size=2, max_rollback=-1)
    with pytest.raises(engram.InputError, match=r"batch_size=0 is invalid: expected an int >= 1"):
        NgramHistory(make_spec(3), COMP, batch_size=0)
    assert hist.lengths.tolist() == [0, 0]


# -- 5. reorder, reset and unpickling keep every part of the state consistent -------------------------
def _state(hist: NgramHistory) -> tuple:
    return (hist.batch_size, hist.lengths.tolist(), hist.undoable.tolist(), hist.tail()[0].tolist(),
            hist.tail()[1].tolist())


def test_reorder_carries_each_sequences_undo_count_and_rollback_matches_a_recompute():
    hasher = engram.NgramHasher(make_spec(3), COMP)
    rng = np.random.default_rng(7)
    ids = rng.integers(0, VOCAB, (3, 6))
    mask = np.array([[True] * 6, [True, False, False, False, False, True], [True, True, True, False, True, True]])
    hist = NgramHistory(hasher.spec, COMP, batch_size=3, max_rollback=4)
    hist.append(ids, mask=mask)                                # 6, 2 and 5 tokens: undoable 4, 2, 4
    beams = np.array([1, 2, 1, 0])
    hist.reorder(beams)
    assert hist.undoable.tolist() == [2, 4, 2, 4] and hist.lengths.tolist() == [2, 5, 2, 6]
    hist.rollback(np.array([2, 3, 1, 4]))
    for b, (src, undone) in enumerate(zip(beams, [2, 3, 1, 4], strict=True)):
        kept = ids[src][mask[src]][: mask[src].sum() - undone]         # what a fresh history would have seen
        fresh = NgramHistory(hasher.spec, COMP, batch_size=1, max_rollback=4)
        fresh.append(kept[None])
        probe = rng.integers(0, VOCAB, (1, 3))
        np.testing.assert_array_equal(hasher.hash(probe, 0, history=_row(hist, b))[0], hasher.hash(probe, 0,
                                                                                                  history=fresh)[0])
        assert hist.lengths[b] == kept.size
    with pytest.raises(engram.InputError, match=r"sequence 0 can undo only 0 tokens"):
        hist.rollback(np.array([1, 0, 0, 0]))


def _row(hist: NgramHistory, b: int) -> NgramHistory:
    single = pickle.loads(pickle.dumps(hist))
    single.reorder([b])
    return single


def test_reset_without_which_equals_a_fresh_history():
    spec = make_spec(4)
    hist = NgramHistory(spec, COMP, batch_size=2, max_rollback=3)
    hist.append(np.random.default_rng(8).integers(0, VOCAB, (2, 7)), doc_start=np.eye(2, 7, 3, dtype=bool))
    hist.rollback(1)
    hist.reset()
    fresh = NgramHistory(spec, COMP, batch_size=2, max_rollback=3)
    assert _state(hist) == _state(fresh)
    probe = np.arange(6).reshape(2, 3)
    hasher = engram.NgramHasher(spec, COMP)
    np.testing.assert_array_equal(hasher.hash(probe, 2, history=hist), hasher.hash(probe, 2, history=fresh))


# -- 6. a pickled state is checked as the constructor and append check theirs ------------------------
def _tampered(hist: NgramHistory, **changes) -> bytes:
    state = dict(hist.__dict__, **changes)
    clone = NgramHistory.__new__(NgramHistory)
    clone.__dict__.update(state)                   # what a damaged or altered pickle would carry
    return pickle.dumps(clone)


@pytest.mark.parametrize("changes, message", [
    (lambda h: {"_ids": np.where(h._ids == h._ids[0, -1], -3, h._ids)}, r"holds token id -3, outside \[0, 90\)"),
    (lambda h: {"_ids": np.full_like(h._ids, 90)}, r"holds token id 90, outside \[0, 90\) and not the pad id 7"),
    (lambda h: {"_ids": h._ids[:, 1:]}, r"field _ids is a ndarray of dtype int64 and shape \(2, 4\), expected int64 "
                                        r"of shape \(2, 5\)"),
    (lambda h: {"_ids": h._ids.astype(np.int32)}, r"field _ids is a ndarray of dtype int32"),
    (lambda h: {"_ids": h._ids.tolist()}, r"field _ids is a list, expected int64 of shape \(1, 5\)"),
    (lambda h: {"_starts": h._starts.astype(np.int8)}, r"field _starts is a ndarray of dtype int8"),
    (lambda h: {"_lengths": h._lengths[:1]}, r"field _lengths is a ndarray of dtype int64 and shape \(1,\)"),
    (lambda h: {"_undo": h._undo + 5}, r"has lengths \[5, 5\] and undoable counts \[8, 8\]: expected 0 <= "
                                       r"undoable <= min\(length, max_rollback=3\)"),
    (lambda h: {"_lengths": h._lengths * 0 - 1}, r"has lengths \[-1, -1\]"),
    (lambda h: {"max_rollback": -1}, r"has max_rollback=-1"),
    (lambda h: {"context_size": 5}, r"has vocab_size=90 and context_size=5, expected a vocabulary in "
                                    r"\[1, 134217728\] and the spec's N-1=2"),
    (lambda h: {"vocab_size": 2**40}, r"has vocab_size=1099511627776 and context_size=2"),
    (lambda h: {"fingerprint": None}, r"has fingerprint=None"),
    (lambda h: {"decoding_rank": -2}, r"has decoding_rank=-2"),
    (lambda h: {"spec": "spec"}, r"field spec is a str, expected an engram.TableSpec"),
    (lambda h: {"extra": 1}, r"has fields \[.*'extra'.*\], expected"),
])
def test_a_tampered_pickle_is_refused(changes, message):
    hist = NgramHistory(make_spec(3), COMP, batch_size=2, max_rollback=3)
    hist.append(np.arange(10).reshape(2, 5) + 3)
    blob = _tampered(hist, **changes(hist))
    with pytest.raises(engram.InputError, match=rf"NgramHistory state {message}.*the pickled history is damaged or "
                                                r"was altered"):
        pickle.loads(blob)
    assert _state(pickle.loads(pickle.dumps(hist))) == _state(hist)        # an honest pickle still loads


def test_a_tampered_spec_in_the_pickle_is_refused():
    hist = NgramHistory(make_spec(3), COMP, batch_size=1)
    spec = make_spec(3)
    object.__setattr__(spec, "n_head_per_ngram", -4)          # a frozen dataclass, edited as a pickle could be
    with pytest.raises(engram.SpecError, match=r"n_head_per_ngram=-4 is invalid"):
        pickle.loads(_tampered(hist, spec=spec))


# -- 7. typed errors for ids and counts that are not ids and counts ---------------------------------------
@pytest.mark.parametrize("ids, message", [
    ([[1, 2], [3]], r"token_ids is a ragged list \(rows of different lengths\)"),
    (None, r"token_ids must be integers, got dtype=object"),
    ("abc", r"token_ids must be integers, got dtype=<U3"),
    ([[1.5, 2.0], [3.0, 4.0]], r"token_ids must be integers, got dtype=float64"),
    ([1, 2], r"token_ids must be shaped \[B, T\]"),
])
def test_append_refuses_what_is_not_a_batch_of_ids(ids, message):
    hist = NgramHistory(make_spec(3), COMP, batch_size=2)
    with pytest.raises(engram.InputError, match=message):
        hist.append(ids)
    assert hist.lengths.tolist() == [0, 0]


@pytest.mark.parametrize("n, message", [
    (2**63, r"rollback n=9223372036854775808 exceeds max_rollback=3"),
    (2**70, r"rollback n=1180591620717411303424 exceeds max_rollback=3"),
    (-2**64, r"rollback n=-18446744073709551616 is negative"),
    ([2**63, 0], r"rollback n=\[9223372036854775808, 0\] exceeds max_rollback=3"),
])
def test_rollback_counts_past_int64_are_typed_errors(n, message):
    hist = NgramHistory(make_spec(3), COMP, batch_size=2, max_rollback=3)
    hist.append(np.ones((2, 4), np.int64))
    with pytest.raises(engram.InputError, match=message):
        hist.rollback(n)
    assert hist.undoable.tolist() == [3, 3]
