"""TableInfo: what an open table is (path, spec, compression, tier, dtype, layouts), read-only facts.

`engram.Table` derives from it; keeping the descriptive properties here leaves table.py with
the table's lifetime and its reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engram.addressing.compression import Compression
from engram.addressing.spec import TableSpec
from engram.errors import InputError
from engram.serving.gather import RowGatherer
from engram.serving.usage import Usage
from engram.storage.format import LayerLayout, TableMeta
from engram.storage.shards import ShardRange

__all__ = ["TableInfo", "gathered_dtype"]


def gathered_dtype(spec: TableSpec, dtype: torch.dtype, want: torch.dtype) -> torch.dtype:
    """The dtype a table of `spec` (whose lookups return `dtype` by default) gathers rows in for a
    lookup returning `want` (see `TableInfo.gathered_dtype`)."""
    if not spec.quantized:
        return dtype
    return want if want in (torch.float32, torch.bfloat16) else torch.float32


class TableInfo:
    """The descriptive, read-only properties of an open table (see `engram.Table`)."""

    _path: Path
    _meta: TableMeta
    _tier_name: str
    _tier: Any
    _dtype: torch.dtype
    _usage: Usage
    _engine: RowGatherer

    @property
    def path(self) -> Path:
        """The table directory."""
        return self._path

    @property
    def spec(self) -> TableSpec:
        """The spec the table was built with."""
        return self._meta.spec

    @property
    def compression(self) -> Compression:
        """The token-id compression the table was built with."""
        return self._meta.compression

    @property
    def tier(self) -> str:
        """Where rows are read from: "ram", "mmap" or "direct"."""
        return self._tier_name

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype lookups return by default: the rows' dtype for float tables (bfloat16
        tables: torch.bfloat16), torch.float32 for quantized ones (int8, float8_e4m3)."""
        return self._dtype

    def hugepage_bytes(self) -> int | None:
        """Bytes of the rows (and scales) in memory on 2 MiB pages now: the "ram" and "mmap" tiers of
        an engram table (see docs/tables.md, "Huge pages on mmap"); 0 on "direct", which keeps no rows
        mapped; None where the tier cannot tell (rows served in place from a release folder)."""
        if self._tier_name == "direct":
            return 0
        measure = getattr(self._tier, "hugepage_bytes", None)
        return None if measure is None else int(measure())

    @property
    def format_version(self) -> int:
        """The on-disk format version of the table."""
        return self._meta.format_version

    @property
    def closed(self) -> bool:
        return self._usage.closed

    @property
    def dedup(self) -> bool:
        """Whether a gather reads each distinct row once (default: on for "direct" only)."""
        return self._engine.dedup

    def gathered_dtype(self, want: torch.dtype) -> torch.dtype:
        """The dtype rows are gathered in for a lookup returning `want`: the stored one for float
        tables, the decoded one (float32 or bfloat16) for quantized tables."""
        return gathered_dtype(self.spec, self._dtype, want)

    @property
    def shard(self) -> ShardRange | None:
        """For one part of a row-sharded table (`engram shard`), the rows of each layer it holds;
        None for a whole table. A part is looked up through `engram.distributed.ShardedTable`;
        its `rows` and `stored_rows` take global rows inside its ranges."""
        return self._meta.shard

    @property
    def table_id(self) -> str | None:
        """The table's id, fixed when it was written (every part of a sharded table has the whole
        table's; `engram.storage.identity`); None for tables written before ids."""
        return self._meta.table_id

    @property
    def source_id(self) -> str | None:
        """The id of the table this one was converted from (`engram convert`), else None."""
        return self._meta.source_id

    @property
    def nbytes(self) -> int:
        """Bytes of rows over all layers, scales included (chunk padding excluded)."""
        return self.spec.total_bytes

    def layout(self, layer_id: int) -> LayerLayout:
        """How one layer is stored: zarr array name, rows, chunk rows, chunk count, checksums."""
        return self._meta.layers[self.spec.check_layer(layer_id)]

    def chunk_files(self, layer_id: int, scales: bool = False) -> list[Path]:
        """The chunk files of one layer (`scales`: of its scale array), in row order."""
        lay = self._array_layout(layer_id, scales)
        return [lay.chunk_path(self._path, i) for i in range(lay.n_chunks)]

    def checksums(self, layer_id: int, scales: bool = False) -> tuple[str, ...]:
        """The recorded xxh3-64 hex digest of each chunk file of one layer (`scales`: of its scale array)."""
        return self._array_layout(layer_id, scales).checksums

    def _array_layout(self, layer_id: int, scales: bool) -> LayerLayout:
        lay = self.layout(layer_id)
        if not scales:
            return lay
        if lay.scales is None:
            raise InputError(f"scales=True, but this {self.spec.dtype} table stores no scales: only int8 and "
                             "float8_e4m3 tables do")
        return lay.scales
