"""engram.distributed: row-sharded tables over torch.distributed (gloo on localhost, 2 and 4 ranks).

Starting a rank costs a torch import, so four ranks are spawned once (a module fixture): ranks 0
and 1 run the two-rank cases over a group of their own while 2 and 3 wait, then all four run the
four-rank cases; each test checks its case's outcome on every rank that ran it. Groups have short
timeouts and the spawn a deadline, so a rank that raises never leaves the others (or the suite)
hanging.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

import engram
from engram.making.sharding import shard_path, shard_table
from tests.distributed.decode_cases import CASES as DECODE_CASES

VOCAB = 1000
SPEC = dict(engram_vocab_size=(3000, 3000), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=64,
            layer_ids=(1, 4), compressed_vocab_size=VOCAB)
PSS_MIB = 16
TIMEOUT = datetime.timedelta(seconds=20)     # how long a collective waits for a rank that does not come


def _spec(**changes):
    return engram.TableSpec(**{**SPEC, **changes})


# ------------------------------------------------------------------------------------------
# the spawn harness
# ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, root: str, phases: list[tuple[int, list[str]]]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))                  # the wait between phases
    results = {}
    for size, names in phases:
        group = dist.new_group(list(range(size)), timeout=TIMEOUT) if size < world else None
        if rank < size:
            for name in names:
                start = time.perf_counter()
                try:
                    results[f"{size}:{name}"] = {"ok": True, "value": CASES[name](rank, size, Path(root), group)}
                except Exception:
                    results[f"{size}:{name}"] = {"ok": False, "error": traceback.format_exc()}
                results[f"{size}:{name}"]["seconds"] = time.perf_counter() - start
                Path(root, f"results-{rank}.json").write_text(json.dumps(results))
        dist.barrier()                                        # every rank, between phases
    dist.destroy_process_group()


def _spawn(root: Path, phases: list[tuple[int, list[str]]], deadline_s: float = 180) -> dict[str, list[dict]]:
    """Run each phase's cases on its first `size` ranks; {"size:case": [outcome of rank 0, 1, ...]}."""
    import torch.multiprocessing as mp

    world = max(size for size, _ in phases)
    ctx = mp.start_processes(_rank_main, args=(world, _free_port(), os.fspath(root), phases), nprocs=world,
                             join=False, start_method="spawn")
    end = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > end:
                raise TimeoutError(f"{world} ranks still running after {deadline_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    ranks = [json.loads(Path(root, f"results-{r}.json").read_text()) for r in range(world)]
    return {f"{size}:{name}": [ranks[r].get(f"{size}:{name}", {"ok": False, "error": "not run"}) for r in range(size)]
            for size, names in phases for name in names}


def _outcome(results: dict[str, list[dict]], name: str) -> list:
    """The values the case returned on every rank that ran it; fails with the first failing rank's traceback."""
    for rank, out in enumerate(results[name]):
        assert out["ok"], f"rank {rank} failed case {name}:\n{out['error']}"
    return [out["value"] for out in results[name]]


# ------------------------------------------------------------------------------------------
# cases: each runs on every rank, asserts what it can there, returns what the parent checks
# ------------------------------------------------------------------------------------------
def _ids(rank: int, step: int = 0, vocab: int = VOCAB) -> np.ndarray:
    """Each rank its own batch, of its own shape (rank 1 of 4 has none)."""
    rng = np.random.default_rng([rank, abs(step), step < 0])
    shape = (0, 0) if rank == 1 and step < 0 else (1 + rank % 3, 5 + rank)
    return rng.integers(0, vocab, shape)


def _case_lookup(rank: int, world: int, root: Path, group) -> str:
    from engram.distributed import ShardedTable

    full = engram.open(root / "full")
    ways = (("mmap", None, False), ("mmap", True, True), ("ram", None, True), ("direct", None, False))
    for tier, dedup, wire in ways:                # wire: each distinct row sent to its owner once
        with ShardedTable(shard_path(root / "full", rank, world), group, tier, dedup=dedup, wire_dedup=wire,
                          timeout=TIMEOUT) as st:
            assert st.shard.parts == world and st.shard.rank == rank
            for step, lid in ((0, 1), (1, 4), (-1, 1)):
                ids = _ids(rank, step)
                assert torch.equal(st.lookup(ids, lid), full.lookup(ids, lid)), (tier, lid, step)
            ids = _ids(rank, 2)
            got = st.lookup(torch.from_numpy(ids), 4, dtype=torch.bfloat16)
            assert got.dtype == torch.bfloat16 and torch.equal(got, full.lookup(ids, 4, dtype=torch.bfloat16))
    with ShardedTable(shard_path(root / "full", rank, world), group, "direct", timeout=TIMEOUT) as st:   # hot rows
        spec, hasher = full.spec, engram.NgramHasher(full.spec, full.compression)
        every = [_ids(r, 0) for r in range(world)]                                      # every rank's batch
        hot = {lid: np.unique(np.concatenate([hasher.global_rows(x, lid).ravel() for x in every]))
               for lid in spec.layer_ids}
        counts = {i: np.ones(r.size) for i, r in hot.items()}
        plan = engram.HotRowPlan(spec, full.compression.fingerprint, 0, hot, counts)
        cached = st.load_hot_rows(plan, fraction=1.0)
        lo, hi = st.shard.ranges[1]
        assert cached[1] == int(((hot[1] >= lo) & (hot[1] < hi)).sum()) > 0      # only the rows it holds
        assert torch.equal(st.lookup(_ids(rank, 0), 1), full.lookup(_ids(rank, 0), 1))
        assert st.stats().rows_from_cache > 0
    return "ok"


def _case_quantized_and_built(rank: int, world: int, root: Path, group) -> str:
    from engram.distributed import ShardedTable

    tables = [(root / q, shard_path(root / q, rank, world)) for q in ("fp8", "int8", "int4")]
    for whole, part in [*tables, (root / "full", root / f"built-{rank}")]:
        full = engram.open(whole)
        with ShardedTable(part, group, timeout=TIMEOUT) as st:
            for lid in (1, 4):
                ids = _ids(rank, lid)
                assert torch.equal(st.lookup(ids, lid), full.lookup(ids, lid))
                bf16 = torch.bfloat16
                assert torch.equal(st.lookup(ids, lid, dtype=bf16), full.lookup(ids, lid, dtype=bf16))
            st.reset_stats()                           # rank 0 alone asks: what comes back is rows as stored
            st.lookup(_ids(rank, 5) if rank == 0 else np.empty((0, 0), np.int64), 1)
            wire = st.wire_stats()
            if rank == 0:
                assert wire["bytes_received"] == wire["rows_remote"] * full.spec.stored_row_bytes > 0
    return "ok"


def _case_empty_rank_and_prefetch(rank: int, world: int, root: Path, group) -> dict:
    from engram.distributed import ShardedTable

    full = engram.open(root / "full")
    with ShardedTable(shard_path(root / "full", rank, world), group, timeout=TIMEOUT) as st:
        ids = np.empty((0, 0), np.int64) if rank == 1 else _ids(rank, 3)
        handle = st.prefetch(ids)                                   # both layers, on the exchange thread
        later = st.lookup(_ids(rank, 4), 4)                         # queued behind the prefetch
        for lid in (1, 4):
            assert torch.equal(handle.result(lid), full.lookup(ids, lid))
        assert torch.equal(later, full.lookup(_ids(rank, 4), 4))
        wire = st.wire_stats()
        served = st.stats().rows_requested
    return {"wire": wire, "served": served}


def _case_memory(rank: int, world: int, root: Path, group) -> str:
    from engram.distributed import ShardedTable

    full = engram.open(root / "full")
    with ShardedTable(shard_path(root / "full", rank, world), group, timeout=TIMEOUT) as st:
        torch.manual_seed(0)
        ref = engram.EngramMemory.from_table(full, layer_id=4, hidden_size=16)
        mem = engram.EngramMemory.from_table(st, layer_id=4, hidden_size=16)
        mem.load_state_dict(ref.state_dict())
        ids = _ids(rank, 5)
        h = torch.randn(*ids.shape, 1, 16)
        assert torch.equal(mem(h, ids), ref(h, ids))
        assert torch.equal(mem(h, st.prefetch(ids, 4)), ref(h, ids))            # a prefetch handle as the ids
    return "ok"


def _refusal(fn) -> list:
    try:
        fn()
    except engram.EngramError as exc:
        return [type(exc).__name__, str(exc)]
    return ["no error", ""]


def _case_refused_calls(rank: int, world: int, root: Path, group) -> list:
    from engram.distributed import ShardedTable

    full = engram.open(root / "full")
    with ShardedTable(shard_path(root / "full", rank, world), group, timeout=TIMEOUT) as st:
        bad_id = _refusal(lambda: st.lookup(np.full((1, 3), VOCAB + 5) if rank == 1 else _ids(rank), 1))
        other_layer = _refusal(lambda: st.lookup(_ids(rank), 1 if rank == 0 else 4))
        no_layer = _refusal(lambda: st.prefetch(_ids(rank), 99 if rank == 1 else None).result())
        assert torch.equal(st.lookup(_ids(rank), 1), full.lookup(_ids(rank), 1))   # still in step afterwards
    return [bad_id, other_layer, no_layer]


def _open_case(paths):
    def case(rank: int, world: int, root: Path, group) -> list:
        from engram.distributed import ShardedTable

        return _refusal(lambda: ShardedTable(root / paths(rank, world), group, timeout=TIMEOUT).close())
    return case


def _load_missing(rank: int, world: int, root: Path, group) -> list:
    from engram.distributed import ShardedRows

    return _refusal(lambda: ShardedRows.load(root / "nowhere" / "rows", group, timeout=TIMEOUT))


def _case_train(rank: int, world: int, root: Path, group) -> dict:
    """Sharded rows + all-reduced dense grads == one process over every rank's batch, SparseAdam."""
    import torch.distributed as dist

    from engram.distributed import ShardedRows

    steps, C, lr_rows, lr = (3 if world == 2 else 2), 8, 5e-3, 1e-3
    full = engram.open(root / "full")
    spec, comp = full.spec, full.compression
    torch.manual_seed(0)
    kinds = {1: engram.EngramMemory, 4: engram.EngramMemoryV41}                # both variants take the rows
    ref = torch.nn.ModuleList(kinds[lid](spec, comp, layer_id=lid, hidden_size=C) for lid in (1, 4))
    for mem in ref:
        mem.rows.data.copy_(full.rows(mem.layer_id, np.arange(spec.rows(mem.layer_id)), dtype=torch.float32))
    rows = ShardedRows(shard_path(root / "full", rank, world), group, lr=lr_rows, wire_dedup=world == 2,
                       timeout=TIMEOUT)                                             # both ways
    model = torch.nn.ModuleList(kinds[lid](spec, comp, layer_id=lid, hidden_size=C, table=rows) for lid in (1, 4))
    model.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.endswith("rows")})
    dense_ref = [p for n, p in ref.named_parameters() if not n.endswith("rows")]
    opt_ref = torch.optim.Adam(dense_ref, lr=lr)
    opt_rows = torch.optim.SparseAdam([m.rows for m in ref], lr=lr_rows)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def batch(r: int, step: int) -> tuple[np.ndarray, torch.Tensor]:
        ids = np.random.default_rng([r, step, 7]).integers(0, VOCAB, (2, 3))
        ids = np.concatenate([ids, ids], axis=1)            # a b c a b c: n-grams repeat, so rows repeat in a batch
        return ids, torch.randn(2, 6, 1, C, generator=torch.Generator().manual_seed(100 * step + r))

    def loss(net: torch.nn.Module, ids: np.ndarray, h: torch.Tensor) -> torch.Tensor:
        return sum(((m(h, ids) - 0.1) ** 2).sum() for m in net)

    for step in range(steps):
        sum(loss(ref, *batch(r, step)) for r in range(world)).backward()      # every rank's batch at once
        for m in ref:                                                         # the touched rows, as a sparse grad
            touched = np.unique(np.concatenate([m.hasher.global_rows(batch(r, step)[0], m.layer_id).ravel()
                                                for r in range(world)]))
            idx = torch.from_numpy(touched)
            m.rows.grad = torch.sparse_coo_tensor(idx[None], m.rows.grad[idx], m.rows.shape,
                                                  check_invariants=True)
        opt_ref.step(), opt_rows.step(), opt_ref.zero_grad(), opt_rows.zero_grad()
        loss(model, *batch(rank, step)).backward()                            # this rank's batch only
        for p in model.parameters():
            dist.all_reduce(p.grad, group=group)
        opt.step(), rows.step(), opt.zero_grad(), rows.zero_grad()
    worst = 0.0
    for m in ref:
        lo, hi = rows.shard.ranges[m.layer_id]
        torch.testing.assert_close(rows.local[m.layer_id].detach(), m.rows.detach()[lo:hi], rtol=1e-5, atol=1e-6)
        worst = max(worst, float((rows.local[m.layer_id].detach() - m.rows.detach()[lo:hi]).abs().max()))
        moved = float((m.rows.detach()[lo:hi] - full.rows(m.layer_id, np.arange(lo, hi))).abs().max())
        assert moved > 1e-4                                                    # training changed the rows
    ids, h = batch(rank, steps)
    torch.testing.assert_close(loss(model, ids, h), loss(ref, ids, h), rtol=1e-5, atol=1e-6)
    path = rows.save(root / f"ckpt{world}" / "rows")
    state = {f"{k}.{lid}": getattr(rows, k)[lid].detach() for k in ("local", "exp_avg", "exp_avg_sq") for lid in (1, 4)}
    torch.save({"state": state, "ranges": {lid: rows.shard.ranges[lid] for lid in (1, 4)}, "steps": rows.steps},
               root / f"ckpt{world}" / f"expect-{rank}.pt")
    return {"worst": worst, "path": path}


