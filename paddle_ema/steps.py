"""A global step counter that works in every Paddle IR.

``paddle.optimizer.lr.autoincreased_step_counter`` dies under Paddle 3.3's PIR (it builds its state
with ``create_global_var``); this is the same idea built on paddle_ema's IR adapter.
"""

from __future__ import annotations

import weakref
from typing import Any

import paddle
from paddle.utils import unique_name

from paddle_ema import _ir
from paddle_ema._select import short_repr

__all__ = ["global_step_counter", "counter_start"]

# Every counter made here, per program and variable name (two programs built under their own
# unique_name.guard both have a global_step_0), with the value its startup program gives it: what
# paddle_ema.load sets it to when a checkpoint does not hold it (the counter then starts afresh with
# the EMA it schedules).
_STARTS: weakref.WeakKeyDictionary[Any, dict[str, int]] = weakref.WeakKeyDictionary()


def counter_start(program: Any, name: str) -> int | None:
    """The value the startup program gives counter ``name`` of ``program`` made by
    :func:`global_step_counter` (``begin - 1``), or None if no such counter was made."""
    return _STARTS.get(program, {}).get(name)


def global_step_counter(begin: int = 0, name: str | None = None) -> Any:
    """Append a persistable int64 counter to the default main program and return it.

    The counter is incremented by one each time the program runs, before any op that reads it, so it
    holds ``begin`` during the first run, ``begin + 1`` during the second, and so on. It is saved and
    loaded with the program's other persistable variables. In the legacy IR a test program made with
    ``clone(for_test=True)`` does not increment it. PIR's ``Program.clone()`` copies every op made so
    far: under PIR, clone the test program before creating the counter.

    Args:
        begin: The value during the first run.
        name: Prefix of the counter's variable name; made unique. Defaults to ``"global_step"``.

    Returns:
        The counter: an int64 Variable (legacy IR) or Value (PIR) of shape [1]. Pass it as
        ``thres_steps`` to :class:`paddle_ema.ExponentialMovingAverage`.

    Raises:
        TypeError: ``begin`` is not an int.

    Example:
        .. code-block:: python

            step = paddle_ema.global_step_counter()
            ema = paddle_ema.ExponentialMovingAverage(0.999, thres_steps=step)
    """
    if isinstance(begin, bool) or not isinstance(begin, int):
        raise TypeError(f"begin must be an int, got {short_repr(begin)} of type {type(begin).__name__}")
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(
            f"name must be a non-empty str or None, got {short_repr(name)} of type {type(name).__name__}"
        )
    counter_name = unique_name.generate(name or "global_step")
    counter = _ir.create_state(counter_name, [1], "int64", begin - 1)
    _STARTS.setdefault(paddle.static.default_main_program(), {})[counter_name] = begin - 1
    # Marked as a learning-rate-schedule op, so a legacy clone(for_test=True) leaves it out:
    # evaluating must not move the step that schedules training.
    program = paddle.static.default_main_program()
    with paddle.static.name_scope("global_step"), _ir.schedule_role(program):
        paddle.assign(counter + 1, output=counter)
    return counter
