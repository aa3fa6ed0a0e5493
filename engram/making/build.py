"""build_table: write a table chunk by chunk, from a seeded initializer or from trained rows.

Memory stays bounded by about one chunk whatever the table's size: each chunk is produced,
checksummed, written and fsynced before the next one. The table is assembled in a partial
directory beside the target and published atomically (see `engram.storage.publish`).

Quantized tables ("int8", "float8_e4m3"): float rows (seeded, or imported) are encoded with
`engram.storage.quant.encode` in pieces of about `engram.storage.writer.ENCODE_VALUES` values, so
peak memory stays one chunk of encoded values and scales plus one small float32 piece. Checkpoint
rows already stored as FP8 E4M3 with E8M0 scales in the table's layout (same scale_block) are
copied through bit for bit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.addressing.compression import Compression
from engram.addressing.hashing import NgramHasher
from engram.addressing.spec import TableSpec
from engram.args import check_int, is_int
from engram.errors import InputError
from engram.making.checkpoint import LayerRows
from engram.opening import open as open_table
from engram.serving.mapping import release_pages
from engram.serving.table import Table
from engram.storage.format import LayerLayout
from engram.storage.identity import check_table_id, derived_table_id
from engram.storage.publish import restore_aside
from engram.storage.shards import plan_shards
from engram.storage.writer import (
    Chunk,
    check_target,
    chunk_buffers,
    encode_into,
    piece_rows,
    plan_layout,
    store_rows,
    write_table,
    zero_tail,
)

__all__ = ["build_table", "plan_layout", "write_table", "INITS", "INIT_BLOCK_ROWS", "check_build"]

INITS = ("normal", "zeros")
INIT_BLOCK_ROWS = 1024          # rows drawn from one seeded generator (independent of chunking)


def build_table(path: str | os.PathLike[str], spec: TableSpec, comp: Compression, init: str = "normal",
                std: float = 0.02, seed: int = 0, weights: Mapping[int, Any] | None = None,
                overwrite: bool = False, chunk_rows: int | None = None, progress: bool | None = None,
                shard: tuple[int, int] | None = None, table_id: str | None = None) -> Table:
    """Write a table for `spec` and `comp` at `path` and open it.

    Rows are written chunk by chunk; memory use does not grow with the table. The table appears
    at `path` atomically once complete: a build that fails or is killed leaves nothing there
    (its partial directory `.{name}.partial-*` is removed by the next build of that path).

    Args:
        path: the table directory to create.
        spec: the table spec; any dtype: "float32", "bfloat16", "float16", or the quantized
            "int8" and "float8_e4m3" (values encoded with `engram.storage.quant.encode`; scales in a
            second array per layer, see `engram.storage.format`).
        comp: the token-id compression the table is looked up with (stored with the table).
        init: initial rows of layers not in `weights`: "normal" or "zeros". "normal" draws
            every value from N(0, std^2): row r of layer L is `std * z[r % 1024]` with
            `z = numpy.random.default_rng([seed, L, r // 1024]).standard_normal((1024, D),
            dtype=numpy.float32)`, rounded (or encoded) to the table's dtype; "zeros" writes zeros. Rows
            depend only on (seed, layer, row), never on `chunk_rows`. (NumPy keeps Generator
            streams stable in practice but does not promise it across releases; the tests pin
            the chunk digests of seeded tables.)
        std: standard deviation of "normal".
        seed: seed of "normal" (independent of `spec.seed`, which seeds the hash).
        weights: {layer_id: rows [spec.rows(layer_id), D]} to import: numpy arrays (np.memmap
            included, read chunk by chunk), torch tensors (any float dtype, bfloat16 included,
            any device) or checkpoint rows (`engram.open_checkpoint(files).rows(layer_id)`, read
            chunk by chunk), converted to the table's dtype with round-to-nearest (quantized
            tables: encoded, refusing rows with NaN or inf). Checkpoint rows stored as FP8 E4M3
            with E8M0 scales are copied bit for bit into a "float8_e4m3" table with the same
            `scale_block` (no decode, no re-encode).
        overwrite: replace an existing table at `path` (atomically; processes that still use
            the old table keep reading its files until they close it).
        chunk_rows: rows per chunk file; chunk_rows * row_bytes (and, for quantized rows,
            chunk_rows * spec.scale_row_bytes) must be a multiple of 65536. Default: chunks of
            about 64 MiB of values (smaller when a layer is smaller).
        progress: show a progress bar (None: only on a terminal, after a second).
        shard: (rank, parts): write only part `rank` of the table split into `parts` (the rows
            `engram.storage.shards.plan_shards(spec, parts)[rank]` holds), equal to the same rows of the
            whole build, for `engram.distributed.ShardedTable`; `weights` are still whole layers.
        table_id: the table's id (32 lowercase hex digits, `engram.storage.identity`). None: a
            seeded build (no `weights`) gets the id derived from spec, compression, init, std and
            seed, so parts built separately share the whole table's; a build from `weights` gets
            a random one, and a part built from `weights` needs it given (the same on every part).

    Returns:
        The new table, opened with `engram.open(path)`.

    Raises:
        TableExistsError: something is at `path` and `overwrite` is False (or it is not a table).
        InputError: bad arguments, or `weights` of the wrong shape or dtype (or, for quantized
            tables, rows with NaN or inf), or a part built from `weights` without `table_id`.

    Example:
        >>> comp = engram.Compression.identity(1000)
        >>> spec = engram.TableSpec(engram_vocab_size=(5000, 5000), max_ngram_size=3, n_head_per_ngram=4,
        ...                         n_embed_per_ngram=256, layer_ids=(1,), compressed_vocab_size=1000)
        >>> table = engram.build_table("demo.engram", spec, comp, seed=0)
    """
    restore_aside(path)       # a table a killed build left aside belongs at `path`: it is there again
    layouts = check_build(path, spec, comp, init=init, std=std, seed=seed, weights=weights, overwrite=overwrite,
                          chunk_rows=chunk_rows, shard=shard, table_id=table_id)
    sources = {int(layer_id): rows for layer_id, rows in (weights or {}).items()}
    target = Path(path)
    part = None if shard is None else plan_shards(spec, shard[1])[shard[0]]

    def chunks(lay: LayerLayout) -> Iterator[Chunk]:
        first = 0 if part is None else part.start(lay.layer_id)
        if lay.layer_id in sources:
            return _source_chunks(sources[lay.layer_id], lay, spec, first)
        return _init_chunks(lay, spec, init, std, seed, first)

    write_table(target, spec, comp, layouts, chunks, overwrite, progress, shard=part,
                table_id=build_id(spec, comp, init, std, seed, weights, table_id))
    return open_table(target)


def check_build(path: str | os.PathLike[str], spec: TableSpec, comp: Compression, *, init: str = "normal",
                std: float = 0.02, seed: int = 0, weights: Mapping[int, Any] | None = None, overwrite: bool = False,
                chunk_rows: int | None = None, shard: tuple[int, int] | None = None,
                table_id: str | None = None) -> dict[int, LayerLayout]:
    """Every check `build_table` makes before it writes, writing nothing: a dry run.

    Arguments as `build_table` (`weights` are checked for layers, shapes and dtypes, not read).

    Returns:
        The chunk layout of every layer the build would write.

    Raises:
        What `build_table` raises before it starts writing.
    """
    _check_args(spec, comp, init, std, seed, overwrite)
    NgramHasher(spec, comp)                     # spec and compression must fit together
    _check_weights(weights, spec)
    part = None
    if shard is not None:
        if not (isinstance(shard, tuple) and len(shard) == 2 and all(is_int(v) for v in shard)
                and 0 <= shard[0] < shard[1]):
            raise InputError(f"shard={shard!r} is invalid: expected (rank, parts) with 0 <= rank < parts, e.g. (0, 4)")
        part = plan_shards(spec, shard[1])[shard[0]]
    check_table_id(table_id)
    if part is not None and weights and table_id is None:
        raise InputError(f"shard={shard!r} with weights= needs table_id=: every part of one table must name the "
                         "same id (e.g. secrets.token_hex(16), made once and passed to the build of every part), "
                         "so that parts of other tables are refused beside them")
    layouts = plan_layout(spec, chunk_rows, part)
    check_target(Path(path), overwrite)     # a table a killed build left aside counts as at `path`
    return layouts


def build_id(spec: TableSpec, comp: Compression, init: str, std: float, seed: int,
             weights: Mapping[int, Any] | None, table_id: str | None) -> str | None:
    """The id `build_table` writes: `table_id` if given; derived from the recipe of a seeded build
    (so each part built alone names the whole table's id); None (a random one) for one from weights."""
    if table_id is not None or weights:
        return table_id
    return derived_table_id("seeded build", {"spec": spec.to_dict(), "compression": comp.fingerprint,
                                             "init": init, "std": float(std), "seed": int(seed)})


# ------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------
def _check_args(spec: Any, comp: Any, init: Any, std: Any, seed: Any, overwrite: Any) -> None:
    if not isinstance(spec, TableSpec):
        raise InputError(f"spec must be an engram.TableSpec, got {type(spec).__name__}")
    if not isinstance(comp, Compression):
        raise InputError(f"comp must be an engram.Compression, got {type(comp).__name__}")
    if init not in INITS:
        raise InputError(f"init={init!r} is not an initializer: expected one of {INITS}, or pass weights=")
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
        raise InputError(f"std={std!r} is invalid: expected a finite float >= 0 (e.g. 0.02)")
    check_int("seed", seed, 0)
    if not isinstance(overwrite, bool):
        raise InputError(f"overwrite={overwrite!r} is invalid: expected True or False")


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


# ------------------------------------------------------------------------------------------
# chunks
# ------------------------------------------------------------------------------------------
def _init_chunks(lay: LayerLayout, spec: TableSpec, init: str, std: float, seed: int,
                 first: int = 0) -> Iterator[Chunk]:
    """Seeded chunks in the stored dtype, zero rows past the end; local row 0 is global row `first`."""
    chunk = chunk_buffers(lay, spec)
    block = chunk[0]
    if spec.quantized:   # drawn in float32 pieces, each encoded into the chunk
        piece = np.empty((piece_rows(spec), spec.head_dim), np.float32)
        for index in range(lay.n_chunks):
            start, stop = lay.chunk_span(index)
            for p in range(start, stop, len(piece)) if init == "normal" else ():
                q = min(p + len(piece), stop)
                _normal_rows(piece[: q - p], first + p, lay.layer_id, seed, std)
                encode_into(piece[: q - p], chunk, p - start, spec, f"init of layer {lay.layer_id}", p)
            yield zero_tail(chunk, stop - start)
        return
    # float32 rows are drawn straight into the chunk; other dtypes are rounded from float32.
    values = block if spec.dtype == "float32" else np.empty((lay.chunk_rows, spec.head_dim), np.float32)
    for index in range(lay.n_chunks):
        start, stop = lay.chunk_span(index)
        if init == "normal":
            _normal_rows(values[: stop - start], first + start, lay.layer_id, seed, std)
            if values is not block:
                store_rows(values[: stop - start], block[: stop - start], spec.dtype)
        yield zero_tail(chunk, stop - start)


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

def _copies_through(src: Any, spec: TableSpec) -> bool:
    """True when checkpoint rows are stored exactly as the table stores them (FP8 + E8M0, same block)."""
    return (isinstance(src, LayerRows) and spec.dtype == "float8_e4m3" and src.stored_dtype == "float8_e4m3"
            and src.block == spec.scale_block)


def _source_chunks(src: Any, lay: LayerLayout, spec: TableSpec, first: int = 0) -> Iterator[Chunk]:
    """Chunks copied from trained rows, one slice at a time (np.memmap pages released after use);
    local row 0 is row `first` of `src`."""
    chunk = chunk_buffers(lay, spec)
    if isinstance(src, torch.Tensor):
        src = src.detach()
    step = piece_rows(spec) if spec.quantized else lay.chunk_rows
    for index in range(lay.n_chunks):
        start, stop = lay.chunk_span(index)
        start, stop = start + first, stop + first          # rows of src
        if _copies_through(src, spec):                     # stored bytes, bit for bit
            values, scales = src.read_stored(start, stop)
            assert chunk[1] is not None and scales is not None, "float8_e4m3 rows have scales"
            chunk[0][: stop - start] = values
            chunk[1][: stop - start] = scales
            yield zero_tail(chunk, stop - start)
            continue
        for p in range(start, stop, step):
            q = min(p + step, stop)
            piece = src[p:q]
            if spec.quantized:
                encode_into(piece, chunk, p - start, spec, f"weights[{lay.layer_id}]", p)
            else:
                store_rows(piece, chunk[0][p - start: q - start], spec.dtype)
            if isinstance(src, np.memmap) and getattr(src, "mode", "c") in ("r", "r+") and piece.flags.c_contiguous:
                release_pages(piece)   # a shared mapping: the rows stay in the file
        yield zero_tail(chunk, stop - start)
