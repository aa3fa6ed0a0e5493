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

    `v41_release(naming="release" | "hf", index=True, root=None)` -> the `SyntheticRelease` of
    `engram.release.synthetic.write_release` (path, config, spec, comp, rows, wkv, q, k, names):
    G=4, C=32, N=3, K=2, D=256, layers 1 and 14, each in its own shard.
    """
    from engram.release.synthetic import write_release

    def make(naming: str = "release", index: bool = True, root: Path | None = None):
        root = tmp_path / f"V4.1-{naming}-{index}" if root is None else root
        return write_release(root, naming=naming, index=index)

    return make


@pytest.fixture(params=["batched", "compiled"])
def lookup_path(request, monkeypatch):
    """Run a test twice: table lookups on the batched path only, then on the compiled path of
    small lookups (engram.serving.decode_step) wherever it applies, whatever their size (skipped
    without numba). Both must give the same rows and counters."""
    from engram.serving import compiled, decode_step

    if request.param == "compiled" and not compiled.COMPILED:
        pytest.skip("the compiled path needs numba (the 'fast' extra)")
    monkeypatch.setattr(decode_step, "SMALL_LOOKUP_TOKENS", 1 << 62 if request.param == "compiled" else 0)
    return request.param
