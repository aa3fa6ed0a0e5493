"""Train a tiny causal transformer with Engram layers on CPU and show the loss falling.

    python tools/train_tiny.py                          # stdlib sources, Engram at block 1
    python tools/train_tiny.py --engram-layers none     # the same model without Engram
    python tools/train_tiny.py --data notes/ --steps 500 --engram-layers 1,3 --json
    python tools/train_tiny.py --save tiny/          # a checkpoint the quality gate can load

Text: the Python standard library's .py files by default, or any files given with --data,
tokenized with the shipped 4k byte-level BPE; files are read in a fixed random order up to
--max-chars, and every k-th file (k = 1/--val-fraction) is held out for the validation loss.
Engram rows train inside the model with Adam at 5x the base learning rate (engram.param_groups).
Reported: the training loss every --log-every steps, the final validation loss, tokens/s and
the share of step time spent in the Engram lookup (host hashing + row gather, forward only).

--save DIR writes a checkpoint that `engram quality` and `engram convert --max-kl` load as their
gate model: table.engram (the trained Engram rows, float32), model.pt (every other weight),
config.json, tokenizer.json, heldout.txt (the validation texts), and the model code (tiny_lm.py,
engram_gate.py: `load(directory)` returns `model_fn(token_ids, table) -> logits`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_data import (  # noqa: E402
    TOKENIZER,
    expand,
    held_out_texts,
    random_batch,
    read_texts,
    split_tokens,
    stdlib_files,
)
from tiny_lm import TinyLM, TinyLMConfig  # noqa: E402

import engram  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and batches")
    p.add_argument("--engram-layers", default="1",
                   help="comma-separated blocks that carry Engram; 'none' for a plain transformer")
    p.add_argument("--data", nargs="+", default=None,
                   help="text files or directories (default: the standard library's .py files)")
    p.add_argument("--max-chars", type=int, default=3_000_000, help="characters of text to read")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of the tokens")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--block-size", type=int, default=128, help="tokens per sequence")
    p.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument("--n-embd", type=int, default=128, help="model width")
    p.add_argument("--engram-vocab", type=int, default=20_000, help="base table size per head")
    p.add_argument("--lr", type=float, default=2e-3, help="base learning rate (Engram rows: 5x)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps")
    p.add_argument("--log-every", type=int, default=25, help="print the training loss every N steps")
    p.add_argument("--eval-batches", type=int, default=20, help="batches of the validation loss")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a log")
    p.add_argument("--save", metavar="DIR", help="write a gate checkpoint (table, weights, code, held-out text)")
    args = p.parse_args(argv)
    spec = args.engram_layers.strip().lower()
    try:
        args.engram_layers = () if spec in ("", "none") else tuple(int(v) for v in spec.split(","))
    except ValueError:
        p.error(f"--engram-layers {spec!r}: expected comma-separated block numbers, e.g. 1 or 1,3, or none")
    layers = args.engram_layers
    if len(set(layers)) != len(layers) or any(not 0 <= i < args.n_layer for i in layers):
        p.error(f"--engram-layers {spec!r}: expected distinct blocks in 0..{args.n_layer - 1} (--n-layer)")
    return args


class LookupTimer:
    """Wraps each EngramMemory's gather_rows (which forward calls) and its hasher to add up their seconds."""

    def __init__(self, model: TinyLM) -> None:
        self.lookup_s = self.hash_s = 0.0
        for mem in model.engram_modules():
            mem.gather_rows = self._timed(mem.gather_rows, "lookup_s")
            mem.hasher.hash = self._timed(mem.hasher.hash, "hash_s")

    def _timed(self, fn: Any, counter: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self, counter, getattr(self, counter) + time.perf_counter() - start)
        return timed


