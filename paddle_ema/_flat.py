"""ModelEMA's averages of many small tensors kept in one flat buffer, so that an update of all of them
is a few kernels instead of two per tensor.

On models with hundreds of small tensors (a detector's convolutions and batch norms) an update that
runs two in-place kernels per tensor is bound by the cost of launching them, not by memory. A
:class:`FlatGroup` holds the averages of tensors of one dtype and place in one 1-d buffer, each
average a view of its rows with its tensor's shape (so everything that reads or writes an average by
name sees the buffer). An update runs the same two ``sgd_`` kernels as the per-tensor path,
elementwise and so with the same numbers: ``average -= w * average`` over the whole buffer, then
``average += w * tensor`` per slice of the buffer (see :class:`Policy`), the slice's tensors concatenated
(through 1-d views of them made once) into a new block that Paddle's allocator reuses. The model's
tensors stay where the model and its optimizer keep them: only the averages move.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

import paddle

from paddle_ema import _ir, _names

__all__ = ["CPU_POLICY", "DEVICE_POLICY", "FlatGroup", "GROUPED_DTYPES", "Policy", "groupable", "policy"]


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which averages a place groups, and in what slices.

    ``max_numel``: the largest tensor grouped. A grouped tensor is copied once more per update (the
    concatenation: 8 more bytes per float32 value moved), which pays where it saves two kernels'
    fixed cost and not for larger tensors. ``slice_bytes``: the most bytes of the new block one
    kernel of an update (the slice's tensors concatenated) or of :meth:`FlatGroup.scaled` (its
    applied values) writes; ``None`` for the whole buffer at once.
    """

    max_numel: int
    slice_bytes: int | None


# CPU, measured (benchmarks/flat_policy.py; Paddle 3.3 and 2.6, 2 cores): grouping tensors above
# 32k elements too left the 621-tensor YOLO-like model's update as it was or slower (3.0 against 2.9
# ms; 4.3 against 3.9) and made the 16.8M fc512's 1.5-1.7x slower (10.2 against 6.7 ms). Paddle's CPU
# allocator maps a fresh block for every allocation of about 2 MiB or more (3 MiB in every run seen,
# 2 MiB in some) and unmaps it when freed, so such a temporary is faulted in page by page every time
# (0.8 ms per 2 MiB, 20x the kernel); smaller blocks are reused with no fault: a large group costs
# two more kernels per MiB, not page faults.
CPU_POLICY = Policy(max_numel=_names.stack_max_numel(), slice_bytes=1 << 20)
# Other places (GPU, XPU, ...): not measured here (no such device on the machines this is built
# on). Their allocators keep freed blocks, so the whole buffer is one slice; a kernel launch costs
# ~5 us where copying a 4 MB tensor costs a few, so tensors up to 1M elements are grouped.
DEVICE_POLICY = Policy(max_numel=1 << 20, slice_bytes=None)

# The dtypes whose averages are grouped: those of Paddle's coalesce_tensor CPU kernels. A float16 or
# bfloat16 tensor has a float32 average, and its update casts it first: it stays on its own.
GROUPED_DTYPES = ("float32", "float64")


def policy(tensor: Any) -> Policy:
    """The :class:`Policy` of eager ``tensor``'s place."""
    return CPU_POLICY if tensor.place.is_cpu_place() else DEVICE_POLICY


def groupable(tensor: Any, average: Any) -> bool:
    """Whether ``average``, of eager ``tensor``, can live in a :class:`FlatGroup`: of a grouped dtype,
    the tensor's own, not empty, no larger than the average's place's :class:`Policy` groups (the
    place where the group's kernels run), and contiguous
    (a strided view, e.g. a buffer registered as ``x.t()``, cannot be read as flat rows), and not
    an auto-parallel DistTensor (its data is a local piece, which a flat buffer cannot view)."""
    dtype = _ir.dtype_name(average)
    numel = math.prod(average.shape)
    return (dtype in GROUPED_DTYPES and _ir.dtype_name(tensor) == dtype
            and 0 < numel <= policy(average).max_numel and not _ir.is_dist(tensor)
            and tensor.is_contiguous())