def _case_load(rank: int, world: int, root: Path, group) -> dict:
    """The save made on 2 ranks, loaded on this group: each rank holds its new rows and moments."""
    from engram.distributed import ShardedRows

    rows = ShardedRows.load(root / "ckpt2" / "rows", group, timeout=TIMEOUT)
    expect = [torch.load(p) for p in sorted((root / "ckpt2").glob("expect-*.pt"))]
    for lid in (1, 4):
        lo, hi = rows.shard.ranges[lid]
        for key in ("local", "exp_avg", "exp_avg_sq"):
            whole = torch.cat([e["state"][f"{key}.{lid}"] for e in expect])
            assert torch.equal(getattr(rows, key)[lid].detach(), whole[lo:hi]), (key, lid)
    assert rows.steps == expect[0]["steps"] and rows.lr == 5e-3
    full = engram.open(root / "full")
    ids = _ids(rank, 9)
    assert rows.lookup(ids, 1).shape == full.lookup(ids, 1).shape
    return {"parts": rows.shard.parts}


def _smaps(field: str) -> int:
    """A field of this process's /proc/self/smaps_rollup, in bytes."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _case_pss(rank: int, world: int, root: Path, group) -> dict:
    """Every rank maps the same table: together they hold one copy of its pages."""
    import gc

    import torch.distributed as dist

    with engram.open(root / "pss", tier="mmap") as warm:    # first use of the code paths: imports, compiled
        warm.rows(1, np.arange(2))                           # kernels loaded, buffers
    gc.collect()                                  # what earlier cases left is freed before, not during
    dist.barrier(group=group)
    pss, rss = _smaps("Pss"), _smaps("Rss")
    dist.barrier(group=group)
    table = engram.open(root / "pss", tier="mmap", prefault=True)
    table.rows(1, np.arange(0, table.spec.rows(1), 997))                       # touched through lookups too
    dist.barrier(group=group)
    out = {"pss": _smaps("Pss") - pss, "rss": _smaps("Rss") - rss, "bytes": table.nbytes}
    dist.barrier(group=group)
    table.close()
    return out


CASES = {
    "lookup": _case_lookup,
    "quantized_and_built": _case_quantized_and_built,
    "empty_rank_and_prefetch": _case_empty_rank_and_prefetch,
    "memory": _case_memory,
    "refused_calls": _case_refused_calls,
    "open_other_spec": _open_case(lambda r, w: f"full-{r}-of-{w}" if r == 0 else f"other-{r}-of-{w}"),
    "open_other_compression": _open_case(lambda r, w: f"full-{r}-of-{w}" if r == 0 else f"comp-{r}-of-{w}"),
    "open_other_table": _open_case(lambda r, w: f"full-{r}-of-{w}" if r == 0 else f"twin-{r}-of-{w}"),
    "open_overlap": _open_case(lambda r, w: f"full-0-of-{w}"),
    "open_other_parts": _open_case(lambda r, w: f"full-{r}-of-{w}" if r == 0 else f"full-{r}-of-{2 * w}"),
    "open_whole": _open_case(lambda r, w: f"full-{r}-of-{w}" if r == 0 else "full"),
    "open_missing": _open_case(lambda r, w: f"full-{r}-of-{w}" if r == 0 else "nowhere"),
    "load_missing": _load_missing,
    "train": _case_train,
    "load": _case_load,
    "pss": _case_pss,
    **DECODE_CASES,
}
TWO = [name for name in CASES if name not in ("pss", "load")]
FOUR = ["pss", "lookup", "load", "refused_calls", "train"]


# ------------------------------------------------------------------------------------------
# fixtures and tests
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Every table the cases open: a whole table and its parts for 2 and 4 ranks, and the mismatches."""
    root = tmp_path_factory.mktemp("sharded")
    comp = engram.Compression.identity(VOCAB)
    full = engram.build_table(root / "full", _spec(), comp, seed=3)
    for parts in (2, 4):
        shard_table(full, root / "full", parts)
    for r in range(2):
        engram.build_table(root / f"built-{r}", _spec(), comp, seed=3, shard=(r, 2)).close()
    shard_table(engram.build_table(root / "fp8", _spec(dtype="float8_e4m3"), comp, seed=3), root / "fp8", 2)
    shard_table(engram.build_table(root / "int8", _spec(dtype="int8"), comp, seed=3), root / "int8", 2)
    shard_table(engram.build_table(root / "int4", _spec(dtype="int4"), comp, seed=3), root / "int4", 2)
    shard_table(engram.build_table(root / "other", _spec(seed=1), comp, seed=3), root / "other", 2)
    shard_table(engram.build_table(root / "twin", _spec(), comp, seed=4), root / "twin", 2)   # same spec, other rows
    lookup = np.arange(VOCAB)
    lookup[[6, 7]] = [7, 6]                                     # same spec, another compression
    shard_table(engram.build_table(root / "comp", _spec(), engram.Compression(lookup), seed=3), root / "comp", 2)
    big = _spec(engram_vocab_size=((PSS_MIB << 20) // (32 * 4),), layer_ids=(1,), max_ngram_size=2,
                n_head_per_ngram=1, n_embed_per_ngram=32)
    engram.build_table(root / "pss", big, comp, seed=0).close()
    full.close()
    return root


@pytest.fixture(scope="module")
def spawned(root):
    return _spawn(root, [(2, TWO), (4, FOUR)])


@pytest.fixture(scope="module")
def two(spawned):
    return {name: spawned[f"2:{name}"] for name in TWO}


@pytest.fixture(scope="module")
def four(spawned):
    return {name: spawned[f"4:{name}"] for name in FOUR}


def test_lookup_equals_the_whole_table_on_every_tier(two, four):
    assert _outcome(two, "lookup") == ["ok"] * 2
    assert _outcome(four, "lookup") == ["ok"] * 4


def test_quantized_parts_and_parts_built_directly_equal_the_whole_table(two):
    assert _outcome(two, "quantized_and_built") == ["ok"] * 2


def test_rank_without_tokens_takes_part_and_prefetch_queues_in_order(two):
    out = _outcome(two, "empty_rank_and_prefetch")
    assert out[1]["wire"]["rows_requested"] == 2 * 6 * 4          # only its later lookup: [2, 6] ids, 4 heads
    assert out[0]["wire"]["bytes_received"] > 0 and out[1]["served"] > 0       # rank 1 served rank 0's rows
    # ids out, rows back: what one rank sent is what the other received
    assert out[0]["wire"]["bytes_sent"] == out[1]["wire"]["bytes_received"]


def test_engram_memory_reads_a_sharded_table(two):
    assert _outcome(two, "memory") == ["ok"] * 2


def test_a_refused_call_raises_on_every_rank_and_leaves_the_group_in_step(two, four):
    for results, world in ((two, 2), (four, 4)):
        outs = _outcome(results, "refused_calls")
        assert outs[1][0][0] == "TokenIdError" and outs[1][2][0] == "InputError" and "layer_id=99" in outs[1][2][1]
        for rank in set(range(world)) - {1}:
            for refused in (outs[rank][0], outs[rank][2]):
                assert refused[0] == "InputError" and "rank 1 refused its arguments" in refused[1]
        assert all(out[1] == outs[0][1] for out in outs) and outs[0][1][0] == "InputError"
        assert "made different calls together" in outs[0][1][1]


@pytest.mark.parametrize("case, kind, match", [
    ("open_other_spec", "ShardMismatchError", r"rank 1's part .* another spec than rank 0's: seed=1 \(rank 0: 0\)"),
    ("open_other_compression", "ShardMismatchError", "rank 1's part .* another compression"),
    ("open_other_table", "ShardMismatchError", r"parts of different tables .*rank 0: .*full-0-of-2' \(table id "
                                               r"\w{32}\); rank 1: .*twin-1-of-2' \(table id \w{32}\)"),
    ("open_overlap", "ShardMismatchError", r"rows \[0, \d+\) of layer 1 are in two shards"),
    ("open_other_parts", "ShardMismatchError", "part 1 of 4 .* in a group of 2 ranks"),
    ("open_whole", "ShardMismatchError", "a whole table, in a group of 2 ranks"),
    ("open_missing", "TableNotFoundError", "rank 1 could not open its part .* no table at path"),
    ("load_missing", "MissingFileError", r"rank 0 could not open .* has no complete save"),
])
def test_parts_that_do_not_form_one_table_are_refused_on_every_rank(two, case, kind, match):
    import re

    outs = _outcome(two, case)
    assert outs[0] == outs[1], "every rank raises the same error"
    assert outs[0][0] == kind and re.search(match, outs[0][1]), outs[0]


def test_training_equals_one_process_with_sparse_adam(two, four):
    for results, world in ((two, 2), (four, 4)):
        out = _outcome(results, "train")
        assert all(o["worst"] < 1e-6 for o in out)
        assert [Path(o["path"]).name for o in out] == [f"rank-{r}-of-{world}.safetensors" for r in range(world)]
        assert len({Path(o["path"]).parent for o in out}) == 1                  # one save, one folder


def test_rows_saved_on_two_ranks_load_on_four(four):
    assert [o["parts"] for o in _outcome(four, "load")] == [4] * 4


def test_four_processes_mapping_one_table_hold_one_copy(four):
    out = _outcome(four, "pss")
    table_bytes = out[0]["bytes"]
    assert all(o["rss"] > 0.9 * table_bytes for o in out)          # each process maps every page
    assert sum(o["pss"] for o in out) < 1.25 * table_bytes         # four processes, one copy (not four)


def test_decoding_step_by_step_on_each_rank_equals_the_whole_tables_full_sequence(two):
    assert _outcome(two, "decode_table") == ["ok"] * 2
    assert _outcome(two, "decode_rows") == ["ok"] * 2


def test_a_history_another_rank_decoded_with_is_refused_on_every_rank(two):
    outs = _outcome(two, "mixed_histories")
    assert outs[0][0] == "InputError" and "history holds the sequences of rank 1 but rank 0 looked up" in outs[0][1]
    assert outs[1][0] == "InputError" and "rank 0 refused its arguments" in outs[1][1]
