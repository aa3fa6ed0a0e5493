"""Usage: the calls in flight on an object that can be closed, so that closing waits for them.

    with usage:                 # raises the object's "closed" error once it is closed
        ...                     # read the rows
    usage.refuse(); ...; usage.wait_idle()     # close: no new calls, then wait for the running ones

A plain class with `__enter__`/`__exit__` (a generator-based context manager costs several times
more per call, which a decode step of a few microseconds notices).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["Usage"]


class Usage:
    """Counts calls in flight; refuses new ones once `refuse()` was called.

    Args:
        closed_error: makes the exception `with usage:` raises once refused.
    """

    def __init__(self, closed_error: Callable[[], Exception]) -> None:
        self.lock = threading.Lock()        # also held by callers that must not race refuse()
        self._idle = threading.Condition(self.lock)
        self._active = 0
        self.closed = False
        self._closed_error = closed_error

    def enter(self) -> bool:
        """Count one call in; False (nothing counted) once refused."""
        with self.lock:
            if self.closed:
                return False
            self._active += 1
            return True

    def exit(self) -> None:
        """Count one call out (after a successful `enter`)."""
        with self.lock:
            self._active -= 1
            if self.closed and not self._active:
                self._idle.notify_all()

    def __enter__(self) -> None:
        if not self.enter():
            raise self._closed_error()

    def __exit__(self, *exc: object) -> None:
        self.exit()

    def refuse(self) -> None:
        """Refuse every later call (idempotent)."""
        with self.lock:
            self.closed = True

    def wait_idle(self) -> None:
        """Wait until no call is in flight."""
        with self.lock:
            self._idle.wait_for(lambda: self._active == 0)
