"""The engram demo: the main job end to end on a small built-in example, in well under a minute.

1. `engram build`: a bfloat16 table (two layers of ~256 MiB, ~512 MiB in all) from
   tools/demo_spec.json and the tokenizer shipped in the package.
2. `engram stats`: n-gram statistics of Python standard-library sources against that table, and
   the hot-row plan.
3. `engram hash`: the rows one sentence addresses.
4. Python: `table.lookup` on every storage tier, and `EngramMemory` reading its rows from the table.
5. Generation token by token (tools/generate.py): a tiny LM with Engram caches, checked against
   recomputing the whole sequence every step.

    python tools/demo.py [--out out/demo] [--files 200]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

import engram
from engram.cli import main as engram_cli

HERE = Path(__file__).parent
TOKENIZER = engram.data.tokenizer_path()
SPEC = HERE / "demo_spec.json"
TEXT = "Only Alexander the Great could tame the horse Bucephalus."


def step(title: str) -> None:
    print(f"\n=== {title}")


def cli(*argv: str) -> None:
    print("$ engram " + " ".join(shlex.quote(a) for a in argv), flush=True)
    start = time.perf_counter()
    code = engram_cli(list(argv))
    print(f"[exit {code}, {time.perf_counter() - start:.1f} s]")
    if code != 0:
        sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/demo", help="folder for the demo's table and files")
    parser.add_argument("--files", type=int, default=200, help="standard-library files in the corpus")
    parser.add_argument("--spec", default=str(SPEC), help="TableSpec JSON of the demo table")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table_path = str(out / "demo.engram")
    corpus = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[: args.files]
    torch.set_num_threads(1)
    started = time.perf_counter()

    step("1. build a table")
    cli("build", table_path, "--spec", args.spec, "--tokenizer", str(TOKENIZER), "--seed", "0", "--overwrite")

    step(f"2. corpus statistics over {len(corpus)} standard-library files")
    hot = str(out / "hot_rows.npz")
    cli("stats", "--table", table_path, "--tokenizer", str(TOKENIZER), "--hot-rows", hot,
        "--plot", str(out / "coverage.png"), *map(str, corpus))

    step("3. the rows a sentence addresses")
    cli("hash", "--table", table_path, "--tokenizer", str(TOKENIZER), "--text", TEXT)

    step("4. lookups and the Engram layer, from Python")
    ids = torch.tensor([Tokenizer.from_file(str(TOKENIZER)).encode(TEXT).ids])
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 4000, (8, 4096)))
    reference = None
    for tier in ("ram", "mmap", "direct"):
        with engram.open(table_path, tier=tier) as table:
            e = table.lookup(ids, layer_id=1)                        # [1, T, E]
            if reference is None:
                reference = e
            assert torch.equal(e, reference), f"tier {tier} returned other rows"
            table.lookup(batch, layer_id=1)                          # warm up
            start = time.perf_counter()
            table.lookup(batch, layer_id=1)
            seconds = time.perf_counter() - start
            print(f"  {tier:6s}: sentence -> {tuple(e.shape)} {e.dtype}; batch of {batch.numel():,} tokens "
                  f"in {seconds * 1e3:6.1f} ms ({batch.numel() / seconds / 1e6:.2f} M tokens/s, one thread)")
    print("  every tier returned identical rows")

    with engram.open(table_path, tier="mmap") as table:
        torch.manual_seed(0)
        mem = engram.EngramMemory.from_table(table, layer_id=1, hidden_size=128, hc_mult=2)
        hidden = torch.randn(1, ids.shape[1], 2, 128)                # [B, T, G, C]
        start = time.perf_counter()
        y = mem(hidden, ids)                                         # [B, T, G, C]
        seconds = time.perf_counter() - start
        print(f"  EngramMemory(layer 1, C=128, G=2) on {ids.shape[1]} tokens: output {tuple(y.shape)}, "
              f"|output|/|hidden| = {(y.norm() / hidden.norm()).item():.3f}, {seconds * 1e3:.1f} ms")
    step("5. generating token by token, with a KV cache and Engram caches")
    import generate

    generate.main(["--tokens", "16"])
    print(f"\ndemo finished in {time.perf_counter() - started:.1f} s; files in {out}/")


if __name__ == "__main__":
    main()
