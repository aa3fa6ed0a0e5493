"""The on-disk layout of a table: a zarr v3 group of plain-bytes chunk files, plus metadata.

A table is a directory::

    table.engram/
      zarr.json                    group; attributes["engram"] = the metadata below
      compression/zarr.json        int64 [vocab_size], one chunk: the compression lookup
      compression/c/0
      layer_1/zarr.json            storage dtype [spec.rows(1), D], chunks [chunk_rows, D]
      layer_1/c/0/0 ... c/{n-1}/0  chunk files: chunk_rows*D values each, row-major, little-endian
      layer_15/...

Every array uses the `bytes` codec (little-endian) with no compressor, filter or sharding, so a
chunk file is exactly the row-major bytes of its `chunk_rows` rows; the last chunk is padded with
zero rows to full size, as zarr writes edge chunks. Chunk files are whole multiples of
`CHUNK_ALIGN` bytes, so the chunk files of one layer can be mapped back to back into one
contiguous address range. Every chunk file exists (a missing one is corruption, never "fill
value"), and its xxh3-64 digest is recorded in the metadata.

Quantized rows ("int8", "float8_e4m3") store their scales in a second array per layer beside the
values, with the same row chunking and the same plain-bytes rules::

      layer_1_scales/zarr.json     float32 [rows, 1] ("int8") or uint8 [rows, D // scale_block]
      layer_1_scales/c/0/0 ...     (E8M0 exponents, "float8_e4m3"), chunks [chunk_rows, *]

so any zarr reader can open both and decode them (`engram.quant.decode`). `chunk_rows` is then a
multiple of what makes both the value and the scale chunk files whole multiples of `CHUNK_ALIGN`.

The group attribute "engram" holds::

    {"format_version": 1, "spec": spec.to_dict(),
     "compression": {"array": "compression", "xxh3": comp.fingerprint},
     "layers": [{"layer_id": 1, "array": "layer_1", "chunk_rows": 262144,
                 "checksums": ["<xxh3-64 hex of chunk 0>", ...]}, ...]}

Format version 2 adds, per layer of a quantized table, `"scales": {"array": "layer_1_scales",
"checksums": [...]}`; version 3 marks a part of a sharded table (`engram.shards`): `"shard": {"rank":
r, "parts": W, "ranges": [[layer_id, start, stop], ...]}`, its arrays holding those rows only. A
table is written with the lowest version that describes it (float tables stay version 1, readable
by older engram); this engram reads versions `FORMAT_VERSIONS` and refuses others.

bfloat16 rows are stored as their uint16 bits and float8_e4m3 rows as uint8 bytes (zarr has
neither dtype); the logical dtype lives in the spec. Reading the metadata needs only `json`: zarr
is imported when a table is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .compression import Compression
from .dtypes import ROW_DTYPES
from .errors import CorruptTableError, SpecError, TableNotFoundError
from .shards import ShardRange, read_shard
from .spec import TableSpec

__all__ = [
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "CHUNK_ALIGN",
    "format_version_for",
    "LayerLayout",
    "TableDir",
    "TableMeta",
    "is_table",
    "read_metadata",
]

FORMAT_VERSION = 3            # the newest format this engram writes
FORMAT_VERSIONS = (1, 2, 3)   # the formats it reads: 1 float rows; 2 adds scale arrays; 3 shards
# Chunk files are whole multiples of this many bytes: they then start at page boundaries inside
# one stitched mapping on systems with 4, 16 or 64 KiB pages, and suit O_DIRECT reads.
CHUNK_ALIGN = 1 << 16
COMPRESSION_ARRAY = "compression"
_BYTES_CODEC = [{"name": "bytes", "configuration": {"endian": "little"}}]
_BYTES_CODEC_NO_ENDIAN = [{"name": "bytes"}]
_SINGLE_BYTE = ("int8", "uint8")
_CHUNK_KEY_ENCODING = {"name": "default", "configuration": {"separator": "/"}}


def format_version_for(spec: TableSpec, shard: ShardRange | None = None) -> int:
    """The lowest format version that describes a table of `spec` (a part: `shard`): 3, 2, or 1."""
    return 3 if shard is not None else 2 if spec.quantized else 1


@dataclasses.dataclass(frozen=True)
class LayerLayout:
    """Where one layer's rows live: a zarr array of `rows` x D split into row-block chunk files.

    The scales of a quantized layer are described by a LayerLayout of their own (`scales`, with
    `role="scales"`): same rows and chunk_rows, their own array, row bytes and checksums.

    Attributes:
        layer_id: the model layer.
        array: the zarr array's name inside the table's group.
        rows: rows in the layer's table (`spec.rows(layer_id)`).
        row_bytes: bytes of one stored row (of values; of scales for a scale layout).
        chunk_rows: rows per chunk file (the last file is zero-padded to full size).
        checksums: xxh3-64 hex digest per chunk file, in chunk order.
        scales: the layout of the layer's scale array (quantized dtypes), else None.
        role: "rows" for the values, "scales" for a scale array.
    """

    layer_id: int
    array: str
    rows: int
    row_bytes: int
    chunk_rows: int
    checksums: tuple[str, ...] = ()
    scales: LayerLayout | None = None
    role: str = "rows"

    @property
    def disk_bytes(self) -> int:
        """Bytes of every chunk file of the layer, scale files included."""
        return self.n_chunks * self.chunk_bytes + (0 if self.scales is None else self.scales.disk_bytes)

    def with_checksums(self, checksums: tuple[str, ...], scale_checksums: tuple[str, ...] = ()) -> LayerLayout:
        """A copy with the given chunk checksums (and the scale array's)."""
        scales = None if self.scales is None else dataclasses.replace(self.scales, checksums=tuple(scale_checksums))
        return dataclasses.replace(self, checksums=tuple(checksums), scales=scales)

    def arrays(self) -> tuple[LayerLayout, ...]:
        """The layouts of every array of the layer: values, then scales if any."""
        return (self,) if self.scales is None else (self, self.scales)

    @property
    def n_chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    @property
    def chunk_bytes(self) -> int:
        """Size of every chunk file."""
        return self.chunk_rows * self.row_bytes

    def chunk_key(self, index: int) -> str:
        """The zarr chunk key of chunk `index`, relative to the array: "c/{index}/0"."""
        return f"c/{index}/0"

    def chunk_relpath(self, index: int) -> str:
        """The chunk file of chunk `index`, relative to the table directory."""
        return f"{self.array}/{self.chunk_key(index)}"

    def chunk_path(self, root: str | os.PathLike[str], index: int) -> Path:
        """The chunk file of chunk `index` inside the table directory `root`."""
        return Path(root, self.chunk_relpath(index))

    def chunk_span(self, index: int) -> tuple[int, int]:
        """The [start, stop) rows of the layer held by chunk `index` (padding excluded)."""
        start = index * self.chunk_rows
        return start, min(start + self.chunk_rows, self.rows)


@dataclasses.dataclass(frozen=True)
class TableMeta:
    """Everything stored beside the rows: format version, spec, compression, chunk layouts."""

    format_version: int
    spec: TableSpec
    compression: Compression
    layers: dict[int, LayerLayout]
    shard: ShardRange | None = None      # the rows a part of a sharded table holds; None: every row

    def to_attributes(self) -> dict[str, Any]:
        """The group attribute "engram" (JSON-ready)."""
        return {
            "format_version": self.format_version,
            "spec": self.spec.to_dict(),
            "compression": {"array": COMPRESSION_ARRAY, "xxh3": self.compression.fingerprint},
            "layers": [_layer_attributes(lay) for lay in self.layers.values()],
            **({} if self.shard is None else {"shard": self.shard.to_dict()}),
        }


def _layer_attributes(lay: LayerLayout) -> dict[str, Any]:
    entry: dict[str, Any] = {"layer_id": lay.layer_id, "array": lay.array, "chunk_rows": lay.chunk_rows,
                             "checksums": list(lay.checksums)}
    if lay.scales is not None:
        entry["scales"] = {"array": lay.scales.array, "checksums": list(lay.scales.checksums)}
    return entry


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------
class TableDir:
    """An open table directory: every file is opened relative to one directory handle.

    All reads of one open table then come from the same table, even if `build_table(...,
    overwrite=True)` swaps another one in at the same path meanwhile.

    Raises:
        TableNotFoundError: nothing, or no directory, at `path`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise TableNotFoundError(f"no table at path={os.fspath(path)!r}: build one with "
                                     "engram.build_table") from None
        except NotADirectoryError:
            raise TableNotFoundError(f"path={os.fspath(path)!r} is not an engram table (not a directory): "
                                     "pass the directory that engram.build_table wrote") from None

    def open(self, relpath: str, flags: int = os.O_RDONLY) -> int:
        """A file descriptor for `relpath` inside the table (raises FileNotFoundError)."""
        return os.open(relpath, flags, dir_fd=self.fd)

    def read_bytes(self, relpath: str) -> bytes:
        fd = self.open(relpath)
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read()
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> TableDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load_json(tdir: TableDir, relpath: str, what: str) -> dict[str, Any]:
    path = os.fspath(tdir.path / relpath)
    try:
        doc = json.loads(tdir.read_bytes(relpath))
    except FileNotFoundError:
        raise CorruptTableError(f"{what} metadata {path!r} is missing: the table is incomplete; "
                                "rebuild it") from None
    except (OSError, ValueError) as exc:
        raise CorruptTableError(f"{what} metadata {path!r} is unreadable ({exc}): rebuild the table") from exc
    if not isinstance(doc, dict):
        raise CorruptTableError(f"{what} metadata {path!r} is not a JSON object: rebuild the table")
    return doc


def _engram_attributes(tdir: TableDir) -> dict[str, Any]:
    where = os.fspath(tdir.path)
    try:
        doc = json.loads(tdir.read_bytes("zarr.json"))
    except FileNotFoundError:
        raise TableNotFoundError(f"path={where!r} is not an engram table (no zarr.json group inside): pass "
                                 "the directory that engram.build_table wrote") from None
    except (OSError, ValueError) as exc:
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
    return TableMeta(version, spec, comp, layers, shard)


def _read_compression(tdir: TableDir, entry: dict[str, Any]) -> Compression:
    relpath = f"{entry['array']}/c/0"
    path = os.fspath(tdir.path / relpath)
    try:
        lookup = np.frombuffer(tdir.read_bytes(relpath), dtype="<i8")
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
    layer_id, name, chunk_rows = entry["layer_id"], entry["array"], entry["chunk_rows"]
    where = f"table at {os.fspath(tdir.path)!r}, layer {layer_id!r}"
    if layer_id not in spec.layer_ids:
        raise CorruptTableError(f"{where}: the spec has no such layer (layer_ids={spec.layer_ids}); "
                                "rebuild the table")
    row = ROW_DTYPES[spec.dtype]
    scale_entry = entry.get("scales")
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
    layout = _read_array(tdir, spec, where, LayerLayout(   # `holds`: the part's ranges, or the whole spec
        layer_id, name, holds.rows(layer_id), spec.row_bytes, chunk_rows, tuple(str(c) for c in entry["checksums"])),
        row.zarr, spec.head_dim)
    if scale_entry is not None:
        scales = _read_array(tdir, spec, where, LayerLayout(
            layer_id, scale_entry["array"], holds.rows(layer_id), spec.scale_row_bytes, chunk_rows,
            tuple(str(c) for c in scale_entry["checksums"]), role="scales"), row.scale_zarr, spec.scales_per_row)
        layout = dataclasses.replace(layout, scales=scales)
    return layout


def _read_array(tdir: TableDir, spec: TableSpec, where: str, layout: LayerLayout, data_type: str | None,
                width: int) -> LayerLayout:
    """Check one array's zarr.json and checksum count against what engram maps; returns `layout`."""
    name = layout.array
    label = "array" if layout.role == "rows" else "scale array"
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
