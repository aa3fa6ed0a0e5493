from __future__ import annotations

import mmh3
import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from engram import Compression, InputError, NgramHasher, SpecError, SpecMismatchError, TableSpec, TokenIdError
from engram.addressing.hashing import _mod_into
from engram.addressing.primes import is_prime


def _golden_case(g):
    comp = (Compression.identity(g["compressed_vocab_size"]) if g["compression"] is None
            else Compression(g["compression"]))
    cfg = g["config"]
    spec = TableSpec(**cfg, n_embed_per_ngram=cfg["n_head_per_ngram"] * 4,
                     compressed_vocab_size=comp.compressed_vocab_size)
    return spec, comp


@pytest.mark.parametrize("stem", ["hash_deepseek_default", "hash_compressed_vocab"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_reference_hashes_bit_exact(golden, stem, kind):
    g = golden(stem)
    spec, comp = _golden_case(g)
    hasher = NgramHasher(spec, comp)
    ids = np.array(g["input_ids"])
    for layer_id in spec.layer_ids:
        key = str(layer_id)
        assert hasher.multipliers(layer_id).tolist() == g["layer_multipliers"][key]
        assert hasher.table_sizes(layer_id) == [p for order in g["table_sizes"][key] for p in order]
        got = hasher.hash(torch.from_numpy(ids) if kind == "torch" else ids, layer_id)
        if kind == "torch":
            assert isinstance(got, torch.Tensor) and got.dtype == torch.int64
            got = got.numpy()
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, np.array(g["hash_ids"][key]))


def _oracle(spec, comp, ids, layer_id):
    """Row indices computed one n-gram at a time with Python ints and the hash libraries."""
    x = comp.lookup[ids]
    pad = int(comp.lookup[spec.pad_id])
    sizes = spec.table_sizes(layer_id)
    K = spec.n_head_per_ngram
    seed = (spec.seed + 10007 * layer_id) % 2**32
    mult = None
    if spec.hash == "multiplicative-xor":
        mult = NgramHasher(spec, comp).multipliers(layer_id).tolist()
    B, T = x.shape
    out = np.zeros((B, T, spec.heads_per_layer), np.int64)
    for b in range(B):
        for t in range(T):
            for n in range(2, spec.max_ngram_size + 1):
                gram = [int(x[b, t - j]) if t - j >= 0 else pad for j in range(n - 1, -1, -1)]  # oldest first
                if mult is not None:
                    h = 0
                    for j, token in enumerate(reversed(gram)):  # x[t]*m0 ^ x[t-1]*m1 ^ ...
                        h ^= token * mult[j]
                else:
                    key = np.array(gram, dtype="<u4").tobytes()
                    if spec.hash == "xxh64":
                        h = xxhash.xxh64_intdigest(key, seed=seed)
                    else:
                        h = mmh3.hash64(key, seed=seed, x64arch=True, signed=False)[0]
                for k in range(K):
                    head = (n - 2) * K + k
                    out[b, t, head] = h % sizes[head]
    return out


@given(
    family=st.sampled_from(["multiplicative-xor", "xxh64", "murmur3"]),
    N=st.integers(2, 10),
    K=st.integers(1, 3),
    T=st.integers(1, 12),
    B=st.integers(1, 3),
    big=st.booleans(),
    seed=st.integers(0, 2**33),
    layer_id=st.integers(0, 2000),
    vocab=st.integers(1, 2**20),
    data=st.data(),
)
def test_every_family_matches_its_oracle(family, N, K, T, B, big, seed, layer_id, vocab, data):
    base = data.draw(st.integers(70_000, 2**40) if big else st.integers(2, 70_000))
    comp = Compression.identity(vocab)
    spec = TableSpec(engram_vocab_size=(base,) * (N - 1), max_ngram_size=N, n_head_per_ngram=K,
                     n_embed_per_ngram=K, layer_ids=(layer_id,), compressed_vocab_size=vocab,
                     pad_id=data.draw(st.integers(0, vocab - 1)), seed=seed, hash=family)
    ids = data.draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=T, max_size=T),
                             min_size=B, max_size=B))
    ids = np.array(ids, dtype=np.int64)
    got = NgramHasher(spec, comp).hash(ids, layer_id)
    np.testing.assert_array_equal(got, _oracle(spec, comp, ids, layer_id))


