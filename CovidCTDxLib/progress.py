"""Progress reporting and cancellation shared by every long-running stage.

Why: the GUI, the CLI progress bar and the tests all observe long work the same way, through
one ``(fraction, message)`` callback, and cancel it through one flag that stages check
between chunks of work. A cancelled stage raises :class:`CancelledError` so nothing
half-computed leaks into a result.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

from .errors import CancelledError

ProgressCallback = Callable[[float, str], None]


class CancelToken:
    """A thread-safe cancel flag; stages call :meth:`check` between chunks of work."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`CancelledError` if cancellation was requested."""
        if self._event.is_set():
            raise CancelledError("Cancelled by the user; no results were written.")


class Progress:
    """Maps a sub-task's 0..1 progress into a slice of the parent's range.

    Why: the pipeline gives each stage a share of the bar without the stage knowing its
    share; a stage reports its own 0..1 and the parent sees a monotone overall fraction.
    """

    def __init__(
        self,
        callback: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
        start: float = 0.0,
        end: float = 1.0,
    ) -> None:
        self.callback = callback
        self.cancel = cancel
        self.start = start
        self.end = end

    def __call__(self, fraction: float, message: str) -> None:
        if self.cancel is not None:
            self.cancel.check()
        if self.callback is not None:
            fraction = min(max(fraction, 0.0), 1.0)
            self.callback(self.start + (self.end - self.start) * fraction, message)

    def sub(self, start: float, end: float) -> "Progress":
        """A child reporter covering ``[start, end]`` of this reporter's range."""
        span = self.end - self.start
        return Progress(self.callback, self.cancel, self.start + span * start, self.start + span * end)
