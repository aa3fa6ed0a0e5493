"""Reading a table's metadata: every check `engram.open` makes before a chunk file is touched.

The metadata decides which files are read and how they are addressed, and a table may come from
elsewhere: files read whole have size caps, the metadata checksum (`format.metadata_checksum`) is
checked when present, array names must be the format's own, and every array's zarr.json must
describe exactly the plain row-block chunks engram maps (see `engram.storage.format`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from engram.addressing.compression import Compression
from engram.addressing.spec import TableSpec
from engram.dtypes import ROW_DTYPES
from engram.errors import CorruptTableError, SpecError, TableNotFoundError
from engram.limits import MAX_VOCAB_SIZE
from engram.storage.format import (
    CHUNK_ALIGN,
    COMPRESSION_ARRAY,
    FORMAT_VERSIONS,
    METADATA_CHECKSUM,
    LayerLayout,
    TableMeta,
    array_name,
    blocks_layout,
    format_version_for,
    metadata_checksum,
)
from engram.storage.identity import is_table_id
from engram.storage.shards import ShardRange, read_shard
from engram.storage.tabledir import TableDir

__all__ = ["is_table", "read_metadata", "open_published", "MAX_GROUP_METADATA_BYTES", "MAX_ARRAY_METADATA_BYTES",
           "MAX_COMPRESSION_BYTES"]

# What every array's zarr.json must say: plain little-endian bytes in "c/{i}/0" chunk files.
_BYTES_CODEC = [{"name": "bytes", "configuration": {"endian": "little"}}]
_BYTES_CODEC_NO_ENDIAN = [{"name": "bytes"}]
_SINGLE_BYTE = ("int8", "uint8")
_CHUNK_KEY_ENCODING = {"name": "default", "configuration": {"separator": "/"}}
# Size caps of the files read whole at open (a table's are far smaller): a hostile or damaged
# table cannot make open() read without end.
MAX_GROUP_METADATA_BYTES = 64 << 20      # zarr.json with every chunk checksum
MAX_ARRAY_METADATA_BYTES = 1 << 20       # an array's zarr.json
MAX_COMPRESSION_BYTES = 8 * MAX_VOCAB_SIZE

def _load_json(tdir: TableDir, relpath: str, what: str) -> dict[str, Any]:
    path = os.fspath(tdir.path / relpath)
    try:
        doc = json.loads(tdir.read_bytes(relpath, MAX_ARRAY_METADATA_BYTES))
    except FileNotFoundError:
        raise CorruptTableError(f"{what} metadata {path!r} is missing: the table is incomplete; "
                                "rebuild it") from None
    except (OSError, ValueError, RecursionError) as exc:   # CorruptTableError is an OSError
        if isinstance(exc, CorruptTableError):
            raise
        raise CorruptTableError(f"{what} metadata {path!r} is unreadable ({exc}): rebuild the table") from exc
    if not isinstance(doc, dict):
        raise CorruptTableError(f"{what} metadata {path!r} is not a JSON object: rebuild the table")
    return doc


def _engram_attributes(tdir: TableDir) -> dict[str, Any]:
    where = os.fspath(tdir.path)
    try:
        doc = json.loads(tdir.read_bytes("zarr.json", MAX_GROUP_METADATA_BYTES))
    except FileNotFoundError:
        raise TableNotFoundError(f"path={where!r} is not an engram table (no zarr.json group inside): pass "
                                 "the directory that engram.build_table wrote") from None
    except (OSError, ValueError, RecursionError) as exc:
        if isinstance(exc, CorruptTableError):
            raise
        raise CorruptTableError(f"group metadata {os.fspath(tdir.path / 'zarr.json')!r} is unreadable ({exc}): "
                                "rebuild the table") from exc
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    attrs = attrs.get("engram") if isinstance(attrs, dict) else None
    if not isinstance(attrs, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        raise TableNotFoundError(
            f"path={where!r} holds zarr metadata but no engram table (no zarr v3 group with an 'engram' "
            "attribute): pass the directory that engram.build_table wrote")
    return attrs


def is_table(path: str | os.PathLike[str]) -> bool:
    """True if `path` is a directory whose zarr group carries engram metadata (valid or not)."""
    try:
        with TableDir(path) as tdir:
            _engram_attributes(tdir)
    except (TableNotFoundError, CorruptTableError):
        return False
    return True


def read_metadata(table: TableDir | str | os.PathLike[str]) -> TableMeta:
    """Read and validate a table's metadata (no chunk data is read).

    Args:
        table: an open TableDir, or the table's path.

    Raises:
        TableNotFoundError: nothing, or no engram table, at the path.
        CorruptTableError: unknown format version, malformed or inconsistent metadata, a
            compression array that does not match its recorded digest.
    """
    if not isinstance(table, TableDir):
        with TableDir(table) as tdir:
            return read_metadata(tdir)
    where = f"table at {os.fspath(table.path)!r}"
    attrs = _engram_attributes(table)
    version = attrs.get("format_version")
    if isinstance(version, bool) or version not in FORMAT_VERSIONS:
        raise CorruptTableError(
            f"{where} has format_version={version!r}, but this engram reads only format_version in "
            f"{FORMAT_VERSIONS}: upgrade engram to open newer tables, or rebuild the table")
    _check_metadata_checksum(where, attrs)
    try:
        spec = TableSpec.from_dict(attrs["spec"])
        if version < format_version_for(spec):
            raise CorruptTableError(
                f"{where} has format_version={version!r}, which cannot hold {spec.dtype} rows (their scales need "
                f"format_version {format_version_for(spec)}): the metadata is damaged; rebuild the table")
        shard = read_shard(attrs.get("shard"), spec, version, where)
        comp = _read_compression(table, attrs["compression"])
        layers = {lay.layer_id: lay for lay in (_read_layer(table, spec, d, shard or spec) for d in attrs["layers"])}
    except (KeyError, TypeError, SpecError) as exc:
        raise CorruptTableError(
            f"{where} has invalid metadata ({type(exc).__name__}: {exc}): rebuild the table") from exc
    if tuple(layers) != spec.layer_ids:
        raise CorruptTableError(
            f"{where} stores layers {tuple(layers)} but its spec has layer_ids={spec.layer_ids}: rebuild the table")
    if comp.compressed_vocab_size != spec.compressed_vocab_size:
        raise CorruptTableError(
            f"{where} stores a compression with compressed_vocab_size={comp.compressed_vocab_size} but its "
            f"spec says {spec.compressed_vocab_size}: rebuild the table")
    return TableMeta(version, spec, comp, layers, shard, _read_id(attrs, "table_id", where),
                     _read_id(attrs, "source_id", where))


def _read_id(attrs: dict[str, Any], key: str, where: str) -> str | None:
    """A table id of the metadata (tables written before ids have none)."""
    value = attrs.get(key)
    if value is not None and not is_table_id(value):
        raise CorruptTableError(f"{where} has {key}={value!r}, not 32 lowercase hex digits: the metadata is "
                                "damaged; rebuild the table")
    return value


T = TypeVar("T")
OPEN_ATTEMPTS = 8   # opens of a table that is being replaced meanwhile, before giving up


def open_published(path: str | os.PathLike[str], make: Callable[[TableDir, TableMeta], T]) -> T:
    """`make(tdir, meta)` over the table published at `path`, retried across an atomic replacement.

    A table replaced at `path` while it is opened (build_table(..., overwrite=True) swaps the
    directories, then deletes the old one file by file) looks incomplete or vanishes: the open is
    tried again on the new one. `make` owns `tdir` once it returns; if it raises, `tdir` is closed.
    """
    for attempt in range(OPEN_ATTEMPTS):
        try:
            tdir = TableDir(path)   # every file of this table is opened relative to this directory handle
        except TableNotFoundError:
            if attempt == 0:
                raise
            time.sleep(0.001 * attempt)   # between the two renames of a replacement: nothing there yet
            continue
        try:
            return make(tdir, read_metadata(tdir))
        except (CorruptTableError, TableNotFoundError):
            swapped = tdir.replaced()
            tdir.close()
            if not swapped or attempt == OPEN_ATTEMPTS - 1:
                raise
        except BaseException:
            tdir.close()
            raise
    raise TableNotFoundError(f"no table at path={os.fspath(path)!r}: it was removed while it was being opened")


def _check_metadata_checksum(where: str, attrs: dict[str, Any]) -> None:
    """Refuse metadata whose recorded checksum does not match (tables without one predate it)."""
    if METADATA_CHECKSUM not in attrs:
        return
    recorded = attrs[METADATA_CHECKSUM]
    actual = metadata_checksum(attrs)
    if recorded != actual:
        raise CorruptTableError(
            f"{where} has metadata with xxh3 {actual}, recorded {recorded!r}: zarr.json was edited or damaged "
            "(its spec, compression or chunk layout no longer match what the rows were written for); restore it "
            "or rebuild the table")


def _check_array_name(where: str, name: Any, expected: str) -> None:
    """Array names are the format's own: a name from elsewhere ("../other.engram/layer_1", an
    absolute path) would make the table read files outside its directory."""
    if name != expected:
        raise CorruptTableError(f"{where}: array {name!r} is not the format's name {expected!r}: the metadata is "
                                "damaged or hostile (names may not lead elsewhere); rebuild the table")


def _read_compression(tdir: TableDir, entry: dict[str, Any]) -> Compression:
    _check_array_name(f"table at {os.fspath(tdir.path)!r}", entry["array"], COMPRESSION_ARRAY)
    relpath = f"{entry['array']}/c/0"
    path = os.fspath(tdir.path / relpath)
    try:
        lookup = np.frombuffer(tdir.read_bytes(relpath, MAX_COMPRESSION_BYTES), dtype="<i8")
    except CorruptTableError:
        raise
    except (OSError, ValueError) as exc:
        raise CorruptTableError(f"compression chunk {path!r} is unreadable ({exc}): rebuild the table or "
                                "restore the file") from exc
    comp = Compression(lookup) if lookup.size else None
    if comp is None or comp.fingerprint != entry["xxh3"]:
        raise CorruptTableError(
            f"compression chunk {path!r} does not match its recorded xxh3 {entry['xxh3']!r}: the file is "
            "damaged; rebuild the table or restore the file")
    return comp


def _read_layer(tdir: TableDir, spec: TableSpec, entry: dict[str, Any], holds: ShardRange | TableSpec) -> LayerLayout:
    """One layer's layouts, checked; `holds` gives its rows: the part's ranges, or the whole spec."""
    layer_id, name, chunk_rows = entry["layer_id"], entry["array"], entry["chunk_rows"]
    where = f"table at {os.fspath(tdir.path)!r}, layer {layer_id!r}"
    if layer_id not in spec.layer_ids:
        raise CorruptTableError(f"{where}: the spec has no such layer (layer_ids={spec.layer_ids}); "
                                "rebuild the table")
    scale_entry = entry.get("scales")
    _check_array_name(where, name, array_name(layer_id))
    if scale_entry is not None:
        _check_array_name(where, scale_entry["array"], array_name(layer_id, scales=True))
    row = ROW_DTYPES[spec.dtype]
    if row.quantized != (scale_entry is not None):
        have = "records a scale array" if scale_entry is not None else "records no scale array"
        raise CorruptTableError(f"{where}: {spec.dtype} rows, but the metadata {have}: the metadata is damaged; "
                                "rebuild the table")
    row_bytes = [spec.row_bytes] + ([spec.scale_row_bytes] if row.quantized else [])
    if not isinstance(chunk_rows, int) or chunk_rows < 1 or any((chunk_rows * b) % CHUNK_ALIGN for b in row_bytes):
        sizes = f"rows of {spec.row_bytes} B"
        if row.quantized:
            sizes += (f" and scale rows of {spec.scale_row_bytes} B (scale_block={spec.scale_block}: if the "
                      "spec's scale_block was edited, it no longer matches the stored scales)")
        raise CorruptTableError(
            f"{where}: chunk_rows={chunk_rows!r} does not give chunk files a multiple of {CHUNK_ALIGN} "
            f"bytes with {sizes}: the metadata is damaged; rebuild the table with engram.build_table")
    layout = _read_array(tdir, spec, where, LayerLayout(
        layer_id, name, holds.rows(layer_id), spec.row_bytes, chunk_rows, tuple(str(c) for c in entry["checksums"])),
        row.zarr, spec.value_width)
    if scale_entry is not None:
        scales = _read_array(tdir, spec, where, LayerLayout(
            layer_id, scale_entry["array"], holds.rows(layer_id), spec.scale_row_bytes, chunk_rows,
            tuple(str(c) for c in scale_entry["checksums"]), role="scales"), row.scale_zarr, spec.scales_per_row)
        layout = dataclasses.replace(layout, scales=scales)
    block_entry = entry.get("blocks")
    if block_entry is not None:            # tables written before block checksums have none
        _check_array_name(where, block_entry["array"], array_name(layer_id, blocks=True))
        blocks = dataclasses.replace(blocks_layout(layout), checksums=tuple(str(c) for c in block_entry["checksums"]))
        layout = dataclasses.replace(layout, blocks=_read_array(tdir, spec, where, blocks, "uint64",
                                                                blocks.row_bytes // 8))
    return layout


def _read_array(tdir: TableDir, spec: TableSpec, where: str, layout: LayerLayout, data_type: str | None,
                width: int) -> LayerLayout:
    """Check one array's zarr.json and checksum count against what engram maps; returns `layout`."""
    name = layout.array
    label = {"rows": "array", "scales": "scale array", "blocks": "block checksum array"}[layout.role]
    array = _load_json(tdir, f"{name}/zarr.json", f"layer {layout.layer_id} {label}")
    expected = {
        "zarr_format": 3, "node_type": "array",
        "shape": [layout.rows, width],
        "data_type": data_type,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [layout.chunk_rows, width]}},
        "chunk_key_encoding": _CHUNK_KEY_ENCODING,
        "codecs": _BYTES_CODEC,
    }
    for key, want in expected.items():
        got = array.get(key)
        if key == "codecs" and got == _BYTES_CODEC_NO_ENDIAN and data_type in _SINGLE_BYTE:
            continue                       # zarr writes no endian for single-byte values
        if got != want:
            raise CorruptTableError(
                f"{where}: array {name!r} has {key}={got!r}, expected {want!r} (engram maps "
                "plain little-endian row-block chunks): rebuild the table with engram.build_table")
    if array.get("storage_transformers") not in (None, []):
        raise CorruptTableError(f"{where}: array {name!r} uses storage transformers; rebuild the table")
    if len(layout.checksums) != layout.n_chunks:
        what = "chunk checksums" if layout.role == "rows" else f"chunk checksums of array {name!r}"
        raise CorruptTableError(
            f"{where}: {len(layout.checksums)} {what} recorded for {layout.n_chunks} chunks: "
            "the metadata is damaged; rebuild the table")
    return layout
