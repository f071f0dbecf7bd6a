"""Decay schedules: which decay :math:`d_t` each EMA update uses, as the weight :math:`w_t = 1 - d_t`.

The maths every paddle_ema average shares, in one place: :class:`Schedule` checks the options and
holds them, :func:`step_weight` is the definition in float64 Python numbers, and
:func:`emit_step_weight` computes the same weight with paddle ops (in a static program it appends
them). For update number :math:`u = 0, 1, 2, \\dots`:

* the first ``start_step`` updates use :math:`d = 0`: the average just follows the parameter;
* then, with :math:`t = u - \\text{start\\_step}`, the decay is ``decay`` (constant), or
  :math:`\\min(\\text{decay}, (1 + s) / (10 + s))` for a threshold warm-up driven by a step value
  :math:`s` (``thres_steps``; a negative or NaN :math:`s` counts as 0), or
  :math:`1 - (1 + t / \\gamma)^{-p}` for the power warm-up (``power`` :math:`p`, ``inv_gamma``
  :math:`\\gamma`), or :math:`\\text{decay} \\cdot (1 - e^{-(t + 1) / \\tau})` for the exponential
  warm-up of PaddleDetection (``tau`` :math:`\\tau`; dygraph only);
* every schedule's decay is clipped to ``[min_decay, decay]``.

Only the weight :math:`w_t` enters the update :math:`a \\leftarrow a + w_t(\\theta - a)`, so it is
computed directly (``1 - d`` in float32 would lose up to 3e-8 absolute, 3e-4 of the weight at decay
0.9999), then rounded once to the float32 the averages use. Every schedule's bias correction is then
exact: it is the moving average of 1 with the same weights (see :mod:`paddle_ema._graph`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Iterable

import numpy as np
import paddle

from paddle_ema._select import short_repr

__all__ = [
    "Schedule", "bias_correction_problem", "check_decay", "debias_factor", "emit_debias_factors",
    "emit_step_weight", "next_bias_correction", "step_weight",
]

_WEIGHT_DTYPE = "float32"  # what the averages are updated with (cast where an average needs it)


def _real(value: Any, argument: str, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{argument} must be a number, got {short_repr(value)} of type {type(value).__name__}; "
            f"pass e.g. {example}"
        )
    try:
        return float(value)
    except OverflowError:
        return math.inf


def check_decay(decay: Any) -> float:
    """``decay`` as a float in [0, 1), or a TypeError/ValueError that says so."""
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(
            f"decay must be a float in [0, 1), got {short_repr(decay)} of type {type(decay).__name__}; "
            "pass e.g. decay=0.999"
        )
    value = _real(decay, "decay", "decay=0.999")
    if not (0.0 <= value < 1.0):  # also False for NaN
        raise ValueError(f"decay must be in [0, 1), got {decay!r}; pass e.g. decay=0.999")
    return value


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The options that decide each update's decay; :meth:`make` checks them.

    Attributes:
        decay: The (maximum) decay, in [0, 1).
        threshold: Whether the decay warms up with a step value ``s`` (``thres_steps``).
        start_step: Updates that use decay 0 before the schedule starts.
        power: The power warm-up's exponent, or None.
        inv_gamma: The power warm-up's time scale.
        min_decay: The lower bound of the decay.
        tau: The exponential warm-up's time scale, or None for none.
    """

    decay: float
    threshold: bool = False
    start_step: int = 0
    power: float | None = None
    inv_gamma: float = 1.0
    min_decay: float = 0.0
    tau: float | None = None

    @classmethod
    def make(cls, decay: Any, *, threshold: bool = False, start_step: Any = 0, power: Any = None,
             inv_gamma: Any = 1.0, min_decay: Any = 0.0, tau: Any = None) -> Schedule:
        """A checked schedule, from the options of :class:`paddle_ema.ExponentialMovingAverage`.

        Args:
            decay: The (maximum) decay, in [0, 1).
            threshold: Whether the decay warms up as ``min(decay, (1 + s) / (10 + s))`` with a step
                value ``s`` (what ``thres_steps`` gives).
            start_step: Updates that use decay 0 before the schedule starts; an int, at least 0.
            power: The power warm-up's exponent (positive), or None. Excludes ``threshold``.
            inv_gamma: The power warm-up's time scale (positive); only with ``power``.
            min_decay: The lower bound of the decay, in [0, decay].
            tau: The exponential warm-up's time scale (positive), or None. Excludes the others.

        Returns:
            The schedule.

        Raises:
            TypeError: an option is not a number (``start_step``: not an int).
            ValueError: an option is out of range, or ``threshold`` and ``power`` are both given;
                the message names the option and a value that works.
        """
        decay = check_decay(decay)
        if isinstance(start_step, bool) or not isinstance(start_step, numbers.Integral):
            raise TypeError(
                f"start_step must be an int (updates that use decay 0 before the schedule starts), got "
                f"{short_repr(start_step)} of type {type(start_step).__name__}; pass e.g. start_step=100"
            )
        if start_step < 0:
            raise ValueError(f"start_step must be at least 0, got {start_step}")
        if power is not None:
            if threshold:
                raise ValueError(
                    "thres_steps and power are two warm-ups of the decay and exclude each other; pass "
                    "thres_steps=None to use power, or power=None to use thres_steps"
                )
            power = _real(power, "power", "power=2/3 (or 3/4)")
            if not (0.0 < power < math.inf):
                raise ValueError(f"power must be positive and finite, got {power!r}; e.g. power=2/3")
        inv_gamma_value = _real(inv_gamma, "inv_gamma", "inv_gamma=1.0")
        if not (0.0 < inv_gamma_value < math.inf):
            raise ValueError(f"inv_gamma must be positive and finite, got {inv_gamma!r}; e.g. inv_gamma=1.0")
        if power is None and inv_gamma_value != 1.0:
            raise ValueError(
                f"inv_gamma={inv_gamma!r} only scales the power warm-up; pass power too (e.g. "
                "power=2/3), or leave inv_gamma at 1.0"
            )
        min_decay_value = _real(min_decay, "min_decay", "min_decay=0.0")
        if not (0.0 <= min_decay_value <= decay):
            raise ValueError(
                f"min_decay must be in [0, decay] = [0, {decay}], got {min_decay!r}; e.g. min_decay=0.0"
            )
        if tau is not None:
            if threshold or power is not None:
                raise ValueError("the exponential warm-up (tau) excludes the threshold and power warm-ups")
            tau = _real(tau, "tau", "tau=2000.0")
            if not (0.0 < tau < math.inf):
                raise ValueError(f"tau must be positive and finite, got {tau!r}; e.g. tau=2000.0")
        return cls(decay, bool(threshold), int(start_step), power, inv_gamma_value, min_decay_value, tau)

    @property
    def is_constant(self) -> bool:
        """Whether every update uses ``decay`` itself."""
        return not self.threshold and self.power is None and self.tau is None and self.start_step == 0

    @property
    def weight_bounds(self) -> tuple[float, float]:
        """The weights of ``decay`` and of ``min_decay``: every scheduled weight lies between them.

        Each is computed in float64 and rounded once to float32: ``1 - float32(decay)`` would be off
        by up to half an ulp of 1 (3e-8), which is 3e-4 of the weight at decay 0.9999. Every such
        weight is a normal float32, so any decay below 1 moves the average.
        """
        return float(np.float32(1.0 - self.decay)), float(np.float32(1.0 - self.min_decay))


