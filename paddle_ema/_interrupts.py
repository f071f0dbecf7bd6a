"""Ctrl-C held back while an update writes the averages, so that it lands between updates.

An update writes each average with two kernels (``a -= w a``, then ``a += w θ``); Python delivers a
KeyboardInterrupt between any two calls, and one landing between those two would leave averages
scaled but not moved. A training loop stopped with Ctrl-C most often stops inside the EMA's update
when the update is a large part of the step; holding SIGINT back for the milliseconds an update
takes lets the loop stop with every average consistent.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["SigintDeferred"]


class SigintDeferred:
    """A context in which SIGINT is recorded, and delivered to the previous handler on exit.

    Only in the main thread (the only one Python delivers signals to, and the only one that may set
    handlers) and only when the handler is a Python function (the default raises KeyboardInterrupt);
    elsewhere it does nothing.
    """

    __slots__ = ("_previous", "_caught")

    def __enter__(self) -> SigintDeferred:
        self._previous: Any = None
        self._caught: list[FrameType | None] = []
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if callable(previous):
                self._previous = previous
                signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        self._caught.append(frame)

    def __exit__(self, *exc_info: Any) -> None:
        if self._previous is None:
            return
        signal.signal(signal.SIGINT, self._previous)
        if self._caught:
            self._previous(signal.SIGINT, self._caught[0])
