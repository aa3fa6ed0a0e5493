"""The lookup engine: prefetch handles, batch dedup, the hot-row cache and the lookup counters."""

from __future__ import annotations

import concurrent.futures
import gc
import os
import pickle
import threading
import time
import weakref

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import engram
from engram.serving import direct
from engram.serving.cache import LayerCache
from engram.serving.gather import unique_inverse

VOCAB = 600
COMP = engram.Compression(np.arange(VOCAB) // 2)
TIERS = ["ram", "mmap", "direct"]


def make_spec(**changes) -> engram.TableSpec:
    spec = engram.TableSpec(engram_vocab_size=(2000, 2100), max_ngram_size=3, n_head_per_ngram=2,
                            n_embed_per_ngram=32, layer_ids=(1, 5), compressed_vocab_size=COMP.compressed_vocab_size)
    return spec.replace(**changes) if changes else spec


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "t.engram"      # 64-byte rows, 2048-row chunks
    engram.build_table(out, make_spec(), COMP, seed=3, chunk_rows=2048).close()
    return out


def ids_(seed: int, shape=(2, 30)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape)


def plan_for(rows: dict[int, list[int]], spec=None, comp=COMP) -> engram.HotRowPlan:
    """A hand-made plan: rows per layer, most used first."""
    rows = {i: np.asarray(r, np.int64) for i, r in rows.items()}
    lookups = {i: np.arange(r.size, 0, -1, dtype=np.int64) for i, r in rows.items()}
    return engram.HotRowPlan(spec or make_spec(), comp.fingerprint, 100, rows, lookups)


def wait_until(condition, limit: float = 30.0) -> bool:
    """Poll `condition` until it holds (True) or `limit` seconds pass (False)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


class Gate:
    """Wraps a table's row gathers so a test decides when they may run, and sees where they ran."""

    def __init__(self, table, before=None) -> None:
        self.open, self.entered, self.threads = threading.Event(), threading.Event(), []
        self._gather, self._before = table._engine.gather, before
        table._engine.gather = self

    def __call__(self, *args) -> None:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        if self._before is not None:
            self._before()
        assert self.open.wait(30), "the test never opened the gate"
        self._gather(*args)


# -- prefetch --------------------------------------------------------------------------------
@pytest.mark.parametrize("tier", TIERS)
def test_prefetch_result_equals_lookup(path, tier, lookup_path):
    ids = ids_(0)
    with engram.open(path, tier=tier) as table:
        expected = table.lookup(ids, None)
        handle = table.prefetch(ids)
        result = handle.result()
        assert list(result) == [1, 5] and all(torch.equal(result[i], expected[i]) for i in expected)
        assert torch.equal(handle.result(5), expected[5]) and handle.done() and not handle.cancelled()
        one = table.prefetch(torch.from_numpy(ids).to(torch.int32), layer_ids=[5], dtype=torch.float64)
        assert list(one.result()) == [5] and torch.equal(one.result(5), expected[5].double())
        with pytest.raises(engram.InputError, match=r"layer_id=1 was not prefetched: expected one of \(5,\)"):
            one.result(1)
        assert torch.equal(table.prefetch(ids, layer_ids=1, device="cpu").result(1), expected[1])


def test_prefetch_copies_the_ids_and_checks_them_at_once(path):
    with engram.open(path, tier="ram") as table:
        ids = ids_(1)
        expected = table.lookup(ids, 1)
        gate = Gate(table)
        handle = table.prefetch(ids, layer_ids=1)
        ids[:] = 0                                         # the caller reuses its id buffer at once
        gate.open.set()
        assert torch.equal(handle.result(1), expected)
        with pytest.raises(engram.TokenIdError, match=r"outside \[0, 600\)"):
            table.prefetch(np.full((1, 3), VOCAB))
        with pytest.raises(engram.InputError, match=r"layer_id=3 has no table"):
            table.prefetch(ids, layer_ids=[3])
        with pytest.raises(engram.InputError, match=r"dtype=torch.int64 is invalid"):
            table.prefetch(ids, dtype=torch.int64)
        with pytest.raises(engram.InputError, match=r"device='nowhere' is not a torch device"):
            table.prefetch(ids, device="nowhere")
        if not torch.cuda.is_available():
            with pytest.raises(engram.InputError, match=r"device='cuda' needs CUDA"):
                table.prefetch(ids, device="cuda")


def test_prefetch_runs_on_the_prefetch_thread_while_the_caller_goes_on(path):
    ids = ids_(2)
    with engram.open(path, tier="mmap") as table:
        expected = table.lookup(ids, None)
        gate = Gate(table)
        handle = table.prefetch(ids)                       # returns while its gather is held back
        assert gate.entered.wait(30) and not handle.done() and "pending" in repr(handle)
        with pytest.raises(TimeoutError):
            handle.result(timeout=0.01)
        gate.open.set()
        assert all(torch.equal(handle.result()[i], expected[i]) for i in expected)
        assert set(gate.threads) == {"engram-prefetch_0"}
        assert table.stats().blocked_seconds > 0           # result() had to wait


def test_prefetch_finishes_while_the_main_thread_computes(path):
    # The gather starts only once the main thread is inside its compute loop, and the loop runs
    # until the handle is done: the lookup ran alongside the compute, not before or after it.
    ids = ids_(3, (4, 64))
    with engram.open(path, tier="ram") as table:
        expected = table.lookup(ids, 1)
        computing = threading.Event()
        gate = Gate(table, before=lambda: computing.wait(30))
        gate.open.set()
        handle = table.prefetch(ids, layer_ids=1)
        a, steps = torch.randn(64, 64), 0
        while not handle.done():
            computing.set()
            a = torch.tanh(a @ a)
            steps += 1
        table.reset_stats()
        assert steps >= 1 and torch.equal(handle.result(1), expected)
        assert table.stats().blocked_seconds == 0.0        # a finished handle never blocks


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("tier", TIERS)
def test_prefetch_errors_come_back_from_result_unchanged(path, tier, tmp_path):
    with engram.open(path, tier=tier) as table:
        error = Boom("disk on fire")

        def fail(*args):
            raise error

        table._engine.gather = fail
        handle = table.prefetch(ids_(4))
        with pytest.raises(Boom) as caught:
            handle.result()
        assert caught.value is error and handle.done()


def test_prefetch_of_a_table_truncated_after_open_raises_corrupt_table_error(path, tmp_path):
    import shutil

    copy = tmp_path / "t.engram"
    shutil.copytree(path, copy)
    with engram.open(copy, tier="direct") as table:
        for chunk in (copy / "layer_1" / "c").iterdir():
            os.truncate(chunk / "0", 0)
        with pytest.raises(engram.CorruptTableError, match=r"chunk \d+ .* changed after the table was opened: its "
                                                           r"size went from \d+ to 0 bytes"):
            table.prefetch(ids_(5), layer_ids=1).result()


def test_close_cancels_queued_prefetches_and_waits_for_the_running_one(path):
    ids = ids_(6)
    table = engram.open(path, tier="direct")
    expected = table.lookup(ids, None)
    gate = Gate(table)
    running = table.prefetch(ids)
    assert gate.entered.wait(30)
    queued = [table.prefetch(ids) for _ in range(2)]
    closer = threading.Thread(target=table.close)
    closer.start()
    assert wait_until(lambda: all(q.done() for q in queued))
    assert all(q.cancelled() for q in queued) and not running.done()
    gate.open.set()
    closer.join(30)
    assert not closer.is_alive() and table.closed
    assert all(torch.equal(running.result()[i], expected[i]) for i in expected)
    for q in queued:
        with pytest.raises(concurrent.futures.CancelledError):
            q.result()
    with pytest.raises(engram.InputError, match="is closed"):
        table.prefetch(ids)


def test_cancel_before_start_and_after(path):
    with engram.open(path, tier="ram") as table:
        gate = Gate(table)
        first = table.prefetch(ids_(7))
        assert gate.entered.wait(30)
        second = table.prefetch(ids_(7))
        assert second.cancel() and second.cancelled() and not first.cancel()
        gate.open.set()
        assert first.result()[1].shape == (2, 30, table.spec.embed_dim)
        with pytest.raises(concurrent.futures.CancelledError):
            second.result()


def test_a_finished_handle_is_not_kept_and_its_rows_are_recycled(path):
    ids = ids_(8)
    with engram.open(path, tier="ram") as table:
        handle = table.prefetch(ids, layer_ids=1)
        rows = handle.result(1)
        ptr, ref = rows.data_ptr(), weakref.ref(handle)
        del handle, rows
        gc.collect()
        assert ref() is None                               # the table holds no finished handle
        assert table.lookup(ids, 1).data_ptr() == ptr      # its output memory went back to the pool


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_prefetch_to_cuda(path):
    ids = ids_(9, (3, 50))
    with engram.open(path, tier="direct") as table:
        expected = table.lookup(ids, None)
        for _ in range(3):                                  # pinned buffers are reused once copied
            handle = table.prefetch(torch.from_numpy(ids).cuda(), device="cuda")
            result = handle.result()
            assert all(r.device.type == "cuda" for r in result.values())
            assert all(torch.equal(result[i].cpu(), expected[i]) for i in expected)
        half = table.prefetch(ids, layer_ids=5, device="cuda:0", dtype=torch.float16).result(5)
        assert half.dtype == torch.float16 and torch.equal(half.cpu(), expected[5].half())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_prefetch_of_quantized_rows_to_cuda(tmp_path):
    path = tmp_path / "fp8.engram"
    engram.build_table(path, make_spec(dtype="float8_e4m3", scale_block=8), COMP, seed=2).close()
    ids = ids_(10, (3, 50))
    with engram.open(path, tier="direct") as table:
        expected = table.lookup(ids, None)
        result = table.prefetch(torch.from_numpy(ids).cuda(), device="cuda").result()
        assert all(r.device.type == "cuda" and r.dtype == torch.float32 for r in result.values())
        assert all(torch.equal(result[i].cpu(), expected[i]) for i in expected)
        bf16 = table.prefetch(ids, layer_ids=5, device="cuda", dtype=torch.bfloat16).result(5)
        assert bf16.dtype == torch.bfloat16 and torch.equal(bf16.cpu(), expected[5].to(torch.bfloat16))


# -- dedup ----------------------------------------------------------------------------------
@given(st.lists(st.integers(0, 50), max_size=200))
def test_unique_inverse_matches_numpy(values):
    rows = np.asarray(values, np.int64)
    uniq, inverse = unique_inverse(rows)
    assert np.array_equal(uniq, np.unique(rows)) and np.array_equal(uniq[inverse.numpy()], rows)


def test_dedup_argument_is_checked_and_pickled(path):
    with pytest.raises(engram.InputError, match=r"dedup='yes' is invalid: expected True, False or None"):
        engram.open(path, dedup="yes")
    with engram.open(path, tier="ram", dedup=True) as table:
        with pickle.loads(pickle.dumps(table)) as copy:
            assert copy.dedup and copy.tier == "ram"


# -- hot-row cache --------------------------------------------------------------------------
@given(st.data())
def test_cache_probe_finds_exactly_the_cached_rows(data):
    n_rows = data.draw(st.integers(1, 3000))
    cached = np.unique(np.asarray(data.draw(st.lists(st.integers(0, n_rows - 1), max_size=300)), np.int64))
    keys = np.asarray(data.draw(st.lists(st.integers(0, n_rows - 1), max_size=300)), np.int64)
    if data.draw(st.booleans()):
        keys = np.sort(keys)
    expected = np.array([np.searchsorted(cached, k) if k in set(cached.tolist()) else -1 for k in keys.tolist()],
                        np.int64)
    for dense in (True, False):
        cache = LayerCache(cached, torch.zeros(cached.size, 1), n_rows, dense=dense)
        assert np.array_equal(cache.probe(keys), expected)


def test_stats_count_a_crafted_batch_exactly(path):
    # 64-byte rows, 64 to a 4 KiB block, 2048 to a chunk file.
    rows = np.array([5, 5, 5, 7, 9, 9, 100, 2000, 3000, 3000])
    plan = plan_for({1: [100, 5, 3000], 5: [1]})
    with engram.open(path, tier="direct") as table:
        assert table.load_hot_rows(plan, rows=2) == {1: 2, 5: 1}
        table.rows(1, rows)
        s = table.stats()
        assert (s.lookups, s.rows_requested, s.rows_unique, s.rows_from_cache) == (1, 10, 6, 2)
        # rows 7 and 9 share block 0 of chunk 0; 2000 is block 31 of chunk 0; 3000 is in chunk 1
        assert (s.rows_from_disk, s.disk_reads, s.bytes_from_disk, s.cached_rows) == (4, 3, 3 * 4096, 3)
        assert s.unique_fraction == 0.6 and s.cache_hit_rate == 2 / 6 and s.cache_misses == 4
        assert s.to_dict()["unique_fraction"] == 0.6 and s.rows_from_memory == s.prefetches == 0
        table.reset_stats()
        assert table.stats() == engram.LookupStats(cached_rows=3)
        ids = ids_(10)
        table.prefetch(ids).result()
        s = table.stats()
        assert (s.prefetches, s.lookups, s.rows_requested) == (1, 2, 2 * 2 * 30 * 4)
    with engram.open(path, tier="ram") as table:
        table.load_hot_rows(plan, rows=2)
        table.rows(1, rows)
        s = table.stats()
        assert (s.rows_requested, s.rows_unique, s.rows_from_cache, s.rows_from_memory) == (10, 10, 4, 6)
        assert s.bytes_from_disk == s.rows_from_disk == 0
        table.clear_hot_rows()
        assert table.stats().cached_rows == 0


def test_direct_reads_cover_small_gaps_in_one_read(path):
    # 64-byte rows: row r sits in block r // 64 of its chunk file.
    rows = np.array([0, 64 * 2, 64 * 60, 64 * 60 + 1])         # blocks 0, 2 (a 4 KiB gap) and 60
    with engram.open(path, tier="mmap") as mapped, engram.open(path, tier="direct") as table:
        assert torch.equal(table.rows(1, rows), mapped.rows(1, rows))
        assert torch.equal(table.rows(1, rows[::-1].copy()), mapped.rows(1, rows[::-1].copy()))
        s = table.stats()
        assert (s.disk_reads, s.bytes_from_disk) == (2 * 2, 2 * (3 + 1) * 4096)
        far = direct.GAP_BYTES // 4096 + 2                 # a gap of GAP_BYTES + 4 KiB after block 0
        table.reset_stats()
        table.rows(1, np.array([0, 64 * far]))
        assert table.stats().disk_reads == 2


def test_cached_rows_between_misses_are_read_through_not_split_around(path):
    # 64-byte rows: row 64*b starts block b. Misses in blocks 0 and 4 with cached rows in blocks 1-3
    # between them: one read of blocks 0-4, where skipping the cached rows would need two.
    rows = np.array([0, 64, 128, 192, 256])
    with engram.open(path, tier="mmap") as mapped, engram.open(path, tier="direct") as table:
        table.load_hot_rows(plan_for({1: [64, 128, 192]}), fraction=1.0)
        assert torch.equal(table.rows(1, rows), mapped.rows(1, rows))
        s = table.stats()
        assert (s.disk_reads, s.bytes_from_disk, s.rows_from_disk, s.rows_from_cache) == (1, 5 * 4096, 5, 0)
        table.reset_stats()
        edge = np.array([0, 64, 128, 192])                 # cached rows after the last miss stay cached
        assert torch.equal(table.rows(1, edge), mapped.rows(1, edge))
        s = table.stats()
        assert (s.disk_reads, s.bytes_from_disk, s.rows_from_disk, s.rows_from_cache) == (1, 4096, 1, 3)


def test_cached_rows_are_the_tables_rows(path):
    with engram.open(path, tier="direct") as table:
        every = table.rows(5, np.arange(table.spec.rows(5)))
        table.load_hot_rows(plan_for({5: [0, 17, 4000, table.spec.rows(5) - 1]}), fraction=1.0)
        pick = np.array([17, 3, 4000, 17, table.spec.rows(5) - 1, 0])
        assert torch.equal(table.rows(5, pick), every[torch.from_numpy(pick)])
        assert table.stats().rows_from_cache == 4


def test_max_bytes_takes_the_most_used_rows_over_all_layers(path):
    spec = make_spec()
    plan = engram.HotRowPlan(spec, COMP.fingerprint, 100, {1: np.array([10, 11, 12]), 5: np.array([20, 21])},
                             {1: np.array([9, 5, 1]), 5: np.array([7, 6])})
    with engram.open(path, tier="ram") as table:
        assert table.load_hot_rows(plan, max_bytes=3 * spec.row_bytes + 1) == {1: 1, 5: 2}
        assert table.load_hot_rows(plan, max_bytes=0) == {1: 0, 5: 0}


def test_hot_row_plans_must_match_the_table(path, tmp_path):
    with engram.open(path, tier="ram") as table:
        with pytest.raises(engram.SpecMismatchError, match="counted for another spec"):
            table.load_hot_rows(plan_for({1: [1]}, spec=make_spec(seed=9)), fraction=1.0)
        with pytest.raises(engram.SpecMismatchError, match="counted with another compression"):
            table.load_hot_rows(plan_for({1: [1]}, comp=engram.Compression(np.arange(VOCAB) // 3)), fraction=1.0)
        with pytest.raises(engram.InputError, match=r"pass exactly one of fraction=, rows= or max_bytes=, got "
                           r"\['fraction', 'rows'\]"):
            table.load_hot_rows(plan_for({1: [1]}), fraction=0.5, rows=3)
        with pytest.raises(engram.InputError, match=r"rows=-1 is invalid"):
            table.load_hot_rows(plan_for({1: [1]}), rows=-1)
        with pytest.raises(engram.InputError, match=r"plan holds row 8238 outside \[0, 8238\) for layer 1"):
            table.load_hot_rows(plan_for({1: [0, 8238]}), fraction=1.0)
        with pytest.raises(engram.MissingFileError, match="does not exist"):
            table.load_hot_rows(tmp_path / "missing.npz", fraction=0.1)
        plan_for({1: [4, 2]}).save(tmp_path / "hot.npz")
        assert table.load_hot_rows(tmp_path / "hot.npz", fraction=0.5) == {1: 1}
        assert table.stats().cached_rows == 1


@pytest.mark.parametrize("tier", TIERS)
def test_quantized_tables_cache_encoded_rows_and_take_plans_of_the_float_table(tmp_path, tier):
    spec = make_spec(dtype="int8")                          # D = 16: 16 bytes of values + 4 of scales a row
    path = tmp_path / "int8.engram"
    engram.build_table(path, spec, COMP, seed=3).close()
    float_plan = plan_for({5: [0, 17, 4000, spec.rows(5) - 1], 1: [3]})     # counted for the float32 spec
    with engram.open(path, tier=tier) as table:
        every = table.rows(5, np.arange(spec.rows(5)))
        assert table.load_hot_rows(float_plan, fraction=1.0) == {5: 4, 1: 1}
        assert table._engine.cache.layers[5].data.dtype == torch.int8        # encoded values, not floats
        pick = np.array([17, 3, 4000, 17, spec.rows(5) - 1, 0])
        assert torch.equal(table.rows(5, pick), every[torch.from_numpy(pick)])
        assert table.stats().rows_from_cache == (4 if table.dedup else 5)            # row 17 twice
        assert table.load_hot_rows(float_plan, max_bytes=3 * 16) == {5: 3, 1: 0}   # stored value bytes
        with pytest.raises(engram.SpecMismatchError, match="counted for another spec"):
            table.load_hot_rows(plan_for({1: [1]}, spec=make_spec(seed=9)), fraction=1.0)


def test_gathers_keep_buffers_only_up_to_a_bound(path, monkeypatch):
    from engram.serving import gather

    monkeypatch.setattr(gather, "KEEP_BUFFER_BYTES", 64 * 100)      # 100 rows of 64 bytes
    with engram.open(path, tier="direct") as table:                  # dedup: staged through a buffer
        small, big = np.arange(0, 200, 2), np.arange(table.spec.rows(1))
        first = table.rows(1, small)
        kept = table._engine._local.buf                               # the staging buffer of 100 rows
        assert kept.numel() == 64 * 100
        assert torch.equal(table.rows(1, big)[small], first)          # staged in a buffer of its own
        assert table._engine._local.buf is kept
        assert torch.equal(table.rows(1, small), first)


def test_a_gap_of_exactly_the_merge_threshold_is_read_through(path):
    # 64-byte rows: row 64*b starts block b. Blocks 0 and 0+1+GAP/4096 leave exactly GAP_BYTES between them.
    gap_blocks = direct.GAP_BYTES // 4096
    with engram.open(path, tier="direct") as table:
        table.rows(1, np.array([0, 64 * (1 + gap_blocks)]))
        s = table.stats()
        assert (s.disk_reads, s.bytes_from_disk) == (1, (2 + gap_blocks) * 4096)
        table.reset_stats()
        table.rows(1, np.array([0, 64 * (2 + gap_blocks)]))      # one block more: two reads
        assert (table.stats().disk_reads, table.stats().bytes_from_disk) == (2, 2 * 4096)


@pytest.mark.parametrize("tier", TIERS)
def test_a_batch_served_entirely_from_the_hot_row_cache(path, tier):
    rows = np.array([5, 5, 9, 100, 2000, 3000])
    with engram.open(path, tier="mmap") as mapped, engram.open(path, tier=tier) as table:
        table.load_hot_rows(plan_for({1: [3000, 2000, 100, 9, 5, 7]}), fraction=1.0)
        calls = []
        real = table._tier.gather
        table._tier.gather = lambda *a, **kw: calls.append(a) or real(*a, **kw)
        assert torch.equal(table.rows(1, rows), mapped.rows(1, rows))
        s = table.stats()
        assert s.rows_from_cache == s.rows_unique and s.rows_from_memory == s.rows_from_disk == s.disk_reads == 0
        assert calls == []                   # the tier was not asked for anything


def _mapping_permissions(address: int) -> str:
    """The permissions ("r--p", ...) of the mapping holding `address`, from /proc/self/maps."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            start, stop = (int(x, 16) for x in span.split("-"))
            if start <= address < stop:
                return perms
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
@pytest.mark.parametrize("tier", ["ram", "mmap"])
def test_in_memory_tiers_hold_their_rows_read_only(path, tier):
    with engram.open(path, tier=tier) as table:
        weights = table._tier.weights[1]
        for address in (weights.data_ptr(), weights.data_ptr() + weights.nbytes - 1):
            assert _mapping_permissions(address).startswith("r-"), tier
