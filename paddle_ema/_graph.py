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
from typing import Any, Iterator, Sequence

import paddle

from paddle_ema import _ir, _names, schedule

__all__ = [
    "EmaPlan", "Group", "LERP_MAX_NUMEL", "Slot", "StateHandles", "accumulator_dtype",
    "build_read_program", "build_write_program", "debias_value", "emit_state", "emit_update",
    "parameters_live", "reset_state", "stack_members", "state_found", "state_names",
]

# The step weight is a float32 scalar whatever the parameters' dtype (cast where an average needs it).
_SCALAR_DTYPE = "float32"
# The bias denominator c is one float64 number. In float32, c <- c + w (1 - c) stalls once w (1 - c)
# falls below half an ulp of 1, i.e. at 1 - c ~ 3e-8 / w: 3e-5 short of 1 at decay 0.999, an error that
# every applied average would carry. In float64, updated with the very float32 weights the averages
# use, it is the exact normaliser of those weights.
_DEBIAS_DTYPE = "float64"
# Parameters of these dtypes get float32 averages: at decay 0.999 an increment below 1/256 of the value
# vanishes in a bfloat16 average (8 bits of mantissa), so it would stall instead of following.
_LOW_PRECISION = ("float16", "bfloat16")


def accumulator_dtype(dtype: str) -> str:
    """The dtype of the average kept for a parameter of ``dtype``."""
    return _SCALAR_DTYPE if dtype in _LOW_PRECISION else dtype


@dataclasses.dataclass(frozen=True)
class Slot:
    """One averaged parameter: its name, and where its average lives."""

    param: str
    shape: tuple[int, ...]
    dtype: str
    # Scope-only: where apply's write program puts the debiased average before it is swapped in. A
    # stack of one parameter dtype gets one result for all its members, at the same rows as in
    # ``average``: one op writes it, and each parameter is pointed at its rows.
    result: str
    average: str  # the average tensor holding this parameter's average, maybe shared (see Group)
    rows: tuple[int, int] | None  # rows [start, stop) of ``average`` along axis 0; None: all of it
    shares_result: bool = False  # whether ``result`` is stacked, this parameter being its ``rows``


@dataclasses.dataclass(frozen=True)
class Group:
    """One average tensor: a parameter's own, or the averages of small parameters stacked on axis 0.

    Small parameters of one accumulator dtype and one trailing shape share a stacked average, updated
    from their concatenation by one op instead of one op each: per-op overhead (3-15 us an op, more
    under PIR, which also spends an op per state tensor it refers to) dominates small tensors, while
    the concatenation costs one extra pass over them, into a buffer kept between steps. How small is
    small: :func:`paddle_ema._names.stack_max_numel`.
    """

    average: str
    shape: tuple[int, ...]
    dtype: str  # the accumulator dtype (see accumulator_dtype)
    members: tuple[int, ...]  # indices into EmaPlan.slots, in stacking order
    # Scope-only, for stacks: the members' concatenation, rewritten every step, kept allocated between
    # steps (see _ir.concat_into_buffer) and in no checkpoint. None for a parameter's own average.
    stacked: str | None = None


def _stack_key(shape: Sequence[int], dtype: str, limit: int | None = None) -> tuple | None:
    """Parameters with equal keys can share a stacked average; None: this one keeps its own.

    ``limit`` is the stacking limit (default :func:`paddle_ema._names.stack_max_numel`).
    """
    limit = _names.stack_max_numel() if limit is None else limit
    if len(shape) == 0 or math.prod(shape) > limit:
        return None
    return (accumulator_dtype(dtype), tuple(shape[1:]))


def stack_members(
    key: str, shape: Sequence[int], dtype: str, params: dict[str, tuple[tuple[int, ...], str]]
) -> list[str] | None:
    """The parameters a stacked average holds, in stacking order, found again by its name: None if
    no set of ``params`` fits.

    Args:
        key: The stack's :func:`paddle_ema._names.stack_name`.
        shape: The stacked average's shape.
        dtype: The stacked average's dtype name.
        params: ``{name: (shape, dtype name)}`` of the candidates.

    A stack holds every averaged parameter of one accumulator dtype and trailing shape up to the
    stacking limit it was made under (see :class:`Group`), and its key is a digest of their sorted
    names: the candidates that fit under each past limit are tried, and the digest confirms them.
    """
    for limit in _names.stack_limits():
        members = sorted(
            name for name, (param_shape, param_dtype) in params.items()
            if _stack_key(param_shape, param_dtype, limit) == (dtype, tuple(shape[1:]))
        )
        if members and _names.stack_name(members) == key:
            return members
    return None


