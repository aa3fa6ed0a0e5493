"""Corpus statistics: how a corpus's n-grams fall onto a table's rows.

Everything is computed from the corpus's *distinct* n-grams and their counts, so memory grows with
the number of distinct n-grams, not with the table size or the corpus length times the heads.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from engram.addressing.compression import Compression, load_tokenizer
from engram.addressing.hashing import NgramHasher
from engram.addressing.spec import HASH_FAMILIES, TableSpec
from engram.errors import InputError, MissingFileError
from engram.serving.hotrows import HotRowPlan
from engram.tensors import to_numpy_ids

__all__ = [
    "CorpusStats", "NgramCounts", "count_ngrams", "corpus_stats", "coverage_rows", "tokenize_files", "zipf_exponent",
]

COVERAGE_LEVELS = (0.5, 0.9, 0.99)


@dataclasses.dataclass(frozen=True)
class NgramCounts:
    """Distinct n-grams of one order and how often each occurs.

    `grams` is int64 [M, n] (compressed ids, oldest first, pad included where the n-gram reaches
    left of the sequence start); `counts` is int64 [M], sorted descending.
    """

    order: int
    grams: np.ndarray
    counts: np.ndarray

    @property
    def distinct(self) -> int:
        return int(self.counts.size)

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def _unique_rows(grams: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unique rows of an int64 [M, n] array, with summed counts, sorted by count descending."""
    if grams.shape[0] == 0:
        return grams, np.zeros(0, np.int64)
    packed = np.ascontiguousarray(grams).view(np.dtype((np.void, grams.dtype.itemsize * grams.shape[1])))[:, 0]
    uniq, inverse = np.unique(packed, return_inverse=True)
    weights = np.ones(grams.shape[0], np.int64) if counts is None else counts
    summed = np.bincount(inverse.ravel(), weights=weights, minlength=uniq.size).astype(np.int64)
    grams = uniq.view(grams.dtype).reshape(-1, grams.shape[1])
    order = np.argsort(-summed, kind="stable")
    return grams[order], summed[order]


def count_ngrams(sequences: Iterable[Any], spec: TableSpec, comp: Compression) -> dict[int, NgramCounts]:
    """Count the distinct n-grams of orders 2..N over token-id sequences (1-D raw ids each).

    Each sequence is left-padded with the compressed pad id exactly as the hasher pads it.
    """
    pad = int(comp.lookup[spec.pad_id])
    N = spec.max_ngram_size
    parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in range(2, N + 1)}
    for seq in sequences:
        ids = to_numpy_ids(seq, "sequence")
        if ids.ndim != 1:
            raise InputError(f"each sequence must be 1-D token ids, got shape {ids.shape}")
        comp.check_ids(ids, "sequence")
        if ids.size == 0:
            continue
        padded = np.concatenate([np.full(N - 1, pad, np.int64), comp.lookup[ids]])
        for n in range(2, N + 1):
            windows = np.lib.stride_tricks.sliding_window_view(padded[N - n:], n)  # [T, n], oldest first
            parts[n].append(_unique_rows(windows))
    out = {}
    for n, chunks in parts.items():
        if chunks:
            grams, counts = _unique_rows(np.concatenate([g for g, _ in chunks]),
                                         np.concatenate([c for _, c in chunks]))
        else:
            grams, counts = np.zeros((0, n), np.int64), np.zeros(0, np.int64)
        out[n] = NgramCounts(n, grams, counts)
    return out


def zipf_exponent(counts: np.ndarray) -> float:
    """The Zipf exponent s of a frequency list, f(rank) ~ rank**-s.

    Least-squares slope of log(frequency) on log(rank) over the n-grams seen at least twice (the
    singleton tail is flat by construction and would drag the fit); nan with fewer than 3 points.
    """
    counts = np.sort(np.asarray(counts))[::-1]
    counts = counts[counts >= 2]
    if counts.size < 3:
        return float("nan")
    ranks = np.arange(1, counts.size + 1, dtype=np.float64)
    slope = np.polyfit(np.log(ranks), np.log(counts.astype(np.float64)), 1)[0]
    return float(-slope)


