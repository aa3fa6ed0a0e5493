"""TableSpec: everything that fixes row addressing and the bytes on disk.

Frozen and validated; saved with every table (see `to_dict`). Field names follow the reference
`EngramConfig` where one exists.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

from engram.addressing import hf_config
from engram.addressing.primes import assign_primes
from engram.args import is_int
from engram.dtypes import DEFAULT_SCALE_BLOCK, ROW_DTYPES
from engram.errors import SpecError
from engram.limits import (
    MAX_BASE_SIZE,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_LAYER_ID,
    MAX_NGRAM_SIZE,
    MAX_SEED,
    MAX_VOCAB_SIZE,
)

__all__ = ["TableSpec", "HASH_FAMILIES", "DTYPES", "DEFAULT_SCALE_BLOCK", "SPEC_FORMAT_VERSION"]

SPEC_FORMAT_VERSION = 1
HASH_FAMILIES = ("multiplicative-xor", "xxh64", "murmur3")
# Logical row dtype -> bytes per stored element (quantized dtypes store scales beside the values;
# "int4" / "int2" pack several values a byte; see engram.dtypes, the one table of row dtypes).
DTYPES = {name: d.value_bytes for name, d in ROW_DTYPES.items()}
ENCODING_FIELDS = ("dtype", "scale_block")   # how rows are stored, not which rows there are
_INT_FIELDS = ("max_ngram_size", "n_head_per_ngram", "n_embed_per_ngram", "compressed_vocab_size", "pad_id", "seed",
               "scale_block")


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """The addressing and storage of one set of Engram tables (one table per layer).

    Args:
        engram_vocab_size: per n-gram order 2..N, the base table size; each head gets the next
            unused prime at or above it (so N-1 entries).
        max_ngram_size: N, the largest n-gram order (>= 2).
        n_head_per_ngram: K, hash heads per order.
        n_embed_per_ngram: K*D, the row width summed over one order's heads.
        layer_ids: the model layers that carry a table; primes are assigned in this order.
        pad_id: the raw token id used left of position 0 (compressed before use).
        seed: seeds the hash multipliers / hash seeds, per layer `seed + 10007*layer_id`.
        compressed_vocab_size: size of the compressed vocabulary (the multipliers depend on it).
        hash: "multiplicative-xor" (the reference), "xxh64" or "murmur3".
        dtype: stored row dtype: "float32", "bfloat16", "float16", "int8" (one float32 scale per
            row), "float8_e4m3" (FP8 E4M3 values, one E8M0 scale per `scale_block` values), or
            "int4" / "int2" (affine codes of 4 / 2 bits, a float16 scale and minimum per group of
            `scale_block` values; see `engram.storage.intq`).
        scale_block: values per scale of "float8_e4m3" rows, and per group of "int4" / "int2" rows:
            a positive divisor of D (default 32: DeepSeek-V4.1's 256 values + 8 scales per row;
            llama.cpp's Q4_1 groups), whose groups fill whole bytes for "int4" (even) and "int2"
            (a multiple of 4). Other dtypes have no blocks: for them any valid value is replaced
            by the default, so specs of the same rows compare equal whatever block they were
            made with, and their dictionaries stay as before the field existed (it is saved only
            for the block dtypes).

    Example:
        >>> spec = TableSpec(engram_vocab_size=(1000, 1000), max_ngram_size=3, n_head_per_ngram=2,
        ...                  n_embed_per_ngram=32, layer_ids=(1,), compressed_vocab_size=500)
        >>> spec.table_sizes(1)
        (1009, 1013, 1019, 1021)
    """

    engram_vocab_size: tuple[int, ...]
    max_ngram_size: int
    n_head_per_ngram: int
    n_embed_per_ngram: int
    layer_ids: tuple[int, ...]
    compressed_vocab_size: int
    pad_id: int = 2
    seed: int = 0
    hash: str = "multiplicative-xor"
    dtype: str = "float32"
    scale_block: int = DEFAULT_SCALE_BLOCK

    def __post_init__(self) -> None:
        # Accept lists (JSON, the reference config) but store tuples so the spec is hashable, and
        # numpy integers but store Python ints (JSON, hashing and arithmetic then behave).
        for name in ("engram_vocab_size", "layer_ids"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(int(v) if is_int(v) else v for v in value))
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if is_int(value) and type(value) is not int:
                object.__setattr__(self, name, int(value))
        self._validate()
        if not ROW_DTYPES[self.dtype].per_block:
            object.__setattr__(self, "scale_block", DEFAULT_SCALE_BLOCK)

    # -- validation -------------------------------------------------------------------------
    def _validate(self) -> None:
        def need(ok: bool, field: str, fix: str) -> None:
            if not ok:
                raise SpecError(f"TableSpec.{field}={getattr(self, field)!r} is invalid: {fix}")

        # Every bound is checked here, before any work that grows with them (primes at open, buffers
        # at build): see engram.limits.
        need(is_int(self.max_ngram_size) and 2 <= self.max_ngram_size <= MAX_NGRAM_SIZE,
             "max_ngram_size", f"expected an int in [2, {MAX_NGRAM_SIZE}] (the largest n-gram order N)")
        n_orders = self.max_ngram_size - 1
        need(isinstance(self.engram_vocab_size, tuple) and len(self.engram_vocab_size) == n_orders
             and all(is_int(v) and 2 <= v <= MAX_BASE_SIZE for v in self.engram_vocab_size),
             "engram_vocab_size",
             f"expected {n_orders} ints in [2, {MAX_BASE_SIZE}], one base table size per n-gram order "
             f"2..{self.max_ngram_size}")
        need(is_int(self.n_head_per_ngram) and 1 <= self.n_head_per_ngram <= MAX_HEADS,
             "n_head_per_ngram", f"expected an int in [1, {MAX_HEADS}] (hash heads per n-gram order)")
        need(is_int(self.n_embed_per_ngram) and self.n_embed_per_ngram >= 1
             and self.n_embed_per_ngram % self.n_head_per_ngram == 0,
             "n_embed_per_ngram",
             f"expected a positive multiple of n_head_per_ngram={self.n_head_per_ngram} (K*D)")
        need(self.n_embed_per_ngram // self.n_head_per_ngram <= MAX_HEAD_DIM, "n_embed_per_ngram",
             f"rows of D={self.n_embed_per_ngram // self.n_head_per_ngram} values are over the limit of "
             f"{MAX_HEAD_DIM}: expected K*D with D <= {MAX_HEAD_DIM}")
        need(isinstance(self.layer_ids, tuple) and len(self.layer_ids) >= 1
             and all(is_int(v) and 0 <= v <= MAX_LAYER_ID for v in self.layer_ids)
             and len(set(self.layer_ids)) == len(self.layer_ids),
             "layer_ids", f"expected a non-empty sequence of distinct ints in [0, {MAX_LAYER_ID}]")
        heads = len(self.layer_ids) * n_orders * self.n_head_per_ngram
        need(heads <= MAX_HEADS, "layer_ids",
             f"{len(self.layer_ids)} layers x {n_orders} orders x {self.n_head_per_ngram} heads = {heads} hash "
             f"heads, over the limit of {MAX_HEADS} (each needs its own prime): use fewer layers, orders or heads")
        need(is_int(self.compressed_vocab_size) and 1 <= self.compressed_vocab_size <= MAX_VOCAB_SIZE,
             "compressed_vocab_size", f"expected an int in [1, {MAX_VOCAB_SIZE}]: use comp.compressed_vocab_size")
        need(is_int(self.pad_id) and 0 <= self.pad_id < MAX_VOCAB_SIZE,
             "pad_id", f"expected a raw token id in [0, {MAX_VOCAB_SIZE})")
        need(is_int(self.seed) and 0 <= self.seed <= MAX_SEED, "seed", f"expected an int in [0, {MAX_SEED}]")
        need(isinstance(self.hash, str) and self.hash in HASH_FAMILIES, "hash", f"expected one of {HASH_FAMILIES}")
        need(isinstance(self.dtype, str) and self.dtype in DTYPES, "dtype", f"expected one of {tuple(DTYPES)}")
        need(is_int(self.scale_block) and self.scale_block >= 1, "scale_block",
             f"expected an int >= 1 (values per scale of float8_e4m3 rows, per group of int4 / int2 rows; "
             f"default {DEFAULT_SCALE_BLOCK})")
        row = ROW_DTYPES[self.dtype]
        if row.per_block:
            D = self.n_embed_per_ngram // self.n_head_per_ngram
            kind = "group of values (scale and minimum)" if row.bits else "block of values"
            need(D % self.scale_block == 0, "scale_block",
                 f"{self.dtype} rows keep one scale per {kind}, and the block must divide D={D}: "
                 f"pick a divisor of {D} (DeepSeek-V4.1: D=256, scale_block=32)")
            need(self.scale_block * row.bits % 8 == 0, "scale_block",
                 f"{self.dtype} packs {8 // max(row.bits, 1)} values a byte, so a group must fill whole bytes: "
                 f"pick a divisor of D={D} that is a multiple of {8 // max(row.bits, 1)}")

    # -- derived sizes ----------------------------------------------------------------------
    @property
    def n_orders(self) -> int:
        """N-1: the n-gram orders 2..N."""
        return self.max_ngram_size - 1

    @property
    def heads_per_layer(self) -> int:
        """H = (N-1)*K."""
        return self.n_orders * self.n_head_per_ngram

    @property
    def head_dim(self) -> int:
        """D: values per row (one head's row)."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def embed_dim(self) -> int:
        """E = H*D: width of one position's concatenated rows."""
        return self.heads_per_layer * self.head_dim

    @functools.cached_property
    def _primes(self) -> dict[int, tuple[tuple[int, ...], ...]]:
        return assign_primes(self.layer_ids, self.engram_vocab_size, self.n_head_per_ngram)

    def check_layer(self, layer_id: int) -> int:
        """Return `layer_id` if this spec has a table for it, else raise InputError."""
        from engram.errors import InputError

        if not is_int(layer_id) or layer_id not in self.layer_ids:
            raise InputError(
                f"layer_id={layer_id!r} has no table: this spec has layer_ids={self.layer_ids}"
            )
        return int(layer_id)

    def table_sizes(self, layer_id: int) -> tuple[int, ...]:
        """The H prime head sizes of one layer, order-major (order 2 heads first)."""
        return tuple(p for order in self._primes[self.check_layer(layer_id)] for p in order)

    def head_offsets(self, layer_id: int) -> tuple[int, ...]:
        """Global row offset of each head inside the layer's table (prefix sums of the sizes)."""
        offsets, total = [], 0
        for size in self.table_sizes(layer_id):
            offsets.append(total)
            total += size
        return tuple(offsets)

    def rows(self, layer_id: int) -> int:
        """Rows in one layer's table: the sum of its head sizes."""
        return sum(self.table_sizes(layer_id))

    @property
    def total_rows(self) -> int:
        return sum(self.rows(layer_id) for layer_id in self.layer_ids)

    @property
    def value_bytes(self) -> int:
        """Bytes per stored element of `dtype` (one packed byte for "int4" / "int2")."""
        return DTYPES[self.dtype]

    @property
    def value_width(self) -> int:
        """Stored elements per row: D, or D * bits / 8 bytes of packed codes for "int4" / "int2"."""
        return ROW_DTYPES[self.dtype].value_width(self.head_dim)

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored row's values (scales of quantized dtypes not included)."""
        return self.value_width * self.value_bytes

    @property
    def quantized(self) -> bool:
        """True for dtypes that store scales beside the values ("int8", "float8_e4m3", "int4", "int2")."""
        return ROW_DTYPES[self.dtype].quantized

    @property
    def scales_per_row(self) -> int:
        """Scales stored per row: 1 for "int8", D // scale_block for "float8_e4m3", 2 * D // scale_block
        for "int4" / "int2" (a scale and a minimum per group), else 0."""
        return ROW_DTYPES[self.dtype].scales_per_row(self.head_dim, self.scale_block)

    @property
    def scale_row_bytes(self) -> int:
        """Bytes of one row's scales (0 for float dtypes; 8 for V4.1 rows)."""
        return ROW_DTYPES[self.dtype].scale_row_bytes(self.head_dim, self.scale_block)

    @property
    def stored_row_bytes(self) -> int:
        """Bytes of one stored row, values plus scales (264 for V4.1 rows)."""
        return self.row_bytes + self.scale_row_bytes

    def layer_bytes(self, layer_id: int) -> int:
        """Bytes of one layer's rows, values plus scales (chunk padding excluded)."""
        return self.rows(layer_id) * self.stored_row_bytes

    @property
    def total_bytes(self) -> int:
        """Bytes of every layer's rows, values plus scales (chunk padding excluded)."""
        return sum(self.layer_bytes(layer_id) for layer_id in self.layer_ids)

    # -- serialization ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary with a format version; `from_dict` reads it back."""
        d: dict[str, Any] = {"format_version": SPEC_FORMAT_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "scale_block" and not ROW_DTYPES[self.dtype].per_block:
                continue   # always the default there: dicts of float and int8 specs stay as before the field
            d[f.name] = list(value) if isinstance(value, tuple) else value
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TableSpec:
        """Inverse of `to_dict`; refuses unknown versions, unknown and missing fields."""
        if not isinstance(d, Mapping):
            raise SpecError(f"TableSpec.from_dict expected a mapping, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("format_version", SPEC_FORMAT_VERSION)
        if version != SPEC_FORMAT_VERSION:
            raise SpecError(
                f"spec format_version={version!r} is not supported: this engram reads version "
                f"{SPEC_FORMAT_VERSION}; upgrade engram to read newer tables"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SpecError(f"spec has unknown fields {unknown}: expected only {sorted(names)}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise SpecError(f"spec is missing required fields {missing}")
        return cls(**d)

    @classmethod
    def from_hf_config(cls, config: str | os.PathLike[str] | Mapping[str, Any], compression: Any = None) -> TableSpec:
        """The spec of a DeepSeek-V4.1 checkpoint from its config.json (its "text_config").

        Rows are "float8_e4m3" with `scale_block=32`, the hash the reference's multiplicative-xor
        with seed 0; the row counts the primes give are checked against `engram_num_embeddings`
        (see `engram.addressing.hf_config` for the fields read).

        Args:
            config: a config.json, the directory holding it, or the loaded dict.
            compression: if given, its `compressed_vocab_size` is checked against
                `engram_compressed_vocab_size`.

        Raises:
            SpecError: a missing or invalid field.
            SpecMismatchError: `engram_num_embeddings` or `engram_compressed_vocab_size` disagree
                (the message names the field and both values).

        Example:
            >>> spec = TableSpec.from_hf_config("DeepSeek-V4.1-Flash/config.json")   # doctest: +SKIP
            >>> spec.rows(1), spec.head_dim, spec.dtype
            (384006168, 256, 'float8_e4m3')
        """
        fields, cfg = hf_config.spec_fields(config)
        spec = cls(**fields)
        hf_config.check_spec(cfg, spec, compression)
        return spec

    def replace(self, **changes: Any) -> TableSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def row_fields_differ(self, other: TableSpec) -> list[str]:
        """Fields (other than the row encoding: `dtype`, `scale_block`) on which `other` differs.

        Empty when both specs address the same rows with the same width, so tables, modules and
        hot-row plans of one spec serve the other whatever each stores its rows as (a float table
        and its int8 or float8_e4m3 conversion).
        """
        return [f.name for f in dataclasses.fields(self)
                if f.name not in ENCODING_FIELDS and getattr(self, f.name) != getattr(other, f.name)]