@dataclasses.dataclass(frozen=True)
class EmaPlan:
    """Names and layout of every tensor one EMA instance owns, named by :mod:`paddle_ema._names`."""

    step: str
    debias: str
    slots: tuple[Slot, ...]
    groups: tuple[Group, ...]

    @classmethod
    def for_params(cls, prefix: str, params: Sequence[Any]) -> EmaPlan:
        """Plan the state of an EMA named ``prefix`` over graph parameters ``params`` (unique names)."""
        shapes = [tuple(p.shape) for p in params]
        dtypes = [_ir.dtype_name(p) for p in params]
        stacks: dict[tuple, list[int]] = {}
        for index, (shape, dtype) in enumerate(zip(shapes, dtypes)):
            stacks.setdefault(_stack_key(shape, dtype) or ("own", index), []).append(index)

        slots: list[Slot | None] = [None] * len(params)
        groups = []
        for members in stacks.values():
            # Names and rows must not depend on the order of the parameters (fleet's graph passes
            # reorder them), so that a checkpoint loads into the same model built another way.
            members.sort(key=lambda i: params[i].name)
            first = members[0]
            if len(members) == 1:
                average, stacked = _names.average(prefix, params[first].name), None
                shape, rows = shapes[first], [None]
            else:
                stack = _names.stack_name([params[i].name for i in members])
                average, stacked = _names.average(prefix, stack), _names.stacked(prefix, stack)
                ends = list(itertools.accumulate(shapes[i][0] for i in members))
                shape = (ends[-1], *shapes[first][1:])
                rows = list(zip([0, *ends[:-1]], ends))
            groups.append(
                Group(average, shape, accumulator_dtype(dtypes[first]), tuple(members), stacked)
            )
            # A stack mixing dtypes (float32, float16 and bfloat16 members share one float32 average)
            # rounds each member to its own dtype: one result per member.
            one_result = stacked is not None and len({dtypes[i] for i in members}) == 1
            for index, row in zip(members, rows):
                name = params[index].name
                slots[index] = Slot(
                    param=name, shape=shapes[index], dtype=dtypes[index],
                    result=_names.applied(prefix, stack if one_result else name),
                    average=average, rows=row, shares_result=one_result,
                )
        return cls(
            step=_names.step(prefix), debias=_names.bias_correction(prefix), slots=tuple(slots),
            groups=tuple(groups),
        )


@dataclasses.dataclass(frozen=True)
class StateHandles:
    """The training program's handles to an EMA's state, as :func:`emit_state` made them."""

    step: Any
    debias: Any
    averages: tuple[Any, ...]  # one per EmaPlan.groups


def _state_specs(plan: EmaPlan) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of every tensor of an EMA's persistable state, in creation order;
    each starts at zero."""
    specs = {plan.step: ((1,), "int64"), plan.debias: ((1,), _DEBIAS_DTYPE)}
    specs.update({g.average: (tuple(g.shape), g.dtype) for g in plan.groups})
    return specs


def emit_state(plan: EmaPlan, scope: Any, found: str | None) -> StateHandles:
    """Create the EMA's persistable state, zero-initialised by the current startup program.

    Must run under ``paddle.static.program_guard(main, startup)``. ``found`` is what ``scope`` holds
    of the state (see :func:`state_found`) if the startup program has already run there (see
    :func:`parameters_live`), else None: then ``scope`` is left alone. With ``"none"`` the state is
    set in ``scope`` right away (the startup program will not run there again); with ``"all"`` the
    state there is carried on.
    """
    handles = {
        name: _ir.create_state(name, shape, dtype, 0) for name, (shape, dtype) in _state_specs(plan).items()
    }
    if found == "all":
        _declare_buffers(plan, scope)
    elif found == "none":
        reset_state(plan, scope)
    return StateHandles(
        step=handles[plan.step], debias=handles[plan.debias],
        averages=tuple(handles[g.average] for g in plan.groups),
    )


def parameters_live(plan: EmaPlan, scope: Any) -> bool:
    """Whether ``scope`` (or a parent) holds every parameter of ``plan`` with data of its shape and
    dtype: the startup program ran there, and the training program can run there as it is."""
    for slot in plan.slots:
        tensor = _ir.find_scope_tensor(slot.param, scope)
        if tensor is None or not _ir.holds_memory(tensor):
            return False
        if _ir.tensor_spec(tensor) != (tuple(slot.shape), slot.dtype):
            return False
    return True


def state_found(plan: EmaPlan, scope: Any) -> str:
    """What ``scope`` (or a parent) holds of this EMA's state: ``"none"``; ``"all"`` of it, each
    tensor of the planned shape and dtype (the same EMA of the same model, from an earlier program);
    or ``"other"``: some of it, or tensors that do not fit (another EMA under the same name)."""
    specs = _state_specs(plan)
    held = {}
    for name in specs:
        tensor = _ir.find_scope_tensor(name, scope)
        if tensor is not None and _ir.holds_memory(tensor):
            held[name] = _ir.tensor_spec(tensor)
    if not held:
        return "none"
    return "all" if held == specs else "other"


def state_names(plan: EmaPlan) -> list[str]:
    """The names of an EMA's persistable state: what a checkpoint carries of it."""
    return list(_state_specs(plan))


