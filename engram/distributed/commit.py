"""The commit of a ShardedRows save: its record, and which files make the last complete save.

See `engram.distributed.state` for the protocol. The record "{prefix}.json" is written last, by
rank 0, once every rank's file of the save is in place::

    {"engram_rows_save": 1, "save_id": "<run>-<n>", "world": W, "steps": [[layer_id, n], ...],
     "table_id": "<id of the table the rows were trained from>",
     "files": ["rows.save-<save_id>/rank-0-of-W.safetensors", ...]}    (relative to the record's folder)

A save's files live in a folder of their own, "{prefix}.save-{save_id}", so a save never
overwrites the files of the one before: until its record is written, that one stays complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from engram.errors import CorruptTableError, IncompleteSaveError, MissingFileError
from engram.storage.publish import publish_file
from engram.untrusted import read_json

__all__ = ["save_folder", "record_path", "exchange", "write_record", "remove_other_saves", "committed_files"]

RECORD_VERSION = 1
MAX_RECORD_BYTES = 16 << 20
_RANK_FILE = re.compile(r"rank-(\d+)-of-(\d+)\.safetensors")
_LEGACY_FILE = r"-(\d+)-of-(\d+)\.safetensors"


def save_folder(prefix: str | os.PathLike[str], save_id: str) -> Path:
    """The folder of the files of save `save_id`: "{prefix}.save-{save_id}"."""
    return Path(f"{os.fspath(prefix)}.save-{save_id}")


def record_path(prefix: str | os.PathLike[str]) -> Path:
    """The commit record of the saves at `prefix`: "{prefix}.json"."""
    return Path(f"{os.fspath(prefix)}.json")


def exchange(group: dist.ProcessGroup, mine: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's `mine`, by group rank (one all_gather_object: also a barrier)."""
    seen: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(seen, mine, group=group)
    return seen


def write_record(prefix: str | os.PathLike[str], fields: dict[str, Any]) -> None:
    """Publish the commit record atomically: temporary file, fsync, rename, fsync of the folder."""
    publish_file(record_path(prefix), json.dumps({"engram_rows_save": RECORD_VERSION, **fields}, indent=1))


def remove_other_saves(prefix: str | os.PathLike[str], keep: str) -> None:
    """Remove the folders of every save at `prefix` but `keep` (after `keep` is committed)."""
    for save_id, folder in _save_folders(prefix).items():
        if save_id != keep:
            shutil.rmtree(folder, ignore_errors=True)


def _save_folders(prefix: str | os.PathLike[str]) -> dict[str, Path]:
    base = Path(prefix)
    head = f"{base.name}.save-"
    if not base.parent.is_dir():
        return {}
    return {e.name[len(head):]: Path(e.path) for e in os.scandir(base.parent)
            if e.name.startswith(head) and e.is_dir(follow_symlinks=False)}


def committed_files(prefix: str | os.PathLike[str], fallback: bool) -> list[tuple[Path, dict[str, Any]]]:
    """The files of the committed save at `prefix`, in rank order, with their metadata.

    Raises:
        IncompleteSaveError: a save newer than the committed one was interrupted (unless
            `fallback`), none was ever committed, or the record's files do not belong to it.
        MissingFileError: no save at `prefix`.
        CorruptTableError: the record is damaged.
    """
    where = f"prefix={os.fspath(prefix)!r}"
    record = _read_record(prefix)
    folders = _save_folders(prefix)
    if record is None:
        if folders:
            raise IncompleteSaveError(
                f"{where} has no complete save: " + "; ".join(_describe(s, f) for s, f in sorted(folders.items()))
                + ": every save there was interrupted (a rank died or failed during rows.save); save again")
        return _legacy_files(prefix)
    save_id, steps = record["save_id"], record["steps"]
    others = {s: f for s, f in folders.items() if s != save_id}
    if others and not fallback:
        raise IncompleteSaveError(
            f"the last save at {where} is incomplete: " + "; ".join(_describe(s, f) for s, f in sorted(others.items()))
            + f": a rank died or failed during rows.save. The last complete save is {save_id} ({record['world']} "
            f"ranks at steps {_steps(steps)}): pass fallback=True to load it, or remove the incomplete save's folder")
    out = []
    for rank, name in enumerate(record["files"]):
        path = record_path(prefix).parent / name
        meta = _metadata(path)
        if meta is None:
            raise IncompleteSaveError(f"the committed save {save_id} at {where} lacks rank {rank}'s file "
                                      f"{os.fspath(path)!r}: it was removed; restore it or load another save")
        if (meta.get("save_id"), meta.get("steps"), meta.get("rank")) != (save_id, steps, rank):
            raise IncompleteSaveError(
                f"the save at {where} is mixed: rank {rank}'s file {os.fspath(path)!r} holds save "
                f"{meta.get('save_id')} at steps {_steps(meta.get('steps'))}, but the record names save {save_id} at "
                f"steps {_steps(steps)}: restore the files of one save, or load another")
        out.append((path, meta))
    return out


