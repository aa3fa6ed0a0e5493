"""Write a small synthetic DeepSeek-V4.1 checkpoint folder in the exact release layout.

    python tools/make_release.py V4.1-tiny [--naming hf] [--no-index] [--layers 1,14] [--json]

The folder holds config.json, tokenizer.json, one safetensors shard per Engram layer and their
index, with FP8 E4M3 rows and E8M0 scales, `wkv` (+ scales), `q_weight` and `k_weight`: every name,
dtype and layout as released, at a few MiB (see `engram.release.synthetic`). Try in-place serving on
it before downloading the real one:

    table = engram.open("V4.1-tiny")
    mem = engram.EngramMemoryV41.from_checkpoint("V4.1-tiny", layer_id=1, table=table)
    engram inspect V4.1-tiny          # and: engram import ... --spec V4.1-tiny/config.json
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from engram.release.synthetic import NAMINGS, TOKENIZER, release_spec, write_release


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("path", help="folder to create")
    parser.add_argument("--naming", choices=NAMINGS, default="release",
                        help="tensor names as released, or as Hugging Face saves them ('model.' prefix)")
    parser.add_argument("--no-index", action="store_true", help="leave out model.safetensors.index.json")
    parser.add_argument("--layers", default="1,14", help="Engram layer ids")
    parser.add_argument("--ngram", type=int, default=3, help="engram_max_ngram_size (N)")
    parser.add_argument("--heads", type=int, default=2, help="engram_n_heads (K)")
    parser.add_argument("--head-dim", type=int, default=256, help="engram_head_dim (D), a multiple of 32")
    parser.add_argument("--vocab-base", type=int, default=101, help="engram_vocab_size (rows per head ~ this)")
    parser.add_argument("--hidden", type=int, default=32, help="hidden_size (C), a multiple of 32")
    parser.add_argument("--hc-mult", type=int, default=4, help="hc_mult (G)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the random codes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder at PATH")
    parser.add_argument("--dry-run", action="store_true", help="print the spec and sizes; write nothing")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    fields = dict(layer_ids=tuple(int(i) for i in args.layers.split(",") if i), max_ngram_size=args.ngram,
                  n_heads=args.heads, head_dim=args.head_dim, vocab_base=args.vocab_base)
    if args.dry_run:
        from engram.addressing.compression import Compression

        spec = release_spec(Compression.from_tokenizer_file(TOKENIZER), **fields)
        written = False
    else:
        spec = write_release(args.path, naming=args.naming, index=not args.no_index, hidden_size=args.hidden,
                             hc_mult=args.hc_mult, seed=args.seed, overwrite=args.overwrite, **fields).spec
        written = True
    result = {"path": args.path, "written": written, "spec": spec.to_dict(), "row_bytes": spec.total_bytes,
              "rows": {lid: spec.rows(lid) for lid in spec.layer_ids}}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        what = "wrote" if written else "would write"
        print(f"{what} {args.path}: a DeepSeek-V4.1 checkpoint folder in the release layout, "
              f"{len(spec.layer_ids)} Engram layer(s) of {spec.heads_per_layer} heads, {spec.total_bytes:,} bytes "
              f"of FP8 rows + scales; try engram.open({args.path!r}) and `engram inspect {args.path}`")
    return result


if __name__ == "__main__":
    main()
