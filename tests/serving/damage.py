"""Damage planted in copies of tables by the serving tests: a flipped bit, block digests removed."""

from __future__ import annotations

import json
import os
import shutil

from engram.storage.format import METADATA_CHECKSUM


def flip_bit(path, offset: int, mask: int = 0x10) -> None:
    """Flip the bits `mask` of byte `offset` of the (read-only) file at `path`, in place."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def drop_block_digests(path) -> None:
    """The table as written before block digests: no "blocks" entries or arrays, no metadata checksum."""
    doc = json.loads((path / "zarr.json").read_text())
    attrs = doc["attributes"]["engram"]
    attrs.pop(METADATA_CHECKSUM)
    for layer in attrs["layers"]:
        shutil.rmtree(path / layer.pop("blocks")["array"])
    (path / "zarr.json").write_text(json.dumps(doc))