def reset_state(plan: EmaPlan, scope: Any) -> None:
    """Set the EMA's state in ``scope`` to its initial zeros, beside the parameters it averages.

    Raises:
        RuntimeError: the parameters hold no data in ``scope`` (the startup program has not run).
    """
    place = _ir.initialized_place(plan.slots[0].param, scope)
    if place is None:
        raise RuntimeError(
            f"parameter {plan.slots[0].param!r} holds no data; run the startup program first"
        )
    for name, (shape, dtype) in _state_specs(plan).items():
        _ir.fill_scope_tensor(name, shape, dtype, 0, place, scope)
    _declare_buffers(plan, scope)


def _declare_buffers(plan: EmaPlan, scope: Any) -> None:
    """Declare the stacks' scope-only concatenation buffers (see :func:`_ir.declare_output`)."""
    for group in plan.groups:
        if group.stacked is not None:
            _ir.declare_output(group.stacked, scope)


class _ScalarVariants:
    """A scalar of shape [1], cast, reshaped or negated as each op needs it, each variant emitted once."""

    def __init__(self, scalar: Any) -> None:
        self._scalar = scalar
        self._dtype = _ir.dtype_name(scalar)
        self._cache: dict[tuple, Any] = {}

    def get(self, dtype: str, rank0: bool = False, negated: bool = False) -> Any:
        key = (dtype, rank0, negated)
        if key not in self._cache:
            value = self._scalar if dtype == self._dtype else paddle.cast(self._scalar, dtype)
            # A 0-d average must be updated with a 0-d weight: a [1] operand would broadcast it to [1]
            # in the legacy IR, and the checkpoint would carry the wrong shape.
            value = paddle.reshape(value, []) if rank0 else value
            self._cache[key] = -value if negated else value
        return self._cache[key]


LERP_MAX_NUMEL = 16384  # see _lerp_is_faster


def _lerp_is_faster(shape: Sequence[int]) -> bool:
    """Whether one ``lerp_`` beats two ``sgd_`` kernels for a tensor of this shape on CPU.

    Per-op overhead (3-10 us an op) dominates small tensors, so one op wins there. But ``lerp``'s
    kernel broadcasts its weight through Eigen at rank-dependent cost (about 1 ns an element on 2-d
    tensors, 2.5 on 4-d), so two flat kernels at memory speed win on large tensors, and on conv weights
    already from a few thousand elements. Crossovers measured on 2 CPU cores in all three IR modes
    with 128 tensors of each shape (see benchmarks/).
    """
    return len(shape) <= 2 and math.prod(shape) <= LERP_MAX_NUMEL


def _as_accumulator(param: Any, dtype: str) -> Any:
    """``param`` in its average's dtype: low-precision parameters are read as float32."""
    return param if _ir.dtype_name(param) == dtype else paddle.cast(param, dtype)


def emit_update(plan: EmaPlan, params: Sequence[Any], state: StateHandles, weight: Any) -> None:
    """Emit one EMA step: ``step += 1``; every average and the bias denominator move toward their target.

    Each average is updated in place: :math:`a \\leftarrow a + w_t(\\theta - a)`, where for a stacked
    average :math:`\\theta` is the concatenation of its members.

    Args:
        plan: The layout of the averages.
        params: The parameters, in the order of ``plan.slots``; read after the optimizer updated them.
        state: Handles made by :func:`emit_state` in the same program.
        weight: This step's weight :math:`1 - d_t`, from :func:`paddle_ema.schedule.emit_step_weight`.
    """
    weights = _ScalarVariants(weight)
    paddle.increment(state.step)
    for group, average in zip(plan.groups, state.averages):
        members = [_as_accumulator(params[i], group.dtype) for i in group.members]
        target = members[0] if group.stacked is None else _ir.concat_into_buffer(members, group.stacked)
        rank0 = len(group.shape) == 0
        if _lerp_is_faster(group.shape):
            _ir.lerp_(average, target, weights.get(group.dtype, rank0))
        else:
            _ir.sgd_lerp_(
                average, target, weights.get(group.dtype), weights.get(group.dtype, negated=True)
            )
    # The moving average of the constant 1, with the same weights as the averages.
    _ir.lerp_(state.debias, paddle.ones([1], _DEBIAS_DTYPE), weights.get(_DEBIAS_DTYPE))


