"""Golden bytes of small "int4" and "int2" tables (tests/golden/affine_tables.json): the chunk
files engram writes for fixed rows, byte for byte, and the zarr codec attribute that names them.

Regenerate (only for a deliberate format change) with `python tests/storage/test_intq_golden.py`.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import engram

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "affine_tables.json"
COMP = engram.Compression(np.arange(40))
CASES = {"int4": 8, "int2": 16}          # dtype: group size (scale_block)


def spec(dtype: str) -> engram.TableSpec:
    return engram.TableSpec(engram_vocab_size=(11, 13), max_ngram_size=3, n_head_per_ngram=1, n_embed_per_ngram=16,
                            layer_ids=(2,), compressed_vocab_size=40, dtype=dtype, scale_block=CASES[dtype])


def weights(rows: int) -> np.ndarray:
    """Fixed rows, exact in float32 (multiples of 1/64), with every code in use."""
    r, j = np.meshgrid(np.arange(rows), np.arange(16), indexing="ij")
    return (((r * 37 + j * 11) % 97 - 48) / 64).astype(np.float32)


def snapshot(root: Path) -> dict[str, object]:
    """What is pinned of every table: each array's row bytes (padding left out), their xxh3 chunk
    checksums as recorded, and the codec attribute of the values array."""
    out: dict[str, object] = {}
    for dtype in CASES:
        s = spec(dtype)
        path = root / f"{dtype}.engram"
        engram.build_table(path, s, COMP, weights={2: weights(s.rows(2))}).close()
        group = json.loads((path / "zarr.json").read_text())["attributes"]["engram"]
        layer = group["layers"][0]
        values = (path / "layer_2" / "c" / "0" / "0").read_bytes()[: s.rows(2) * s.row_bytes]
        scales = (path / "layer_2_scales" / "c" / "0" / "0").read_bytes()[: s.rows(2) * s.scale_row_bytes]
        codec = json.loads((path / "layer_2" / "zarr.json").read_text())["attributes"]["codec"]
        out[dtype] = {"rows": s.rows(2), "values_hex": values.hex(), "scales_hex": scales.hex(),
                      "checksums": layer["checksums"], "scale_checksums": layer["scales"]["checksums"],
                      "codec": codec}
    return out


def test_tables_have_the_golden_bytes(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    assert snapshot(tmp_path) == golden


def test_golden_bytes_decode_within_half_a_step_of_the_rows():
    """The golden bytes themselves are a valid encoding of the rows (checked without engram's decode)."""
    golden = json.loads(GOLDEN.read_text())
    for dtype, group in CASES.items():
        bits = 4 if dtype == "int4" else 2
        entry = golden[dtype]
        codes = np.frombuffer(bytes.fromhex(entry["values_hex"]), np.uint8).reshape(entry["rows"], 16 * bits // 8)
        pairs = np.frombuffer(bytes.fromhex(entry["scales_hex"]), "<f2").reshape(entry["rows"], 2 * 16 // group)
        per = 8 // bits
        q = np.stack([(codes >> (k * bits)) & ((1 << bits) - 1) for k in range(per)], axis=2).reshape(-1, 16)
        scale = np.repeat(pairs[:, 0::2].astype(np.float32), group, axis=1)
        y = q.astype(np.float32) * scale + np.repeat(pairs[:, 1::2].astype(np.float32), group, axis=1)
        assert np.all(np.abs(y - weights(entry["rows"])) <= scale / 2 * (1 + 1e-6))
        with tempfile.TemporaryDirectory() as tmp:
            engram.build_table(Path(tmp, "t"), spec(dtype), COMP, weights={2: weights(entry["rows"])}).close()
            with engram.open(Path(tmp, "t"), tier="ram") as table:
                assert torch.equal(table.rows(2, np.arange(entry["rows"])), torch.from_numpy(y))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.write_text(json.dumps(snapshot(Path(tmp)), indent=1) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
