"""A DeepSeek-V4.1 checkpoint directory as released: its Engram tensors, found and checked.

    V4.1/config.json                        the spec (engram.addressing.hf_config)
    V4.1/tokenizer.json                     the compression
    V4.1/model.safetensors.index.json       optional: which shard holds each tensor
    V4.1/model-000NN-of-00048.safetensors   shards; layer 1's Engram tensors in 47, layer 14's in 48

Per Engram layer L (names as released; Hugging Face conversions prefix them with "model." and
call a scale "weight_scale_inv"; both are read):

    layers.L.engram.embed.weight   F8_E4M3 [rows, D]           the rows, all heads stacked
    layers.L.engram.embed.scale    F8_E8M0 [rows, D/32]        one scale per 32 values
    layers.L.engram.wkv.weight     F8_E4M3 [C*(G+1), H*D]      keys of the G branches, then the value
    layers.L.engram.wkv.scale      F8_E8M0 [C*(G+1)/32, H*D/32] one scale per 32x32 block
    layers.L.engram.q_weight       BF16 [G, C]
    layers.L.engram.k_weight       BF16 [G, C]

Opening reads config.json, the index, and the headers of the shards that hold Engram tensors
(two small reads each), and checks every row tensor's dtype, shape and byte range against the
config; no row is read. Nothing is ever written into the directory.

The folder may come from elsewhere, so every file of it is opened as a table's files are
(`engram.storage.tabledir.TableDir`): relative to one directory handle, never through a
symbolic link, non-blocking, regular files only; config.json, the index and tokenizer.json are
read whole only under their caps (`engram.limits`) and their JSON strictly (`engram.untrusted`);
shard headers are checked by the safetensors library's rules (`engram.storage.safetensors_header`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import xxhash

from engram.addressing.compression import Compression, tokenizer_from_json
from engram.addressing.hf_config import CONFIG_NAME, config_from_json
from engram.addressing.spec import TableSpec
from engram.dtypes import BLOCK_DTYPE, ROW_DTYPES
from engram.errors import CorruptTableError, MissingFileError
from engram.limits import MAX_CONFIG_BYTES, MAX_INDEX_BYTES, MAX_TOKENIZER_BYTES
from engram.storage.checkpoint_files import INDEX_NAME, SCALE_SUFFIXES
from engram.storage.safetensors_header import TensorRange, read_header
from engram.storage.tabledir import TableDir
from engram.untrusted import loads

__all__ = ["ReleaseCheckpoint", "ReleaseLayer", "read_release", "is_release_dir", "engram_name",
           "TOKENIZER_NAME", "INDEX_NAME", "PREFIXES", "SCALE_SUFFIXES"]

TOKENIZER_NAME = "tokenizer.json"
PREFIXES = ("", "model.")                      # as released; Hugging Face conversions
ROW_DTYPE = ROW_DTYPES[BLOCK_DTYPE].safetensors or ""                # "F8_E4M3"
SCALE_DTYPES = ROW_DTYPES[BLOCK_DTYPE].scale_safetensors             # E8M0 bytes, typed or as "U8"


def engram_name(layer_id: int, part: str, prefix: str = "") -> str:
    """The name of an Engram tensor: `engram_name(1, "embed.weight")` -> "layers.1.engram.embed.weight"."""
    return f"{prefix}layers.{layer_id}.engram.{part}"


@dataclasses.dataclass(frozen=True)
class ReleaseLayer:
    """Where one layer's rows are: its values and its scales, each a byte range of a shard."""

    layer_id: int
    values: TensorRange
    scales: TensorRange


