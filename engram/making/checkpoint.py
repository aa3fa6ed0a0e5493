"""Stream trained Engram rows out of model checkpoints, one block of rows at a time.

Two layouts are read:

- Reference format: float rows (float32, bfloat16, float16) in `*.safetensors` or `torch.save`
  files, one [rows, D] tensor per layer, e.g. the reference module's
  `multi_head_embedding.embedding.weight` under a model prefix.
- DeepSeek-V4.1 layout: per layer an FP8 E4M3 weight [rows, 256] (safetensors dtype F8_E4M3)
  and its E8M0 block scales [rows, 8] (F8_E8M0, or U8 holding the same exponent bytes), possibly
  in different shards of a `model-0000k-of-0000n.safetensors` set, with or without the
  `model.safetensors.index.json` whose "weight_map" names each tensor's shard.

Tensor names come from patterns with a `{layer_id}` placeholder. Defaults, tried in order (the
first that names any tensor wins): `DEFAULT_WEIGHT_PATTERNS` (DeepSeek-V4.1's release names
`layers.{L}.engram.embed.weight`, with or without the "model." prefix of Hugging Face
conversions, come first); the scale of an FP8 weight named `...weight` is `...scale` (the
release) or `...weight_scale_inv` (the DeepSeek naming of FP8 block scales in conversions),
whichever the checkpoint holds. Pass `weight_pattern` / `scale_pattern` when a checkpoint names
them differently.

Nothing reads a whole layer: safetensors row ranges go through `safe_open(...).get_slice`, and
torch.save files are opened with `torch.load(mmap=True, weights_only=True)` and copied block by
block (the mapped pages they touch show as file-backed, reclaimable RSS until `close()`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.dtypes import BLOCK_DTYPE, ROW_DTYPES
from engram.errors import InputError, SpecMismatchError
from engram.storage.checkpoint_files import (
    INDEX_NAME,
    SCALE_SUFFIXES,
    SafetensorsFile,
    TorchFile,
    expand_path,
    open_file,
)

__all__ = ["Checkpoint", "open_checkpoint", "DEFAULT_WEIGHT_PATTERNS", "INDEX_NAME"]

DEFAULT_WEIGHT_PATTERNS = (
    "layers.{layer_id}.engram.embed.weight",                            # DeepSeek-V4.1 as released
    "model.layers.{layer_id}.engram.embed.weight",                      # its Hugging Face conversions
    "model.layers.{layer_id}.engram.embedding.weight",                  # other V4.1-style FP8 checkpoints
    "layers.{layer_id}.engram.multi_head_embedding.embedding.weight",   # reference-module models
)
# The scale of an FP8 weight "X.weight": "X.scale" (DeepSeek-V4.1 as released) or "X.weight_scale_inv".
# Stored dtype (safetensors name or torch dtype) -> engram row dtype.
_ROW_DTYPES: dict[Any, str] = {
    **{d.safetensors: name for name, d in ROW_DTYPES.items() if d.safetensors},
    **{getattr(torch, d.value_torch[-1]): name for name, d in ROW_DTYPES.items() if d.safetensors}}
_SCALE_DTYPES = (*ROW_DTYPES[BLOCK_DTYPE].scale_safetensors, torch.uint8, getattr(torch, "float8_e8m0fnu", torch.uint8))


# -- the checkpoint -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layer:
    weight: str
    shape: tuple[int, int]
    dtype: str
    scale: str | None
    block: int | None


class LayerRows:
    """One checkpoint layer's rows, read only when sliced: `rows[start:stop]` -> float32 [n, D].

    FP8 rows are dequantized with their E8M0 scales; float rows are widened to float32 exactly.
    Only slices with step 1 are supported. Make one with `Checkpoint.rows(layer_id)`.
    `read_stored(start, stop)` gives the stored values and scales unchanged (what `build_table`
    copies into a "float8_e4m3" table of the same `stored_dtype` and `block`).
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, checkpoint: Checkpoint, layer_id: int) -> None:
        self._checkpoint, self._layer_id = checkpoint, layer_id
        self.shape = checkpoint.shape(layer_id)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def stored_dtype(self) -> str:
        """The checkpoint's row dtype: "float32", "bfloat16", "float16" or "float8_e4m3"."""
        return self._checkpoint.dtype(self._layer_id)

    @property
    def block(self) -> int | None:
        """Values per E8M0 scale for "float8_e4m3" rows, else None."""
        return self._checkpoint.block(self._layer_id)

    def read_stored(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows [start, stop) as stored: (values, scales), as `Checkpoint.read`."""
        return self._checkpoint.read(self._layer_id, start, stop)

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise InputError(f"LayerRows supports row slices rows[start:stop] only, got {index!r}")
        start, stop, _ = index.indices(self.shape[0])
        values, scales = self._checkpoint.read(self._layer_id, start, max(start, stop))
        if scales is None:
            return values.astype(np.float32, copy=False)
        from engram.storage.quant import decode

        block = self._checkpoint.block(self._layer_id) or 32
        return decode(values, scales, self._checkpoint.dtype(self._layer_id), block=block).numpy()

    def __repr__(self) -> str:
        return f"LayerRows(layer_id={self._layer_id}, shape={self.shape})"


class Checkpoint:
    """Engram rows of a model checkpoint, read block by block. Use `open_checkpoint`.

    Example:
        >>> with open_checkpoint("ckpt/") as ckpt:                      # doctest: +SKIP
        ...     for start, values, scales in ckpt.iter_blocks(1, 65536):
        ...         ...
    """

    def __init__(self, names: dict[str, Path], weight_pattern: str, scale_pattern: str | None,
                 opened: dict[Path, SafetensorsFile | TorchFile] | None = None) -> None:
        self._names = names
        self.weight_pattern, self.scale_pattern = weight_pattern, scale_pattern
        self._files: dict[Path, SafetensorsFile | TorchFile] = dict(opened or {})
        self._layers: dict[int, _Layer] = {}
        self._closed = False
        regex = re.compile(re.escape(weight_pattern).replace(re.escape("{layer_id}"), r"(\d+)") + r"\Z")
        self._layer_ids = sorted({int(m.group(1)) for name in names if (m := regex.match(name))})

    @property
    def files(self) -> tuple[Path, ...]:
        """The checkpoint files searched for tensors."""
        return tuple(sorted(set(self._names.values())))

    def layers(self) -> list[int]:
        """Layer ids whose weight tensor the checkpoint holds, ascending."""
        return list(self._layer_ids)

    def shape(self, layer_id: int) -> tuple[int, int]:
        """(rows, D) of one layer's table."""
        return self._layer(layer_id).shape

    def dtype(self, layer_id: int) -> str:
        """Stored row dtype: "float32", "bfloat16", "float16" or "float8_e4m3"."""
        return self._layer(layer_id).dtype

    def block(self, layer_id: int) -> int | None:
        """Values per E8M0 scale for "float8_e4m3" layers (V4.1: 32), else None."""
        return self._layer(layer_id).block

    def tensor_names(self, layer_id: int) -> tuple[str, str | None]:
        """(weight name, scale name or None) of one layer."""
        layer = self._layer(layer_id)
        return layer.weight, layer.scale

    def rows(self, layer_id: int) -> LayerRows:
        """One layer's rows as a lazy, sliceable float32 source (what `build_table(weights=)` takes).

        Example:
            >>> engram.build_table(path, spec, comp, weights={1: ckpt.rows(1)})   # doctest: +SKIP
        """
        self._layer(layer_id)
        return LayerRows(self, layer_id)

    def read(self, layer_id: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows [start, stop) of one layer.

        Args:
            layer_id: a layer of `layers()`.
            start, stop: the row range, 0 <= start <= stop <= rows.

        Returns:
            (values, scales): values [n, D] as float32 ("bfloat16" widened exactly), float16, or
            uint8 E4M3 bytes; scales [n, D // block] uint8 E8M0 exponents, or None.

        Example:
            >>> values, scales = ckpt.read(1, 0, 1024)                # doctest: +SKIP
        """
        layer = self._layer(layer_id)
        self._check_range(layer_id, start, stop)
        values = _to_numpy(self._file(layer.weight).read(layer.weight, start, stop))
        scales = None if layer.scale is None else _to_numpy(self._file(layer.scale).read(layer.scale, start, stop))
        return values, scales

    def iter_blocks(self, layer_id: int, rows_per_block: int = 65536, *, start: int = 0,
                    stop: int | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """Yield (start_row, values, scales) blocks of one layer in row order.

        Only one block is in memory at a time (plus whatever the caller keeps).

        Args:
            layer_id: a layer of `layers()`.
            rows_per_block: rows per block (the last one may be shorter).
            start, stop: optional row range (default: every row).

        Returns:
            An iterator of (start_row, values, scales) as in `read`.

        Example:
            >>> for row, values, scales in ckpt.iter_blocks(1, 65536):  # doctest: +SKIP
            ...     table_rows[row:row + len(values)] = values
        """
        stop = self.shape(layer_id)[0] if stop is None else stop
        if not isinstance(rows_per_block, int) or isinstance(rows_per_block, bool) or rows_per_block < 1:
            raise InputError(f"rows_per_block={rows_per_block!r} is invalid: expected an int >= 1")
        self._check_range(layer_id, start, stop)  # raise here, not at the first next()
        return self._blocks(layer_id, rows_per_block, start, stop)

    def _blocks(self, layer_id: int, rows_per_block: int, start: int,
                stop: int) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        for row in range(start, stop, rows_per_block):
            values, scales = self.read(layer_id, row, min(row + rows_per_block, stop))
            yield row, values, scales

    def close(self) -> None:
        """Release every open file (and torch.save memory maps)."""
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._closed = True

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint(files={len(self.files)}, layers={self._layer_ids}, weight_pattern={self.weight_pattern!r})"

    # -- internals ------------------------------------------------------------------------------
    def _check_range(self, layer_id: int, start: Any, stop: Any) -> None:
        rows = self.shape(layer_id)[0]
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, stop))
        if not (ok and 0 <= start <= stop <= rows):
            raise InputError(f"row range start={start!r}, stop={stop!r} is invalid for layer {layer_id} "
                             f"with {rows} rows: expected ints with 0 <= start <= stop <= {rows}")

    def _file(self, name: str) -> SafetensorsFile | TorchFile:
        if self._closed:
            raise InputError("this Checkpoint is closed: open it again with open_checkpoint(...)")
        path = self._names[name]
        if path not in self._files:
            self._files[path] = open_file(path)
        return self._files[path]

    def _missing(self, what: str, name: str, fix: str) -> InputError:
        files = [str(p) for p in self.files]
        return InputError(f"{what} {name!r} is not in the checkpoint files {files}: {fix}")

    def _layer(self, layer_id: int) -> _Layer:
        if not isinstance(layer_id, int) or isinstance(layer_id, bool):
            raise InputError(f"layer_id={layer_id!r} is invalid: expected an int, one of {self._layer_ids}")
        if layer_id in self._layers:
            return self._layers[layer_id]
        weight = self.weight_pattern.replace("{layer_id}", str(layer_id))
        if weight not in self._names:
            raise self._missing(f"layer_id={layer_id!r}: tensor", weight,
                                f"this checkpoint has layers {self._layer_ids}; pass weight_pattern= if names differ")
        stored, shape = self._file(weight).info(weight)
        if stored not in _ROW_DTYPES or len(shape) != 2:
            raise InputError(f"tensor {weight!r} has dtype {stored} and shape {shape}: expected a 2-D "
                             f"[rows, D] tensor of {sorted({str(k) for k in _ROW_DTYPES if isinstance(k, str)})}")
        dtype, scale, block = _ROW_DTYPES[stored], None, None
        if ROW_DTYPES[dtype].per_block:
            scale, block = self._scale(layer_id, weight, shape)
        layer = _Layer(weight, (int(shape[0]), int(shape[1])), dtype, scale, block)
        self._layers[layer_id] = layer
        return layer

    def _scale(self, layer_id: int, weight: str, shape: tuple[int, ...]) -> tuple[str, int]:
        if self.scale_pattern is not None:
            scale = self.scale_pattern.replace("{layer_id}", str(layer_id))
        elif weight.endswith("weight"):
            candidates = [weight[: -len("weight")] + suffix for suffix in SCALE_SUFFIXES]
            scale = next((name for name in candidates if name in self._names), candidates[-1])
        else:
            raise InputError(f"float8_e4m3 tensor {weight!r} needs E8M0 scales: pass scale_pattern= "
                             f"(e.g. '...{{layer_id}}...weight_scale_inv')")
        if scale not in self._names:
            raise self._missing(f"float8_e4m3 tensor {weight!r} needs E8M0 scales; tensor", scale,
                                "pass scale_pattern= if the scales are named differently")
        stored, sshape = self._file(scale).info(scale)
        if stored not in _SCALE_DTYPES:
            raise InputError(f"scale tensor {scale!r} has dtype {stored}: expected E8M0 exponent bytes (F8_E8M0 or U8)")
        if len(sshape) != 2 or sshape[0] != shape[0] or sshape[1] < 1 or shape[1] % sshape[1]:
            raise SpecMismatchError(
                f"scale tensor {scale!r} has shape {tuple(sshape)}, weight {weight!r} has shape {tuple(shape)}: "
                f"expected [{shape[0]}, D // block] with one E8M0 scale per block of values"
            )
        return scale, shape[1] // sshape[1]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype in (torch.float8_e4m3fn, getattr(torch, "float8_e8m0fnu", torch.uint8)):
        t = t.view(torch.uint8)
    elif t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def open_checkpoint(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    weight_pattern: str | None = None,
    scale_pattern: str | None = None,
) -> Checkpoint:
    """Open checkpoint files to stream their Engram rows.

    Args:
        paths: a file (`*.safetensors` or torch.save), a directory (its `model.safetensors.index.json`
            if present, else every `*.safetensors`, else every torch.save file), an index json, or
            a list of these.
        weight_pattern: name of a layer's row tensor with a `{layer_id}` placeholder; default: the
            first of `DEFAULT_WEIGHT_PATTERNS` that names any tensor.
        scale_pattern: name of an FP8 weight's E8M0 scales, with `{layer_id}`; default: the weight
            name with its final "weight" replaced by "scale" or "weight_scale_inv" (the one present).

    Returns:
        A Checkpoint (a context manager; `close()` releases the files).

    Raises:
        MissingFileError: a path or an indexed shard does not exist.
        CorruptTableError: an unreadable file or index.
        InputError: no tensor matches the pattern, or a bad pattern.

    Example:
        >>> ckpt = open_checkpoint("DeepSeek-V4.1-Flash/")              # doctest: +SKIP
        >>> ckpt.layers(), ckpt.shape(1), ckpt.dtype(1), ckpt.block(1)   # doctest: +SKIP
        ([1, 14], (384006168, 256), 'float8_e4m3', 32)
    """
    for name, pattern in (("weight_pattern", weight_pattern), ("scale_pattern", scale_pattern)):
        if pattern is not None and (not isinstance(pattern, str) or pattern.count("{layer_id}") != 1):
            raise InputError(f"{name}={pattern!r} is invalid: expected a tensor name with one '{{layer_id}}' "
                             f"placeholder, e.g. {DEFAULT_WEIGHT_PATTERNS[0]!r}")
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise InputError("paths is empty: pass checkpoint files, their directory or index json")
    names: dict[str, Path] = {}
    opened: dict[Path, SafetensorsFile | TorchFile] = {}
    for item in items:
        files, indexed = expand_path(Path(item))
        found = list(indexed.items())
        for file in files:
            opened[file] = open_file(file)
            found += [(name, file) for name in sorted(opened[file].names)]
        for name, file in found:
            if names.setdefault(name, file) != file:
                raise InputError(f"tensor {name!r} is in both {str(names[name])!r} and {str(file)!r}: "
                                 f"pass each checkpoint file once")
    patterns = DEFAULT_WEIGHT_PATTERNS if weight_pattern is None else (weight_pattern,)
    for pattern in patterns:
        ckpt = Checkpoint(names, pattern, scale_pattern, opened)
        if ckpt.layers():
            return ckpt
    for f in opened.values():
        f.close()
    sample = sorted(names)[:5]
    raise InputError(f"no tensor in {sorted({str(p) for p in names.values()})} matches weight_pattern in "
                     f"{list(patterns)} (names look like {sample}): pass weight_pattern= with a "
                     f"'{{layer_id}}' placeholder")
