"""A small synthetic DeepSeek-V4.1 checkpoint folder in the exact release layout, to try in-place serving.

    engram.release.synthetic.write_release("V4.1-tiny")          # or: python tools/make_release.py V4.1-tiny
    table = engram.open("V4.1-tiny")                              # rows served in place, nothing copied
    mem = engram.EngramMemoryV41.from_checkpoint("V4.1-tiny", layer_id=1, table=table)

What the release holds, at a size of a few MiB: `config.json` with the Engram fields under
"text_config" (`engram.addressing.hf_config`), `tokenizer.json` (engram's 4k-id test tokenizer),
one safetensors shard per Engram layer (`model-0000i-of-0000n.safetensors`, each layer's tensors
after a BF16 tensor of an odd size, so no tensor starts on a page) and their index
`model.safetensors.index.json`; per layer the rows `layers.L.engram.embed.weight` (F8_E4M3,
[rows, D]) with `embed.scale` (F8_E8M0, one per 32 values), the fused projection `wkv.weight`
(F8_E4M3, [C*(G+1), E]) with its 32x32-block scales `wkv.scale`, and `q_weight` / `k_weight`
(BF16, [G, C]). `naming="hf"` writes the Hugging Face names instead: a "model." prefix and
`wkv.weight_scale_inv`. The values are seeded random codes (no NaN codes; scales near 1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.addressing.compression import Compression
from engram.addressing.spec import TableSpec
from engram.errors import InputError
from engram.storage.publish import fsync_tree, partial_dir, publish

__all__ = ["SyntheticRelease", "write_release", "TOKENIZER"]

TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "bpe_bytelevel_4k.tokenizer.json"
NAMINGS = ("release", "hf")


@dataclasses.dataclass
class SyntheticRelease:
    """What `write_release` wrote: the folder, its config and spec, and every tensor's contents.

    `rows[layer] = (values uint8 [rows, D], scales uint8 [rows, D/32])`, `wkv[layer] = (values,
    scales)` as stored; `q[layer]`, `k[layer]` bf16 [G, C]; `names[tensor name] = shard file`.
    """

    path: Path
    config: dict[str, Any]
    spec: TableSpec
    comp: Compression
    rows: dict[int, tuple[np.ndarray, np.ndarray]]
    wkv: dict[int, tuple[np.ndarray, np.ndarray]]
    q: dict[int, torch.Tensor]
    k: dict[int, torch.Tensor]
    names: dict[str, str]


def release_spec(comp: Compression, layer_ids: tuple[int, ...], max_ngram_size: int, n_heads: int, head_dim: int,
                 vocab_base: int) -> TableSpec:
    """The spec of the folder's rows: FP8 E4M3 with E8M0 scales, every order on one base size."""
    return TableSpec(engram_vocab_size=(vocab_base,) * (max_ngram_size - 1), max_ngram_size=max_ngram_size,
                     n_head_per_ngram=n_heads, n_embed_per_ngram=n_heads * head_dim, layer_ids=layer_ids, pad_id=2,
                     compressed_vocab_size=comp.compressed_vocab_size, dtype="float8_e4m3")


def _codes(rng: np.random.Generator, shape: tuple[int, ...], nan_free: int) -> np.ndarray:
    values = rng.integers(0, 256, shape, dtype=np.uint8)
    values[(values & 0x7F) == 0x7F] = nan_free                  # 0x7F / 0xFF are E4M3's NaN codes
    return values


