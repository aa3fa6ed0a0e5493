"""DeepSeek-V4.1 checkpoints served in place: opening, lookups against an imported table, FP8 decoding.

A synthetic checkpoint in the release layout (config.json, tokenizer.json, one safetensors shard
holding `layers.1.engram.embed.weight` F8_E4M3 [rows, 256] and its F8_E8M0 scales; N=4, K=8: 24
heads as released, `--base` rows per head) is written once, its rows imported into an engram
"float8_e4m3" table (the same bytes), and a "float32" table of the same width built beside them.
Then, in one run, interleaved (`--rounds` rounds of the four lookups), best of all calls:

- open: `engram.open(checkpoint, tier="mmap")` (config, index, shard headers, header checks; the
  tokenizer's compression derived on the first open and cached after) against opening the
  imported table;
- in place / imported: `table.lookup(ids, 1)` of random [B, T] ids on each tier, tokens/s and
  the ratio (target >= 0.9);
- FP8 -> bfloat16 against float32: `lookup(ids, 1, dtype=torch.bfloat16)` of the FP8 rows against
  `lookup(ids, 1)` of the float32 table on the same tier (target >= 1.0), with the decode's share
  of the FP8 lookup (`quant.decode` alone on one lookup's gathered values and scales), in ns per
  value for the compiled loop and for the torch passes (`engram.storage.fp8`).

"direct" reads the disk (O_DIRECT where the filesystem allows it; `--dir` on a real disk), so it
uses `--direct-tokens` ids, fewer than the memory tiers.

    python tools/bench_v41.py [--base 16384 --batch 8 --seq 1024 --repeats 3 --rounds 4 --threads 1 --dir . --json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import engram
from engram.cli.bench import best_time
from engram.making.checkpoint import open_checkpoint
from engram.storage import fp8, quant

TOKENIZER = engram.data.tokenizer_path()
TIERS = ("ram", "mmap", "direct")


def open_time(path: Path, repeats: int) -> float:
    """Best seconds of `engram.open(path, tier="mmap")` (closing, which waits on the kernel to drop
    the table's file watches, is not timed)."""
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        table = engram.open(path, tier="mmap")
        best = min(best, time.perf_counter() - start)
        table.close()
    return best


def write_checkpoint(root: Path, base: int) -> tuple[engram.TableSpec, engram.Compression]:
    """A one-layer V4.1-layout checkpoint with random (non-NaN) FP8 rows and E8M0 scales."""
    comp = engram.Compression.from_tokenizer_file(TOKENIZER)
    spec = engram.TableSpec(engram_vocab_size=(base,) * 3, max_ngram_size=4, n_head_per_ngram=8,
                            n_embed_per_ngram=8 * 256, layer_ids=(1,), compressed_vocab_size=comp.compressed_vocab_size,
                            dtype="float8_e4m3")
    root.mkdir(parents=True)
    shutil.copy(TOKENIZER, root / "tokenizer.json")
    text = {"engram_layer_ids": [1], "engram_num_embeddings": [spec.rows(1)], "engram_max_ngram_size": 4,
            "engram_n_heads": 8, "engram_head_dim": 256, "engram_vocab_size": base, "engram_pad_token_id": 2,
            "engram_compressed_vocab_size": comp.compressed_vocab_size, "hidden_size": 64, "hc_mult": 4,
            "rms_norm_eps": 1e-6}
    (root / "config.json").write_text(json.dumps({"text_config": text}))
    rng = np.random.default_rng(0)
    values = rng.integers(0, 256, (spec.rows(1), 256), dtype=np.uint8)
    values[(values & 0x7F) == 0x7F] = 0
    scales = rng.integers(115, 125, (spec.rows(1), 8), dtype=np.uint8)
    save_file({"layers.1.engram.embed.weight": torch.from_numpy(values).view(torch.float8_e4m3fn),
               "layers.1.engram.embed.scale": torch.from_numpy(scales).view(torch.float8_e8m0fnu)},
              str(root / "model-00001-of-00001.safetensors"))
    return spec, comp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=int, default=16384, help="rows per head (24 heads)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--direct-tokens", type=int, default=512, help="tokens per lookup on the direct tier")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per round (best kept)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of the four lookups, interleaved")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tiers", default=",".join(TIERS))
    ap.add_argument("--dir", default=".", help="where the checkpoint and tables are written (a real disk)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_v41_", dir=args.dir))
    try:
        ckpt = work / "V4.1"
        spec, comp = write_checkpoint(ckpt, args.base)
        with open_checkpoint(ckpt) as c:
            engram.build_table(work / "imported.engram", spec, comp, weights={1: c.rows(1)}).close()
        engram.build_table(work / "f32.engram", spec.replace(dtype="float32"), comp, seed=1).close()
        report = run(args, ckpt, work, spec, comp)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    o = report["open"]
    print(f"rows: {spec.rows(1):,} x 256 FP8 + 8 E8M0 ({spec.layer_bytes(1) / 2**20:.0f} MiB); "
          f"threads {args.threads}")
    print(f"open (mmap): checkpoint {o['checkpoint_ms']:.2f} ms (first, tokenizer compression derived: "
          f"{o['checkpoint_first_ms']:.1f} ms), imported table {o['imported_ms']:.2f} ms")
    for tier, r in report["tiers"].items():
        print(f"{tier:6s} tokens/s: in place {r['in_place']:,.0f}, imported {r['imported']:,.0f} "
              f"(ratio {r['in_place_ratio']:.2f}); FP8->bf16 {r['fp8_bf16']:,.0f} vs float32 {r['float32']:,.0f} "
              f"(ratio {r['bf16_vs_f32_ratio']:.2f}); decode to bf16 {r['decode_ns_per_value']:.2f} ns/value "
              f"({r['decode_share']:.0%} of the FP8 lookup; torch passes {r['passes_ns_per_value']:.2f})")