def _reciprocals(plan: EmaPlan) -> dict[str, Any]:
    """The debias factor of each average dtype of ``plan`` (see
    :func:`paddle_ema.schedule.debias_factor`), emitted in the current program."""
    debias = _ir.bind_persistable(plan.debias, [1], _DEBIAS_DTYPE)
    return schedule.emit_debias_factors(debias, [group.dtype for group in plan.groups])


def _pieces(average: Any, slots: Sequence[Slot]) -> list[Any]:
    """Each slot's part of ``average``: all of it for a parameter's own, its rows of a stack."""
    # Slices rather than paddle.split, which on Paddle 3.2 prints a "Non compatible API" warning
    # about torch.split at its first call in a process.
    return [average] if len(slots) == 1 else [average[s.rows[0]:s.rows[1]] for s in slots]


def _debiased_pieces(plan: EmaPlan) -> Iterator[tuple[Slot, Any, Any]]:
    """Each slot with its average (or its rows of a stack) and the reciprocal of the bias correction
    in the average's dtype, emitted in the current program."""
    reciprocals = _reciprocals(plan)
    for group in plan.groups:
        average = _ir.bind_persistable(group.average, group.shape, group.dtype)
        slots = [plan.slots[i] for i in group.members]
        for slot, piece in zip(slots, _pieces(average, slots)):
            yield slot, piece, reciprocals[group.dtype]


def build_write_program(plan: EmaPlan) -> paddle.static.Program:
    """A program that writes every parameter's debiased average, in the parameter's dtype, into the
    parameter's result tensor (which :meth:`paddle_ema._apply.ScopeSwap.swap_in` swaps in): one op per
    average tensor, so a stack of small parameters costs one op, not one per member. It writes no
    parameter.

    Run it only once the bias denominator is non-zero (after the first update step): before that
    there is no average to apply.
    """
    program = paddle.static.Program()
    with paddle.static.program_guard(program, paddle.static.Program()):
        reciprocals = _reciprocals(plan)
        for group in plan.groups:
            average = _ir.bind_persistable(group.average, group.shape, group.dtype)
            slots = [plan.slots[i] for i in group.members]
            factor = reciprocals[group.dtype]
            if slots[0].shares_result:
                _ir.scale_into(average, factor, slots[0].result, slots[0].dtype)
                continue
            for slot, piece in zip(slots, _pieces(average, slots)):
                _ir.scale_into(piece, factor, slot.result, slot.dtype)
    return program


def build_read_program(plan: EmaPlan) -> tuple[paddle.static.Program, dict[str, Any]]:
    """A program that computes what the write program writes, without writing anything.

    Returns the program and, per parameter, the value to fetch: the debiased average rounded to the
    parameter's dtype, fetched as float32 for bfloat16 parameters (numpy has no bfloat16).
    """
    program = paddle.static.Program()
    fetches = {}
    with paddle.static.program_guard(program, paddle.static.Program()):
        for slot, piece, reciprocal in _debiased_pieces(plan):
            value = paddle.scale(piece, reciprocal)
            if slot.dtype != accumulator_dtype(slot.dtype):
                value = paddle.cast(value, slot.dtype)
                if slot.dtype == "bfloat16":
                    value = paddle.cast(value, _SCALAR_DTYPE)
            fetches[slot.param] = value
    return program, fetches


def debias_value(plan: EmaPlan, scope: Any, method: str = "apply") -> float:
    """The current bias denominator :math:`1 - \\prod d_i` in ``scope``; 0 before the first update step.

    Args:
        plan: The names of the EMA's state.
        scope: The scope that holds it.
        method: The ExponentialMovingAverage method that asks, named in the error.

    Raises:
        RuntimeError: the state is not initialised (the startup program has not run).
    """
    value = _ir.read_scalar(plan.debias, scope)
    if value is None:
        raise RuntimeError(
            f"the EMA state {plan.debias!r} is not initialised in the current scope; run the startup "
            f"program (or load a checkpoint) before ExponentialMovingAverage.{method}()"
        )
    return value
