"""The float32 master weights an optimizer keeps of float16/bfloat16 parameters (``multi_precision=True``),
which ``ModelEMA(master_weights=optimizer)`` averages in place of the parameters rounded to 16 bits.

Paddle's optimizers (2.6 to 3.3) keep them in ``_master_weights``, a dict from the parameter's
``name`` to a float32 tensor of its shape, made at the optimizer's first step and replaced, dict and
tensors, by its ``set_state_dict``: so they are looked up anew at every update. Wrappers (fleet's
``HybridParallelOptimizer`` and ``DygraphShardingOptimizer``: ``_inner_opt``; the stage-1/2
``GroupShardedOptimizerStage2``: ``_optim``) hold the optimizer that steps, whose dict is the one
filled.
"""

from __future__ import annotations

from typing import Any

from paddle_ema import _ir
from paddle_ema._select import short_repr

__all__ = ["LOW_PRECISION", "lookup", "source"]

LOW_PRECISION = ("float16", "bfloat16")


def source(optimizer: Any) -> Any | None:
    """The optimizer inside ``optimizer`` (itself, or what its wrappers wrap) that keeps the master
    weights; None for None.

    Raises:
        TypeError: ``optimizer`` is not a Paddle optimizer, nor wraps one.
    """
    if optimizer is None:
        return None
    inner, seen = optimizer, set()
    while id(inner) not in seen:
        seen.add(id(inner))
        wrapped = _attribute(inner, "_inner_opt") or _attribute(inner, "_optim")
        if wrapped is None:
            break
        inner = wrapped
    if not isinstance(_attribute(inner, "_master_weights"), dict):
        raise TypeError(
            f"master_weights must be the optimizer that trains the model (a paddle.optimizer "
            f"optimizer with multi_precision=True, or what fleet or group_sharded_parallel made of "
            f"it), got {short_repr(optimizer)} of type {type(optimizer).__name__}"
        )
    return inner


def lookup(optimizer: Any, tensors: dict[str, Any]) -> dict[str, Any]:
    """The float32 master weights ``optimizer`` (from :func:`source`) holds now of ``tensors``'
    float16/bfloat16 ones, by the same names; those it holds none of (yet) are left out."""
    masters = _attribute(optimizer, "_master_weights") or {}
    found = {}
    for name, tensor in tensors.items():
        if _ir.dtype_name(tensor) not in LOW_PRECISION:
            continue
        master = masters.get(getattr(tensor, "name", None))
        if master is not None and _ir.dtype_name(master) == "float32" and master.shape == tensor.shape:
            found[name] = master
    return found


def _attribute(value: Any, name: str) -> Any:
    """``value.name`` or None (fleet's wrappers forward unknown attributes and may raise anything)."""
    try:
        return getattr(value, name, None)
    except Exception:  # noqa: BLE001
        return None
