"""Atomic publication of a table directory: build beside the target, fsync, rename.

A table is written into `.{name}.partial-XXXX` in the target's parent directory. The builder
holds an exclusive `flock` on that directory for as long as it works on it, so a process killed
at any point leaves only an unlocked partial directory behind, which the next build of the same
target removes (`clean_stale`); partial directories of builds still running are left alone.
Publishing is one `rename` (or, to replace an existing table, one `renameat2(RENAME_EXCHANGE)`
swap): readers see the old table or the new one, never a mix, and files of the old table are
unlinked, never truncated, so processes that still map them keep valid pages. Where the
filesystem cannot swap, the old table is first renamed into a locked `.{name}.partial-XXXX`
directory of its own and moved back if the new one cannot take its place; after a build killed
between the two renames, the next build's `clean_stale` moves it back before cleaning up.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from engram.errors import TableExistsError

__all__ = ["partial_dir", "publish", "publish_file", "clean_stale", "restore_aside", "aside_table", "fsync_tree",
           "fsync_path", "make_read_only"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_ASIDE = "old"   # name of the replaced table inside its aside directory


def _partial_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync one file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(target: Path, text: str) -> None:
    """Publish one small text file atomically: written beside `target` under a temporary name,
    fsynced, renamed over `target`, then the folder fsynced (readers see the old file or the new)."""
    partial = target.with_name(f"{_partial_prefix(target)}{os.getpid()}")
    try:
        partial.write_text(text)
        fsync_path(partial)
        os.replace(partial, target)
        fsync_path(target.parent)
    finally:
        partial.unlink(missing_ok=True)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and directory under `root` (directories after their entries)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def make_read_only(root: str | os.PathLike[str]) -> None:
    """Give every file under `root` mode 0444 (directories keep theirs): a published table's files are
    never written again, and a tool that would rewrite one in place (`cp`, `rsync --inplace` over a
    served table) is refused instead of changing rows under its readers."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o444, follow_symlinks=False)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _stale_partials(target: Path) -> Iterator[Path]:
    """The partial directories of `target` whose builder is gone, each locked while the caller
    looks at it (a partial whose lock can be taken has no live builder: nothing else holds it)."""
    try:
        entries = list(os.scandir(target.parent))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if not entry.name.startswith(_partial_prefix(target)) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        try:
            if _try_lock(fd):
                yield Path(entry.path)
        finally:
            os.close(fd)


def _asides(target: Path) -> Iterator[tuple[Path, Path]]:
    """(stale partial directory, the table it holds aside) while nothing is at `target`; each
    partial stays locked until the caller moves on."""
    for partial in _stale_partials(target):
        aside = partial / _ASIDE
        if aside.is_dir() and not os.path.lexists(target):
            yield partial, aside


def restore_aside(target: str | os.PathLike[str]) -> Path | None:
    """Put back a table that a build killed between its two renames left aside; return where it was.

    Such a build (see `_replace_by_renames`) leaves nothing at `target` and the table it was
    replacing in a stale partial directory as `old`; while nothing is at `target` it is moved back.
    """
    target = Path(target)
    for partial, aside in _asides(target):
        os.rename(aside, target)
        fsync_path(target.parent)
        return partial
    return None


def aside_table(target: str | os.PathLike[str]) -> Path | None:
    """The table `restore_aside` would put back at `target`, if any, left where it is (nothing is moved).

    Checks that must not change the disk (dry runs) look at it as if it were at `target`.
    """
    return next((aside for _, aside in _asides(Path(target))), None)


def clean_stale(target: str | os.PathLike[str]) -> list[Path]:
    """Remove partial directories of `target` left by builds that died; return what was removed.

    A table one of them set aside while replacing `target` is moved back first (`restore_aside`),
    so a crash never loses the table it was replacing.
    """
    target = Path(target)
    restore_aside(target)
    removed = []
    for partial in _stale_partials(target):
        shutil.rmtree(partial, ignore_errors=True)
        removed.append(partial)
    return removed


