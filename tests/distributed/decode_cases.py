"""Cases of the spawned ranks in test_distributed.py: decoding over sharded tables and rows.

Each rank decodes its own sequences step by step (its own NgramHistory / module cache) and checks
that the steps equal the unsharded table's full-sequence outputs; every rank makes the same steps,
so the collectives stay in step.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

import engram
from engram.making.sharding import shard_path

T = 11
STEPS = [(0, 4), (4, 5), (5, 8), (8, 9), (9, 11)]          # the same steps on every rank


def _inputs(rank: int) -> tuple[np.ndarray, torch.Tensor, np.random.Generator]:
    from tests.distributed.test_distributed import VOCAB

    rng = np.random.default_rng([rank, 11])
    B = 1 + rank                                            # each rank its own batch size
    return rng.integers(0, VOCAB, (B, T)), torch.randn(B, T, 1, 16, generator=torch.Generator().manual_seed(rank)), rng


def _close(got: torch.Tensor, full: torch.Tensor) -> None:
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5 * full.abs().max().item())


def case_decode_table(rank: int, world: int, root: Path, group) -> str:
    """Module steps with a cache (ids, and prefetches with the history) == the whole table's full forward;
    lookups with history + mask, and with doc_start, == the whole table's."""
    from engram.distributed import ShardedTable
    from tests.distributed.test_distributed import TIMEOUT

    full = engram.open(root / "full")
    ids, h, rng = _inputs(rank)
    B = ids.shape[0]
    with ShardedTable(shard_path(root / "full", rank, world), group, timeout=TIMEOUT) as st, torch.no_grad():
        torch.manual_seed(0)
        ref = engram.EngramMemory.from_table(full, layer_id=4, hidden_size=16)
        torch.nn.init.normal_(ref.short_conv.weight, std=0.5)             # a ShortConv that carries state
        mem = engram.EngramMemory.from_table(st, layer_id=4, hidden_size=16)
        mem.load_state_dict(ref.state_dict())
        cache = mem.new_cache(batch_size=B)
        got = []
        for i, (a, b) in enumerate(STEPS):
            step = ids[:, a:b]
            source = st.prefetch(step, 4, history=cache.history) if i % 2 else step
            got.append(mem(h[:, a:b], source, cache=cache))
        _close(torch.cat(got, dim=1), ref(h, ids))
        assert cache.history.lengths.tolist() == [T] * B
        mask = rng.random((B, T)) < 0.7
        mine, whole = (engram.NgramHistory(full.spec, full.compression, batch_size=B) for _ in range(2))
        for a, b in STEPS:
            x, m = ids[:, a:b], mask[:, a:b]
            assert torch.equal(st.lookup(x, 1, history=mine, mask=m), full.lookup(x, 1, history=whole, mask=m))
            mine.append(x, m)
            whole.append(x, m)
        starts = rng.random((B, T)) < 0.3
        assert torch.equal(st.lookup(ids, 1, doc_start=starts), full.lookup(ids, 1, doc_start=starts))
    return "ok"


def case_decode_rows(rank: int, world: int, root: Path, group) -> str:
    """EngramMemoryV41 over ShardedRows: steps with a cache == the in-module rows' full forward."""
    from engram.distributed import ShardedRows
    from tests.distributed.test_distributed import TIMEOUT

    full = engram.open(root / "full")
    spec, comp = full.spec, full.compression
    ids, h, _ = _inputs(rank)
    torch.manual_seed(0)
    ref = engram.EngramMemoryV41(spec, comp, layer_id=1, hidden_size=16)
    ref.rows.data.copy_(full.rows(1, np.arange(spec.rows(1)), dtype=torch.float32))
    rows = ShardedRows(shard_path(root / "full", rank, world), group, lr=1e-3, timeout=TIMEOUT)
    mem = engram.EngramMemoryV41(spec, comp, layer_id=1, hidden_size=16, table=rows)
    mem.load_state_dict({k: v for k, v in ref.state_dict().items() if k != "rows"})
    with torch.no_grad():
        cache = mem.new_cache(batch_size=ids.shape[0])
        got = torch.cat([mem(h[:, a:b], ids[:, a:b], cache=cache) for a, b in STEPS], dim=1)
        _close(got, ref(h, ids))
    return "ok"


def case_mixed_histories(rank: int, world: int, root: Path, group) -> list:
    """Rank 0 looks up with rank 1's history: refused there, and every other rank hears of it."""
    import torch.distributed as dist

    from engram.distributed import ShardedTable
    from tests.distributed.test_distributed import TIMEOUT, _ids, _refusal

    full = engram.open(root / "full")
    with ShardedTable(shard_path(root / "full", rank, world), group, timeout=TIMEOUT) as st:
        ids = _ids(rank)
        hist = engram.NgramHistory(st.spec, st.compression, batch_size=ids.shape[0])
        st.lookup(ids, 1, history=hist)                                # claims it for this rank
        every: list = [None] * world
        dist.all_gather_object(every, pickle.dumps(hist), group=group)
        theirs = pickle.loads(every[1])                                # rank 1's sequences
        x = np.zeros((theirs.batch_size, 3), np.int64)
        refused = _refusal(lambda: st.lookup(x, 1, history=theirs))
        assert torch.equal(st.lookup(_ids(rank), 1), full.lookup(_ids(rank), 1))   # still in step
    return refused


CASES = {"decode_table": case_decode_table, "decode_rows": case_decode_rows, "mixed_histories": case_mixed_histories}
