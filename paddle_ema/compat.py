"""Reading and writing the EMA checkpoints of PaddleDetection, PaddleClas, PaddleSeg and ppdiffusers.

Each client keeps its EMA in a layout of its own (read from their sources; see docs/clients.md):

* ``"ppdet"``: ``{prefix}.pdparams`` holds the applied (bias-corrected) EMA weights under the model's
  state-dict keys, ``{prefix}.pdema`` the raw weights, and the step count is the learning-rate
  scheduler's ``last_epoch`` in ``{prefix}.pdopt``. The average starts at zeros.
* ``"ppcls"``: ``{prefix}.pdparams`` holds the EMA copy's state dict, ``{prefix}.pdema`` the raw
  weights; no step count (its decay is constant). The average starts at the weights.
* ``"ppseg"``: ``{iter_N}/ema_model.pdparams`` holds the EMA copy's state dict; the step is ``N``.
  The average starts at the weights.
* ``"ppdiffusers"``: ``EMAModel.state_dict()``: its options, ``optimization_step`` and
  ``shadow_params``, a list in the order of ``model.parameters()``. The average starts at the
  weights; parameters that do not train are copied.

:func:`load` carries such a checkpoint on in a :class:`paddle_ema.ModelEMA` configured like the
client (it checks that it is), and :func:`save` writes the layout the client's own tools read.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import paddle

from paddle_ema import schedule
from paddle_ema._select import short_repr
from paddle_ema.dygraph import ModelEMA

__all__ = ["FORMATS", "load", "save"]

FORMATS = ("ppdet", "ppcls", "ppseg", "ppdiffusers")
_INIT = {"ppdet": "zeros", "ppcls": "weights", "ppseg": "weights", "ppdiffusers": "weights"}


def _check(ema: Any, format: str) -> None:
    if not isinstance(ema, ModelEMA):
        raise TypeError(f"ema must be a paddle_ema.ModelEMA, got {type(ema).__name__}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {short_repr(format)}")
    if ema._init != _INIT[format]:
        raise ValueError(
            f"{format}'s EMA starts at {_INIT[format]}: build the ModelEMA with init={_INIT[format]!r} "
            f"(it has init={ema._init!r})"
        )
    if ema._slices is not None:
        raise ValueError(
            f"the {format} files hold the model's whole weights, which {ema._slices.kind} keeps "
            "cut across the ranks: compat does not gather them yet; save "
            "ema.consolidated_state_dict() (every rank calls it) instead"
        )


def _numpy(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)


def _read(path: str) -> Any:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no file {path!r}")
    return paddle.load(path)


def _bias_correction(ema: ModelEMA, updates: int) -> float:
    """The bias denominator ``ema``'s schedule reaches after ``updates`` updates (1 with
    init="weights")."""
    if ema._init == "weights":
        return 1.0
    correction = 0.0
    for update in range(updates):
        correction = schedule.next_bias_correction(
            correction, schedule.step_weight(ema._schedule, update, steps=update))
    return correction


def _from_applied(ema: ModelEMA, applied: dict[str, Any], updates: int, source: str) -> None:
    """Set ``ema`` to the state whose applied averages are ``applied`` after ``updates`` updates,
    checking every value first (through :meth:`ModelEMA.set_state_dict`: nothing changes on error)."""
    if isinstance(updates, bool) or not isinstance(updates, (int, np.integer)) or updates < 0:
        raise ValueError(
            f"step must be an int of at least 0 (the EMA's update count), got {short_repr(updates)}"
        )
    dtypes = ema._stored_dtypes()  # (under sharding, also the averages other ranks keep)
    missing = [n for n in dtypes if n not in applied]
    if missing:
        raise ValueError(f"{source} has no average of {missing[:5]}: it was not written for this model")
    correction = _bias_correction(ema, int(updates))
    if updates > 0 and correction == 0.0:
        raise ValueError(f"{source}: {updates} updates of this schedule leave no average (decay 0)")
    averages = {}
    for name, dtype in dtypes.items():
        value = _numpy(applied[name])
        if value.dtype not in (np.float16, np.float32, np.float64):
            raise ValueError(f"{source} holds {name!r} as {value.dtype}, not a floating-point array")
        averages[name] = (value.astype(np.float64) * correction).astype(dtype)
    ema.set_state_dict({
        "averages": averages, "num_updates": int(updates), "update_calls": int(updates),
        "bias_correction": correction,
    })


def _foreign_keys(ema: ModelEMA, state: dict[str, Any], source: str) -> None:
    known = set(ema._layer.state_dict())
    foreign = sorted(set(state) - known)
    if foreign:
        raise ValueError(f"{source} holds {foreign[:5]}, which the model does not have: another model's")


def load(ema: ModelEMA, source: Any, *, format: str, step: int | None = None) -> None:
    """Carry a client's EMA checkpoint on in ``ema``, configured like that client.

    Args:
        ema: The :class:`paddle_ema.ModelEMA` to set (``init`` as the client starts: ``"zeros"`` for
            ppdet, ``"weights"`` for the others; the schedule as the client's configuration).
        source: A path prefix (ppdet, ppcls: without ``.pdparams``), a PaddleSeg ``iter_N``
            directory or its ``ema_model.pdparams``, a file ``paddle.save`` wrote
            (ppdiffusers), or the loaded dict itself.
        format: ``"ppdet"``, ``"ppcls"``, ``"ppseg"`` or ``"ppdiffusers"``.
        step: The EMA's update count, where the format does not hold it: ppdet (read from
            ``{prefix}.pdopt``'s scheduler when there), PaddleSeg (read from ``iter_N``); ppcls
            needs none (constant decay: 0 if not given). ppdiffusers holds its own.

    Under ``sharding`` every rank loads the same checkpoint and takes its part.

    Raises:
        TypeError: ``ema`` is not a ModelEMA.
        ValueError: ``format`` is unknown; ``ema`` is not configured like the client; the source
            lacks an average of the EMA, holds another model's keys or shapes, or non-float
            values; the step count is missing or not an int. Nothing is changed then.
        FileNotFoundError: a file of the source is missing.
    """
    _check(ema, format)
    ema._follow_model()
    if format == "ppdiffusers":
        _load_ppdiffusers(ema, _read(source) if isinstance(source, (str, os.PathLike)) else source)
        return
    where = str(source) if isinstance(source, (str, os.PathLike)) else f"the {format} state"
    if format == "ppseg" and isinstance(source, (str, os.PathLike)):
        path = os.path.join(source, "ema_model.pdparams") if os.path.isdir(source) else str(source)
        found = re.search(r"iter_(\d+)", os.path.dirname(os.path.abspath(path)))
        if step is None and found:
            step = int(found.group(1))
        state = _read(path)
    elif isinstance(source, (str, os.PathLike)):
        state = _read(f"{source}.pdparams")
        if format == "ppdet" and step is None and os.path.exists(f"{source}.pdopt"):
            scheduler = paddle.load(f"{source}.pdopt").get("LR_Scheduler", {})
            step = scheduler.get("last_epoch")
    else:
        state = source
    if not isinstance(state, dict):
        raise ValueError(f"{where} must hold a state dict, got {type(state).__name__}")
    if step is None:
        if format != "ppcls":
            raise ValueError(
                f"the {format} checkpoint {where} holds no EMA step count: pass step= (the number of "
                "EMA updates so far, e.g. the iteration count)"
            )
        step = 0
    _foreign_keys(ema, state, where)
    _from_applied(ema, state, step, where)


def _load_ppdiffusers(ema: ModelEMA, state: Any) -> None:
    if not isinstance(state, dict) or "shadow_params" not in state or "optimization_step" not in state:
        raise ValueError("the ppdiffusers state must be EMAModel.state_dict(): a dict with shadow_params")
    names = [n for n, _ in ema._layer.named_parameters()]
    shadow = list(state["shadow_params"])
    if len(shadow) != len(names):
        raise ValueError(
            f"the ppdiffusers state has {len(shadow)} shadow_params, the model {len(names)} parameters"
        )
    expected = {
        "decay": ema.decay, "min_decay": ema._schedule.min_decay,
        "update_after_step": ema._schedule.start_step,
        "use_ema_warmup": ema._schedule.power is not None,
    }
    if ema._schedule.power is not None:
        expected.update(inv_gamma=ema._schedule.inv_gamma, power=ema._schedule.power)
    differ = [f"{k}={short_repr(state[k])} (the ModelEMA: {v!r})" for k, v in expected.items()
              if k in state and not np.isclose(float(state[k]), float(v))]
    if differ:
        raise ValueError(f"the ppdiffusers EMA was configured otherwise: {', '.join(differ)}")
    extra = [n for n in ema._stored_dtypes() if n not in names]
    if extra:
        raise ValueError(
            f"ppdiffusers keeps averages of parameters only; this ModelEMA averages {extra[:5]} too: "
            "build it with buffers=False"
        )
    applied = dict(zip(names, shadow))
    for name, value in applied.items():
        if list(np.shape(_numpy(value))) != list(dict(ema._layer.named_parameters())[name].shape):
            raise ValueError(f"the ppdiffusers shadow of {name!r} has another shape: another model's")
    _from_applied(ema, applied, state["optimization_step"], "the ppdiffusers state")


def _applied_state(ema: ModelEMA) -> dict[str, Any]:
    """The model's state dict with every average applied (what the client's EMA model holds)."""
    averages = ema.averages()
    return {k: averages.get(k, v) for k, v in ema._layer.state_dict().items()}


def save(ema: ModelEMA, path_prefix: str, *, format: str) -> None:
    """Write ``ema`` in the layout the client's own tools read.

    ppdet and ppcls: ``{path_prefix}.pdparams`` (the applied averages over the model's state dict)
    and ``{path_prefix}.pdema`` (the raw weights), as their trainers swap them; the optimizer's
    ``.pdopt`` is the training script's to write. ppseg: ``{path_prefix}/ema_model.pdparams``.
    ppdiffusers: ``{path_prefix}.pdparams`` holding what ``EMAModel.state_dict()`` returns, for
    ``EMAModel.load_state_dict(paddle.load(...))``.

    Under ``sharding`` (see :class:`paddle_ema.ModelEMA`) every rank of the group calls it: the
    averages are gathered, the sharding group's rank 0 writes the files, and every rank returns
    once they are written (or raises if writing failed).

    Raises:
        TypeError, ValueError: as :func:`load`.
        RuntimeError: under ``sharding``, another rank failed (as :meth:`ModelEMA.averages`).
    """
    _check(ema, format)
    if not isinstance(path_prefix, (str, os.PathLike)):
        raise TypeError(f"path_prefix must be a str, got {type(path_prefix).__name__}")
    applied = _applied_state(ema)  # (collective under sharding)
    partition = ema._partition  # (stage 3 is refused by _check)
    failure = None
    if partition is None or partition.rank == 0:
        try:
            _write(ema, applied, path_prefix, format)
        except Exception as error:  # (told to the other ranks, then raised here)
            failure = error
    if partition is not None:
        partition.agree((), failure, "writing the files")  # every rank returns once they are written
    elif failure is not None:
        raise failure


def _write(ema: ModelEMA, applied: dict[str, Any], path_prefix: str, format: str) -> None:
    """Write the files of ``format`` at ``path_prefix``, with ``applied`` the model's state dict
    with every average applied."""
    if format in ("ppdet", "ppcls"):
        paddle.save(applied, f"{path_prefix}.pdparams")
        paddle.save(ema._layer.state_dict(), f"{path_prefix}.pdema")
    elif format == "ppseg":
        os.makedirs(path_prefix, exist_ok=True)
        paddle.save(applied, os.path.join(path_prefix, "ema_model.pdparams"))
    else:
        plan = ema._schedule
        paddle.save({
            "decay": plan.decay, "min_decay": plan.min_decay, "optimization_step": ema.num_updates,
            "update_after_step": plan.start_step, "use_ema_warmup": plan.power is not None,
            "inv_gamma": plan.inv_gamma, "power": plan.power if plan.power is not None else 2 / 3,
            "shadow_params": [applied[n] for n, _ in ema._layer.named_parameters()],
        }, f"{path_prefix}.pdparams")
