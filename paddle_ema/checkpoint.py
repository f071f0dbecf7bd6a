"""Loading checkpoints into programs that carry paddle_ema state."""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import re
from typing import Any

import numpy as np
import paddle

from paddle_ema import _graph, _ir, _select, ema, schedule, steps

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
            f"program must be a paddle.static.Program (the training program), got {program!r} of type "
            f"{type(program).__name__}"
        )
    _check_path_prefix(path_prefix)
    emas = ema.updated_emas(program)
    scope = paddle.static.global_scope()
    names = _ir.persistable_names(program)
    if any(e._applied is not None for e in emas) or any(
        applied.scope is scope and names & set(e.parameter_names) for e, applied in ema._APPLIED_STACK
    ):
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
    fresh = [e for e in emas if not set(_graph.state_names(e._plan)) <= state.keys()]
    ema_names = {name for e in emas for name in _graph.state_names(e._plan)}
    # The paddle_ema.global_step_counter an EMA's warm-up reads restarts with the EMA if absent.
    starts = {e._counter: steps.counter_start(program, e._counter) for e in emas if e._counter is not None}
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
    for e in fresh:
        absent = [n for n in _graph.state_names(e._plan) if n not in state]
        relaid = _from_other_layout(e, params, state)
        for name in _graph.state_names(e._plan):  # a part of an EMA's state would not match the rest
            state.pop(name, None)
        if relaid is not None:
            prefix = e._plan.step[: -len(".step")]
            for key in [k for k in state if k.startswith(prefix + ".") and k.endswith(".average")]:
                del state[key]  # the same averages, stacked otherwise
            state.update(relaid)
            _logger.info("%s carries on its state, saved with its averages stacked otherwise", e._name)
            continue
        converted, why_not = _from_paddle_class(e, state)
        if converted is None:
            reasons[e] = f"the checkpoint {path_prefix!r} has no {_select.some_names(absent)}{why_not}"
        else:
            state.update(converted)
            _logger.info("%s carries on the state of Paddle's ExponentialMovingAverage", e._name)
    _check_shapes_and_dtypes(program, state, path_prefix)
    for e in emas:
        if e not in reasons:
            _check_counts(state, e._plan.step, e._plan.debias, path_prefix, e._schedule)
    paddle.static.set_program_state(program, state)
    for e, reason in reasons.items():
        _graph.reset_state(e._plan, scope)
        _logger.warning("%s starts fresh: %s", e._name, reason)
    for name in restarted:
        place = _ir.initialized_place(emas[0]._plan.slots[0].param, scope)
        _ir.fill_scope_tensor(name, [1], "int64", counters[name], place, scope)
        _logger.warning(
            "%s starts at %d: the checkpoint %r does not hold it (the EMA warm-up it drives starts "
            "again)", name, counters[name] + 1, path_prefix,
        )


