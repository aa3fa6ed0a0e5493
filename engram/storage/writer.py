"""The chunk writer: plans a table's chunk files, fills them and publishes the table atomically.

`engram.build_table` (seeded or trained rows) and `engram.convert` (rows of another table) only
say what each chunk holds; this module splits layers into chunk files (`plan_layout`), writes them
one chunk in memory at a time into a partial directory beside the target, records their
checksums and publishes the directory (`write_table`, see `engram.storage.publish`). Float rows are
rounded (`store_rows`) or encoded (`encode_into`, with `engram.storage.quant.encode` in pieces of about
ENCODE_VALUES values) into a chunk's stored dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.addressing.compression import Compression
from engram.addressing.spec import TableSpec
from engram.args import check_path, is_int
from engram.dtypes import ROW_DTYPES, scale_dtype, storage_dtype, storage_torch_dtype, torch_dtype
from engram.errors import EngramError, InputError, TableExistsError
from engram.storage import chunks as chunk_files
from engram.storage.format import (
    CHUNK_ALIGN,
    COMPRESSION_ARRAY,
    LayerLayout,
    TableMeta,
    array_name,
    blocks_layout,
    format_version_for,
)
from engram.storage.identity import new_table_id
from engram.storage.metadata import is_table
from engram.storage.publish import aside_table, clean_stale, fsync_tree, make_read_only, partial_dir, publish
from engram.storage.quant import encode, finite_rows
from engram.storage.shards import ShardRange

__all__ = ["Chunk", "DEFAULT_CHUNK_BYTES", "ENCODE_VALUES", "plan_layout", "write_table", "written_table",
           "publish_table", "check_target",
           "write_metadata", "write_attributes", "chunk_buffers", "zero_tail", "piece_rows", "store_rows",
           "encode_into", "as_torch", "codec_attributes"]

DEFAULT_CHUNK_BYTES = 64 << 20  # default chunk file size (rounded down to whole CHUNK_ALIGN rows)
# Default chunk files of layers of at least HUGE_LAYER_BYTES are whole multiples of HUGE_ALIGN (a
# 2 MiB huge page): mapped back to back, every 2 MiB of them can then be one huge page ("mmap" tier).
HUGE_ALIGN = 2 << 20
HUGE_LAYER_BYTES = 16 << 20
ENCODE_VALUES = 1 << 17         # float32 values encoded per piece into quantized chunks (512 KiB)

# One chunk of a layer as written: the values [chunk_rows, W] (W = spec.value_width: D, or packed
# bytes) and, for quantized rows, the scales
# [chunk_rows, S], both in their stored dtypes with zero rows past the end of the layer.
Chunk = tuple[np.ndarray, "np.ndarray | None"]


def write_table(target: Path, spec: TableSpec, comp: Compression, layouts: dict[int, LayerLayout],
                chunks: Callable[[LayerLayout], Iterator[Chunk]], overwrite: bool, progress: bool | None,
                desc: str = "build_table", shard: ShardRange | None = None,
                before_publish: Callable[[Path], None] | None = None, table_id: str | None = None,
                source_id: str | None = None) -> dict[int, LayerLayout]:
    """Write a table whose chunks `chunks(layout)` yields, layer by layer, and publish it atomically.

    Args:
        target: the table directory (checked by the caller: `check_target`).
        spec, comp: stored with the table.
        layouts: `plan_layout(spec, ...)`.
        chunks: per layer layout, an iterator of its `n_chunks` chunks (values, scales or None);
            each chunk is written before the next is asked for, so a generator may reuse buffers.
        overwrite: replace an existing table at `target`.
        progress: progress bar (None: only on a terminal, after a second).
        desc: the progress bar's label.
        shard: the rows of each layer this table holds, for one part of a sharded table (the
            layouts then have `shard.rows(layer_id)` rows); None for a whole table.
        before_publish: called with the complete, synced partial directory just before it is
            published; if it raises, nothing is published (the partial directory is removed).
        table_id: the table's id (`engram.storage.identity`; every part of one sharded table
            has the whole table's); None: a new random one.
        source_id: the id of the table this one was made from, if any (a conversion).

    Returns:
        The layouts with their checksums.
    """
    with written_table(target, spec, comp, layouts, chunks, progress, desc, shard, table_id, source_id) as done:
        tmp, meta = done
        if before_publish is not None:
            before_publish(tmp)
        publish_table(tmp, target, overwrite)
    return meta.layers


@contextlib.contextmanager
def written_table(target: Path, spec: TableSpec, comp: Compression, layouts: dict[int, LayerLayout],
                  chunks: Callable[[LayerLayout], Iterator[Chunk]], progress: bool | None,
                  desc: str = "build_table", shard: ShardRange | None = None, table_id: str | None = None,
                  source_id: str | None = None) -> Iterator[tuple[Path, TableMeta]]:
    """The table of `write_table`, written and synced into a locked partial directory beside
    `target`, but not published: yields (partial directory, its metadata as written); the block
    publishes it (`publish_table`). The directory is removed if the block raises; one the block
    leaves unpublished is removed by the next build of `target` (`clean_stale`)."""
    clean_stale(target)
    version = format_version_for(spec, shard)
    table_id = new_table_id() if table_id is None else table_id
    with partial_dir(target) as tmp:
        with _naming_the_table(target):
            write_metadata(tmp, TableMeta(version, spec, comp, layouts, shard, table_id, source_id))
            written = {}
            with _progress_bar(layouts, progress, desc) as bar:
                for lid, lay in layouts.items():
                    written[lid] = _write_layer(tmp, lay, chunks(lay), bar)
            meta = TableMeta(version, spec, comp, written, shard, table_id, source_id)
            write_attributes(tmp, meta)
            make_read_only(tmp)
            fsync_tree(tmp)
        yield tmp, meta


def _write_layer(tmp: Path, lay: LayerLayout, chunks: Iterator[Chunk], bar: Any) -> LayerLayout:
    """Write one layer's chunk files (values, scales, block digests) into `tmp`; its layout with checksums."""
    sums: list[str] = []
    scale_sums: list[str] = []
    block_sums: list[str] = []
    for index, (values, scales) in enumerate(chunks):
        sums.append(chunk_files.write_chunk(lay.chunk_path(tmp, index), values, bar))
        if lay.scales is not None:
            assert scales is not None, "a quantized layer's chunk has scales"
            scale_sums.append(chunk_files.write_chunk(lay.scales.chunk_path(tmp, index), scales, bar))
        if lay.blocks is not None:
            block_sums.append(chunk_files.write_chunk(lay.blocks.chunk_path(tmp, index),
                                                      chunk_files.block_digests(values), bar))
    if len(sums) != lay.n_chunks:
        raise RuntimeError(f"layer {lay.layer_id}: {len(sums)} chunks produced for {lay.n_chunks}")
    return lay.with_checksums(tuple(sums), tuple(scale_sums), tuple(block_sums))


