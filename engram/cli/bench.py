"""Lookup throughput of a table on this machine, with the baselines measured in the same run (`engram bench`).

Used by `engram bench` and the benchmark drivers in tools/. Baselines:
- `embedding`: the straightforward PyTorch way: the reference algorithm's numpy hash (np.pad
  shifts, `%` per head), head offsets, and one nn.Embedding over an in-RAM copy of the rows;
- `index_select`: a bare `torch.index_select(weight, 0, rows, out=buf)` over the same in-RAM rows
  with the row ids precomputed: the cost of the gather alone, the ceiling for any tier.
Both need the layer's rows in RAM; they are skipped when that copy exceeds `baseline_max_bytes`.

Quantized tables ("int8", "float8_e4m3"): the baselines run over the layer's rows decoded once to
float32 (`table.rows`, what a lookup returns), the straightforward way to serve them in PyTorch;
their in-RAM copy holds 4 bytes per value. The tiers read the stored rows (values plus scales,
`spec.stored_row_bytes` per row) and decode each lookup, so a ratio below 1 is partly the price of
decoding and a smaller table the gain. The report states both row sizes.
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from engram.errors import InputError

__all__ = ["reference_hash", "best_time", "drop_caches", "bench_table"]


def reference_hash(x: np.ndarray, multipliers: np.ndarray, sizes: Sequence[Sequence[int]], pad: int) -> np.ndarray:
    """The reference algorithm as written in numpy: shift with np.pad, mix per order, `%` per head.

    Args:
        x: compressed ids [B, T]; multipliers: the layer's N multipliers; sizes: head primes per
        order; pad: the compressed pad id. Returns int64 [B, T, H].
    """
    B, T = x.shape
    N = len(multipliers)
    shifts = [x] + [np.pad(x, ((0, 0), (k, 0)), constant_values=pad)[:, :T] for k in range(1, N)]
    heads = []
    for n in range(2, N + 1):
        mix = shifts[0] * multipliers[0]
        for k in range(1, n):
            mix = np.bitwise_xor(mix, shifts[k] * multipliers[k])
        for size in sizes[n - 2]:
            heads.append(mix % size)
    return np.stack(heads, axis=2)


def best_time(fn: Callable[[], Any], repeats: int, before: Callable[[], Any] | None = None) -> float:
    """Best wall time of `repeats` calls; one untimed warm-up unless `before` runs before each."""
    if before is None:
        fn()
    best = float("inf")
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def drop_caches() -> bool:
    """Drop the page cache (needs root); False where that is not allowed."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def bench_table(path: str | os.PathLike[str], tiers: Sequence[str] = ("ram", "mmap", "direct"), batch: int = 8,
                seq: int = 4096, layer_id: int | None = None, repeats: int = 5, cold: bool = False,
                baseline_max_bytes: int = 4 << 30, seed: int = 0) -> dict[str, Any]:
    """Tokens/s of `table.lookup` per tier over random token ids, against the baselines.

    Args:
        path: the table. tiers: tiers to measure. batch, seq: the [B, T] workload.
        layer_id: the layer looked up (default: the first). repeats: best of this many calls.
        cold: drop the page cache before every timed call (root only; else measured hot and
            reported as such). baseline_max_bytes: skip the in-RAM baselines above this layer size.

    Returns:
        {"workload": {...}, "baselines": {name: tokens_per_s}, "tiers": {tier: {"tokens_per_s",
         "vs_embedding", "vs_index_select", "cold"}}} (ratios only where the baseline ran).
        The workload holds `row_bytes` (one stored row, scales included), `layer_bytes` (the
        layer's stored rows), `dtype`, `quantized`, `decoded_dtype` (what lookups return and the
        baselines gather), `baseline_row_bytes` and `baseline_bytes` (their in-RAM copy) and
        `baselines_skipped` (True when that copy is over `baseline_max_bytes`).
    """
    import torch

    from engram.addressing.hashing import NgramHasher
    from engram.opening import open as open_table
    from engram.serving.tiers import TIERS

    for tier in tiers:
        if tier not in TIERS:
            raise InputError(f"tiers holds {tier!r}: expected names from {TIERS}")
    if batch < 1 or seq < 1 or repeats < 1:
        raise InputError(f"batch={batch}, seq={seq}, repeats={repeats}: each must be >= 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with open_table(path, tier="mmap") as table:
            if table.shard is not None:
                raise InputError(f"{os.fspath(path)!r} is {table.shard} of a sharded table, which is looked up only "
                                 "with the other parts: measure the whole table, or the sharded lookup with "
                                 "tools/bench_sharded.py")
            spec, comp = table.spec, table.compression
            layer_id = spec.layer_ids[0] if layer_id is None else spec.check_layer(layer_id)
            ids = np.random.default_rng(seed).integers(0, comp.vocab_size, (batch, seq))
            tokens = ids.size
            baseline_row_bytes = spec.head_dim * table.dtype.itemsize               # rows decoded, as lookups return
            baseline_bytes = spec.rows(layer_id) * baseline_row_bytes
            result: dict[str, Any] = {
                "workload": {"path": os.fspath(path), "layer_id": layer_id, "batch": batch, "seq": seq,
                             "heads": spec.heads_per_layer, "dtype": spec.dtype, "quantized": spec.quantized,
                             "row_bytes": spec.stored_row_bytes, "layer_bytes": spec.layer_bytes(layer_id),
                             "decoded_dtype": str(table.dtype).removeprefix("torch."),
                             "baseline_row_bytes": baseline_row_bytes, "baseline_bytes": baseline_bytes,
                             "baselines_skipped": baseline_bytes > baseline_max_bytes, "threads": 1},
                "baselines": {}, "tiers": {},
            }
            if baseline_bytes <= baseline_max_bytes:
                weight = table.rows(layer_id, np.arange(spec.rows(layer_id)))       # in-RAM copy [rows, D], decoded
                hasher = NgramHasher(spec, comp)
                rows = torch.from_numpy(hasher.global_rows(ids, layer_id).reshape(-1))  # [B*T*H]
                out = torch.empty(rows.numel(), spec.head_dim, dtype=weight.dtype)
                seconds = best_time(lambda: torch.index_select(weight, 0, rows, out=out), repeats)
                result["baselines"]["index_select"] = tokens / seconds
                if spec.hash == "multiplicative-xor":
                    embedding = torch.nn.Embedding.from_pretrained(weight, freeze=True)
                    K = spec.n_head_per_ngram
                    sizes = [spec.table_sizes(layer_id)[i: i + K] for i in range(0, spec.heads_per_layer, K)]
                    pad = int(comp.lookup[spec.pad_id])
                    mult = hasher.multipliers(layer_id)
                    offsets = np.asarray(spec.head_offsets(layer_id), np.int64)

                    def straightforward() -> None:
                        h = torch.from_numpy(reference_hash(comp(ids), mult, sizes, pad) + offsets)
                        with torch.no_grad():
                            embedding(h).flatten(2)

                    result["baselines"]["embedding"] = tokens / best_time(straightforward, repeats)
                del weight
        for tier in tiers:
            measured_cold = cold and tier in ("mmap", "direct")
            with open_table(path, tier=tier) as table:
                before = None
                if measured_cold:
                    dropped = drop_caches()
                    measured_cold = dropped
                    before = drop_caches if dropped else None
                seconds = best_time(functools.partial(table.lookup, ids, layer_id), repeats, before=before)
            entry: dict[str, Any] = {"tokens_per_s": tokens / seconds, "cold": measured_cold}
            for name, rate in result["baselines"].items():
                entry[f"vs_{name}"] = entry["tokens_per_s"] / rate
            result["tiers"][tier] = entry
        return result
    finally:
        torch.set_num_threads(threads)
