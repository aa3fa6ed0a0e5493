"""The files of a model checkpoint: one safetensors or torch.save file, and the shard sets and
index (`model.safetensors.index.json`) that name which file holds each tensor.

`engram.making.checkpoint` streams rows out of them; this module only finds, opens and reads files:
every file kind answers `info(name)` (stored dtype, shape), `read(name, start, stop)` (a row
range) and `close()`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from engram.errors import CorruptTableError, InputError, MissingFileError
from engram.limits import MAX_INDEX_BYTES
from engram.untrusted import check_regular, read_json

__all__ = ["INDEX_NAME", "SCALE_SUFFIXES", "SafetensorsFile", "TorchFile", "open_file", "read_index", "expand_path"]

INDEX_NAME = "model.safetensors.index.json"
SCALE_SUFFIXES = ("scale", "weight_scale_inv")  # the scale of "X.weight" is "X.scale" (or "X.weight_scale_inv")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


# -- one file -----------------------------------------------------------------------------------

class SafetensorsFile:
    """One *.safetensors file, row ranges read through `safe_open(...).get_slice`."""

    def __init__(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            self._f: Any = safe_open(str(path), framework="pt")      # None once closed
        except (SafetensorError, OSError, ValueError) as exc:
            raise CorruptTableError(f"checkpoint file {str(path)!r} is not a readable safetensors file: {exc}") from exc
        self.names = set(self._f.keys())

    def info(self, name: str) -> tuple[Any, tuple[int, ...]]:
        s = self._f.get_slice(name)
        return s.get_dtype(), tuple(s.get_shape())

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._f.get_slice(name)[start:stop]          # a fresh tensor read from the file

    def close(self) -> None:
        self._f = None


class TorchFile:
    """One torch.save file, opened with `torch.load(mmap=True, weights_only=True)`."""

    def __init__(self, path: Path) -> None:
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # torch raises RuntimeError, pickle errors, ... for bad files
            raise CorruptTableError(
                f"checkpoint file {str(path)!r} could not be loaded with torch.load(mmap=True, weights_only=True): "
                f"{exc}; re-save it with torch.save (zip format) or convert it to safetensors"
            ) from exc
        self._tensors = _flatten(obj)
        self.names = set(self._tensors)

    def info(self, name: str) -> tuple[Any, tuple[int, ...]]:
        t = self._tensors[name]
        return t.dtype, tuple(t.shape)

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._tensors[name][start:stop].clone()      # copy out of the map: no views kept

    def close(self) -> None:
        self._tensors = {}


def _flatten(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a (nested) state dict under dotted names; other values are skipped."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    elif isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    return out


def open_file(path: Path) -> SafetensorsFile | TorchFile:
    """The file at `path`, by its first bytes: a torch.save zip or a safetensors header.

    Opened non-blocking and refused unless a regular file: a FIFO in a shard's place is refused,
    not waited on."""
    fix = f"pass *.safetensors shards, their {INDEX_NAME}, or torch.save files"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise MissingFileError(f"checkpoint file {str(path)!r} does not exist: {fix}") from None
    try:
        check_regular(fd, str(path), "checkpoint file", None, fix, InputError)
        head = os.pread(fd, 9, 0)
    finally:
        os.close(fd)
    if head[:4] == b"PK\x03\x04":
        return TorchFile(path)
    if len(head) == 9 and head[8:9] == b"{":
        return SafetensorsFile(path)
    raise InputError(f"checkpoint file {str(path)!r} is neither safetensors nor a torch.save (zip) file: {fix}")


# -- finding the files --------------------------------------------------------------------------

def read_index(path: Path) -> dict[str, Path]:
    """{tensor name: shard file} from a safetensors index, every shard checked to exist.

    The index is read as an input from elsewhere (`engram.untrusted`): a regular file of at most
    `engram.limits.MAX_INDEX_BYTES`, strict JSON; it may name only shards in its own folder."""
    fix = "download the index again"
    doc = read_json(path, "checkpoint index", MAX_INDEX_BYTES, fix, CorruptTableError)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CorruptTableError(f"checkpoint index {str(path)!r} has no valid \"weight_map\" (an object of tensor "
                                f"names to shard file names): {fix}")
    folder = path.parent.resolve()
    for name, file in weight_map.items():     # an index names shards beside it, never files elsewhere
        if "\0" in file or not file or not (path.parent / file).resolve().is_relative_to(folder):
            raise CorruptTableError(
                f"checkpoint index {str(path)!r} maps {name!r} to {file!r}, outside the index's folder "
                f"{str(folder)!r}: an index may name only shards in its own folder; fix or replace the index")
    resolved = {name: path.parent / file for name, file in weight_map.items()}
    for file in sorted(set(resolved.values())):
        if not os.path.lexists(file):
            raise MissingFileError(f"checkpoint shard {str(file)!r} named in {str(path)!r} does not exist: "
                                   f"download every shard the index lists")
    return resolved


def expand_path(path: Path) -> tuple[list[Path], dict[str, Path]]:
    """A path -> (files to list, names already mapped by an index)."""
    if path.is_dir():
        if os.path.lexists(path / INDEX_NAME):
            return [], read_index(path / INDEX_NAME)
        files = sorted(path.glob("*.safetensors")) or sorted(p for p in path.iterdir() if p.suffix in _TORCH_SUFFIXES)
        if not files:
            raise MissingFileError(f"checkpoint directory {str(path)!r} holds no *.safetensors, {INDEX_NAME} or "
                                     f"torch.save ({', '.join(_TORCH_SUFFIXES)}) files")
        return files, {}
    if not os.path.lexists(path):
        raise MissingFileError(f"checkpoint path {str(path)!r} does not exist: pass checkpoint files, "
                               f"their directory or {INDEX_NAME}")
    if path.suffix == ".json":
        return [], read_index(path)
    return [path], {}
