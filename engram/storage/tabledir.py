"""An open table directory: every file of one table opened relative to one directory handle, safely.

A table may come from elsewhere (downloaded, unpacked, copied), so no file of it is trusted to be
what its name says: nothing is opened through a symbolic link, nothing blocks on open, and only
regular files are read (a FIFO or device in a file's place is refused, not waited on or read
without end). Callers check the sizes they expect (`engram.storage.chunks` for chunk files; size caps in
`engram.storage.format` for the files read whole).

A checkpoint folder (`checkpoint=True`: config.json, tokenizer.json, the index and the shards of a
model as released) is opened the same way; only the messages differ.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from engram.errors import CorruptTableError, TableNotFoundError

__all__ = ["TableDir"]


class TableDir:
    """An open table directory: every file is opened relative to one directory handle.

    All reads of one open table then come from the same table, even if `build_table(...,
    overwrite=True)` swaps another one in at the same path meanwhile.

    Raises:
        TableNotFoundError: nothing, or no directory, at `path`.
    """

    def __init__(self, path: str | os.PathLike[str], *, checkpoint: bool = False) -> None:
        self.path = Path(path)
        self.kind = "checkpoint" if checkpoint else "table"
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise TableNotFoundError(f"no table at path={os.fspath(path)!r}: build one with "
                                     "engram.build_table") from None
        except NotADirectoryError:
            raise TableNotFoundError(f"path={os.fspath(path)!r} is not an engram table (not a directory): "
                                     "pass the directory that engram.build_table wrote") from None

    def open(self, relpath: str, flags: int = os.O_RDONLY) -> int:
        """A file descriptor for the regular file `relpath` inside the table.

        Safe on a table from elsewhere: no path component may be a symbolic link (a table's files
        are its own, never ones outside its directory), and the file is opened non-blocking and
        must be a regular file (a FIFO or device in its place is refused instead of hanging or
        reading without end). Callers check the size they expect.

        Raises:
            FileNotFoundError: no such file.
            CorruptTableError: a symbolic link, or something other than a regular file.
        """
        where = os.fspath(self.path / relpath)
        if "\0" in relpath:
            raise CorruptTableError(f"{where!r} is not a file name (it holds a NUL character): {self._damaged()}")
        *folders, name = relpath.split("/")
        dir_fd, opened = self.fd, []
        try:
            for folder in folders:
                dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                opened.append(dir_fd)
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                fix = ("rebuild the table or copy it without links (cp -rL)" if self.kind == "table" else
                       "copy the folder without links (cp -rL: a Hugging Face cache snapshot links every file "
                       "into its blobs folder)")
                raise CorruptTableError(
                    f"{where!r} is not a plain file of the {self.kind} (a symbolic link, or under one): a "
                    f"{self.kind}'s files must be its own, not links to files elsewhere; {fix}") from None
            raise
        finally:
            for fd_ in opened:
                os.close(fd_)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CorruptTableError(f"{where!r} is not a regular file (a FIFO, device or directory): "
                                    f"{self._damaged()}")
        return fd

    def _damaged(self) -> str:
        if self.kind == "table":
            return "the table is damaged or not an engram table; rebuild it"
        return "the checkpoint is damaged; download the file again"

    def read_bytes(self, relpath: str, limit: int) -> bytes:
        """The whole file `relpath`, refused (CorruptTableError) if larger than `limit` bytes."""
        fd = self.open(relpath)
        try:
            size = os.fstat(fd).st_size
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(limit + 1) if size <= limit else b""
        finally:
            os.close(fd)
        if size > limit or len(data) > limit:
            raise CorruptTableError(
                f"{os.fspath(self.path / relpath)!r} has {max(size, len(data))} bytes, more than the {limit} a "
                f"{self.kind}'s file of this kind can have: {self._damaged()}")
        return data

    def replaced(self) -> bool:
        """True if the path no longer leads to the directory this TableDir holds open (the table
        there was replaced, e.g. by `build_table(..., overwrite=True)`, or removed)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        held = os.fstat(self.fd)
        return (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino) or held.st_nlink == 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> TableDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
