"""EngramMemoryV41: the DeepSeek-V4.1 Engram layer (fused key/value projection, no ShortConv).

Bad-input errors are tested with the reference layer's in test_memory.py (one table, both variants).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import engram
from engram import Compression, NgramHasher, TableSpec
from engram.layers.memory import EngramMemory
from engram.layers.memory_v41 import EngramMemoryV41, upgrade_state_dict
from engram.layers.norm import BranchRMSNorm
from engram.layers.shortconv import ShortConv
from engram.layers.training import param_groups
from engram.making.checkpoint import open_checkpoint

SPEC = TableSpec(engram_vocab_size=(101, 103), max_ngram_size=3, n_head_per_ngram=2,
                 n_embed_per_ngram=8, layer_ids=(0, 3), compressed_vocab_size=50)
COMP = Compression.identity(50)
KEYS = {"rows", "wkv.weight", "q_weight", "k_weight"}
LEGACY_KEYS = {"rows", "key_value_proj.weight", "key_value_proj.bias", "gate_weight"}


def make(hc_mult=2, hidden_size=16, seed=0, spec=SPEC, cls=EngramMemoryV41, **kw):
    torch.manual_seed(seed)
    return cls(spec, COMP, layer_id=3, hidden_size=hidden_size, hc_mult=hc_mult, **kw)


def inputs(mem, B=2, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, mem.hc_mult, mem.hidden_size, generator=g)
    ids = torch.randint(0, COMP.vocab_size, (B, T), generator=g)
    return hidden, ids


def randomize(mem, seed=2):
    """Non-trivial weights everywhere (a fresh module has unit gate weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mem.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith("_weight") else 0.0))


def formula64(e, hidden, wkv, q_weight, k_weight, eps):
    """The released layer's formula, evaluated directly in float64, branch by branch:
    kv = wkv(e); k_g = kv[g*C:(g+1)*C], v = kv[G*C:]; s_g = <h_g*q_g*k'_g, k_g> * rsqrt(mean(h_g^2)+eps)
    * rsqrt(mean(k_g^2)+eps) / sqrt(C); output_g = sigmoid(copysign(sqrt(max(|s_g|, 1e-6)), s_g)) * v."""
    e, hidden, wkv = e.detach().double(), hidden.double(), wkv.detach().double()
    q_weight, k_weight = q_weight.detach().double(), k_weight.detach().double()
    G, C = hidden.shape[-2:]
    kv = e @ wkv.T
    v = kv[..., G * C:]
    out = []
    for g in range(G):
        h, k = hidden[:, :, g], kv[..., g * C:(g + 1) * C]
        s = ((h * q_weight[g] * k_weight[g] * k).sum(-1) / torch.sqrt((h * h).mean(-1) + eps)
             / torch.sqrt((k * k).mean(-1) + eps) / math.sqrt(C))
        out.append(torch.sigmoid(torch.copysign(s.abs().clamp_min(1e-6).sqrt(), s)).unsqueeze(-1) * v)
    return torch.stack(out, dim=2)


def rows_of(mem, ids):
    rows = mem.hasher.hash(ids.numpy(), mem.layer_id) + np.asarray(mem.spec.head_offsets(mem.layer_id))
    return mem.rows.detach()[torch.from_numpy(rows)].flatten(2)          # [B, T, H*D]


def legacy_forward(W, b, gate_weight, e, hidden):
    """The layer as engram computed it before the release's parameters (one biased projection, one
    gate vector applied to rms(h), eps = machine epsilon)."""
    G, C = hidden.shape[-2:]
    eps = torch.finfo(e.dtype).eps

    def rms(x):
        return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)

    v = e @ W[G * C:].T + b[G * C:]
    branches = []
    for g in range(G):
        k = e @ W[g * C:(g + 1) * C].T + b[g * C:(g + 1) * C]
        s = (rms(hidden[:, :, g]) * gate_weight[g] * rms(k)).sum(-1, keepdim=True) / math.sqrt(C)
        branches.append(torch.sigmoid(torch.sign(s) * torch.sqrt(s.abs().clamp_min(1e-6))) * v)
    return torch.stack(branches, dim=2)


