"""build_table: write a table chunk by chunk, from a seeded initializer or from trained rows.

Memory stays bounded by about one chunk whatever the table's size: each chunk is produced,
checksummed, written and fsynced before the next one. The table is assembled in a partial
directory beside the target and published atomically (see `engram.publish`).

Quantized tables ("int8", "float8_e4m3"): float rows (seeded, or imported) are encoded with
`engram.quant.encode` in pieces of about ENCODE_VALUES values, so peak memory stays one chunk of
encoded values and scales plus one small float32 piece. Checkpoint rows already stored as FP8 E4M3
with E8M0 scales in the table's layout (same scale_block) are copied through bit for bit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import LayerRows
from .compression import Compression
from .dtypes import scale_dtype, storage_dtype, torch_dtype
from .errors import InputError, TableExistsError
from .format import (
    CHUNK_ALIGN,
    LayerLayout,
    TableMeta,
    check_dtype_supported,
    checksum,
    format_version_for,
    is_table,
    write_attributes,
    write_metadata,
)
from .hashing import NgramHasher
from .mapping import release_pages
from .publish import clean_stale, fsync_tree, partial_dir, publish, restore_aside
from .quant import encode, finite_rows
from .shards import ShardRange, plan_shards
from .spec import TableSpec
from .table import Table
from .table import open as open_table

__all__ = ["build_table", "plan_layout", "write_table", "INITS", "INIT_BLOCK_ROWS", "DEFAULT_CHUNK_BYTES",
           "ENCODE_VALUES", "check_build"]

INITS = ("normal", "zeros")
INIT_BLOCK_ROWS = 1024          # rows drawn from one seeded generator (independent of chunking)
DEFAULT_CHUNK_BYTES = 64 << 20  # default chunk file size (rounded down to whole CHUNK_ALIGN rows)
ENCODE_VALUES = 1 << 17         # float32 values encoded per piece into quantized chunks (512 KiB)

# One chunk of a layer as written: the values [chunk_rows, D] and, for quantized rows, the scales
# [chunk_rows, S], both in their stored dtypes with zero rows past the end of the layer.
Chunk = tuple[np.ndarray, "np.ndarray | None"]


def build_table(path: str | os.PathLike[str], spec: TableSpec, comp: Compression, init: str = "normal",
                std: float = 0.02, seed: int = 0, weights: Mapping[int, Any] | None = None,
                overwrite: bool = False, chunk_rows: int | None = None, progress: bool | None = None,
                shard: tuple[int, int] | None = None) -> Table:
    """Write a table for `spec` and `comp` at `path` and open it.

    Rows are written chunk by chunk; memory use does not grow with the table. The table appears
    at `path` atomically once complete: a build that fails or is killed leaves nothing there
    (its partial directory `.{name}.partial-*` is removed by the next build of that path).

    Args:
        path: the table directory to create.
        spec: the table spec; any dtype: "float32", "bfloat16", "float16", or the quantized
            "int8" and "float8_e4m3" (values encoded with `engram.quant.encode`; scales in a
            second array per layer, see `engram.format`).
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
            `engram.shards.plan_shards(spec, parts)[rank]` holds), equal to the same rows of the
            whole build, for `engram.distributed.ShardedTable`; `weights` are still whole layers.

    Returns:
        The new table, opened with `engram.open(path)`.

    Raises:
        TableExistsError: something is at `path` and `overwrite` is False (or it is not a table).
        InputError: bad arguments, or `weights` of the wrong shape or dtype (or, for quantized
            tables, rows with NaN or inf).

    Example:
        >>> comp = engram.Compression.identity(1000)
        >>> spec = engram.TableSpec(engram_vocab_size=(5000, 5000), max_ngram_size=3, n_head_per_ngram=4,
        ...                         n_embed_per_ngram=256, layer_ids=(1,), compressed_vocab_size=1000)
        >>> table = engram.build_table("demo.engram", spec, comp, seed=0)
    """
    layouts = check_build(path, spec, comp, init=init, std=std, seed=seed, weights=weights, overwrite=overwrite,
                          chunk_rows=chunk_rows, shard=shard)
    sources = {int(layer_id): rows for layer_id, rows in (weights or {}).items()}
    target = Path(path)
    part = None if shard is None else plan_shards(spec, shard[1])[shard[0]]

    def chunks(lay: LayerLayout) -> Iterator[Chunk]:
        first = 0 if part is None else part.start(lay.layer_id)
        if lay.layer_id in sources:
            return _source_chunks(sources[lay.layer_id], lay, spec, first)
        return _init_chunks(lay, spec, init, std, seed, first)

    write_table(target, spec, comp, layouts, chunks, overwrite, progress, shard=part)
    return open_table(target)


def check_build(path: str | os.PathLike[str], spec: TableSpec, comp: Compression, *, init: str = "normal",
                std: float = 0.02, seed: int = 0, weights: Mapping[int, Any] | None = None, overwrite: bool = False,
                chunk_rows: int | None = None, shard: tuple[int, int] | None = None) -> dict[int, LayerLayout]:
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
        if not (isinstance(shard, tuple) and len(shard) == 2 and all(isinstance(v, int) for v in shard)
                and 0 <= shard[0] < shard[1]):
            raise InputError(f"shard={shard!r} is invalid: expected (rank, parts) with 0 <= rank < parts, e.g. (0, 4)")
        part = plan_shards(spec, shard[1])[shard[0]]
    layouts = plan_layout(spec, chunk_rows, part)
    restore_aside(path)       # a table a killed build left aside belongs at `path`: it is there again
    _check_target(Path(path), overwrite)
    return layouts


def write_table(target: Path, spec: TableSpec, comp: Compression, layouts: dict[int, LayerLayout],
                chunks: Callable[[LayerLayout], Iterator[Chunk]], overwrite: bool, progress: bool | None,
                desc: str = "build_table", shard: ShardRange | None = None) -> dict[int, LayerLayout]:
    """Write a table whose chunks `chunks(layout)` yields, layer by layer, and publish it atomically.

    Args:
        target: the table directory (checked by the caller: `_check_target`).
        spec, comp: stored with the table.
        layouts: `plan_layout(spec, ...)`.
        chunks: per layer layout, an iterator of its `n_chunks` chunks (values, scales or None);
            each chunk is written before the next is asked for, so a generator may reuse buffers.
        overwrite: replace an existing table at `target`.
        progress: progress bar (None: only on a terminal, after a second).
        desc: the progress bar's label.
        shard: the rows of each layer this table holds, for one part of a sharded table (the
            layouts then have `shard.rows(layer_id)` rows); None for a whole table.

    Returns:
        The layouts with their checksums.
    """
    clean_stale(target)
    version = format_version_for(spec, shard)
    with partial_dir(target) as tmp:
        write_metadata(tmp, TableMeta(version, spec, comp, layouts, shard))
        written = {}
        with _progress_bar(layouts, progress, desc) as bar:
            for lid, lay in layouts.items():
                sums: list[str] = []
                scale_sums: list[str] = []
                for index, (values, scales) in enumerate(chunks(lay)):
                    sums.append(_write_chunk(lay.chunk_path(tmp, index), values, bar))
                    if lay.scales is not None:
                        scale_sums.append(_write_chunk(lay.scales.chunk_path(tmp, index), scales, bar))
                if len(sums) != lay.n_chunks:
                    raise RuntimeError(f"layer {lid}: {len(sums)} chunks produced for {lay.n_chunks}")
                written[lid] = lay.with_checksums(tuple(sums), tuple(scale_sums))
        write_attributes(tmp, TableMeta(version, spec, comp, written, shard))
        fsync_tree(tmp)
        publish(tmp, target, overwrite, replaceable=_replaceable)
    return written


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


def plan_layout(spec: TableSpec, chunk_rows: int | None = None,
                shard: ShardRange | None = None) -> dict[int, LayerLayout]:
    """How `build_table` would split each layer into chunk files (checksums still empty).

    Args:
        spec: the table spec.
        chunk_rows: as for build_table (None: about 64 MiB chunks, split evenly).
        shard: plan one part of a sharded table: each layer holds `shard.rows(layer_id)` rows.

    Returns:
        {layer_id: LayerLayout}; disk use is sum(lay.n_chunks * lay.chunk_bytes).

    Example:
        >>> {lid: lay.n_chunks for lid, lay in plan_layout(spec).items()}
        {1: 5, 15: 5}
    """
    return {lid: _plan_layer(spec, lid, chunk_rows, spec.rows(lid) if shard is None else shard.rows(lid))
            for lid in spec.layer_ids}


def _plan_layer(spec: TableSpec, layer_id: int, chunk_rows: int | None, rows: int) -> LayerLayout:
    """The layer's layout: chunk rows a multiple of the alignment, no larger than needed."""
    row_bytes, scale_bytes = spec.row_bytes, spec.scale_row_bytes
    # the smallest rows giving whole CHUNK_ALIGNs, for the values and (quantized rows) the scales
    align_rows = math.lcm(*(CHUNK_ALIGN // math.gcd(CHUNK_ALIGN, b) for b in (row_bytes, scale_bytes) if b))
    if chunk_rows is None:   # about DEFAULT_CHUNK_BYTES, split evenly so the last chunk has little padding
        n_chunks = -(-rows // (max(1, DEFAULT_CHUNK_BYTES // (align_rows * row_bytes)) * align_rows))
        chunk_rows = -(-rows // (n_chunks * align_rows)) * align_rows
    elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1 \
            or chunk_rows % align_rows:
        scales = f" and {scale_bytes} bytes of scales" if scale_bytes else ""
        raise InputError(
            f"chunk_rows={chunk_rows!r} is invalid: chunk files must be whole multiples of {CHUNK_ALIGN} bytes "
            f"so they map at page boundaries; with {row_bytes}-byte rows{scales} use a positive multiple of "
            f"{align_rows} (or None for about 64 MiB chunks)")
    chunk_rows = min(int(chunk_rows), -(-rows // align_rows) * align_rows)
    scales = None
    if spec.quantized:
        scales = LayerLayout(layer_id, f"layer_{layer_id}_scales", rows, scale_bytes, chunk_rows, role="scales")
    return LayerLayout(layer_id, f"layer_{layer_id}", rows, row_bytes, chunk_rows, scales=scales)


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


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _replaceable(path: Path) -> bool:
    """What overwrite=True may delete: an engram table, or an empty directory."""
    return _empty_dir(path) or (path.is_dir() and not path.is_symlink() and is_table(path))


def _check_target(target: Path, overwrite: bool) -> None:
    ancestor = target.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"path={os.fspath(target)!r} cannot be created: {os.fspath(ancestor)!r} is not a folder; "
                         "choose another path")
    if not os.path.lexists(target) or _empty_dir(target):
        return
    if not overwrite:
        raise TableExistsError(
            f"path={os.fspath(target)!r} already exists: pass overwrite=True to replace the table there, "
            "or choose another path")
    if not _replaceable(target):
        raise TableExistsError(
            f"path={os.fspath(target)!r} exists and is not an engram table: overwrite=True replaces only "
            "tables; remove it yourself or choose another path")


# ------------------------------------------------------------------------------------------
# chunks
# ------------------------------------------------------------------------------------------
def _chunk_buffers(lay: LayerLayout, spec: TableSpec) -> Chunk:
    """Zeroed buffers for one chunk: values [chunk_rows, D] and scales [chunk_rows, S] or None."""
    values = np.zeros((lay.chunk_rows, spec.head_dim), storage_dtype(spec.dtype))
    scales = None if not spec.quantized else np.zeros((lay.chunk_rows, spec.scales_per_row), scale_dtype(spec.dtype))
    return values, scales


def _zero_tail(chunk: Chunk, rows: int) -> Chunk:
    """Zero the rows of a chunk past the layer's end (zero bytes decode to zero rows in every dtype)."""
    for part in chunk:
        if part is not None:
            part[rows:] = 0
    return chunk


def _piece_rows(spec: TableSpec) -> int:
    return max(1, ENCODE_VALUES // spec.head_dim)


def _init_chunks(lay: LayerLayout, spec: TableSpec, init: str, std: float, seed: int,
                 first: int = 0) -> Iterator[Chunk]:
    """Seeded chunks in the stored dtype, zero rows past the end; local row 0 is global row `first`."""
    chunk = _chunk_buffers(lay, spec)
    block = chunk[0]
    if spec.quantized:   # drawn in float32 pieces, each encoded into the chunk
        piece = np.empty((_piece_rows(spec), spec.head_dim), np.float32)
        for index in range(lay.n_chunks):
            start, stop = lay.chunk_span(index)
            for p in range(start, stop, len(piece)) if init == "normal" else ():
                q = min(p + len(piece), stop)
                _normal_rows(piece[: q - p], first + p, lay.layer_id, seed, std)
                _encode_into(piece[: q - p], chunk, p - start, spec, f"init of layer {lay.layer_id}", p)
            yield _zero_tail(chunk, stop - start)
        return
    # float32 rows are drawn straight into the chunk; other dtypes are rounded from float32.
    values = block if spec.dtype == "float32" else np.empty((lay.chunk_rows, spec.head_dim), np.float32)
    for index in range(lay.n_chunks):
        start, stop = lay.chunk_span(index)
        if init == "normal":
            _normal_rows(values[: stop - start], first + start, lay.layer_id, seed, std)
            if values is not block:
                _store(values[: stop - start], block[: stop - start], spec.dtype)
        yield _zero_tail(chunk, stop - start)


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


def _as_torch(values: Any) -> torch.Tensor:
    """A torch view (or, for read-only numpy arrays such as np.memmap slices, a copy) of float rows."""
    if isinstance(values, torch.Tensor):
        return values
    # torch.from_numpy refuses read-only arrays (read-only np.memmap): copy those slices
    return torch.from_numpy(np.array(values, copy=not values.flags.writeable or None, order="C"))


def _store(values: Any, dest: np.ndarray, dtype: str) -> None:
    """Round `values` (numpy or torch, any float dtype) to the float `dtype` into the storage array `dest`."""
    target = torch.from_numpy(dest)
    if dtype == "bfloat16":
        target = target.view(torch.bfloat16)
    target.copy_(_as_torch(values).to(device="cpu", dtype=torch_dtype(dtype)))


def _encode_into(values: Any, chunk: Chunk, at: int, spec: TableSpec, source: str, first_row: int) -> None:
    """Encode float rows into a quantized chunk's values and scales at row `at`.

    Rows with NaN or inf are refused, naming the `source` (e.g. "weights[1]") and its row
    (`first_row` is the row of values[0]).
    """
    x = _as_torch(values).to(device="cpu", dtype=torch.float32)
    try:
        q = encode(x, spec.dtype, spec.scale_block)
    except InputError:
        finite = finite_rows(x)
        if bool(finite.all()):
            raise
        bad = first_row + int(torch.nonzero(~finite)[0, 0])
        raise InputError(f"{source} row {bad} contains NaN or inf (after conversion to float32): "
                         f"{spec.dtype} rows must be finite; fix or drop that row first") from None
    n = len(q.values)
    chunk[0][at: at + n] = q.values
    chunk[1][at: at + n] = q.scales


def _copies_through(src: Any, spec: TableSpec) -> bool:
    """True when checkpoint rows are stored exactly as the table stores them (FP8 + E8M0, same block)."""
    return (isinstance(src, LayerRows) and spec.dtype == "float8_e4m3" and src.stored_dtype == "float8_e4m3"
            and src.block == spec.scale_block)


def _source_chunks(src: Any, lay: LayerLayout, spec: TableSpec, first: int = 0) -> Iterator[Chunk]:
    """Chunks copied from trained rows, one slice at a time (np.memmap pages released after use);
    local row 0 is row `first` of `src`."""
    chunk = _chunk_buffers(lay, spec)
    if isinstance(src, torch.Tensor):
        src = src.detach()
    step = _piece_rows(spec) if spec.quantized else lay.chunk_rows
    for index in range(lay.n_chunks):
        start, stop = lay.chunk_span(index)
        start, stop = start + first, stop + first          # rows of src
        if _copies_through(src, spec):                     # stored bytes, bit for bit
            values, scales = src.read_stored(start, stop)
            chunk[0][: stop - start] = values
            chunk[1][: stop - start] = scales
            yield _zero_tail(chunk, stop - start)
            continue
        for p in range(start, stop, step):
            q = min(p + step, stop)
            piece = src[p:q]
            if spec.quantized:
                _encode_into(piece, chunk, p - start, spec, f"weights[{lay.layer_id}]", p)
            else:
                _store(piece, chunk[0][p - start: q - start], spec.dtype)
            if isinstance(src, np.memmap) and getattr(src, "mode", "c") in ("r", "r+") and piece.flags.c_contiguous:
                release_pages(piece)   # a shared mapping: the rows stay in the file
        yield _zero_tail(chunk, stop - start)


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


def _progress_bar(layouts: dict[int, LayerLayout], progress: bool | None, desc: str = "build_table") -> Any:
    from tqdm.auto import tqdm

    total = sum(lay.disk_bytes for lay in layouts.values())
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, delay=1.0, mininterval=0.5,
                disable=None if progress is None else not progress)