def write_release(path: str | os.PathLike[str], *, naming: str = "release", index: bool = True,
                  layer_ids: tuple[int, ...] = (1, 14), max_ngram_size: int = 3, n_heads: int = 2,
                  head_dim: int = 256, vocab_base: int = 101, hidden_size: int = 32, hc_mult: int = 4,
                  seed: int = 7, overwrite: bool = False) -> SyntheticRelease:
    """Write a synthetic checkpoint folder in the release layout at `path` (atomically: all or nothing).

    Args:
        path: the folder to create.
        naming: "release" (DeepSeek's tensor names) or "hf" (a "model." prefix, `wkv.weight_scale_inv`).
        index: write `model.safetensors.index.json` (the release has one).
        layer_ids, max_ngram_size, n_heads, head_dim, vocab_base: the Engram fields (head_dim a
            multiple of 32: one E8M0 scale per 32 values); hidden_size, hc_mult: C and G.
        seed: of the random codes.
        overwrite: replace an existing folder at `path`.

    Returns:
        A SyntheticRelease with what was written.

    Raises:
        InputError: an unknown naming, head_dim or hidden_size not a multiple of 32.
        TableExistsError: `path` exists and overwrite is False.
    """
    from safetensors.torch import save_file

    if naming not in NAMINGS:
        raise InputError(f"naming={naming!r} is invalid: expected one of {NAMINGS}")
    for name, value in (("head_dim", head_dim), ("hidden_size", hidden_size)):
        if value % 32:
            raise InputError(f"{name}={value} is invalid: the release's scales cover 32 values each; pass a multiple "
                             "of 32")
    comp = Compression.from_tokenizer_file(TOKENIZER)
    spec = release_spec(comp, tuple(layer_ids), max_ngram_size, n_heads, head_dim, vocab_base)
    G, C, D, E = hc_mult, hidden_size, head_dim, spec.embed_dim
    text = {"engram_layer_ids": list(spec.layer_ids), "engram_max_ngram_size": max_ngram_size,
            "engram_n_heads": n_heads, "engram_head_dim": D, "engram_vocab_size": vocab_base,
            "engram_pad_token_id": spec.pad_id, "engram_compressed_vocab_size": comp.compressed_vocab_size,
            "hidden_size": C, "hc_mult": G, "rms_norm_eps": 1e-6,
            "engram_num_embeddings": [spec.rows(lid) for lid in spec.layer_ids]}
    config = {"architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41", "text_config": text}
    out = SyntheticRelease(Path(path), config, spec, comp, {}, {}, {}, {}, {})
    rng = np.random.default_rng(seed)
    prefix = "model." if naming == "hf" else ""
    wkv_scale = "wkv.weight_scale_inv" if naming == "hf" else "wkv.scale"
    n = len(spec.layer_ids)
    with partial_dir(path) as tmp:
        shutil.copy(TOKENIZER, tmp / "tokenizer.json")
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        for shard, layer in enumerate(spec.layer_ids, start=1):
            values = _codes(rng, (spec.rows(layer), D), 0x3F)
            scales = rng.integers(118, 130, (spec.rows(layer), D // 32), dtype=np.uint8)
            wkv, wkv_s = _codes(rng, (C * (G + 1), E), 0x30), rng.integers(120, 128, (C * (G + 1) // 32, E // 32),
                                                                            dtype=np.uint8)
            q = (torch.from_numpy(rng.standard_normal((G, C))).float() * 0.5 + 1).bfloat16()
            k = (torch.from_numpy(rng.standard_normal((G, C))).float() * 0.5 + 1).bfloat16()
            out.rows[layer], out.wkv[layer], out.q[layer], out.k[layer] = (values, scales), (wkv, wkv_s), q, k
            name = f"{prefix}layers.{layer}.engram."
            tensors = {
                f"{prefix}layers.{layer}.attn.wq.weight": torch.ones(3, 5, dtype=torch.bfloat16),
                name + "embed.weight": torch.from_numpy(values).view(torch.float8_e4m3fn),
                name + "embed.scale": torch.from_numpy(scales).view(torch.float8_e8m0fnu),
                name + "wkv.weight": torch.from_numpy(wkv).view(torch.float8_e4m3fn),
                name + wkv_scale: torch.from_numpy(wkv_s).view(torch.float8_e8m0fnu),
                name + "q_weight": q, name + "k_weight": k,
            }
            file = f"model-{shard:05d}-of-{n:05d}.safetensors"
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            out.names.update(dict.fromkeys(tensors, file))
        if index:
            doc = {"metadata": {"total_size": 0}, "weight_map": out.names}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(doc, indent=1))
        fsync_tree(tmp)
        publish(tmp, path, overwrite)
    return out
