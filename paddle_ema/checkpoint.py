"""Loading checkpoints into programs that carry paddle_ema state."""

from __future__ import annotations

import logging
from typing import Any

import paddle

from paddle_ema import _graph, _ir, ema

__all__ = ["load"]

_logger = logging.getLogger(__name__)


def load(program: Any, path_prefix: str) -> None:
    """Load a ``paddle.static.save`` checkpoint into ``program``; EMA state it lacks starts fresh.

    A drop-in for ``paddle.static.load(program, path_prefix)`` when ``program`` has paddle_ema EMAs
    (made by :meth:`ExponentialMovingAverage.update`). Everything the checkpoint holds is loaded as
    Paddle would. An EMA whose state the checkpoint does not hold completely (it was saved before the
    EMA was added, or by another EMA) starts fresh, as if just created: its averages and step are zero,
    and a warning names what was missing. Any other variable of the program missing from the
    checkpoint is an error, raised before anything is loaded, where ``paddle.static.load`` would stop
    half-way.

    Run the startup program first, as for ``paddle.static.load``.

    Args:
        program: The training program (the default main program of the EMAs).
        path_prefix: What was passed to ``paddle.static.save`` (without ``.pdparams``).

    Raises:
        ValueError: a variable of ``program`` other than EMA state is not in the checkpoint.
        RuntimeError: an EMA of ``program`` is applied; restore it before loading.

    Example:
        .. code-block:: python

            # a checkpoint written before the EMA was added to the training script
            ema = paddle_ema.ExponentialMovingAverage(0.999)
            ema.update()
            exe.run(paddle.static.default_startup_program())
            paddle_ema.load(paddle.static.default_main_program(), "ckpt/model")
    """
    emas = ema.updated_emas(program)
    if any(e._applied is not None for e in emas):
        raise RuntimeError(
            "an ExponentialMovingAverage of this program is applied; call ema.restore(executor) before "
            "loading a checkpoint, or the restore would overwrite what was loaded"
        )
    state = paddle.static.load_program_state(path_prefix)
    fresh = [e for e in emas if not set(_graph.state_names(e._plan)) <= state.keys()]
    ema_names = {name for e in emas for name in _graph.state_names(e._plan)}
    missing = sorted(_ir.persistable_names(program) - ema_names - state.keys())
    if missing:
        raise ValueError(
            f"the checkpoint {path_prefix!r} lacks {len(missing)} variable(s) of the program, e.g. "
            f"{missing[:5]}; it was written by another model (nothing was loaded)"
        )
    absent = {e: [n for n in _graph.state_names(e._plan) if n not in state] for e in fresh}
    for e in fresh:  # a part of an EMA's state would not match the rest: load none of it
        for name in _graph.state_names(e._plan):
            state.pop(name, None)
    paddle.static.set_program_state(program, state)
    scope = paddle.static.global_scope()
    for e in fresh:
        _graph.reset_state(e._plan, scope)
        _logger.warning(
            "%s starts fresh: the checkpoint %r has no %s", e._name, path_prefix,
            ", ".join(absent[e][:3]) + (" ..." if len(absent[e]) > 3 else ""),
        )
