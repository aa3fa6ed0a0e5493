"""OffloadedRows trains as in-module rows with torch.optim.SparseAdam do, with a cache far smaller
than the table (rows evicted every step), resumes where it flushed, and publishes ordinary tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engram
from tests.offload.common import COMP, LAYERS, Reference, all_rows, batch, cache_for, make_table, working_rows

C, LR, LR_ROWS = 8, 1e-3, 1e-2


def _modules(spec, table=None) -> torch.nn.ModuleList:
    torch.manual_seed(0)
    return torch.nn.ModuleList(engram.EngramMemory(spec, COMP, layer_id=lid, hidden_size=C, table=table)
                               for lid in LAYERS)


def _loss(mems, ids: np.ndarray, step: int) -> torch.Tensor:
    h = torch.randn(*ids.shape, 1, C, generator=torch.Generator().manual_seed(step))
    return sum(((m(h, ids) - 0.1) ** 2).sum() for m in mems)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_equals_in_module_rows_with_sparse_adam(tmp_path, dtype):
    table = make_table(tmp_path / "t.engram", dtype)
    spec, steps = table.spec, 24
    cache = cache_for(700, spec, dtype)             # two steps' rows; the table has 23 times as many
    rows = engram.OffloadedRows.create(table.path, tmp_path / "work", cache_bytes=cache, lr=LR_ROWS)
    assert rows.rows_dtype == dtype and spec.total_rows > 20 * rows.stats().cache_rows
    ref = _modules(spec)
    for mem in ref:                                 # the reference's in-module rows start as the table's
        mem.rows.data.copy_(all_rows(table)[mem.layer_id])
    model = _modules(spec, rows)
    model.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.endswith("rows")})
    opt_ref = torch.optim.Adam([p for n, p in ref.named_parameters() if not n.endswith("rows")], lr=LR)
    opt_rows = torch.optim.SparseAdam([m.rows for m in ref], lr=LR_ROWS)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    evictions = []
    for step in range(steps):
        ids = batch(step)
        if step % 3:                                # some steps prefetched, others read on demand
            rows.prefetch(batch(step + 1))
        _loss(ref, ids, step).backward()
        for m in ref:
            touched = torch.from_numpy(np.unique(m.hasher.global_rows(ids, m.layer_id)))
            m.rows.grad = torch.sparse_coo_tensor(touched[None], m.rows.grad[touched], m.rows.shape,
                                                  check_invariants=True)
        opt_ref.step(), opt_rows.step(), opt_ref.zero_grad(), opt_rows.zero_grad()
        if dtype == "bfloat16":                     # what a bfloat16 working copy keeps after each update
            for m in ref:
                m.rows.data.copy_(m.rows.data.bfloat16().float())
        _loss(model, ids, step).backward()
        opt.step(), rows.step(), opt.zero_grad()
        evictions.append(rows.stats().evictions)
    assert all(b > a for a, b in zip(evictions[1:], evictions[3:], strict=False))   # rows left the cache all along
    assert evictions[-1] > 5 * rows.stats().cache_rows
    with torch.no_grad():
        ids = batch(steps + 5)
        torch.testing.assert_close(_loss(model, ids, 0), _loss(ref, ids, 0), rtol=1e-5, atol=1e-5)
    rows.flush()
    on_disk = working_rows(rows)
    for m in ref:
        torch.testing.assert_close(on_disk["rows"][m.layer_id], m.rows.detach(), rtol=1e-5, atol=1e-6)
        assert float((m.rows.detach() - all_rows(table)[m.layer_id]).abs().max()) > 1e-3   # training moved them
    assert rows.steps == dict.fromkeys(LAYERS, steps)
    stats = rows.stats()
    assert stats.prefetched > 0 and stats.misses > 0 and stats.hits > 0 and stats.rows_written > 0
    rows.close()


def _train(rows: engram.OffloadedRows, ref: Reference | None, steps: range) -> None:
    """Rows-only training: the loss is a fixed random projection of the looked-up rows."""
    for step in steps:
        ids = batch(step, (2, 10))
        rows.prefetch(batch(step + 1, (2, 10)))
        used = {}
        for lid in LAYERS:
            w = torch.randn(2, 10, rows.spec.embed_dim, generator=torch.Generator().manual_seed(step * 7 + lid))
            (rows.lookup(ids, lid) * w).sum().backward()
            if ref is not None:
                (ref.lookup(ids, lid) * w).sum().backward()
                used[lid] = [ids]
        rows.step()
        if ref is not None:
            ref.step(used)


def test_repeated_rows_in_a_batch_sum_their_gradients_once(tmp_path):
    table = make_table(tmp_path / "t.engram")
    rows = engram.OffloadedRows.create(table.path, tmp_path / "work", cache_bytes=cache_for(64, table.spec), lr=0.1)
    ref = Reference(table, lr=0.1)
    ids = np.array([[7] * 9 + [8] * 3, [7] * 12])    # the same n-grams many times over
    for lid in LAYERS:
        (rows.lookup(ids, lid) ** 2).sum().backward()
        (rows.lookup(ids[:1], lid) ** 2).sum().backward()      # and again in a second lookup of the step
        (ref.lookup(ids, lid) ** 2).sum().backward()
        (ref.lookup(ids[:1], lid) ** 2).sum().backward()
    rows.step()
    ref.step({lid: [ids] for lid in LAYERS})
    rows.flush()
    got = working_rows(rows)
    for lid in LAYERS:
        touched = np.unique(ref.hasher.global_rows(ids, lid))
        torch.testing.assert_close(got["rows"][lid], ref.rows[lid].detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["exp_avg"][lid], ref.moments("exp_avg")[lid], rtol=1e-6, atol=1e-9)
        # first step: exp_avg = (1 - beta1) * (the row's gradients summed); nonzero on the touched rows only
        assert torch.count_nonzero(got["exp_avg"][lid].abs().sum(1)) == touched.size
    rows.close()


def test_reopen_and_resume_equals_uninterrupted_training(tmp_path):
    table = make_table(tmp_path / "t.engram")
    cache = cache_for(400, table.spec)
    whole = engram.OffloadedRows.create(table.path, tmp_path / "whole", cache_bytes=cache, lr=0.02, betas=(0.8, 0.99))
    _train(whole, None, range(10))
    whole.flush()
    part = engram.OffloadedRows.create(table.path, tmp_path / "part", cache_bytes=cache, lr=0.02, betas=(0.8, 0.99))
    _train(part, None, range(4))
    part.flush()
    _train(part, None, range(4, 6))                  # not flushed: reopening drops these two steps
    part.close(flush=False)
    part = engram.OffloadedRows(tmp_path / "part", cache_bytes=cache)
    assert part.steps == dict.fromkeys(LAYERS, 4) and part.settings.betas == (0.8, 0.99)
    _train(part, None, range(4, 10))
    part.flush()
    a, b = working_rows(whole), working_rows(part)
    for name in a:
        for lid in LAYERS:
            assert torch.equal(a[name][lid], b[name][lid]), (name, lid)
    whole.close(), part.close()


def test_snapshot_opens_on_every_tier_and_equals_the_rows(tmp_path):
    table = make_table(tmp_path / "t.engram", "bfloat16")
    rows = engram.OffloadedRows.create(table.path, tmp_path / "work", cache_bytes=cache_for(400, table.spec), lr=0.05)
    _train(rows, None, range(5))
    path = rows.snapshot(tmp_path / "trained.engram")
    trained = working_rows(rows)["rows"]
    ids = batch(99, (2, 10))
    with torch.no_grad():
        expect = {lid: rows.lookup(ids, lid) for lid in LAYERS}
    for tier in ("ram", "mmap", "direct"):
        with engram.open(path, tier=tier) as snap:
            snap.verify()
            assert snap.spec == table.spec and snap.compression == COMP and snap.dtype == torch.bfloat16
            for lid in LAYERS:
                got = snap.rows(lid, np.arange(snap.spec.rows(lid)), dtype=torch.float32)
                assert torch.equal(got, trained[lid])
                assert torch.equal(snap.lookup(ids, lid, dtype=torch.float32), expect[lid])
    with engram.open(rows.snapshot(tmp_path / "int8.engram", dtype="int8")) as q:
        assert q.spec.dtype == "int8"
        torch.testing.assert_close(q.rows(1, np.arange(50)), trained[1][:50], rtol=0, atol=0.01)
    rows.close()
