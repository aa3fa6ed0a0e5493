"""One row's record in the working copy: its values, then both Adam moments, in one run of bytes.

    | values: D x float32 or bfloat16 | (2 bytes of padding for bfloat16 rows of odd D) |
    | exp_avg: D x float32 | exp_avg_sq: D x float32 |

All little-endian. One record per row, so a cache miss reads the row and its optimizer state in
one place: 12 bytes per value for float32 rows, 10 for bfloat16. The cache holds rows in float32
(and the moments, always float32); bfloat16 rows are rounded to nearest-even when written.
"""

from __future__ import annotations

import dataclasses

import torch

from engram.errors import InputError

__all__ = ["RecordLayout", "ROW_DTYPES"]

ROW_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}   # what the working copy may store rows as


@dataclasses.dataclass(frozen=True)
class RecordLayout:
    """Where a row's values and moments sit in its record.

    Args:
        head_dim: D, values per row.
        dtype: "float32" or "bfloat16", how the row's values are stored.
    """

    head_dim: int
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in ROW_DTYPES:
            raise InputError(f"dtype={self.dtype!r} is not a working-copy row dtype: expected one of "
                             f"{tuple(ROW_DTYPES)} (rows train in float32 either way)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return ROW_DTYPES[self.dtype]

    @property
    def row_bytes(self) -> int:
        """Bytes of the row's values."""
        return self.head_dim * self.torch_dtype.itemsize

    @property
    def moments_at(self) -> int:
        """Offset of exp_avg in the record (4-byte aligned)."""
        return -(-self.row_bytes // 4) * 4

    @property
    def record_bytes(self) -> int:
        """Bytes of one record: values, padding, exp_avg, exp_avg_sq."""
        return self.moments_at + 8 * self.head_dim

    def values(self, records: torch.Tensor) -> torch.Tensor:
        """The stored values [k, D] (a view) of records uint8 [k, record_bytes]."""
        return records[:, : self.row_bytes].view(self.torch_dtype)

    def moments(self, records: torch.Tensor) -> torch.Tensor:
        """Both moments [k, 2D] float32 (a view: exp_avg then exp_avg_sq) of records uint8 [k, record_bytes]."""
        return records[:, self.moments_at:].view(torch.float32)

    def pack(self, rows: torch.Tensor, moments: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write rows [k, D] (float32, rounded to the stored dtype) and moments [k, 2D] into out uint8
        [k, record_bytes]; returns out."""
        if self.moments_at != self.row_bytes:
            out[:, self.row_bytes: self.moments_at] = 0
        self.values(out).copy_(rows)
        self.moments(out).copy_(moments)
        return out

    def unpack_into(self, records: torch.Tensor, rows: torch.Tensor, moments: torch.Tensor,
                    slots: torch.Tensor) -> None:
        """Copy records uint8 [k, record_bytes] into rows [S, D] and moments [S, 2D] (float32) at slots [k]."""
        values = self.values(records)
        rows.index_copy_(0, slots, values if values.dtype == torch.float32 else values.to(torch.float32))
        moments.index_copy_(0, slots, self.moments(records))