@dataclasses.dataclass(frozen=True)
class ReleaseCheckpoint:
    """A checked V4.1 checkpoint directory. Make one with `read_release`.

    Attributes:
        path: the directory.
        config: config.json as a dict.
        spec: `TableSpec.from_hf_config(config)`.
        compression: the compression of tokenizer.json.
        tensors: every Engram tensor found, by its name without the prefix.
        prefix: "" (as released) or "model." (Hugging Face conversions).
        layers: {layer_id: ReleaseLayer}, checked against the spec.
    """

    path: Path
    config: dict[str, Any]
    spec: TableSpec
    compression: Compression
    tensors: dict[str, TensorRange]
    prefix: str
    layers: dict[int, ReleaseLayer]

    def tensor(self, layer_id: int, part: str) -> TensorRange:
        """An Engram tensor of one layer, e.g. `tensor(1, "wkv.weight")`.

        Raises:
            CorruptTableError: the checkpoint holds no such tensor.
        """
        name = engram_name(layer_id, part)
        if name not in self.tensors:
            raise CorruptTableError(
                f"checkpoint {os.fspath(self.path)!r} has no tensor {self.prefix + name!r} (Engram tensors found: "
                f"{sorted(self.prefix + n for n in self.tensors)[:8]}): the checkpoint is incomplete; download "
                "every shard")
        return self.tensors[name]

    def scale_of(self, layer_id: int, part: str) -> TensorRange:
        """The block scales of an FP8 tensor "X.weight": "X.scale" or "X.weight_scale_inv"."""
        stem = part.removesuffix("weight")
        for suffix in SCALE_SUFFIXES:
            if engram_name(layer_id, stem + suffix) in self.tensors:
                return self.tensors[engram_name(layer_id, stem + suffix)]
        return self.tensor(layer_id, stem + SCALE_SUFFIXES[0])      # raises, naming the release's name


def is_release_dir(path: str | os.PathLike[str]) -> bool:
    """True for a directory with a config.json (any kind of file: a FIFO there is refused when it
    is read, not taken for a table) and no engram table metadata (zarr.json)."""
    p = Path(path)
    return p.is_dir() and os.path.lexists(p / CONFIG_NAME) and not os.path.lexists(p / "zarr.json")


class _TokenizerBytes:
    """The bytes of a tokenizer.json, hashed and compared by their xxh3 digest (a cache key)."""

    def __init__(self, raw: bytes, where: str) -> None:
        self.raw, self.where, self.digest = raw, where, xxhash.xxh3_128_hexdigest(raw)

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _TokenizerBytes) and other.digest == self.digest


@functools.lru_cache(maxsize=4)
def cached_compression(tokenizer: _TokenizerBytes) -> Compression:
    return Compression.from_tokenizer(tokenizer_from_json(tokenizer.raw, tokenizer.where))


def tokenizer_compression(tdir: TableDir) -> Compression:
    """The compression of the directory's tokenizer.json (derived once per file content per process)."""
    try:
        raw = tdir.read_bytes(TOKENIZER_NAME, MAX_TOKENIZER_BYTES)
    except FileNotFoundError:
        raise MissingFileError(f"checkpoint {os.fspath(tdir.path)!r} has no {TOKENIZER_NAME}: the hash needs the "
                               "tokenizer's compression; download it with the shards") from None
    return cached_compression(_TokenizerBytes(raw, os.fspath(tdir.path / TOKENIZER_NAME)))


def _read_json(tdir: TableDir, name: str, limit: int) -> Any:
    """A JSON file of the checkpoint folder, read through `tdir` and parsed strictly (engram.untrusted)."""
    where = os.fspath(tdir.path / name)
    return loads(tdir.read_bytes(name, limit), f"checkpoint file {where!r}", CorruptTableError,
                 "the file is damaged; download it again")


def _shard_files(tdir: TableDir) -> list[str]:
    """The shards to read headers from: those the index names for Engram tensors, else every shard."""
    try:
        doc = _read_json(tdir, INDEX_NAME, MAX_INDEX_BYTES)
    except FileNotFoundError:
        return sorted(p.name for p in tdir.path.glob("*.safetensors"))
    index = os.fspath(tdir.path / INDEX_NAME)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CorruptTableError(f"checkpoint index {index!r} has no valid \"weight_map\" (an object of tensor "
                                "names to shard file names): download it again, or remove it to search every shard")
    files = sorted({f for name, f in weight_map.items() if ".engram." in name})
    for f in files:
        if os.path.isabs(f) or ".." in Path(f).parts or "\0" in f or not f:
            raise CorruptTableError(f"checkpoint index {index!r} names shard {f!r}, not a file name inside the "
                                    "checkpoint directory: the index is damaged; download it again")
    return files


