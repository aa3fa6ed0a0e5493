"""`engram inspect` on a DeepSeek-V4.1 checkpoint directory: its Engram tensors and where the rows can live."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from engram.cli.common import Output, fmt_int, human_bytes


def _tensor(t: Any) -> dict[str, Any]:
    return {"name": t.name, "file": t.file, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset,
            "bytes": t.nbytes}


def cmd_inspect_checkpoint(args: argparse.Namespace) -> Output:
    from engram.release.folder import read_release
    from engram.serving.placement import memory_info, placement, random_reads

    release = read_release(args.path)
    spec = release.spec
    layers: dict[int, Any] = {}
    for lid, layer in release.layers.items():
        tensors = [_tensor(layer.values), _tensor(layer.scales)]
        tensors += [_tensor(t) for name, t in sorted(release.tensors.items())
                    if name.startswith(f"layers.{lid}.engram.") and t not in (layer.values, layer.scales)]
        layers[lid] = {"rows": spec.rows(lid), "bytes": spec.layer_bytes(lid), "tensors": tensors}
    reads = None
    if args.probe_reads:
        first = release.layers[spec.layer_ids[0]].values
        reads = random_reads(os.path.join(args.path, first.file), first.offset, first.nbytes, reads=args.probe_reads)
    where = placement(spec.total_bytes, spec.heads_per_layer * len(spec.layer_ids), memory_info(), reads)
    payload = {"path": args.path, "kind": "deepseek-v4.1 checkpoint", "naming": release.prefix or "release",
               "spec": spec.to_dict(), "bytes": spec.total_bytes, "layers": layers, "placement": where,
               "disk_probe": reads}
    lines = [f"{args.path}: DeepSeek-V4.1 checkpoint, rows served in place (engram.open(path, tier=...))",
             f"  {len(layers)} Engram layer(s), {spec.heads_per_layer} heads of D={spec.head_dim} FP8 E4M3 values + "
             f"{spec.scales_per_row} E8M0 scales per row ({spec.stored_row_bytes} B); compressed vocabulary "
             f"{fmt_int(spec.compressed_vocab_size)}, pad_id {spec.pad_id}",
             f"  spec (what config.json implies; `--spec {os.path.join(args.path, 'config.json')}` reads it): "
             f"{json.dumps(spec.to_dict())}"]
    for lid, e in layers.items():
        lines.append(f"  layer {lid}: {fmt_int(e['rows'])} rows, {human_bytes(e['bytes'])}")
        for t in e["tensors"]:
            lines.append(f"    {t['name']}  {t['dtype']} {t['shape']}  in {t['file']} at byte "
                         f"{fmt_int(t['offset'])} ({human_bytes(t['bytes'])})")
    ram, shm = human_bytes(where["ram_available"]), human_bytes(where["shm_free"])
    lines.append(f"  this machine: {ram} RAM available, {shm} free in /dev/shm")
    lines.append(f"    in RAM (tier 'ram'): {'yes' if where['fits_in_ram'] else 'no'} "
                 f"({human_bytes(spec.total_bytes)} of rows, with a quarter of RAM to spare)")
    lines.append(f"    in /dev/shm (tier 'mmap' over a copy there): {'yes' if where['fits_in_shm'] else 'no'}")
    lines.append(f"    page cache (tier 'mmap'): {where['page_cache_share']:.0%} of the rows can stay cached")
    if reads is not None:
        how = "O_DIRECT" if reads["o_direct"] else "through the page cache (no O_DIRECT here: may be warm)"
        lines.append(f"    direct reads (tier 'direct'): {fmt_int(round(reads['reads_per_s']))} random 4 KiB reads/s "
                     f"at {reads['in_flight']} in flight ({fmt_int(round(reads['reads_per_s_qd1']))}/s at 1), "
                     f"{how}: up to {fmt_int(round(where['cold_tokens_per_s']))} cold tokens/s at "
                     f"{where['rows_per_token']} rows/token before dedup and the hot-row cache")
    lines.append(f"  suggested tier: {where['suggested_tier']!r}")
    return Output(payload, "\n".join(lines))
