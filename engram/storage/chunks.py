"""Chunk files: opening, size-checking, reading, checksumming and writing one chunk file of a table.

Every tier (`engram.serving.tiers`, `engram.serving.direct`), the full check (`verify_chunks`) and the writers
(`engram.storage.writer`) go through here, so each check of a chunk file, and the error naming it, is
written once. A chunk file is exactly `layout.chunk_bytes` bytes (see `engram.storage.format`); its
xxh3-64 digest is recorded in the table's metadata.
"""

from __future__ import annotations

import ctypes
import os
import select
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from engram.errors import CorruptTableError
from engram.storage.format import CHECKED_BLOCK, LayerLayout, TableMeta
from engram.storage.metadata import read_metadata
from engram.storage.tabledir import TableDir

__all__ = ["ChunkWatch", "block_digests", "block_error", "checksum", "chunk_error", "open_chunk", "read_chunk",
           "check_chunk", "verify_chunks", "write_chunk", "progress_bar", "fadvise"]

_VERIFY_READ = 8 << 20


def checksum(data: Any) -> str:
    """xxh3-64 hex digest of a bytes-like object (the per-chunk checksum)."""
    return xxhash.xxh3_64_hexdigest(data)


def chunk_error(layout: LayerLayout, index: int, path: str | os.PathLike[str], problem: str) -> CorruptTableError:
    """The CorruptTableError for one damaged chunk file, naming layer, array (for scales), chunk and file."""
    what = "" if layout.role == "rows" else f" scales (array {layout.array!r})"
    return CorruptTableError(
        f"layer {layout.layer_id}{what} chunk {index} ({os.fspath(path)!r}) {problem}: the table is damaged; "
        "rebuild it or restore the file (engram verify checks every chunk)")


def fadvise(fd: int, advice: str) -> None:
    """posix_fadvise(fd, 0, 0, POSIX_FADV_<advice>) over the whole file, where the OS has it."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, getattr(os, f"POSIX_FADV_{advice}"))


def progress_bar(total: int, desc: str, progress: bool | None = None) -> Any:
    """A byte-counting tqdm bar (`progress` None: shown only on a terminal, after a second)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, delay=1.0, mininterval=0.5,
                disable=None if progress is None else not progress)


def open_chunk(tdir: TableDir, lay: LayerLayout, index: int, flags: int = os.O_RDONLY) -> int:
    """A file descriptor of chunk `index` of `lay`, its size checked (a short file would SIGBUS a mapping).

    Raises:
        CorruptTableError: the file is missing or has the wrong size.
        OSError: the file cannot be opened with `flags` (e.g. EINVAL for O_DIRECT).
    """
    try:
        fd = tdir.open(lay.chunk_relpath(index), flags)
    except FileNotFoundError:
        raise chunk_error(lay, index, lay.chunk_path(tdir.path, index), "is missing") from None
    size = os.fstat(fd).st_size
    if size != lay.chunk_bytes:
        os.close(fd)
        raise chunk_error(lay, index, lay.chunk_path(tdir.path, index),
                          f"has {size} bytes, expected {lay.chunk_bytes}")
    return fd


def read_chunk(tdir: TableDir, lay: LayerLayout, index: int, dest: np.ndarray) -> None:
    """Read chunk `index` of `lay` into `dest` (uint8 [chunk_bytes]) and check its size and checksum."""
    path = lay.chunk_path(tdir.path, index)
    fd = open_chunk(tdir, lay, index)
    try:
        view, done = dest.data, 0
        while done < lay.chunk_bytes:
            got = os.readv(fd, [view[done:]])
            if got == 0:
                raise chunk_error(lay, index, path, f"ended after {done} of {lay.chunk_bytes} bytes")
            done += got
    finally:
        os.close(fd)
    digest = checksum(dest)
    if digest != lay.checksums[index]:
        raise chunk_error(lay, index, path, f"has xxh3 {digest}, recorded {lay.checksums[index]}")


def check_chunk(tdir: TableDir, lay: LayerLayout, index: int, keep_cache: bool = False) -> CorruptTableError | None:
    """The problem with one chunk file, if any: missing, wrong size or wrong checksum (`keep_cache`:
    leave its pages in the page cache, as for a file a tier serves)."""
    try:
        fd = open_chunk(tdir, lay, index)
    except CorruptTableError as exc:
        return exc
    try:
        fadvise(fd, "SEQUENTIAL")
        digest = xxhash.xxh3_64()
        while block := os.read(fd, _VERIFY_READ):
            digest.update(block)
        if not keep_cache:
            fadvise(fd, "DONTNEED")   # a full check should not flush the page cache
    finally:
        os.close(fd)
    if digest.hexdigest() != lay.checksums[index]:
        return chunk_error(lay, index, lay.chunk_path(tdir.path, index),
                           f"has xxh3 {digest.hexdigest()}, recorded {lay.checksums[index]} (its contents changed)")
    return None


