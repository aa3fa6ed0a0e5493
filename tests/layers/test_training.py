from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import engram
from engram import Compression, InputError, TableSpec
from engram.layers.memory import EngramMemory
from engram.layers.training import param_groups

TOOLS = Path(__file__).resolve().parents[2] / "tools"
SPEC = TableSpec(engram_vocab_size=(101, 103), max_ngram_size=3, n_head_per_ngram=2,
                 n_embed_per_ngram=8, layer_ids=(0, 2), compressed_vocab_size=50)
COMP = Compression.identity(50)


class TwoLayer(nn.Module):
    """A toy model: embedding, two Engram layers, a LayerNorm and a head."""

    def __init__(self, table=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.mems = nn.ModuleList([EngramMemory(SPEC, COMP, layer_id=i, hidden_size=16, table=table)
                                   for i in (0, 2)])
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)                                           # [B, T, C]
        for mem in self.mems:
            x = x + mem(x.unsqueeze(2), ids).squeeze(2)
        return self.head(self.norm(x))                              # [B, T, V]


def by_name(groups):
    return {g["name"]: g for g in groups}


def test_rows_get_their_own_group_at_5x_lr_without_decay():
    model = TwoLayer()
    groups = by_name(param_groups(model, lr=1e-3, weight_decay=0.1))
    assert set(groups) == {"engram_rows", "decay", "no_decay"}
    rows = groups["engram_rows"]
    assert [id(p) for p in rows["params"]] == [id(m.rows) for m in model.mems]
    assert rows["lr"] == pytest.approx(5e-3) and rows["weight_decay"] == 0.0
    assert groups["decay"]["lr"] == 1e-3 and groups["decay"]["weight_decay"] == 0.1
    assert groups["no_decay"]["weight_decay"] == 0.0
    decay = {id(p) for p in groups["decay"]["params"]}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert {id(model.emb.weight), id(model.head.weight), id(model.mems[0].key_proj.weight),
            id(model.mems[0].short_conv.weight)} <= decay
    assert {id(model.head.bias), id(model.norm.weight), id(model.mems[0].key_norm.weight),
            id(model.mems[1].query_norm.weight), id(model.mems[1].short_conv.norm.weight),
            id(model.mems[0].value_proj.bias)} <= no_decay
    every = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())   # each parameter exactly once


def test_decay_norms_and_biases_and_multiplier_options():
    model = TwoLayer()
    groups = by_name(param_groups(model, 2e-4, 0.05, engram_lr_mult=10.0, decay_norms_and_biases=True))
    assert set(groups) == {"engram_rows", "decay"}
    assert groups["engram_rows"]["lr"] == pytest.approx(2e-3)
    assert len(groups["decay"]["params"]) == len(list(model.parameters())) - 2


def test_shared_and_frozen_parameters():
    model = TwoLayer()
    model.head.weight = model.emb.weight        # tied: appears once
    model.norm.requires_grad_(False)            # frozen: left out
    params = [p for g in param_groups(model, lr=1e-3) for p in g["params"]]
    assert len(params) == len({id(p) for p in params})
    assert id(model.norm.weight) not in {id(p) for p in params}
    no_rows = param_groups(nn.Linear(3, 3), lr=1e-3)
    assert [g["name"] for g in no_rows] == ["decay", "no_decay"]


def train(model, steps, ids):
    optimizer = torch.optim.AdamW(engram.param_groups(model, lr=1e-2, weight_decay=0.1))
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_adamw_trains_rows_at_their_rate():
    lr, weight_decay = 1e-2, 0.1
    model = TwoLayer()
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    rows, head = model.mems[0].rows, model.head.weight
    rows_before, head_before = rows.detach().clone(), head.detach().clone()
    optimizer = torch.optim.AdamW(engram.param_groups(model, lr=lr, weight_decay=weight_decay))
    nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    optimizer.step()
    # Adam's first step moves a value by lr * g / (|g| + eps), i.e. by lr wherever |g| >> eps;
    # AdamW first scales the values of a decaying group by (1 - lr * weight_decay).
    touched = rows.grad.abs() > 1e-5
    assert 0 < touched.sum() < touched.numel()
    step = rows_before - rows.detach()
    torch.testing.assert_close(step[touched], 5 * lr * rows.grad[touched].sign(), rtol=1e-3, atol=0)
    assert torch.equal(step[rows.grad == 0], torch.zeros_like(step[rows.grad == 0]))   # no decay of unused rows
    big = head.grad.abs() > 1e-5
    head_step = head_before * (1 - lr * weight_decay) - head.detach()
    torch.testing.assert_close(head_step[big], lr * head.grad[big].sign(), rtol=1e-3, atol=0)


