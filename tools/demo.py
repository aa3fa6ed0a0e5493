"""The engram demo: tokenize a sentence with the shipped tokenizer and show the rows it addresses.

    python tools/demo.py ["some text"]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

import engram

TOKENIZER = Path(engram.__file__).parent / "data" / "bpe_bytelevel_4k.tokenizer.json"
TEXT = "Only Alexander the Great could tame the horse Bucephalus."


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    text = argv[0] if argv else TEXT
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    comp = engram.Compression.from_tokenizer_file(TOKENIZER)
    spec = engram.TableSpec(engram_vocab_size=(20_000, 20_000), max_ngram_size=3, n_head_per_ngram=4,
                            n_embed_per_ngram=64, layer_ids=(1, 6),
                            compressed_vocab_size=comp.compressed_vocab_size)
    hasher = engram.NgramHasher(spec, comp)

    encoding = tokenizer.encode(text)
    ids = np.array([encoding.ids])
    print(f"text: {text!r}")
    print(f"compression: {comp.vocab_size} raw ids -> {comp.compressed_vocab_size} canonical ids "
          f"({1 - comp.compressed_vocab_size / comp.vocab_size:.0%} fewer)")
    print(f"{'pos':>3} {'token':>12} {'raw':>5} {'comp':>5}")
    for t, (token, raw, c) in enumerate(zip(encoding.tokens, ids[0], comp(ids)[0], strict=True)):
        print(f"{t:>3} {token!r:>12} {raw:>5} {c:>5}")
    K = spec.n_head_per_ngram
    for layer_id in spec.layer_ids:
        rows = hasher.hash(ids, layer_id)[0]  # [T, H]
        sizes = spec.table_sizes(layer_id)
        print(f"\nlayer {layer_id}: rows addressed per position (head table sizes {sizes})")
        header = "  ".join(f"n={2 + h // K} k={h % K}" for h in range(spec.heads_per_layer))
        print(f"{'pos':>3}  {header}")
        for t in range(rows.shape[0]):
            print(f"{t:>3}  " + "  ".join(f"{r:>9}" for r in rows[t]))

    big = np.random.default_rng(0).integers(0, comp.vocab_size, (8, 4096))
    start = time.perf_counter()
    hasher.hash(big, spec.layer_ids[0])
    seconds = time.perf_counter() - start
    print(f"\nhashed {big.size:,} tokens into {spec.heads_per_layer} heads in {seconds * 1e3:.1f} ms "
          f"({big.size / seconds / 1e6:.1f} M tokens/s)")


if __name__ == "__main__":
    main()
