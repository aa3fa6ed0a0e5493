"""The working copy's files, and making one from a table.

    workdir/
      offload.json      identity: the table's spec, compression fingerprint, row dtype, row ranges, record size
      compression.npy   the compression lookup (checked against the fingerprint)
      state.json        the commit record: generation, step counts, Adam settings (replaced atomically per flush)
      rows.bin          every row's record (engram.offload.records), layer after layer (engram.offload.datafile)
      undo.log          records overwritten since the last flush (engram.offload.undo)
      lock              held (flock) by the process that has the working copy open

Both JSON files carry an xxh3-64 checksum of their other fields, so damage is refused, never read.
A working copy is made in a locked partial directory beside `workdir` and renamed into place
when complete (`engram.storage.publish`), so a killed `create` leaves nothing at `workdir`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from engram.addressing.compression import Compression
from engram.addressing.spec import TableSpec
from engram.errors import CorruptTableError, InputError, MissingFileError, SpecMismatchError
from engram.offload.adam import AdamSettings
from engram.offload.records import RecordLayout
from engram.storage.publish import fsync_path, publish_file
from engram.storage.shards import ShardRange

__all__ = ["Identity", "State", "IDENTITY", "STATE", "ROWS", "UNDO", "COMPRESSION", "FORMAT", "read_workdir",
           "write_json", "write_identity", "is_working_copy", "lock_workdir", "check_expected", "fill_rows"]

FORMAT = "engram-offload/1"
IDENTITY, STATE, ROWS, UNDO, COMPRESSION, LOCK = (
    "offload.json", "state.json", "rows.bin", "undo.log", "compression.npy", "lock")
FILL_BYTES = 4 << 20     # rows copied from the source per read while a working copy is made


@dataclasses.dataclass(frozen=True)
class Identity:
    """What a working copy holds: the rows of `ranges` of a table of `spec` and `compression` (its fingerprint).

    Attributes:
        spec: the source table's spec (its dtype is the source's; the working copy stores `dtype`).
        compression: the compression fingerprint.
        dtype: "float32" or "bfloat16", the stored rows.
        ranges: {layer_id: (start, stop)}: the global rows held per layer (all of them unless a part).
        shard: the part of a sharded table the rows are, or None.
        source: where the rows came from (for messages only).
    """

    spec: TableSpec
    compression: str
    dtype: str
    ranges: dict[int, tuple[int, int]]
    shard: ShardRange | None
    source: str

    @property
    def layout(self) -> RecordLayout:
        return RecordLayout(self.spec.head_dim, self.dtype)

    @property
    def bases(self) -> dict[int, int]:
        """Record index of each layer's first held row: row r of layer L is record bases[L] + r - start."""
        out, at = {}, 0
        for lid in self.spec.layer_ids:
            out[lid] = at
            at += self.ranges[lid][1] - self.ranges[lid][0]
        return out

    @property
    def total_rows(self) -> int:
        return sum(hi - lo for lo, hi in self.ranges.values())

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "spec": self.spec.to_dict(), "compression": self.compression, "dtype": self.dtype,
                "ranges": [[lid, lo, hi] for lid, (lo, hi) in self.ranges.items()],
                "shard": None if self.shard is None else self.shard.to_dict(), "source": self.source,
                "record_bytes": self.layout.record_bytes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Identity:
        """Raises ValueError, KeyError or TypeError on a malformed dictionary (the caller names the file)."""
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
        spec = TableSpec.from_dict(d["spec"])
        ranges = {int(lid): (int(lo), int(hi)) for lid, lo, hi in d["ranges"]}
        if sorted(ranges) != sorted(spec.layer_ids) or any(
                not 0 <= lo <= hi <= spec.rows(lid) for lid, (lo, hi) in ranges.items()):
            raise ValueError(f"row ranges {d['ranges']!r} do not fit the spec")
        shard = None if d["shard"] is None else ShardRange.from_dict(d["shard"], spec)
        ident = cls(spec, str(d["compression"]), str(d["dtype"]), ranges, shard, str(d["source"]))
        if ident.layout.record_bytes != d["record_bytes"]:
            raise ValueError(f"record_bytes {d['record_bytes']!r}, expected {ident.layout.record_bytes}")
        return ident


@dataclasses.dataclass(frozen=True)
class State:
    """The commit record: the flush generation, each layer's Adam step count and the Adam settings."""

    generation: int
    steps: dict[int, int]
    settings: AdamSettings

    def to_dict(self) -> dict[str, Any]:
        s = self.settings
        return {"format": FORMAT, "generation": self.generation, "steps": [[lid, n] for lid, n in self.steps.items()],
                "lr": s.lr, "betas": list(s.betas), "eps": s.eps}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> State:
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
        settings = AdamSettings.checked(d["lr"], tuple(d["betas"]), d["eps"])
        return cls(int(d["generation"]), {int(lid): int(n) for lid, n in d["steps"]}, settings)


def _checksum(d: dict[str, Any]) -> str:
    return xxhash.xxh3_64_hexdigest(json.dumps(d, sort_keys=True).encode())


def write_json(path: Path, d: dict[str, Any]) -> None:
    """Write `d` with its checksum to `path` atomically (temporary file, fsync, rename, fsync the folder)."""
    publish_file(path, json.dumps({**d, "checksum": _checksum(d)}, indent=1))


