"""convert: re-encode a table to another row dtype, chunk by chunk, published atomically.

    report = engram.convert("table.engram", "table-fp8.engram", dtype="float8_e4m3")
    report.layers[1].max_rel_error, report.bytes_after / report.bytes_before
    json.dumps(report.to_dict())

Any dtype converts to any dtype (float ones included). Rows are read from the source table in
pieces and written like `build_table` writes them: one chunk in memory at a time, into a partial
directory beside `dst` that is renamed into place once complete (`engram.storage.publish`). When the
source already stores rows exactly as the target would (same dtype, and for "float8_e4m3" the
same scale_block) the stored bytes are copied, bit for bit; otherwise rows are decoded to float32
and encoded again (`engram.storage.quant`): float targets round to nearest, quantized targets refuse rows
holding NaN or inf.

Error report: for a seeded sample of rows per layer, the relative error of each converted row
x̂ against its source row x (both decoded to float32, compared in float64) is
`e = ||x̂ - x||_2 / ||x||_2`; a source row of zeros has e = 0 if it converts to zeros and inf
otherwise (every codec here keeps zero rows zero). A layer reports max(e) and the RMS
sqrt(mean(e^2)) over its sampled rows; rows whose source holds NaN or inf are left out of both and
counted in `nonfinite_rows`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.addressing.spec import DTYPES, TableSpec
from engram.args import check_int
from engram.dtypes import BLOCK_DTYPES, ROW_DTYPES
from engram.errors import InputError, SpecError
from engram.opening import open as open_table
from engram.serving.table import Table
from engram.storage.format import LayerLayout
from engram.storage.publish import restore_aside
from engram.storage.quant import decode
from engram.storage.writer import (
    Chunk,
    check_target,
    chunk_buffers,
    encode_into,
    piece_rows,
    plan_layout,
    store_rows,
    write_table,
    zero_tail,
)

__all__ = ["convert", "check_convert", "check_whole_source", "ConvertReport", "LayerReport"]


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """What converting one layer did.

    Attributes:
        layer_id: the layer.
        rows: rows in the layer.
        sampled_rows: rows drawn for the error sample (min(sample_rows, rows)); the errors cover
            those of them with finite source rows (sampled_rows - nonfinite_rows).
        zero_rows: sampled rows whose source row is all zeros.
        nonfinite_rows: sampled rows whose source holds NaN or inf (left out of the errors).
        max_rel_error: max of the per-row relative error over the sampled rows (None: none sampled).
        rms_rel_error: sqrt(mean(e^2)) over the sampled rows (None: none sampled).
        bytes_before: the source layer's row bytes, scales included (chunk padding excluded).
        bytes_after: the converted layer's row bytes, scales included.
        disk_bytes_before: the source layer's chunk files, padding included.
        disk_bytes_after: the converted layer's chunk files, padding included.
    """

    layer_id: int
    rows: int
    sampled_rows: int
    zero_rows: int
    nonfinite_rows: int
    max_rel_error: float | None
    rms_rel_error: float | None
    bytes_before: int
    bytes_after: int
    disk_bytes_before: int
    disk_bytes_after: int


@dataclasses.dataclass(frozen=True)
class ConvertReport:
    """The result of `convert`: what was written and how far the converted rows are from the source.

    Attributes:
        src, dst: the table paths.
        src_dtype, dst_dtype: row dtypes before and after.
        scale_block: values per scale (group) of the converted table (block dtypes), else None.
        copied: True when stored bytes were copied unchanged (no decode, no re-encode).
        sample_rows, seed: the error sample's size per layer and seed.
        seconds: wall time of the conversion.
        layers: {layer_id: LayerReport}.
    """

    src: str
    dst: str
    src_dtype: str
    dst_dtype: str
    scale_block: int | None
    copied: bool
    sample_rows: int
    seed: int
    seconds: float
    layers: dict[int, LayerReport]

    @property
    def bytes_before(self) -> int:
        """Row bytes of the source table, scales included."""
        return sum(layer.bytes_before for layer in self.layers.values())

    @property
    def bytes_after(self) -> int:
        """Row bytes of the converted table, scales included."""
        return sum(layer.bytes_after for layer in self.layers.values())

    @property
    def max_rel_error(self) -> float | None:
        """The largest per-row relative error over every layer's sample (None: nothing sampled)."""
        errors = [layer.max_rel_error for layer in self.layers.values() if layer.max_rel_error is not None]
        return max(errors) if errors else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (layer ids as string keys; an infinite or NaN error becomes the
        string "inf" or "nan", which JSON cannot hold as a number; None still means nothing sampled)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layers"}
        d.update(bytes_before=self.bytes_before, bytes_after=self.bytes_after, max_rel_error=_json_float(
            self.max_rel_error))
        d["layers"] = {str(lid): {k: _json_float(v) if isinstance(v, float) else v
                                  for k, v in dataclasses.asdict(layer).items()}
                       for lid, layer in self.layers.items()}
        return d


