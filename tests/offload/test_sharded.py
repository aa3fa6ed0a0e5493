"""ShardedRows(..., offload=): each rank's part trained out of core equals the same part trained in memory (2 ranks)."""

from __future__ import annotations

import datetime
import json
import os
import socket
import traceback
from pathlib import Path

import numpy as np
import torch

import engram
from engram.making.sharding import shard_path, shard_table
from tests.offload.common import LAYERS, batch, cache_for, make_table, working_rows

TIMEOUT = datetime.timedelta(seconds=60)


def _rank(rank: int, world: int, port: int, root: str) -> None:
    import torch.distributed as dist

    from engram.distributed import ShardedRows

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=TIMEOUT)
    out: dict = {}
    try:
        part, work = shard_path(Path(root) / "t.engram", rank, world), Path(root) / f"work-{rank}"
        spec = engram.open(part).spec
        in_ram = ShardedRows(part, lr=0.05, timeout=TIMEOUT)
        offloaded = ShardedRows(part, lr=0.05, timeout=TIMEOUT, offload=work, cache_bytes=cache_for(600, spec))
        for step in range(5):
            ids = batch(10 * step + rank, (2, 10))
            for rows in (in_ram, offloaded):
                for lid in LAYERS:
                    w = torch.randn(2, 10, spec.embed_dim, generator=torch.Generator().manual_seed(step + lid))
                    (rows.lookup(ids, lid) * w).sum().backward()
                rows.step()
        offloaded.flush()
        got = working_rows(offloaded._offload)
        out["worst"] = max(float((got["rows"][lid] - in_ram.local[lid].detach()).abs().max()) for lid in LAYERS)
        with engram.open(part) as start:
            out["moved"] = min(float((got["rows"][lid] - start.rows(lid, np.arange(*offloaded.shard.ranges[lid]))
                                      ).abs().max()) for lid in LAYERS)
        snap = offloaded.snapshot(Path(root) / f"snap-{rank}-of-{world}")
        with engram.open(snap) as table:
            out["snapshot_id"] = table.table_id
            out["snapshot_equal"] = all(torch.equal(table.rows(lid, np.arange(*table.shard.ranges[lid])),
                                                    got["rows"][lid]) for lid in LAYERS)
        offloaded.close()
        again = ShardedRows(part, lr=0.05, timeout=TIMEOUT, offload=work, cache_bytes=cache_for(600, spec))
        out["steps"] = again.steps
        again.close()
        try:
            ShardedRows(part, lr=0.05, timeout=TIMEOUT, offload=Path(root) / f"work-{1 - rank}",
                        cache_bytes=cache_for(600, spec))
        except engram.SpecMismatchError as exc:
            out["other_part"] = str(exc)
    except Exception:
        out["error"] = traceback.format_exc()
    Path(root, f"out-{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def test_offloaded_parts_train_as_parts_in_memory_and_resume(tmp_path):
    import torch.multiprocessing as mp

    make_table(tmp_path / "t.engram")
    shard_table(tmp_path / "t.engram", tmp_path / "t.engram", 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(2, port, os.fspath(tmp_path)), nprocs=2, join=True, start_method="spawn")
    outs = [json.loads((tmp_path / f"out-{rank}.json").read_text()) for rank in range(2)]
    assert outs[0].get("snapshot_id") and outs[0].get("snapshot_id") == outs[1].get("snapshot_id")   # one table
    for out in outs:
        assert "error" not in out, out.get("error")
        assert out["worst"] < 1e-6 and out["moved"] > 1e-3 and out["snapshot_equal"]
        assert out["steps"] == {str(lid): 5 for lid in LAYERS}
        assert "holds part" in out["other_part"] and "give each rank its own workdir" in out["other_part"]