def step_weight(schedule: Schedule, update: int, steps: float | None = None) -> float:
    """The weight :math:`1 - d` of update number ``update`` (from 0), as the averages use it.

    The definition the graph's :func:`emit_step_weight` computes, in float64 Python numbers, rounded
    to float32 at the end (as the graph rounds it). Use it to see what decays a schedule gives.

    Args:
        schedule: The schedule, from :meth:`Schedule.make`.
        update: How many updates came before this one.
        steps: The threshold warm-up's step value ``s`` at this update (ignored by other schedules).

    Returns:
        The weight :math:`1 - d`, a float that float32 represents exactly.

    Example:
        .. code-block:: python

            from paddle_ema import schedule

            power = schedule.Schedule.make(0.999, power=2 / 3, start_step=5)
            print([round(1 - schedule.step_weight(power, u), 4) for u in (0, 5, 6, 100)])
            # [0.0, 0.0, 0.37, 0.9523]: decay 0 for 5 updates, then 1 - (1 + t) ** (-2/3)
    """
    if update < schedule.start_step:
        return 1.0
    lowest, highest = schedule.weight_bounds
    if schedule.power is not None:
        t = update - schedule.start_step
        weight = (1.0 + t / schedule.inv_gamma) ** -schedule.power
    elif schedule.tau is not None:
        t = update - schedule.start_step
        # 1 - decay * (1 - e), summed so that a tiny weight keeps its relative precision.
        weight = (1.0 - schedule.decay) + schedule.decay * math.exp(-(t + 1) / schedule.tau)
    elif schedule.threshold:
        s = float(steps) if steps is not None and steps > 0 else 0.0  # also 0 for NaN
        weight = float(np.float32(np.float32(9.0) / np.float32(s + 10.0)))
    else:
        weight = lowest
    return float(np.float32(min(max(weight, lowest), highest)))


