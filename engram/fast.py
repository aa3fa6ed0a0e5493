"""The `fast` extra: numba, where it is installed, for the compiled loops (the FP8 and int4 / int2
decodes, small lookups in one call). Without it every caller keeps its torch / numpy path."""

from __future__ import annotations

from typing import Any

__all__ = ["NUMBA"]


def _load() -> Any:
    try:
        import numba
    except ImportError:
        return None
    return numba


NUMBA: Any = _load()   # the numba module, or None without the `fast` extra
