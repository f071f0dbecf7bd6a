"""apply/restore for every EMA class: one transaction and one record of which EMAs are applied.

An apply runs, in this order::

    prepare      compute the results into new tensors and set the trained tensors aside
                 (no weight is written: a failure or interrupt here changes nothing)
    record       the EMA goes on the record of applied EMAs (one append: from here every trained
                 value is held by the swap, so restore() works whatever happens next)
    swap in      point every weight at its result (no copy); on any failure, restore and re-raise

and a restore::

    check        no EMA sharing weights with this one was applied after it (restores go in reverse)
    swap back    point every weight at its trained tensor again (idempotent: an interrupted restore
                 runs again)
    unrecord     one remove, then the memory held for the swap is let go

The classes differ only in where the weights live: tensors of a scope (:class:`ScopeSwap`, for
``ExponentialMovingAverage``) or a dygraph model's tensors (:class:`EagerSwap`, for ``ModelEMA``).
"""

from __future__ import annotations

import abc
import logging
from typing import Any, Callable, Sequence

import numpy as np

from paddle_ema import _ir, _select

__all__ = [
    "EagerSwap", "Restorer", "ScopeSwap", "Swap", "any_applied", "applied", "apply", "check_need_restore",
    "overlapping", "restore",
]

_logger = logging.getLogger(__name__)


class Swap(abc.ABC):
    """One apply's tensors: the results to swap in and the trained tensors set aside.

    Made by the class's prepare step, after which every trained value is held by the swap.
    """

    label: str  # how errors name the EMA: "EMA 'ema_0'"

    @abc.abstractmethod
    def swap_in(self) -> None:
        """Point every weight at its result, then let go of the results."""

    @abc.abstractmethod
    def swap_back(self) -> None:
        """Point every weight at its trained tensor again. Idempotent."""

    @abc.abstractmethod
    def release(self) -> None:
        """Let go of the trained tensors set aside (after :meth:`swap_back`), so the model does not
        carry a second copy of its weights."""

    @abc.abstractmethod
    def overlaps(self, other: Swap) -> bool:
        """Whether the two swaps touch a weight in common (restoring one under the other would mix
        their weights)."""


class Restorer:
    """What ``apply`` returns: a context manager whose exit restores, if ``need_restore``.

    ``apply`` has already taken effect when this is made, so ``apply(...)`` works with or without
    ``with``.
    """

    def __init__(self, restore: Callable[[], None], need_restore: bool) -> None:
        self._restore = restore
        self._need_restore = need_restore

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: Any) -> None:
        if self._need_restore:
            self._restore()


# Every applied EMA with its swap, in the order they were applied (one append and one remove each, so
# an interrupt cannot leave it half-updated). An EMA restoring under a later one that shares weights
# with it would put the trained weights back, and the later one's restore would then write the first
# one's averages over them: restores of EMAs that overlap go in reverse order.
_APPLIED: list[tuple[object, Swap]] = []


def check_need_restore(need_restore: Any) -> bool:
    """``need_restore`` as a bool, or a TypeError (a numpy bool is one)."""
    if not isinstance(need_restore, (bool, np.bool_)):
        raise TypeError(
            f"need_restore must be a bool, got {_select.short_repr(need_restore)} of type "
            f"{type(need_restore).__name__}; pass need_restore=False to restore yourself later"
        )
    return bool(need_restore)


def any_applied() -> bool:
    """Whether any EMA is applied (the common answer, no: then nothing can overlap)."""
    return bool(_APPLIED)


def applied(owner: object) -> Swap | None:
    """``owner``'s swap if it is applied, else None (set from before a weight is written)."""
    return next((swap for applier, swap in _APPLIED if applier is owner), None)


def overlapping(probe: Swap) -> list[object]:
    """The applied EMAs whose swaps share a weight with ``probe``."""
    return [owner for owner, swap in _APPLIED if swap.overlaps(probe)]


