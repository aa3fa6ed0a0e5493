"""A training process for the crash and memory tests: `python -m tests.offload.worker MODE WORKDIR CACHE_BYTES STEPS`.

MODE "crash": resume the working copy, train rows-only steps (`train_step`) to STEPS, flushing after every
second step; it prints "ready" once the working copy is open and the step count after each step (the
test kills it at a random moment: in a step, a write-back, a flush).
MODE "rss": train STEPS steps on uniformly random ids with prefetch, printing the resident set size
(VmRSS, bytes) once open, after a quarter of the steps and at the end, as JSON.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

import engram
from tests.offload.common import LAYERS, batch

SHAPE = (2, 10)


def projection(step: int, layer_id: int, embed_dim: int) -> torch.Tensor:
    return torch.randn(*SHAPE, embed_dim, generator=torch.Generator().manual_seed(step * 7 + layer_id))


def train_step(lookup, step: int, embed_dim: int) -> None:
    """One step's backward: every layer's rows of batch(step) times a fixed random projection."""
    ids = batch(step, SHAPE)
    for lid in LAYERS:
        (lookup(ids, lid) * projection(step, lid, embed_dim)).sum().backward()


def rss() -> int:
    return resident("VmRSS")


def resident(field: str) -> int:
    """A resident-set figure of /proc/self/status in bytes: VmRSS (all), RssAnon (the process's own
    memory) or RssFile (pages of mapped files, which the kernel may drop at any time)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))


def crash(workdir: str, cache_bytes: int, steps: int) -> None:
    rows = engram.OffloadedRows(workdir, cache_bytes=cache_bytes)
    print("ready", flush=True)
    while (step := rows.steps[LAYERS[0]]) < steps:
        rows.prefetch(batch(step + 1, SHAPE))
        train_step(rows.lookup, step, rows.spec.embed_dim)
        rows.step()
        print(step + 1, flush=True)
        if (step + 1) % 2 == 0:
            rows.flush()
    rows.close()


def memory(workdir: str, cache_bytes: int, steps: int) -> None:
    torch.set_num_threads(1)
    rows = engram.OffloadedRows(workdir, cache_bytes=cache_bytes)
    before = rss()
    vocab = rows.compression.vocab_size
    rng = np.random.default_rng(0)
    shape = (4, 64)
    ids = rng.integers(0, vocab, shape)
    marks = []
    for step in range(steps):
        nxt = rng.integers(0, vocab, shape)
        rows.prefetch(nxt)
        for lid in rows.spec.layer_ids:
            rows.lookup(ids, lid).sum().backward()
        rows.step()
        ids = nxt
        if step + 1 in (steps // 4, steps):
            marks.append({k: resident(k) for k in ("VmRSS", "RssAnon", "RssFile")})
    rows.flush()
    print(json.dumps({"before": before, "warm": marks[0]["VmRSS"], "end": marks[1]["VmRSS"], "flushed": rss(),
                      "warm_anon": marks[0]["RssAnon"], "end_anon": marks[1]["RssAnon"],
                      "warm_file": marks[0]["RssFile"], "end_file": marks[1]["RssFile"],
                      "stats": rows.stats().to_dict()}), flush=True)
    rows.close()


if __name__ == "__main__":
    mode, workdir, cache, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    {"crash": crash, "rss": memory}[mode](workdir, cache, count)
