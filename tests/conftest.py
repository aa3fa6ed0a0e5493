"""Shared test fixtures and hypothesis profiles."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("default", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="session")
def golden():
    """Load a golden JSON file by stem: golden("hash_deepseek_default")."""

    def load(stem: str) -> dict:
        with open(GOLDEN / f"{stem}.json") as f:
            return json.load(f)

    return load


@pytest.fixture
def disk_full_at_third_chunk(monkeypatch):
    """Table writes fail with ENOSPC at their third chunk file (a build or conversion mid-way)."""
    from engram.storage import chunks

    real, calls = chunks.write_chunk, []

    def failing(path, block, bar):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(path, block, bar)

    monkeypatch.setattr(chunks, "write_chunk", failing)


@pytest.fixture
def v41_release(tmp_path):
    """Write a tiny DeepSeek-V4.1 checkpoint directory in the release layout and return what it holds.

    `v41_release(naming="release" | "hf", index=True)` -> SimpleNamespace(path, config, spec, comp,
    rows={layer: (values uint8 [rows, D], scales uint8 [rows, D/32])}, wkv={layer: (values, scales)},
    q={layer: bf16 [G, C]}, k={layer: bf16 [G, C]}, names). Layer 1's Engram tensors are in shard 1,
    layer 14's in shard 2, each after a BF16 tensor of an odd size (so no tensor starts on a page);
    D = 256 with one E8M0 scale per 32 values, as released; `naming="hf"` prefixes "model." and
    names the wkv scale "wkv.weight_scale_inv".
    """
    import shutil
    from types import SimpleNamespace

    import numpy as np
    import torch
    from safetensors.torch import save_file

    import engram

    tokenizer = Path(__file__).parent / "golden" / "bpe_bytelevel_4k.tokenizer.json"
    comp = engram.Compression.from_tokenizer_file(tokenizer)
    G, C, N, K, D = 4, 32, 3, 2, 256

    def make(naming: str = "release", index: bool = True, root: Path | None = None):
        root = tmp_path / f"V4.1-{naming}-{index}" if root is None else root
        root.mkdir()
        shutil.copy(tokenizer, root / "tokenizer.json")
        text = {"engram_layer_ids": [1, 14], "engram_max_ngram_size": N, "engram_n_heads": K,
                "engram_head_dim": D, "engram_vocab_size": 101, "engram_pad_token_id": 2,
                "engram_compressed_vocab_size": comp.compressed_vocab_size, "hidden_size": C, "hc_mult": G,
                "rms_norm_eps": 1e-6, "engram_num_embeddings": [0, 0]}
        spec = engram.TableSpec(engram_vocab_size=(101,) * (N - 1), max_ngram_size=N, n_head_per_ngram=K,
                                n_embed_per_ngram=K * D, layer_ids=(1, 14), pad_id=2,
                                compressed_vocab_size=comp.compressed_vocab_size, dtype="float8_e4m3")
        text["engram_num_embeddings"] = [spec.rows(1), spec.rows(14)]
        config = {"architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41", "text_config": text}
        (root / "config.json").write_text(json.dumps(config, indent=1))
        rng = np.random.default_rng(7)
        prefix = "model." if naming == "hf" else ""
        wkv_scale = "wkv.weight_scale_inv" if naming == "hf" else "wkv.scale"
        out = SimpleNamespace(path=root, config=config, spec=spec, comp=comp, rows={}, wkv={}, q={}, k={}, names={})
        shards = {}
        for shard, layer in enumerate((1, 14), start=1):
            values = rng.integers(0, 256, (spec.rows(layer), D), dtype=np.uint8)
            values[(values & 0x7F) == 0x7F] = 0x3F                    # no NaN codes
            scales = rng.integers(118, 130, (spec.rows(layer), D // 32), dtype=np.uint8)
            E = spec.embed_dim
            wkv = rng.integers(0, 256, (C * (G + 1), E), dtype=np.uint8)
            wkv[(wkv & 0x7F) == 0x7F] = 0x30
            wkv_s = rng.integers(120, 128, (C * (G + 1) // 32, E // 32), dtype=np.uint8)
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
            file = f"model-0000{shard}-of-00002.safetensors"
            save_file(tensors, str(root / file), metadata={"format": "pt"})
            shards[file] = list(tensors)
        out.names = {name: file for file, names in shards.items() for name in names}
        if index:
            doc = {"metadata": {"total_size": 0}, "weight_map": out.names}
            (root / "model.safetensors.index.json").write_text(json.dumps(doc, indent=1))
        return out

    return make