class FlatGroup:
    """The averages of ``names`` in one flat buffer: ``averages[name]`` is a view of it.

    Built from the current averages (copied in: the group's views replace them). ``tensors`` are
    the model's tensors under those names, in order; :meth:`follow` points the group at tensors the
    model re-bound to the same names (same shapes) without copying anything. The averages may live
    on another device than the tensors (host memory, ``ModelEMA(offload=True)``): an update then
    copies each slice's concatenated tensors there, and :meth:`scaled` can copy its values back.
    A ``transient`` group views its tensors only while an update runs (they are stage-3 slices,
    whose memory Paddle frees at the next forward: a view kept would keep it).
    """

    def __init__(self, names: Sequence[str], tensors: Sequence[Any], averages: Sequence[Any],
                 transient: bool = False) -> None:
        self.names = tuple(names)
        self.dtype = _ir.dtype_name(averages[0])
        self.flat = _ir.eager_holder()
        views = [_ir.eager_holder() for _ in names]
        _ir.eager_coalesce(averages, views, self.flat, copy=True)
        self.averages = dict(zip(self.names, views))
        self._shapes = [list(view.shape) for view in views]
        self._slices = _slices(self.flat, self._shapes, policy(averages[0]).slice_bytes)
        self._moves = not _ir.same_place(averages[0], tensors[0])
        self._transient = transient
        self.tensors: list[Any] = []
        self._views: list[Any] = []
        self.follow(tensors)

    def holds(self, names: Sequence[str], averages: dict[str, Any]) -> bool:
        """Whether this group is still the home of exactly these names' averages (none replaced)."""
        return tuple(names) == self.names and all(averages[n] is self.averages[n] for n in names)

    def follow(self, tensors: Iterable[Any]) -> None:
        """Average ``tensors`` (the model's, by this group's names, in order) from now on."""
        tensors = list(tensors)
        if self._transient:  # (view objects made once, pointed at the tensors in each update)
            self.tensors = tensors
            self._views = self._views or [_ir.eager_holder() for _ in tensors]
            return
        known = dict(zip(map(id, self.tensors), self._views))
        views = [known.get(id(t)) for t in tensors]
        self._views = [_ir.eager_flat_view(t) if v is None else v for t, v in zip(tensors, views)]
        self.tensors = tensors

    def update(self, weight: Any, weight_neg: Any) -> None:
        """``average += weight * (tensor - average)`` for every member, with the same two ``sgd_``
        as the per-tensor path: one over the buffer, then per slice one over its rows with the
        slice's tensors concatenated (a new block of at most :attr:`Policy.slice_bytes`)."""
        if self._transient:
            views = [_ir.eager_flat_view(t, v) for t, v in zip(self.tensors, self._views)]
        else:
            views = self._views
            for i in _ir.eager_views_hold(views, self.tensors):  # (a tensor given new memory)
                views[i] = _ir.eager_flat_view(self.tensors[i])
        try:
            _ir.eager_decay_(self.flat, weight)
            for rows, start, stop in self._slices:
                _ir.eager_gather_lerp_(rows, views[start:stop], weight_neg, self._moves)
        finally:
            if self._transient:
                for view in views:
                    _ir.eager_let_go(view)

    def scaled(self, factor: Any, place: Any = None) -> dict[str, Any]:
        """New tensors ``factor * average`` by name, on ``place`` (default: the averages'): two
        kernels per slice of the buffer (and a copy, to another place), each slice's new values one
        new block, split into pieces."""
        pieces = []
        for rows, start, stop in self._slices:
            block = paddle.scale(rows, factor)
            block = block if place is None else _ir.moved_to(block, place)
            pieces += _ir.eager_pieces(block, self._shapes[start:stop])
        return dict(zip(self.names, pieces))


def _slices(flat: Any, shapes: Sequence[list[int]], slice_bytes: int | None) -> list[tuple[Any, int, int]]:
    """``(rows, start, stop)``: views of consecutive rows of ``flat`` of at most ``slice_bytes``
    each (``None``: one), holding the averages ``start:stop`` (an average is never cut)."""
    most = math.inf if slice_bytes is None else slice_bytes // flat.element_size()
    slices: list[tuple[Any, int, int]] = []
    first = row = first_row = 0
    for i, shape in enumerate(shapes):
        numel = math.prod(shape)
        if i > first and row + numel - first_row > most:
            slices.append((_ir.eager_rows(flat, first_row, row), first, i))
            first, first_row = i, row
        row += numel
    slices.append((_ir.eager_rows(flat, first_row, row), first, len(shapes)))
    return slices
