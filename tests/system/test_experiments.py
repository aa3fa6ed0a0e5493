from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engram import Compression

TOOLS = Path(__file__).resolve().parents[2] / "tools"
COMP = Compression.identity(300)


@pytest.fixture()
def tools(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    import experiments
    import tiny_lm

    return experiments, tiny_lm


def base_config(tiny_lm, **kwargs):
    return tiny_lm.TinyLMConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32,
                                engram_layers=(), n_embed_per_ngram=16, **kwargs)


def total_params(experiments, tiny_lm, config):
    torch.manual_seed(0)
    counts = experiments.count_params(tiny_lm.TinyLM(config, COMP if config.engram_layers else None))
    return counts["dense"] + counts["engram_rows"], counts


def test_widen_ffn_and_with_engram_add_the_requested_parameters(tools):
    experiments, tiny_lm = tools
    base = base_config(tiny_lm)
    n0, _ = total_params(experiments, tiny_lm, base)
    for extra in (20_000, 150_000):
        wide, _ = total_params(experiments, tiny_lm, experiments.widen_ffn(base, extra))
        mem, counts = total_params(experiments, tiny_lm, experiments.with_engram(base, extra))
        assert wide - n0 == pytest.approx(extra, rel=0.01)
        assert mem - n0 == pytest.approx(extra, rel=0.01)
        assert counts["engram_rows"] > 0.8 * extra


def test_allocate_keeps_the_total_and_splits_by_share(tools):
    experiments, tiny_lm = tools
    base = base_config(tiny_lm)
    sparse = 200_000
    per_expert = base.n_layer * (experiments.mlp_params(base, 32) + base.n_embd)    # expert + router column
    active, _ = total_params(experiments, tiny_lm, experiments.allocate(base, 0, 0.0, expert_hidden=32))
    for share in (0.0, 0.2, 0.5, 0.8, 1.0):
        config = experiments.allocate(base, sparse, share, expert_hidden=32, top_k=2)
        total, counts = total_params(experiments, tiny_lm, config)
        assert config.expert_top_k == 2 and config.ffn_hidden == 32
        assert total - active == pytest.approx(sparse, rel=0.01)
        engram_part = total - active - (config.n_expert - 2) * per_expert
        assert engram_part / sparse == pytest.approx(share, abs=per_expert / sparse)
        assert (counts["engram_rows"] > 0) == (share > 0)
    with pytest.raises(ValueError, match=r"engram_share=1.5 must be in \[0, 1\]"):
        experiments.allocate(base, sparse, 1.5, expert_hidden=32)


def test_active_params_and_flops(tools):
    experiments, tiny_lm = tools
    dense = base_config(tiny_lm)
    C, V, L = dense.n_embd, dense.vocab_size, dense.n_layer
    _, counts = total_params(experiments, tiny_lm, dense)
    assert counts["active"] == L * (4 * C * C + 8 * C * C) + V * C     # attention, MLP, output head
    moe = dataclasses.replace(dense, n_expert=4, expert_top_k=1, ffn_hidden=4 * C)
    _, moe_counts = total_params(experiments, tiny_lm, moe)
    assert moe_counts["active"] == counts["active"] + L * 4 * C       # one expert plus the router
    assert moe_counts["dense"] > counts["dense"] + 2 * L * 8 * C * C
    assert experiments.train_flops(dense, 1000, tokens=10) == 6 * 10 * (1000 + L * 16 * C)


def test_moe_matches_a_per_token_reference(tools):
    _, tiny_lm = tools
    torch.manual_seed(0)
    moe = tiny_lm.MoE(base_config(tiny_lm, n_expert=5, expert_top_k=2, ffn_hidden=8))
    x = torch.randn(3, 7, 32)
    y = moe(x)
    flat = x.reshape(-1, 32)
    probs = moe.router(flat).softmax(-1)
    expected = []
    for t in range(flat.shape[0]):
        w, e = probs[t].topk(2)
        expected.append(sum(wi / w.sum() * moe.experts[ei](flat[t]) for wi, ei in zip(w, e.tolist(), strict=True)))
    torch.testing.assert_close(y.reshape(-1, 32), torch.stack(expected))
    assert 0.5 < moe.aux_loss.item() < 2.0      # E * sum_e f_e P_e: 1 for an even load
    y.sum().backward()
    assert all(p.grad is not None for p in moe.experts[0].parameters())


def test_train_variant_returns_finite_metrics(tools):
    experiments, tiny_lm = tools
    rng = np.random.default_rng(0)
    text = np.tile(rng.integers(0, 300, 50), 40)
    corpus = experiments.Corpus(train=text[:1600], val=text[1600:], comp=COMP)
    budget = experiments.Budget(steps=6, batch_size=4, warmup=2, eval_batches=2)
    config = experiments.allocate(base_config(tiny_lm), 30_000, 0.5, expert_hidden=16)
    result = experiments.train_variant("tiny", config, corpus, budget)
    assert result["name"] == "tiny" and len(result["loss_curve"]) == 6
    assert result["tokens"] == 6 * 4 * 16 and result["params_engram_rows"] > 0
    for key in ("val_loss", "train_loss", "flops", "wall_s", "tokens_per_s"):
        assert math.isfinite(result[key]) and result[key] > 0
    assert result["flops"] == experiments.train_flops(config, result["params_active"], result["tokens"])


def test_throughput_measures_every_config(tools):
    experiments, tiny_lm = tools
    corpus = experiments.Corpus(train=np.arange(2000) % 300, val=np.arange(500) % 300, comp=COMP)
    configs = {"dense": base_config(tiny_lm), "engram": experiments.with_engram(base_config(tiny_lm), 20_000)}
    speeds = experiments.throughput(configs, corpus, experiments.Budget(batch_size=2), steps=1, rounds=1)
    assert set(speeds) == set(configs) and all(v > 0 for v in speeds.values())
