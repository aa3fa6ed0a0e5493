from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engram import Compression, InputError, SpecMismatchError, TableSpec, TokenIdError
from engram.layers.memory import EngramMemory
from engram.layers.memory_v41 import EngramMemoryV41
from engram.layers.shortconv import ShortConv

GOLDEN = Path(__file__).parents[1] / "golden" / "module_small.safetensors"


@pytest.fixture(scope="module")
def golden_case():
    """The reference forward pass: (spec, comp, module kwargs, reference state_dict, inputs, output)."""
    with safe_open(GOLDEN, "pt") as f:
        meta = json.loads(f.metadata()["config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = meta["config"]
    comp = Compression.identity(meta["compressed_vocab_size"])
    spec = TableSpec(engram_vocab_size=cfg["engram_vocab_size"], max_ngram_size=cfg["max_ngram_size"],
                     n_head_per_ngram=cfg["n_head_per_ngram"], n_embed_per_ngram=cfg["n_embed_per_ngram"],
                     layer_ids=cfg["layer_ids"], pad_id=cfg["pad_id"], seed=cfg["seed"],
                     compressed_vocab_size=comp.compressed_vocab_size)
    kwargs = dict(layer_id=meta["layer_id"], hidden_size=meta["backbone"]["hidden_size"],
                  hc_mult=meta["backbone"]["hc_mult"], kernel_size=cfg["kernel_size"])
    sd = {k.removeprefix("state_dict."): v for k, v in tensors.items() if k.startswith("state_dict.")}
    return spec, comp, kwargs, sd, tensors["hidden_states"], tensors["input_ids"], tensors["expected_output"]


@pytest.fixture
def golden_mem(golden_case):
    spec, comp, kwargs, sd, *_ = golden_case
    mem = EngramMemory(spec, comp, **kwargs)
    mem.load_reference_state_dict(sd)
    return mem


def small(hc_mult=2, hidden_size=16, seed=0, cls=EngramMemory, **kw):
    torch.manual_seed(seed)
    comp = Compression.identity(50)
    spec = TableSpec(engram_vocab_size=(101, 103), max_ngram_size=3, n_head_per_ngram=2,
                     n_embed_per_ngram=8, layer_ids=(0, 3), compressed_vocab_size=50)
    return cls(spec, comp, layer_id=3, hidden_size=hidden_size, hc_mult=hc_mult, **kw)


def inputs(mem, B=2, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, mem.hc_mult, mem.hidden_size, generator=g)
    ids = torch.randint(0, mem.comp.vocab_size, (B, T), generator=g)
    return hidden, ids


def randomize(mem, seed=2):
    """Non-trivial weights everywhere (a fresh module has a zero ShortConv and unit norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mem.parameters():
            is_norm = p.ndim == 2 and p.shape[0] == mem.hc_mult
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if is_norm else 0.0))


# -- reference parity ---------------------------------------------------------------------------
def test_matches_reference_forward(golden_case, golden_mem):
    *_, hidden, ids, expected = golden_case
    with torch.no_grad():
        out = golden_mem(hidden, ids)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_matches_reference_with_numpy_ids(golden_case, golden_mem):
    *_, hidden, ids, expected = golden_case
    with torch.no_grad():
        out = golden_mem(hidden, ids.numpy())
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_reference_state_dict_round_trip(golden_case, golden_mem):
    spec, comp, kwargs, sd, hidden, ids, expected = golden_case
    exported = golden_mem.reference_state_dict()
    assert sorted(exported) == sorted(sd)
    for key in sd:
        assert torch.equal(exported[key], sd[key]), key
    fresh = EngramMemory(spec, comp, **kwargs)
    fresh.load_reference_state_dict(exported)
    with torch.no_grad():
        torch.testing.assert_close(fresh(hidden, ids), expected, rtol=1e-4, atol=1e-5)


def _per_branch_forward(mem, hidden, ids):
    """The algorithm written out branch by branch, as DESIGN.md states it."""
    C, G = mem.hidden_size, mem.hc_mult
    sd = mem.reference_state_dict()
    rows = mem.hasher.hash(ids, mem.layer_id) + sd["multi_head_embedding.offsets"]
    e = sd["multi_head_embedding.embedding.weight"][rows].flatten(2)
    v = e @ sd["value_proj.weight"].T + sd["value_proj.bias"]
    branches = []
    for g in range(G):
        k = e @ sd[f"key_projs.{g}.weight"].T + sd[f"key_projs.{g}.bias"]
        k = torch.nn.functional.rms_norm(k, (C,), sd[f"norm1.{g}.weight"])
        q = torch.nn.functional.rms_norm(hidden[:, :, g], (C,), sd[f"norm2.{g}.weight"])
        s = (k * q).sum(-1, keepdim=True) / math.sqrt(C)
        branches.append(torch.sigmoid(torch.sign(s) * torch.sqrt(s.abs().clamp_min(1e-6))) * v)
    u = torch.stack(branches, dim=2)
    normed = torch.cat([torch.nn.functional.rms_norm(u[:, :, g], (C,), sd[f"short_conv.norms.{g}.weight"],
                                                     eps=1e-5) for g in range(G)], dim=-1)
    dilation, k = mem.spec.max_ngram_size, mem.kernel_size
    w = sd["short_conv.conv.weight"]
    conv = torch.zeros_like(normed)
    for tap in range(k):   # tap k-1 is the current position, tap 0 the oldest
        shift = (k - 1 - tap) * dilation
        conv[:, shift:] += normed[:, :normed.shape[1] - shift] * w[:, 0, tap]
    return u + torch.nn.functional.silu(conv).view_as(u)


@pytest.mark.parametrize("hc_mult", [1, 2, 4])
def test_matches_per_branch_formula(hc_mult):
    mem = small(hc_mult=hc_mult)
    randomize(mem)
    hidden, ids = inputs(mem, T=11)
    with torch.no_grad():
        torch.testing.assert_close(mem(hidden, ids), _per_branch_forward(mem, hidden, ids))


# -- training-time behaviour ----------------------------------------------------------------------
def test_fresh_module_is_gated_value_only():
    mem = small()
    assert torch.count_nonzero(mem.short_conv.weight) == 0
    u = torch.randn(2, 5, 2, 16)
    assert torch.count_nonzero(ShortConv(16, 2, kernel_size=4, dilation=3)(u)) == 0
    hidden, ids = inputs(mem)
    with torch.no_grad():
        out = mem(hidden, ids)
        v = mem.value_proj(mem.lookup(ids))               # [B, T, C]
    gate = out / v.unsqueeze(2)                           # one gate per branch, constant over C
    torch.testing.assert_close(gate, gate[..., :1].expand_as(gate))
    assert ((gate > 0) & (gate < 1)).all()


def test_rows_initialized_normal_with_init_std():
    mem = small(init_std=0.05)
    assert mem.rows.shape == (mem.spec.rows(3), mem.spec.head_dim)
    assert abs(mem.rows.std().item() - 0.05) < 0.005
    assert abs(mem.rows.mean().item()) < 0.005


def test_gradients_reach_addressed_rows_and_conv():
    mem = small()
    hidden, ids = inputs(mem)
    mem(hidden, ids).square().sum().backward()
    rows = mem.hasher.hash(ids.numpy(), 3) + np.asarray(mem.spec.head_offsets(3))     # [B, T, H] global rows
    touched = torch.unique(torch.from_numpy(rows).flatten())
    grad_rows = torch.nonzero(mem.rows.grad.abs().sum(1)).flatten()
    assert torch.equal(grad_rows, touched)
    assert mem.short_conv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in mem.parameters())


def test_causal_in_hidden_states_and_ids():
    mem = small()
    randomize(mem)
    hidden, ids = inputs(mem, T=12)
    t = 6
    hidden2, ids2 = hidden.clone(), ids.clone()
    hidden2[:, t:] += 1.0
    ids2[:, t:] = (ids2[:, t:] + 1) % mem.comp.vocab_size
    with torch.no_grad():
        a, b = mem(hidden, ids), mem(hidden2, ids2)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.equal(a[:, t:], b[:, t:])


def test_state_dict_round_trip_gives_identical_outputs(tmp_path):
    mem = small()
    randomize(mem)
    hidden, ids = inputs(mem)
    assert set(mem.state_dict()) == {
        "rows", "key_proj.weight", "key_proj.bias", "key_norm.weight", "query_norm.weight",
        "value_proj.weight", "value_proj.bias", "short_conv.norm.weight", "short_conv.weight"}
    buffer = io.BytesIO()
    torch.save(mem.state_dict(), buffer)
    save_file(mem.state_dict(), tmp_path / "mem.safetensors")
    for sd in (torch.load(io.BytesIO(buffer.getvalue()), weights_only=True),
               load_file(tmp_path / "mem.safetensors")):
        fresh = small(seed=9)
        fresh.load_state_dict(sd)
        with torch.no_grad():
            assert torch.equal(fresh(hidden, ids), mem(hidden, ids))


def test_dense_usage_and_dtype():
    mem = small(hc_mult=1).to(torch.float64)
    hidden, ids = inputs(mem)
    out = mem(hidden.double(), ids)
    assert out.shape == hidden.shape and out.dtype == torch.float64


def test_export_rows_is_a_cpu_copy():
    mem = small()
    rows = mem.export_rows()
    assert torch.equal(rows, mem.rows.detach()) and rows.data_ptr() != mem.rows.data_ptr()
    assert not rows.requires_grad


# -- bad input (the same typed errors and messages from every variant) ---------------------------
VARIANTS = [EngramMemory, EngramMemoryV41]


@pytest.mark.parametrize("make_hidden, make_ids, error, match", [
    (lambda h: h[:, :, 0], None, InputError,
     r"hidden_states must be shaped \[B, T, G, C\] .* got shape \(2, 7, 16\): for a dense model "
     r"\(hc_mult=1\) pass hidden.unsqueeze\(2\)"),
    (lambda h: torch.cat([h, h[:, :, :1]], 2), None, InputError,
     r"hidden_states has shape \(2, 7, 3, 16\) \(hc_mult G=3, hidden_size C=16\) but this {name} "
     r"has hc_mult=2, hidden_size=16: pass hidden states shaped \[B, T, 2, 16\] or build the module "
     r"with hc_mult=3, hidden_size=16"),
    (lambda h: h[..., :8], None, InputError, r"\(hc_mult G=2, hidden_size C=8\) but .* hidden_size=16"),
    (lambda h: h.long(), None, InputError,
     r"hidden_states must be a floating-point torch.Tensor, got torch.int64"),
    (lambda h: h.numpy(), None, InputError,
     r"hidden_states must be a floating-point torch.Tensor, got ndarray"),
    (None, lambda i: i[:, :5], InputError,
     r"token_ids has shape \(2, 5\) but hidden_states has \[B, T\] = \(2, 7\): pass the token ids of the "
     r"same batch and positions"),
    (None, lambda i: i[:1], InputError,
     r"token_ids has shape \(1, 7\) but hidden_states has \[B, T\] = \(2, 7\)"),
    (None, lambda i: i[0], InputError, r"token_ids must be shaped \[B, T\] .* got shape \(7,\)"),
    (None, lambda i: i.float(), InputError, r"token_ids must be integers, got dtype=torch.float32"),
    (None, lambda i: i + 50, TokenIdError, r"token_ids holds id \d+, outside \[0, 50\)"),
    (None, lambda i: i.to("meta"), InputError,
     r"token_ids is on device meta but hidden_states is on cpu: pass the ids on cpu or on the CPU"),
    (lambda h: h.to("meta"), None, InputError,
     r"hidden_states is on device meta but this {name} is on cpu: move the module with "
     r"mem.to\('meta'\)"),
    (lambda h: h.double(), None, InputError,
     r"hidden_states has dtype torch.float64 but this {name} computes in torch.float32: pass "
     r"hidden_states.to\(torch.float32\), convert the module with mem.to\(torch.float64\), or run under "
     r"torch.autocast"),
    (lambda h: h[:, :0], None, InputError,
     r"hidden_states has shape \(2, 0, 2, 16\), with no positions \(T=0\): pass at least one position"),
])
@pytest.mark.parametrize("cls", VARIANTS)
def test_bad_inputs_name_argument_value_and_fix(cls, make_hidden, make_ids, error, match):
    mem = small(cls=cls)
    hidden, ids = inputs(mem)
    hidden = make_hidden(hidden) if make_hidden else hidden
    ids = make_ids(ids) if make_ids else ids
    with pytest.raises(error, match=match.replace("{name}", cls.__name__)):
        mem(hidden, ids)


@pytest.mark.parametrize("cls", VARIANTS)
def test_autocast_runs_a_float32_module_on_bfloat16_hidden_states(cls):
    mem = small(cls=cls)
    randomize(mem)
    hidden, ids = inputs(mem)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = mem(hidden.bfloat16(), ids)
    assert y.shape == hidden.shape
    expected = mem(hidden, ids).detach()
    assert torch.allclose(y.float(), expected, rtol=0.1, atol=0.1)


BAD_CONSTRUCTOR_ARGUMENTS = [
    (dict(layer_id=1), r"layer_id=1 has no table: this spec has layer_ids=\(0, 3\)"),
    (dict(hidden_size=0), r"hidden_size=0 is invalid: expected an int >= 1"),
    (dict(hc_mult=2.0), r"hc_mult=2.0 is invalid: expected an int >= 1"),
    (dict(kernel_size=0), r"kernel_size=0 is invalid"),
    (dict(init_std=-1.0), r"init_std=-1.0 is invalid: expected a float >= 0"),
    (dict(table=object()),
     r"table=<object object .*> is not an engram table: pass engram.open\(path\) or None"),
]


@pytest.mark.parametrize("cls, kwargs, match", [
    (cls, kwargs, match) for cls in VARIANTS for kwargs, match in BAD_CONSTRUCTOR_ARGUMENTS
    if cls is EngramMemory or "kernel_size" not in kwargs])   # kernel_size: the ShortConv's only
def test_bad_constructor_arguments(cls, kwargs, match):
    mem = small()
    args = {**dict(layer_id=3, hidden_size=16, hc_mult=2), **kwargs}
    with pytest.raises(InputError, match=match):
        cls(mem.spec, mem.comp, **args)


@pytest.mark.parametrize("cls", VARIANTS)
def test_compression_of_another_vocabulary_is_refused(cls):
    mem = small()
    with pytest.raises(SpecMismatchError,
                       match=r"compressed_vocab_size=49 but spec.compressed_vocab_size=50"):
        cls(mem.spec, Compression.identity(49), layer_id=3, hidden_size=16)


def test_reference_state_dict_keys_are_checked(golden_case):
    spec, comp, kwargs, sd, *_ = golden_case
    mem = EngramMemory(spec, comp, **kwargs)
    bad = {k: v for k, v in sd.items() if not k.startswith("norm2.")}
    bad["engram.extra"] = torch.zeros(1)
    with pytest.raises(InputError, match=r"missing keys \['norm2.0.weight', 'norm2.1.weight'\] and "
                                         r"unexpected keys \['engram.extra'\]: pass the state_dict of one "):
        mem.load_reference_state_dict(bad)
    before = {k: v.clone() for k, v in mem.state_dict().items()}
    with pytest.raises(SpecMismatchError, match=r"state_dict\['value_proj.weight'\] has shape \(64, 32\), "
                                                r"this EngramMemory expects \(64, 64\)"):
        mem.load_reference_state_dict({**sd, "value_proj.weight": torch.zeros(64, 32)})
    offsets = sd["multi_head_embedding.offsets"].clone()
    offsets[1] += 1
    with pytest.raises(SpecMismatchError, match=r"\['multi_head_embedding.offsets'\]=\[0, 3002, .* differs "
                                                r"from spec.head_offsets\(1\)=\[0, 3001, "):
        mem.load_reference_state_dict({**sd, "multi_head_embedding.offsets": offsets})
    with pytest.raises(InputError, match=r"state_dict must be a mapping of names to tensors, got list"):
        mem.load_reference_state_dict([])
    assert all(torch.equal(v, before[k]) for k, v in mem.state_dict().items())   # nothing half-loaded


def test_hash_ids_follow_numpy_and_torch_alike():
    mem = small()
    hidden, ids = inputs(mem)
    with torch.no_grad():
        assert torch.equal(mem(hidden, ids), mem(hidden, ids.numpy()))
        assert torch.equal(mem(hidden, ids), mem(hidden, ids.int()))
    assert np.array_equal(mem.lookup(ids).detach().numpy(), mem.lookup(ids.numpy()).detach().numpy())


# -- rows from a table ----------------------------------------------------------------------------
TIERS = ("ram", "mmap", "direct")


@pytest.fixture
def mem_and_table_path(tmp_path):
    import engram

    mem = small()
    randomize(mem)
    path = tmp_path / "rows.engram"
    engram.build_table(path, mem.spec, mem.comp, weights={3: mem.export_rows()}).close()
    return mem, path


def without_rows(state_dict):
    return {k: v for k, v in state_dict.items() if k != "rows"}


@pytest.mark.parametrize("tier", TIERS)
def test_table_rows_give_the_same_output_on_every_tier(mem_and_table_path, tier):
    import engram

    mem, path = mem_and_table_path
    hidden, ids = inputs(mem, T=9)
    with engram.open(path, tier=tier) as table:
        backed = EngramMemory(mem.spec, mem.comp, layer_id=3, hidden_size=16, hc_mult=2, table=table)
        assert backed.rows is None and "rows" not in backed.state_dict()
        assert all(p.shape != mem.rows.shape for p in backed.parameters())
        backed.load_state_dict(without_rows(mem.state_dict()))
        with torch.no_grad():
            assert torch.equal(backed(hidden, ids), mem(hidden, ids))
            assert torch.equal(backed(hidden, ids.numpy()), mem(hidden, ids))


@pytest.mark.parametrize("cls", [EngramMemory, EngramMemoryV41])
def test_prefetched_rows_give_the_same_output_as_token_ids(tmp_path, cls):
    import engram

    mem = small(cls=cls)
    randomize(mem)
    path = tmp_path / "rows.engram"
    engram.build_table(path, mem.spec, mem.comp, weights={3: mem.export_rows()}).close()
    hidden, ids = inputs(mem, T=9)
    with engram.open(path, tier="mmap") as table:
        backed = cls.from_table(table, layer_id=3, hidden_size=16, hc_mult=2)
        backed.load_state_dict(without_rows(mem.state_dict()))
        with torch.no_grad():
            expected = mem(hidden, ids)
            for layer_ids in (None, 3, (0, 3)):
                handle = table.prefetch(ids, layer_ids=layer_ids)
                assert torch.equal(backed(hidden, handle), expected)


def test_prefetch_handles_that_cannot_serve_the_module_are_refused(mem_and_table_path, tmp_path):
    import engram

    mem, path = mem_and_table_path
    hidden, ids = inputs(mem, T=9)
    with engram.open(path, tier="ram") as table:
        backed = EngramMemory.from_table(table, layer_id=3, hidden_size=16, hc_mult=2)
        with pytest.raises(InputError, match=r"keeps its rows in the module \(table=None\).*pass token_ids"):
            mem(hidden, table.prefetch(ids))
        with pytest.raises(InputError, match=r"holds layers \(0,\) but this EngramMemory reads layer 3"):
            backed(hidden, table.prefetch(ids, layer_ids=0))
        with pytest.raises(InputError, match=r"\[B, T\] = \(2, 8\) but hidden_states has \(2, 9\)"):
            backed(hidden, table.prefetch(ids[:, :8]))
    other = tmp_path / "other.engram"
    engram.build_table(other, mem.spec, mem.comp, seed=5).close()          # the same spec, other rows
    with engram.open(path) as table, engram.open(other) as wrong:
        backed = EngramMemory.from_table(table, layer_id=3, hidden_size=16, hc_mult=2)
        with pytest.raises(InputError, match=r"holds rows of the table at '.*other.engram' but this EngramMemory "
                                             r"reads '.*rows.engram': prefetch from the table this module reads"):
            backed(hidden, wrong.prefetch(ids))
        with pytest.raises(InputError, match=r"prefetched rows are torch.float16 but this EngramMemory computes in "
                                             r"torch.float32 and the table stores torch.float32: prefetch with"):
            backed(hidden, table.prefetch(ids, dtype=torch.float16))
        with engram.open(path, tier="direct") as same:                     # the same table, opened again
            assert torch.equal(backed(hidden, same.prefetch(ids)), backed(hidden, ids))


def test_table_backed_module_trains_everything_but_rows(mem_and_table_path):
    import engram

    mem, path = mem_and_table_path
    hidden, ids = inputs(mem)
    with engram.open(path) as table:
        backed = EngramMemory.from_table(table, layer_id=3, hidden_size=16, hc_mult=2)
        assert backed.spec == mem.spec and backed.comp == mem.comp
        assert not backed.lookup(ids).requires_grad
        backed(hidden.requires_grad_(), ids).sum().backward()
        assert all(p.grad is not None for p in backed.parameters())
        assert hidden.grad is not None
        assert "table=" in repr(backed) and str(path) in repr(backed)
        with pytest.raises(InputError, match=r"reads its rows from the table at '.*rows.engram': there are no "
                                             r"in-module rows to export"):
            backed.export_rows()


def test_table_backed_module_loads_reference_weights_without_rows(mem_and_table_path):
    import engram

    mem, path = mem_and_table_path
    ref = mem.reference_state_dict()
    hidden, ids = inputs(mem)
    with engram.open(path) as table:
        backed = EngramMemory.from_table(table, layer_id=3, hidden_size=16, hc_mult=2)
        with pytest.raises(InputError, match=r"unexpected keys \['multi_head_embedding.embedding.weight'\]: "
                                             r"this module reads rows from a table: build one with "
                                             r"engram.build_table\(path, spec, comp, weights=\{3: "):
            backed.load_reference_state_dict(ref)
        ref.pop("multi_head_embedding.embedding.weight")
        backed.load_reference_state_dict(ref)
        assert set(backed.reference_state_dict()) == set(ref)
        with torch.no_grad():
            assert torch.equal(backed(hidden, ids), mem(hidden, ids))


def test_bfloat16_table_serves_a_float32_module(tmp_path):
    import engram

    mem = small()
    randomize(mem)
    spec16 = mem.spec.replace(dtype="bfloat16")
    hidden, ids = inputs(mem)
    with engram.build_table(tmp_path / "bf16.engram", spec16, mem.comp, weights={3: mem.export_rows()}) as table:
        backed = EngramMemory(mem.spec, mem.comp, layer_id=3, hidden_size=16, hc_mult=2, table=table)
        backed.load_state_dict(without_rows(mem.state_dict()))
        assert backed.lookup(ids).dtype == torch.float32
        with torch.no_grad():
            torch.testing.assert_close(backed(hidden, ids), mem(hidden, ids), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cls", VARIANTS)
def test_table_of_another_spec_or_compression_is_refused(tmp_path, cls):
    import engram

    mem = small()
    other_spec = mem.spec.replace(seed=1, engram_vocab_size=(101, 107))
    with engram.build_table(tmp_path / "a.engram", other_spec, mem.comp) as table:
        with pytest.raises(SpecMismatchError, match=r"table at '.*a.engram' was built for another spec: "
                                                    r"engram_vocab_size=\(101, 107\) \(module: \(101, 103\)\), "
                                                    r"seed=1 \(module: 0\): build the module with spec=table.spec "
                                                    rf"\({cls.__name__}.from_table\)"):
            cls(mem.spec, mem.comp, layer_id=3, hidden_size=16, table=table)
    merged = Compression(list(range(50)) + [7])           # 51 raw ids, 50 compressed: fits the spec
    with engram.build_table(tmp_path / "b.engram", mem.spec, merged) as table:
        with pytest.raises(SpecMismatchError, match=r"table at '.*b.engram' was built with another compression "
                                                    r"\(fingerprint '[0-9a-f]+', module: '[0-9a-f]+'\): build the "
                                                    r"module with comp=table.compression "
                                                    rf"\({cls.__name__}.from_table\)"):
            cls(mem.spec, mem.comp, layer_id=3, hidden_size=16, table=table)


@pytest.mark.parametrize("cls", VARIANTS)
def test_quantized_table_serves_a_module_built_for_the_float_spec(tmp_path, cls):
    import engram

    mem = small(cls=cls)
    randomize(mem)
    fp8 = mem.spec.replace(dtype="float8_e4m3", scale_block=2)          # D=4: two scales per row
    with engram.build_table(tmp_path / "q.engram", fp8, mem.comp, weights={3: mem.export_rows()}) as table:
        backed = cls(mem.spec, mem.comp, layer_id=3, hidden_size=16, hc_mult=2, table=table)
        backed.load_state_dict(without_rows(mem.state_dict()))
        decoded = table.rows(3, np.arange(fp8.rows(3)))                  # the rows as the table serves them
        assert not torch.equal(decoded, mem.rows.detach())               # FP8 rounding changed them
        with torch.no_grad():
            mem.rows.copy_(decoded)
            hidden, ids = inputs(mem, T=9)
            assert torch.equal(backed(hidden, ids), mem(hidden, ids))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_cuda_module_takes_host_or_device_ids(golden_case, golden_mem, tmp_path):
    import engram

    spec, comp, kwargs, sd, hidden, ids, expected = golden_case
    mem = golden_mem.cuda()
    with torch.no_grad():
        for token_ids in (ids, ids.cuda(), ids.numpy()):
            out = mem(hidden.cuda(), token_ids)
            assert out.device.type == "cuda"
            torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-5)
    with engram.build_table(tmp_path / "t.engram", spec, comp,
                            weights={kwargs["layer_id"]: mem.export_rows()}) as table:
        backed = EngramMemory.from_table(table, **kwargs).cuda()
        backed.load_state_dict({k: v for k, v in mem.state_dict().items() if k != "rows"})
        with torch.no_grad():
            torch.testing.assert_close(backed(hidden.cuda(), ids.cuda()).cpu(), expected, rtol=1e-4, atol=1e-5)


def test_gate_near_zero_takes_the_square_root_of_the_1e_6_floor():
    from engram.layers.memory import signed_sqrt_gate

    C = 4
    q = torch.ones(3, C, dtype=torch.float64)
    s = torch.tensor([1e-9, -1e-9, 4e-6], dtype=torch.float64)           # <q, k> / sqrt(C) = s
    k = (s * math.sqrt(C) / C)[:, None].expand(3, C)
    expected = torch.sigmoid(torch.tensor([1e-3, -1e-3, 2e-3], dtype=torch.float64))
    torch.testing.assert_close(signed_sqrt_gate(q, k), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("hc_mult", [1, 2])
def test_fresh_module_matches_the_formula_in_float64(hc_mult):
    """At init scale (small keys, gates near the floor) and in float64, where a changed eps or floor shows."""
    mem = small(hc_mult=hc_mult).double()
    hidden, ids = inputs(mem, T=9)
    with torch.no_grad():
        torch.testing.assert_close(mem(hidden.double(), ids), _per_branch_forward(mem, hidden.double(), ids),
                                   rtol=1e-10, atol=1e-13)