@pytest.mark.parametrize("family", ["xxh64", "murmur3"])
@pytest.mark.parametrize("seed, layer_id", [(2**31 + 5, 1), (0, 300_000), (2**32 + 2**31 + 7, 3), (2**40 + 2**31, 0)])
def test_library_families_take_the_seed_mod_2_32(family, seed, layer_id):
    """Per-layer seeds past 2**31 (a large seed or layer id): reduced mod 2**32 exactly, as the
    libraries are called (mod 2**31 would differ in every one of these cases)."""
    assert (seed + 10007 * layer_id) % 2**32 >= 2**31
    comp = Compression.identity(50)
    spec = TableSpec(engram_vocab_size=(1009, 2003), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=2,
                     layer_ids=(layer_id,), compressed_vocab_size=50, pad_id=1, seed=seed, hash=family)
    ids = np.random.default_rng(seed % 97).integers(0, 50, (2, 9))
    np.testing.assert_array_equal(NgramHasher(spec, comp).hash(ids, layer_id), _oracle(spec, comp, ids, layer_id))


def test_compression_and_pad_are_applied_before_hashing():
    comp = Compression([0, 1, 1, 2, 2, 3])
    spec = TableSpec(engram_vocab_size=(101, 101), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=4,
                     layer_ids=(0,), compressed_vocab_size=4, pad_id=4, hash="xxh64")
    hasher = NgramHasher(spec, comp)
    a = hasher.hash(np.array([[1, 3, 5]]), 0)
    b = hasher.hash(np.array([[2, 4, 5]]), 0)  # same compressed ids
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, _oracle(spec, comp, np.array([[1, 3, 5]]), 0))
    # the pad is the compressed pad_id: raw 3 and raw 4 both compress to 2
    c = NgramHasher(spec.replace(pad_id=3), comp).hash(np.array([[1, 3, 5]]), 0)
    np.testing.assert_array_equal(a, c)


def test_families_differ_and_layers_differ():
    comp = Compression.identity(1000)
    ids = np.random.default_rng(0).integers(0, 1000, (2, 64))
    outs = []
    for family in ("multiplicative-xor", "xxh64", "murmur3"):
        spec = TableSpec(engram_vocab_size=(100_003, 100_003), max_ngram_size=3, n_head_per_ngram=2,
                         n_embed_per_ngram=4, layer_ids=(0, 1), compressed_vocab_size=1000, hash=family)
        h = NgramHasher(spec, comp)
        outs.append(h.hash(ids, 0))
        assert (h.hash(ids, 0) != h.hash(ids, 1)).mean() > 0.99
    assert (outs[0] != outs[1]).mean() > 0.99 and (outs[1] != outs[2]).mean() > 0.99