def next_bias_correction(correction: float, weight: float) -> float:
    """The bias denominator after an update of weight ``weight``: :math:`c + w (1 - c)`.

    The moving average of the constant 1 with the averages' own weights, from :math:`c_0 = 0`:
    :math:`c_t = 1 - \\prod_{i \\le t} d_i` exactly, whatever the schedule. In float64 (what the
    static graph keeps it in, as a lerp toward 1).
    """
    return correction + weight * (1.0 - correction)


def debias_factor(correction: float, dtype: str) -> float:
    """What an average of ``dtype`` is multiplied by to remove its bias: :math:`1 / c`.

    The reciprocal of the bias denominator :math:`c` computed in float64 and rounded once to the
    average's dtype (float32 or float64), here for numbers and in :func:`emit_debias_factors` with
    paddle ops; every debiased average paddle_ema gives is the average times this factor, so they
    agree bit for bit. A product rather than the quotient by :math:`c`: within one ulp of it (one
    more rounding), but Paddle's CPU division by a one-element tensor runs through a broadcast kernel
    at about half memory speed, while ``scale`` with a tensor factor runs at full speed (64 tensors
    of 512x512: 16.5 ms against 9.7, in both IRs and on 2.6).

    Args:
        correction: The bias denominator :math:`c = 1 - \\prod d_i`, non-zero (after an update).
        dtype: The average's dtype name, ``"float32"`` or ``"float64"``.

    Returns:
        The factor, a float that ``dtype`` represents exactly.
    """
    return float(np.array(1.0 / correction, dtype=dtype))


def emit_debias_factors(correction: Any, dtypes: Iterable[str]) -> dict[str, Any]:
    """:func:`debias_factor` for each of ``dtypes``, computed by paddle ops: ``{dtype: tensor [1]}``.

    Args:
        correction: float64 tensor of shape [1], the bias denominator (non-zero when this runs).
        dtypes: The averages' dtype names; the reciprocal is computed once, and cast once to each.
    """
    reciprocal = paddle.full([1], 1.0, "float64") / correction
    return {
        dtype: reciprocal if dtype == "float64" else paddle.cast(reciprocal, dtype)
        for dtype in dict.fromkeys(dtypes)
    }


