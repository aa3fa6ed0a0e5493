"""Files and JSON from elsewhere, read so that they cannot hang the reader, exhaust its memory or
crash it with a built-in error.

A file named by a caller (a tokenizer.json, a config.json, a --spec file) is opened non-blocking
and must be a regular file: a FIFO in its place would block `open` (or `read`) forever and a
device such as /dev/zero reads without end, so both are refused before a byte is read; so is a
file over its size cap. A link named by the caller is followed (the caller chose the path); a
file found beside others (a shard set's manifest, a save's record) is read with `follow=False`,
which refuses a link; files found inside a table or checkpoint folder go through
`engram.storage.tabledir.TableDir`, which refuses links too.

JSON from such files is parsed strictly: UTF-8 only, no key twice in one object (Python keeps the
last, other readers the first: two readers would see two files), no NaN or Infinity (not JSON),
nesting at most `MAX_JSON_DEPTH` deep (Python's parser would raise RecursionError a few hundred
levels down), and no string that is not valid Unicode (a lone surrogate escape).
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from engram.errors import InputError, MissingFileError
from engram.limits import MAX_JSON_DEPTH

__all__ = ["read_file", "read_json", "check_regular", "loads"]


def check_regular(fd: int, where: str, what: str, limit: int | None, fix: str, error: type[Exception]) -> int:
    """The size of the open file `fd`, or `error` if it is not a regular file or is over `limit` bytes."""
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {where!r} is a folder: {fix}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {where!r} is not a regular file (a FIFO, socket or device): {fix}")
    if limit is not None and st.st_size > limit:
        raise error(f"{what} {where!r} has {st.st_size} bytes, more than the {limit} a {what} can have: {fix}")
    return st.st_size


def read_file(path: str | os.PathLike[str], what: str, limit: int, fix: str,
              error: type[Exception] = InputError, follow: bool = True) -> bytes:
    """The whole regular file at `path`, opened non-blocking (a FIFO never blocks the call).

    Args:
        path: the file.
        what: what the file is, for messages ("tokenizer file", "config file", ...).
        limit: the most bytes it may have.
        fix: what the caller should do, ending every message.
        error: the error for a file that is not a regular file or is too large.
        follow: whether a link at `path` is followed (the caller named it) or refused (the
            caller found the file beside others).

    Raises:
        MissingFileError: nothing at `path`.
        error: a FIFO, device or folder at `path`, a file over `limit` bytes, an unreadable one, or
            a link if not `follow`.
    """
    where = os.fspath(path)
    if not isinstance(where, str) or "\0" in where:
        raise InputError(f"{what} {where!r} is not a valid path (it holds a NUL character): {fix}")
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW))
    except FileNotFoundError:
        raise MissingFileError(f"{what} {where!r} does not exist: {fix}") from None
    except OSError as exc:
        hint = "" if follow else "; a symbolic link is refused"
        raise error(f"{what} {where!r} cannot be opened ({exc.strerror}{hint}): {fix}") from None
    try:
        check_regular(fd, where, what, limit, fix, error)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)      # at most one byte more than allowed, even if it grew meanwhile
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(f"{what} {where!r} grew past the {limit} bytes a {what} can have while it was read: {fix}")
    return data


def read_json(path: str | os.PathLike[str], what: str, limit: int, fix: str, error: type[Exception] = InputError,
              follow: bool = True) -> Any:
    """`read_file`, then strict `loads`: the JSON document of the file at `path` (errors name it as
    "{what} {path!r}")."""
    raw = read_file(path, what, limit, fix, error, follow)
    return loads(raw, f"{what} {os.fspath(path)!r}", error, fix)


class _DuplicateKey(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(f"it holds the key {key!r} twice in one object")
            seen.add(key)
    return out


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def loads(raw: bytes | str, where: str, error: type[Exception], fix: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`raw` parsed as strict JSON (see the module docstring), or `error` naming `where` and the rule broken.

    Args:
        raw: the document (bytes must be UTF-8).
        where: what and where it is, for messages (e.g. "config file '/m/config.json'").
        error: the error raised for a document that breaks a rule.
        fix: what the caller should do, ending every message.
        max_depth: the deepest nesting of arrays and objects allowed.
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
    except UnicodeDecodeError as exc:
        raise error(f"{where} is not UTF-8 text ({exc}): {fix}") from None
    try:
        doc = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
    except RecursionError:
        raise error(f"{where} nests JSON arrays or objects more than {max_depth} deep: {fix}") from None
    except _DuplicateKey as exc:
        raise error(f"{where} is ambiguous JSON: {exc}: {fix}") from None
    except ValueError as exc:
        raise error(f"{where} is not valid JSON ({exc}): {fix}") from None
    problem = _walk(doc, max_depth)
    if problem:
        raise error(f"{where} {problem}: {fix}")
    return doc


def _walk(doc: Any, max_depth: int) -> str | None:
    """What breaks the depth or Unicode rule in a parsed document, or None (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError:
                    return f"holds the string {node[:40]!r}, which is not valid Unicode (a lone surrogate)"
        elif isinstance(node, (dict, list)):
            if depth > max_depth:
                return f"nests JSON arrays or objects more than {max_depth} deep"
            if isinstance(node, dict):
                stack.extend((k, depth + 1) for k in node)
                stack.extend((v, depth + 1) for v in node.values())
            else:
                stack.extend((v, depth + 1) for v in node)
    return None
