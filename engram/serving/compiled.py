"""Compiled decode-step kernels: hash a few new tokens against their history and gather their rows
in one call (numba, the "fast" extra). `engram.serving.decode_step` decides when they run.

A decode step looks up one or a few tokens per sequence. Done with the batched numpy path, the
arithmetic of one token (N-1 orders x K heads: a few multiplies, xors and modulos, then H row
copies of D values) is buried under a hundred numpy and torch calls of a few microseconds each.
Here it is one loop per token, in one compiled call:

- `step_rows`: the global rows [B, T, H] of new raw ids [B, T] that continue an NgramHistory
  (its raw ids and document starts, newest last); the same rows `NgramHasher.hash_grams` gives
  after `context_grams`, for every hash family (`xxh64_words` and `murmur3_words` are XXH64 and
  the first 64 bits of MurmurHash3_x64_128 over little-endian uint32 words, pinned against the
  xxhash and mmh3 libraries by the tests);
- `step_gather` / `step_gather_cached`: those rows copied from a layer's rows in memory into the
  output [B, T, E] (the cached one reads rows the hot-row cache holds from the cache, as the
  gather engine does), returning the counters of the gather; a row of the "mmap" tier in a unit
  not checked yet (`engram.serving.verified`) stops the copy with `UNVERIFIED`;
- `all_checked`: whether every row of a gather lies in units checked already.

The per-layer constants travel as one int64 array (`step_constants`), so a call passes few
arguments (numba's dispatch costs about 0.1 us per array). Ids outside the vocabulary and a
history of another batch size are reported, not raised (`BAD_IDS`, `BAD_BATCH`): the caller then
takes the checked path, which raises the error it names (or, after `UNVERIFIED`, checks the units).

Without numba `COMPILED` is False and nothing here is compiled: lookups take the batched path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engram.addressing.compression import Compression
from engram.addressing.hashing import NgramHasher, layer_seed
from engram.addressing.spec import HASH_FAMILIES
from engram.fast import NUMBA

__all__ = ["COMPILED", "BAD_IDS", "BAD_BATCH", "UNVERIFIED", "step_constants", "step_rows", "step_gather",
           "step_gather_cached", "all_checked", "xxh64_words", "murmur3_words"]

# step kernels' status: an id outside the vocabulary, B != history's B, a row in a unit not checked yet
BAD_IDS, BAD_BATCH, UNVERIFIED = -1, -2, -3
_HEADER = 8                          # step_constants: header slots before the multipliers


def step_constants(spec: Any, comp: Compression, layer_id: int, dedup: bool = False) -> np.ndarray:
    """One layer's addressing as the kernels read it: int64 [8 + N + 2H].

    [family, N, K, compressed pad id, hash seed, vocabulary size, dedup, 0, multipliers (N),
    primes (H), head offsets (H)]; the seed is the layer's, mod 2**32 (xxh64 / murmur3 only).
    """
    N, K = spec.max_ngram_size, spec.n_head_per_ngram
    family = HASH_FAMILIES.index(spec.hash)
    mult = NgramHasher(spec, comp).multipliers(layer_id) if family == 0 else np.zeros(N, np.int64)
    header = [family, N, K, int(comp.lookup[spec.pad_id]), layer_seed(spec, layer_id) % 2**32, comp.vocab_size,
              int(dedup), 0]
    return np.concatenate([np.asarray(header, np.int64), mult, np.asarray(spec.table_sizes(layer_id), np.int64),
                           np.asarray(spec.head_offsets(layer_id), np.int64)])


_NUMBA = NUMBA
COMPILED = _NUMBA is not None        # whether the kernels exist (numba installed)

_U = np.uint64
_P1, _P2, _P3 = _U(0x9E3779B185EBCA87), _U(0xC2B2AE3D27D4EB4F), _U(0x165667B19E3779F9)
_P4, _P5 = _U(0x85EBCA77C2B2AE63), _U(0x27D4EB2F165667C5)
_C1, _C2 = _U(0x87C37B91114253D5), _U(0x4CF5AD432745937F)
_F1, _F2 = _U(0xFF51AFD7ED558CCD), _U(0xC4CEB9FE1A85EC53)


def _decorator() -> Any:
    """numba's njit (LLVM inlines the small helpers into the kernels); without numba, a decorator that
    leaves the functions as they are (never called: COMPILED is False)."""
    if _NUMBA is None:
        return lambda fn: fn
    return _NUMBA.njit(nogil=True, cache=True, boundscheck=False)


# One module holds every kernel: numba's disk cache notices changes to the file that defines a
# kernel, not to the files of the functions it calls.
jit = _decorator()


@jit
def _rotl(x: Any, r: int) -> Any:
    return (x << _U(r)) | (x >> _U(64 - r))

@jit
def _xxh_round(acc: Any, lane: Any) -> Any:
    return _rotl(acc + lane * _P2, 31) * _P1

@jit
def xxh64_words(words: np.ndarray, n: int, seed: Any) -> Any:
    """XXH64 of n little-endian uint32 words (words[:n], uint64 holding uint32 values)
    (spec: github.com/Cyan4973/xxHash, doc/xxhash_spec.md)."""
    s = _U(seed)
    i = 0
    if n >= 8:                                   # 32-byte stripes
        v1, v2, v3, v4 = s + _P1 + _P2, s + _P2, s, s - _P1
        while i + 8 <= n:
            v1 = _xxh_round(v1, words[i] | (words[i + 1] << _U(32)))
            v2 = _xxh_round(v2, words[i + 2] | (words[i + 3] << _U(32)))
            v3 = _xxh_round(v3, words[i + 4] | (words[i + 5] << _U(32)))
            v4 = _xxh_round(v4, words[i + 6] | (words[i + 7] << _U(32)))
            i += 8
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = (h ^ _xxh_round(_U(0), v1)) * _P1 + _P4
        h = (h ^ _xxh_round(_U(0), v2)) * _P1 + _P4
        h = (h ^ _xxh_round(_U(0), v3)) * _P1 + _P4
        h = (h ^ _xxh_round(_U(0), v4)) * _P1 + _P4
    else:
        h = s + _P5
    h += _U(4 * n)
    while i + 2 <= n:                            # 8-byte lanes
        h = _rotl(h ^ _xxh_round(_U(0), words[i] | (words[i + 1] << _U(32))), 27) * _P1 + _P4
        i += 2
    if i < n:                                    # a last 4-byte word
        h = _rotl(h ^ (words[i] * _P1), 23) * _P2 + _P3
    h ^= h >> _U(33)
    h *= _P2
    h ^= h >> _U(29)
    h *= _P3
    h ^= h >> _U(32)
    return h

@jit
def _fmix(k: Any) -> Any:
    k ^= k >> _U(33)
    k *= _F1
    k ^= k >> _U(33)
    k *= _F2
    k ^= k >> _U(33)
    return k

@jit
def murmur3_words(words: np.ndarray, n: int, seed: Any) -> Any:
    """The first 64 bits of MurmurHash3_x64_128 of n little-endian uint32 words
    (github.com/aappleby/smhasher, MurmurHash3.cpp)."""
    h1 = _U(seed)
    h2 = _U(seed)
    blocks = n // 4
    for b in range(blocks):                      # 16-byte blocks
        k1 = words[4 * b] | (words[4 * b + 1] << _U(32))
        k2 = words[4 * b + 2] | (words[4 * b + 3] << _U(32))
        h1 ^= _rotl(k1 * _C1, 31) * _C2
        h1 = (_rotl(h1, 27) + h2) * _U(5) + _U(0x52DCE729)
        h2 ^= _rotl(k2 * _C2, 33) * _C1
        h2 = (_rotl(h2, 31) + h1) * _U(5) + _U(0x38495AB5)
    tail, base = n - 4 * blocks, 4 * blocks
    if tail == 3:
        h2 ^= _rotl(words[base + 2] * _C2, 33) * _C1
    if tail >= 1:
        k1 = words[base] | (words[base + 1] << _U(32)) if tail >= 2 else words[base]
        h1 ^= _rotl(k1 * _C1, 31) * _C2
    h1 ^= _U(4 * n)
    h2 ^= _U(4 * n)
    h1 += h2
    h2 += h1
    return _fmix(h1) + _fmix(h2)

@jit
def step_rows(ids: np.ndarray, hist: np.ndarray, starts: np.ndarray, lookup: np.ndarray, c: np.ndarray,
              rows: np.ndarray) -> int:
    """rows[b, t, h] = global row of head h for raw id ids[b, t] after the history's raw ids
    hist [B, W] (starts [B, W]: a document starts there); 0, BAD_IDS or BAD_BATCH."""
    B, T = ids.shape
    W = hist.shape[1]
    family, N, K, pad, vocab = c[0], c[1], c[2], c[3], c[5]
    P, H = N - 1, (N - 1) * K
    if hist.shape[0] != B or W < P:
        return BAD_BATCH
    for b in range(B):
        for t in range(T):
            if ids[b, t] < 0 or ids[b, t] >= vocab:
                return BAD_IDS
    mult, primes, offsets = c[_HEADER:_HEADER + N], c[_HEADER + N:_HEADER + N + H], c[_HEADER + N + H:]
    grams = np.empty(N, np.int64)                # grams[k]: the compressed id k positions back
    words = np.empty(N, np.uint64)
    seed = _U(c[4])
    for b in range(B):
        cut = 0                                  # tail columns before the last document start read pad
        for col in range(P - 1, 0, -1):
            if starts[b, W - P + col]:
                cut = col
                break
        for t in range(T):
            for k in range(N):
                col = P + t - k                  # column in [tail (P) | new ids (T)]
                if col >= P:
                    grams[k] = lookup[ids[b, col - P]]
                elif col < cut:
                    grams[k] = pad
                else:
                    grams[k] = lookup[hist[b, W - P + col]]
            mix = grams[0] * mult[0]
            for order in range(2, N + 1):
                if family == 0:
                    mix ^= grams[order - 1] * mult[order - 1]     # never overflows int64 (the multipliers' bound)
                    h = _U(mix)
                else:
                    for j in range(order):       # the n-gram's ids, oldest first
                        words[j] = _U(grams[order - 1 - j])
                    h = xxh64_words(words, order, seed) if family == 1 else murmur3_words(words, order, seed)
                first = (order - 2) * K
                for k in range(first, first + K):
                    rows[b, t, k] = np.int64(h % _U(primes[k])) + offsets[k]
    return 0

@jit
def _distinct(rows: np.ndarray) -> Any:
    s = np.sort(rows)
    return 1 + np.count_nonzero(s[1:] != s[:-1]) if s.size else 0


@jit
def _shift_of(unit: int) -> int:
    """log2(unit) for a power of two (4 KiB blocks: a shift, not a division per row), else -1."""
    shift = 0
    while (1 << shift) < unit:
        shift += 1
    return shift if (1 << shift) == unit else -1


@jit
def _unverified(row: int, row_bytes: int, unit: int, shift: int, verified: np.ndarray) -> bool:
    """Whether a unit holding a byte of `row` is not checked yet (`verified`: a byte per unit;
    `shift`: `_shift_of(unit)`)."""
    start = row * row_bytes
    if shift >= 0:
        first, last = start >> shift, (start + row_bytes - 1) >> shift
    else:
        first, last = start // unit, (start + row_bytes - 1) // unit
    for u in range(first, last + 1):
        if not verified[u]:
            return True
    return False


@jit
def all_checked(rows: np.ndarray, row_bytes: int, unit: int, verified: np.ndarray) -> bool:
    """Whether every unit holding a byte of `rows` [n] is checked (an empty `verified`: nothing to check)."""
    if verified.size == 0:
        return True
    if unit % row_bytes == 0:                    # no row spans two units: one test per row, no branch
        per = unit // row_bytes
        shift, bad = _shift_of(per), 0
        if shift >= 0:
            for i in range(rows.size):
                bad |= verified[rows[i] >> shift] ^ 1
        else:
            for i in range(rows.size):
                bad |= verified[rows[i] // per] ^ 1
        return bad == 0
    shift = _shift_of(unit)
    for i in range(rows.size):
        if _unverified(rows[i], row_bytes, unit, shift, verified):
            return False
    return True


@jit
def step_gather(ids: np.ndarray, hist: np.ndarray, starts: np.ndarray, lookup: np.ndarray, c: np.ndarray,
                weights: np.ndarray, out: np.ndarray, verified: np.ndarray, unit: int) -> int:
    """out[b, t, h*D:(h+1)*D] = weights[row of head h] (`weights` [rows, D] and `out` [B, T, H*D]
    C-contiguous); returns the rows' distinct count (all of them unless the constants ask for
    dedup), or step_rows' error status, or UNVERIFIED if a row lies in a unit of `unit` bytes whose
    byte in `verified` is 0 (an empty `verified`: rows are not checked)."""
    B, T = ids.shape
    H, D = (c[1] - 1) * c[2], weights.shape[1]
    rows = np.empty((B, T, H), np.int64)
    status = step_rows(ids, hist, starts, lookup, c, rows)
    if status < 0:
        return status
    flat, dst = rows.reshape(-1), out.reshape(-1)
    if not all_checked(flat, D * weights.itemsize, unit, verified):
        return UNVERIFIED
    for i in range(flat.size):
        row = flat[i]
        for d in range(D):                          # a loop-invariant row: the copy vectorizes
            dst[i * D + d] = weights[row, d]
    return _distinct(flat) if c[6] else flat.size


@jit
def _slot_of(row: int, slots: np.ndarray, bits: np.ndarray, cached: np.ndarray) -> Any:
    """The hot-row cache slot of a row, or -1: a dense slot array, or a bitmap and sorted rows."""
    if slots.size:
        return slots[row]
    if not (bits[row >> 3] >> (row & 7)) & 1:
        return -1
    return np.searchsorted(cached, row)


@jit
def step_gather_cached(ids: np.ndarray, hist: np.ndarray, starts: np.ndarray, lookup: np.ndarray,
                       c: np.ndarray, weights: np.ndarray, out: np.ndarray, verified: np.ndarray, unit: int,
                       slots: np.ndarray, bits: np.ndarray, cached: np.ndarray, data: np.ndarray) -> int:
    """step_gather, reading the rows a hot-row cache holds from its `data` [n, D] (C-contiguous; its
    rows were checked when the cache was filled); returns distinct rows << 32 | distinct cached rows
    (as the gather engine counts), or an error status."""
    B, T = ids.shape
    H, D = (c[1] - 1) * c[2], weights.shape[1]
    rows = np.empty((B, T, H), np.int64)
    status = step_rows(ids, hist, starts, lookup, c, rows)
    if status < 0:
        return status
    flat, dst = rows.reshape(-1), out.reshape(-1)
    hits = 0
    row_bytes, shift = D * weights.itemsize, _shift_of(unit)
    for i in range(flat.size):
        slot = _slot_of(flat[i], slots, bits, cached)
        if slot < 0 and verified.size and _unverified(flat[i], row_bytes, unit, shift, verified):
            return UNVERIFIED
        src, row = (weights, flat[i]) if slot < 0 else (data, slot)
        hits += slot >= 0
        for d in range(D):
            dst[i * D + d] = src[row, d]
    if not c[6]:
        return flat.size << 32 | hits
    s = np.sort(flat)
    unique = hits = 0
    for i in range(s.size):
        if i == 0 or s[i] != s[i - 1]:
            unique += 1
            hits += _slot_of(s[i], slots, bits, cached) >= 0
    return unique << 32 | hits