def _locked_dir(target: Path) -> tuple[Path, int]:
    """A fresh directory named like a partial of `target`, and an open fd holding its lock.

    While the lock is held, `clean_stale` leaves the directory alone; once its holder dies, the
    next build of `target` removes it.
    """
    while True:
        path = Path(tempfile.mkdtemp(prefix=_partial_prefix(target), dir=target.parent))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        # A concurrent clean_stale may have removed the directory before we locked it: retry.
        if _try_lock(fd) and _same_inode(fd, path):
            os.fchmod(fd, 0o777 & ~_umask())      # mkdtemp's 0700 would keep other users out of the table
            return path, fd
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it (Linux), else the common 022."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


@contextlib.contextmanager
def partial_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh, locked, empty directory beside `target`; removed if the block raises.

    The lock is held until the block ends (after `publish`, it then guards the published
    directory's inode, which is harmless).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path, fd = _locked_dir(target)
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def _same_inode(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({os.fspath(a)!r}, {os.fspath(b)!r}, RENAME_EXCHANGE): {os.strerror(err)}")


def _not_replaceable(target: Path) -> TableExistsError:
    return TableExistsError(f"path={os.fspath(target)!r} holds something other than an engram table (it appeared "
                            "while the table was written): overwrite=True replaces only tables; remove it yourself "
                            "or choose another path")


def _replace_by_renames(partial: Path, target: Path, replaceable: Callable[[Path], bool] = lambda path: True
                        ) -> Path:
    """Replace `target` by `partial` in two renames where the filesystem cannot swap them.

    The old table moves into a locked aside directory named like a partial of `target` (so a
    build killed between the two renames leaves a directory the next build removes); if the
    second rename fails, the old table is moved back. Returns the aside directory to delete.
    """
    aside, fd = _locked_dir(target)
    old = aside / _ASIDE
    try:
        os.rename(target, old)
        if not replaceable(old):
            _move_back(old, target, _not_replaceable(target))
            raise _not_replaceable(target)
        try:
            os.rename(partial, target)
        except BaseException as exc:
            _move_back(old, target, exc)
            raise
    except BaseException:
        if not os.path.lexists(old):   # the old table is in place again: the aside is empty
            shutil.rmtree(aside, ignore_errors=True)
        raise
    finally:
        os.close(fd)
    return aside


def _move_back(old: Path, target: Path, exc: BaseException) -> None:
    """Undo the first rename of `_replace_by_renames` after the second one raised `exc`."""
    try:
        os.rename(old, target)
    except OSError as undo:
        raise OSError(
            undo.errno, f"replacing {os.fspath(target)!r} failed ({exc!r}) and the old table could not be moved "
            f"back ({undo.strerror}): it is at {os.fspath(old)!r}; the next build of {os.fspath(target)!r} moves it "
            "back, or move it there yourself") from exc


def publish(partial: Path, target: str | os.PathLike[str], overwrite: bool,
            replaceable: Callable[[Path], bool] = lambda path: True) -> None:
    """Move the finished (fsynced) `partial` directory to `target` atomically.

    Without `overwrite`, an existing non-empty `target` raises TableExistsError. With it, the
    old directory is swapped out in one step (or, where the filesystem cannot swap, renamed
    aside first) and then deleted, provided `replaceable(old)` holds for what was swapped out:
    something else that appeared at `target` since the caller's checks is swapped back in and
    TableExistsError raised, so only what may be replaced is ever deleted.
    """
    target = Path(target)
    if overwrite and target.exists():
        if _exchange(partial, target):
            old = partial                           # what was at target, now at partial's name
            if not replaceable(old):
                _exchange(partial, target)          # put it back; the new table returns to partial
                raise _not_replaceable(target)
        else:
            partial = _replace_by_renames(partial, target, replaceable)
        fsync_path(target.parent)
        shutil.rmtree(partial, ignore_errors=True)   # the old table
        return
    try:
        os.rename(partial, target)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise TableExistsError(
                f"path={os.fspath(target)!r} already exists: pass overwrite=True to replace the table "
                "there, or choose another path") from exc
        raise
    fsync_path(target.parent)
