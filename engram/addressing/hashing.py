"""NgramHasher: the one batched implementation of every hash family.

For each position t and order n in 2..N, the n-gram (x[t-n+1], ..., x[t]) of compressed ids
(left-padded with the compressed pad id) is mixed into one 64-bit value h shared by the order's
K heads; head k addresses row `h mod p[n][k]` of its own prime-sized table.

Families (see API.md):
- "multiplicative-xor": h = x[t]*m0 ^ x[t-1]*m1 ^ ... (int64), bit-exact with the reference.
- "xxh64":  h = XXH64(key, seed=s);  "murmur3": h = MurmurHash3_x64_128(key, seed=s)[0],
  key = the n ids as little-endian uint32, oldest first; s = (seed + 10007*layer_id) mod 2**32.

Everything runs vectorized in numpy over the whole [B, T] batch (numpy releases the GIL inside
its loops). Torch inputs on any device are hashed on the host and returned on their device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engram.addressing.compression import Compression, check_pair
from engram.addressing.history import NgramHistory, check_flags, check_history, ngram_columns
from engram.addressing.spec import TableSpec
from engram.errors import InputError, SpecError
from engram.tensors import check_ids_2d, is_torch, to_numpy_ids

__all__ = ["NgramHasher", "layer_seed"]

_LAYER_SEED_PRIME = 10007  # the reference's PRIME_1
_U64 = np.uint64


def layer_seed(spec: TableSpec, layer_id: int) -> int:
    """The per-layer seed: `seed + 10007*layer_id` (reduced mod 2**32 for xxh64/murmur3)."""
    return spec.seed + _LAYER_SEED_PRIME * layer_id


def _reference_multipliers(spec: TableSpec, layer_id: int) -> np.ndarray:
    """N odd int64 multipliers, drawn as the reference draws them.

    They are bounded so that `id * m` never overflows int64 for ids < compressed_vocab_size.
    """
    max_multiplier = np.iinfo(np.int64).max // spec.compressed_vocab_size
    half_bound = max(1, max_multiplier // 2)
    rng = np.random.default_rng(layer_seed(spec, layer_id))
    return rng.integers(0, half_bound, size=(spec.max_ngram_size,), dtype=np.int64) * 2 + 1


# --------------------------------------------------------------------------------------------
# 64-bit mixing in numpy uint64 arithmetic (wrapping). `words[k]` is the [B,T] uint64 array of
# the k-th id of the key, oldest first.
# --------------------------------------------------------------------------------------------
# A uint64 array, or one uint64 (the seeded accumulators start as scalars).
_U64Values = np.ndarray | np.uint64


def _rotl(x: _U64Values, r: int) -> _U64Values:
    return (x << _U64(r)) | (x >> _U64(64 - r))


_XXH_P1 = _U64(0x9E3779B185EBCA87)
_XXH_P2 = _U64(0xC2B2AE3D27D4EB4F)
_XXH_P3 = _U64(0x165667B19E3779F9)
_XXH_P4 = _U64(0x85EBCA77C2B2AE63)
_XXH_P5 = _U64(0x27D4EB2F165667C5)


def _xxh_round(acc: _U64Values, lane: _U64Values) -> _U64Values:
    return _rotl(acc + lane * _XXH_P2, 31) * _XXH_P1


def _xxh64(words: list[np.ndarray], seed: int) -> np.ndarray:
    """XXH64 of the 4*len(words)-byte keys (spec: github.com/Cyan4973/xxHash, doc/xxhash_spec.md)."""
    n_bytes = 4 * len(words)
    lanes = [words[i] | (words[i + 1] << _U64(32)) for i in range(0, len(words) - 1, 2)]
    i = 0
    if n_bytes >= 32:
        p1, p2 = int(_XXH_P1), int(_XXH_P2)
        acc: list[_U64Values] = [_U64((seed + v) % 2**64) for v in (p1 + p2, p2, 0, -p1)]
        while len(lanes) - i >= 4:  # 32-byte stripes
            acc = [_xxh_round(a, lanes[i + j]) for j, a in enumerate(acc)]
            i += 4
        h = _rotl(acc[0], 1) + _rotl(acc[1], 7) + _rotl(acc[2], 12) + _rotl(acc[3], 18)
        for a in acc:
            h = (h ^ _xxh_round(_U64(0), a)) * _XXH_P1 + _XXH_P4
    else:
        h = np.full(words[0].shape, (seed + int(_XXH_P5)) % 2**64, dtype=np.uint64)
    h = h + _U64(n_bytes)
    for lane in lanes[i:]:
        h = _rotl(h ^ _xxh_round(_U64(0), lane), 27) * _XXH_P1 + _XXH_P4
    if len(words) % 2:
        h = _rotl(h ^ (words[-1] * _XXH_P1), 23) * _XXH_P2 + _XXH_P3
    h ^= h >> _U64(33)
    h *= _XXH_P2
    h ^= h >> _U64(29)
    h *= _XXH_P3
    h ^= h >> _U64(32)
    return np.asarray(h)


_MM_C1 = _U64(0x87C37B91114253D5)
_MM_C2 = _U64(0x4CF5AD432745937F)


def _fmix64(k: np.ndarray) -> np.ndarray:
    k = k ^ (k >> _U64(33))
    k = k * _U64(0xFF51AFD7ED558CCD)
    k ^= k >> _U64(33)
    k *= _U64(0xC4CEB9FE1A85EC53)
    k ^= k >> _U64(33)
    return k


def _murmur3(words: list[np.ndarray], seed: int) -> np.ndarray:
    """First 64 bits of MurmurHash3_x64_128 (github.com/aappleby/smhasher, MurmurHash3.cpp)."""
    n_bytes = 4 * len(words)
    h1 = np.full(words[0].shape, seed, dtype=np.uint64)
    h2 = h1.copy()
    n_blocks = len(words) // 4
    for b in range(n_blocks):
        w = words[4 * b: 4 * b + 4]
        k1 = w[0] | (w[1] << _U64(32))
        k2 = w[2] | (w[3] << _U64(32))
        h1 ^= _rotl(k1 * _MM_C1, 31) * _MM_C2
        h1 = (_rotl(h1, 27) + h2) * _U64(5) + _U64(0x52DCE729)
        h2 ^= _rotl(k2 * _MM_C2, 33) * _MM_C1
        h2 = (_rotl(h2, 31) + h1) * _U64(5) + _U64(0x38495AB5)
    tail = words[4 * n_blocks:]
    if len(tail) == 3:
        h2 ^= _rotl(tail[2] * _MM_C2, 33) * _MM_C1
    if tail:
        k1 = tail[0] | (tail[1] << _U64(32)) if len(tail) >= 2 else tail[0]
        h1 ^= _rotl(k1 * _MM_C1, 31) * _MM_C2
    h1 ^= _U64(n_bytes)
    h2 ^= _U64(n_bytes)
    h1 += h2
    h2 += h1
    h1 = _fmix64(h1)
    h2 = _fmix64(h2)
    return h1 + h2


# --------------------------------------------------------------------------------------------
# h mod p over a whole array, without integer division (~4x cheaper per head than np.remainder).
# x = h * ((1 - 2**-50) / p) in float64 undershoots h/p by less than 11/32 when p > 2**16 (the
# quotient is < 2**48 and the relative error < 11 * 2**-53), and never overshoots. Adding 2**52
# rounds it to an integer held in the mantissa bits, so q_est = bits - MAGIC is floor(h/p) or
# one more, r = h - q_est*p lies in [-p, p), and one unsigned min of r and r+p folds it into
# [0, p). All uint64 arithmetic wraps, so MAGIC*p is folded in as a constant.
# --------------------------------------------------------------------------------------------
_FAST_MOD_MIN_PRIME = 1 << 16
_TWO52 = 2.0**52
_MAGIC = 0x4330000000000000  # the bits of float64 2**52


def _mod_into(h: np.ndarray, h_float: np.ndarray, p: int, out: np.ndarray, scratch: dict) -> None:
    """out[...] = h % p for uint64 arrays (out is uint64 or an int64 array viewed as uint64)."""
    if p <= _FAST_MOD_MIN_PRIME:
        np.remainder(h, _U64(p), out=out)
        return
    qf = scratch.setdefault("qf", np.empty(h.shape, np.float64))
    r = scratch.setdefault("r", np.empty(h.shape, np.uint64))
    q = qf.view(np.uint64)
    np.multiply(h_float, (1.0 - 2.0**-50) / p, out=qf)
    np.add(qf, _TWO52, out=qf)                      # bits(qf) = MAGIC + q_est
    np.multiply(q, _U64(p), out=q)
    np.subtract(h, q, out=r)                        # r = h - q_est*p - MAGIC*p
    np.add(r, _U64(_MAGIC * p % 2**64), out=r)      # r = h - q_est*p, in [-p, p)
    np.add(r, _U64(p), out=q)
    np.minimum(r, q, out=out)


class NgramHasher:
    """Maps token ids to the rows they address, per layer and head.

    Args:
        spec: the table spec (sizes, orders, heads, seed, hash family).
        comp: the token-id compression; its `compressed_vocab_size` must equal the spec's.

    Example:
        >>> comp = Compression.identity(100)
        >>> spec = TableSpec(engram_vocab_size=(50, 50), max_ngram_size=3, n_head_per_ngram=2,
        ...                  n_embed_per_ngram=8, layer_ids=(0,), compressed_vocab_size=100)
        >>> NgramHasher(spec, comp).hash(np.array([[5, 6, 7]]), 0).shape
        (1, 3, 4)
    """

    def __init__(self, spec: TableSpec, comp: Compression) -> None:
        check_pair(spec, comp, "build the spec with compressed_vocab_size=comp.compressed_vocab_size")
        if spec.pad_id >= comp.vocab_size:
            raise SpecError(
                f"TableSpec.pad_id={spec.pad_id} is outside the compression's vocabulary "
                f"[0, {comp.vocab_size}): choose a raw token id of this tokenizer"
            )
        self.spec = spec
        self.comp = comp
        self._pad = int(comp.lookup[spec.pad_id])
        self._fingerprint = comp.fingerprint       # computed once: histories are checked against it per lookup
        self._multipliers = {
            layer_id: _reference_multipliers(spec, layer_id) for layer_id in spec.layer_ids
        }

    def table_sizes(self, layer_id: int) -> list[int]:
        """The H primes of one layer, order-major."""
        return list(self.spec.table_sizes(layer_id))

    def multipliers(self, layer_id: int) -> np.ndarray:
        """The N odd int64 multipliers of one layer ("multiplicative-xor" only)."""
        if self.spec.hash != "multiplicative-xor":
            raise InputError(
                f"multipliers exist only for hash='multiplicative-xor'; this spec uses {self.spec.hash!r}"
            )
        return self._multipliers[self.spec.check_layer(layer_id)].copy()

    def hash(self, token_ids: Any, layer_id: int, *, history: NgramHistory | None = None, mask: Any = None,
             doc_start: Any = None) -> Any:
        """Row index inside each head's table: [B,T] raw ids -> int64 [B,T,H], same kind/device.

        `token_ids` is a numpy array, a torch tensor (the result is a tensor on its device) or
        nested lists such as `[[1, 2, 3]]` (the result is a numpy array).

        Args:
            history: an `engram.NgramHistory`: the ids continue its sequences (their n-grams
                reach back into it), as in the full sequence; it is only read.
            mask: [B, T] bool, False at padding: padding positions are skipped when later
                positions look back (their own rows are those of a token placed there).
            doc_start: [B, T] bool: a document starts there; the look-back stops at it (the pad
                id before it), as if each document were hashed alone (packed sequences).
        """
        token_ids = _ids_array(token_ids)
        check_ids_2d(token_ids)
        layer_id = self.spec.check_layer(layer_id)
        ids = to_numpy_ids(token_ids)
        self.comp.check_ids(ids)
        grams = self.context_grams(self.comp.lookup[ids], history, mask, doc_start)
        out = self.hash_grams(grams, layer_id)
        if is_torch(token_ids):
            import torch

            return torch.from_numpy(out).to(token_ids.device)
        return out

    def global_rows(self, token_ids: Any, layer_id: int, **context: Any) -> Any:
        """Rows of the layer's whole table (every head's table stacked, as stored): [B,T] raw ids
        -> int64 [B,T,H], `hash(...)` plus `spec.head_offsets(layer_id)`; same kind/device.
        `history`, `mask`, `doc_start` as for `hash`."""
        rows = self.hash(token_ids, layer_id, **context)
        offsets = np.asarray(self.spec.head_offsets(layer_id), np.int64)   # [H]
        if isinstance(rows, np.ndarray):
            return np.add(rows, offsets, out=np.empty(rows.shape, np.int64))
        import torch

        return rows + torch.from_numpy(offsets).to(rows.device)

    def context_grams(self, x: np.ndarray, history: NgramHistory | None = None, mask: Any = None,
                      doc_start: Any = None) -> list[np.ndarray]:
        """Check `history`, `mask` and `doc_start` (as for `hash`) against compressed ids x [B, T]
        and return the N columns of every position's n-gram for `hash_grams` (see
        `engram.addressing.history.ngram_columns`)."""
        shape = x.shape
        if history is not None:
            history = check_history(history, self.spec, self._fingerprint, shape[0])
        mask, doc_start = check_flags("mask", mask, shape), check_flags("doc_start", doc_start, shape)
        return ngram_columns(x, self.spec.max_ngram_size, self._pad, self.comp.lookup, history, mask, doc_start)

    def hash_compressed(self, x: np.ndarray, layer_id: int, out: np.ndarray | None = None) -> np.ndarray:
        """The core: compressed int64 ids [B,T] -> int64 [B,T,H] head rows.

        `out`, if given, is a contiguous int64 [H,B,T] buffer to reuse; the result is its
        transposed view.
        """
        return self.hash_grams(ngram_columns(x, self.spec.max_ngram_size, self._pad, self.comp.lookup), layer_id, out)

    def hash_grams(self, grams: list[np.ndarray], layer_id: int, out: np.ndarray | None = None) -> np.ndarray:
        """Head rows int64 [B,T,H] of n-grams given by their columns: grams[k], shape [B,T], holds the
        compressed id k positions back (k = 0..N-1, from `context_grams`). `out` as for
        `hash_compressed`."""
        spec = self.spec
        B, T = grams[0].shape
        N, K = spec.max_ngram_size, spec.n_head_per_ngram
        # Heads are computed into a head-major buffer (contiguous writes); the caller gets the
        # [B,T,H] view of it (consumers fold the transpose into their own pass, e.g. offsets).
        if out is None:
            out = np.empty((spec.heads_per_layer, B, T), np.int64)
        rows = out.view(np.uint64)
        shifted = grams                                   # shifted[k][b, t] = x[b, t-k] (or pad)
        sizes = spec.table_sizes(layer_id)
        scratch: dict = {}
        mix = None
        for order in range(2, N + 1):
            if spec.hash == "multiplicative-xor":
                m = self._multipliers[layer_id]
                if mix is None:
                    mix = shifted[0] * m[0]
                mix ^= shifted[order - 1] * m[order - 1]   # never overflows: see _reference_multipliers
                h = mix.view(np.uint64)
            else:
                seed = layer_seed(spec, layer_id) % 2**32
                words = [shifted[k].astype(np.uint64) for k in range(order - 1, -1, -1)]
                h = (_xxh64 if spec.hash == "xxh64" else _murmur3)(words, seed)
            h_float = h.astype(np.float64)
            first = (order - 2) * K
            for k in range(K):
                _mod_into(h, h_float, sizes[first + k], rows[first + k], scratch)
        return out.transpose(1, 2, 0)


def _ids_array(token_ids: Any) -> Any:
    """Tensors and numpy arrays as they are; nested lists of ids as a numpy array."""
    if is_torch(token_ids) or isinstance(token_ids, np.ndarray):
        return token_ids
    try:
        ids = np.asarray(token_ids)
    except ValueError as exc:
        raise InputError(f"token_ids is a ragged nested sequence ({exc}): pass [B, T] ids, every sequence "
                         "of the same length T") from exc
    return ids.astype(np.int64) if ids.size == 0 else ids    # [[]] is float64 to numpy
