"""A rank that dies mid-exchange: the other rank gets RankFailureError (which rank, which
exchange, rebuild the group), not the backend's bare RuntimeError, and does not hang.

Two gloo ranks on localhost: rank 1 takes part in the headers of a lookup's exchange, then exits
before the row ids travel, as a killed process would; rank 0 is then inside that exchange.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from pathlib import Path

import pytest

import engram


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, root: str) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from engram.distributed.exchange import OP_LOOKUP, RowExchange
    from engram.storage.shards import ShardRange

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    parts = [ShardRange(0, 2, {1: (0, 100)}), ShardRange(1, 2, {1: (100, 200)})]
    exchange = RowExchange(None, parts)
    if rank == 1:
        exchange.headers([3, 0], 1, torch.float32, OP_LOOKUP)    # the headers of rank 0's lookup, then gone
        os._exit(0)
    outcome: dict = {}
    try:
        exchange.route(1, np.array([5, 150, 160], np.int64), torch.float32, OP_LOOKUP)
        outcome = {"raised": None}
    except Exception as exc:      # what a caller sees
        outcome = {"raised": type(exc).__name__, "message": str(exc), "mro": [c.__name__ for c in type(exc).__mro__]}
    Path(root, "rank0.json").write_text(json.dumps(outcome))
    os._exit(0)                    # the group is broken: no clean destroy_process_group


@pytest.mark.skipif(not __import__("torch").distributed.is_available(), reason="needs torch.distributed")
def test_a_rank_dying_mid_exchange_is_a_rank_failure_error(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_rank_main, args=(_free_port(), os.fspath(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    end = time.monotonic() + 120
    while not all(p.exitcode is not None for p in ctx.processes):
        if time.monotonic() > end:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank hung after its peer died mid-exchange")
        time.sleep(0.2)
    outcome = json.loads((tmp_path / "rank0.json").read_text())
    assert outcome["raised"] == "RankFailureError", outcome
    assert {"EngramError", "RuntimeError"} <= set(outcome["mro"])
    message = outcome["message"]
    assert message.startswith("rank 0 of 2: the all_to_all of the row ids of layer 1 failed ("), message
    assert "another rank of the group died or left mid-exchange; the process group cannot be used again" in message
    assert issubclass(engram.RankFailureError, RuntimeError)