# -- the computation ------------------------------------------------------------------------------
@pytest.mark.parametrize("hc_mult, hidden_size, eps", [(1, 16, 1e-6), (2, 16, 1e-6), (4, 8, 1e-3)])
def test_matches_the_release_formula_in_float64(hc_mult, hidden_size, eps):
    mem = make(hc_mult=hc_mult, hidden_size=hidden_size, eps=eps)
    randomize(mem)
    hidden, ids = inputs(mem, T=11)
    with torch.no_grad():
        out = mem(hidden, ids)
        want = formula64(rows_of(mem, ids), hidden, mem.wkv.weight, mem.q_weight, mem.k_weight, eps)
    assert out.shape == hidden.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():                                  # float64 modules compute the gate in float64
        out64 = mem.double()(hidden.double(), ids)
    torch.testing.assert_close(out64, want, rtol=1e-12, atol=1e-12)


def test_no_shortconv_and_the_documented_state_dict():
    mem = make(hc_mult=2, hidden_size=16)
    E, G, C = SPEC.embed_dim, 2, 16
    assert set(mem.state_dict()) == KEYS
    shapes = {k: tuple(v.shape) for k, v in mem.state_dict().items()}
    assert shapes == {"rows": (SPEC.rows(3), SPEC.head_dim), "wkv.weight": ((G + 1) * C, E),
                      "q_weight": (G, C), "k_weight": (G, C)}
    assert mem.wkv.bias is None and mem.eps == 1e-6
    assert not any(isinstance(m, (ShortConv, BranchRMSNorm, nn.Conv1d)) for m in mem.modules())
    assert not any("conv" in name or "norm" in name for name, _ in mem.named_parameters())
    assert torch.equal(mem.q_weight, torch.ones(G, C)) and torch.equal(mem.k_weight, torch.ones(G, C))
    assert set(make(bias=True).state_dict()) == KEYS | {"wkv.bias"}
    with pytest.raises(TypeError, match="kernel_size"):
        make(kernel_size=4)
    with pytest.raises(engram.InputError, match=r"eps=0 is invalid: expected a float > 0"):
        make(eps=0)


def test_fused_projection_splits_into_keys_then_the_value():
    mem = make(hc_mult=3)
    randomize(mem)
    hidden, ids = inputs(mem)
    G, C = 3, 16
    with torch.no_grad():
        base, weight = mem(hidden, ids), mem.wkv.weight.clone()
        for g in range(G):                        # key block g moves branch g's gate only
            mem.wkv.weight[g * C:(g + 1) * C] += 1.0
            out = mem(hidden, ids)
            mem.wkv.weight.copy_(weight)
            changed = (out != base).flatten(0, 1).any(-1).any(0)        # [G]
            assert changed.tolist() == [h == g for h in range(G)]
        mem.q_weight.zero_()                      # s = +0: the positive branch, sigmoid(sqrt(1e-6))
        v = mem.lookup(ids) @ mem.wkv.weight[G * C:].T
        gate = torch.sigmoid(torch.tensor(1e-3))
        torch.testing.assert_close(mem(hidden, ids), gate * v.unsqueeze(2).expand(-1, -1, G, -1))


def test_q_and_k_weights_count_only_as_their_product():
    mem = make()
    randomize(mem)
    hidden, ids = inputs(mem)
    with torch.no_grad():
        base = mem(hidden, ids)
        mem.q_weight.mul_(2.0)
        mem.k_weight.div_(2.0)
        torch.testing.assert_close(mem(hidden, ids), base)


@pytest.mark.parametrize("hc_mult", [1, 2])
def test_a_reference_layer_with_a_zero_shortconv_maps_onto_it(hc_mult):
    ref = make(hc_mult=hc_mult, cls=EngramMemory)
    randomize_ref = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=randomize_ref) * 0.5)
        ref.short_conv.weight.zero_()
    mem = make(hc_mult=hc_mult, bias=True, eps=None)     # the reference's norms: machine-epsilon eps
    mem.load_state_dict({
        "rows": ref.rows,
        "wkv.weight": torch.cat([ref.key_proj.weight, ref.value_proj.weight]),
        "wkv.bias": torch.cat([ref.key_proj.bias, ref.value_proj.bias]),
        "q_weight": ref.query_norm.weight, "k_weight": ref.key_norm.weight})
    hidden, ids = inputs(mem, T=9)
    with torch.no_grad():
        torch.testing.assert_close(mem(hidden, ids), ref(hidden, ids))


