"""Loading checkpoints into programs that carry paddle_ema state."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import pickle
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import paddle

from paddle_ema import _apply, _graph, _ir, _names, _select, ema, schedule, steps

__all__ = ["load", "load_averages"]

_logger = logging.getLogger(__name__)


def load(program: Any, path_prefix: str) -> None:
    """Load a ``paddle.static.save`` checkpoint into ``program``; EMA state it lacks starts fresh.

    A drop-in for ``paddle.static.load(program, path_prefix)`` when ``program`` has paddle_ema EMAs
    (made by :meth:`ExponentialMovingAverage.update`). Everything the checkpoint holds is loaded as
    Paddle would. An EMA whose state the checkpoint does not hold completely (it was saved before the
    EMA was added, or by another EMA) starts fresh, as if just created: its averages and step are zero,
    and a warning names what was missing. If the checkpoint holds the state of Paddle's own
    ``paddle.static.ExponentialMovingAverage`` with the same constant decay, the EMA carries it on
    (averages, step and the bias correction ``1 - d^t``); with a varying decay (``thres_steps``) the
    product of the decays is not in the checkpoint and the EMA starts fresh, saying why. A checkpoint
    of the same EMA with its averages stacked otherwise (under PIR, paddle_ema 0.3 and earlier stacked
    only parameters of up to 1024 elements) is carried on, value for value. Paddle's class built
    with a ``name`` saved its averages under that prefix (``name="ema"``: ``emafc_0.w_0_ema_0``);
    they are found too. A :func:`paddle_ema.global_step_counter` that drives an EMA's warm-up
    (``thres_steps``) and that the checkpoint lacks (it was added with the EMA) starts again at its
    ``begin``, as in a new run, and a warning says so. Any other variable of the program missing
    from the checkpoint is an error, raised before anything is loaded, where ``paddle.static.load``
    would stop half-way.

    Run the startup program first, as for ``paddle.static.load``.

    Args:
        program: The training program (the default main program of the EMAs).
        path_prefix: What was passed to ``paddle.static.save`` (without ``.pdparams``).

    Raises:
        FileNotFoundError: ``path_prefix`` holds no checkpoint (``paddle.static.load_program_state``
            finds nothing there).
        ValueError: a variable of ``program`` other than EMA state is not in the checkpoint, or an
            array of the checkpoint has another shape or dtype than its variable (checked for all
            before anything is loaded).
        RuntimeError: an EMA of ``program`` is applied; restore it before loading.

    Example:
        .. code-block:: python

            # a checkpoint written before the EMA was added to the training script
            ema = paddle_ema.ExponentialMovingAverage(0.999)
            ema.update()
            exe.run(paddle.static.default_startup_program())
            paddle_ema.load(paddle.static.default_main_program(), "ckpt/model")
    """
    if not isinstance(program, (paddle.static.Program, getattr(getattr(paddle, "pir", None), "Program", ()))):
        raise TypeError(
            f"program must be a paddle.static.Program (the training program), got "
            f"{_select.short_repr(program)} of type {type(program).__name__}"
        )
    _check_path_prefix(path_prefix)
    emas = ema.updated_emas(program)
    scope = paddle.static.global_scope()
    names = _ir.persistable_names(program)
    if any(e._applied is not None for e in emas) or _apply.overlapping(_apply.ScopeSwap("", scope, names)):
        raise RuntimeError(
            "an ExponentialMovingAverage over parameters of this program is applied in the current "
            "scope; call ema.restore(executor) before loading a checkpoint, or the restore would "
            "overwrite what was loaded"
        )
    state = paddle.static.load_program_state(path_prefix)
    if not state:  # what Paddle returns for a path that holds no checkpoint
        where = (
            f"the directory {path_prefix!r} holds no variable Paddle's load_program_state reads (under "
            "PIR it reads no save_vars/save_persistables directory)" if os.path.isdir(path_prefix)
            else f"there is no {path_prefix + '.pdparams'!r}"
        )
        raise FileNotFoundError(
            f"no checkpoint at {path_prefix!r}: {where}; pass what was passed to paddle.static.save "
            "(without .pdparams)"
        )
    views = [e._state_view() for e in emas]
    fresh = [v for v in views if not set(_graph.state_names(v.plan)) <= state.keys()]
    ema_names = {name for v in views for name in _graph.state_names(v.plan)}
    # The paddle_ema.global_step_counter an EMA's warm-up reads restarts with the EMA if absent.
    starts = {v.counter: steps.counter_start(program, v.counter) for v in views if v.counter is not None}
    counters = {name: start for name, start in starts.items() if start is not None}
    restarted = sorted(set(counters) - state.keys())
    missing = sorted(_ir.persistable_names(program) - ema_names - set(counters) - state.keys())
    if missing:
        raise ValueError(
            f"the checkpoint {path_prefix!r} lacks {len(missing)} variable(s) of the program, e.g. "
            f"{missing[:5]}; it was written by another model (nothing was loaded)"
        )
    reasons = {}
    # The checkpoint's parameters, to tell the members of its stacks by: the program's, all present
    # (checked above).
    params = {p.name: state[p.name] for p in program.global_block().all_parameters()}
    for v in fresh:
        absent = [n for n in _graph.state_names(v.plan) if n not in state]
        conversion, why_not = _convert(v, params, state)
        for name in _graph.state_names(v.plan):  # a part of an EMA's state would not match the rest
            state.pop(name, None)
        if conversion is None:
            reasons[v] = f"the checkpoint {path_prefix!r} has no {_select.some_names(absent)}{why_not}"
            continue
        for name in conversion.replaces:
            state.pop(name, None)
        state.update(conversion.arrays)
        _logger.info("%s carries on %s", v.name, conversion.source)
    _check_shapes_and_dtypes(program, state, path_prefix)
    for v in views:
        if v not in reasons:
            _check_counts(state, v.plan.step, v.plan.debias, path_prefix, v.schedule)
    paddle.static.set_program_state(program, state)
    for v, reason in reasons.items():
        _graph.reset_state(v.plan, scope)
        _logger.warning("%s starts fresh: %s", v.name, reason)
    for name in restarted:
        place = _ir.initialized_place(views[0].plan.slots[0].param, scope)
        _ir.fill_scope_tensor(name, [1], "int64", counters[name], place, scope)
        _logger.warning(
            "%s starts at %d: the checkpoint %r does not hold it (the EMA warm-up it drives starts "
            "again)", name, counters[name] + 1, path_prefix,
        )


def _check_path_prefix(path_prefix: Any) -> None:
    if not isinstance(path_prefix, (str, os.PathLike)):
        raise TypeError(
            f"path_prefix must be a str (what was passed to paddle.static.save), got "
            f"{_select.short_repr(path_prefix)} of type {type(path_prefix).__name__}"
        )


def _check_counts(state: dict[str, Any], step: str, debias: str, path_prefix: str,
                  plan: Any | None = None) -> None:
    """Raise a ValueError if an EMA's step count and bias correction in a checkpoint are not ones
    training can produce (see :func:`paddle_ema.schedule.bias_correction_problem`)."""
    updates = int(np.asarray(state[step]).reshape(-1)[0])
    correction = float(np.asarray(state[debias]).reshape(-1)[0])
    problem = schedule.bias_correction_problem(updates, correction, plan)
    if problem is not None:
        raise ValueError(
            f"the checkpoint {path_prefix!r} holds {step!r} = {updates} and {debias!r} = {correction!r}: "
            f"the bias correction is {problem}; it was edited or is not this EMA's (nothing was loaded)"
        )


def _check_shapes_and_dtypes(program: Any, state: dict[str, np.ndarray], path_prefix: str) -> None:
    """Raise before anything is loaded if a checkpoint array would not fit its variable.

    ``paddle.static.set_program_state`` checks shapes one variable at a time, after it has written
    the ones before (and lets a dtype change through): a checkpoint of a wider model would overwrite
    some parameters, then fail.
    """
    specs = _ir.persistable_specs(program)
    for name, value in state.items():
        if name not in specs:
            continue
        shape, dtype = specs[name]
        value = np.asarray(value)
        held = _ir.dtype_name(value)
        if value.shape != shape or held != dtype:
            raise ValueError(
                f"the checkpoint {path_prefix!r} holds {name!r} as {held}{list(value.shape)}, "
                f"the program as {dtype}{list(shape)}; it was written by another model (nothing was loaded)"
            )


@dataclasses.dataclass(frozen=True)
class _Conversion:
    """An EMA's state made from other arrays of a checkpoint."""

    arrays: dict[str, np.ndarray]  # the EMA's state, by name
    source: str  # what it was made from, for the log ("<EMA> carries on <source>")
    replaces: tuple[str, ...] = ()  # arrays of the checkpoint it stands for, left out of the load