def _describe(save_id: str, folder: Path) -> str:
    """E.g. "save ab12-2: rank 0 of 2 wrote its file (at steps {1: 2}), rank 1 did not"."""
    wrote: dict[int, Any] = {}
    world = 0
    for entry in os.scandir(folder):
        m = _RANK_FILE.fullmatch(entry.name)
        if m:
            meta = _metadata(Path(entry.path))
            wrote[int(m[1])] = None if meta is None else meta.get("steps")
            world = max(world, int(m[2]))
    if not wrote:
        return f"save {save_id}: no rank wrote its file"
    done = ", ".join(f"rank {r} of {world} wrote its file (at steps {_steps(wrote[r])})" for r in sorted(wrote))
    missing = [r for r in range(world) if r not in wrote]
    return f"save {save_id}: {done}" + (f", rank{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} did not"
                                        if missing else "")


def _steps(steps: Any) -> str:
    try:
        return "{" + ", ".join(f"{lid}: {n}" for lid, n in steps) + "}"
    except (TypeError, ValueError):
        return repr(steps)


def _metadata(path: Path) -> dict[str, Any] | None:
    """The engram metadata of a saved file, None if it is missing (CorruptTableError if unreadable)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["engram"])
    except Exception as exc:          # the safetensors library raises its own error type
        raise CorruptTableError(f"saved rows file {os.fspath(path)!r} is unreadable ({exc}): save again") from exc
    if not isinstance(meta, dict):
        raise CorruptTableError(f"saved rows file {os.fspath(path)!r} has damaged metadata: save again")
    return meta


def _read_record(prefix: str | os.PathLike[str]) -> dict[str, Any] | None:
    where = record_path(prefix)
    fix = "restore it, or remove it to load the saves written before commit records"
    try:
        doc = read_json(where, "save record", MAX_RECORD_BYTES, fix, CorruptTableError, follow=False)
    except MissingFileError:
        return None
    try:
        ok = (doc["engram_rows_save"] == RECORD_VERSION and isinstance(doc["save_id"], str)
              and isinstance(doc["files"], list) and len(doc["files"]) == doc["world"]
              and all(isinstance(f, str) and "/" in f for f in doc["files"]))
    except (KeyError, TypeError):
        ok = False
    if not ok or any(".." in f.split("/") or f.startswith("/") for f in doc["files"]):
        raise CorruptTableError(f"save record {os.fspath(where)!r} is damaged (not the JSON ShardedRows.save "
                                f"writes): {fix}")
    return dict(doc)


def _legacy_files(prefix: str | os.PathLike[str]) -> list[tuple[Path, dict[str, Any]]]:
    """The one complete save written before commit records ("{prefix}-RANK-of-PARTS.safetensors"),
    accepted only if every file records the same steps."""
    base = Path(prefix)
    pattern = re.compile(re.escape(base.name) + _LEGACY_FILE)
    found: dict[int, dict[int, Path]] = {}
    for p in base.parent.glob(f"{base.name}-*-of-*.safetensors") if base.parent.is_dir() else ():
        m = pattern.fullmatch(p.name)
        if m:
            found.setdefault(int(m[2]), {})[int(m[1])] = p
    complete = sorted(w for w, files in found.items() if set(files) == set(range(w)))
    if len(complete) != 1:
        what = "no complete save" if not complete else f"complete saves for {complete} ranks"
        raise MissingFileError(f"prefix={os.fspath(prefix)!r} has {what} (no record {record_path(prefix).name!r}, "
                               "no files {prefix}-RANK-of-PARTS.safetensors): pass the prefix given to "
                               "ShardedRows.save, with one complete save there")
    out = []
    for r in range(complete[0]):
        meta = _metadata(found[complete[0]][r])
        assert meta is not None, "listed files exist"
        out.append((found[complete[0]][r], meta))
    if any(m["steps"] != out[0][1]["steps"] for _, m in out):
        ranks = "; ".join(f"rank {r} at steps {_steps(m['steps'])}" for r, (_, m) in enumerate(out))
        raise IncompleteSaveError(
            f"the files saved at prefix={os.fspath(prefix)!r} are not one save: {ranks}: a save was interrupted "
            "between ranks (saves written before commit records cannot tell which is complete): load another "
            "save, or save again")
    return out