def apply(
    owner: object, prepare: Callable[[], Swap], owner_restore: Callable[[], None], need_restore: bool,
) -> Restorer:
    """Apply ``owner``'s averages: run ``prepare`` (which computes the results and sets the trained
    tensors aside, writing no weight, and cleans up after itself if it fails), record it, swap in.
    The caller has checked that ``owner`` is not applied. Leaving the returned context calls
    ``owner_restore`` (the class's public ``restore``) if ``need_restore``."""
    swap = prepare()
    _APPLIED.append((owner, swap))
    try:
        swap.swap_in()
    except BaseException:
        restore(owner)
        raise
    return Restorer(owner_restore, need_restore)


def restore(owner: object) -> bool:
    """Put back the trained weights ``owner``'s apply set aside; False if it is not applied.

    Raises:
        RuntimeError: an EMA sharing weights with ``owner`` was applied after it and is not restored
            yet (nothing is changed).
    """
    index = next((i for i, (applier, _) in enumerate(_APPLIED) if applier is owner), None)
    if index is None:
        return False
    swap = _APPLIED[index][1]
    later = [other for _, other in _APPLIED[index + 1:] if other.overlaps(swap)]
    if later:
        raise RuntimeError(
            f"{later[-1].label} was applied after {swap.label} over the same weights and is not "
            "restored yet; restore the EMAs in the reverse order of apply (nothing was changed)"
        )
    swap.swap_back()
    del _APPLIED[index]
    swap.release()
    return True


class ScopeSwap(Swap):
    """The parameters of a scope (its own or an ancestor's) and their backups, looked up once (512
    parameters: ~0.5 ms), and where the write program puts its results.

    Backups are tensors of no scope, owned here: they live as long as the apply does, whatever
    happens to the scope (``drop_kids`` on a parent frees a child scope's variables, and the trained
    values with them, were they kept there). Results live only in the scope. Neither is in any
    program's persistables, so checkpoints never carry them, and both hold memory only while an apply
    is under way or applied. Results are looked up by name after the write program ran: under PIR its
    ``shadow_output`` puts a new variable into the scope under the result's name, so a handle taken
    before the run would refer to a variable the scope no longer holds.
    """

    def __init__(self, label: str, scope: Any, names: Sequence[str], slots: Sequence[Any] = ()) -> None:
        self.label = label
        self.scope = scope  # the scope apply worked on, whatever scope is current at restore
        self.names = frozenset(names)  # every parameter the EMA averages, swapped or not
        # Each name's variable as the scope resolves it (its own or an ancestor's), to tell two
        # applies that reach the same parameter from different scopes (a parent and its child).
        # Kept alive here: the bindings return one Python object per live variable, so identity
        # compares variables without touching a scope that may be gone by restore time.
        self.variables = {name: _ir.find_scope_variable(name, scope) for name in self.names}
        self.slots = tuple(slots)
        self.params: tuple[Any, ...] = ()
        self.backups: tuple[Any, ...] = ()

    @classmethod
    def of(cls, label: str, scope: Any, slots: Sequence[Any]) -> ScopeSwap:
        """Handles to every parameter of ``slots`` that ``scope`` sees and to a backup for it, the
        backups holding no memory yet.

        Raises:
            RuntimeError: a parameter is not in ``scope`` or its ancestors, or holds no data;
                nothing has been declared then.
        """
        swap = cls(label, scope, [slot.param for slot in slots], slots)
        # Found, not declared: a child scope sees its parent's parameters, and declaring one in the
        # child would hide the trained parameter behind an empty one from every later run in it.
        swap.params = tuple(_ir.variable_tensor(swap.variables[slot.param]) for slot in swap.slots)
        for slot, param in zip(swap.slots, swap.params):
            if param is None or not _ir.holds_memory(param):
                raise RuntimeError(
                    f"parameter {slot.param!r} holds no data in the current scope or its parents; run "
                    "apply() under paddle.static.scope_guard(scope) with the scope the training runs in"
                )
        swap.backups = tuple(_ir.detached_tensor() for _ in swap.slots)
        return swap

    def set_aside(self) -> None:
        """Make every backup refer to its parameter's memory: a backup that copies nothing. Writes no
        parameter; once done, every trained value is held by a backup."""
        for param, backup in zip(self.params, self.backups):
            _ir.share_memory(backup, param)

    def results(self) -> dict[str, Any]:
        """The result tensors in the scope, by name (a stacked result serves several slots)."""
        names = dict.fromkeys(slot.result for slot in self.slots)
        return {name: tensor for name in names if (tensor := _ir.find_scope_tensor(name, self.scope))}

    def swap_in(self) -> None:
        """Point every parameter at its debiased average (its result, or its rows of a stacked
        result): no copy, so apply costs the one pass of the write program."""
        results = self.results()
        for slot, param in zip(self.slots, self.params):
            result = results[slot.result]
            _ir.share_memory(param, _ir.rows_of(result, *slot.rows) if slot.shares_result else result)
        for result in results.values():
            _ir.release(result)

    def swap_back(self) -> None:
        """A parameter whose backup holds no memory was never swapped and is left alone."""
        for param, backup in zip(self.params, self.backups):
            if _ir.holds_memory(backup):
                _ir.share_memory(param, backup)

    def release(self, results: bool = False) -> None:
        """Let go of the backups and, with ``results``, the results (a failed prepare). After a
        swap_in the results are gone already, and the scope that held them may be too (a child scope
        dropped by its parent's ``drop_kids``); the backups are no scope's."""
        for backup in self.backups:
            _ir.release(backup)
        if results:
            for result in self.results().values():
                _ir.release(result)

    def overlaps(self, other: Swap) -> bool:
        if not isinstance(other, ScopeSwap):
            return False
        common = self.names & other.names
        if other.scope is self.scope:
            return bool(common)
        return any(self.variables[n] is not None and self.variables[n] is other.variables[n] for n in common)


