"""An open table directory: every file of one table opened relative to one directory handle, safely.

A table may come from elsewhere (downloaded, unpacked, copied), so no file of it is trusted to be
what its name says: nothing is opened through a symbolic link, nothing blocks on open, and only
regular files are read (a FIFO or device in a file's place is refused, not waited on or read
without end). Callers check the sizes they expect (`engram.storage.chunks` for chunk files; size caps in
`engram.storage.format` for the files read whole).
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

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
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
        *folders, name = relpath.split("/")
        where = os.fspath(self.path / relpath)
        dir_fd, opened = self.fd, []
        try:
            for folder in folders:
                dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                opened.append(dir_fd)
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CorruptTableError(
                    f"{where!r} is not a plain file of the table (a symbolic link, or under one): a table's "
                    "files must be its own, not links to files elsewhere; rebuild the table or copy it without "
                    "links (cp -rL)") from None
            raise
        finally:
            for fd_ in opened:
                os.close(fd_)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CorruptTableError(f"{where!r} is not a regular file (a FIFO, device or directory): the table is "
                                    "damaged or not an engram table; rebuild it")
        return fd

    def read_bytes(self, relpath: str, limit: int) -> bytes:
        """The whole file `relpath`, refused (CorruptTableError) if larger than `limit` bytes."""
        fd = self.open(relpath)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise CorruptTableError(
                    f"{os.fspath(self.path / relpath)!r} has {size} bytes, more than the {limit} a table's "
                    "file of this kind can have: the table is damaged or not an engram table; rebuild it")
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read(limit + 1)
        finally:
            os.close(fd)

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