def _json_float(value: float | None) -> float | str | None:
    return value if value is None or math.isfinite(value) else str(value)


def convert(src: str | os.PathLike[str] | Table, dst: str | os.PathLike[str], *, dtype: str,
            scale_block: int | None = None, overwrite: bool = False, sample_rows: int = 65536, seed: int = 0,
            progress: bool | None = None, accept: Callable[[Table, Table], None] | None = None) -> ConvertReport:
    """Write a copy of the table at `src` with rows stored as `dtype`, and report the error.

    Streams chunk by chunk (memory stays about one chunk of the new table, whatever the size)
    and publishes `dst` atomically, as `build_table` does: a failed or killed conversion leaves
    nothing at `dst`. `dst` may be `src` itself with `overwrite=True` (replaced atomically).
    The converted table gets a new `table_id`; its `source_id` is the source's.

    Args:
        src: the source table's path, opened on the "direct" tier (reads bypass the page cache,
            so neither the process nor the cache grows with the source, and it is faster than
            "mmap": see docs/performance.md, "Design measurements"); or an open Table, read through its own tier.
        dst: the path of the converted table.
        dtype: the new row dtype: "float32", "bfloat16", "float16", "int8", "float8_e4m3", "int4"
            or "int2".
        scale_block: values per E8M0 scale for "float8_e4m3", per (scale, minimum) group for
            "int4" / "int2" (a divisor of D; default: the source spec's scale_block, 32 unless
            set). Only for those; every other spec field is kept. Rows already "int4" / "int2"
            are not regrouped into the same dtype (InputError): each regrouping would round again.
        overwrite: replace an existing table at `dst`.
        sample_rows: rows per layer the errors are measured on (seeded sample without
            replacement; all rows when the layer has fewer; 0: no error report).
        seed: seeds the sample (`numpy.random.default_rng([seed, layer_id])`).
        progress: progress bar (None: only on a terminal, after a second).
        accept: a gate run on the converted table before it is published: `accept(converted,
            source)` with both open; if it raises, nothing is written at `dst` and the error
            propagates (e.g. `engram.quality.kl_gate`, which refuses a conversion above a KL).

    Returns:
        A ConvertReport: per layer max and RMS relative error (defined in the module
        docstring), bytes before and after; `to_dict()` for JSON.

    Raises:
        SpecError: `dtype` is unknown, or `scale_block` does not divide D.
        InputError: bad arguments, source rows with NaN or inf for a quantized `dtype`, or an
            "int4" / "int2" source regrouped into its own dtype.
        TableExistsError: something is at `dst` and `overwrite` is False.
        TableNotFoundError, CorruptTableError: as `engram.open(src)`.

    Example:
        >>> report = engram.convert("v41.engram", "v41-int8.engram", dtype="int8")
        >>> report.layers[1].rms_rel_error < 0.01
        True
    """
    _check_args(dtype, scale_block, overwrite, sample_rows, seed)
    start_time = time.perf_counter()
    table = src if isinstance(src, Table) else open_table(src, tier="direct")
    try:
        check_whole_source(table)
        restore_aside(dst)    # a table a killed build left aside belongs at `dst`: it is there again
        spec = check_convert(table.spec, dst, dtype=dtype, scale_block=scale_block, overwrite=overwrite)
        target = Path(dst)
        layouts = plan_layout(spec)
        copied = _same_encoding(table.spec, spec)
        errors: dict[int, _Errors] = {}

        def chunks(lay: LayerLayout) -> Iterator[Chunk]:
            sample = _sample(lay.rows, sample_rows, seed, lay.layer_id)
            errors[lay.layer_id] = _Errors(sample.size)
            return _converted_chunks(table, spec, lay, copied, sample, errors[lay.layer_id])

        def gate(partial: Path) -> None:
            if accept is not None:
                with open_table(partial, tier="mmap") as converted:
                    accept(converted, table)

        write_table(target, spec, table.compression, layouts, chunks, overwrite, progress, desc="convert",
                    before_publish=gate, source_id=table.table_id)      # a new table_id, linked to its source
        layers = {lid: errors[lid].report(lid, lay.rows, table.spec.layer_bytes(lid), spec.layer_bytes(lid),
                                          table.layout(lid).disk_bytes, lay.disk_bytes)
                  for lid, lay in layouts.items()}
        return ConvertReport(os.fspath(table.path), os.fspath(target), table.spec.dtype, spec.dtype,
                             spec.scale_block if ROW_DTYPES[spec.dtype].per_block else None, copied,
                             sample_rows, seed, time.perf_counter() - start_time, layers)
    finally:
        if table is not src:
            table.close()


