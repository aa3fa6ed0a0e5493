"""engram.storage.safetensors_header: every header the safetensors library refuses, engram refuses.

Each crafted file is opened by both readers on the same bytes: `safetensors.safe_open` (the
oracle) and `read_header`. Engram may refuse more (a key twice, deeper nesting), never less; its
error names the file, the tensor and the rule broken.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open

from engram.errors import CorruptTableError
from engram.storage.safetensors_header import DTYPE_BITS, read_header


def tensor(dtype: str, shape: list, offsets: list, **extra) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets, **extra}


def write(path, header: str | bytes | dict, data: bytes, declared: int | None = None) -> str:
    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    raw = raw.encode() if isinstance(raw, str) else raw
    n = len(raw) if declared is None else declared
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return os.fspath(path)


def library_refuses(path: str) -> str | None:
    try:
        with safe_open(path, framework="pt") as f:
            list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        return str(exc)
    return None


def engram_reads(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_header(fd, os.path.basename(path), path)
    finally:
        os.close(fd)


U8_4 = tensor("U8", [4], [0, 4])
ROWS = tensor("F8_E4M3", [2, 4], [0, 8])
SCALES = tensor("F8_E8M0", [2, 1], [8, 10])
# name -> (header, data bytes, what engram's message says): the library refuses every one of them
REFUSED_BY_BOTH = {
    "rows shifted into the next tensor": ({"w": tensor("U8", [2], [0, 2]), "rows": tensor("F8_E4M3", [2, 4], [4, 12]),
                                           "scales": tensor("F8_E8M0", [2, 1], [10, 12])}, bytes(12),
                                          r"tensor 'rows' leaves a gap: it begins at data byte 4, but the tensor "
                                          r"sorted before it ends at 2"),
    "rows shifted back over the previous tensor": ({"w": tensor("U8", [2], [0, 2]),
                                                    "rows": tensor("F8_E4M3", [2, 4], [1, 9]),
                                                    "scales": tensor("F8_E8M0", [2, 1], [10, 12])}, bytes(12),
                                                   r"tensor 'rows' overlaps the bytes of another tensor: it begins "
                                                   r"at data byte 1, before 2"),
    "scales aliased onto rows": ({"rows": ROWS, "scales": tensor("F8_E8M0", [2, 1], [0, 2])}, bytes(10),
                                 r"overlaps the bytes of another tensor"),
    "two tensors on the same bytes": ({"a": U8_4, "b": U8_4}, bytes(4), r"overlaps the bytes of another tensor"),
    "a gap between tensors": ({"a": U8_4, "b": tensor("U8", [2], [6, 8])}, bytes(8),
                              r"tensor 'b' leaves a gap: it begins at data byte 6, but the tensor sorted before it "
                              r"ends at 4"),
    "first tensor not at 0": ({"a": tensor("U8", [4], [2, 6])}, bytes(6),
                              r"tensor 'a' leaves a gap: it begins at data byte 2, but the first tensor must "
                              r"begin at 0"),
    "bytes after the last tensor": ({"a": U8_4}, bytes(5), r"has 1 bytes after its last tensor ends"),
    "past the end of the file": ({"a": tensor("U8", [8], [0, 8])}, bytes(4),
                                 r"tensor 'a' ends at byte \d+, past the end of the file"),
    "size not shape times dtype": ({"a": tensor("F32", [2], [0, 4])}, bytes(4),
                                   r"tensor 'a' has data_offsets \[0, 4\] \(4 bytes\), expected 8 bytes for F32 \[2\]"),
    "end before begin": ({"a": tensor("U8", [0], [4, 0])}, bytes(4), r"expected 0 bytes"),
    "unknown dtype": ({"a": tensor("Q8", [1], [0, 1])}, bytes(1), r"tensor 'a' has dtype 'Q8', expected one of"),
    "lowercase dtype": ({"a": tensor("u8", [1], [0, 1])}, bytes(1), r"has dtype 'u8'"),
    "half a byte": ({"a": tensor("F4", [3], [0, 2])}, bytes(2), r"12 bits, not a whole number of bytes"),
    "element count overflows": ({"a": tensor("U8", [2**40, 2**40, 0], [0, 0])}, b"", r"overflows 64 bits"),
    "bits overflow": ({"a": tensor("F64", [2**62], [0, 0])}, b"", r"overflows 64 bits"),
    "negative dimension": ({"a": tensor("U8", [-1], [0, 1])}, bytes(1), r"has shape \[-1\], expected a list of"),
    "float dimension": ('{"a": {"dtype": "U8", "shape": [1.0], "data_offsets": [0, 1]}}', bytes(1),
                        r"has shape \[1.0\]"),
    "bool dimension": ({"a": tensor("U8", [True], [0, 1])}, bytes(1), r"has shape \[True\]"),
    "dimension past 64 bits": ({"a": tensor("U8", [2**64], [0, 0])}, b"", r"expected a list of non-negative ints"),
    "three offsets": ({"a": tensor("U8", [1], [0, 1, 1])}, bytes(1), r"expected \[begin, end\]"),
    "offsets an object": ({"a": tensor("U8", [1], {"0": 0, "1": 1})}, bytes(1), r"expected \[begin, end\]"),
    "no data_offsets": ({"a": {"dtype": "U8", "shape": [1]}}, bytes(1), r"has data_offsets None"),
    "entry not an object": ({"a": [1, 2]}, b"", r"tensor 'a' has header entry \[1, 2\]"),
    "metadata not strings": ({"__metadata__": {"k": 1}, "a": U8_4}, bytes(4), r"\"__metadata__\" \{'k': 1\}"),
    "metadata a list": ({"__metadata__": ["k"]}, b"", r"expected an object of strings"),
    "header a list": ("[]", b"", r"has a header that is not a JSON object"),
    "not JSON": ("{" * 16, b"", r"has a header that is not valid JSON"),
    "trailing characters": ('{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}xx', bytes(1),
                            r"is not valid JSON"),
    "NaN literal": ('{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": NaN}}', bytes(1),
                    r"NaN is not a JSON value"),
    "a field twice": ('{"a": {"dtype": "U8", "shape": [1], "shape": [1], "data_offsets": [0, 1]}}', bytes(1),
                      r"is ambiguous JSON: it holds the key 'shape' twice"),
    "a lone surrogate": ('{"\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', bytes(1),
                         r"not valid Unicode"),
    "not UTF-8": (b'{"\xff": 1}', b"", r"is not UTF-8 text"),
    "nested 130 deep": ('{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": ' + "[" * 130
                        + "]" * 130 + "}}", bytes(1), r"more than 64 deep"),
    "nested 5000 deep": ("[" * 5000 + "]" * 5000, b"", r"more than 64 deep"),
}
# accepted by the library, refused by engram (stricter, never looser)
REFUSED_BY_ENGRAM_ONLY = {
    "a tensor twice": ('{"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, '
                       '"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}', bytes(4),
                       r"is ambiguous JSON: it holds the key 'a' twice in one object"),
    "a metadata key twice": ('{"__metadata__": {"k": "x", "k": "y"}}', b"", r"holds the key 'k' twice"),
    "nested 100 deep": ('{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": ' + "[" * 100
                        + "]" * 100 + "}}", bytes(1), r"more than 64 deep"),
}
ACCEPTED_BY_BOTH = {
    "one tensor": ({"a": U8_4}, bytes(4)),
    "rows and scales": ({"rows": ROWS, "scales": SCALES, "__metadata__": {"format": "pt"}}, bytes(10)),
    "no tensors": ({}, b""),
    "null metadata": ({"__metadata__": None, "a": U8_4}, bytes(4)),
    "empty tensor first": ({"e": tensor("U8", [0], [0, 0]), "a": U8_4}, bytes(4)),
    "unknown field": ({"a": tensor("U8", [4], [0, 4], junk=[1, {"x": 2}])}, bytes(4)),
    "listed out of order": ({"b": tensor("U8", [2], [4, 6]), "a": U8_4}, bytes(6)),
    "sub-byte and wide dtypes": ({"f4": tensor("F4", [4], [0, 2]), "f6": tensor("F6_E2M3", [4], [2, 5]),
                                  "c": tensor("C64", [1], [5, 13]), "z": tensor("F8_E4M3FNUZ", [1], [13, 14])},
                                 bytes(14)),
    "padded header": (json.dumps({"a": U8_4}) + " " * 7, bytes(4)),
}


@pytest.mark.parametrize("case", sorted(REFUSED_BY_BOTH))
def test_what_the_library_refuses_engram_refuses_naming_the_rule(tmp_path, case):
    header, data, message = REFUSED_BY_BOTH[case]
    path = write(tmp_path / "model.safetensors", header, data)
    assert library_refuses(path) is not None, "the oracle accepts this file: not a refusal case"
    with pytest.raises(CorruptTableError, match=rf"safetensors file '{path}'.*{message}.*download it again"):
        engram_reads(path)


@pytest.mark.parametrize("case", sorted(REFUSED_BY_ENGRAM_ONLY))
def test_engram_is_stricter_on_keys_twice_and_deep_nesting(tmp_path, case):
    header, data, message = REFUSED_BY_ENGRAM_ONLY[case]
    path = write(tmp_path / "model.safetensors", header, data)
    assert library_refuses(path) is None
    with pytest.raises(CorruptTableError, match=message):
        engram_reads(path)


@pytest.mark.parametrize("case", sorted(ACCEPTED_BY_BOTH))
def test_what_both_accept_gives_the_librarys_shapes_and_bytes(tmp_path, case):
    header, data = ACCEPTED_BY_BOTH[case]
    path = write(tmp_path / "model.safetensors", header, data)
    assert library_refuses(path) is None
    got = engram_reads(path)
    with safe_open(path, framework="pt") as f:
        assert sorted(got) == sorted(f.keys())
        for name, t in got.items():
            assert list(t.shape) == f.get_slice(name).get_shape() and t.dtype == f.get_slice(name).get_dtype()
    doc = json.loads(header) if isinstance(header, str) else header
    start = 8 + len(json.dumps(header).encode() if isinstance(header, dict) else header.encode())
    for name, t in got.items():
        assert (t.offset, t.nbytes) == (start + doc[name]["data_offsets"][0],
                                        doc[name]["data_offsets"][1] - doc[name]["data_offsets"][0])


@pytest.mark.parametrize("declared, message", [
    (100_000_001, r"declares a 100000001-byte header, more than the 100000000 safetensors allows"),
    (2**64 - 1, r"declares a 18446744073709551615-byte header"),
    (1000, r"declares a 1000-byte header but has \d+ bytes in all"),
])
def test_header_lengths_the_library_refuses(tmp_path, declared, message):
    path = write(tmp_path / "model.safetensors", {"a": U8_4}, bytes(4), declared=declared)
    assert library_refuses(path) is not None
    with pytest.raises(CorruptTableError, match=message):
        engram_reads(path)
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(CorruptTableError, match=r"has 2 bytes, too few for a header"):
        engram_reads(os.fspath(tmp_path / "short.safetensors"))


# random headers of up to four tensors: each begins near where the one before it ends (a shift of a
# few bytes: a gap or an overlap) and is sized near shape x dtype; the file ends near the last tensor
_DTYPES = st.sampled_from(sorted(DTYPE_BITS))
_NEAR = st.sampled_from([0, 0, 0, -2, -1, 1, 2])


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(st.tuples(_DTYPES, st.lists(st.integers(0, 6), max_size=3), _NEAR, _NEAR),
                        min_size=1, max_size=4),
       tail=_NEAR, order=st.randoms(use_true_random=False))
def test_fuzzed_headers_engram_never_accepts_what_the_library_refuses(tmp_path_factory, entries, tail, order):
    header, at = {}, 0
    for i, (dtype, shape, shift, size_error) in enumerate(entries):
        begin = max(0, at + shift)
        end = max(0, begin + -(-(DTYPE_BITS[dtype] * _prod(shape)) // 8) + size_error)
        header[f"t{i}"] = tensor(dtype, shape, [begin, end])
        at = max(at, end)
    names = list(header)
    order.shuffle(names)                                  # header order is not data order
    header = {name: header[name] for name in names}
    path = write(tmp_path_factory.mktemp("fuzz") / "f.safetensors", header, bytes(max(0, at + tail)))
    refused = library_refuses(path)
    try:
        engram_reads(path)
    except CorruptTableError:
        return
    assert refused is None, f"engram accepted a header the library refuses ({refused}): {header}"


def _prod(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out
