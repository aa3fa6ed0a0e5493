"""tools/make_release.py: a synthetic folder in the release layout that engram serves in place."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import engram

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import make_release  # noqa: E402


def test_the_folder_serves_in_place_and_loads_the_v41_layer(tmp_path, capsys):
    path = tmp_path / "V4.1-tiny"
    out = make_release.main([str(path), "--naming", "hf", "--layers", "2,5", "--json"])
    assert out["written"] and sorted(p.name for p in path.iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json"]
    spec = engram.TableSpec.from_hf_config(path)
    assert engram.TableSpec.from_dict(out["spec"]) == spec and spec.layer_ids == (2, 5)
    ids = np.random.default_rng(0).integers(0, 4000, (2, 9))
    with engram.open(path, tier="mmap") as table:
        table.verify()
        rows = table.lookup(ids, 5)                                           # [B, T, E], decoded FP8
        assert rows.shape == (2, 9, spec.embed_dim) and rows.abs().sum() > 0
        mem = engram.EngramMemoryV41.from_checkpoint(path, layer_id=5, table=table)
        h = torch.randn(2, 9, 4, 32, dtype=torch.bfloat16)
        assert mem(h, ids).shape == (2, 9, 4, 32)


def test_dry_run_writes_nothing_and_an_existing_folder_is_kept(tmp_path, capsys):
    path = tmp_path / "V4.1-tiny"
    assert not make_release.main([str(path), "--dry-run"])["written"] and not path.exists()
    make_release.main([str(path), "--no-index"])
    assert not (path / "model.safetensors.index.json").exists()
    with pytest.raises(engram.TableExistsError, match="already exists: pass overwrite=True"):
        make_release.main([str(path)])
    make_release.main([str(path), "--overwrite", "--seed", "8"])
    assert (path / "model.safetensors.index.json").exists()