def load_tokens(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    files = expand(args.data) if args.data else stdlib_files()
    texts = read_texts(files, args.max_chars)
    train, val = split_tokens(texts, args.val_fraction)
    args.held_out = held_out_texts(texts, args.val_fraction)
    if min(len(train), len(val)) < args.block_size + 2:
        raise SystemExit(f"only {len(train)} training and {len(val)} validation tokens: give more --data, "
                         "a larger --val-fraction or a smaller --block-size")
    return train, val


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to a tenth of the base rate."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(model: TinyLM, config: TinyLMConfig, comp: engram.Compression, args: argparse.Namespace) -> None:
    """The gate checkpoint of --save (see the module docstring)."""
    out = Path(args.save)
    out.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    mems = model.engram_modules()
    if mems:
        engram.build_table(out / "table.engram", mems[0].spec, comp, overwrite=True, progress=False,
                           weights={m.layer_id: m.export_rows() for m in mems}).close()
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("engram.rows")}, out / "model.pt")
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    shutil.copyfile(TOKENIZER, out / "tokenizer.json")
    shutil.copyfile(here / "tiny_lm.py", out / "tiny_lm.py")
    shutil.copyfile(here / "tiny_gate.py", out / "engram_gate.py")
    (out / "heldout.txt").write_text("\n".join(args.held_out))


@torch.no_grad()
def evaluate(model: TinyLM, tokens: np.ndarray, args: argparse.Namespace) -> float:
    model.eval()
    rng = np.random.default_rng(args.seed + 1)     # the same windows every time
    losses = [model(*random_batch(tokens, args.batch_size, args.block_size, rng))[1].item()
              for _ in range(args.eval_batches)]
    model.train()
    return float(np.mean(losses))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    log = (lambda *a: None) if args.json else print

    train, val = load_tokens(args)
    comp = engram.Compression.from_tokenizer_file(TOKENIZER)
    config = TinyLMConfig(vocab_size=comp.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                          n_head=args.n_head, n_embd=args.n_embd, engram_layers=args.engram_layers,
                          engram_vocab_size=args.engram_vocab)
    model = TinyLM(config, comp)
    groups = engram.param_groups(model, lr=args.lr, weight_decay=args.weight_decay)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    base_lrs = [g["lr"] / args.lr for g in optimizer.param_groups]
    timer = LookupTimer(model)
    n_params = {g["name"]: sum(p.numel() for p in g["params"]) for g in groups}
    log(f"text: {len(train):,} training tokens, {len(val):,} validation tokens; engram layers "
        f"{list(args.engram_layers) or 'none'}; parameters {n_params}")

    curve, step_s, window = [], 0.0, []
    for step in range(args.steps):
        for group, mult in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = learning_rate(step, args) * mult
        x, y = random_batch(train, args.batch_size, args.block_size, rng)
        start = time.perf_counter()
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_s += time.perf_counter() - start
        curve.append(loss.item())
        window.append(curve[-1])
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            log(f"step {step + 1:>5}/{args.steps}  loss {np.mean(window):.3f}  "
                f"{(step + 1) * x.numel() / step_s:,.0f} tokens/s")
            window = []

    result = {
        "steps": args.steps, "seed": args.seed, "engram_layers": list(args.engram_layers),
        "parameters": n_params, "train_tokens": len(train), "val_tokens": len(val),
        "loss_first": curve[0], "loss_last": float(np.mean(curve[-min(len(curve), args.log_every):])),
        "val_loss": evaluate(model, val, args),
        "tokens_per_s": args.steps * args.batch_size * args.block_size / step_s,
        "lookup_share": timer.lookup_s / step_s, "hash_share": timer.hash_s / step_s,
        "loss_curve": curve,
    }
    if args.save:
        save_checkpoint(model, config, comp, args)
    if args.json:
        print(json.dumps(result))
    else:
        log(f"validation loss {result['val_loss']:.3f}; {result['tokens_per_s']:,.0f} tokens/s; "
            f"Engram lookup {result['lookup_share']:.1%} of step time "
            f"(hashing {result['hash_share']:.1%})")
    return result


if __name__ == "__main__":
    main()
