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
import zipfile
from typing import Any

import numpy as np

from engram.addressing.compression import Compression
from engram.addressing.spec import TableSpec
from engram.errors import CorruptTableError, InputError, MissingFileError, SpecMismatchError

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
        assert count is not None
        return rows[: max(0, int(count))]

    def check_matches(self, spec: TableSpec, comp: Compression) -> None:
        """Raise SpecMismatchError unless the plan was made for this spec and compression.

        The row encoding (dtype, scale_block) does not matter: a plan counted for a float table
        serves its int8 or float8_e4m3 conversion, whose rows sit at the same addresses.
        """
        differ = self.spec.row_fields_differ(spec)
        if differ:
            fields = ", ".join(f"{n}={getattr(self.spec, n)!r} (table: {getattr(spec, n)!r})" for n in differ)
            raise SpecMismatchError(
                f"hot-row plan was counted for another spec ({fields}): rerun `engram stats --hot-rows` "
                "for this table")
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
        """Read a plan written by `save`.

        Raises:
            MissingFileError: no file at `path`.
            CorruptTableError: another format version, or a damaged file: not a .npz archive,
                members missing, meta that is not a JSON object of the fields above, arrays that
                are not 1-D integers of matching lengths, rows outside their layer's table.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            raise InputError(f"hot-row plan {path!r} is a folder: pass the .npz file `engram stats --hot-rows` wrote")
        if not os.path.isfile(path):
            raise MissingFileError(f"hot-row plan {path!r} does not exist: write one with `engram stats --hot-rows`")
        try:
            if not zipfile.is_zipfile(path):
                raise ValueError("it is not a .npz (zip) archive")
            with np.load(path, allow_pickle=False) as z:
                meta = _read_meta(z, path)
                spec = TableSpec.from_dict(meta["spec"])
                rows, lookups = {}, {}
                for layer_id in meta["layer_ids"]:
                    if layer_id not in spec.layer_ids:
                        raise ValueError(f"layer_ids holds {layer_id!r}, which is not a layer of its spec")
                    rows[layer_id] = _member(z, f"rows_{layer_id}", spec.rows(layer_id))
                    lookups[layer_id] = _member(z, f"lookups_{layer_id}", None)
                    if lookups[layer_id].shape != rows[layer_id].shape:
                        raise ValueError(f"rows_{layer_id} and lookups_{layer_id} differ in length")
                return cls(spec, meta["compression"], meta["tokens"], rows, lookups)
        except CorruptTableError:
            raise
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:  # SpecError is a ValueError
            raise CorruptTableError(
                f"hot-row plan {path!r} is unreadable: {exc}: write it again with `engram stats --hot-rows`") from exc


_META_TYPES = {"spec": (dict, "a JSON object"), "compression": (str, "a string"), "tokens": (int, "an integer"),
               "layer_ids": (list, "a list")}


def _read_meta(z: Any, path: str) -> dict[str, Any]:
    """The `meta` object of an open archive, its fields type-checked (ValueError if damaged)."""
    if "meta" not in z.files:
        raise ValueError("it has no 'meta' member")
    meta = json.loads(str(z["meta"]))
    if not isinstance(meta, dict):
        raise ValueError(f"its meta is a JSON {type(meta).__name__}, not an object")
    if meta.get("format_version") != HOT_ROWS_FORMAT_VERSION:
        raise CorruptTableError(
            f"hot-row plan {path!r} has format_version={meta.get('format_version')!r}; "
            f"this engram reads version {HOT_ROWS_FORMAT_VERSION}"
        )
    for key, (kind, expected) in _META_TYPES.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta[key], bool):
            raise ValueError(f"its meta field {key!r} is {meta.get(key)!r}, expected {expected}")
    if meta["tokens"] < 0 or not all(isinstance(i, int) and not isinstance(i, bool) for i in meta["layer_ids"]):
        raise ValueError(f"its meta holds tokens={meta['tokens']!r}, layer_ids={meta['layer_ids']!r}: expected "
                         "a count >= 0 and a list of layer ids")
    return meta


def _member(z: Any, name: str, rows: int | None) -> np.ndarray:
    """A 1-D integer array of the archive as int64, within [0, rows) (or >= 0 where rows is None)."""
    if name not in z.files:
        raise ValueError(f"it has no {name!r} member")
    a = z[name]
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} is {a.dtype} of shape {a.shape}, expected 1-D int64")
    a = a.astype(np.int64, copy=False)
    if a.size and (a.min() < 0 or (rows is not None and a.max() >= rows)):
        bound = f"[0, {rows})" if rows is not None else ">= 0"
        raise ValueError(f"{name} holds values outside {bound}")
    return a