def _check_path_prefix(path_prefix: Any) -> None:
    if not isinstance(path_prefix, (str, os.PathLike)):
        raise TypeError(
            f"path_prefix must be a str (what was passed to paddle.static.save), got {path_prefix!r} of "
            f"type {type(path_prefix).__name__}"
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


# The state of paddle.static.ExponentialMovingAverage (Paddle 2.6; 3.0 and 3.1 in the legacy IR): a
# step counter and the current decay under fixed names, and "<param>_ema_<n>" per parameter, the same
# biased average as paddle_ema's, from zero.
_PADDLE_STEP, _PADDLE_DECAY = "@EMA_STEP_COUNTER@", "scheduled_ema_decay_rate"


def _from_paddle_class(
    e: ema.ExponentialMovingAverage, state: dict[str, Any]
) -> tuple[dict | None, str]:
    """This EMA's state made from the state of Paddle's own class in ``state``, or None and why not.

    Paddle's average maps one to one. Its bias correction is not stored: with a constant decay it is
    ``1 - d^t`` (what Paddle's apply divides by), but with ``thres_steps`` the decay varied and the
    product of the decays is lost, so such an EMA starts fresh.
    """
    if _PADDLE_STEP not in state or _PADDLE_DECAY not in state:
        return None, ""
    plan = e._plan
    averages, why_not = _paddle_class_averages(plan, state)
    if averages is None:
        return None, why_not
    decay = float(np.asarray(state[_PADDLE_DECAY]).reshape(-1)[0])
    if not e._schedule.is_constant or decay != float(np.float32(e.decay)):
        return None, (
            f" (Paddle's class state is there, but its decay ({decay}) was not this EMA's constant "
            f"{e.decay}: the product of its decays, the bias correction, is not in the checkpoint)"
        )
    steps = int(np.asarray(state[_PADDLE_STEP]).reshape(-1)[0])
    converted = {
        plan.step: np.array([steps], np.int64),
        plan.debias: np.array([1.0 - decay**steps], np.float64),
    }
    for group in plan.groups:
        parts = [averages[plan.slots[i].param].astype(group.dtype) for i in group.members]
        converted[group.average] = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    return converted, ""


def _paddle_class_averages(plan: _graph.EmaPlan, state: dict[str, Any]) -> tuple[dict | None, str]:
    """Each parameter's average as Paddle's class saved it, or None and why not.

    Paddle's class names a parameter's average ``name + param + "_ema_<n>"``, ``name`` being the one
    it was built with (default ``""``): the same ``name`` for every parameter, so the prefix is
    found once and must fit all of them.
    """
    def average_keys(prefix: str, param: str) -> list[str]:
        pattern = re.escape(prefix + param) + r"_ema_\d+"
        return [k for k in state if re.fullmatch(pattern, k)]

    first = plan.slots[0].param
    prefixes = sorted({
        m.group(1) for k in state if (m := re.fullmatch("(.*)" + re.escape(first) + r"_ema_\d+", k))
    })
    fitting = [p for p in prefixes if all(len(average_keys(p, s.param)) == 1 for s in plan.slots)]
    if len(fitting) != 1:
        what = f"several ({', '.join(repr(p) for p in fitting)})" if fitting else "no"
        return None, (
            f" (Paddle's class state is there, but {what} name prefix gives one average per parameter "
            f"of this EMA; averages found for {first!r}: {[p + first for p in prefixes] or 'none'})"
        )
    return {s.param: np.asarray(state[average_keys(fitting[0], s.param)[0]]) for s in plan.slots}, ""


def _unstacked_averages(
    params: dict[str, np.ndarray], others: dict[str, np.ndarray], prefix: str
) -> dict[str, np.ndarray]:
    """Each parameter's stored (biased) average of the EMA ``prefix`` in a checkpoint, stacks cut apart.

    Raises:
        ValueError: the members of a stack cannot be told (see :func:`_stack_members`).
    """
    averages = {
        key[len(prefix) + 1: -len(".average")]: value for key, value in others.items()
        if key.startswith(prefix + ".") and key.endswith(".average")
    }
    own = {key for key in averages if key in params}
    pieces = {param: averages[param] for param in own}
    for stack in averages.keys() - own:
        members = _stack_members(params, averages[stack], stack, own)
        rows = [params[member].shape[0] for member in members]
        if sum(rows) != averages[stack].shape[0]:
            raise ValueError(
                f"{prefix}.{stack}.average has {averages[stack].shape[0]} rows, its members "
                f"{_select.some_names(members)} {sum(rows)}; the checkpoint was edited or is damaged"
            )
        for member, start, count in zip(members, itertools.accumulate([0, *rows]), rows):
            pieces[member] = averages[stack][start:start + count]
    return pieces


def _from_other_layout(
    e: ema.ExponentialMovingAverage, params: dict[str, np.ndarray], others: dict[str, np.ndarray]
) -> dict[str, np.ndarray] | None:
    """This EMA's state from a checkpoint of the same EMA whose averages were stacked otherwise, or None.

    ``params`` are the checkpoint's parameters, ``others`` (at least) its other arrays.

    Which parameters share a stacked average depends on a size limit that has changed (under PIR it
    was 1024 elements up to paddle_ema 0.3, now 32768): a checkpoint saved before holds the same step,
    bias correction and averages under other stack names. They are cut apart and stacked anew, value
    for value.
    """
    plan = e._plan
    if plan.step not in others or plan.debias not in others:
        return None
    try:
        pieces = _unstacked_averages(params, others, plan.step[: -len(".step")])
    except ValueError:
        return None
    if not all(s.param in pieces and tuple(pieces[s.param].shape) == s.shape for s in plan.slots):
        return None
    converted = {plan.step: others[plan.step], plan.debias: others[plan.debias]}
    for group in plan.groups:
        parts = [pieces[plan.slots[i].param] for i in group.members]
        if any(str(part.dtype) != group.dtype for part in parts):
            return None
        converted[group.average] = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    return converted


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
    prefixes = sorted(k[: -len(".bias_correction")] for k in state if k.endswith(".bias_correction"))
    matches = [p for p in prefixes if p == name or re.fullmatch(re.escape(name) + r"_\d+", p)]
    if len(matches) != 1:
        found = f"it holds the EMAs {prefixes}" if prefixes else "it holds no paddle_ema 0.2+ state"
        raise ValueError(f"cannot tell which EMA is {name!r} in this checkpoint: {found}; pass name=")
    return matches[0]


def _stack_members(
    params: dict[str, np.ndarray], average: np.ndarray, stack: str, own: set[str]
) -> list[str]:
    """The parameters a stacked average holds, in stacking order, found again by its name's digest.

    A stack holds every averaged parameter of one accumulator dtype and trailing shape up to the
    size limit of the IR it was built under (see _graph.Group), and its name is a digest of their
    sorted names: the candidates are the checkpoint's parameters that fit, and the digest confirms them.
    """
    for limit in (1024, 32768):  # _ir.stack_max_numel: PIR's up to 0.3, and since in both IRs
        members = sorted(
            name for name, value in params.items()
            if name not in own and value.ndim >= 1 and value.size <= limit
            and value.shape[1:] == average.shape[1:]
            and _graph.accumulator_dtype(_ir.dtype_name(value)) == str(average.dtype)
        )
        if members and f"stack_{_graph.stack_digest(members)}" == stack:
            return members
    raise ValueError(
        f"cannot tell which parameters share the stacked average {stack} ({average.dtype}"
        f"{list(average.shape)}): no set of the checkpoint's parameters of its trailing shape and "
        "dtype has its name (some parameters of the same shape were left out of the EMA, or the "
        "checkpoint was edited); build the program and use ExponentialMovingAverage.apply"
    )


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
        raise TypeError(f"name must be a non-empty str (the EMA's name= or state prefix), got {name!r}")
    params, others = _read_checkpoint(path_prefix)
    prefix = _ema_prefix(others, name)
    pieces = _unstacked_averages(params, others, prefix)
    _check_counts(others, f"{prefix}.step", f"{prefix}.bias_correction", path_prefix)
    correction = float(others[f"{prefix}.bias_correction"].reshape(-1)[0])
    if correction == 0.0:
        return {param: _ir.as_numpy_dtype(params[param]) for param in pieces}
    # apply's roundings: the average times the factor, in the average's dtype.
    return {
        param: (piece * piece.dtype.type(schedule.debias_factor(correction, piece.dtype)))
        .astype(piece.dtype).reshape(params[param].shape)
        for param, piece in pieces.items()
    }