def test_fast_modular_reduction_is_exact_at_the_edges():
    primes = [65537, 65539, 646403, 2**31 - 1, 1_000_000_007, 2**40 + 15, 2**61 - 1]
    assert all(is_prime(p) for p in primes)
    rng = np.random.default_rng(1)
    for p in primes:
        edge = [0, 1, p - 1, p, p + 1, 2 * p - 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64 - 2, 2**53, 2**53 + 1]
        edge += [(2**64 // p) * p + d for d in (-1, 0, 1) if 0 <= (2**64 // p) * p + d < 2**64]
        edge += [k * p + d for k in rng.integers(1, 2**64 // p, 200).tolist() for d in (-1, 0, 1)]
        h = np.array(edge + rng.integers(0, 2**64, 5000, dtype=np.uint64).tolist(), dtype=np.uint64)
        out = np.empty_like(h)
        _mod_into(h, h.astype(np.float64), p, out, {})
        assert out.tolist() == [v % p for v in h.tolist()], p


def test_short_sequences_pad_every_order():
    comp = Compression.identity(50)
    spec = TableSpec(engram_vocab_size=(1009, 1009, 1009), max_ngram_size=4, n_head_per_ngram=1,
                     n_embed_per_ngram=2, layer_ids=(3,), compressed_vocab_size=50, pad_id=7)
    hasher = NgramHasher(spec, comp)
    one = hasher.hash(np.array([[9]]), 3)
    # a single token equals the last position of [pad, pad, pad, 9]
    np.testing.assert_array_equal(one[0, 0], hasher.hash(np.array([[7, 7, 7, 9]]), 3)[0, 3])
    assert hasher.hash(np.zeros((2, 0), np.int64), 3).shape == (2, 0, 3)


def test_errors_name_argument_value_and_fix():
    comp = Compression.identity(100)
    spec = TableSpec(engram_vocab_size=(101, 101), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=4,
                     layer_ids=(0,), compressed_vocab_size=100)
    hasher = NgramHasher(spec, comp)
    with pytest.raises(InputError, match=r"token_ids must be shaped \[B, T\] .*got shape \(3,\).*ids\[None\]"):
        hasher.hash(np.array([1, 2, 3]), 0)
    with pytest.raises(InputError, match=r"token_ids must be integers, got dtype=float32"):
        hasher.hash(np.ones((1, 3), np.float32), 0)
    with pytest.raises(InputError, match=r"token_ids must be integers, got dtype=torch.float32"):
        hasher.hash(torch.ones(1, 3), 0)
    with pytest.raises(InputError, match=r"layer_id=5 has no table: this spec has layer_ids=\(0,\)"):
        hasher.hash(np.ones((1, 3), np.int64), 5)
    with pytest.raises(TokenIdError, match=r"token_ids holds id 100, outside \[0, 100\)"):
        hasher.hash(np.array([[1, 100]]), 0)
    with pytest.raises(TokenIdError, match=r"holds id -3"):
        hasher.hash(torch.tensor([[-3, 1]]), 0)
    with pytest.raises(SpecMismatchError, match=r"compressed_vocab_size=99 but spec.compressed_vocab_size=100"):
        NgramHasher(spec, Compression.identity(99))
    with pytest.raises(SpecError, match=r"pad_id=200 is outside the compression's vocabulary \[0, 100\)"):
        NgramHasher(spec.replace(pad_id=200), comp)
    with pytest.raises(InputError, match="multipliers exist only for hash='multiplicative-xor'"):
        NgramHasher(spec.replace(hash="murmur3"), comp).multipliers(0)
    with pytest.raises(InputError, match="spec must be an engram.TableSpec, got dict"):
        NgramHasher(spec.to_dict(), comp)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_cuda_inputs_return_on_their_device(golden):
    g = golden("hash_deepseek_default")
    spec, comp = _golden_case(g)
    got = NgramHasher(spec, comp).hash(torch.tensor(g["input_ids"], device="cuda"), 1)
    assert got.device.type == "cuda"
    np.testing.assert_array_equal(got.cpu().numpy(), np.array(g["hash_ids"]["1"]))


def test_nested_lists_hash_like_numpy():
    comp = Compression.identity(100)
    spec = TableSpec(engram_vocab_size=(101, 101), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=4,
                     layer_ids=(0,), compressed_vocab_size=100)
    hasher = NgramHasher(spec, comp)
    out = hasher.hash([[1, 2, 3], [4, 5, 6]], 0)
    assert isinstance(out, np.ndarray) and out.dtype == np.int64
    np.testing.assert_array_equal(out, hasher.hash(np.array([[1, 2, 3], [4, 5, 6]]), 0))
    assert hasher.hash([[]], 0).shape == (1, 0, 4)
    with pytest.raises(InputError, match=r"token_ids must be shaped \[B, T\] .*got shape \(3,\)"):
        hasher.hash([1, 2, 3], 0)
    with pytest.raises(InputError, match=r"token_ids is a ragged nested sequence .*every sequence of the same"):
        hasher.hash([[1, 2, 3], [4]], 0)
    with pytest.raises(InputError, match=r"token_ids must be integers, got dtype=float64"):
        hasher.hash([[1.5, 2.0]], 0)


def test_global_rows_are_head_rows_plus_head_offsets():
    import torch

    comp = Compression.identity(100)
    spec = TableSpec(engram_vocab_size=(50, 60), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=8,
                     layer_ids=(0, 4), compressed_vocab_size=100)
    hasher = NgramHasher(spec, comp)
    ids = np.random.default_rng(0).integers(0, 100, (2, 9))
    expected = hasher.hash(ids, 4) + np.asarray(spec.head_offsets(4))
    got = hasher.global_rows(ids, 4)
    assert got.dtype == np.int64 and np.array_equal(got, expected)
    assert got.min() >= 0 and got.max() < spec.rows(4)
    assert torch.equal(hasher.global_rows(torch.from_numpy(ids), 4), torch.from_numpy(expected))


def test_ids_past_int64_are_named_as_given_not_wrapped():
    comp = Compression.identity(100)
    spec = TableSpec(engram_vocab_size=(50, 60), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=8,
                     layer_ids=(0,), compressed_vocab_size=100)
    with pytest.raises(TokenIdError, match=r"token_ids holds id 9223372036854775808, beyond every vocabulary"):
        NgramHasher(spec, comp).hash([[2**63]], 0)
