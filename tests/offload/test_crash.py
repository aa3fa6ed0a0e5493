"""kill -9 at random moments of a training process: reopening gives exactly the state of a flush."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import engram
from tests.offload.common import LAYERS, Reference, batch, cache_for, make_table, working_rows
from tests.offload.worker import SHAPE, train_step

ROOT = Path(__file__).resolve().parents[2]
STEPS, LR = 30, 0.05


def _reference(table: engram.Table) -> dict[int, dict[str, dict[int, torch.Tensor]]]:
    """The state after every even step of uninterrupted training (rows and both moments)."""
    ref = Reference(table, lr=LR)
    states = {}
    for step in range(STEPS + 1):
        if step % 2 == 0:
            states[step] = {"rows": {lid: p.detach().clone() for lid, p in ref.rows.items()},
                            "exp_avg": {k: v.clone() for k, v in ref.moments("exp_avg").items()},
                            "exp_avg_sq": {k: v.clone() for k, v in ref.moments("exp_avg_sq").items()}}
        if step < STEPS:
            train_step(ref.lookup, step, table.spec.embed_dim)
            ref.step({lid: [batch(step, SHAPE)] for lid in LAYERS})
    return states


def test_kill_at_random_moments_then_reopen_gives_a_flushed_state(tmp_path):
    table = make_table(tmp_path / "t.engram", base=400)
    cache = cache_for(400, table.spec)                 # the table has 8 times as many rows
    engram.OffloadedRows.create(table.path, tmp_path / "work", cache_bytes=cache, lr=LR).close()
    states = _reference(table)
    rng = np.random.default_rng(5)
    seen = []
    for _ in range(3):
        target = (seen[-1] if seen else 0) + int(rng.integers(2, 9))    # kill after this step, a moment later
        with subprocess.Popen([sys.executable, "-m", "tests.offload.worker", "crash", str(tmp_path / "work"),
                               str(cache), str(STEPS)], cwd=ROOT, stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            while int(proc.stdout.readline()) < target:
                pass
            time.sleep(rng.uniform(0.0, 0.02))
            proc.send_signal(signal.SIGKILL)
        with engram.OffloadedRows(tmp_path / "work", cache_bytes=cache) as rows:
            step = rows.steps[LAYERS[0]]
            assert rows.steps == dict.fromkeys(LAYERS, step) and step % 2 == 0   # a flush: after an even step
            got = working_rows(rows)
            for name, per_layer in states[step].items():
                for lid in LAYERS:
                    torch.testing.assert_close(got[name][lid], per_layer[lid], rtol=1e-5, atol=1e-6,
                                               msg=lambda m, name=name, step=step: f"{name} after {step}: {m}")
            rows.close(flush=False)
        seen.append(step)
    assert seen == sorted(seen) and seen[-1] > 4, seen   # training went on from each flush
