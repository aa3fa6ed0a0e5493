"""What the subcommands share: the command result, spec and argument handling, formatting."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from engram.addressing.compression import Compression
from engram.addressing.spec import TableSpec
from engram.dtypes import BLOCK_DTYPE as BLOCK_DTYPE
from engram.dtypes import BLOCK_DTYPES as BLOCK_DTYPES
from engram.dtypes import ROW_DTYPES as _ROW_DTYPES
from engram.errors import InputError, SpecError, SpecMismatchError
from engram.limits import MAX_SPEC_BYTES
from engram.untrusted import read_json

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
ROW_DTYPES = tuple(_ROW_DTYPES)   # every row dtype a table can store: the choices of --dtype


class Output:
    """What a command hands back: a JSON-ready payload and the human text for it."""

    def __init__(self, payload: dict[str, Any], text: str, code: int = EXIT_OK) -> None:
        self.payload, self.text, self.code = payload, text, code


# -- shared argument handling ----------------------------------------------------------------
def load_compression(args: argparse.Namespace) -> Compression:
    if getattr(args, "tokenizer", None):
        return Compression.from_tokenizer_file(args.tokenizer)
    return Compression.identity(args.vocab_size)


def _read_spec(path: str, comp: Compression | None) -> Any:
    """The JSON of a --spec file; `compressed_vocab_size` may be left out and is then taken from `comp`.

    Read as an input from elsewhere (`engram.untrusted`): a FIFO or device is refused, not waited on."""
    fix = "pass a JSON file of TableSpec fields"
    d = read_json(path, "--spec file", MAX_SPEC_BYTES, fix, SpecError)
    if isinstance(d, dict) and is_hf_config(d):      # a model's config.json: its Engram fields fix the spec
        return TableSpec.from_hf_config(d, compression=comp).to_dict()
    if isinstance(d, dict) and "compressed_vocab_size" not in d and comp is not None:
        d["compressed_vocab_size"] = comp.compressed_vocab_size
    return d


def is_hf_config(d: dict[str, Any]) -> bool:
    """A model's config.json (DeepSeek-V4.1's), not TableSpec fields: it has "text_config", "model_type",
    "architectures" or the config's own "engram_layer_ids" (read as `TableSpec.from_hf_config` reads them, with its
    checks against the compression's compressed vocabulary and its errors)."""
    return any(k in d for k in ("text_config", "model_type", "architectures", "engram_layer_ids"))


def load_spec(path: str, comp: Compression | None) -> TableSpec:
    """A spec from a JSON file of TableSpec fields."""
    return TableSpec.from_dict(_read_spec(path, comp))


def with_encoding(spec: TableSpec, dtype: str, scale_block: int | None) -> TableSpec:
    """`spec` with rows stored as `dtype` (and `scale_block`, from --scale-block), or a SpecError naming the flag."""
    if scale_block is not None and dtype not in BLOCK_DTYPES:
        raise InputError(f"--scale-block {scale_block} applies to {', '.join(BLOCK_DTYPES)} rows only, but the rows "
                         f"are {dtype}: drop --scale-block or pass --dtype {BLOCK_DTYPE}")
    try:
        return spec.replace(dtype=dtype, scale_block=spec.scale_block if scale_block is None else scale_block)
    except SpecError as exc:
        if dtype not in BLOCK_DTYPES:
            raise
        raise SpecError(f"{exc}; pass --scale-block B with B a divisor of D={spec.head_dim}") from exc


def load_build_spec(args: argparse.Namespace, comp: Compression) -> TableSpec:
    """The spec of `build` / `import`: the --spec file, --dtype over its dtype, --scale-block over its block."""
    d = _read_spec(args.spec, comp)
    if not isinstance(d, dict):
        return TableSpec.from_dict(d)            # refused with the reason
    dtype = args.dtype or d.get("dtype", "float32")
    if dtype not in ROW_DTYPES:
        return TableSpec.from_dict({**d, "dtype": dtype})       # refused, naming the dtype
    # every other field checked first (as float32 rows), so a refused row encoding is named as such
    base = TableSpec.from_dict({k: v for k, v in d.items() if k not in ("dtype", "scale_block")})
    if args.scale_block is not None:
        return with_encoding(base, dtype, args.scale_block)
    block = {"scale_block": d["scale_block"]} if "scale_block" in d else {}
    try:
        return base.replace(dtype=dtype, **block)
    except SpecError as exc:
        if dtype not in BLOCK_DTYPES:
            raise
        raise SpecError(f"{exc}; pass --scale-block B with B a divisor of D={base.head_dim}") from exc


def spec_and_compression(args: argparse.Namespace) -> tuple[TableSpec, Compression]:
    """From --table PATH, or from --spec plus --tokenizer/--vocab-size."""
    if getattr(args, "table", None):
        from engram.opening import open as open_table

        with open_table(args.table) as table:
            spec, comp = table.spec, table.compression
        if getattr(args, "tokenizer", None):
            check_tokenizer(args.tokenizer, args.table, comp)
        return spec, comp
    comp = load_compression(args)
    return load_spec(args.spec, comp), comp


def check_tokenizer(tokenizer: str, table: str, comp: Compression) -> None:
    """Refuse a --tokenizer whose compression is not the table's: its ids would address other rows."""
    given = Compression.from_tokenizer_file(tokenizer)
    if given != comp:
        raise SpecMismatchError(
            f"--tokenizer {tokenizer!r} gives a compression of {given.vocab_size} ids (fingerprint "
            f"{given.fingerprint}), but the table {table!r} was built with one of {comp.vocab_size} ids "
            f"(fingerprint {comp.fingerprint}): its token ids would address other rows; pass the tokenizer the "
            "table was built with")


