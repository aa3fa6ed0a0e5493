"""Engram layers in a transformers causal LM (a tiny LlamaForCausalLM built from a config, no
download): `generate()` with caches gives the tokens of decoding without a cache (use_cache=False,
the whole sequence recomputed every step) in every decoding mode, and the misuses are refused."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

import engram

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

V, EOS, PAD = 48, 3, 0
CACHE = "cache" if "cache" in inspect.signature(transformers.LlamaModel.forward).parameters else "past_key_values"
COMP = engram.Compression.identity(V)
SPEC = engram.TableSpec(engram_vocab_size=(97, 97), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=16,
                        layer_ids=(0, 2), compressed_vocab_size=V)


def llama(seed: int = 0, layers: int = 3, hidden: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, eos_token_id=EOS, pad_token_id=PAD,
                                      bos_token_id=1)
    return transformers.LlamaForCausalLM(config).eval()


def with_engram(seed: int = 0, table=None, **kw) -> torch.nn.Module:
    from engram.integrations.transformers import add_engram

    model = llama(seed)
    torch.manual_seed(seed + 1)
    kw = {"spec": SPEC, "compression": COMP} if table is None else {}
    add_engram(model, table, at_layers=(0, 2), init_std=1.0, **kw)
    for layer in (model.model.layers[0], model.model.layers[2]):
        torch.nn.init.normal_(layer.engram.short_conv.weight, std=0.5)     # a ShortConv that carries state
    return model


def prompt(B: int = 1, T: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, V, (B, T), generator=torch.Generator().manual_seed(seed))


def both(model, seed: int = 0, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """generate() with caches, and the same without a cache (every step the whole sequence)."""
    out = []
    for use_cache in (True, False):
        torch.manual_seed(seed)
        with torch.no_grad():
            out.append(model.generate(use_cache=use_cache, pad_token_id=PAD, **kw))
    return out[0], out[1]


def test_greedy_equals_recompute_and_the_engram_branch_matters():
    model = with_engram()
    ids = prompt()
    cached, full = both(model, input_ids=ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(cached, full) and cached.shape == (1, 18)
    with torch.no_grad():
        plain = llama().generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    assert not torch.equal(plain, cached)                       # the Engram layers change what is generated


def test_sampling_with_a_seed_equals_recompute():
    model = with_engram(seed=1)
    cached, full = both(model, seed=5, input_ids=prompt(2, 5, seed=1), max_new_tokens=10, do_sample=True,
                        top_k=0, num_return_sequences=2)
    assert torch.equal(cached, full) and cached.shape == (4, 15)


def test_beam_search_with_sequences_of_different_lengths_equals_recompute():
    model = with_engram(seed=5)
    cached, full = both(model, input_ids=prompt(2, 4, seed=5), max_new_tokens=10, num_beams=3,
                        num_return_sequences=3, do_sample=False)
    assert torch.equal(cached, full)
    finished = (cached[:, 4:] == EOS).any(dim=1)
    assert finished.any() and not finished.all()               # some beams ended early: lengths differ


def test_left_padded_batch_equals_recompute_and_each_sequence_alone():
    model = with_engram(seed=3)
    ids = prompt(2, 7, seed=3)
    ids[1, :3] = PAD
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    cached, full = both(model, input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(cached, full)
    alone, _ = both(model, input_ids=ids[1:, 3:], max_new_tokens=8, do_sample=False)
    assert torch.equal(cached[1, 3:], alone[0])               # padding is not part of the sequence


def test_assisted_decoding_with_a_draft_model_equals_greedy_recompute():
    model, draft = with_engram(seed=4), llama(seed=9, layers=1, hidden=16)
    ids = prompt(1, 5, seed=4)
    with torch.no_grad():
        assisted = model.generate(input_ids=ids, assistant_model=draft, max_new_tokens=14, do_sample=False,
                                  num_assistant_tokens=4, pad_token_id=PAD)
    _, full = both(model, input_ids=ids, max_new_tokens=14, do_sample=False)
    assert torch.equal(assisted, full)


def test_rows_from_a_table_equal_the_same_rows_in_the_module(tmp_path, lookup_path):
    model = with_engram(seed=5)
    weights = {m.layer_id: m.export_rows() for m in (model.model.layers[0].engram, model.model.layers[2].engram)}
    table = engram.build_table(tmp_path / "rows.engram", SPEC, COMP, weights=weights)
    backed = with_engram(seed=5, table=table)
    backed.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("engram.rows")})
    ids = prompt(1, 6, seed=5)
    cached, _ = both(backed, input_ids=ids, max_new_tokens=8, do_sample=False)
    mine, _ = both(model, input_ids=ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(cached, mine)
    table.close()


def test_cache_operations_reach_the_engram_state():
    model = with_engram(seed=6)
    ids = prompt(2, 6, seed=6)
    with torch.no_grad():
        out = model(ids[:, :4], use_cache=True)
        cache = getattr(out, CACHE)
        state = cache.engram_state
        assert isinstance(cache, transformers.DynamicCache) and state.seen == 4
        cache.reorder_cache(torch.tensor([1, 1, 0]))
        assert state.batch_size == 3 and state.layers[0].history.lengths.tolist() == [4, 4, 4]
        cache.crop(-2)
        assert state.seen == 2 and state.layers[2].history.lengths.tolist() == [2, 2, 2]
        step = model(ids[[1, 1, 0], 2:3], use_cache=True, **{CACHE: cache}).logits[:, -1]
        whole = model(ids[[1, 1, 0], :3], use_cache=False).logits[:, -1]
        torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-4)
        cache.reset()
        assert state.seen == 0 and state.layers[0].history.lengths.tolist() == [0, 0, 0]


def test_a_cache_filled_without_the_engram_layers_is_refused():
    model, plain = with_engram(seed=7), llama(seed=7)
    ids = prompt(1, 6, seed=7)
    with torch.no_grad():
        out = plain(ids[:, :5], use_cache=True)
        cache = getattr(out, CACHE)
        with pytest.raises(engram.InputError, match="already holds 5 positions but no Engram state: it was filled "
                                                    "without these Engram layers"):
            model.generate(input_ids=ids, max_new_tokens=2, pad_token_id=PAD, **{CACHE: cache})


def test_inputs_embeds_alone_are_refused_with_what_to_pass():
    model = with_engram(seed=8)
    embeds = model.get_input_embeddings()(prompt(1, 4))
    with pytest.raises(engram.InputError, match="inputs_embeds: its Engram layers hash token ids, which cannot be "
                                                r"recovered from embeddings; pass input_ids"), torch.no_grad():
        model.generate(inputs_embeds=embeds, max_new_tokens=2, pad_token_id=PAD)


def test_add_engram_refuses_bad_arguments():
    from engram.integrations.transformers import add_engram

    with pytest.raises(engram.InputError, match=r"at_layers=\[0\] must name 2 distinct decoder layers"):
        add_engram(llama(), spec=SPEC, compression=COMP, at_layers=(0,))
    with pytest.raises(engram.InputError, match="at_layers holds 5 but the model has 3 decoder layers"):
        add_engram(llama(), spec=SPEC, compression=COMP, at_layers=(0, 5))
    with pytest.raises(engram.InputError, match="already has Engram layers"):
        add_engram(with_engram(), spec=SPEC, compression=COMP)


def test_importing_engram_does_not_import_transformers():
    code = "import sys, engram; engram.Table; engram.EngramMemory; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_crop_takes_back_tokens_not_padding():
    model = with_engram(seed=6)
    ids, mask = prompt(2, 5, seed=6), torch.ones(2, 5, dtype=torch.long)
    mask[1, 3] = 0                                                   # padding inside what is cropped
    with torch.no_grad():
        cache = getattr(model(ids, attention_mask=mask, use_cache=True), CACHE)
    cache.crop(-3)
    assert [c.history.lengths.tolist() for c in cache.engram_state.layers.values()] == [[2, 2], [2, 2]]
    with pytest.raises(engram.InputError, match=r"cannot crop 3 positions from the Engram state: it can undo at "
                                                r"most 2 \(max_rollback=64\)"):
        cache.crop(-3)


def test_the_generate_tool_through_transformers_chooses_the_same_tokens_with_and_without_a_cache(monkeypatch, capsys):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "tools"))
    import generate

    out = generate.main(["--hf", "--tokens", "5"])
    assert out["same"] and len(out["tokens"]) > 5 and "same tokens: True" in capsys.readouterr().out
    sys.modules.pop("generate", None)
