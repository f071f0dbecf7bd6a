"""The public ExponentialMovingAverage class and its apply/restore state."""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from typing import Any, Iterator

import paddle
from paddle.utils import unique_name

from paddle_ema import _graph, _ir

__all__ = ["ExponentialMovingAverage"]

_logger = logging.getLogger(__name__)


def _check_decay(decay: Any) -> float:
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(
            f"decay must be a float in [0, 1), got {decay!r} of type {type(decay).__name__}; "
            "pass e.g. decay=0.999"
        )
    if not (0.0 <= float(decay) < 1.0) or math.isnan(decay):
        raise ValueError(f"decay must be in [0, 1), got {decay!r}; pass e.g. decay=0.999")
    return float(decay)


def _check_thres_steps(thres_steps: Any) -> Any:
    if thres_steps is None:
        return None
    if not _ir.is_graph_variable(thres_steps):
        raise TypeError(
            "thres_steps must be a static-graph Variable/Value holding the step count (e.g. "
            "paddle_ema.global_step_counter() or paddle.static.data('step', [1], 'int64')), got "
            f"{thres_steps!r} of type {type(thres_steps).__name__}; for a fixed decay leave it None"
        )
    dtype = _ir.dtype_name(thres_steps)
    if dtype not in ("int32", "int64", "float16", "float32", "float64"):
        raise TypeError(f"thres_steps must have an int or float dtype, got {dtype}")
    return thres_steps


def _check_executor(executor: Any, method: str) -> None:
    if not isinstance(executor, paddle.static.Executor):
        raise TypeError(
            f"{method}(executor) needs a paddle.static.Executor, got {executor!r} of type "
            f"{type(executor).__name__}; pass the Executor that runs your training program"
        )