def check_convert(source: TableSpec, dst: str | os.PathLike[str], *, dtype: str, scale_block: int | None = None,
                  overwrite: bool = False) -> TableSpec:
    """Every check `convert` makes before it writes, writing nothing: a dry run.

    Args:
        source: the source table's spec (`table.spec`).
        dst, dtype, scale_block, overwrite: as `convert`.

    Returns:
        The spec of the converted table (the source's, with the new row encoding).

    Raises:
        What `convert` raises before it starts writing (SpecError, InputError, TableExistsError).
    """
    _check_args(dtype, scale_block, overwrite, 0, 0)
    spec = _target_spec(source, dtype, scale_block)
    check_target(Path(dst), overwrite)
    return spec


def check_whole_source(table: Table) -> None:
    """Refuse to convert one part of a sharded table (convert the whole table, then split it)."""
    if table.shard is not None:
        raise InputError(f"src {os.fspath(table.path)!r} is {table.shard} of a sharded table: convert the whole "
                         "table, then split it again with engram shard")


def _check_args(dtype: Any, scale_block: Any, overwrite: Any, sample_rows: Any, seed: Any) -> None:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SpecError(f"dtype={dtype!r} is not a row dtype: expected one of {tuple(DTYPES)}")
    if scale_block is not None and not ROW_DTYPES[dtype].per_block:
        raise InputError(f"scale_block={scale_block!r} applies to dtypes {BLOCK_DTYPES} only, got dtype={dtype!r}: "
                         "drop scale_block")
    for name, value in (("sample_rows", sample_rows), ("seed", seed)):
        check_int(name, value, 0)
    if not isinstance(overwrite, bool):
        raise InputError(f"overwrite={overwrite!r} is invalid: expected True or False")


def _target_spec(source: TableSpec, dtype: str, scale_block: int | None) -> TableSpec:
    if scale_block is None:   # a block dtype's source keeps its blocks; others carry the default
        scale_block = source.scale_block          # every other spec field stays as it was
    try:
        spec = source.replace(dtype=dtype, scale_block=scale_block)
    except SpecError as exc:
        raise SpecError(f"cannot convert to dtype={dtype!r}: {exc}; pass scale_block=") from exc
    if ROW_DTYPES[dtype].bits and source.dtype == dtype and source.scale_block != spec.scale_block:
        # Regrouping rows already rounded to 2**bits levels per group rounds them again onto grids
        # that mix several old ones: the errors add up, with nothing to show for it.
        raise InputError(
            f"scale_block={spec.scale_block} would re-quantize {dtype} rows grouped by {source.scale_block} into "
            f"other groups of {dtype}, adding a second rounding error: convert the original (float or float8_e4m3) "
            f"table instead, or convert to float32 first if you accept both errors")
    return spec


