"""Read and check the header of a safetensors file: where each tensor's bytes are, nothing more.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the data:
the header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, offsets
relative to the first data byte (`8 + N`). Serving rows in place needs only that map, so it is
read here with two small reads and checked before anything is mapped: a length that does not fit
the file, malformed JSON, an unknown dtype, a byte count that does not match dtype and shape, or
a range that runs past the end of the file (a truncated download) is a CorruptTableError. A
mapped range past the end of a file would be a SIGBUS at the first lookup, not an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Any

from engram.args import is_int
from engram.errors import CorruptTableError

__all__ = ["TensorRange", "DTYPE_BYTES", "read_header"]

# Bytes per element of each safetensors dtype name.
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1}
MAX_HEADER_BYTES = 100 << 20        # safetensors' own limit on the JSON header


@dataclasses.dataclass(frozen=True)
class TensorRange:
    """Where one tensor's bytes are.

    Attributes:
        name: the tensor name in the file.
        file: the file's path relative to the checkpoint directory.
        dtype: the safetensors dtype name ("F8_E4M3", "F8_E8M0", "BF16", ...).
        shape: the tensor's shape.
        offset: byte offset of the first element from the start of the file.
        nbytes: bytes of the tensor (row-major, little-endian).
        file_bytes: the size of the whole file when its header was read.
    """

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    file_bytes: int


def read_header(fd: int, file: str, where: str) -> dict[str, TensorRange]:
    """Every tensor of one safetensors file, its header checked against the file's size.

    Args:
        fd: an open file descriptor of the file (read with pread; its position is untouched).
        file: the file's path relative to the checkpoint directory (recorded in each TensorRange).
        where: the file's full path, for messages.

    Returns:
        {name: TensorRange} (the "__metadata__" entry is skipped).

    Raises:
        CorruptTableError: a short file, a header that is not safetensors JSON, an unknown dtype,
            a byte range that does not match its dtype and shape, or one past the end of the file.
    """
    size = os.fstat(fd).st_size
    fix = "the file is damaged or truncated: download it again"
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise CorruptTableError(f"safetensors file {where!r} has {size} bytes, too few for a header: {fix}")
    (length,) = struct.unpack("<Q", head)
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise CorruptTableError(f"safetensors file {where!r} declares a {length}-byte header but has {size} bytes "
                                f"in all: {fix}")
    raw = os.pread(fd, length, 8)
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise CorruptTableError(f"safetensors file {where!r} has an unreadable header ({exc}): {fix}") from exc
    if not isinstance(doc, dict):
        raise CorruptTableError(f"safetensors file {where!r} has a header that is not a JSON object: {fix}")
    data_start = 8 + length
    out: dict[str, TensorRange] = {}
    for name, entry in doc.items():
        if name == "__metadata__":
            continue
        out[name] = _entry(name, entry, file, where, data_start, size)
    return out


def _entry(name: str, entry: Any, file: str, where: str, data_start: int, size: int) -> TensorRange:
    def bad(problem: str) -> CorruptTableError:
        return CorruptTableError(f"safetensors file {where!r}: tensor {name!r} {problem}: the file is damaged or "
                                 "truncated; download it again")

    if not isinstance(entry, dict):
        raise bad(f"has header entry {entry!r}, expected an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise bad(f"has dtype {dtype!r}, expected one of {sorted(DTYPE_BYTES)}")
    if (not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets)):
        raise bad(f"has shape {shape!r} and data_offsets {offsets!r}, expected non-negative ints and [begin, end]")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if not 0 <= begin <= end or end - begin != nbytes:
        raise bad(f"has data_offsets {offsets!r} ({end - begin} bytes), expected {nbytes} bytes for {dtype} {shape}")
    if data_start + end > size:
        raise bad(f"ends at byte {data_start + end}, past the end of the file ({size} bytes)")
    return TensorRange(name, file, dtype, tuple(shape), data_start + begin, nbytes, size)
