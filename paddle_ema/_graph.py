"""Graph builder: emits the ops of an exponential moving average into static programs.

Each function either emits into the current program (under the caller's ``program_guard``) and returns
handles to what it emitted, or builds and returns a new program. None of them keeps state: the names
of everything an EMA owns are planned once, in :class:`EmaPlan`, and passed in.

The maths, for decays :math:`d_1, d_2, \\dots`:

.. math::

    a_t = d_t a_{t-1} + (1 - d_t)\\,\\theta_t, \\qquad
    c_t = d_t c_{t-1} + (1 - d_t) = 1 - \\prod_{i \\le t} d_i, \\qquad a_0 = c_0 = 0

and ``apply`` writes the debiased average :math:`a_t / c_t` into the parameter. :math:`c_t` is the
moving average of the constant 1, updated with the very decay values that update the parameters'
averages, so their ratio is exact to a few ulp. A running fp32 product of the decays (or
``1 - pow(decay, t)``, as Paddle's own class does) loses one to two more digits, and is wrong outright
when the decay varies.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Sequence

import paddle

from paddle_ema import _ir

# The bias denominator and the decay schedule are kept in float32 whatever the parameters' dtype.
_SCALAR_DTYPE = "float32"


@dataclasses.dataclass(frozen=True)
class Slot:
    """One averaged parameter: its name and backup, and where its average lives."""

    param: str
    shape: tuple[int, ...]
    dtype: str
    backup: str
    average: str  # the average tensor holding this parameter's average, maybe shared (see Group)
    rows: tuple[int, int] | None  # rows [start, stop) of ``average`` along axis 0; None: all of it


@dataclasses.dataclass(frozen=True)
class Group:
    """One average tensor: a parameter's own, or the averages of small parameters stacked on axis 0.

    Small parameters of one dtype and one trailing shape share a stacked average, updated from their
    concatenation by one op instead of one op each: per-op overhead (3-15 us an op, more under PIR,
    which also spends an op per state tensor it refers to) dominates small tensors, while the
    concatenation costs one extra pass over them. How small is small depends on the IR
    (:func:`paddle_ema._ir.stack_max_numel`).
    """

    average: str
    shape: tuple[int, ...]
    dtype: str
    members: tuple[int, ...]  # indices into EmaPlan.slots, in stacking order


def _stack_key(shape: Sequence[int], dtype: str) -> tuple | None:
    """Parameters with equal keys can share a stacked average; None: this one keeps its own."""
    if len(shape) == 0 or math.prod(shape) > _ir.stack_max_numel():
        return None
    return (dtype, tuple(shape[1:]))


@dataclasses.dataclass(frozen=True)
class EmaPlan:
    """Names and layout of every tensor one EMA instance owns. The only place those names are made."""

    step: str
    debias: str
    slots: tuple[Slot, ...]
    groups: tuple[Group, ...]

    @classmethod
    def for_params(cls, prefix: str, params: Sequence[Any]) -> EmaPlan:
        """Plan the state of an EMA named ``prefix`` over graph parameters ``params``."""
        shapes = [tuple(p.shape) for p in params]
        dtypes = [_ir.dtype_name(p) for p in params]
        stacks: dict[tuple, list[int]] = {}
        for index, (shape, dtype) in enumerate(zip(shapes, dtypes)):
            stacks.setdefault(_stack_key(shape, dtype) or ("own", index), []).append(index)

        slots: list[Slot | None] = [None] * len(params)
        groups = []
        for number, members in enumerate(stacks.values()):
            first = members[0]
            if len(members) == 1:
                average = f"{prefix}.{params[first].name}.average"
                shape, rows = shapes[first], [None]
            else:
                average = f"{prefix}.stack{number}.average"
                ends = list(itertools.accumulate(shapes[i][0] for i in members))
                shape = (ends[-1], *shapes[first][1:])
                rows = list(zip([0, *ends[:-1]], ends))
            groups.append(Group(average, shape, dtypes[first], tuple(members)))
            for index, row in zip(members, rows):
                slots[index] = Slot(
                    param=params[index].name, shape=shapes[index], dtype=dtypes[index],
                    backup=f"{prefix}.{params[index].name}.backup", average=average, rows=row,
                )
        return cls(
            step=f"{prefix}.step", debias=f"{prefix}.debias", slots=tuple(slots), groups=tuple(groups)
        )


@dataclasses.dataclass(frozen=True)
class StateHandles:
    """The training program's handles to an EMA's state, as :func:`emit_state` made them."""

    step: Any
    debias: Any
    averages: tuple[Any, ...]  # one per EmaPlan.groups


def emit_state(plan: EmaPlan) -> StateHandles:
    """Create the EMA's persistable state, zero-initialised by the current startup program.

    Must run under ``paddle.static.program_guard(main, startup)``. If the startup program has already
    run (the parameters hold data), the state is also set in the global scope right away.
    """
    step = _ir.create_state(plan.step, [1], "int64", 0)
    debias = _ir.create_state(plan.debias, [1], _SCALAR_DTYPE, 0.0)
    averages = tuple(_ir.create_state(g.average, g.shape, g.dtype, 0.0) for g in plan.groups)

    place = _ir.initialized_place(plan.slots[0].param) if plan.slots else None
    if place is not None:
        _ir.fill_scope_tensor(plan.step, [1], "int64", 0, place)
        _ir.fill_scope_tensor(plan.debias, [1], _SCALAR_DTYPE, 0.0, place)
        for group in plan.groups:
            _ir.fill_scope_tensor(group.average, group.shape, group.dtype, 0.0, place)
    return StateHandles(step=step, debias=debias, averages=averages)


@dataclasses.dataclass(frozen=True)
class StepScalars:
    """This step's decay :math:`d_t` and the weights derived from it, each emitted once per step."""

    decay: Any  # d_t
    weight: Any  # 1 - d_t
    weight_neg: Any  # d_t - 1


