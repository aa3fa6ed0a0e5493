"""Hashing throughput: engram's NgramHasher against the straightforward numpy reference algorithm.

Both run in this process on one thread over the same ids (B=8, T=4096, N=3, K=8 by default, the
reference's default table sizes). Reports tokens/s per family and engram's speed-up over the
reference; the reference and engram results are checked equal first.

    python tools/bench_hash.py [--batch 8 --seq 4096 --repeats 30 --json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import engram
from engram.cli.bench import best_time, reference_hash


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--max-ngram", type=int, default=3)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=129280)
    parser.add_argument("--base-size", type=int, default=646400)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    try:  # one thread for every library that could use more
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    comp = engram.Compression.identity(args.vocab)
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq))
    tokens = ids.size
    results: dict = {"batch": args.batch, "seq": args.seq, "max_ngram": args.max_ngram, "heads": args.heads,
                     "threads": 1, "families": {}}
    for family in engram.addressing.spec.HASH_FAMILIES:
        spec = engram.TableSpec(
            engram_vocab_size=(args.base_size,) * (args.max_ngram - 1), max_ngram_size=args.max_ngram,
            n_head_per_ngram=args.heads, n_embed_per_ngram=args.heads, layer_ids=(1,),
            compressed_vocab_size=comp.compressed_vocab_size, hash=family)
        hasher = engram.NgramHasher(spec, comp)
        seconds = best_time(lambda hasher=hasher: hasher.hash(ids, 1), args.repeats)
        entry = {"tokens_per_s": tokens / seconds}
        if family == "multiplicative-xor":
            sizes = [list(spec.table_sizes(1)[i: i + args.heads])
                     for i in range(0, spec.heads_per_layer, args.heads)]
            mult, pad = hasher.multipliers(1), int(comp.lookup[spec.pad_id])

            def ref(mult=mult, sizes=sizes, pad=pad):
                return reference_hash(comp(ids), mult, sizes, pad)

            np.testing.assert_array_equal(ref(), hasher.hash(ids, 1))
            ref_seconds = best_time(ref, args.repeats)
            results["reference_tokens_per_s"] = tokens / ref_seconds
            entry["speedup_vs_reference"] = ref_seconds / seconds
        results["families"][family] = entry

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"hashing B={args.batch} T={args.seq} N={args.max_ngram} K={args.heads}, one thread")
        print(f"  {'numpy reference':20s} {results['reference_tokens_per_s'] / 1e6:7.2f} M tokens/s")
        for family, entry in results["families"].items():
            extra = f"  ({entry['speedup_vs_reference']:.2f}x the reference)" if "speedup_vs_reference" in entry else ""
            print(f"  {family:20s} {entry['tokens_per_s'] / 1e6:7.2f} M tokens/s{extra}")
    return results


if __name__ == "__main__":
    main()