class ExponentialMovingAverage:
    """Exponential moving average of a static program's parameters, with exact bias correction.

    A drop-in replacement for ``paddle.static.ExponentialMovingAverage`` that works on Paddle 3.x under
    PIR and the legacy IR, and on Paddle 2.6. For every parameter :math:`\\theta` of the default main
    program whose ``do_model_average`` is not False (batch-norm statistics included) it keeps

    .. math::

        \\text{ema}_t = d_t\\,\\text{ema}_{t-1} + (1 - d_t)\\,\\theta_t, \\qquad \\text{ema}_0 = 0,

    updated by the ops that :meth:`update` appends to the training program. :meth:`apply` writes the
    bias-corrected average :math:`\\text{ema}_t / (1 - \\prod_{i \\le t} d_i)` into the parameters (with a
    constant decay the denominator is :math:`1 - d^t`) and :meth:`restore` puts the trained values back.

    With ``thres_steps`` the decay warms up: :math:`d_t = \\min(\\text{decay}, (1 + s_t) / (10 + s_t))`,
    :math:`s_t` being the value of ``thres_steps`` at step ``t``, usually the global step.

    Args:
        decay: The decay rate, in [0, 1); usually close to 1 (0.999, 0.9999).
        thres_steps: Optional int or float Variable/Value (e.g. from :func:`paddle_ema.global_step_counter`)
            that schedules the decay as above.
        name: Prefix of the state's variable names; made unique per instance. Defaults to ``"ema"``.

    Raises:
        TypeError: ``decay`` is not a number, or ``thres_steps`` is not an int/float graph variable.
        ValueError: ``decay`` is outside [0, 1).

    Example:
        .. code-block:: python

            import numpy as np
            import paddle
            from paddle_ema import ExponentialMovingAverage

            paddle.enable_static()
            x = paddle.static.data(name="x", shape=[-1, 5], dtype="float32")
            hidden = paddle.static.nn.fc(x, size=10)
            cost = paddle.mean(hidden)
            paddle.optimizer.Adam(learning_rate=0.001).minimize(cost)

            ema = ExponentialMovingAverage(0.999)
            ema.update()

            exe = paddle.static.Executor(paddle.CPUPlace())
            exe.run(paddle.static.default_startup_program())
            for _ in range(6):
                exe.run(feed={"x": np.random.rand(10, 5).astype("float32")}, fetch_list=[cost])
            with ema.apply(exe):
                pass  # evaluate here: the parameters hold their averages

    References:
        TensorFlow's ``tf.train.ExponentialMovingAverage`` (the warm-up schedule), and Kingma & Ba,
        "Adam" (2015), section 3 (the bias correction).
    """

    def __init__(
        self, decay: float = 0.999, thres_steps: Any | None = None, name: str | None = None
    ) -> None:
        self._decay = _check_decay(decay)
        self._thres_steps = _check_thres_steps(thres_steps)
        self._program = paddle.static.default_main_program()
        self._params = [
            p
            for p in self._program.global_block().all_parameters()
            if getattr(p, "do_model_average", None) is not False
        ]
        self._plan = _graph.EmaPlan.for_params(unique_name.generate(name or "ema"), self._params)
        self._state: _graph.StateHandles | None = None
        self._apply_program: paddle.static.Program | None = None
        self._restore_program: paddle.static.Program | None = None
        # Between apply() and restore(): whether averages are applied, and whether the apply program ran
        # (it does not before the first update step, when there is nothing to apply or restore).
        self._applied = False
        self._backed_up = False
        _logger.debug("%s averages %d parameters", self._plan.step, len(self._params))

    @property
    def decay(self) -> float:
        """The configured (maximum) decay rate."""
        return self._decay

    @property
    def parameter_names(self) -> list[str]:
        """Names of the parameters this EMA averages, in program order."""
        return [slot.param for slot in self._plan.slots]

    def update(self) -> None:
        """Append the EMA ops to the default main program.

        Call it once, after ``optimizer.minimize``, so the averages see the updated parameters.

        Raises:
            RuntimeError: ``update()`` was already called, or the default main program is not the one
                this EMA was built on.
        """
        if self._state is not None:
            raise RuntimeError(
                f"update() was already called on this ExponentialMovingAverage ({self._plan.step}); call "
                "it once per training program, or create another instance for another program"
            )
        if paddle.static.default_main_program() is not self._program:
            raise RuntimeError(
                "update() must append to the program whose parameters this ExponentialMovingAverage "
                "averages; call it under the same paddle.static.program_guard as the constructor"
            )
        with paddle.static.name_scope("ema"), _ir.update_role(self._program):
            state = _graph.emit_state(self._plan)
            scalars = _graph.emit_step_scalars(self._decay, self._thres_steps)
            _graph.emit_update(self._plan, self._params, state, scalars)
        self._state = state

    @contextlib.contextmanager
    def apply(self, executor: paddle.static.Executor, need_restore: bool = True) -> Iterator[None]:
        """Write the bias-corrected averages into the parameters for the duration of a ``with`` block.

        The parameters are backed up first. Before the first update step has run they are left as
        they are (there is no average yet). Like the Executor's own default, this works on
        ``paddle.static.global_scope()``; if you train in another scope, wrap the block in
        ``paddle.static.scope_guard(scope)``.

        Args:
            executor: The Executor that runs the training program (its place is used).
            need_restore: Restore the parameters when the block exits (also on an exception). With
                False, call :meth:`restore` yourself.

        Raises:
            TypeError: ``executor`` is not a ``paddle.static.Executor``.
            RuntimeError: :meth:`update` was never called, or the averages are already applied and
                not yet restored.

        Example:
            .. code-block:: python

                with ema.apply(exe):
                    exe.run(test_program, feed=feed, fetch_list=[pred])
        """
        _check_executor(executor, "apply")
        if self._state is None:
            raise RuntimeError("apply() needs the EMA ops: call ema.update() after optimizer.minimize()")
        if self._applied:
            raise RuntimeError(
                "the averages are already applied and the trained parameters are backed up; call "
                "ema.restore(executor) before applying again"
            )
        if _graph.debias_value(self._plan) == 0.0:
            _logger.info("apply() before the first update step: parameters left as they are")
        else:
            _graph.declare_backups(self._plan)
            if self._apply_program is None:
                self._apply_program = _graph.build_apply_program(self._plan)
            executor.run(self._apply_program)
            self._backed_up = True
        self._applied = True
        try:
            yield
        finally:
            if need_restore:
                self.restore(executor)

    def restore(self, executor: paddle.static.Executor) -> None:
        """Put back the parameters that :meth:`apply` backed up. Does nothing if nothing is applied.

        Args:
            executor: The Executor that runs the training program.

        Raises:
            TypeError: ``executor`` is not a ``paddle.static.Executor``.
        """
        _check_executor(executor, "restore")
        if not self._applied:
            _logger.warning("restore() called with no applied averages; parameters left unchanged")
            return
        if self._backed_up:
            if self._restore_program is None:
                self._restore_program = _graph.build_restore_program(self._plan)
            executor.run(self._restore_program)
            _graph.release_backups(self._plan)
        self._applied = False
        self._backed_up = False