def run(args: argparse.Namespace, ckpt: Path, work: Path, spec: engram.TableSpec, comp: engram.Compression) -> dict:
    from engram.release.folder import cached_compression

    cached_compression.cache_clear()       # the first open derives the tokenizer's compression
    start = time.perf_counter()
    engram.open(ckpt, tier="mmap").close()
    first = time.perf_counter() - start
    report: dict = {"spec": spec.to_dict(), "threads": args.threads, "open": {
        "checkpoint_first_ms": first * 1e3,
        "checkpoint_ms": open_time(ckpt, args.repeats) * 1e3,
        "imported_ms": open_time(work / "imported.engram", args.repeats) * 1e3}, "tiers": {}}
    rng = np.random.default_rng(1)
    for tier in args.tiers.split(","):
        tokens = args.direct_tokens if tier == "direct" else args.batch * args.seq
        ids = rng.integers(0, comp.vocab_size, (max(1, tokens // args.seq), min(tokens, args.seq)))
        report["tiers"][tier] = bench_tier(tier, ckpt, work, spec, comp, ids, args.repeats, args.rounds)
    return report


def bench_tier(tier: str, ckpt: Path, work: Path, spec: engram.TableSpec, comp: engram.Compression,
               ids: np.ndarray, repeats: int, rounds: int) -> dict:
    """Tokens/s of the four lookups on one tier, interleaved (`rounds` rounds, best kept), and ratios."""
    prefault = tier == "mmap"
    with engram.open(ckpt, tier=tier, prefault=prefault) as here, \
            engram.open(work / "imported.engram", tier=tier, prefault=prefault) as imp, \
            engram.open(work / "f32.engram", tier=tier, prefault=prefault) as f32:
        assert torch.equal(here.lookup(ids, 1), imp.lookup(ids, 1))
        calls = {"in_place": lambda: here.lookup(ids, 1), "imported": lambda: imp.lookup(ids, 1),
                 "fp8_bf16": lambda: here.lookup(ids, 1, dtype=torch.bfloat16), "float32": lambda: f32.lookup(ids, 1)}
        t = {name: float("inf") for name in calls}
        for _ in range(rounds):
            for name, fn in calls.items():
                t[name] = min(t[name], best_time(fn, repeats))
        rows = engram.NgramHasher(spec, comp).global_rows(ids, 1).reshape(-1)
        stored = here.stored_rows(1, rows)
    values, scales = torch.from_numpy(stored.values), torch.from_numpy(stored.scales)
    out = torch.empty(values.shape, dtype=torch.bfloat16)
    decode_s = best_time(lambda: quant.decode(values, scales, "float8_e4m3", out=out), repeats)
    compiled, fp8.COMPILED = fp8.COMPILED, False                 # the torch passes, for comparison
    try:
        passes_s = best_time(lambda: quant.decode(values, scales, "float8_e4m3", out=out), repeats)
    finally:
        fp8.COMPILED = compiled
    r = {name: ids.size / s for name, s in t.items()}
    r.update(in_place_ratio=t["imported"] / t["in_place"], bf16_vs_f32_ratio=t["float32"] / t["fp8_bf16"],
             decode_share=decode_s / t["fp8_bf16"], tokens=ids.size,
             decode_ns_per_value=decode_s / values.numel() * 1e9, passes_ns_per_value=passes_s / values.numel() * 1e9)
    return r


if __name__ == "__main__":
    main()