# A converter makes an EMA's state from a checkpoint that lacks it, given the EMA, the checkpoint's
# parameters and all its arrays; it returns the conversion, or None and why not (a clause that
# follows "the checkpoint has no <state>", or "" when there is nothing to say).
_Converter = Callable[
    [ema._StateView, Dict[str, np.ndarray], Dict[str, Any]], Tuple[Optional[_Conversion], str]
]


def _from_other_layout(
    view: ema._StateView, params: dict[str, np.ndarray], state: dict[str, Any]
) -> tuple[_Conversion | None, str]:
    """This EMA's state from a checkpoint of the same EMA whose averages were stacked otherwise.

    Which parameters share a stacked average depends on a size limit that has changed (under PIR it
    was 1024 elements up to paddle_ema 0.3, now 32768): a checkpoint saved before holds the same step,
    bias correction and averages under other stack names. They are cut apart and stacked anew, value
    for value.
    """
    plan = view.plan
    if plan.step not in state or plan.debias not in state:
        return None, ""
    try:
        pieces = _unstacked_averages(params, state, view.name)
    except ValueError:
        return None, ""
    if not all(s.param in pieces and tuple(pieces[s.param].shape) == s.shape for s in plan.slots):
        return None, ""
    converted = {plan.step: state[plan.step], plan.debias: state[plan.debias]}
    for group in plan.groups:
        parts = [pieces[plan.slots[i].param] for i in group.members]
        if any(str(part.dtype) != group.dtype for part in parts):
            return None, ""
        converted[group.average] = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    return _Conversion(
        converted, "its state, saved with its averages stacked otherwise",
        replaces=tuple(_names.averages_of(view.name, state).values()),
    ), ""