def coverage_rows(lookups_per_row: np.ndarray, levels: Sequence[float] = COVERAGE_LEVELS) -> dict[float, int]:
    """How many of the most-used rows serve each share of all lookups."""
    counts = np.sort(np.asarray(lookups_per_row))[::-1]
    cumulative = np.cumsum(counts)
    total = cumulative[-1] if cumulative.size else 0
    return {level: int(np.searchsorted(cumulative, level * total) + 1) if total else 0 for level in levels}


def _head_rows(ngrams: NgramCounts, hasher: NgramHasher, layer_id: int) -> np.ndarray:
    """Row of each distinct n-gram in each of its order's K heads: int64 [M, K]."""
    n, K = ngrams.order, hasher.spec.n_head_per_ngram
    if ngrams.distinct == 0:
        return np.zeros((0, K), np.int64)
    # Each distinct n-gram as a length-n sequence: its last position's order-n heads address it.
    rows = hasher.hash_compressed(np.ascontiguousarray(ngrams.grams), layer_id)  # [M, n, H]
    first = (n - 2) * K
    return np.ascontiguousarray(rows[:, n - 1, first: first + K])


def layer_row_counts(counts: dict[int, NgramCounts], hasher: NgramHasher, layer_id: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Global rows of one layer's table that the corpus touches, and lookups per row (descending)."""
    spec = hasher.spec
    offsets = np.array(spec.head_offsets(layer_id), np.int64)
    K = spec.n_head_per_ngram
    all_rows, all_counts = [], []
    for n, ngrams in counts.items():
        rows = _head_rows(ngrams, hasher, layer_id) + offsets[(n - 2) * K: (n - 1) * K]
        all_rows.append(rows.ravel())
        all_counts.append(np.repeat(ngrams.counts, K))
    rows, inverse = np.unique(np.concatenate(all_rows), return_inverse=True)
    lookups = np.bincount(inverse, weights=np.concatenate(all_counts), minlength=rows.size).astype(np.int64)
    order = np.argsort(-lookups, kind="stable")
    return rows[order], lookups[order]


def family_stats(counts: dict[int, NgramCounts], hasher: NgramHasher, layer_id: int) -> dict[str, Any]:
    """Per head: share of rows touched and collision rate (distinct n-grams sharing a row)."""
    spec = hasher.spec
    sizes = spec.table_sizes(layer_id)
    K = spec.n_head_per_ngram
    heads = []
    for n, ngrams in counts.items():
        rows = _head_rows(ngrams, hasher, layer_id)
        for k in range(K):
            size = sizes[(n - 2) * K + k]
            _, inverse, per_row = np.unique(rows[:, k], return_inverse=True, return_counts=True)
            shared = int((per_row[inverse] > 1).sum()) if ngrams.distinct else 0
            heads.append({
                "order": n, "head": k, "size": size, "rows_touched": int(per_row.size),
                "share_touched": per_row.size / size,
                "collision_rate": shared / ngrams.distinct if ngrams.distinct else 0.0,
            })
    return {"hash": spec.hash, "heads": heads,
            "collision_rate": float(np.mean([h["collision_rate"] for h in heads]))}


@dataclasses.dataclass(frozen=True)
class CorpusStats:
    """What a corpus does to a table: n-gram counts, row usage per layer, hash-family quality."""

    spec: TableSpec
    comp: Compression
    counts: dict[int, NgramCounts]
    layer_rows: dict[int, tuple[np.ndarray, np.ndarray]]  # layer -> (global rows, lookups), most used first
    families: dict[int, dict[str, dict[str, Any]]]        # layer -> family -> family_stats

    @property
    def tokens(self) -> int:
        return self.counts[2].total

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"tokens", "orders": {n: ...}, "layers": {layer_id: ...}}."""
        orders = {n: {"distinct": c.distinct, "total": c.total, "zipf_exponent": zipf_exponent(c.counts)}
                  for n, c in self.counts.items()}
        layers = {}
        for layer_id, (rows, lookups) in self.layer_rows.items():
            layers[layer_id] = {
                "rows": self.spec.rows(layer_id),
                "rows_touched": int(rows.size),
                "coverage": coverage_rows(lookups),
                "families": self.families[layer_id],
            }
        return {"tokens": self.tokens, "hash": self.spec.hash, "orders": orders, "layers": layers}

    def hot_row_plan(self) -> HotRowPlan:
        """The rows of every layer ordered by use, for the lookup's hot-row cache."""
        return HotRowPlan(self.spec, self.comp.fingerprint, self.tokens,
                          {i: r for i, (r, _) in self.layer_rows.items()},
                          {i: n for i, (_, n) in self.layer_rows.items()})


