"""Compression: raw token id -> canonical ("compressed") id, as the reference CompressedTokenizer.

Tokens whose decoded text normalizes to the same string share one canonical id, so n-grams that
differ only in case, accents or whitespace address the same rows.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import xxhash

from engram.addressing.spec import TableSpec
from engram.args import check_int
from engram.errors import InputError, SpecError, SpecMismatchError, TokenIdError
from engram.limits import MAX_TOKENIZER_BYTES, MAX_VOCAB_SIZE
from engram.tensors import is_torch, to_numpy_ids
from engram.untrusted import read_file

__all__ = ["Compression", "load_tokenizer", "tokenizer_from_json"]

_TOKENIZER_FIX = "pass the tokenizer.json the table was built with (Hugging Face tokenizers format)"
# Kept apart from the text through normalization, so a token that is exactly one space survives
# the strip step (the reference's private-use sentinel).
_SENTINEL = "\ue000"


def _normalizer() -> Any:
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), _SENTINEL),
        normalizers.Strip(),
        normalizers.Replace(_SENTINEL, " "),
    ])


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """A `tokenizers.Tokenizer` read from a JSON file, with typed errors that name the file.

    The file is read as an input from elsewhere (`engram.untrusted.read_file`): opened
    non-blocking, a regular file (a FIFO or device in its place is refused, not waited on or read
    without end), at most `engram.limits.MAX_TOKENIZER_BYTES`.

    Raises:
        MissingFileError: nothing at `path` (a FileNotFoundError).
        InputError: `path` is a folder, FIFO or device, too large, unreadable, or not a `tokenizers` JSON file.
    """
    raw = read_file(path, "tokenizer file", MAX_TOKENIZER_BYTES, _TOKENIZER_FIX)
    return tokenizer_from_json(raw, os.fspath(path))


def tokenizer_from_json(raw: bytes, where: str) -> Any:
    """A `tokenizers.Tokenizer` from the bytes of a tokenizer.json read from `where` (named in errors).

    Raises:
        InputError: not UTF-8, or not a `tokenizers` JSON file.
    """
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise InputError(f"tokenizer file {where!r} cannot be loaded ({exc}): {_TOKENIZER_FIX}") from exc


class Compression:
    """Maps raw token ids to compressed ids through a lookup array.

    Args:
        lookup: 1-D integer array, `lookup[raw_id] = compressed_id`; compressed ids must cover
            0..max without gaps.

    Example:
        >>> comp = Compression([0, 1, 1, 2])
        >>> comp.vocab_size, comp.compressed_vocab_size
        (4, 3)
        >>> comp(np.array([[3, 2]])).tolist()
        [[2, 1]]
    """

    def __init__(self, lookup: Any) -> None:
        arr = np.asarray(lookup.cpu() if is_torch(lookup) else lookup)
        if arr.size > MAX_VOCAB_SIZE:
            raise SpecError(f"Compression lookup has {arr.size} ids, more than engram's limit of {MAX_VOCAB_SIZE} "
                            "(engram.limits.MAX_VOCAB_SIZE): pass the lookup of a real vocabulary")
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise SpecError(
                f"Compression lookup must be a non-empty 1-D integer array, got dtype={arr.dtype} "
                f"shape={arr.shape}"
            )
        arr = arr.astype(np.int64)
        if arr.min() < 0:
            raise SpecError(f"Compression lookup has a negative compressed id {int(arr.min())}")
        used = np.unique(arr)
        if used.size != int(arr.max()) + 1:
            raise SpecError(
                f"Compression lookup's compressed ids must be 0..{int(arr.max())} without gaps, "
                f"but only {used.size} distinct ids are used: renumber them densely"
            )
        arr.setflags(write=False)
        self._lookup = arr
        self._torch_lookups: dict[Any, Any] = {}

    @classmethod
    def identity(cls, vocab_size: int) -> Compression:
        """No merging: every raw id is its own compressed id."""
        check_int("vocab_size", vocab_size, 1, error=SpecError)
        if vocab_size > MAX_VOCAB_SIZE:
            raise SpecError(f"vocab_size={vocab_size!r} is invalid: expected at most {MAX_VOCAB_SIZE} ids "
                            "(engram.limits.MAX_VOCAB_SIZE); pass the tokenizer's vocabulary size")
        return cls(np.arange(int(vocab_size), dtype=np.int64))

    @classmethod
    def from_tokenizer_file(cls, path: str | os.PathLike[str]) -> Compression:
        """The reference compression of a Hugging Face `tokenizers` JSON file.

        Each id is decoded alone and normalized (NFKC, NFD, strip accents, lowercase, whitespace
        runs to one space, strip, a lone space kept); ids whose text holds U+FFFD keep their raw
        token string. Canonical ids are assigned in first-seen order.

        Raises:
            MissingFileError: no file at `path`.
            InputError: `path` is not a readable `tokenizers` JSON file.
        """
        return cls.from_tokenizer(load_tokenizer(path))

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> Compression:
        """The reference compression of a loaded `tokenizers.Tokenizer` (see `from_tokenizer_file`)."""
        normalizer = _normalizer()
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        canonical: dict[str, int] = {}
        lookup = np.empty(vocab_size, dtype=np.int64)
        for tid in range(vocab_size):
            text = tokenizer.decode([tid], skip_special_tokens=False)
            if "\ufffd" in text:
                key = tokenizer.id_to_token(tid)
            else:
                key = normalizer.normalize_str(text) or text
            lookup[tid] = canonical.setdefault(key, len(canonical))
        return cls(lookup)

    # -- properties -------------------------------------------------------------------------
    @property
    def lookup(self) -> np.ndarray:
        """Read-only int64 array: `lookup[raw_id] = compressed_id`."""
        return self._lookup

    @property
    def vocab_size(self) -> int:
        """Number of raw token ids accepted."""
        return int(self._lookup.size)

    @property
    def compressed_vocab_size(self) -> int:
        """Number of distinct compressed ids."""
        return int(self._lookup.max()) + 1

    @property
    def fingerprint(self) -> str:
        """xxh3-64 hex digest of the lookup: identifies the compression a table was built with."""
        return xxhash.xxh3_64_hexdigest(self._lookup.astype("<i8").tobytes())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Compression) and np.array_equal(self._lookup, other._lookup)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"Compression(vocab_size={self.vocab_size}, compressed_vocab_size={self.compressed_vocab_size})"

    # -- mapping ----------------------------------------------------------------------------
    def check_ids(self, token_ids: Any, name: str = "token_ids") -> None:
        """Raise TokenIdError if any id is outside [0, vocab_size)."""
        check_id_range(token_ids, self.vocab_size, name)

    def __call__(self, token_ids: Any) -> Any:
        """Compressed ids, same kind (numpy/torch), shape and device as `token_ids`, int64."""
        if is_torch(token_ids):
            import torch

            if token_ids.dtype.is_floating_point or token_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
                raise InputError(f"token_ids must be integers, got dtype={token_ids.dtype}")
            self.check_ids(token_ids)
            table = self._torch_lookups.get(token_ids.device)
            if table is None:
                table = torch.from_numpy(self._lookup.copy()).to(token_ids.device)
                self._torch_lookups[token_ids.device] = table
            return table[token_ids.long()]
        ids = to_numpy_ids(token_ids)
        self.check_ids(ids)
        return self._lookup[ids]


def check_pair(spec: Any, comp: Any, fix: str) -> None:
    """Raise unless `spec` is a TableSpec and `comp` a Compression of its compressed vocabulary.

    The hash multipliers depend on `compressed_vocab_size`, so a pair that disagrees would address
    other rows. `fix` ends the mismatch message with what the caller should do.
    """
    if not isinstance(spec, TableSpec):
        raise InputError(f"spec must be an engram.TableSpec, got {type(spec).__name__}")
    if not isinstance(comp, Compression):
        raise InputError(f"comp must be an engram.Compression, got {type(comp).__name__}")
    if comp.compressed_vocab_size != spec.compressed_vocab_size:
        raise SpecMismatchError(
            f"compression has compressed_vocab_size={comp.compressed_vocab_size} but "
            f"spec.compressed_vocab_size={spec.compressed_vocab_size}: {fix}")


def check_id_range(token_ids: Any, vocab_size: int, name: str = "token_ids") -> None:
    """Raise TokenIdError if any id of `token_ids` (numpy or torch) is outside [0, vocab_size)."""
    if token_ids.numel() if is_torch(token_ids) else token_ids.size:
        low, high = int(token_ids.min()), int(token_ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise TokenIdError(
                f"{name} holds id {bad}, outside [0, {vocab_size}) for this compression: "
                "tokenize with the tokenizer the table was built for"
            )