def _from_paddle_class(
    view: ema._StateView, params: dict[str, np.ndarray], state: dict[str, Any]
) -> tuple[_Conversion | None, str]:
    """This EMA's state made from the state of Paddle's own ``paddle.static.ExponentialMovingAverage``.

    Paddle's class (Paddle 2.6; 3.0 and 3.1 in the legacy IR) keeps a step counter, the current
    decay, and per parameter the same biased average as paddle_ema's, from zero: it maps one to one.
    Its bias correction is not stored: with a constant decay it is ``1 - d^t`` (what Paddle's apply
    divides by), but with ``thres_steps`` the decay varied and the product of the decays is lost, so
    such an EMA starts fresh.
    """
    if _names.PADDLE_STEP not in state or _names.PADDLE_DECAY not in state:
        return None, ""
    plan = view.plan
    averages, why_not = _paddle_class_averages(plan, state)
    if averages is None:
        return None, why_not
    decay = float(np.asarray(state[_names.PADDLE_DECAY]).reshape(-1)[0])
    if not view.schedule.is_constant or decay != float(np.float32(view.schedule.decay)):
        return None, (
            f" (Paddle's class state is there, but its decay ({decay}) was not this EMA's constant "
            f"{view.schedule.decay}: the product of its decays, the bias correction, is not in the "
            "checkpoint)"
        )
    steps = int(np.asarray(state[_names.PADDLE_STEP]).reshape(-1)[0])
    converted = {
        plan.step: np.array([steps], np.int64),
        plan.debias: np.array([1.0 - decay**steps], np.float64),
    }
    for group in plan.groups:
        parts = [averages[plan.slots[i].param].astype(group.dtype) for i in group.members]
        converted[group.average] = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    return _Conversion(converted, "the state of Paddle's ExponentialMovingAverage"), ""


# Tried in turn; the first that makes the state wins.
_CONVERTERS: tuple[_Converter, ...] = (_from_other_layout, _from_paddle_class)


def _convert(
    view: ema._StateView, params: dict[str, np.ndarray], state: dict[str, Any]
) -> tuple[_Conversion | None, str]:
    """The first of :data:`_CONVERTERS`' conversions of this EMA's state, or None and why not."""
    reasons = []
    for convert in _CONVERTERS:
        conversion, why_not = convert(view, params, state)
        if conversion is not None:
            return conversion, ""
        reasons.append(why_not)
    return None, "".join(reasons)


def _paddle_class_averages(plan: _graph.EmaPlan, state: dict[str, Any]) -> tuple[dict | None, str]:
    """Each parameter's average as Paddle's class saved it, or None and why not.

    Paddle's class prefixes its averages' names with the ``name`` it was built with, the same for
    every parameter: the prefix is found once and must fit all of them.
    """
    first = plan.slots[0].param
    prefixes = _names.paddle_class_prefixes(state, first)
    fitting = [
        p for p in prefixes
        if all(len(_names.paddle_class_averages(state, p, s.param)) == 1 for s in plan.slots)
    ]
    if len(fitting) != 1:
        what = f"several ({', '.join(repr(p) for p in fitting)})" if fitting else "no"
        return None, (
            f" (Paddle's class state is there, but {what} name prefix gives one average per parameter "
            f"of this EMA; averages found for {first!r}: {[p + first for p in prefixes] or 'none'})"
        )
    return {
        s.param: np.asarray(state[_names.paddle_class_averages(state, fitting[0], s.param)[0]])
        for s in plan.slots
    }, ""


