"""Argument checks shared by the public entry points: one spelling of "an int (not a bool)" and
"a real number (not a bool)", and the error naming the argument, the value and what it takes.

Checks run once, where a public call enters; the internals they guard trust their arguments.
"""

from __future__ import annotations

import numbers
import os
from typing import Any

from engram.errors import InputError

__all__ = ["is_int", "is_real", "check_int", "check_real", "check_path"]


def is_int(value: Any) -> bool:
    """True for Python and numpy integers; False for bools (True is not 1 here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """True for Python and numpy ints and floats; False for bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int, hint: str = "",
              error: type[Exception] = InputError) -> None:
    """Raise `error` "{name}={value!r} is invalid: expected an int >= {minimum}{hint}" unless `value` is one."""
    if not is_int(value) or value < minimum:
        raise error(f"{name}={value!r} is invalid: expected an int >= {minimum}{hint}")


def check_real(name: str, value: Any, minimum: float, hint: str = "") -> None:
    """Raise InputError "{name}={value!r} is invalid: expected a float >= {minimum}{hint}" unless it is
    a real number at least `minimum` (NaN is refused)."""
    if not is_real(value) or not value >= minimum:
        raise InputError(f"{name}={value!r} is invalid: expected a float >= {minimum}{hint}")


def check_path(name: str, path: Any) -> None:
    """Raise InputError unless `path` is a str or os.PathLike of non-empty text without NUL characters
    (the operating system cannot name such a file: Python would raise a bare ValueError or TypeError)."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text or "\0" in text:
        raise InputError(f"{name}={path!r} is invalid: expected a non-empty text path without NUL characters")