def publish_table(partial: Path, target: Path, overwrite: bool) -> None:
    """Publish a table written by `written_table` at `target` (replacing only a table or an empty folder)."""
    publish(partial, target, overwrite, replaceable=_replaceable)


@contextlib.contextmanager
def _naming_the_table(target: Path) -> Iterator[None]:
    """Re-raise an OSError that names no file (a full disk, a quota) naming the table being written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None or isinstance(exc, EngramError):
            raise
        raise type(exc)(exc.errno, f"{exc.strerror or exc} while writing the table {os.fspath(target)!r}: "
                        "free space (or raise the quota) and build again") from exc


def plan_layout(spec: TableSpec, chunk_rows: int | None = None,
                shard: ShardRange | None = None) -> dict[int, LayerLayout]:
    """How `build_table` would split each layer into chunk files (checksums still empty).

    Args:
        spec: the table spec.
        chunk_rows: as for build_table (None: about 64 MiB chunks, split evenly).
        shard: plan one part of a sharded table: each layer holds `shard.rows(layer_id)` rows.

    Returns:
        {layer_id: LayerLayout}; disk use is sum(lay.n_chunks * lay.chunk_bytes).

    Example:
        >>> {lid: lay.n_chunks for lid, lay in plan_layout(spec).items()}
        {1: 5, 15: 5}
    """
    return {lid: _plan_layer(spec, lid, chunk_rows, spec.rows(lid) if shard is None else shard.rows(lid))
            for lid in spec.layer_ids}


def _plan_layer(spec: TableSpec, layer_id: int, chunk_rows: int | None, rows: int) -> LayerLayout:
    """The layer's layout: chunk rows a multiple of the alignment, no larger than needed."""
    row_bytes, scale_bytes = spec.row_bytes, spec.scale_row_bytes
    # the smallest rows giving whole CHUNK_ALIGNs, for the values and (quantized rows) the scales
    align_rows = math.lcm(*(CHUNK_ALIGN // math.gcd(CHUNK_ALIGN, b) for b in (row_bytes, scale_bytes) if b))
    if chunk_rows is None:   # about DEFAULT_CHUNK_BYTES, split evenly so the last chunk has little padding
        unit = align_rows    # in rows; whole 2 MiB of values where the layer is large enough for it to pay
        huge = math.lcm(align_rows, HUGE_ALIGN // math.gcd(HUGE_ALIGN, row_bytes))
        if rows * row_bytes >= HUGE_LAYER_BYTES and huge * row_bytes <= DEFAULT_CHUNK_BYTES:
            unit = huge
        n_chunks = -(-rows // (max(1, DEFAULT_CHUNK_BYTES // (unit * row_bytes)) * unit))
        return _layer_layout(spec, layer_id, rows, -(-rows // (n_chunks * unit)) * unit)
    if not is_int(chunk_rows) or chunk_rows < 1 or chunk_rows % align_rows:
        with_scales = f" and {scale_bytes} bytes of scales" if scale_bytes else ""
        raise InputError(
            f"chunk_rows={chunk_rows!r} is invalid: chunk files must be whole multiples of {CHUNK_ALIGN} bytes "
            f"so they map at page boundaries; with {row_bytes}-byte rows{with_scales} use a positive multiple of "
            f"{align_rows} (or None for about 64 MiB chunks)")
    return _layer_layout(spec, layer_id, rows, min(int(chunk_rows), -(-rows // align_rows) * align_rows))


def _layer_layout(spec: TableSpec, layer_id: int, rows: int, chunk_rows: int) -> LayerLayout:
    """The layout of one layer of `rows` rows in chunks of `chunk_rows` (values, scales, block digests)."""
    row_bytes, scale_bytes = spec.row_bytes, spec.scale_row_bytes
    scales = None
    if spec.quantized:
        scales = LayerLayout(layer_id, array_name(layer_id, scales=True), rows, scale_bytes, chunk_rows, role="scales")
    values = LayerLayout(layer_id, array_name(layer_id), rows, row_bytes, chunk_rows, scales=scales)
    return dataclasses.replace(values, blocks=blocks_layout(values))


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _replaceable(path: Path) -> bool:
    """What overwrite=True may delete: an engram table, or an empty directory."""
    return _empty_dir(path) or (path.is_dir() and not path.is_symlink() and is_table(path))


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse a target path a table cannot be written to (its parent a file, or something there to keep).

    Writes nothing: a table that a killed replacement left aside (`engram.storage.publish.aside_table`)
    is judged as if it were back at `target`, where the build's first step puts it.

    Raises:
        InputError: an ancestor of `target` is not a folder.
        TableExistsError: something is at `target` and `overwrite` is False, or it is not a table.
    """
    check_path("path", os.fspath(target))
    ancestor = target.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"path={os.fspath(target)!r} cannot be created: {os.fspath(ancestor)!r} is not a folder; "
                         "choose another path")
    there = target if os.path.lexists(target) else aside_table(target)
    if there is None or _empty_dir(there):
        return
    if not overwrite:
        raise TableExistsError(
            f"path={os.fspath(target)!r} already exists: pass overwrite=True to replace the table there, "
            "or choose another path")
    if not _replaceable(there):
        raise TableExistsError(
            f"path={os.fspath(target)!r} exists and is not an engram table: overwrite=True replaces only "
            "tables; remove it yourself or choose another path")


def chunk_buffers(lay: LayerLayout, spec: TableSpec) -> Chunk:
    """Zeroed buffers for one chunk: values [chunk_rows, W] and scales [chunk_rows, S] or None."""
    values = np.zeros((lay.chunk_rows, spec.value_width), storage_dtype(spec.dtype))
    scales = None if not spec.quantized else np.zeros((lay.chunk_rows, spec.scales_per_row), scale_dtype(spec.dtype))
    return values, scales


def zero_tail(chunk: Chunk, rows: int) -> Chunk:
    """Zero the rows of a chunk past the layer's end (zero bytes decode to zero rows in every dtype)."""
    for part in chunk:
        if part is not None:
            part[rows:] = 0
    return chunk


def piece_rows(spec: TableSpec) -> int:
    """Rows of one float32 piece encoded at a time into a quantized chunk (about ENCODE_VALUES values)."""
    return max(1, ENCODE_VALUES // spec.head_dim)


def as_torch(values: Any) -> torch.Tensor:
    """A torch view (or, for read-only numpy arrays such as np.memmap slices, a copy) of float rows."""
    if isinstance(values, torch.Tensor):
        return values
    # torch.from_numpy refuses read-only arrays (read-only np.memmap): copy those slices
    return torch.from_numpy(np.array(values, copy=not values.flags.writeable or None, order="C"))


def store_rows(values: Any, dest: np.ndarray, dtype: str) -> None:
    """Round `values` (numpy or torch, any float dtype) to the float `dtype` into the storage array `dest`."""
    target = torch.from_numpy(dest).view(storage_torch_dtype(dtype))   # bfloat16 rows: their uint16 bits
    target.copy_(as_torch(values).to(device="cpu", dtype=torch_dtype(dtype)))


def encode_into(values: Any, chunk: Chunk, at: int, spec: TableSpec, source: str, first_row: int) -> None:
    """Encode float rows into a quantized chunk's values and scales at row `at`.

    Rows with NaN or inf are refused, naming the `source` (e.g. "weights[1]") and its row
    (`first_row` is the row of values[0]).
    """
    x = as_torch(values).to(device="cpu", dtype=torch.float32)
    try:
        q = encode(x, spec.dtype, spec.scale_block)
    except InputError:
        finite = finite_rows(x)
        if bool(finite.all()):
            raise
        bad = first_row + int(torch.nonzero(~finite)[0, 0])
        raise InputError(f"{source} row {bad} contains NaN or inf (after conversion to float32): "
                         f"{spec.dtype} rows must be finite; fix or drop that row first") from None
    n = len(q.values)
    values, scales = chunk
    assert scales is not None, "a quantized chunk has scales"
    values[at: at + n] = q.values
    scales[at: at + n] = q.scales


def _progress_bar(layouts: dict[int, LayerLayout], progress: bool | None, desc: str = "build_table") -> Any:
    return chunk_files.progress_bar(sum(lay.disk_bytes for lay in layouts.values()), desc, progress)


# ------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------
def write_metadata(root: str | os.PathLike[str], meta: TableMeta) -> None:
    """Write the zarr group, one array per layer, the compression array and its chunk file.

    Layer chunk files are written by `write_table`; the metadata's checksums
    may still be empty here and are written with `write_attributes` once known.
    """
    import zarr
    from zarr.codecs import BytesCodec

    spec = meta.spec
    group = zarr.open_group(os.fspath(root), mode="w-", zarr_format=3)   # never clears the directory
    plain: dict[str, Any] = {"compressors": None, "filters": None, "serializer": BytesCodec(endian="little"),
             "fill_value": 0}
    row = ROW_DTYPES[spec.dtype]
    W = spec.value_width
    for lay in meta.layers.values():
        group.create_array(lay.array, shape=(lay.rows, W), chunks=(lay.chunk_rows, W), dtype=row.zarr,
                           attributes={"dtype": spec.dtype, **codec_attributes(spec, lay)}, **plain)
        if lay.scales is not None:
            S = spec.scales_per_row
            group.create_array(lay.scales.array, shape=(lay.rows, S), chunks=(lay.chunk_rows, S), dtype=row.scale_zarr,
                               attributes={"scales_of": lay.array, "dtype": spec.dtype,
                                           "scale_block": spec.scale_block if row.per_block else spec.head_dim},
                               **plain)
        if lay.blocks is not None:
            per_chunk = lay.blocks.row_bytes // 8
            group.create_array(lay.blocks.array, shape=(lay.n_chunks, per_chunk), chunks=(1, per_chunk), dtype="uint64",
                               attributes={"xxh3_of_4KiB_blocks_of": lay.array}, **plain)
    lookup = meta.compression.lookup
    group.create_array(COMPRESSION_ARRAY, shape=lookup.shape, chunks=lookup.shape, dtype="int64", **plain)
    comp_file = Path(root, COMPRESSION_ARRAY, "c", "0")
    comp_file.parent.mkdir(parents=True, exist_ok=True)
    comp_file.write_bytes(lookup.astype("<i8").tobytes())
    write_attributes(root, meta)


def codec_attributes(spec: TableSpec, lay: LayerLayout) -> dict[str, Any]:
    """The zarr attribute naming the codec of packed rows ("int4", "int2"), so that another program can
    decode the plain chunk bytes (the layout of `engram.storage.intq`); empty for other dtypes."""
    bits = ROW_DTYPES[spec.dtype].bits
    if not bits:
        return {}
    return {"codec": {
        "name": "engram.affine", "bits": bits, "group_size": spec.scale_block, "values_per_row": spec.head_dim,
        "packing": f"{8 // bits} unsigned codes a byte, little-endian: value j at bits (j*{bits}) % 8 of byte "
                   f"(j*{bits}) // 8",
        "scales": lay.scales.array if lay.scales is not None else None,
        "scales_layout": "float16 (scale, minimum) pairs, group by group: [scale_0, minimum_0, scale_1, ...]",
        "decode": "float32(code) * float32(scale) + float32(minimum), a float32 multiply then add (no fused "
                  "multiply-add), rounded to nearest even once for a narrower output",
    }}


def write_attributes(root: str | os.PathLike[str], meta: TableMeta) -> None:
    """(Re)write the group's zarr.json with the engram metadata as its attributes."""
    doc = {"attributes": {"engram": meta.to_attributes()}, "zarr_format": 3, "node_type": "group"}
    Path(root, "zarr.json").write_text(json.dumps(doc, indent=1))
