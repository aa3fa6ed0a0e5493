"""Saving and loading ShardedRows: one safetensors file per rank, readable by any number of ranks.

    rows.save("ckpt/rows")          # rank r of W writes ckpt/rows-{r}-of-{W}.safetensors
    rows = ShardedRows.load("ckpt/rows")   # on any number of ranks: each reads the rows it now holds

A file holds its part's rows and Adam moments per layer (`rows.{layer}`, `exp_avg.{layer}`,
`exp_avg_sq.{layer}`, float32 [rows held, D]), the compression lookup, and in its metadata the
spec, the part's row ranges, the step counts and the optimizer settings. Each file is written
under a temporary name, fsynced and renamed into place; `save` returns once every rank's file is
there. `load` splits the table evenly over the loading group (`engram.storage.shards.plan_shards`) and
reads each rank's new ranges from whichever saved files hold them (`safe_open(...).get_slice`:
only those rows are read), so a save made on W ranks loads on any other number.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from engram.addressing.compression import Compression
from engram.addressing.spec import TableSpec
from engram.distributed.agreement import agree
from engram.errors import CorruptTableError, MissingFileError, ShardMismatchError
from engram.storage.publish import fsync_path
from engram.storage.shards import ShardRange, check_ranges, plan_shards

if TYPE_CHECKING:
    from engram.distributed.rows import ShardedRows

__all__ = ["save_rows", "load_rows", "rows_file"]

STATE_FORMAT = 1


def rows_file(prefix: str | os.PathLike[str], rank: int, parts: int) -> Path:
    """The file rank `rank` of `parts` saves to: "{prefix}-{rank}-of-{parts}.safetensors"."""
    return Path(f"{os.fspath(prefix)}-{rank}-of-{parts}.safetensors")


def save_rows(rows: ShardedRows, prefix: str | os.PathLike[str]) -> str:
    """Write this rank's file atomically, then wait for every rank's; returns this rank's path."""
    from safetensors.torch import save_file

    rank, world = dist.get_rank(rows.group), dist.get_world_size(rows.group)
    target = rows_file(prefix, rank, world)
    tensors = {"compression": torch.from_numpy(rows.compression.lookup.copy())}
    for lid in rows.local:
        tensors[f"rows.{lid}"] = rows.local[lid].detach().contiguous()
        tensors[f"exp_avg.{lid}"] = rows.exp_avg[lid]
        tensors[f"exp_avg_sq.{lid}"] = rows.exp_avg_sq[lid]
    meta = {"format": STATE_FORMAT, "spec": rows.spec.to_dict(), "compression": rows.compression.fingerprint,
            "shard": rows.shard.to_dict(), "steps": [[lid, n] for lid, n in rows.steps.items()],
            "lr": rows.lr, "betas": list(rows.betas), "eps": rows.eps}
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        save_file(tensors, os.fspath(partial), metadata={"engram": json.dumps(meta)})
        fsync_path(partial)
        os.replace(partial, target)
        fsync_path(target.parent)
    finally:
        partial.unlink(missing_ok=True)
    dist.barrier(group=rows.group)
    return os.fspath(target)


def _saved_set(prefix: str | os.PathLike[str]) -> list[tuple[Path, dict[str, Any]]]:
    """The files of the one complete save at `prefix`, in rank order, with their metadata."""
    from safetensors import safe_open

    base = Path(prefix)
    pattern = re.compile(re.escape(base.name) + r"-(\d+)-of-(\d+)\.safetensors")
    found: dict[int, dict[int, Path]] = {}
    for p in base.parent.glob(f"{base.name}-*-of-*.safetensors") if base.parent.is_dir() else ():
        m = pattern.fullmatch(p.name)
        if m:
            found.setdefault(int(m[2]), {})[int(m[1])] = p
    complete = sorted(w for w, files in found.items() if set(files) == set(range(w)))
    if len(complete) != 1:
        what = "no complete save" if not complete else f"complete saves for {complete} ranks"
        raise MissingFileError(f"prefix={os.fspath(prefix)!r} has {what} (files {{prefix}}-RANK-of-PARTS.safetensors): "
                               "pass the prefix given to ShardedRows.save, with one complete set of files there")
    files = found[complete[0]]
    out = []
    for r in range(complete[0]):
        with safe_open(os.fspath(files[r]), framework="pt") as f:
            out.append((files[r], json.loads((f.metadata() or {})["engram"])))
    return out


def load_rows(cls: type[ShardedRows], prefix: str | os.PathLike[str], group: dist.ProcessGroup,
              wire_dedup: bool = False) -> ShardedRows:
    """Every rank reads the rows the even split over `group` gives it (see the module doc); `cls`
    is ShardedRows (passed in: rows.py imports this module, not the other way round)."""

    saved: list[tuple[Path, dict[str, Any]]] = []
    mine: dict[str, Any] = {}

    def describe() -> dict[str, Any]:
        saved.extend(_saved_set(prefix))
        first = saved[0][1]
        spec = TableSpec.from_dict(first["spec"])
        olds = [ShardRange.from_dict(m["shard"], spec) for _, m in saved]
        if any(m["spec"] != first["spec"] or m["compression"] != first["compression"] for _, m in saved) \
                or check_ranges(spec, olds) is not None:
            raise ShardMismatchError(f"the files saved at prefix={os.fspath(prefix)!r} are not one save of one table: "
                                     "save again, or remove files left by another save")
        part = plan_shards(spec, dist.get_world_size(group))[dist.get_rank(group)]
        mine.update(spec=spec, olds=olds, part=part)
        return {"path": os.fspath(prefix), "spec": first["spec"], "compression": first["compression"],
                "shard": part.to_dict()}

    parts = agree(group, describe)
    spec, olds, part = mine["spec"], mine["olds"], mine["part"]
    comp = Compression(_read(saved[0][0], "compression", None))
    if comp.fingerprint != saved[0][1]["compression"]:      # every rank reads the same file: all raise
        raise CorruptTableError(f"{os.fspath(saved[0][0])!r} holds a compression that does not match its recorded "
                                "fingerprint: the file is damaged; save again")
    state = {name: {lid: _gather(saved, olds, name, lid, part.ranges[lid]) for lid in spec.layer_ids}
             for name in ("rows", "exp_avg", "exp_avg_sq")}
    rows = cls.from_state(group, parts, spec, comp, state["rows"], wire_dedup)
    first = saved[0][1]
    rows.exp_avg, rows.exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    rows.steps = {int(lid): int(n) for lid, n in first["steps"]}
    rows.set_optimizer(lr=first["lr"], betas=tuple(first["betas"]), eps=first["eps"])
    return rows


def _gather(saved: list[tuple[Path, dict[str, Any]]], olds: list[ShardRange], name: str, layer_id: int,
            span: tuple[int, int]) -> torch.Tensor:
    """Global rows span[0] <= row < span[1] of one saved tensor, read from the files that hold them."""
    lo, hi = span
    pieces = []
    for (path, _), old in sorted(zip(saved, olds, strict=True), key=lambda po: po[1].ranges[layer_id]):
        a, b = old.ranges[layer_id]
        if a < hi and lo < b:
            pieces.append(_read(path, f"{name}.{layer_id}", (max(lo, a) - a, min(hi, b) - a)))
    return torch.cat(pieces).contiguous()


def _read(path: Path, key: str, rows: tuple[int, int] | None) -> Any:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        if rows is None:
            return f.get_tensor(key).numpy()
        return f.get_slice(key)[rows[0]:rows[1]]