def corpus_stats(sequences: Iterable[Any], spec: TableSpec, comp: Compression,
                 families: Sequence[str] | None = None) -> CorpusStats:
    """Statistics of a corpus against a table spec.

    Args:
        sequences: token-id sequences (raw ids, 1-D each), e.g. one per document.
        spec, comp: the table's spec and compression.
        families: hash families to compare collision rates for (default: the spec's own).

    Example:
        >>> comp = Compression.identity(10)
        >>> spec = TableSpec(engram_vocab_size=(101, 101), max_ngram_size=3, n_head_per_ngram=1,
        ...                  n_embed_per_ngram=4, layer_ids=(0,), compressed_vocab_size=10, pad_id=0)
        >>> corpus_stats([np.array([1, 2, 1, 2])], spec, comp).to_dict()["orders"][2]["distinct"]
        3
    """
    families = [spec.hash] if families is None else list(families)
    for family in families:
        if family not in HASH_FAMILIES:
            raise InputError(f"families holds {family!r}: expected names from {HASH_FAMILIES}")
    counts = count_ngrams(sequences, spec, comp)
    own = NgramHasher(spec, comp)
    hashers = {f: NgramHasher(spec.replace(hash=f), comp) for f in families}
    layer_rows = {i: layer_row_counts(counts, own, i) for i in spec.layer_ids}
    per_family = {i: {f: family_stats(counts, h, i) for f, h in hashers.items()} for i in spec.layer_ids}
    return CorpusStats(spec, comp, counts, layer_rows, per_family)


def tokenize_files(paths: Sequence[str | os.PathLike[str]], tokenizer_path: str | os.PathLike[str],
                   piece_chars: int = 1 << 16, progress: bool | None = None) -> list[np.ndarray]:
    """Token ids of text files, one 1-D int64 array per piece of about `piece_chars` characters.

    Files are cut at line ends into pieces so the tokenizer can batch them; an n-gram spanning two
    pieces is counted as two padded n-grams, which moves counts by well under 0.1% at the default.

    Raises:
        MissingFileError: a corpus file or the tokenizer file does not exist.
        InputError: a path is a folder, or the tokenizer file is not a `tokenizers` JSON file.
    """
    from tqdm import tqdm

    for path in paths:
        if not os.path.lexists(path):
            raise MissingFileError(f"corpus file {os.fspath(path)!r} does not exist: pass paths of text files")
        if os.path.isdir(path):
            raise InputError(f"corpus file {os.fspath(path)!r} is a folder: pass the text files in it")
    tokenizer = load_tokenizer(tokenizer_path)
    out: list[np.ndarray] = []
    for path in tqdm(paths, desc="tokenizing", unit="file", disable=None if progress is None else not progress,
                     leave=False):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        pieces, start = [], 0
        while start < len(text):
            end = text.find("\n", start + piece_chars)
            end = len(text) if end < 0 else end + 1
            pieces.append(text[start:end])
            start = end
        for encoding in tokenizer.encode_batch(pieces, add_special_tokens=False):
            out.append(np.asarray(encoding.ids, dtype=np.int64))
    return out