def test_adamw_training_lowers_the_loss():
    model = TwoLayer()
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = train(model, 30, ids)
    assert losses[-1] < losses[0] - 1.0
    assert torch.count_nonzero(model.mems[0].short_conv.weight) > 0   # the conv leaves zero


@pytest.mark.parametrize("tier", ["ram", "mmap", "direct"])
def test_trained_rows_exported_to_a_table_reload_to_identical_outputs(tmp_path, tier):
    model = TwoLayer()
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    train(model, 5, ids)
    engram.build_table(tmp_path / "trained.engram", SPEC, COMP, weights=engram.export_rows(model)).close()
    with engram.open(tmp_path / "trained.engram", tier=tier) as table:
        served = TwoLayer(table=table)
        served.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(".rows")})
        assert not any(k.endswith(".rows") for k in served.state_dict())
        with torch.no_grad():
            assert torch.equal(served(ids), model(ids))


@pytest.mark.parametrize("kwargs, match", [
    (dict(model=object(), lr=1e-3), r"model must be a torch.nn.Module, got object"),
    (dict(lr=-1.0), r"lr=-1.0 is invalid: expected a float >= 0"),
    (dict(lr=1e-3, weight_decay="0.1"), r"weight_decay='0.1' is invalid"),
    (dict(lr=1e-3, engram_lr_mult=True), r"engram_lr_mult=True is invalid"),
])
def test_param_groups_bad_arguments(kwargs, match):
    kwargs = {"model": nn.Linear(2, 2), **kwargs}
    with pytest.raises(InputError, match=match):
        param_groups(**kwargs)


def test_export_rows_by_layer():
    model = TwoLayer()
    rows = engram.export_rows(model)
    assert sorted(rows) == [0, 2]
    assert torch.equal(rows[2], model.mems[1].rows.detach())
    model.mems[1].layer_id = 0
    with pytest.raises(InputError, match=r"two EngramMemory modules read layer_id=0: give each its own"):
        engram.export_rows(model)


def test_example_model_loss_falls_on_repeated_text(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(TOOLS))
    import train_tiny

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    result = train_tiny.main([
        "--data", str(text), "--steps", "12", "--batch-size", "4", "--block-size", "32",
        "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--engram-vocab", "500",
        "--lr", "1e-2", "--warmup", "2", "--eval-batches", "2", "--log-every", "4", "--seed", "3",
        "--engram-layers", "0,1"])
    out = capsys.readouterr().out
    assert "validation loss" in out and "tokens/s" in out and "Engram lookup" in out
    assert result["engram_layers"] == [0, 1] and len(result["loss_curve"]) == 12
    assert result["loss_last"] < result["loss_first"] - 1.0
    assert result["val_loss"] < result["loss_first"]
    assert 0.0 < result["lookup_share"] < 1.0


def test_example_model_serves_exported_rows_from_a_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    from tiny_lm import TinyLM, TinyLMConfig, engram_spec

    comp = Compression.identity(300)
    config = TinyLMConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=16,
                          engram_layers=(0, 1), engram_vocab_size=200)
    torch.manual_seed(0)
    model = TinyLM(config, comp)
    ids = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(engram.param_groups(model, lr=1e-2))
    for _ in range(3):
        optimizer.zero_grad()
        model(ids[:, :-1], ids[:, 1:])[1].backward()
        optimizer.step()
    path = tmp_path / "tiny.engram"
    engram.build_table(path, engram_spec(config, comp), comp, weights=engram.export_rows(model)).close()
    with engram.open(path) as table:
        served = TinyLM(config, comp, table=table)
        served.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(".rows")})
        with torch.no_grad():
            assert torch.equal(served(ids)[0], model(ids)[0])
