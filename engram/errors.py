"""Typed errors. Each one also inherits the builtin a caller would naturally catch."""

from __future__ import annotations

__all__ = [
    "EngramError",
    "SpecError",
    "SpecMismatchError",
    "InputError",
    "TokenIdError",
    "MissingFileError",
    "TableNotFoundError",
    "TableExistsError",
    "CorruptTableError",
    "ShardMismatchError",
    "IncompleteSaveError",
    "QualityGateError",
    "RankFailureError",
]


class EngramError(Exception):
    """Base class of every error engram raises on purpose."""


class SpecError(EngramError, ValueError):
    """A TableSpec field (or a spec dictionary) is invalid."""


class SpecMismatchError(EngramError, ValueError):
    """Two things that must agree do not: a table and the spec or compression it is used with."""


class InputError(EngramError, ValueError):
    """A call argument has the wrong shape, dtype, device or value."""


class TokenIdError(InputError):
    """A token id is outside the vocabulary it is looked up in."""


class MissingFileError(EngramError, FileNotFoundError):
    """An input file does not exist: a tokenizer, corpus file, checkpoint or hot-row plan."""


class TableNotFoundError(MissingFileError):
    """No table at the given path."""


class TableExistsError(EngramError, FileExistsError):
    """A table already exists where a new one would be written."""


class CorruptTableError(EngramError, OSError):
    """A table on disk is damaged: missing, truncated or altered files."""


class ShardMismatchError(SpecMismatchError):
    """The shards opened together do not form one table: other specs, compressions, table ids or row ranges."""


class IncompleteSaveError(CorruptTableError):
    """A multi-rank save is incomplete or mixed: a rank died or failed while it was written."""


class QualityGateError(EngramError, ValueError):
    """A converted table changes a model's predictions more than allowed (engram.quality's gate)."""


class RankFailureError(EngramError, RuntimeError):
    """A rank of a process group failed or left during a collective: the group cannot be used again."""