def test_causal_in_hidden_states_and_ids():
    mem = make()
    randomize(mem)
    hidden, ids = inputs(mem, T=12)
    hidden2, ids2 = hidden.clone(), ids.clone()
    hidden2[:, 6:] += 1.0
    ids2[:, 6:] = (ids2[:, 6:] + 1) % COMP.vocab_size
    with torch.no_grad():
        a, b = mem(hidden, ids), mem(hidden2, ids2)
    assert torch.equal(a[:, :6], b[:, :6]) and not torch.equal(a[:, 6:], b[:, 6:])


def test_dtypes_and_numpy_ids():
    mem = make(hc_mult=1).to(torch.bfloat16)
    hidden, ids = inputs(mem)
    out = mem(hidden.bfloat16(), ids.numpy())
    assert out.shape == hidden.shape and out.dtype == torch.bfloat16
    assert mem.lookup(ids).dtype == torch.bfloat16


# -- training -------------------------------------------------------------------------------------
def test_training_steps_decrease_the_loss_and_touch_only_addressed_rows():
    teacher, student = make(seed=5), make(seed=6)
    randomize(teacher, seed=7)
    hidden, ids = inputs(student, B=4, T=12)
    with torch.no_grad():
        target = teacher(hidden, ids)
    groups = {g["name"]: g for g in param_groups(student, lr=1e-2, weight_decay=0.1)}
    assert [id(p) for p in groups["engram_rows"]["params"]] == [id(student.rows)]
    assert groups["engram_rows"]["lr"] == pytest.approx(5e-2)
    assert {id(p) for p in groups["no_decay"]["params"]} == {id(student.q_weight), id(student.k_weight)}
    assert [id(p) for p in groups["decay"]["params"]] == [id(student.wkv.weight)]
    rows_before = student.rows.detach().clone()
    optimizer = torch.optim.AdamW(list(groups.values()))
    losses = []
    for _ in range(40):
        loss = nn.functional.mse_loss(student(hidden, ids), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    touched = np.unique(student.hasher.hash(ids.numpy(), 3) + np.asarray(student.spec.head_offsets(3)))
    moved = torch.nonzero((student.rows.detach() != rows_before).any(1)).flatten().numpy()
    assert np.array_equal(moved, touched)
    assert not torch.equal(student.q_weight, torch.ones_like(student.q_weight))


def test_state_dict_round_trip_gives_identical_outputs(tmp_path):
    mem = make()
    randomize(mem)
    hidden, ids = inputs(mem)
    buffer = io.BytesIO()
    torch.save(mem.state_dict(), buffer)
    save_file(mem.state_dict(), tmp_path / "v41.safetensors")
    for sd in (torch.load(io.BytesIO(buffer.getvalue()), weights_only=True),
               load_file(tmp_path / "v41.safetensors")):
        assert set(sd) == KEYS
        fresh = make(seed=9)
        fresh.load_state_dict(sd)
        with torch.no_grad():
            assert torch.equal(fresh(hidden, ids), mem(hidden, ids))
    with pytest.raises(RuntimeError, match="Missing key"):     # not interchangeable with the reference's
        make(cls=EngramMemory).load_state_dict(mem.state_dict())


def test_state_dicts_with_the_earlier_names_load_by_the_documented_conversion():
    g = torch.Generator().manual_seed(4)
    mem = make()
    G, C, E = 2, 16, SPEC.embed_dim
    legacy = {"rows": torch.randn(SPEC.rows(3), SPEC.head_dim, generator=g),
              "key_value_proj.weight": torch.randn((G + 1) * C, E, generator=g) * 0.3,
              "key_value_proj.bias": torch.randn((G + 1) * C, generator=g) * 0.3,
              "gate_weight": torch.randn(G, C, generator=g) + 1}
    assert set(legacy) == LEGACY_KEYS
    with pytest.raises(engram.InputError, match=r"key_value_proj.bias, saved by an earlier version\) but this "
                                                r"EngramMemoryV41 has no bias: build it with bias=True"):
        mem.load_state_dict(dict(legacy))
    old = make(bias=True, eps=None)
    old.load_state_dict(dict(legacy))
    assert torch.equal(old.q_weight, legacy["gate_weight"]) and torch.equal(old.k_weight, torch.ones(G, C))
    assert torch.equal(old.wkv.bias, legacy["key_value_proj.bias"])
    hidden, ids = inputs(old, T=9)
    with torch.no_grad():
        want = legacy_forward(legacy["key_value_proj.weight"], legacy["key_value_proj.bias"], legacy["gate_weight"],
                              rows_of(old, ids), hidden)
        torch.testing.assert_close(old(hidden, ids), want)
    converted = upgrade_state_dict(dict(legacy))
    assert set(converted) == KEYS | {"wkv.bias"}
    assert upgrade_state_dict(dict(converted)) == converted          # already converted: unchanged


# -- rows from a table ----------------------------------------------------------------------------
def without_rows(state_dict):
    return {k: v for k, v in state_dict.items() if k != "rows"}


@pytest.mark.parametrize("tier", ["ram", "mmap", "direct"])
def test_exported_rows_in_a_table_give_identical_outputs(tmp_path, tier):
    mem = make()
    randomize(mem)
    hidden, ids = inputs(mem, T=9)
    path = tmp_path / "v41.engram"
    engram.build_table(path, SPEC, COMP, weights=engram.export_rows(mem)).close()
    with engram.open(path, tier=tier) as table:
        backed = EngramMemoryV41.from_table(table, layer_id=3, hidden_size=16, hc_mult=2)
        assert backed.rows is None and set(backed.state_dict()) == KEYS - {"rows"}
        backed.load_state_dict(without_rows(mem.state_dict()))
        assert not backed.lookup(ids).requires_grad
        with torch.no_grad():
            assert torch.equal(backed(hidden, ids), mem(hidden, ids))
        backed(hidden, ids).sum().backward()
        assert all(p.grad is not None for p in backed.parameters())
        with pytest.raises(engram.InputError, match=r"this EngramMemoryV41 reads its rows from the table"):
            backed.export_rows()


def fp8_e8m0(rows, block=32):
    """Rows [R, D] as FP8 E4M3 values and one E8M0 scale (a biased power-of-two exponent) per block."""
    blocks = rows.reshape(rows.shape[0], -1, block)                                  # [R, D/32, 32]
    amax = blocks.abs().amax(-1, keepdim=True).clamp_min(2.0 ** -126)
    exponent = torch.ceil(torch.log2(amax / torch.finfo(torch.float8_e4m3fn).max))   # value <= 448
    values = (blocks / torch.exp2(exponent)).to(torch.float8_e4m3fn)
    return values.reshape(rows.shape), (exponent.squeeze(-1) + 127).to(torch.uint8)  # [R, D], [R, D/32]


def dequantize(values, scales, dtype, block=32):
    exponent = scales.to(torch.float32).sub(127).repeat_interleave(block, -1)
    return (values.to(torch.float32) * torch.exp2(exponent)).to(dtype)


class Fp8Table:
    """A table of FP8 E4M3 rows with E8M0 scales per 32 values; lookup dequantizes to `dtype`."""

    def __init__(self, spec, comp, layer_id, rows):
        self.spec, self.compression, self.path = spec, comp, None
        self.values, self.scales = fp8_e8m0(rows)
        self.hasher, self.offsets = NgramHasher(spec, comp), np.asarray(spec.head_offsets(layer_id))
        self.dtypes = []

    def lookup(self, token_ids, layer_id, dtype=None):
        self.dtypes.append(dtype)
        idx = torch.from_numpy(self.hasher.hash(np.asarray(token_ids), layer_id) + self.offsets)   # [B, T, H]
        return dequantize(self.values[idx], self.scales[idx], dtype).flatten(2)                    # [B, T, H*D]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_table_rows_arrive_in_the_module_dtype(dtype):
    spec = SPEC.replace(n_embed_per_ngram=128)                 # D = 64: two scales per row
    mem = make(spec=spec)
    randomize(mem)
    hidden, ids = inputs(mem)
    table = Fp8Table(spec, COMP, 3, mem.export_rows())
    with torch.no_grad():                                      # the in-module rows, rounded alike
        mem.rows.copy_(dequantize(table.values, table.scales, torch.float32))
    mem, hidden = mem.to(dtype), hidden.to(dtype)
    backed = EngramMemoryV41(spec, COMP, layer_id=3, hidden_size=16, hc_mult=2, table=table).to(dtype)
    backed.load_state_dict(without_rows(mem.state_dict()))
    with torch.no_grad():
        out = backed(hidden, ids)
        assert out.dtype == dtype and torch.equal(out, mem(hidden, ids))
    assert table.dtypes == [dtype]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_cuda_module_takes_host_or_device_ids():
    mem = make()
    randomize(mem)
    hidden, ids = inputs(mem)
    with torch.no_grad():
        expected = mem(hidden, ids)
        mem = mem.cuda()
        for token_ids in (ids, ids.cuda(), ids.numpy()):
            out = mem(hidden.cuda(), token_ids)
            assert out.device.type == "cuda"
            torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hc_mult", [1, 2])
def test_fresh_module_matches_the_formula_in_float64(hc_mult):
    """At init scale (small keys: the key norm's eps matters) and in float64, with tight tolerances."""
    mem = make(hc_mult=hc_mult, hidden_size=16).double()
    hidden, ids = inputs(mem, T=9)
    with torch.no_grad():
        want = formula64(rows_of(mem, ids), hidden.double(), mem.wkv.weight, mem.q_weight, mem.k_weight, mem.eps)
        torch.testing.assert_close(mem(hidden.double(), ids), want, rtol=1e-10, atol=1e-13)


# -- the released layer ---------------------------------------------------------------------------
def test_from_checkpoint_loads_the_released_layer_and_follows_the_formula(v41_release):
    from engram.storage import quant

    ck = v41_release()
    G, C = 4, 32
    mem = EngramMemoryV41.from_checkpoint(ck.path, layer_id=14, dtype=torch.float32)
    assert (mem.hidden_size, mem.hc_mult, mem.eps, mem.layer_id) == (C, G, 1e-6, 14)
    assert mem.table.tier == "mmap" and mem.table.path == ck.path and mem.wkv.bias is None
    values, scales = ck.wkv[14]                                  # FP8 [C*(G+1), E], E8M0 [C*(G+1)/32, E/32]
    fp8 = torch.from_numpy(values).view(torch.float8_e4m3fn).double()
    exponent = torch.from_numpy(scales).double().sub(127).repeat_interleave(32, 0).repeat_interleave(32, 1)
    assert torch.equal(mem.wkv.weight, (fp8 * torch.exp2(exponent)).float())    # exact in float32
    assert torch.equal(mem.q_weight, ck.q[14].float()) and torch.equal(mem.k_weight, ck.k[14].float())
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, G, C, generator=g)
    ids = torch.randint(0, ck.comp.vocab_size, (2, 9), generator=g)
    rows = quant.decode(*ck.rows[14], "float8_e4m3")             # every row of layer 14, float32
    idx = NgramHasher(ck.spec, ck.comp).global_rows(ids.numpy(), 14)
    e = rows[torch.from_numpy(idx)].flatten(2)                   # [B, T, E]
    with torch.no_grad():
        out = mem(hidden, ids)
    want = formula64(e, hidden, mem.wkv.weight, ck.q[14], ck.k[14], 1e-6)      # |values| up to ~1e4 here
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    bf16 = EngramMemoryV41.from_checkpoint(ck.path, layer_id=14, table=mem.table)    # dtype bfloat16
    assert bf16.wkv.weight.dtype == torch.bfloat16 and bf16.table is mem.table
    with torch.no_grad():
        torch.testing.assert_close(bf16(hidden.bfloat16(), ids).double(), want, rtol=0.05,
                                   atol=0.02 * float(want.abs().max()))
    mem.table.close()