def _config(tdir: TableDir) -> dict[str, Any]:
    try:
        raw = tdir.read_bytes(CONFIG_NAME, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise MissingFileError(f"config file {os.fspath(tdir.path / CONFIG_NAME)!r} does not exist: pass the "
                               "checkpoint directory holding the model's config.json") from None
    return config_from_json(raw, os.fspath(tdir.path / CONFIG_NAME), CorruptTableError)


def _engram_tensors(tdir: TableDir) -> dict[str, TensorRange]:
    found: dict[str, TensorRange] = {}
    files = _shard_files(tdir)
    if not files:
        raise MissingFileError(f"checkpoint {os.fspath(tdir.path)!r} holds no *.safetensors shard with Engram "
                               "tensors: download the shards beside config.json")
    for file in files:
        where = os.fspath(tdir.path / file)
        try:
            fd = tdir.open(file)
        except FileNotFoundError:
            raise MissingFileError(f"checkpoint shard {where!r} does not exist: download every shard the index "
                                   "lists") from None
        try:
            header = read_header(fd, file, where)
        finally:
            os.close(fd)
        found.update({name: t for name, t in header.items() if ".engram." in name})
    return found


def _prefix(tensors: dict[str, TensorRange], spec: TableSpec, where: str) -> str:
    for prefix in PREFIXES:
        if any(engram_name(lid, "embed.weight", prefix) in tensors for lid in spec.layer_ids):
            return prefix
    names = [engram_name(spec.layer_ids[0], "embed.weight", p) for p in PREFIXES]
    raise CorruptTableError(f"checkpoint {where!r} has no Engram rows (looked for {names}): the shards holding "
                            "them are missing, or this is not a DeepSeek-V4.1 checkpoint")


def _check(t: TensorRange, dtypes: tuple[str, ...], shape: tuple[int, ...], where: str) -> TensorRange:
    if t.dtype not in dtypes or t.shape != shape:
        raise CorruptTableError(
            f"checkpoint {where!r}: tensor {t.name!r} in {t.file!r} is {t.dtype} {list(t.shape)}, but config.json "
            f"gives {dtypes[0]} {list(shape)}: the shard or config.json is altered or from another model; download "
            "them again")
    return t


def read_release(path: str | os.PathLike[str], tdir: TableDir | None = None) -> ReleaseCheckpoint:
    """Find and check the Engram tensors of a V4.1 checkpoint directory (no row is read).

    Args:
        path: the checkpoint directory.
        tdir: the directory, already open (files are then opened relative to it).

    Raises:
        MissingFileError: no config.json, tokenizer.json or shard where one is needed.
        SpecError, SpecMismatchError: the config's Engram fields are invalid or inconsistent.
        CorruptTableError: a damaged index or shard header, a missing Engram tensor, or one whose
            dtype, shape or byte range does not match the config.
    """
    own = tdir is None
    tdir = TableDir(path, checkpoint=True) if tdir is None else tdir
    try:
        where = os.fspath(tdir.path)
        config = _config(tdir)
        compression = tokenizer_compression(tdir)
        spec = TableSpec.from_hf_config(config, compression=compression)
        found = _engram_tensors(tdir)
        prefix = _prefix(found, spec, where)
        tensors = {name[len(prefix):]: t for name, t in found.items() if name.startswith(prefix)}
        found_only = ReleaseCheckpoint(tdir.path, config, spec, compression, tensors, prefix, {})
        D, S = spec.head_dim, spec.scales_per_row
        layers = {}
        for lid in spec.layer_ids:
            rows = spec.rows(lid)
            values = _check(found_only.tensor(lid, "embed.weight"), (ROW_DTYPE,), (rows, D), where)
            scales = _check(found_only.scale_of(lid, "embed.weight"), SCALE_DTYPES, (rows, S), where)
            layers[lid] = ReleaseLayer(lid, values, scales)
        return dataclasses.replace(found_only, layers=layers)
    finally:
        if own:
            tdir.close()
