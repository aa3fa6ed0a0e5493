"""engram.quality: the KL / NLL / top-1 comparison of a model reading two tables, checked against a
direct float64 computation, and the gate that refuses a conversion before it is published."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engram
from engram.quality import compare, kl_gate, text_batches

COMP = engram.Compression(np.arange(64))
V = 64


def make_spec(**changes) -> engram.TableSpec:
    base = dict(engram_vocab_size=(500, 520), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=64,
                layer_ids=(1,), compressed_vocab_size=64)
    return engram.TableSpec(**{**base, **changes})


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    engram.build_table(root / "f32.engram", make_spec(), COMP, std=1.0, seed=0).close()
    for dtype in ("int8", "int4", "int2"):
        engram.convert(root / "f32.engram", root / f"{dtype}.engram", dtype=dtype,
                       scale_block=None if dtype == "int8" else 16)
    return root


# A model whose logits are a fixed projection of the looked-up rows: [B, T, E] @ [E, V].
PROJ = torch.from_numpy(np.random.default_rng(0).standard_normal((make_spec().embed_dim, V)).astype(np.float32))


def model_fn(ids: torch.Tensor, table) -> torch.Tensor:
    return table.lookup(ids, 1) @ PROJ


def batches(n=3, B=4, T=20, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 64, (B, T)) for _ in range(n)]


def direct(ids_list, table_a, table_b):
    """KL, NLL and top-1 in float64 from the logits, position by position."""
    kl, na, nb, agree = [], [], [], []
    for ids in ids_list:
        ids = torch.from_numpy(ids)
        la, lb = model_fn(ids, table_a)[:, :-1].double(), model_fn(ids, table_b)[:, :-1].double()
        pa, pb = la.softmax(-1), lb.softmax(-1)
        kl.append((pa * (pa.log() - pb.log())).sum(-1).flatten())
        t = ids[:, 1:].unsqueeze(-1)
        na.append(-pa.log().gather(2, t).flatten())
        nb.append(-pb.log().gather(2, t).flatten())
        agree.append((la.argmax(-1) == lb.argmax(-1)).flatten().double())
    return torch.cat(kl), torch.cat(na).mean(), torch.cat(nb).mean(), torch.cat(agree).mean()


def test_a_table_against_itself_changes_nothing(tables):
    with engram.open(tables / "f32.engram") as a:
        r = compare(model_fn, batches(), a, a)
    assert r.positions == 3 * 4 * 19 and r.kl_mean == 0 and r.kl_max == 0 and r.delta_nll == 0
    assert r.top1_agreement == 1.0


@pytest.mark.parametrize("dtype", ["int8", "int4", "int2"])
def test_compare_matches_a_direct_computation(tables, dtype):
    with engram.open(tables / "f32.engram") as a, engram.open(tables / f"{dtype}.engram") as b:
        r = compare(model_fn, batches(), a, b)
        kl, na, nb, agree = direct(batches(), a, b)
    assert r.kl_mean == pytest.approx(float(kl.mean()), rel=1e-4)
    assert r.kl_p99 == pytest.approx(float(torch.quantile(kl, 0.99)), rel=1e-3)
    assert r.kl_max == pytest.approx(float(kl.max()), rel=1e-4)
    assert (r.nll_a, r.nll_b) == (pytest.approx(float(na), rel=1e-5), pytest.approx(float(nb), rel=1e-5))
    assert r.delta_nll == pytest.approx(float(nb - na), abs=1e-5) and r.top1_agreement == float(agree)
    assert r.to_dict()["kl_mean"] == r.kl_mean


def test_fewer_bits_move_the_model_more(tables):
    with engram.open(tables / "f32.engram") as a:
        kls = []
        for dtype in ("int8", "int4", "int2"):
            with engram.open(tables / f"{dtype}.engram") as b:
                kls.append(compare(model_fn, batches(), a, b).kl_mean)
    assert 0 < kls[0] < kls[1] < kls[2]


def test_the_gate_refuses_above_max_kl_and_writes_nothing(tables, tmp_path):
    gate = kl_gate(model_fn, batches(), max_kl=1e-6)
    with pytest.raises(engram.QualityGateError, match=r"the int2 conversion moves the model's next-token "
                                                      r"distribution by a mean KL of .* above max_kl=1e-06: "
                                                      r"nothing was written"):
        engram.convert(tables / "f32.engram", tmp_path / "out.engram", dtype="int2", scale_block=16, accept=gate)
    assert list(tmp_path.iterdir()) == [] and gate.report is not None and gate.report.kl_mean > 1e-6
    loose = kl_gate(model_fn, batches(), max_kl=10.0)
    engram.convert(tables / "f32.engram", tmp_path / "out.engram", dtype="int8", accept=loose)
    assert (tmp_path / "out.engram").is_dir() and loose.report.kl_mean < 10.0


def test_tables_of_different_specs_are_refused(tables, tmp_path):
    engram.build_table(tmp_path / "other.engram", make_spec(seed=5), COMP).close()
    with engram.open(tables / "f32.engram") as a, engram.open(tmp_path / "other.engram") as b:
        with pytest.raises(engram.SpecMismatchError, match=r"table_a and table_b differ in spec fields \['seed'\]: "
                                                           r"the gate compares a table with a conversion of itself"):
            compare(model_fn, batches(), a, b)


def test_bad_batches_and_logits_are_refused(tables):
    with engram.open(tables / "f32.engram") as a:
        with pytest.raises(engram.InputError, match=r"batches is empty"):
            compare(model_fn, [], a, a)
        with pytest.raises(engram.InputError, match=r"batches\[0\] must be token ids shaped \[B, T\] with T >= 2"):
            compare(model_fn, [np.zeros((2, 1), np.int64)], a, a)
        with pytest.raises(engram.InputError, match=r"model_fn\(batches\[0\], table_a\) must return logits"):
            compare(lambda ids, t: ids, batches(1), a, a)
        with pytest.raises(engram.InputError, match=r"batches\[0\] holds token ids outside \[0, 10\)"):
            compare(lambda ids, t: model_fn(ids, t)[..., :10], batches(1), a, a)
    with pytest.raises(engram.InputError, match=r"max_kl=-1 is invalid"):
        kl_gate(model_fn, batches(), max_kl=-1)


def test_text_batches_cut_consecutive_windows():
    got = text_batches(np.arange(100), window=10, batch_size=4, max_tokens=75)
    assert [tuple(b.shape) for b in got] == [(4, 10), (3, 10)] and got[1][0].tolist() == list(range(40, 50))
    with pytest.raises(engram.InputError, match=r"5 tokens \(max_tokens=None\) make no window of 10"):
        text_batches(np.arange(5), window=10)
