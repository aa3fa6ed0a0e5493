"""Row dtypes: the one table of how each `TableSpec.dtype` is stored, scaled and decoded.

Every other module (spec, format, quant, tiers, writer, checkpoint, the CLI) derives what it needs from
`ROW_DTYPES`; adding a row dtype touches this table and the codec (`engram.storage.quant`) only:

| dtype         | stored values (numpy / zarr)  | scales                                   | decoded to |
|---------------|-------------------------------|------------------------------------------|------------|
| "float32"     | `<f4` / float32               | none                                     | float32    |
| "bfloat16"    | `<u2` / uint16 (the bits)     | none                                     | bfloat16   |
| "float16"     | `<f2` / float16               | none                                     | float16    |
| "int8"        | `i1` / int8                   | one float32 per row                      | float32    |
| "float8_e4m3" | `u1` / uint8 (E4M3 "fn" bits) | one E8M0 byte (uint8) per block of values | float32    |
| "int4"        | `u1` / uint8, two codes a byte | (scale, minimum) float16 pair per group   | float32    |
| "int2"        | `u1` / uint8, four codes a byte| (scale, minimum) float16 pair per group   | float32    |

"decoded to" is the torch dtype a lookup returns by default (`Table.dtype`). Blocks ("float8_e4m3")
and groups ("int4", "int2") hold `TableSpec.scale_block` values. "int4" and "int2" rows store
unsigned codes packed little-endian (D * bits / 8 bytes a row; `engram.storage.intq` has the layout).
Torch is imported only by `torch_dtype`, so `import engram` stays fast.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["RowDtype", "ROW_DTYPES", "QUANTIZED_DTYPES", "BLOCK_DTYPE", "BLOCK_DTYPES", "AFFINE_DTYPES",
           "DEFAULT_SCALE_BLOCK", "row_dtype", "storage_dtype", "scale_dtype", "torch_dtype", "storage_torch_dtype"]

# values per E8M0 scale of "float8_e4m3" rows (the DeepSeek-V4.1 layout), and per (scale, minimum)
# pair of "int4" / "int2" rows (as llama.cpp's Q4_1 blocks of 32)
DEFAULT_SCALE_BLOCK = 32


@dataclasses.dataclass(frozen=True)
class RowDtype:
    """How one row dtype is stored.

    Attributes:
        name: the `TableSpec.dtype` string.
        storage: numpy dtype string of the stored values (little-endian).
        zarr: zarr v3 data_type of the stored values.
        torch: name of the torch dtype rows decode to by default.
        storage_torch: name of the torch dtype holding the stored values unchanged.
        scale: numpy dtype string of the stored scales, or None (float dtypes store none).
        scale_zarr: zarr v3 data_type of the scales, or None.
        per_block: scales cover blocks of `TableSpec.scale_block` values (True) or whole rows.
        bits: bits of one value where values are packed several to a byte ("int4": 4, "int2": 2;
            unsigned codes, little-endian); 0 where each value is one stored element.
        scales_per_block: stored scale values per block: 2 for the affine dtypes (scale, minimum).
        value_torch: names of the torch dtypes that hold stored values unchanged (what a decode accepts).
        scale_torch: names of the torch dtypes that hold stored scales unchanged.
        safetensors: the safetensors dtype name of checkpoint rows stored this way, or None.
        scale_safetensors: the safetensors dtype names checkpoint scales of such rows come in.
    """

    name: str
    storage: str
    zarr: str
    torch: str
    storage_torch: str
    scale: str | None = None
    scale_zarr: str | None = None
    per_block: bool = False
    value_torch: tuple[str, ...] = ()
    scale_torch: tuple[str, ...] = ()
    safetensors: str | None = None
    scale_safetensors: tuple[str, ...] = ()
    bits: int = 0
    scales_per_block: int = 1

    @property
    def value_bytes(self) -> int:
        """Bytes of one stored element (a value; for packed dtypes, a byte holding 8 // bits values)."""
        return np.dtype(self.storage).itemsize

    def value_width(self, head_dim: int) -> int:
        """Stored elements per row of `head_dim` values: D, or D * bits / 8 bytes for packed dtypes."""
        return head_dim * self.bits // 8 if self.bits else head_dim

    @property
    def quantized(self) -> bool:
        """True when the dtype stores scales beside its values."""
        return self.scale is not None

    def scales_per_row(self, head_dim: int, block: int) -> int:
        """Scales stored per row of `head_dim` values (0 for float dtypes)."""
        if not self.quantized:
            return 0
        return head_dim // block * self.scales_per_block if self.per_block else 1

    def scale_row_bytes(self, head_dim: int, block: int) -> int:
        """Bytes of one row's scales (0 for float dtypes)."""
        return 0 if self.scale is None else self.scales_per_row(head_dim, block) * np.dtype(self.scale).itemsize


ROW_DTYPES: dict[str, RowDtype] = {d.name: d for d in (
    RowDtype("float32", "<f4", "float32", "float32", "float32", value_torch=("float32",), safetensors="F32"),
    RowDtype("bfloat16", "<u2", "uint16", "bfloat16", "bfloat16", value_torch=("uint16", "bfloat16"),
             safetensors="BF16"),
    RowDtype("float16", "<f2", "float16", "float16", "float16", value_torch=("float16",), safetensors="F16"),
    RowDtype("int8", "i1", "int8", "float32", "int8", scale="<f4", scale_zarr="float32", value_torch=("int8",),
             scale_torch=("float32",)),
    RowDtype("float8_e4m3", "u1", "uint8", "float32", "uint8", scale="u1", scale_zarr="uint8", per_block=True,
             value_torch=("uint8", "float8_e4m3fn"), scale_torch=("uint8", "float8_e8m0fnu"), safetensors="F8_E4M3",
             scale_safetensors=("F8_E8M0", "U8")),
    *(RowDtype(f"int{bits}", "u1", "uint8", "float32", "uint8", scale="<f2", scale_zarr="float16", per_block=True,
               value_torch=("uint8",), scale_torch=("float16",), bits=bits, scales_per_block=2) for bits in (4, 2)),
)}
QUANTIZED_DTYPES = tuple(name for name, d in ROW_DTYPES.items() if d.quantized)
# the dtypes whose scales cover blocks (groups) of `TableSpec.scale_block` values
BLOCK_DTYPES = tuple(name for name, d in ROW_DTYPES.items() if d.per_block)
# the one of them checkpoints store ("float8_e4m3", DeepSeek-V4.1's rows)
(BLOCK_DTYPE,) = (name for name, d in ROW_DTYPES.items() if d.per_block and d.safetensors)
# the affine sub-8-bit dtypes: codes packed below a byte, a (scale, minimum) pair per group
AFFINE_DTYPES = tuple(name for name, d in ROW_DTYPES.items() if d.bits)


def row_dtype(name: str) -> RowDtype:
    """The RowDtype of a `TableSpec.dtype` string (KeyError for unknown names)."""
    return ROW_DTYPES[name]


def storage_dtype(name: str) -> np.dtype:
    """The numpy dtype of the stored values ("bfloat16": uint16 bits; "float8_e4m3": uint8 bytes)."""
    return np.dtype(ROW_DTYPES[name].storage)


def scale_dtype(name: str) -> np.dtype | None:
    """The numpy dtype of the stored scales, or None for float dtypes."""
    scale = ROW_DTYPES[name].scale
    return None if scale is None else np.dtype(scale)


def torch_dtype(name: str) -> Any:
    """The torch dtype rows of `name` decode to by default ("bfloat16" -> torch.bfloat16, "int8" -> torch.float32)."""
    import torch

    return getattr(torch, ROW_DTYPES[name].torch)


def storage_torch_dtype(name: str) -> Any:
    """The torch dtype holding the stored values unchanged ("float8_e4m3" -> torch.uint8)."""
    import torch

    return getattr(torch, ROW_DTYPES[name].storage_torch)
