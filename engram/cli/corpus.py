"""`engram hash` and `engram stats`: the rows a text addresses, and corpus statistics."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from engram.addressing.compression import load_tokenizer
from engram.addressing.spec import HASH_FAMILIES
from engram.cli.common import (
    Output,
    check_output_file,
    fmt_int,
    spec_and_compression,
)
from engram.errors import SpecError


# -- engram hash -------------------------------------------------------------------------------
def cmd_hash(args: argparse.Namespace) -> Output:
    from engram.addressing.hashing import NgramHasher

    spec, comp = spec_and_compression(args)
    tokenizer = load_tokenizer(args.tokenizer)
    encoding = tokenizer.encode(args.text, add_special_tokens=False)
    ids = np.array([encoding.ids], dtype=np.int64)
    hasher = NgramHasher(spec, comp)
    K = spec.n_head_per_ngram
    layers = {}
    lines = [f"{len(encoding.ids)} tokens: " + " ".join(f"{t!r}" for t in encoding.tokens),
             "raw ids:        " + " ".join(map(str, ids[0])),
             "compressed ids: " + " ".join(map(str, comp(ids)[0]))]
    for layer_id in spec.layer_ids:
        rows = hasher.hash(ids, layer_id)[0]  # [T, H]
        offsets = np.array(spec.head_offsets(layer_id))
        heads = [{"order": 2 + h // K, "head": h % K, "size": spec.table_sizes(layer_id)[h],
                  "rows": rows[:, h].tolist(), "global_rows": (rows[:, h] + offsets[h]).tolist()}
                 for h in range(spec.heads_per_layer)]
        layers[layer_id] = heads
        lines.append(f"\nlayer {layer_id} (row in each head's table; global row = + head offset)")
        for head in heads:
            lines.append(f"  n={head['order']} k={head['head']} (size {head['size']:>9}): "
                         + " ".join(map(str, head["rows"])))
    payload = {"tokens": encoding.tokens, "ids": ids[0].tolist(), "compressed_ids": comp(ids)[0].tolist(),
               "hash": spec.hash, "layers": layers}
    return Output(payload, "\n".join(lines))


# -- engram stats ------------------------------------------------------------------------------
def _plot_coverage(stats: Any, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - matplotlib is in the dev and plot extras
        raise SpecError("--plot needs matplotlib: pip install 'engram[plot]'") from exc
    fig, ax = plt.subplots(figsize=(6, 4))
    for layer_id, (_, lookups) in stats.layer_rows.items():
        share = np.cumsum(lookups) / max(1, lookups.sum())
        ax.plot(np.arange(1, share.size + 1), share, label=f"layer {layer_id}")
    ax.set_xscale("log")
    ax.set_xlabel("rows, most used first")
    ax.set_ylabel("share of lookups served")
    ax.set_title(f"row coverage over {stats.tokens:,} tokens ({stats.spec.hash})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_stats(args: argparse.Namespace) -> Output:
    from engram.making.corpus import corpus_stats, tokenize_files

    check_output_file("--hot-rows", args.hot_rows, "hot_rows.npz")
    check_output_file("--plot", args.plot, "coverage.png")
    spec, comp = spec_and_compression(args)
    sequences = tokenize_files(args.corpus, args.tokenizer, progress=None if not args.json else False)
    families = HASH_FAMILIES if args.all_families else None
    stats = corpus_stats(sequences, spec, comp, families=families)
    payload = stats.to_dict()
    if args.hot_rows:
        stats.hot_row_plan().save(args.hot_rows)
        payload["hot_rows_file"] = args.hot_rows
    if args.plot:
        _plot_coverage(stats, args.plot)
        payload["plot_file"] = args.plot
    lines = [f"{fmt_int(payload['tokens'])} tokens in {len(args.corpus)} file(s)"]
    for n, o in payload["orders"].items():
        lines.append(f"  order {n}: {fmt_int(o['distinct'])} distinct n-grams, Zipf exponent "
                     f"{o['zipf_exponent']:.3f}")
    for layer_id, layer in payload["layers"].items():
        cov = ", ".join(f"{level:.0%}: {fmt_int(rows)}" for level, rows in layer["coverage"].items())
        lines.append(f"layer {layer_id}: {fmt_int(layer['rows_touched'])} of {fmt_int(layer['rows'])} rows "
                     f"touched; rows serving {cov} of lookups")
        for family, fam in layer["families"].items():
            touched = np.mean([h["share_touched"] for h in fam["heads"]])
            lines.append(f"  {family:18s} collision rate {fam['collision_rate']:.4f}, "
                         f"mean share of head rows touched {touched:.4f}")
    if args.hot_rows:
        lines.append(f"hot-row plan written to {args.hot_rows}")
    if args.plot:
        lines.append(f"coverage plot written to {args.plot}")
    return Output(payload, "\n".join(lines))