class EagerSwap(Swap):
    """A dygraph model's tensors, their results and the trained tensors set aside, and where the
    model held each of its tensors and sublayers when apply took them (``_ir.LayerBindings``): a
    forward run while applied may bind a new tensor to a name (``self.seen = self.seen + n``), and
    restore puts the model back as apply found it."""

    def __init__(
        self, label: str, layer: Any, tensors: dict[str, Any], results: dict[str, Any] | None = None,
    ) -> None:
        self.label = label
        self.layer = layer
        self.tensors = tensors
        self._ids = frozenset(id(t) for t in tensors.values())
        self.results = results or {}
        self.backups: dict[str, Any] = {}
        self.bindings: Any = None
        # Run once the tensors hold their trained data again (stage 3 makes them the parameters'
        # slices again: see paddle_ema._sharding.Slices.put_back).
        self.after_swap_back: Callable[[], None] | None = None

    @classmethod
    def of(cls, label: str, layer: Any, tensors: dict[str, Any], results: dict[str, Any],
           bindings: Any = None) -> EagerSwap:
        """Set every tensor of ``tensors`` aside (a new tensor object takes over its data: no copy)
        with ``results`` to swap in; no weight changes. ``bindings``: the layer's, if the caller
        has just checked that they hold (else they are taken)."""
        # (an empty tensor has nothing to swap, and Paddle 2.6 cannot share an empty tensor's data)
        tensors = {name: tensor for name, tensor in tensors.items() if 0 not in tensor.shape}
        swap = cls(label, layer, tensors, {name: results[name] for name in tensors})
        swap.backups = {name: _ir.eager_set_aside(tensor) for name, tensor in tensors.items()}
        swap.bindings = bindings if bindings is not None else _ir.LayerBindings.of(layer)
        return swap

    def swap_in(self) -> None:
        for name, result in self.results.items():
            _ir.eager_swap_in(self.tensors[name], result)
        self.results = {}

    def swap_back(self) -> None:
        undone = self.bindings.put_back()
        for name, backup in self.backups.items():
            _ir.eager_swap_in(self.tensors[name], backup)
        if self.after_swap_back is not None:
            self.after_swap_back()
        if undone:
            _logger.warning(
                "ModelEMA.restore() put the model back as apply() found it, undoing what changed "
                "while the averages were applied: %s", _select.some_names(undone),
            )

    def release(self) -> None:
        self.backups = {}

    def overlaps(self, other: Swap) -> bool:
        """Two EMAs of one model share it whatever changed since; others share what each last saw."""
        return isinstance(other, EagerSwap) and (other.layer is self.layer or bool(self._ids & other._ids))
