"""ModelEMA's averages of many small tensors kept in one flat buffer, so that an update of all of them
is a few kernels instead of two per tensor.

On models with hundreds of small tensors (a detector's convolutions and batch norms) an update that
runs two in-place kernels per tensor is bound by the cost of launching them, not by memory. A
:class:`FlatGroup` holds the averages of tensors of one dtype and place in one 1-d buffer, each
average a view of its rows with its tensor's shape (so everything that reads or writes an average by
name sees the buffer). An update copies the tensors into a second buffer kept for the purpose (one
kernel, nothing allocated) and runs the same two ``sgd_`` kernels as the per-tensor path over the
whole buffer, elementwise and so with the same numbers. The model's tensors stay where the model and
its optimizer keep them: only the averages move.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import paddle

from paddle_ema import _ir, _names

__all__ = ["FlatGroup", "GROUPED_DTYPES", "groupable"]

# The dtypes whose averages are grouped: those of Paddle's coalesce_tensor CPU kernels. A float16 or
# bfloat16 tensor has a float32 average, and its update casts it first: it stays on its own.
GROUPED_DTYPES = ("float32", "float64")


def groupable(tensor: Any, average: Any) -> bool:
    """Whether ``average``, of eager ``tensor``, can live in a :class:`FlatGroup`: of a grouped dtype,
    the tensor's own, not empty, and small (larger tensors cost a copy for nothing: see
    :func:`paddle_ema._names.stack_max_numel`)."""
    dtype = _ir.dtype_name(average)
    numel = math.prod(average.shape)
    return (dtype in GROUPED_DTYPES and _ir.dtype_name(tensor) == dtype
            and 0 < numel <= _names.stack_max_numel())


class FlatGroup:
    """The averages of ``names`` in one flat buffer: ``averages[name]`` is a view of it.

    Built from the current averages (copied in: the group's views replace them). ``tensors`` are
    the model's tensors under those names, in order; :meth:`follow` points the group at tensors the
    model re-bound to the same names (same shapes) without copying anything.
    """

    def __init__(self, names: Sequence[str], tensors: Sequence[Any], averages: Sequence[Any]) -> None:
        self.names = tuple(names)
        self.tensors = list(tensors)
        self.dtype = _ir.dtype_name(averages[0])
        self.flat = _ir.eager_holder()
        views = [_ir.eager_holder() for _ in names]
        _ir.eager_coalesce(averages, views, self.flat, copy=True)
        self.averages = dict(zip(self.names, views))
        self._shapes = [list(view.shape) for view in views]
        # The tensors' values, copied each update into this buffer, through views made for it alone
        # (the copy re-points them; nothing else may share them).
        self._gathered = _ir.eager_holder()
        self._gather_views = [_ir.eager_holder() for _ in names]
        _ir.eager_coalesce(self.tensors, self._gather_views, self._gathered, copy=True)

    def holds(self, names: Sequence[str], averages: dict[str, Any]) -> bool:
        """Whether this group is still the home of exactly these names' averages (none replaced)."""
        return tuple(names) == self.names and all(averages[n] is self.averages[n] for n in names)

    def follow(self, tensors: Iterable[Any]) -> None:
        """Average ``tensors`` (the model's, by this group's names, in order) from now on."""
        self.tensors = list(tensors)

    def update(self, weight: Any, weight_neg: Any) -> None:
        """``average += weight * (tensor - average)`` for every member: three kernels."""
        _ir.eager_coalesce(self.tensors, self._gather_views, self._gathered, copy=True)
        _ir.sgd_lerp_(self.flat, self._gathered, weight, weight_neg)

    def scaled(self, factor: Any) -> dict[str, Any]:
        """New tensors ``factor * average`` by name, pieces of one new buffer: two kernels."""
        pieces = _ir.eager_pieces(paddle.scale(self.flat, factor), self._shapes)
        return dict(zip(self.names, pieces))