def verify_chunks(tdir: TableDir, meta: TableMeta, progress: bool | None = None) -> None:
    """Check the metadata (its checksum, and that it still is what the table was opened with), then
    every chunk file; raise CorruptTableError naming the first problem (and the count of bad chunks)."""
    if read_metadata(tdir) != meta:
        raise CorruptTableError(
            f"the metadata of the table at {str(tdir.path)!r} changed after it was opened (zarr.json or the "
            "compression file was rewritten in place): restore it or rebuild the table, then open it again")
    bad: list[CorruptTableError] = []
    with progress_bar(sum(lay.disk_bytes for lay in meta.layers.values()), "verify", progress) as bar:
        for layer in meta.layers.values():
            for lay in layer.arrays():            # the values, then the scales of quantized rows
                for index in range(lay.n_chunks):
                    problem = check_chunk(tdir, lay, index)
                    if problem is not None:
                        bad.append(problem)
                    bar.update(lay.chunk_bytes)
    if bad:
        more = f" ({len(bad) - 1} more bad chunks)" if len(bad) > 1 else ""
        raise CorruptTableError(f"{bad[0]}{more}") from bad[0]


def block_digests(data: Any) -> np.ndarray:
    """The xxh3-64 digest of every CHECKED_BLOCK-byte block of a chunk's bytes: uint64 [n_blocks],
    little-endian (the block checksum file of that chunk; the "direct" tier checks what it reads)."""
    view = memoryview(data).cast("B")
    digest = xxhash.xxh3_64_intdigest
    n = len(view) // CHECKED_BLOCK
    return np.fromiter((digest(view[i * CHECKED_BLOCK:(i + 1) * CHECKED_BLOCK]) for i in range(n)), "<u8", n)


def block_error(lay: LayerLayout, path: Path, chunk: int, block: int, got: int, recorded: int) -> CorruptTableError:
    """The CorruptTableError for a block of a chunk file whose digest is not the recorded one."""
    first = block * CHECKED_BLOCK
    return chunk_error(lay, chunk, path, f"block {block} (bytes {first}-{first + CHECKED_BLOCK - 1}) has xxh3 "
                       f"{got:016x}, recorded {recorded:016x}: its contents changed since the table was written")


def write_chunk(path: Path, block: np.ndarray, bar: Any) -> str:
    """Write one chunk file (created, written whole, fsynced), advance `bar` and return its checksum."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = block.data.cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        os.fsync(fd)
    finally:
        os.close(fd)
    bar.update(len(data))
    return checksum(data)


# inotify events that a change of a file's bytes or attributes raises (linux/inotify.h)
_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x2, 0x4, 0x8


class _Inotify:
    """A non-blocking inotify descriptor (Linux, through libc): has any watched file changed?"""

    def __init__(self, fd: int, add_watch: Any) -> None:
        self.fd, self._add_watch, self.pid = fd, add_watch, os.getpid()
        self._local = threading.local()     # a poll object per thread (one may not be polled concurrently)

    @classmethod
    def create(cls) -> _Inotify | None:
        """A new descriptor, or None where the system has none (not Linux, out of instances)."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            init, add_watch = libc.inotify_init1, libc.inotify_add_watch
        except (OSError, AttributeError):
            return None
        add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        return None if fd < 0 else cls(fd, add_watch)

    def watch(self, fd: int) -> bool:
        """Watch the file open as `fd` (its inode, whatever its path becomes); False if refused
        (e.g. the user's inotify watches are used up)."""
        path = os.fsencode(f"/proc/self/fd/{fd}")
        return self._add_watch(self.fd, path, _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE) >= 0

    def pending(self) -> bool:
        """True if events wait to be read (nothing is consumed): the cheap test of every gather."""
        poller = getattr(self._local, "poller", None)
        if poller is None:
            poller = self._local.poller = select.poll()
            poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(0))

    def changed(self) -> bool:
        """True if an event arrived since the last call (all pending events are consumed)."""
        seen = False
        while True:
            try:
                if not os.read(self.fd, 1 << 16):
                    return seen
            except BlockingIOError:
                return seen
            seen = True

    def close(self) -> None:
        os.close(self.fd)


