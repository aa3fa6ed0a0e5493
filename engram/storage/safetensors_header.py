"""Read and check the header of a safetensors file: where each tensor's bytes are, nothing more.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the data:
the header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, offsets
relative to the first data byte (`8 + N`). Serving rows in place needs only that map, so it is
read here with two small reads and checked before anything is mapped, by the rules the
safetensors library itself applies (huggingface/safetensors, safetensors/src/tensor.rs:
`SafeTensors::read_metadata` and `Metadata::validate`, checked at commit 24b0b28):

- N is at most 100,000,000 and 8 + N at most the file's size;
- the header is UTF-8 JSON: an object whose "__metadata__" entry, if any, maps strings to
  strings (or is null), and whose every other entry is a tensor: a known dtype, a shape of
  non-negative ints, and data_offsets of exactly two non-negative ints (other fields are ignored);
- shape times the dtype's bits is a whole number of bytes, without overflowing 64 bits, and
  equals end - begin;
- the tensors sorted by (begin, end) tile the data section: the first begins at 0, each begins
  where the one before it ends (no gap, no overlap, no two tensors on the same bytes), and the
  last ends exactly at the end of the file.

Engram refuses more than the library, never less: a key twice in one object (the library keeps
the last, silently), nesting deeper than `MAX_JSON_DEPTH` (the library's JSON parser stops at
128), NaN / Infinity literals and strings that are not valid Unicode (not JSON).

Every refusal is a CorruptTableError naming the file, the tensor where there is one, and the rule.
A mapped range past the end of a file would be a SIGBUS at the first lookup, not an error; bytes
of one tensor read as another's would be silent garbage.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

from engram.args import is_int
from engram.errors import CorruptTableError
from engram.limits import MAX_SAFETENSORS_HEADER_BYTES
from engram.untrusted import loads

__all__ = ["TensorRange", "DTYPE_BITS", "read_header", "check_header"]

# Bits per element of each safetensors dtype name (the library's `Dtype::bitsize`).
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
_USIZE = 1 << 64            # the library's ints are 64-bit usize
_FIX = "the file is damaged, truncated or not a safetensors file; download it again"


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
    """Every tensor of one safetensors file, its header checked as the safetensors library checks it.

    Args:
        fd: an open file descriptor of the file (read with pread; its position is untouched).
        file: the file's path relative to the checkpoint directory (recorded in each TensorRange).
        where: the file's full path, for messages.

    Returns:
        {name: TensorRange} (the "__metadata__" entry is skipped).

    Raises:
        CorruptTableError: the header breaks a rule of the module docstring; the message names the
            file, the tensor and the rule.
    """
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise CorruptTableError(f"safetensors file {where!r} has {size} bytes, too few for a header: {_FIX}")
    (length,) = struct.unpack("<Q", head)
    if length > MAX_SAFETENSORS_HEADER_BYTES:
        raise CorruptTableError(f"safetensors file {where!r} declares a {length}-byte header, more than the "
                                f"{MAX_SAFETENSORS_HEADER_BYTES} safetensors allows: {_FIX}")
    if length > size - 8:
        raise CorruptTableError(f"safetensors file {where!r} declares a {length}-byte header but has {size} bytes "
                                f"in all: {_FIX}")
    raw = os.pread(fd, length, 8)
    if len(raw) != length:
        raise CorruptTableError(f"safetensors file {where!r} ended inside its header: {_FIX}")
    return check_header(raw, size, file, where)


def check_header(raw: bytes, size: int, file: str, where: str) -> dict[str, TensorRange]:
    """The tensors of a safetensors header `raw` (the N bytes after the length) of a `size`-byte file.

    Raises:
        CorruptTableError: as `read_header`.
    """
    doc = loads(raw, f"safetensors file {where!r} has a header that", CorruptTableError, _FIX)
    if not isinstance(doc, dict):
        raise CorruptTableError(f"safetensors file {where!r} has a header that is not a JSON object: {_FIX}")
    meta = doc.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CorruptTableError(f"safetensors file {where!r} has \"__metadata__\" {_short(meta)}, expected an "
                                f"object of strings: {_FIX}")
    data_start = 8 + len(raw)
    out = {name: _entry(name, entry, file, where, data_start, size)
           for name, entry in doc.items() if name != "__metadata__"}
    _check_tiling(out, where, size - data_start)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _entry(name: str, entry: Any, file: str, where: str, data_start: int, size: int) -> TensorRange:
    def bad(problem: str) -> CorruptTableError:
        return CorruptTableError(f"safetensors file {where!r}: tensor {name!r} {problem}: {_FIX}")

    if not isinstance(entry, dict):
        raise bad(f"has header entry {_short(entry)}, expected an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise bad(f"has dtype {_short(dtype)}, expected one of {sorted(DTYPE_BITS)}")
    if not isinstance(shape, list) or not all(is_int(d) and 0 <= d < _USIZE for d in shape):
        raise bad(f"has shape {_short(shape)}, expected a list of non-negative ints")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(is_int(o) and 0 <= o < _USIZE for o in offsets)):
        raise bad(f"has data_offsets {_short(offsets)}, expected [begin, end]: two non-negative ints")
    elements = 1
    for d in shape:                 # multiplied in order, refused at the first overflow (as the library does)
        elements *= d
        if elements >= _USIZE:
            break
    bits = elements * DTYPE_BITS[dtype]
    if bits >= _USIZE:
        raise bad(f"has shape {_short(shape)} of {dtype}: its size in bits overflows 64 bits")
    if bits % 8:
        raise bad(f"has shape {shape} of {dtype}: {bits} bits, not a whole number of bytes")
    begin, end = offsets
    if end - begin != bits // 8:
        raise bad(f"has data_offsets {offsets} ({end - begin} bytes), expected {bits // 8} bytes for {dtype} "
                  f"{shape}")
    return TensorRange(name, file, dtype, tuple(shape), data_start + begin, bits // 8, size)


def _check_tiling(tensors: dict[str, TensorRange], where: str, data_bytes: int) -> None:
    """Raise unless the tensors, sorted by (begin, end), tile the data section from 0 to its end."""
    at = 0
    for t in sorted(tensors.values(), key=lambda t: (t.offset, t.offset + t.nbytes)):
        begin = t.offset - (t.file_bytes - data_bytes)            # relative to the data section again
        if begin != at:
            before = "the tensor sorted before it ends" if at else "the first tensor must begin"
            rule = (f"overlaps the bytes of another tensor: it begins at data byte {begin}, before {at}, where "
                    f"{before}" if begin < at else
                    f"leaves a gap: it begins at data byte {begin}, but {before} at {at}")
            raise CorruptTableError(f"safetensors file {where!r}: tensor {t.name!r} {rule}; tensors must tile the "
                                    f"data section without gaps or overlaps: {_FIX}")
        at = begin + t.nbytes
        if at > data_bytes:
            raise CorruptTableError(f"safetensors file {where!r}: tensor {t.name!r} ends at byte "
                                    f"{t.offset + t.nbytes}, past the end of the file ({t.file_bytes} bytes): {_FIX}")
    if at != data_bytes:
        raise CorruptTableError(f"safetensors file {where!r} has {data_bytes - at} bytes after its last tensor ends "
                                f"(data byte {at} of {data_bytes}): the last tensor must end where the file ends; "
                                f"{_FIX}")