def _same_encoding(a: TableSpec, b: TableSpec) -> bool:
    """True when both specs store rows with the same bytes (the conversion is a copy)."""
    return a.dtype == b.dtype and (not ROW_DTYPES[a.dtype].per_block or a.scale_block == b.scale_block)


def _sample(rows: int, sample_rows: int, seed: int, layer_id: int) -> np.ndarray:
    """Sorted, distinct rows of the error sample."""
    n = min(int(sample_rows), rows)
    return np.sort(np.random.default_rng([int(seed), layer_id]).choice(rows, size=n, replace=False))


def _converted_chunks(table: Table, spec: TableSpec, lay: LayerLayout, copied: bool, sample: np.ndarray,
                      errors: _Errors) -> Iterator[Chunk]:
    """The chunks of one layer of the converted table, read from `table` piece by piece."""
    chunk = chunk_buffers(lay, spec)
    step = piece_rows(spec)
    for index in range(lay.n_chunks):
        start, stop = lay.chunk_span(index)
        for p in range(start, stop, step):
            q = min(p + step, stop)
            rows = np.arange(p, q)
            picked = sample[np.searchsorted(sample, p): np.searchsorted(sample, q)]
            at, end = p - start, q - start
            if copied:
                stored = table.stored_rows(lay.layer_id, rows)
                chunk[0][at:end] = stored.values
                if chunk[1] is not None:
                    chunk[1][at:end] = stored.scales
                errors.add_copies(table.rows(lay.layer_id, picked, dtype=torch.float32))
                continue
            x = table.rows(lay.layer_id, rows, dtype=torch.float32)                 # [q - p, D] decoded
            if spec.quantized:
                encode_into(x, chunk, at, spec, f"source table layer {lay.layer_id}", p)
            else:
                store_rows(x, chunk[0][at:end], spec.dtype)
            if picked.size:
                local = picked - start
                scales = None if chunk[1] is None else chunk[1][local]
                errors.add(x[torch.from_numpy(picked - p)],
                           decode(chunk[0][local], scales, spec.dtype, block=spec.scale_block))
        yield zero_tail(chunk, stop - start)


class _Errors:
    """Running per-row relative errors of one layer's sample."""

    def __init__(self, sampled: int) -> None:
        self.sampled = sampled
        self.errors: list[np.ndarray] = []
        self.zero_rows = 0
        self.nonfinite_rows = 0

    def add(self, x: torch.Tensor, converted: torch.Tensor) -> None:
        """x, converted: [n, D] source and converted rows, decoded (float32)."""
        x64, y64 = x.double(), converted.double()
        finite = torch.isfinite(x64).all(dim=1)
        self.nonfinite_rows += int((~finite).sum())
        x64, y64 = x64[finite], y64[finite]
        norm = x64.norm(dim=1)
        diff = (y64 - x64).norm(dim=1)
        zero = norm == 0
        self.zero_rows += int(zero.sum())
        e = torch.where(zero, torch.where(diff == 0, 0.0, math.inf), diff / torch.where(zero, 1.0, norm))
        self.errors.append(e.numpy())

    def add_copies(self, x: torch.Tensor) -> None:
        """Rows copied bit for bit: the converted row is the source row."""
        self.add(x, x)

    def report(self, layer_id: int, rows: int, before: int, after: int, disk_before: int,
               disk_after: int) -> LayerReport:
        e = np.concatenate(self.errors) if self.errors else np.zeros(0)
        max_e = float(e.max()) if e.size else None
        rms_e = float(np.sqrt(np.mean(np.square(e)))) if e.size else None
        return LayerReport(layer_id, rows, self.sampled, self.zero_rows, self.nonfinite_rows, max_e, rms_e,
                           before, after, disk_before, disk_after)
