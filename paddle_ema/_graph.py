"""Graph builder: emits the ops of an exponential moving average into static programs.

Each function either emits into the current program (under the caller's ``program_guard``) and returns
handles to what it emitted, or builds and returns a new program. None of them keeps state: the names
of everything an EMA owns are planned once, in :class:`EmaPlan`, and passed in.

The maths, for decays :math:`d_1, d_2, \\dots`:

.. math::

    a_t = d_t a_{t-1} + (1 - d_t)\\,\\theta_t, \\qquad
    c_t = d_t c_{t-1} + (1 - d_t) = 1 - \\prod_{i \\le t} d_i, \\qquad a_0 = c_0 = 0

and ``apply`` writes the debiased average :math:`a_t / c_t` into the parameter. :math:`c_t` is the
moving average of the constant 1, emitted with the very op and the very weight that update the
parameters' averages, so the two round alike and their ratio is exact to a few ulp. A running fp32
product of the decays (or ``1 - pow(decay, t)``, as Paddle's own class does) loses one to two more
digits, and is wrong outright when the decay varies.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import paddle

from paddle_ema import _ir

# The bias denominator and the decay schedule are kept in float32 whatever the parameters' dtype.
_SCALAR_DTYPE = "float32"


@dataclasses.dataclass(frozen=True)
class Slot:
    """One averaged parameter and the names of the tensors paddle_ema keeps for it."""

    param: str
    shape: tuple[int, ...]
    dtype: str
    average: str
    backup: str


@dataclasses.dataclass(frozen=True)
class EmaPlan:
    """Names of every tensor one EMA instance owns. The only place those names are made."""

    step: str
    debias: str
    slots: tuple[Slot, ...]

    @classmethod
    def for_params(cls, prefix: str, params: Sequence[Any]) -> EmaPlan:
        """Plan the state of an EMA named ``prefix`` over graph parameters ``params``."""
        slots = tuple(
            Slot(
                param=p.name,
                shape=tuple(p.shape),
                dtype=_ir.dtype_name(p),
                average=f"{prefix}.{p.name}.average",
                backup=f"{prefix}.{p.name}.backup",
            )
            for p in params
        )
        return cls(step=f"{prefix}.step", debias=f"{prefix}.debias", slots=slots)


@dataclasses.dataclass(frozen=True)
class StateHandles:
    """The training program's handles to an EMA's state, as :func:`emit_state` made them."""

    step: Any
    debias: Any
    averages: tuple[Any, ...]


def emit_state(plan: EmaPlan) -> StateHandles:
    """Create the EMA's persistable state, zero-initialised by the current startup program.

    Must run under ``paddle.static.program_guard(main, startup)``. If the startup program has already
    run (the parameters hold data), the state is also set in the global scope right away.
    """
    step = _ir.create_state(plan.step, [1], "int64", 0)
    debias = _ir.create_state(plan.debias, [1], _SCALAR_DTYPE, 0.0)
    averages = tuple(_ir.create_state(s.average, s.shape, s.dtype, 0.0) for s in plan.slots)

    place = _ir.initialized_place(plan.slots[0].param) if plan.slots else None
    if place is not None:
        _ir.fill_scope_tensor(plan.step, [1], "int64", 0, place)
        _ir.fill_scope_tensor(plan.debias, [1], _SCALAR_DTYPE, 0.0, place)
        for slot in plan.slots:
            _ir.fill_scope_tensor(slot.average, slot.shape, slot.dtype, 0.0, place)
    return StateHandles(step=step, debias=debias, averages=averages)


def emit_weight(decay: float, thres_steps: Any | None) -> Any:
    """Emit this step's interpolation weight :math:`1 - d_t`: a float32 tensor of shape [1].

    With ``thres_steps`` the decay warms up as :math:`d_t = \\min(decay, (1 + s) / (10 + s))`, where
    ``s`` is the value of ``thres_steps`` at this step (usually the global step). The weight is made
    once per step and shared by every average.
    """
    if thres_steps is None:
        return paddle.full([1], 1.0 - decay, _SCALAR_DTYPE)
    steps = paddle.reshape(paddle.cast(thres_steps, _SCALAR_DTYPE), [1])
    warmup = (steps + 1.0) / (steps + 10.0)
    # paddle.minimum rejects legacy Variables on Paddle 3.3, and paddle.clip warns under PIR (it asks a
    # Value for its place); where + full is quiet and exact in every IR.
    decay_t = paddle.where(warmup < decay, warmup, paddle.full([1], decay, _SCALAR_DTYPE))
    return 1.0 - decay_t


def _cast_once(value: Any, dtype: str, cache: dict[str, Any]) -> Any:
    """``value`` cast to ``dtype``, emitting at most one cast per dtype per program."""
    if dtype not in cache:
        cache[dtype] = value if dtype == _SCALAR_DTYPE else paddle.cast(value, dtype)
    return cache[dtype]


def emit_update(params: Sequence[Any], state: StateHandles, weight: Any) -> None:
    """Emit one EMA step: ``step += 1``; every average and the bias denominator move toward their target.

    One in-place op per parameter: ``average += weight * (param - average)``, which is
    :math:`d_t a + (1 - d_t) \\theta` in a single read of each operand and a single write.

    Args:
        params: The parameters, in the order of ``state.averages``; read after the optimizer updated them.
        state: Handles made by :func:`emit_state` in the same program.
        weight: This step's :math:`1 - d_t`, from :func:`emit_weight`.
    """
    weights: dict[str, Any] = {}
    paddle.increment(state.step)
    for param, average in zip(params, state.averages):
        _ir.lerp_(average, param, _cast_once(weight, _ir.dtype_name(param), weights))
    # The moving average of the constant 1, through the same op and weight as the averages.
    _ir.lerp_(state.debias, paddle.ones([1], _SCALAR_DTYPE), weight)


def build_apply_program(plan: EmaPlan) -> paddle.static.Program:
    """A program that backs every parameter up and writes its debiased average into it.

    Run it only once the bias denominator is non-zero (after the first update step): before that
    there is no average to apply.
    """
    program = paddle.static.Program()
    with paddle.static.program_guard(program, paddle.static.Program()):
        debias = _ir.bind_persistable(plan.debias, [1], _SCALAR_DTYPE)
        denominators: dict[str, Any] = {}
        for slot in plan.slots:
            param = _ir.bind_persistable(slot.param, slot.shape, slot.dtype)
            average = _ir.bind_persistable(slot.average, slot.shape, slot.dtype)
            backup = _ir.bind_persistable(slot.backup, slot.shape, slot.dtype)
            paddle.assign(param, output=backup)
            _ir.divide_into(average, _cast_once(debias, slot.dtype, denominators), param)
    return program


def build_restore_program(plan: EmaPlan) -> paddle.static.Program:
    """A program that copies every backup made by the apply program back into its parameter."""
    program = paddle.static.Program()
    with paddle.static.program_guard(program, paddle.static.Program()):
        for slot in plan.slots:
            param = _ir.bind_persistable(slot.param, slot.shape, slot.dtype)
            backup = _ir.bind_persistable(slot.backup, slot.shape, slot.dtype)
            paddle.assign(backup, output=param)
    return program


def debias_value(plan: EmaPlan) -> float:
    """The current bias denominator :math:`1 - \\prod d_i`; 0 before the first update step.

    Raises:
        RuntimeError: the state is not initialised (the startup program has not run).
    """
    value = _ir.read_scalar(plan.debias)
    if value is None:
        raise RuntimeError(
            f"the EMA state {plan.debias!r} is not initialised in the current scope; run the startup "
            "program (or load a checkpoint) before ExponentialMovingAverage.apply()"
        )
    return value


def declare_backups(plan: EmaPlan) -> None:
    """Declare the backup tensors in the global scope; the apply program allocates and fills them.

    Backups live only in the scope (not in the training program), so checkpoints do not carry them,
    and only between apply and restore (see :func:`release_backups`).
    """
    for slot in plan.slots:
        _ir.declare_scope_tensor(slot.backup)


def release_backups(plan: EmaPlan) -> None:
    """Free the backups once restored, so a model does not carry a second copy of its weights."""
    for slot in plan.slots:
        _ir.release_scope_tensor(slot.backup)
