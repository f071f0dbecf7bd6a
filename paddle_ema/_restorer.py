"""What ``apply`` returns in both EMA classes: a context manager that restores on leaving ``with``."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["Restorer"]


class Restorer:
    """Calls ``restore`` when a ``with`` block ends (also by an exception), if ``need_restore``.

    ``apply`` has already taken effect when this is made, so ``apply(...)`` works with or without
    ``with``.
    """

    def __init__(self, restore: Callable[[], None], need_restore: bool) -> None:
        self._restore = restore
        self._need_restore = need_restore

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: Any) -> None:
        if self._need_restore:
            self._restore()