def test_from_checkpoint_reads_rows_from_any_table_of_them(v41_release, tmp_path):
    ck = v41_release(naming="hf")                                # model. prefix, wkv.weight_scale_inv
    with open_checkpoint(ck.path) as c:
        engram.build_table(tmp_path / "imp.engram", ck.spec, ck.comp, weights={1: c.rows(1), 14: c.rows(14)}).close()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 12, 4, 32, generator=g).bfloat16()
    ids = torch.randint(0, ck.comp.vocab_size, (1, 12), generator=g)
    outs = []
    for table in (engram.open(ck.path, tier="direct"), engram.open(tmp_path / "imp.engram", tier="ram")):
        with table, torch.no_grad():
            outs.append(EngramMemoryV41.from_checkpoint(ck.path, layer_id=1, table=table)(hidden, ids))
    assert torch.equal(outs[0], outs[1])
    other = SPEC.replace(dtype="float8_e4m3", n_embed_per_ngram=128)
    engram.build_table(tmp_path / "other.engram", other, COMP).close()
    with engram.open(tmp_path / "other.engram") as table:
        with pytest.raises(engram.SpecMismatchError, match=r"holds other rows than checkpoint .* \(differing: \["):
            EngramMemoryV41.from_checkpoint(ck.path, layer_id=1, table=table)
    with pytest.raises(engram.InputError, match=r"layer_id=3 has no table: this spec has layer_ids=\(1, 14\)"):
        EngramMemoryV41.from_checkpoint(ck.path, layer_id=3)
