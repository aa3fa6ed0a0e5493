"""The parser and `main`: arguments in, one subcommand run, its result printed, an exit code out."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import numpy as np

from engram.cli.common import (
    BLOCK_DTYPE,
    EXIT_CHECK_FAILED,
    EXIT_INTERRUPTED,
    EXIT_REFUSED,
    EXIT_USAGE,
    ROW_DTYPES,
    Output,
    add_encoding,
    add_source,
    add_vocab,
    float_at_least_zero,
    int_at_least,
)
from engram.cli.corpus import cmd_hash, cmd_stats
from engram.cli.quality import add_gate, add_max_kl, cmd_quality
from engram.cli.read import cmd_bench, cmd_inspect, cmd_verify
from engram.cli.shard import cmd_shard, shard_arg
from engram.cli.write import cmd_build, cmd_convert, cmd_import
from engram.errors import EngramError, QualityGateError


# -- parser ------------------------------------------------------------------------------------
class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when it has a default worth stating: not None or
    False (nothing given, a flag left off), and not already described in the help text."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text, default = action.help or "", action.default
        if (not action.option_strings or default is None or default is False or default is argparse.SUPPRESS
                or "default" in text):
            return action.help
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"

    def _split_lines(self, text: str, width: int) -> list[str]:
        # long names (a tensor name pattern) stay whole instead of being cut mid-word
        return textwrap.wrap(re.sub(r"\s+", " ", text).strip(), width, break_long_words=False,
                             break_on_hyphens=False)


class _UsageError(Exception):
    """Arguments that do not parse: raised instead of argparse's exit, so `main` can also answer
    in JSON."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser, self.message = parser, message


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a: Any, **kw: Any) -> None:
        kw.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self, message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="engram", description="Build, check and measure Engram memory tables.",
                     epilog="exit codes: 0 ok, 1 a check failed, 2 bad arguments, 3 input refused or a file "
                            "not readable or writable, 130 interrupted")
    parser.add_argument("--version", action="version", version=f"engram {importlib.metadata.version('engram')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("build", help="build a table with seeded rows")
    p.add_argument("path", metavar="PATH", help="table directory to create")
    p.add_argument("--spec", required=True, metavar="SPEC.json",
                   help="TableSpec fields as JSON (compressed_vocab_size may be left out)")
    add_vocab(p, required=True)
    p.add_argument("--init", default="normal", choices=("normal", "zeros"), help="initial rows")
    p.add_argument("--std", type=float_at_least_zero, default=0.02, help="standard deviation of --init normal")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the initial rows")
    add_encoding(p)
    p.add_argument("--chunk-rows", type=int_at_least(1), metavar="ROWS",
                   help="rows per chunk file (default: ~64 MiB chunks)")
    p.add_argument("--shard", type=shard_arg, metavar="RANK/PARTS",
                   help="build only part RANK of the table split into PARTS (rows equal to the whole build's)")
    p.add_argument("--dry-run", action="store_true", help="print what would be written; write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing table at PATH")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("shard", help="split a table into parts of contiguous row ranges, one per rank")
    p.add_argument("src", metavar="SRC", help="table directory to split")
    p.add_argument("prefix", metavar="DST_PREFIX", help="part r is written to DST_PREFIX-r-of-PARTS")
    p.add_argument("--parts", type=int_at_least(1), required=True, metavar="PARTS", help="how many parts")
    p.add_argument("--dry-run", action="store_true", help="print the parts' row ranges; write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace existing tables at the parts' paths")
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("import", help="build a table from trained rows in checkpoint files")
    p.add_argument("path", metavar="PATH", help="table directory to create")
    p.add_argument("--spec", required=True, metavar="SPEC.json", help="TableSpec fields as JSON")
    add_vocab(p, required=True)
    p.add_argument("--weights", required=True, nargs="+", metavar="FILE",
                   help="*.safetensors or torch.save files (shards allowed)")
    p.add_argument("--weight-pattern", metavar="PATTERN",
                   help="tensor name of a layer's rows, {layer_id} replaced (default: the V4.1 names, as "
                        "released and with 'model.', then "
                        "'layers.{layer_id}.engram.multi_head_embedding.embedding.weight')")
    p.add_argument("--scale-pattern", metavar="PATTERN",
                   help="tensor name of FP8 rows' E8M0 scales (default: the weight name with its 'weight' "
                        "replaced by 'scale' or 'weight_scale_inv', whichever exists)")
    add_encoding(p)
    p.add_argument("--chunk-rows", type=int_at_least(1), metavar="ROWS",
                   help="rows per chunk file (default: ~64 MiB chunks)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the checkpoint's tensors and print rows, bytes and chunks per layer; write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing table at PATH")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("convert", help="re-encode a table's rows as another dtype, with the error it costs")
    p.add_argument("src", metavar="SRC", help="table directory to read")
    p.add_argument("dst", metavar="DST", help="table directory to create (SRC itself with --overwrite)")
    p.add_argument("--dtype", required=True, choices=ROW_DTYPES, help="row dtype of the new table")
    p.add_argument("--scale-block", type=int_at_least(1), metavar="B",
                   help=f"values per E8M0 scale of {BLOCK_DTYPE} rows, per (scale, minimum) group of int4 / int2 "
                        "rows: a divisor of D (default: SRC's, 32 unless set)")
    p.add_argument("--sample-rows", type=int_at_least(0), default=65536, metavar="N",
                   help="rows per layer the error is measured on, 0 for none")
    p.add_argument("--seed", type=int_at_least(0), default=0, metavar="S", help="seed of the error sample")
    p.add_argument("--dry-run", action="store_true", help="print the bytes before and after; write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing table at DST")
    add_max_kl(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quality", help="what a table's conversion does to a model: KL, NLL, top-1 on a held-out text")
    p.add_argument("table_a", metavar="SRC", help="the source table")
    p.add_argument("table_b", metavar="CONVERTED", help="a conversion of SRC (engram convert)")
    add_gate(p, required=True)
    p.set_defaults(func=cmd_quality)

    p = sub.add_parser("inspect", help="describe a table, or a DeepSeek-V4.1 checkpoint directory")
    p.add_argument("path", metavar="PATH", help="table directory, or checkpoint directory (config.json, shards)")
    p.add_argument("--sample-rows", type=int_at_least(0), default=1000, metavar="N",
                   help="rows sampled per layer for norm statistics, 0 for none")
    p.add_argument("--probe-reads", type=int_at_least(0), default=256, metavar="N",
                   help="checkpoint directories: random reads timed to measure the cold-read rate, 0 for none")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check every chunk of a table against its checksum")
    p.add_argument("path", metavar="PATH", help="table directory")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bench", help="lookup throughput of a table on this machine, with baselines")
    p.add_argument("path", metavar="PATH", help="table directory")
    p.add_argument("--tier", nargs="+", default=["ram", "mmap", "direct"], choices=("ram", "mmap", "direct"),
                   help="tiers to measure")
    p.add_argument("--batch", type=int_at_least(1), default=8, metavar="B", help="sequences per lookup")
    p.add_argument("--seq", type=int_at_least(1), default=4096, metavar="T", help="tokens per sequence")
    p.add_argument("--layer", type=int, metavar="LAYER_ID", help="layer to look up (default: the first)")
    p.add_argument("--repeats", type=int_at_least(1), default=5, help="best of this many lookups")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each mmap/direct lookup (root)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("hash", help="show the rows a text addresses")
    add_source(p)
    p.add_argument("--tokenizer", required=True, metavar="TOKENIZER.json", help="tokenizer of the table")
    p.add_argument("--text", required=True, help="text to tokenize and hash")
    p.set_defaults(func=cmd_hash)

    p = sub.add_parser("stats", help="n-gram and row statistics of a corpus")
    add_source(p)
    p.add_argument("--tokenizer", required=True, metavar="TOKENIZER.json", help="tokenizer of the table")
    p.add_argument("corpus", nargs="+", metavar="CORPUS_FILE", help="text files")
    p.add_argument("--all-families", action="store_true", help="compare collision rates of all hash families")
    p.add_argument("--plot", metavar="FILE.png", help="draw the row coverage curve (matplotlib)")
    p.add_argument("--hot-rows", metavar="FILE", help="write the hot-row plan (.npz) for the lookup cache")
    p.set_defaults(func=cmd_stats)

    for p in sub.choices.values():
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    return parser


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# Library keyword arguments named in error messages, and the flag that sets each here.
_KEYWORD_FLAGS = {"overwrite=True": "--overwrite"}


def _flag_wording(message: str) -> str:
    """An error message of the library, with its keyword-argument advice given as flags."""
    for keyword, flag in _KEYWORD_FLAGS.items():
        message = message.replace(keyword, flag)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except _UsageError as exc:
        exc.parser.print_usage(sys.stderr)
        print(f"{exc.parser.prog}: error: {exc.message}", file=sys.stderr)
        if "--json" in argv:
            _print_json({"error": exc.message, "error_type": "UsageError", "exit_code": EXIT_USAGE})
        return EXIT_USAGE
    func: Callable[[argparse.Namespace], Output] = args.func
    try:
        out = func(args)
    except QualityGateError as exc:          # a measured refusal, like a failed check: exit 1
        return _fail(args, EXIT_CHECK_FAILED, str(exc), type(exc).__name__)
    except (EngramError, OSError) as exc:   # OSError: a file engram was not the first to look at
        return _fail(args, EXIT_REFUSED, _flag_wording(str(exc)), type(exc).__name__)
    except KeyboardInterrupt:
        return _fail(args, EXIT_INTERRUPTED, "interrupted", "KeyboardInterrupt")
    except (MemoryError, RecursionError) as exc:   # an input too large or too deep for what it asks
        what = "memory" if isinstance(exc, MemoryError) else "nesting depth"
        return _fail(args, EXIT_REFUSED, f"the input needs more {what} than this machine allows ({exc!r}): "
                     "check the sizes it asks for", type(exc).__name__)
    if args.json:
        _print_json(_jsonable(out.payload))
    else:
        _print(out.text)
    return out.code


def _print(text: str) -> None:
    """Print to stdout; if the reader went away (`engram inspect T | head`), stop quietly."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _print_json(payload: Any) -> None:
    _print(json.dumps(payload, indent=2))


def _fail(args: argparse.Namespace, code: int, message: str, kind: str) -> int:
    """Report an error on stderr (and, with --json, as one JSON object on stdout); return `code`."""
    print(f"engram {args.command}: {'error: ' if code == EXIT_REFUSED else ''}{message}", file=sys.stderr)
    if getattr(args, "json", False):
        _print_json({"error": message, "error_type": kind, "exit_code": code})
    return code
