"""The on-disk layout of a table: a zarr v3 group of plain-bytes chunk files, plus metadata.

A table is a directory::

    table.engram/
      zarr.json                    group; attributes["engram"] = the metadata below
      compression/zarr.json        int64 [vocab_size], one chunk: the compression lookup
      compression/c/0
      layer_1/zarr.json            storage dtype [spec.rows(1), W], chunks [chunk_rows, W] (W = D; packed: below)
      layer_1/c/0/0 ... c/{n-1}/0  chunk files: chunk_rows*D values each, row-major, little-endian
      layer_15/...

Every array uses the `bytes` codec (little-endian) with no compressor, filter or sharding, so a
chunk file is exactly the row-major bytes of its `chunk_rows` rows; the last chunk is padded with
zero rows to full size, as zarr writes edge chunks. Chunk files are whole multiples of
`CHUNK_ALIGN` bytes, so the chunk files of one layer can be mapped back to back into one
contiguous address range. Every chunk file exists (a missing one is corruption, never "fill
value"), and its xxh3-64 digest is recorded in the metadata.

Quantized rows ("int8", "float8_e4m3", "int4", "int2") store their scales in a second array per
layer beside the values, with the same row chunking and the same plain-bytes rules::

      layer_1_scales/zarr.json     float32 [rows, 1] ("int8"), uint8 [rows, D // scale_block]
      layer_1_scales/c/0/0 ...     (E8M0 exponents, "float8_e4m3") or float16 [rows, 2 * D //
                                   scale_block] ((scale, minimum) pairs, "int4" / "int2"), chunks [chunk_rows, *]

"int4" / "int2" values are uint8 [rows, D * bits / 8]: codes packed little-endian, 8 / bits a byte.
Their array's zarr attribute "codec" names the codec and spells out the packing, the pair
layout and the decode formula (`engram.storage.writer.codec_attributes`; `engram.storage.intq`).

so any zarr reader can open both and decode them (`engram.storage.quant.decode`). `chunk_rows` is then a
multiple of what makes both the value and the scale chunk files whole multiples of `CHUNK_ALIGN`.

Each layer also stores the xxh3-64 digest of every 4 KiB block (`CHECKED_BLOCK`) of its values'
chunk files, which the "direct" tier checks each block it reads against::

      layer_1_blocks/zarr.json     uint64 [n_chunks, chunk_bytes // 4096], chunks [1, *]
      layer_1_blocks/c/0/0 ...     the digests of layer_1/c/0/0, little-endian

The group attribute "engram" holds::

    {"format_version": 1, "spec": spec.to_dict(),
     "compression": {"array": "compression", "xxh3": comp.fingerprint},
     "layers": [{"layer_id": 1, "array": "layer_1", "chunk_rows": 262144,
                 "checksums": ["<xxh3-64 hex of chunk 0>", ...]}, ...]}

Every table written since adds `"metadata_xxh3"`: the xxh3-64 hex digest of the other attributes
as canonical JSON (`metadata_checksum`), so an edit to a field that changes addressing (`seed`,
`hash`, `pad_id`, a prime's base size, ...) is refused at open and by `verify` instead of
silently changing every lookup; and per layer `"blocks": {"array": "layer_1_blocks",
"checksums": [...]}`. Tables written before either keep opening without those checks (and older
engram ignores both, so the format version stays). Tables written since also record
`"table_id"` (32 hex digits fixed when the table is written; every part of a sharded table holds
the whole table's: `engram.storage.identity`) and, for a conversion, `"source_id"` (the id of the
table it was made from); both are under the checksum, and tables without them still open.

Format version 2 adds, per layer of a quantized table, `"scales": {"array": "layer_1_scales",
"checksums": [...]}`; version 3 marks a part of a sharded table (`engram.storage.shards`): `"shard": {"rank":
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
from typing import Any, ClassVar

import xxhash

from engram.addressing.compression import Compression
from engram.addressing.spec import TableSpec
from engram.storage.shards import ShardRange

__all__ = [
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "CHUNK_ALIGN",
    "format_version_for",
    "LayerLayout",
    "TableMeta",
    "array_name",
    "blocks_layout",
    "CHECKED_BLOCK",
    "metadata_checksum",
    "METADATA_CHECKSUM",
]

FORMAT_VERSION = 3            # the newest format this engram writes
FORMAT_VERSIONS = (1, 2, 3)   # the formats it reads: 1 float rows; 2 adds scale arrays; 3 shards
# Chunk files are whole multiples of this many bytes: they then start at page boundaries inside
# one stitched mapping on systems with 4, 16 or 64 KiB pages, and suit O_DIRECT reads.
CHUNK_ALIGN = 1 << 16
CHECKED_BLOCK = 4096   # the values' chunk files have an xxh3-64 digest per block of this many bytes
COMPRESSION_ARRAY = "compression"
METADATA_CHECKSUM = "metadata_xxh3"   # the attribute holding `metadata_checksum` of the others


def metadata_checksum(attributes: dict[str, Any]) -> str:
    """xxh3-64 hex digest of the "engram" attributes other than METADATA_CHECKSUM, as canonical JSON
    (sorted keys, no spaces): it covers every field that fixes addressing and the chunk layout."""
    body = {k: v for k, v in attributes.items() if k != METADATA_CHECKSUM}
    return xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def array_name(layer_id: int, scales: bool = False, blocks: bool = False) -> str:
    """The zarr array of a layer's rows ("layer_1"), their scales ("layer_1_scales") or the block
    checksums of their chunk files ("layer_1_blocks")."""
    return f"layer_{layer_id}" + ("_scales" if scales else "_blocks" if blocks else "")


def blocks_layout(lay: LayerLayout) -> LayerLayout:
    """The layout of the block checksums of the values of `lay`: one file of uint64 digests per chunk
    file (zarr array [n_chunks, chunk_bytes // CHECKED_BLOCK], chunks of one row)."""
    per_chunk = lay.chunk_bytes // CHECKED_BLOCK
    return LayerLayout(lay.layer_id, array_name(lay.layer_id, blocks=True), lay.n_chunks, 8 * per_chunk, 1,
                       role="blocks")


def format_version_for(spec: TableSpec, shard: ShardRange | None = None) -> int:
    """The lowest format version that describes a table of `spec` (a part: `shard`): 3, 2, or 1."""
    return 3 if shard is not None else 2 if spec.quantized else 1


@dataclasses.dataclass(frozen=True)
class LayerLayout:
    """Where one layer's rows live: a zarr array of `rows` x D split into row-block chunk files.

    The scales of a quantized layer are described by a LayerLayout of their own (`scales`, with
    `role="scales"`): same rows and chunk_rows, their own array, row bytes and checksums. So are the
    block checksums of the values' chunk files (`blocks`, `role="blocks"`, see `blocks_layout`):
    one "row" of digests per chunk file; tables written before them have none.

    Attributes:
        layer_id: the model layer.
        array: the zarr array's name inside the table's group.
        rows: rows in the layer's table (`spec.rows(layer_id)`).
        row_bytes: bytes of one stored row (of values; of scales for a scale layout).
        chunk_rows: rows per chunk file (the last file is zero-padded to full size).
        checksums: xxh3-64 hex digest per chunk file, in chunk order.
        scales: the layout of the layer's scale array (quantized dtypes), else None.
        blocks: the layout of the block checksums of the values, else None.
        role: "rows" for the values, "scales" for a scale array, "blocks" for block checksums.
    """

    layer_id: int
    array: str
    rows: int
    row_bytes: int
    chunk_rows: int
    checksums: tuple[str, ...] = ()
    scales: LayerLayout | None = None
    role: str = "rows"
    blocks: LayerLayout | None = None
    # Byte offset of row 0 inside each chunk file: 0 here; rows served in place from a checkpoint
    # shard start at their tensor's offset (engram.release.inplace.RangeLayout).
    file_offset: ClassVar[int] = 0

    @property
    def disk_bytes(self) -> int:
        """Bytes of every chunk file of the layer, scale and block checksum files included."""
        return sum(lay.n_chunks * lay.chunk_bytes for lay in self.arrays())

    def with_checksums(self, checksums: tuple[str, ...], scale_checksums: tuple[str, ...] = (),
                       block_checksums: tuple[str, ...] = ()) -> LayerLayout:
        """A copy with the given chunk checksums (and the scale and block checksum arrays')."""
        scales = None if self.scales is None else dataclasses.replace(self.scales, checksums=tuple(scale_checksums))
        blocks = None if self.blocks is None else dataclasses.replace(self.blocks, checksums=tuple(block_checksums))
        return dataclasses.replace(self, checksums=tuple(checksums), scales=scales, blocks=blocks)

    def arrays(self) -> tuple[LayerLayout, ...]:
        """The layouts of every array of the layer: values, then scales and block checksums if any."""
        return tuple(lay for lay in (self, self.scales, self.blocks) if lay is not None)

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
    table_id: str | None = None          # fixed when written (engram.storage.identity); None: written before ids
    source_id: str | None = None         # the id of the table this one was converted from, if any

    def to_attributes(self) -> dict[str, Any]:
        """The group attribute "engram" (JSON-ready), sealed by its `metadata_checksum`."""
        attrs: dict[str, Any] = {
            "format_version": self.format_version,
            "spec": self.spec.to_dict(),
            "compression": {"array": COMPRESSION_ARRAY, "xxh3": self.compression.fingerprint},
            "layers": [_layer_attributes(lay) for lay in self.layers.values()],
            **({} if self.shard is None else {"shard": self.shard.to_dict()}),
            **({} if self.table_id is None else {"table_id": self.table_id}),
            **({} if self.source_id is None else {"source_id": self.source_id}),
        }
        attrs[METADATA_CHECKSUM] = metadata_checksum(attrs)
        return attrs


def _layer_attributes(lay: LayerLayout) -> dict[str, Any]:
    entry: dict[str, Any] = {"layer_id": lay.layer_id, "array": lay.array, "chunk_rows": lay.chunk_rows,
                             "checksums": list(lay.checksums)}
    if lay.scales is not None:
        entry["scales"] = {"array": lay.scales.array, "checksums": list(lay.scales.checksums)}
    if lay.blocks is not None:
        entry["blocks"] = {"array": lay.blocks.array, "checksums": list(lay.blocks.checksums)}
    return entry
