"""build_table: write a table chunk by chunk, from a seeded initializer or from trained rows.

Memory stays bounded by about one chunk whatever the table's size: each chunk is produced,
checksummed, written and fsynced before the next one. The table is assembled in a partial
directory beside the target and published atomically (see `engram.publish`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import LayerRows
from .compression import Compression
from .errors import InputError, TableExistsError
from .format import (
    CHUNK_ALIGN,
    FORMAT_VERSION,
    LayerLayout,
    TableMeta,
    check_dtype_supported,
    checksum,
    is_table,
    write_attributes,
    write_metadata,
)
from .hashing import NgramHasher
from .mapping import release_pages
from .publish import clean_stale, fsync_tree, partial_dir, publish
from .spec import TableSpec
from .table import Table
from .table import open as open_table
from .tiers import storage_dtype, torch_dtype

__all__ = ["build_table", "plan_layout", "INITS", "INIT_BLOCK_ROWS", "DEFAULT_CHUNK_BYTES"]

INITS = ("normal", "zeros")
INIT_BLOCK_ROWS = 1024          # rows drawn from one seeded generator (independent of chunking)
DEFAULT_CHUNK_BYTES = 64 << 20  # default chunk file size (rounded down to whole CHUNK_ALIGN rows)


def build_table(path: str | os.PathLike[str], spec: TableSpec, comp: Compression, init: str = "normal",
                std: float = 0.02, seed: int = 0, weights: Mapping[int, Any] | None = None,
                overwrite: bool = False, chunk_rows: int | None = None, progress: bool | None = None) -> Table:
    """Write a table for `spec` and `comp` at `path` and open it.

    Rows are written chunk by chunk; memory use does not grow with the table. The table appears
    at `path` atomically once complete: a build that fails or is killed leaves nothing there
    (its partial directory `.{name}.partial-*` is removed by the next build of that path).

    Args:
        path: the table directory to create.
        spec: the table spec; dtype "float32", "bfloat16" or "float16".
        comp: the token-id compression the table is looked up with (stored with the table).
        init: initial rows of layers not in `weights`: "normal" or "zeros". "normal" draws
            every value from N(0, std^2): row r of layer L is `std * z[r % 1024]` with
            `z = numpy.random.default_rng([seed, L, r // 1024]).standard_normal((1024, D),
            dtype=numpy.float32)`, rounded to the table's dtype; "zeros" writes zeros. Rows
            depend only on (seed, layer, row), never on `chunk_rows`. (NumPy keeps Generator
            streams stable in practice but does not promise it across releases; the tests pin
            the chunk digests of seeded tables.)
        std: standard deviation of "normal".
        seed: seed of "normal" (independent of `spec.seed`, which seeds the hash).
        weights: {layer_id: rows [spec.rows(layer_id), D]} to import: numpy arrays (np.memmap
            included, read chunk by chunk), torch tensors (any float dtype, bfloat16 included,
            any device) or checkpoint rows (`engram.open_checkpoint(files).rows(layer_id)`, read
            chunk by chunk), converted to the table's dtype with round-to-nearest.
        overwrite: replace an existing table at `path` (atomically; processes that still use
            the old table keep reading its files until they close it).
        chunk_rows: rows per chunk file; chunk_rows * row_bytes must be a multiple of 65536.
            Default: chunks of about 64 MiB (smaller when a layer is smaller).
        progress: show a progress bar (None: only on a terminal, after a second).

    Returns:
        The new table, opened with `engram.open(path)`.

    Raises:
        TableExistsError: something is at `path` and `overwrite` is False (or it is not a table).
        SpecError: a row dtype tables cannot store yet (int8, float8_e4m3).
        InputError: bad arguments, or `weights` of the wrong shape or dtype.

    Example:
        >>> comp = engram.Compression.identity(1000)
        >>> spec = engram.TableSpec(engram_vocab_size=(5000, 5000), max_ngram_size=3, n_head_per_ngram=4,
        ...                         n_embed_per_ngram=256, layer_ids=(1,), compressed_vocab_size=1000)
        >>> table = engram.build_table("demo.engram", spec, comp, seed=0)
    """
    _check_args(spec, comp, init, std, seed, overwrite)
    NgramHasher(spec, comp)                     # spec and compression must fit together
    sources = _check_weights(weights, spec)
    layouts = plan_layout(spec, chunk_rows)
    target = Path(path)
    _check_target(target, overwrite)
    clean_stale(target)
    meta = TableMeta(FORMAT_VERSION, spec, comp, layouts)
    with partial_dir(target) as tmp:
        write_metadata(tmp, meta)
        with _progress_bar(layouts, progress) as bar:
            for lid, lay in layouts.items():
                chunks = _source_chunks(sources[lid], lay, spec) if lid in sources else \
                    _init_chunks(lay, spec, init, std, seed)
                sums = [_write_chunk(lay.chunk_path(tmp, i), block, bar) for i, block in enumerate(chunks)]
                layouts[lid] = LayerLayout(lid, lay.array, lay.rows, lay.row_bytes, lay.chunk_rows, tuple(sums))
        write_attributes(tmp, TableMeta(FORMAT_VERSION, spec, comp, layouts))
        fsync_tree(tmp)
        publish(tmp, target, overwrite)
    return open_table(target)


# ------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------
def _check_args(spec: Any, comp: Any, init: Any, std: Any, seed: Any, overwrite: Any) -> None:
    if not isinstance(spec, TableSpec):
        raise InputError(f"spec must be an engram.TableSpec, got {type(spec).__name__}")
    if not isinstance(comp, Compression):
        raise InputError(f"comp must be an engram.Compression, got {type(comp).__name__}")
    check_dtype_supported(spec)
    if init not in INITS:
        raise InputError(f"init={init!r} is not an initializer: expected one of {INITS}, or pass weights=")
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
        raise InputError(f"std={std!r} is invalid: expected a finite float >= 0 (e.g. 0.02)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed={seed!r} is invalid: expected an int >= 0")
    if not isinstance(overwrite, bool):
        raise InputError(f"overwrite={overwrite!r} is invalid: expected True or False")


def plan_layout(spec: TableSpec, chunk_rows: int | None = None) -> dict[int, LayerLayout]:
    """How `build_table` would split each layer into chunk files (checksums still empty).

    Args:
        spec: the table spec.
        chunk_rows: as for build_table (None: about 64 MiB chunks, split evenly).

    Returns:
        {layer_id: LayerLayout}; disk use is sum(lay.n_chunks * lay.chunk_bytes).

    Example:
        >>> {lid: lay.n_chunks for lid, lay in plan_layout(spec).items()}
        {1: 5, 15: 5}
    """
    return {lid: _plan_layer(spec, lid, chunk_rows) for lid in spec.layer_ids}


def _plan_layer(spec: TableSpec, layer_id: int, chunk_rows: int | None) -> LayerLayout:
    """The layer's layout: chunk rows a multiple of the alignment, no larger than needed."""
    row_bytes = spec.row_bytes
    align_rows = CHUNK_ALIGN // math.gcd(CHUNK_ALIGN, row_bytes)   # smallest rows giving whole CHUNK_ALIGNs
    rows = spec.rows(layer_id)
    if chunk_rows is None:   # about DEFAULT_CHUNK_BYTES, split evenly so the last chunk has little padding
        n_chunks = -(-rows // (max(1, DEFAULT_CHUNK_BYTES // (align_rows * row_bytes)) * align_rows))
        chunk_rows = -(-rows // (n_chunks * align_rows)) * align_rows
    elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1 \
            or (chunk_rows * row_bytes) % CHUNK_ALIGN:
        raise InputError(
            f"chunk_rows={chunk_rows!r} is invalid: chunk files must be whole multiples of {CHUNK_ALIGN} bytes "
            f"so they map at page boundaries; with {row_bytes}-byte rows use a positive multiple of "
            f"{align_rows} (or None for about 64 MiB chunks)")
    chunk_rows = min(int(chunk_rows), -(-rows // align_rows) * align_rows)
    return LayerLayout(layer_id, f"layer_{layer_id}", rows, row_bytes, chunk_rows)


def _check_weights(weights: Mapping[int, Any] | None, spec: TableSpec) -> dict[int, Any]:
    if weights is None:
        return {}
    if not isinstance(weights, Mapping):
        raise InputError(f"weights must be a mapping {{layer_id: rows}}, got {type(weights).__name__}")
    sources = {}
    for layer_id, rows in weights.items():
        if layer_id not in spec.layer_ids:
            raise InputError(f"weights has layer_id={layer_id!r}, but the spec's layer_ids are "
                             f"{spec.layer_ids}: pass rows only for those layers")
        expected = (spec.rows(layer_id), spec.head_dim)
        if isinstance(rows, torch.Tensor):
            ok = rows.is_floating_point()
        elif isinstance(rows, (np.ndarray, LayerRows)):
            ok = rows.dtype.kind == "f"
        else:
            raise InputError(f"weights[{layer_id}] must be a numpy array, a torch tensor or checkpoint rows "
                             f"(Checkpoint.rows(layer_id)), got {type(rows).__name__}")
        if not ok:
            raise InputError(f"weights[{layer_id}] has dtype {rows.dtype}, expected floating point values "
                             "(float16/32/64 or torch.bfloat16)")
        if tuple(rows.shape) != expected:
            raise InputError(
                f"weights[{layer_id}] has shape {tuple(rows.shape)}, expected {expected} = (spec.rows("
                f"{layer_id}), spec.head_dim) for layer {layer_id}: pass the full table of that layer")
        sources[int(layer_id)] = rows
    return sources


def _check_target(target: Path, overwrite: bool) -> None:
    if not os.path.lexists(target) or (target.is_dir() and not target.is_symlink() and not any(target.iterdir())):
        return
    if not overwrite:
        raise TableExistsError(
            f"path={os.fspath(target)!r} already exists: pass overwrite=True to replace the table there, "
            "or choose another path")
    if not (target.is_dir() and not target.is_symlink() and is_table(target)):
        raise TableExistsError(
            f"path={os.fspath(target)!r} exists and is not an engram table: overwrite=True replaces only "
            "tables; remove it yourself or choose another path")


# ------------------------------------------------------------------------------------------
# chunks
# ------------------------------------------------------------------------------------------
def _init_chunks(lay: LayerLayout, spec: TableSpec, init: str, std: float, seed: int) -> Iterator[np.ndarray]:
    """Seeded chunks: [chunk_rows, D] in the storage dtype, zero rows past the end."""
    D = spec.head_dim
    block = np.zeros((lay.chunk_rows, D), storage_dtype(spec.dtype))
    # float32 rows are drawn straight into the chunk; other dtypes are rounded from float32.
    values = block if spec.dtype == "float32" else np.empty((lay.chunk_rows, D), np.float32)
    for index in range(lay.n_chunks):
        start, stop = lay.chunk_span(index)
        if init == "normal":
            _normal_rows(values[: stop - start], start, lay.layer_id, seed, std)
            if values is not block:
                _store(values[: stop - start], block[: stop - start], spec.dtype)
        block[stop - start:] = 0
        yield block


def _normal_rows(out: np.ndarray, start: int, layer_id: int, seed: int, std: float) -> None:
    """out[i] = row start+i of the "normal" init (see build_table): std * N(0, 1) in float32."""
    rows, D = out.shape
    done = 0
    while done < rows:
        r = start + done
        block, first = divmod(r, INIT_BLOCK_ROWS)
        n = min(rows - done, INIT_BLOCK_ROWS - first)
        z = np.random.default_rng([seed, layer_id, block]).standard_normal((INIT_BLOCK_ROWS, D), dtype=np.float32)
        np.multiply(z[first: first + n], np.float32(std), out=out[done: done + n])
        done += n


def _store(values: Any, dest: np.ndarray, dtype: str) -> None:
    """Round `values` (numpy or torch, any float dtype) to `dtype` into the storage array `dest`."""
    if isinstance(values, torch.Tensor):
        src = values
    else:   # torch.from_numpy refuses read-only arrays (read-only np.memmap): copy those slices
        src = torch.from_numpy(np.array(values, copy=not values.flags.writeable or None, order="C"))
    target = torch.from_numpy(dest)
    if dtype == "bfloat16":
        target = target.view(torch.bfloat16)
    target.copy_(src.to(device="cpu", dtype=torch_dtype(dtype)))


def _source_chunks(src: Any, lay: LayerLayout, spec: TableSpec) -> Iterator[np.ndarray]:
    """Chunks copied from trained rows, one slice at a time (np.memmap pages released after use)."""
    block = np.zeros((lay.chunk_rows, spec.head_dim), storage_dtype(spec.dtype))
    if isinstance(src, torch.Tensor):
        src = src.detach()
    for index in range(lay.n_chunks):
        start, stop = lay.chunk_span(index)
        piece = src[start:stop]
        _store(piece, block[: stop - start], spec.dtype)
        if isinstance(src, np.memmap) and getattr(src, "mode", "c") in ("r", "r+") and piece.flags.c_contiguous:
            release_pages(piece)   # a shared mapping: the rows stay in the file
        block[stop - start:] = 0
        yield block


def _write_chunk(path: Path, block: np.ndarray, bar: Any) -> str:
    """Write one chunk file (created, written whole, fsynced) and return its checksum."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = memoryview(block).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        os.fsync(fd)
    finally:
        os.close(fd)
    bar.update(len(data))
    return checksum(data)


def _progress_bar(layouts: dict[int, LayerLayout], progress: bool | None) -> Any:
    from tqdm.auto import tqdm

    total = sum(lay.n_chunks * lay.chunk_bytes for lay in layouts.values())
    return tqdm(total=total, unit="B", unit_scale=True, desc="build_table", delay=1.0, mininterval=0.5,
                disable=None if progress is None else not progress)

