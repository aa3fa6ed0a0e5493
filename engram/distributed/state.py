"""Saving and loading ShardedRows: a save every rank writes, then one commit; readable by any number of ranks.

    rows.save("ckpt/rows")          # every rank writes its file under the save's id, then rank 0 commits
    rows = ShardedRows.load("ckpt/rows")                 # the committed save, split over this group
    rows = ShardedRows.load("ckpt/rows", fallback=True)  # ... also when a later save was interrupted

On disk (prefix "ckpt/rows", saved on W ranks)::

    ckpt/rows.save-{save_id}/rank-{r}-of-{W}.safetensors   rank r's rows and Adam moments
    ckpt/rows.json                                          the commit record, written last

A file holds its part's rows and Adam moments per layer (`rows.{layer}`, `exp_avg.{layer}`,
`exp_avg_sq.{layer}`, float32 [rows held, D]), the compression lookup, and in its metadata the
spec, the part's row ranges, the step counts, the optimizer settings, the table id and the save
id. A save is two phases (`engram.distributed.commit`), as torch.distributed.checkpoint saves:
every rank writes its file (temporary name, fsync, rename), the ranks then exchange what they
wrote (or the error they met), and only if every rank wrote the same save at the same steps does
rank 0 write the commit record naming the save, its steps and its files (temporary file, fsync,
rename, fsync of the folder); a last exchange returns once the record is there, and rank 0 then
removes the folders of other saves. A rank that dies during a save leaves the record naming the
save before.

`load` reads the save the record names, after checking that each of its files belongs to it (same
save id, same steps). Files of a save that was never committed (a later save interrupted) make it
refuse with IncompleteSaveError, naming the ranks that wrote and their steps, unless
`fallback=True`, which loads the committed save. It splits the table evenly over the loading group
(`engram.storage.shards.plan_shards`) and reads each rank's new ranges from whichever saved files
hold them (`safe_open(...).get_slice`: only those rows are read), so a save made on W ranks loads
on any other number. Saves written before commit records ("{prefix}-{r}-of-{W}.safetensors", no
record) still load, if every file records the same steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from engram.addressing.compression import Compression
from engram.addressing.spec import TableSpec
from engram.distributed.agreement import agreed
from engram.distributed.commit import committed_files, exchange, remove_other_saves, save_folder, write_record
from engram.errors import CorruptTableError, IncompleteSaveError, ShardMismatchError
from engram.storage.identity import new_table_id
from engram.storage.publish import fsync_path
from engram.storage.shards import ShardRange, check_ranges, plan_shards

if TYPE_CHECKING:
    from engram.distributed.rows import ShardedRows

__all__ = ["save_rows", "load_rows", "STATE_FORMAT"]

STATE_FORMAT = 2     # 2: files carry their save id and table id, a commit record marks the complete save


def save_rows(rows: ShardedRows, prefix: str | os.PathLike[str]) -> str:
    """Write this rank's file of a new save, then commit it with the other ranks; returns this rank's path.

    Raises:
        IncompleteSaveError: a rank could not write its file, or the ranks are at other steps
            (on every rank; nothing is committed).
        RuntimeError: a rank died during the save (torch.distributed's error); nothing is committed.
    """
    rank, world = dist.get_rank(rows.group), dist.get_world_size(rows.group)
    rows.saves += 1
    save_id = f"{rows.run_id}-{rows.saves}"
    folder = save_folder(prefix, save_id)
    target = folder / f"rank-{rank}-of-{world}.safetensors"
    steps = [[lid, n] for lid, n in rows.steps.items()]
    try:                                               # phase 1: every rank its own file
        _write(rows, target, save_id, steps, rank, world)
        mine: dict[str, Any] = {"file": f"{folder.name}/{target.name}", "steps": steps, "save_id": save_id}
    except OSError as exc:
        mine = {"error": f"{type(exc).__name__}: {exc}"}
    seen = exchange(rows.group, mine)                  # phase 2: all in, or nothing committed
    problems = [f"rank {r}: {d['error']}" for r, d in enumerate(seen) if "error" in d]
    if not problems and any(d["steps"] != steps or d["save_id"] != save_id for d in seen):
        problems = ["the ranks are at other steps: " + "; ".join(f"rank {r} at steps {_steps(d['steps'])}"
                                                                 for r, d in enumerate(seen))]
    if problems:
        raise IncompleteSaveError(f"save {save_id} at prefix={os.fspath(prefix)!r} was not committed ("
                                  + "; ".join(problems) + "): the last committed save is unchanged; fix the "
                                  "cause and save again")
    status: dict[str, Any] = {}
    if rank == 0:
        try:
            write_record(prefix, {"save_id": save_id, "world": world, "steps": steps, "table_id": rows.table_id,
                                  "files": [d["file"] for d in seen]})
        except OSError as exc:
            status = {"error": f"{type(exc).__name__}: {exc}"}
    outcome = exchange(rows.group, status)[0]          # every rank returns once the record is there
    if "error" in outcome:
        raise IncompleteSaveError(f"save {save_id} at prefix={os.fspath(prefix)!r} was written but rank 0 could not "
                                  f"commit it ({outcome['error']}): the last committed save is unchanged")
    if rank == 0:
        remove_other_saves(prefix, save_id)
    return os.fspath(target)


def _write(rows: ShardedRows, target: Path, save_id: str, steps: list[list[int]], rank: int, world: int) -> None:
    """This rank's file of the save, written atomically."""
    from safetensors.torch import save_file

    tensors = {"compression": torch.from_numpy(rows.compression.lookup.copy())}
    for lid in rows.local:
        tensors[f"rows.{lid}"] = rows.local[lid].detach().contiguous()
        tensors[f"exp_avg.{lid}"] = rows.exp_avg[lid]
        tensors[f"exp_avg_sq.{lid}"] = rows.exp_avg_sq[lid]
    meta = {"format": STATE_FORMAT, "spec": rows.spec.to_dict(), "compression": rows.compression.fingerprint,
            "shard": rows.shard.to_dict(), "steps": steps, "lr": rows.lr, "betas": list(rows.betas), "eps": rows.eps,
            "table_id": rows.table_id, "save_id": save_id, "rank": rank, "world": world}
    target.parent.mkdir(parents=True, exist_ok=True)
    fsync_path(target.parent.parent)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        save_file(tensors, os.fspath(partial), metadata={"engram": json.dumps(meta)})
        fsync_path(partial)
        os.replace(partial, target)
        fsync_path(target.parent)
    finally:
        partial.unlink(missing_ok=True)


def _steps(steps: list[list[int]]) -> str:
    return "{" + ", ".join(f"{lid}: {n}" for lid, n in steps) + "}"


def load_rows(cls: type[ShardedRows], prefix: str | os.PathLike[str], group: dist.ProcessGroup,
              wire_dedup: bool = False, fallback: bool = False) -> ShardedRows:
    """Every rank reads the rows the even split over `group` gives it (see the module doc); `cls`
    is ShardedRows (passed in: rows.py imports this module, not the other way round)."""

    saved: list[tuple[Path, dict[str, Any]]] = []
    mine: dict[str, Any] = {}

    def describe() -> dict[str, Any]:
        saved.extend(committed_files(prefix, fallback))
        first = saved[0][1]
        spec = TableSpec.from_dict(first["spec"])
        olds = [ShardRange.from_dict(m["shard"], spec) for _, m in saved]
        if any(m["spec"] != first["spec"] or m["compression"] != first["compression"]
               or m.get("table_id") != first.get("table_id") for _, m in saved) or check_ranges(spec, olds) is not None:
            raise ShardMismatchError(f"the files saved at prefix={os.fspath(prefix)!r} are not one save of one table: "
                                     "save again, or remove files left by another save")
        part = plan_shards(spec, dist.get_world_size(group))[dist.get_rank(group)]
        mine.update(spec=spec, olds=olds, part=part)
        return {"path": os.fspath(prefix), "spec": first["spec"], "compression": first["compression"],
                "shard": part.to_dict(), "table_id": first.get("table_id"), "run_id": new_table_id()[:16]}

    parts, seen = agreed(group, describe)
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
    rows.table_id, rows.run_id = first.get("table_id"), seen[0]["run_id"]
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