def bias_correction_problem(updates: int, correction: float, schedule: Schedule | None = None) -> str | None:
    """Why ``correction`` cannot be the bias denominator after ``updates`` updates, or None if it can.

    It is 0 before the first update; after ``u`` updates :math:`c = 1 - \\prod d_i` lies in
    :math:`[1 - d^u, 1]`, ``d`` being the schedule's highest decay (every decay is at most that),
    or in :math:`(0, 1]` when the schedule is not known. A smaller ``c`` would blow the applied
    averages up by :math:`1 / c`. The lower bound has a relative slack of 1e-6, which lets through a
    value stored rounded to float32.
    """
    if updates < 0:
        return f"a negative update count ({updates})"
    if updates == 0:
        return None if correction == 0.0 else f"{correction!r} before the first update (it is 0 then)"
    if schedule is None:
        inside = 0.0 < correction <= 1.0
        return None if inside else f"{correction!r} after {updates} update(s) (not in (0, 1])"
    weight = schedule.weight_bounds[0]  # 1 at decay 0: every update copies, and c is 1
    lowest = (1.0 if weight >= 1.0 else -math.expm1(updates * math.log1p(-weight))) * (1.0 - 1e-6)
    if lowest <= correction <= 1.0:
        return None
    return (f"{correction!r}, which {updates} update(s) at decay {schedule.decay} cannot reach (it "
            f"lies in [{lowest:.6g}, 1])")


def _float64(value: float) -> Any:
    return paddle.full([1], value, "float64")


def emit_step_weight(schedule: Schedule, update: Any, thres_steps: Any | None = None) -> Any:
    """This update's weight :math:`1 - d` as a float32 tensor of shape [1], computed by paddle ops.

    Args:
        schedule: The schedule.
        update: int64 tensor of shape [1]: how many updates came before this one (read before it is
            incremented). Not read by a constant schedule.
        thres_steps: The threshold warm-up's step value (a tensor holding one number), if any.
    """
    if schedule.tau is not None:
        raise NotImplementedError("the exponential warm-up is ModelEMA's (dygraph) only")
    lowest, highest = schedule.weight_bounds
    constant = paddle.full([1], lowest, _WEIGHT_DTYPE)
    if schedule.is_constant:
        return constant
    # where + full is quiet and exact in every IR: paddle.maximum rejects legacy Variables on Paddle
    # 3.3, and paddle.clip warns under PIR (it asks a Value for its place).
    if schedule.power is not None:
        # In float64, then rounded once: the weight keeps float32's relative precision at any t. The
        # constants are float64 tensors because a float exponent or factor becomes a float32 op
        # attribute, and a float32 power (-2/3 off by 3e-8) is off by 5e-7 relative at t = 1e9.
        # (paddle.log and paddle.exp reject legacy Variables on Paddle 3.3; elementwise pow works.)
        t = paddle.cast(update, "float64") - _float64(schedule.start_step)
        t = paddle.where(t > 0.0, t, paddle.zeros([1], "float64"))
        base = t / _float64(schedule.inv_gamma) + _float64(1.0)
        weight = paddle.cast(paddle.pow(base, _float64(-schedule.power)), _WEIGHT_DTYPE)
    elif schedule.threshold:
        steps = paddle.reshape(paddle.cast(thres_steps, _WEIGHT_DTYPE), [1])
        steps = paddle.where(steps > 0.0, steps, paddle.zeros([1], _WEIGHT_DTYPE))  # NaN counts as 0
        weight = paddle.full([1], 9.0, _WEIGHT_DTYPE) / (steps + 10.0)  # one correctly rounded division
    else:
        weight = constant
    weight = paddle.where(weight > constant, weight, constant)
    if highest < 1.0:
        ceiling = paddle.full([1], highest, _WEIGHT_DTYPE)
        weight = paddle.where(weight < ceiling, weight, ceiling)
    if schedule.start_step > 0:
        following = paddle.cast(update, "float64") < float(schedule.start_step)
        weight = paddle.where(following, paddle.ones([1], _WEIGHT_DTYPE), weight)
    return weight