def _unstacked_averages(
    params: dict[str, np.ndarray], others: dict[str, np.ndarray], prefix: str
) -> dict[str, np.ndarray]:
    """Each parameter's stored (biased) average of the EMA ``prefix`` in a checkpoint, stacks cut apart.

    Raises:
        ValueError: the members of a stack cannot be told: no set of the checkpoint's parameters
            makes its name (see :func:`paddle_ema._graph.stack_members`), or they have other rows.
    """
    averages = {key: others[name] for key, name in _names.averages_of(prefix, others).items()}
    own = {key for key in averages if key in params}
    pieces = {param: averages[param] for param in own}
    candidates = {
        name: (value.shape, _ir.dtype_name(value)) for name, value in params.items() if name not in own
    }
    for stack in averages.keys() - own:
        average = averages[stack]
        members = _graph.stack_members(stack, average.shape, str(average.dtype), candidates)
        if members is None:
            raise ValueError(
                f"cannot tell which parameters share the stacked average {stack} ({average.dtype}"
                f"{list(average.shape)}): no set of the checkpoint's parameters of its trailing shape "
                "and dtype has its name (some parameters of the same shape were left out of the EMA, "
                "or the checkpoint was edited); build the program and use ExponentialMovingAverage.apply"
            )
        rows = [params[member].shape[0] for member in members]
        if sum(rows) != average.shape[0]:
            raise ValueError(
                f"{_names.average(prefix, stack)} has {average.shape[0]} rows, its members "
                f"{_select.some_names(members)} {sum(rows)}; the checkpoint was edited or is damaged"
            )
        for member, start, count in zip(members, itertools.accumulate([0, *rows]), rows):
            pieces[member] = average[start:start + count]
    return pieces


def _read_checkpoint(path_prefix: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The arrays of a ``paddle.static.save`` checkpoint: its parameters, and its other persistables."""
    parts = []
    for suffix in (".pdparams", ".pdopt"):
        try:
            with open(path_prefix + suffix, "rb") as f:
                parts.append(dict(pickle.load(f, encoding="latin1")))
        except FileNotFoundError:
            if suffix == ".pdparams":
                raise
            parts.append({})
    return parts[0], parts[1]


def _ema_prefix(state: dict[str, np.ndarray], name: str) -> str:
    """The state prefix of the EMA called ``name`` (``"ema"`` finds ``"ema_0"``) in a checkpoint."""
    prefixes = _names.ema_prefixes(state)
    matches = [p for p in prefixes if _names.is_prefix_of(p, name)]
    if len(matches) != 1:
        found = f"it holds the EMAs {prefixes}" if prefixes else "it holds no paddle_ema 0.2+ state"
        raise ValueError(f"cannot tell which EMA is {name!r} in this checkpoint: {found}; pass name=")
    return matches[0]


def load_averages(path_prefix: str, name: str = "ema") -> dict[str, np.ndarray]:
    """The bias-corrected EMA weights in a ``paddle.static.save`` checkpoint, without a program.

    Reads the checkpoint's files, cuts stacked averages into their parameters and corrects their bias
    as :meth:`ExponentialMovingAverage.apply` does, so the values are the ones apply writes (bit for
    bit, for float32 and float64 parameters; a bfloat16 or float16 parameter's float32 average comes
    back unrounded). Before the first update step there is no average, and the
    parameters' own values are returned, as apply leaves them.

    Args:
        path_prefix: What was passed to ``paddle.static.save`` (without ``.pdparams``).
        name: The ``name`` the EMA was created with (default ``"ema"``), or its full state prefix
            (``"ema_0"``) when the checkpoint holds several.

    Returns:
        ``{parameter name: numpy array}`` for every parameter the EMA averages.

    Raises:
        FileNotFoundError: there is no ``path_prefix + ".pdparams"``.
        ValueError: the checkpoint holds no EMA called ``name``, or several.

    Example:
        .. code-block:: python

            weights = paddle_ema.load_averages("ckpt/model")
            np.save("fc1_w_ema.npy", weights["fc1.w"])
    """
    _check_path_prefix(path_prefix)
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str (the EMA's name= or state prefix), got "
                        f"{_select.short_repr(name)}")
    params, others = _read_checkpoint(path_prefix)
    prefix = _ema_prefix(others, name)
    pieces = _unstacked_averages(params, others, prefix)
    _check_counts(others, _names.step(prefix), _names.bias_correction(prefix), path_prefix)
    correction = float(others[_names.bias_correction(prefix)].reshape(-1)[0])
    if correction == 0.0:
        return {param: _ir.as_numpy_dtype(params[param]) for param in pieces}
    # apply's roundings: the average times the factor, in the average's dtype.
    return {
        param: (piece * piece.dtype.type(schedule.debias_factor(correction, piece.dtype)))
        .astype(piece.dtype).reshape(params[param].shape)
        for param, piece in pieces.items()
    }
