"""Hot-row plans: which rows of a table a corpus uses most, for a RAM-resident row cache.

File format (version 1): a numpy `.npz` archive holding
- `meta`: a 0-d unicode array with a JSON object
  `{"format_version": 1, "spec": spec.to_dict(), "compression": comp.fingerprint, "tokens": int,
    "layer_ids": [...]}`;
- per layer `rows_<layer_id>`: int64 global row ids of that layer's table, most-used first;
- per layer `lookups_<layer_id>`: int64 lookups each of those rows served in the corpus.
`engram stats --hot-rows FILE` writes it; the lookup cache loads its first rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

import numpy as np

from .compression import Compression
from .errors import CorruptTableError, InputError, SpecMismatchError, TableNotFoundError
from .spec import TableSpec

__all__ = ["HotRowPlan", "HOT_ROWS_FORMAT_VERSION"]

HOT_ROWS_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class HotRowPlan:
    """Most-used rows per layer, with the spec and compression they were counted for."""

    spec: TableSpec
    compression_fingerprint: str
    tokens: int
    rows: dict[int, np.ndarray]     # layer_id -> int64 global rows, most used first
    lookups: dict[int, np.ndarray]  # layer_id -> int64 lookups per row, descending

    def top(self, layer_id: int, fraction: float | None = None, count: int | None = None) -> np.ndarray:
        """The most-used rows of one layer: the first `count`, or the top `fraction` of touched rows."""
        rows = self.rows[self.spec.check_layer(layer_id)]
        if (fraction is None) == (count is None):
            raise InputError("pass exactly one of fraction= or count=")
        if fraction is not None:
            if not 0.0 <= fraction <= 1.0:
                raise InputError(f"fraction={fraction!r} must be within [0, 1]")
            count = int(round(fraction * rows.size))
        return rows[: max(0, int(count))]

    def check_matches(self, spec: TableSpec, comp: Compression) -> None:
        """Raise SpecMismatchError unless the plan was made for this spec and compression."""
        if self.spec != spec:
            raise SpecMismatchError(
                "hot-row plan was counted for another spec: rerun `engram stats --hot-rows` for this table"
            )
        if self.compression_fingerprint != comp.fingerprint:
            raise SpecMismatchError(
                "hot-row plan was counted with another compression: rerun `engram stats --hot-rows` "
                "for this table"
            )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan atomically (a temporary file beside `path`, then rename)."""
        meta = {"format_version": HOT_ROWS_FORMAT_VERSION, "spec": self.spec.to_dict(),
                "compression": self.compression_fingerprint, "tokens": self.tokens,
                "layer_ids": list(self.rows)}
        arrays: dict[str, Any] = {"meta": np.array(json.dumps(meta))}
        for layer_id in self.rows:
            arrays[f"rows_{layer_id}"] = self.rows[layer_id]
            arrays[f"lookups_{layer_id}"] = self.lookups[layer_id]
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial",
                                   dir=os.path.dirname(os.path.abspath(path)))
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HotRowPlan:
        """Read a plan written by `save`; refuses missing files, other versions and damaged files."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise TableNotFoundError(f"hot-row plan {path!r} does not exist: write one with `engram stats --hot-rows`")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("format_version") != HOT_ROWS_FORMAT_VERSION:
                    raise CorruptTableError(
                        f"hot-row plan {path!r} has format_version={meta.get('format_version')!r}; "
                        f"this engram reads version {HOT_ROWS_FORMAT_VERSION}"
                    )
                layer_ids = [int(i) for i in meta["layer_ids"]]
                rows = {i: z[f"rows_{i}"] for i in layer_ids}
                lookups = {i: z[f"lookups_{i}"] for i in layer_ids}
        except (OSError, ValueError, KeyError) as exc:
            if isinstance(exc, CorruptTableError):
                raise
            raise CorruptTableError(f"hot-row plan {path!r} is unreadable: {exc}") from exc
        return cls(TableSpec.from_dict(meta["spec"]), meta["compression"], int(meta["tokens"]), rows, lookups)