def emit_step_scalars(decay: float, thres_steps: Any | None) -> StepScalars:
    """Emit this step's decay and weights as float32 tensors of shape [1], shared by every average.

    With ``thres_steps`` the decay warms up as :math:`d_t = \\min(decay, (1 + s) / (10 + s))`, where
    ``s`` is the value of ``thres_steps`` at this step (usually the global step).
    """
    if thres_steps is None:
        decay_t = paddle.full([1], decay, _SCALAR_DTYPE)
    else:
        steps = paddle.reshape(paddle.cast(thres_steps, _SCALAR_DTYPE), [1])
        warmup = (steps + 1.0) / (steps + 10.0)
        # paddle.minimum rejects legacy Variables on Paddle 3.3, and paddle.clip warns under PIR (it
        # asks a Value for its place); where + full is quiet and exact in every IR.
        decay_t = paddle.where(warmup < decay, warmup, paddle.full([1], decay, _SCALAR_DTYPE))
    # For d_t in [0.5, 1) both differences are exact in float32 (Sterbenz), so the two update forms
    # in emit_update weigh the average and the parameter by exactly d_t and 1 - d_t alike.
    return StepScalars(decay=decay_t, weight=1.0 - decay_t, weight_neg=decay_t - 1.0)


def _cast_once(value: Any, dtype: str, cache: dict[tuple[int, str], Any]) -> Any:
    """``value`` cast to ``dtype``, emitting at most one cast per value and dtype per program."""
    key = (id(value), dtype)
    if key not in cache:
        cache[key] = value if dtype == _SCALAR_DTYPE else paddle.cast(value, dtype)
    return cache[key]


LERP_MAX_NUMEL = 16384  # see _lerp_is_faster


def _lerp_is_faster(shape: Sequence[int]) -> bool:
    """Whether one ``lerp_`` beats ``scale_`` + ``sgd_`` for a tensor of this shape on CPU.

    Per-op overhead (3-10 us an op) dominates small tensors, so one op wins there. But ``lerp``'s
    kernel broadcasts its weight through Eigen at rank-dependent cost (about 1 ns an element on 2-d
    tensors, 2.5 on 4-d), so two flat kernels at memory speed win on large tensors, and on conv weights
    already from a few thousand elements. Crossovers measured on 2 CPU cores in all three IR modes
    with 128 tensors of each shape (see benchmarks/).
    """
    return len(shape) <= 2 and math.prod(shape) <= LERP_MAX_NUMEL


def emit_update(
    plan: EmaPlan, params: Sequence[Any], state: StateHandles, scalars: StepScalars
) -> None:
    """Emit one EMA step: ``step += 1``; every average and the bias denominator move toward their target.

    Each average is updated in place: :math:`a \\leftarrow d_t a + (1 - d_t)\\theta`, where for a
    stacked average :math:`\\theta` is the concatenation of its members.

    Args:
        plan: The layout of the averages.
        params: The parameters, in the order of ``plan.slots``; read after the optimizer updated them.
        state: Handles made by :func:`emit_state` in the same program.
        scalars: This step's decay and weights, from :func:`emit_step_scalars`.
    """
    casts: dict[tuple[int, str], Any] = {}
    paddle.increment(state.step)
    for group, average in zip(plan.groups, state.averages):
        members = [params[i] for i in group.members]
        target = members[0] if len(members) == 1 else paddle.concat(members, axis=0)
        if _lerp_is_faster(group.shape):
            _ir.lerp_(average, target, _cast_once(scalars.weight, group.dtype, casts))
        else:
            _ir.scale_add_(
                average, _cast_once(scalars.decay, group.dtype, casts), target,
                _cast_once(scalars.weight_neg, group.dtype, casts),
            )
    # The moving average of the constant 1, with the same decay values as the averages.
    _ir.lerp_(state.debias, paddle.ones([1], _SCALAR_DTYPE), scalars.weight)


def build_apply_program(plan: EmaPlan) -> paddle.static.Program:
    """A program that backs every parameter up and writes its debiased average into it.

    Run it only once the bias denominator is non-zero (after the first update step): before that
    there is no average to apply.
    """
    program = paddle.static.Program()
    with paddle.static.program_guard(program, paddle.static.Program()):
        debias = _ir.bind_persistable(plan.debias, [1], _SCALAR_DTYPE)
        casts: dict[tuple[int, str], Any] = {}
        for group in plan.groups:
            average = _ir.bind_persistable(group.average, group.shape, group.dtype)
            slots = [plan.slots[i] for i in group.members]
            pieces = (
                [average] if len(slots) == 1
                else paddle.split(average, [s.rows[1] - s.rows[0] for s in slots], axis=0)
            )
            for slot, piece in zip(slots, pieces):
                param = _ir.bind_persistable(slot.param, slot.shape, slot.dtype)
                backup = _ir.bind_persistable(slot.backup, slot.shape, slot.dtype)
                paddle.assign(param, output=backup)
                _ir.divide_into(piece, _cast_once(debias, slot.dtype, casts), param)
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