class ChunkWatch:
    """Notices chunk files changed in place under an open table (truncated or rewritten; touched is no change).

    A mapped file truncated under a reader kills it with SIGBUS at the next read of a lost page, and
    one rewritten in place changes rows silently. The tiers that read files after open ("mmap",
    "direct") call `check()` before every gather: it raises CorruptTableError once a watched file's
    size differs from what it was at open, instead of reading it. A file whose modification time
    alone changed (touched by a backup tool, or rewritten in place with as many bytes) may hold the
    same bytes: `recheck(layout, index)`, the tier's, returns True if the tier checks that chunk's
    bytes again before it serves them (the "mmap" tier's first-serve checks, the "direct" tier's
    block checks); otherwise the whole file is checked against its recorded checksum once, here.
    Either way the file is served again if its bytes are the recorded ones, and refused if not.

    The check is cheap: an inotify descriptor watching each file's inode, which the kernel marks
    when a watched file is modified, is polled (one system call per gather, nothing read); only
    after an event are the files stat-ed again, through the table's directory handle. Without
    inotify (other systems, the user's watches used up, a forked child sharing the parent's
    descriptor) every check stats every file. No file descriptor is held for this. A file deleted
    or replaced by rename (as engram's own publish replaces tables) is no change: the inode being
    read keeps its bytes.

    What no check can close: a file truncated after the check, while the gather reads it.
    """

    def __init__(self, tdir: TableDir, recheck: Callable[[LayerLayout, int], bool] | None = None) -> None:
        self._tdir, self._recheck = tdir, recheck
        self._files: list[tuple[LayerLayout, int, tuple[int, int, int]]] = []
        self._notify = _Inotify.create()
        self._lock = threading.Lock()
        self._error: CorruptTableError | None = None

    def add(self, fd: int, lay: LayerLayout, index: int) -> None:
        """Watch chunk `index` of `lay`, open as `fd` (the caller may close `fd` afterwards)."""
        st = os.fstat(fd)
        self._files.append((lay, index, (st.st_ino, st.st_size, st.st_mtime_ns)))
        if self._notify is not None and not self._notify.watch(fd):
            self._notify.close()
            self._notify = None

    def check(self) -> None:
        """Raise CorruptTableError if a watched file changed since it was opened (and at every later
        call); a file only touched (its bytes the recorded ones) is no change."""
        notify = self._notify
        if self._error is None and notify is not None and notify.pid == os.getpid():
            if not notify.pending():
                return
            with self._lock:          # another thread may be confirming an event it consumed
                if self._error is None and not notify.changed():
                    return
        with self._lock:
            if self._error is None:
                self._error = self._find_change()
            if self._error is not None:
                raise self._error

    def _find_change(self) -> CorruptTableError | None:
        for i, (lay, index, (ino, size, mtime)) in enumerate(self._files):
            try:
                st = os.stat(lay.chunk_relpath(index), dir_fd=self._tdir.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue              # unlinked (a replaced table deleted): the inode read is whole
            if st.st_ino != ino or (st.st_size, st.st_mtime_ns) == (size, mtime):
                continue              # another file renamed over it (the inode read is unchanged), or no change
            recorded = index < len(getattr(lay, "checksums", ()))    # a checkpoint shard records none
            if st.st_size == size and self._same_bytes(lay, index, recorded):
                self._files[i] = (lay, index, (ino, size, st.st_mtime_ns))     # touched: served as before
                continue
            if st.st_size != size:
                what = f"its size went from {size} to {st.st_size} bytes"
            elif not recorded:
                what = "its modification time changed (no checksum is recorded to tell a touch from a rewrite)"
            else:
                what = "it was rewritten in place (its modification time changed, its bytes are not the recorded ones)"
            return CorruptTableError(
                f"layer {lay.layer_id} chunk {index} ({os.fspath(lay.chunk_path(self._tdir.path, index))!r}) "
                f"changed after the table was opened: {what}. A file of an open table was written in place (cp "
                "or rsync --inplace over it?): its rows are not read; replace tables only by engram's atomic "
                "publish (overwrite=True), and open the table again")
        return None

    def _same_bytes(self, lay: LayerLayout, index: int, recorded: bool) -> bool:
        """Whether chunk `index` of `lay`, whose modification time changed, may be served again: the
        tier checks its bytes before serving them, or they are the recorded ones now (`recorded`: a
        checksum of the file is recorded to compare with)."""
        if self._recheck is not None and self._recheck(lay, index):
            return True
        return recorded and check_chunk(self._tdir, lay, index, keep_cache=True) is None

    def close(self) -> None:
        """Close the inotify descriptor (callers make sure no gather runs)."""
        self._files = []
        if self._notify is not None:
            self._notify.close()
            self._notify = None
