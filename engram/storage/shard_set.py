"""The manifest of a shard set: which parts `engram shard` published together, written last.

`engram shard SRC PREFIX --parts W` writes every part into a partial directory first, then
publishes the parts one after another (`PREFIX-r-of-W`, each atomically), then this manifest,
`PREFIX-set-of-W.json`, atomically (temporary file, fsync, rename, fsync of the folder)::

    {"engram_shard_set": 1, "table_id": "<the table's id>", "parts": W,
     "members": [{"name": "PREFIX-0-of-W", "metadata_xxh3": "<the part's metadata checksum>"}, ...]}

A split killed before its manifest leaves the old manifest (or none) beside parts of which some
may be new: `engram.open` of a part whose manifest is beside it (found by the part's name) checks
that the part is the one the manifest names (same table id, same metadata checksum) and refuses
it with ShardMismatchError otherwise, and `engram.distributed.ShardedTable` refuses parts whose
table ids differ. So readers get the old set, the new set, or a typed error, never a mix; running
the split again publishes a whole set. Parts moved or renamed away from their manifest (copied to
each node, say) open without this check; the ranks' id check still applies.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from engram.errors import CorruptTableError, MissingFileError, ShardMismatchError
from engram.storage.format import METADATA_CHECKSUM, TableMeta
from engram.storage.publish import publish_file
from engram.untrusted import read_json

__all__ = ["part_path", "manifest_path", "write_manifest", "check_part"]

MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20
_PART_NAME = re.compile(r"(?P<stem>.+)-(?P<rank>\d+)-of-(?P<parts>\d+)")


def part_path(prefix: str | os.PathLike[str], rank: int, parts: int) -> Path:
    """Where part `rank` of `parts` of the set at `prefix` lives: "{prefix}-{rank}-of-{parts}"."""
    return Path(f"{os.fspath(prefix)}-{rank}-of-{parts}")


def manifest_path(prefix: str | os.PathLike[str], parts: int) -> Path:
    """The manifest of the set of `parts` parts at `prefix`: "{prefix}-set-of-{parts}.json"."""
    return Path(f"{os.fspath(prefix)}-set-of-{parts}.json")


def write_manifest(prefix: str | os.PathLike[str], metas: list[TableMeta]) -> Path:
    """Publish the manifest of the parts `metas` (in rank order, all of one table id) atomically."""
    parts = len(metas)
    target = manifest_path(prefix, parts)
    doc = {"engram_shard_set": MANIFEST_VERSION, "table_id": metas[0].table_id, "parts": parts,
           "members": [{"name": part_path(prefix, r, parts).name, "metadata_xxh3": m.to_attributes()[METADATA_CHECKSUM]}
                       for r, m in enumerate(metas)]}
    publish_file(target, json.dumps(doc, indent=1))
    return target


def check_part(path: str | os.PathLike[str], meta: TableMeta) -> None:
    """Refuse a part that its set's manifest (if one is beside it) does not name.

    Raises:
        ShardMismatchError: the manifest names another table id or other metadata for this part.
        CorruptTableError: the manifest is unreadable or malformed.
    """
    shard = meta.shard
    match = _PART_NAME.fullmatch(Path(path).name)
    if shard is None or match is None or (int(match["rank"]), int(match["parts"])) != (shard.rank, shard.parts):
        return
    where = manifest_path(Path(path).parent / match["stem"], shard.parts)
    doc = _read_manifest(where, shard.parts)
    if doc is None:
        return
    member = doc["members"][shard.rank]
    mine = meta.to_attributes()[METADATA_CHECKSUM]
    if doc["table_id"] != meta.table_id or member["name"] != Path(path).name or member["metadata_xxh3"] != mine:
        raise ShardMismatchError(
            f"part {os.fspath(path)!r} ({shard}, table id {meta.table_id}, metadata xxh3 {mine}) is not the part "
            f"that the shard set manifest {os.fspath(where)!r} published (table id {doc['table_id']}, metadata "
            f"xxh3 {member['metadata_xxh3']}): the parts there come from different splits (one was interrupted "
            "while it replaced them?); split again with engram shard --overwrite, or open parts of one set")


def _read_manifest(where: Path, parts: int) -> dict[str, Any] | None:
    """The manifest of a set of `parts` at `where` (checked), or None if there is none."""
    fix = "split the table again with engram shard --overwrite, or remove the manifest"
    try:
        doc = read_json(where, "shard set manifest", MAX_MANIFEST_BYTES, fix, CorruptTableError, follow=False)
    except MissingFileError:
        return None
    try:
        ok = (doc["engram_shard_set"] == MANIFEST_VERSION and isinstance(doc["members"], list)
              and doc["parts"] == parts and len(doc["members"]) == parts
              and all(isinstance(m, dict) and {"name", "metadata_xxh3"} <= set(m) for m in doc["members"]))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise CorruptTableError(f"shard set manifest {os.fspath(where)!r} is damaged (not the JSON engram shard "
                                f"writes): {fix}")
    return dict(doc)