def _read_json(path: Path, what: str, parse: Callable[[dict[str, Any]], Any]) -> Any:
    try:
        d = json.loads(path.read_text())
        checksum = d.pop("checksum")
        if checksum != _checksum(d):
            raise ValueError("its checksum does not match its contents")
        return parse(d)
    except FileNotFoundError:
        raise CorruptTableError(f"{os.fspath(path)!r} ({what}) is missing: the working copy is damaged; "
                                "restore it from a copy, or create it again") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptTableError(f"{os.fspath(path)!r} ({what}) is damaged ({exc}): restore the working copy "
                                "from a copy, or create it again") from None


def is_working_copy(path: Path) -> bool:
    """True when `path` is a directory holding a working copy's identity file."""
    return path.is_dir() and not path.is_symlink() and (path / IDENTITY).is_file()


def read_workdir(workdir: Path) -> tuple[Identity, State, Compression]:
    """The identity, commit record and compression of the working copy at `workdir`.

    Raises:
        MissingFileError: nothing is there, or it is not a working copy.
        CorruptTableError: a file is missing or damaged.
    """
    if not is_working_copy(workdir):
        what = "does not exist" if not os.path.lexists(workdir) else "is not a working copy (no offload.json)"
        raise MissingFileError(f"workdir={os.fspath(workdir)!r} {what}: make one with "
                               "engram.OffloadedRows.create(table_path, workdir, ...)")
    ident = _read_json(workdir / IDENTITY, "the working copy's identity", Identity.from_dict)
    state = _read_json(workdir / STATE, "the working copy's commit record", State.from_dict)
    try:
        comp = Compression(np.load(workdir / COMPRESSION, allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise CorruptTableError(f"{os.fspath(workdir / COMPRESSION)!r} is missing or damaged ({exc}): restore the "
                                "working copy from a copy, or create it again") from None
    if comp.fingerprint != ident.compression:
        raise CorruptTableError(f"{os.fspath(workdir / COMPRESSION)!r} does not match the compression fingerprint "
                                "recorded in offload.json: the working copy is damaged; create it again")
    if sorted(state.steps) != sorted(ident.spec.layer_ids):
        raise CorruptTableError(f"{os.fspath(workdir / STATE)!r} has step counts of layers {sorted(state.steps)}, "
                                f"expected {list(ident.spec.layer_ids)}: the working copy is damaged")
    return ident, state, comp


def check_expected(workdir: Path, ident: Identity, comp: Compression, spec: TableSpec | None,
                   compression: Compression | None, shard: ShardRange | None = None) -> None:
    """Raise SpecMismatchError unless the working copy holds rows of `spec` and `compression` (those given),
    and the part `shard` (given for a part)."""
    fields = [] if spec is None else ident.spec.row_fields_differ(spec)
    if fields:
        named = ", ".join(f"{f}={getattr(ident.spec, f)!r} (expected {getattr(spec, f)!r})" for f in fields)
        raise SpecMismatchError(f"workdir={os.fspath(workdir)!r} holds the rows of another table ({named}; made from "
                                f"{ident.source!r}): choose the workdir of this table, or make one with "
                                "OffloadedRows.create")
    if compression is not None and compression != comp:
        raise SpecMismatchError(
            f"workdir={os.fspath(workdir)!r} holds rows of a table with another compression (fingerprint "
            f"{comp.fingerprint!r}, expected {compression.fingerprint!r}; made from {ident.source!r}): choose the "
            "workdir of this table, or make one with OffloadedRows.create")
    if shard is not None and ident.ranges != dict(shard.ranges):
        held = "the whole table" if ident.shard is None else str(ident.shard)
        raise SpecMismatchError(f"workdir={os.fspath(workdir)!r} holds {held} (made from {ident.source!r}), not "
                                f"{shard}: give each rank its own workdir, or start over with a new one")


def lock_workdir(workdir: Path) -> int:
    """An open fd holding the working copy's exclusive lock (released when closed, or when the process dies).

    Raises:
        InputError: another process (or another OffloadedRows here) has it open.
    """
    fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InputError(f"workdir={os.fspath(workdir)!r} is open already (in this process or another): close it "
                         "there first (rows.close()); two writers would corrupt it") from None
    return fd


def write_identity(root: Path, ident: Identity, comp: Compression, settings: AdamSettings) -> None:
    """The identity, compression and a first commit record (generation 0, no steps) into `root`."""
    write_json(root / IDENTITY, ident.to_dict())
    np.save(root / COMPRESSION, comp.lookup)
    fsync_path(root / COMPRESSION)
    write_json(root / STATE, State(0, dict.fromkeys(ident.spec.layer_ids, 0), settings).to_dict())


def fill_rows(path: Path, ident: Identity, read: Callable[[int, np.ndarray], torch.Tensor],
              tick: Callable[[int], None]) -> None:
    """Write the rows file: every held row as `read(layer_id, global_rows)` gives it (float32 [n, D]),
    with zero moments, in pieces of about FILL_BYTES; `tick(bytes)` after each piece."""
    layout = ident.layout
    piece = max(1, FILL_BYTES // layout.record_bytes)
    buffer = torch.zeros((piece, layout.record_bytes), dtype=torch.uint8)   # moments stay zero
    with open(path, "wb") as f:
        for lid in ident.spec.layer_ids:
            lo, hi = ident.ranges[lid]
            for a in range(lo, hi, piece):
                b = min(a + piece, hi)
                out = buffer[: b - a]
                layout.values(out).copy_(read(lid, np.arange(a, b, dtype=np.int64)))
                f.write(out.numpy().data)
                tick(out.numel())
        f.flush()
        os.fsync(f.fileno())
