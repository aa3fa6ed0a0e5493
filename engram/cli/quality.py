"""`engram quality` and the gate of `engram convert --max-kl`: a model from a checkpoint folder,
fed windows of a held-out text, compared reading two tables (`engram.quality`).

A gate model is a folder holding `engram_gate.py`, whose `load(directory)` returns
`model_fn(token_ids [B, T], table) -> logits [B, T, V]`, and `tokenizer.json` (Hugging Face
tokenizers) for the text; `tools/train_tiny.py --save DIR` writes one for the project's tiny LM.
Loading it runs that Python file: point the flags only at folders you trust, as with any code.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engram.cli.common import EXIT_OK, Output, float_at_least_zero, int_at_least
from engram.errors import InputError, MissingFileError

if TYPE_CHECKING:       # engram.quality imports torch: only when a command needs it
    from engram.quality import ModelFn, QualityReport

__all__ = ["GATE_FILE", "add_gate", "add_max_kl", "cmd_quality", "convert_gate", "report_lines"]

GATE_FILE = "engram_gate.py"


def add_gate(p: argparse.ArgumentParser, prefix: str = "", required: bool = False) -> None:
    """The model, text and window flags (`--gate-model` etc. with prefix "gate-")."""
    p.add_argument(f"--{prefix}model", metavar="DIR", required=required,
                   help=f"checkpoint folder with {GATE_FILE} and tokenizer.json (tools/train_tiny.py --save DIR); "
                        "its code is run")
    p.add_argument(f"--{prefix}text", metavar="FILE", required=required, help="held-out text the model reads")
    p.add_argument(f"--{prefix}window", type=int_at_least(2), default=128, metavar="T",
                   help="tokens per sequence (at most the model's context)")
    p.add_argument(f"--{prefix}tokens", type=int_at_least(2), default=16384, metavar="N",
                   help="tokens of the text used, at most")


def load_model(directory: str) -> ModelFn:
    """`load(directory)` of the folder's engram_gate.py."""
    path = Path(directory, GATE_FILE)
    if not path.is_file():
        raise MissingFileError(f"gate model {directory!r} has no {GATE_FILE}: pass a folder written by "
                               f"tools/train_tiny.py --save, or one whose {GATE_FILE} defines load(directory)")
    name = "engram_gate_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "load", None)):
        raise InputError(f"{path} defines no load(directory): it must return model_fn(token_ids, table) -> logits")
    model_fn: ModelFn = module.load(Path(directory))
    return model_fn


def load_batches(directory: str, text: str, window: int, tokens: int) -> list[Any]:
    """The text tokenized with the folder's tokenizer.json, cut into batches of windows."""
    from tokenizers import Tokenizer

    from engram.quality import text_batches

    tok_path, text_path = Path(directory, "tokenizer.json"), Path(text)
    for what, path in (("tokenizer", tok_path), ("text", text_path)):
        if not path.is_file():
            raise MissingFileError(f"{what} file {str(path)!r} does not exist: the gate needs the model's "
                                   "tokenizer.json in its folder and a held-out text file")
    ids = Tokenizer.from_file(str(tok_path)).encode(text_path.read_text(encoding="utf-8", errors="ignore")).ids
    return text_batches(ids, window=window, batch_size=8, max_tokens=tokens)


def report_lines(report: QualityReport, indent: str = "  ") -> list[str]:
    """The report as text lines."""
    return [f"{indent}{report.positions:,} next-token predictions compared:",
            f"{indent}KL(source || converted) mean {report.kl_mean:.4g} nats, p99 {report.kl_p99:.4g}, "
            f"max {report.kl_max:.4g}",
            f"{indent}NLL {report.nll_a:.4f} -> {report.nll_b:.4f} nats (delta {report.delta_nll:+.4g}); "
            f"top-1 agreement {report.top1_agreement:.2%}"]


def cmd_quality(args: argparse.Namespace) -> Output:
    from engram.opening import open as open_table
    from engram.quality import compare

    model_fn = load_model(args.model)
    batches = load_batches(args.model, args.text, args.window, args.tokens)
    with open_table(args.table_a) as a, open_table(args.table_b) as b:
        report = compare(model_fn, batches, a, b)
    payload = {"table_a": args.table_a, "table_b": args.table_b, **report.to_dict()}
    return Output(payload, "\n".join([f"{args.table_b} against {args.table_a}:", *report_lines(report)]), EXIT_OK)


def convert_gate(args: argparse.Namespace) -> Any:
    """The `accept=` gate of `engram convert` (None without --gate-model): refuses above --max-kl."""
    if args.gate_model is None:
        if args.max_kl is not None:
            raise InputError("--max-kl needs a model to measure it with: pass --gate-model DIR and --gate-text FILE")
        return None
    if args.gate_text is None:
        raise InputError("--gate-model needs --gate-text FILE, a held-out text the model reads")
    from engram.quality import kl_gate

    model_fn = load_model(args.gate_model)
    batches = load_batches(args.gate_model, args.gate_text, args.gate_window, args.gate_tokens)
    return kl_gate(model_fn, batches, float("inf") if args.max_kl is None else args.max_kl)


def add_max_kl(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-kl", type=float_at_least_zero, metavar="NATS",
                   help="refuse to write DST (exit 1) if the gate model's mean next-token KL against SRC is above "
                        "this; needs --gate-model and --gate-text")
    add_gate(p, "gate-")