def add_source(p: argparse.ArgumentParser, table_ok: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    if table_ok:
        src.add_argument("--table", metavar="PATH", help="take spec and compression from this table")
    src.add_argument("--spec", metavar="SPEC.json", help="TableSpec fields as JSON")


def add_vocab(p: argparse.ArgumentParser, required: bool) -> None:
    vocab = p.add_mutually_exclusive_group(required=required)
    vocab.add_argument("--tokenizer", metavar="TOKENIZER.json", help="Hugging Face tokenizers file")
    vocab.add_argument("--vocab-size", type=int_at_least(1), metavar="V", help="identity compression over V ids")


def add_encoding(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=ROW_DTYPES, help="row dtype (default: the spec's)")
    p.add_argument("--scale-block", type=int_at_least(1), metavar="B",
                   help=f"values per E8M0 scale of {BLOCK_DTYPE} rows, per (scale, minimum) group of int4 / int2 "
                        "rows: a divisor of D (default: the spec's, 32 unless set)")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= `low` (anything else is a usage error, exit 2)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{n} is invalid: pass an int >= {low}")
        return n

    parse.__name__ = f"int >= {low}"
    return parse


def float_at_least_zero(text: str) -> float:
    """An argparse type: a finite float >= 0 (anything else is a usage error, exit 2)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not 0 <= x < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is invalid: pass a finite float >= 0")
    return x


def check_output_file(flag: str, path: str | None, example: str) -> None:
    """Refuse an output file that could not be written, before any long work starts."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{flag} {path!r}: the folder {folder!r} does not exist: create it first or pass a "
                         "path in an existing folder")
    if os.path.isdir(path):
        raise InputError(f"{flag} {path!r} is a folder: pass a file path, e.g. {os.path.join(path, example)!r}")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{flag} {path!r}: the folder {folder!r} is not writable: pass a path you can write")


def fmt_int(n: int) -> str:
    return f"{n:,}"



def layer_plan(spec: TableSpec, chunk_rows: int | None,
               shard: tuple[int, int] | None = None) -> dict[int, dict[str, int]]:
    from engram.making.build import plan_layout
    from engram.storage.shards import plan_shards

    part = None if shard is None else plan_shards(spec, shard[1])[shard[0]]
    return {lid: {"rows": lay.rows, "bytes": lay.rows * spec.stored_row_bytes, "chunks": lay.n_chunks,
                  "chunk_rows": lay.chunk_rows, "disk_bytes": lay.disk_bytes}
            for lid, lay in plan_layout(spec, chunk_rows, part).items()}


def free_bytes(path: str) -> int:
    """Free bytes on the filesystem a table at `path` goes to (build creates missing parents)."""
    import shutil

    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):    # the nearest existing ancestor; "/" always is one
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def plan_text(plan: dict[int, dict[str, int]]) -> list[str]:
    return [f"  layer {lid}: {fmt_int(p['rows'])} rows, {human_bytes(p['bytes'])} "
            f"({human_bytes(p['disk_bytes'])} on disk), {p['chunks']} chunk(s) of {fmt_int(p['chunk_rows'])} rows"
            for lid, p in plan.items()]


def encoding(spec: TableSpec) -> dict[str, Any]:
    """How the spec stores a row: dtype, scales and bytes (the same keys for every dtype)."""
    return {"dtype": spec.dtype, "quantized": spec.quantized,
            "scale_block": spec.scale_block if spec.dtype in BLOCK_DTYPES else None,
            "scales_per_row": spec.scales_per_row, "value_bytes_per_row": spec.row_bytes,
            "scale_bytes_per_row": spec.scale_row_bytes, "stored_row_bytes": spec.stored_row_bytes}


def encoding_text(spec: TableSpec) -> str:
    """E.g. "float8_e4m3 rows of D=256 (256 B of values + 8 B of E8M0 scales, one per 32 values: 264 B stored)"."""
    D = spec.head_dim
    if not spec.quantized:
        return f"{spec.dtype} rows of D={D} ({spec.stored_row_bytes} B stored per row)"
    if spec.dtype == BLOCK_DTYPE:
        scales = f"{spec.scale_row_bytes} B of E8M0 scales, one per {spec.scale_block} values"
    elif spec.dtype in BLOCK_DTYPES:
        scales = f"{spec.scale_row_bytes} B of float16 (scale, minimum) pairs, one per {spec.scale_block} values"
    else:
        scales = f"{spec.scale_row_bytes} B float32 scale"
    return (f"{spec.dtype} rows of D={D} ({spec.row_bytes} B of values + {scales}: {spec.stored_row_bytes} B "
            f"stored per row, decoded to {_ROW_DTYPES[spec.dtype].torch})")


def check_disk(path: str, needed: int, free: int) -> None:
    if needed > free:
        raise SpecError(
            f"the table needs {human_bytes(needed)} on disk but only {human_bytes(free)} is free beside "
            f"{path!r}: free space, build elsewhere, or pick a smaller spec / dtype")


def check_build_args(args: argparse.Namespace, spec: TableSpec, comp: Compression, weights: Any = None) -> None:
    """What build_table checks before it writes, so `--dry-run` refuses what a real build would."""
    from engram.making.build import check_build

    check_build(args.path, spec, comp, init=getattr(args, "init", "normal"), std=getattr(args, "std", 0.02),
                seed=getattr(args, "seed", 0), weights=weights, overwrite=args.overwrite, chunk_rows=args.chunk_rows,
                shard=getattr(args, "shard", None))


