"""ModelEMA: the exponential moving average of a dygraph model, with the static class's maths."""

from __future__ import annotations

import copy
import logging
import numbers
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import paddle

from paddle_ema import _apply, _flat, _graph, _interrupts, _ir, _masters, _select, _sharding, schedule
from paddle_ema._select import short_repr

__all__ = ["ModelEMA"]

_logger = logging.getLogger(__name__)

_WARMUPS = (None, "threshold", "power", "exponential")
_INITS = ("zeros", "weights")
_FROZEN = ("average", "copy", "exclude")
_DEFAULT_POWER = 2 / 3


def _inner_layer(model: Any) -> Any:
    """``model`` with the wrappers of Paddle's parallel training looked through: ``paddle.DataParallel``
    and fleet's (``fleet.distributed_model``, ``MixPrecisionLayer``: ``_layers``),
    ``group_sharded_parallel``'s (``_layer``; under stage 3 the EMA reads the parameters' slices, see
    ``_sharding.Stage3``)."""
    while True:
        wrappers = {cls.__name__ for cls in type(model).__mro__}
        if (isinstance(model, paddle.DataParallel) or "MetaParallelBase" in wrappers
                or "MixPrecisionLayer" in wrappers):
            model = model._layers
        elif "GroupShardedStage2" in wrappers or "GroupShardedStage3" in wrappers:
            model = model._layer
        else:
            return model


def _named_tensors(model: Any, buffers: bool) -> dict[str, Any]:
    """The model's floating-point parameters (batch-norm statistics included: Paddle makes them
    parameters) and, with ``buffers``, its floating-point buffers, by structured name. Parallel
    training's wrappers are looked through (:func:`_inner_layer`), so names carry no prefix of theirs."""
    layer = _inner_layer(model)
    found: dict[str, Any] = {}
    seen: set[int] = set()
    named = list(layer.named_parameters())
    if buffers:
        named += [(n, b) for n, b in layer.named_buffers() if b is not None]
    for name, tensor in named:
        if id(tensor) in seen or not paddle.is_floating_point(tensor):
            continue  # a tensor shared by two layers is averaged once, under its first name
        seen.add(id(tensor))
        found[name] = tensor
    return found


def _frozen_names(layer: Any) -> set[str]:
    """The structured names of ``layer``'s parameters that do not train (``stop_gradient``), batch-norm
    statistics among them."""
    return {name for name, p in layer.named_parameters() if p.stop_gradient}


def _holds_non_finite(tensor: Any) -> bool:
    """Whether ``tensor`` holds an infinity or a NaN (one reduction and a read back)."""
    # (an empty tensor holds neither; Paddle 2.6's ``all`` of an empty tensor fails)
    return not _ir.is_empty(tensor) and not bool(paddle.isfinite(tensor).all())


def _update_keeping_infinities(average: Any, target: Any, weight: float, positive: Any,
                               negative: Any) -> None:
    """In place: ``average += weight * (target - average)`` where ``average`` is finite, and
    ``d * average + weight * target`` (``d = 1 - weight``; ``target`` itself when ``d`` is 0) where
    it is infinite, so that a tensor constant at -inf (an attention mask) averages to itself.

    The two-kernel update computes ``average - weight * average``, which is ``inf - inf`` = NaN for
    an infinite average; this costs five more kernels, so only tensors found holding a non-finite
    value take it.
    """
    infinite = paddle.isinf(average)
    if weight == 1.0:
        kept = target
    else:
        kept = paddle.scale(average, 1.0 - weight) + paddle.scale(target, weight)
    _ir.sgd_lerp_(average, target, positive, negative)
    paddle.assign(paddle.where(infinite, kept, average), output=average)


def _not_a_layer(model: Any) -> str:
    """What ``model`` is and what to pass instead, for the error that it is not a Layer."""
    if isinstance(model, (list, tuple)):  # e.g. model.parameters(): its repr prints every tensor
        kind = "parameters" if model and all(isinstance(t, paddle.Tensor) for t in model) else "items"
        return (
            f"a {type(model).__name__} of {len(model)} {kind}; pass the model (a paddle.nn.Layer) "
            "itself: ModelEMA finds its parameters and buffers (parameters=[...] picks some)"
        )
    return f"{short_repr(model)} of type {type(model).__name__}"


class ModelEMA:
    """Exponential moving average of a dygraph model's weights, with exact bias correction.

    The dygraph twin of :class:`paddle_ema.ExponentialMovingAverage`, with the same maths (one
    :mod:`paddle_ema.schedule` module serves both). For every averaged tensor :math:`\\theta` it keeps

    .. math::

        a_t = d_t\\,a_{t-1} + (1 - d_t)\\,\\theta_t, \\qquad a_0 = 0,

    and :meth:`apply` swaps in :math:`a_t / (1 - \\prod_{i \\le t} d_i)`, restoring the trained weights
    bit-exactly on exit. An update runs two flat in-place kernels (``a -= w a``, ``a += w \\theta``,
    faster than ``lerp_`` at every size) under ``paddle.no_grad()``: over one buffer holding the
    averages of all small float32 (and one of all float64) tensors, the second kernel per slice of
    it with the slice's tensors concatenated, and per tensor for the others; so an update is a few
    kernels whatever the tensor count, and apply and restore too (see docs/dygraph.md). float16 and
    bfloat16 tensors get float32 averages; the bias denominator is a float64 number.

    The decay :math:`d_t` of the ``t``-th update (from 0): 0 for the first ``start_step`` updates;
    then ``decay`` (``warmup=None``), :math:`\\min(\\text{decay}, (1 + t) / (10 + t))`
    (``warmup="threshold"``, PaddleDetection's default and the static class's ``thres_steps`` rule
    with ``t`` the update count), :math:`1 - (1 + t' / \\gamma)^{-p}` with :math:`t'` counted from
    ``start_step`` (``warmup="power"``) or :math:`\\text{decay} \\cdot (1 - e^{-(t' + 1) / \\tau})`
    (``warmup="exponential"``, PaddleDetection's type of that name); clipped to
    ``[min_decay, decay]``.

    With ``init="weights"`` the averages start as a copy of the weights instead of zeros and are
    applied as they are, with no bias correction (PaddleClas, PaddleSeg, ppdiffusers and timm do
    this). The copy stands for update 0, which a zero-started average takes with decay 0, so the
    first :meth:`update` is update 1 of the schedule: ``warmup="power"`` then gives ppdiffusers'
    ``EMAModel`` decays exactly, and ``power=1`` PaddleSeg's ``t / (t + 1)``.

    The EMA follows the model as it changes: a tensor the model binds to a name in place of another
    (``self.count = self.count + 1`` in ``forward``) is averaged on; a model cast with
    ``model.to(dtype=...)`` (or a tensor cast in place) gets averages of the new dtype; a
    floating-point tensor the model gains later (an adapter layer added) that
    ``parameters``/``exclude`` would have chosen is averaged from when the EMA first sees it (at
    :meth:`update`, :meth:`apply`, :meth:`averages` or :meth:`set_state_dict`), as if it had always
    held the value it has then; a tensor two names shared keeps its average when one name is bound
    to another tensor. A tensor that is gone, has another shape or a non-floating dtype, or moved
    between parameters and buffers (``weight_norm``/``spectral_norm`` applied after the EMA was
    built) is an error at the next call, with nothing changed. Infinities are kept: a tensor
    constant at ``-inf`` (a causal mask) averages to ``-inf``, as the formula says, if it holds it
    when the EMA first sees it; a NaN makes its element's average NaN from then on.

    Args:
        model: The ``paddle.nn.Layer`` to average (a ``paddle.DataParallel`` is looked through).
        decay: The (maximum) decay, in [0, 1).
        warmup: None, ``"threshold"`` or ``"power"``.
        inv_gamma: The power warm-up's time scale :math:`\\gamma` (only with ``warmup="power"``).
        power: The power warm-up's exponent :math:`p` (only with ``warmup="power"``).
        min_decay: The lowest decay, in [0, decay].
        start_step: Updates that use decay 0 before the schedule starts.
        update_every: Average on every ``update_every``-th call of :meth:`update` only; the other
            calls return at once. Schedules count the averaging updates.
        parameters: Structured names (as in ``model.named_parameters()``) or parameters to average;
            default: every floating-point parameter (and buffer, see ``buffers``).
        exclude: Names or regular expressions (``re.fullmatch``) to leave out; each must match.
        buffers: Whether floating-point buffers (``register_buffer``) are averaged too. Batch-norm
            statistics are parameters in Paddle and are averaged either way (see ``frozen``).
        init: ``"zeros"`` (bias-corrected averages from zero) or ``"weights"`` (see above).
        frozen: What happens to parameters that do not train (``stop_gradient=True``, batch-norm
            statistics among them): ``"average"`` them like the others, ``"copy"`` them (not
            averaged; :meth:`averages`, :meth:`averaged_model` and the applied model carry their
            current value, as ppdiffusers does) or ``"exclude"`` them (left out, as with
            ``exclude``). Decided when the EMA is built, and for tensors the model gains later.
        tau: The exponential warm-up's time scale (only with ``warmup="exponential"``).
        sharding: The sharded optimizer the model trains with, under Paddle's dygraph sharding
            stage 1/2 (what ``fleet.distributed_optimizer`` returns with ``sharding_degree`` > 1,
            or ``group_sharded_parallel`` at level ``"os"``/``"os_g"``): each rank then averages
            only the parameters its optimizer partition updates (and, each its own, what no
            rank's optimizer updates alone: buffers, frozen parameters, batch-norm statistics),
            with no communication per update. :meth:`averages`, :meth:`apply`,
            :meth:`averaged_model` and :meth:`consolidated_state_dict` then gather the others'
            averages (one broadcast per owning rank and dtype): every rank of the group must call
            them. Under stage 3 (``group_sharded_parallel`` at level ``"p_g_os"``) pass the
            wrapped model and no ``sharding``: each rank averages its slices of the parameters
            Paddle cuts (and the others whole); :meth:`apply` swaps each rank's slices, which the
            model's forward gathers; :meth:`averages` and :meth:`consolidated_state_dict` gather
            the slices (one ``all_gather`` per dtype; every rank calls them). Under fleet's
            ``split_param`` (``DygraphShardingOptimizerV2``) each rank averages its piece of each
            parameter (where its optimizer's share of the flat buffers meets the parameter), and
            the pieces are gathered as under stage 3; :meth:`apply` swaps the whole averages in. See
            docs/large-models.md.
        offload: Keep the averages (and update them) in host memory, for runs whose device memory
            is full: an update copies the model's tensors to the host (one copy per flat slice or
            tensor) and averages them there; :meth:`apply` and :meth:`averages` copy the results
            back to each tensor's device. The numbers are the same as without it. On a CPU run it
            changes nothing: the averages are in host memory either way. Not with auto-parallel
            DistTensors, whose averages are placed like them.
        master_weights: The optimizer that trains the model with float32 master weights of its
            float16/bfloat16 parameters (``multi_precision=True``; under ``sharding``, the
            sharded optimizer): the average of such a parameter then follows its master weight,
            not the parameter rounded to 16 bits (a step smaller than the parameter's rounding,
            which the rounded parameter does not show, moves the average). Looked up at every
            update (the optimizer makes them at its first step, and its ``set_state_dict``
            replaces them); a parameter with no master weight is averaged as it is. The applied
            values are cast to the parameter's dtype; the master weights are never written.

    Raises:
        TypeError: ``model`` is not a ``paddle.nn.Layer``, an option has the wrong type, or
            ``sharding`` is not one of the sharded optimizers above.
        ValueError: an option is out of range, ``inv_gamma``/``power`` are given without
            ``warmup="power"``, a name matches nothing, nothing is left to average, or
            ``sharding``'s partition holds none of the model's trainable parameters, or it is
            given with a stage-3 model, or it is fleet's ``split_param`` inside pipeline parallel
            (``pp_configs.sharding_comm_overlap``); a stage-3 model's sliced parameter does not
            train and ``frozen`` is not ``"exclude"``; or ``offload=True`` over a model holding
            auto-parallel DistTensors.
        RuntimeError: called in static-graph mode (use ExponentialMovingAverage there).

    Example:
        .. code-block:: python

            import paddle
            import paddle_ema

            model = paddle.nn.Sequential(paddle.nn.Linear(4, 8), paddle.nn.ReLU(), paddle.nn.Linear(8, 1))
            opt = paddle.optimizer.Adam(learning_rate=1e-3, parameters=model.parameters())
            ema = paddle_ema.ModelEMA(model, decay=0.999, warmup="threshold")
            for _ in range(10):
                loss = model(paddle.randn([16, 4])).square().mean()
                loss.backward()
                opt.step()
                opt.clear_grad()
                ema.update()
            with ema.apply():
                val = model(paddle.randn([16, 4]))  # the averaged weights, restored on exit
            paddle.save(ema.state_dict(), "ema.pdparams")
    """

    def __init__(
        self,
        model: paddle.nn.Layer,
        decay: float = 0.999,
        *,
        warmup: str | None = None,
        inv_gamma: float = 1.0,
        power: float = _DEFAULT_POWER,
        min_decay: float = 0.0,
        start_step: int = 0,
        update_every: int = 1,
        parameters: Sequence[Any] | None = None,
        exclude: Sequence[str] | None = None,
        buffers: bool = True,
        init: str = "zeros",
        frozen: str = "average",
        tau: float = 2000.0,
        sharding: Any = None,
        offload: bool = False,
        master_weights: Any = None,
    ) -> None:
        if not paddle.in_dynamic_mode():
            raise RuntimeError(
                "ModelEMA averages a dygraph model; in static-graph mode use "
                "paddle_ema.ExponentialMovingAverage (or call paddle.disable_static() first)"
            )
        if not isinstance(model, paddle.nn.Layer):
            raise TypeError(f"model must be a paddle.nn.Layer, got {_not_a_layer(model)}")
        if warmup not in _WARMUPS:
            raise ValueError(
                f"warmup must be None, 'threshold', 'power' or 'exponential', got {short_repr(warmup)}"
            )
        if init not in _INITS:
            raise ValueError(f"init must be 'zeros' or 'weights', got {short_repr(init)}")
        if frozen not in _FROZEN:
            raise ValueError(f"frozen must be 'average', 'copy' or 'exclude', got {short_repr(frozen)}")
        if warmup != "exponential" and tau != 2000.0:
            raise ValueError(
                f"tau shapes warmup='exponential' only (warmup is {warmup!r}); pass "
                "warmup='exponential', or leave it at its default"
            )
        if warmup != "power" and (inv_gamma != 1.0 or power != _DEFAULT_POWER):
            raise ValueError(
                f"inv_gamma and power shape warmup='power' only (warmup is {warmup!r}); pass "
                "warmup='power', or leave them at their defaults"
            )
        if isinstance(update_every, bool) or not isinstance(update_every, int):
            raise TypeError(
                f"update_every must be an int (average on every k-th call), got {short_repr(update_every)}"
            )
        if update_every < 1:
            raise ValueError(f"update_every must be an int of at least 1, got {short_repr(update_every)}")
        if not isinstance(buffers, bool):
            raise TypeError(f"buffers must be a bool, got {short_repr(buffers)}")
        if not isinstance(offload, bool):
            raise TypeError(f"offload must be a bool, got {short_repr(offload)}")
        self._offload = offload
        self._master_source = _masters.source(master_weights)
        self._schedule = schedule.Schedule.make(
            decay, threshold=warmup == "threshold", start_step=start_step,
            power=power if warmup == "power" else None, inv_gamma=inv_gamma, min_decay=min_decay,
            tau=tau if warmup == "exponential" else None,
        )
        candidates = _named_tensors(model, buffers)
        for name, tensor in candidates.items():
            unsupported = _ir.dist_unsupported(name, tensor)
            if unsupported:
                raise TypeError(unsupported)
        self._frozen = frozen
        # Parameters that do not train (stop_gradient; batch-norm statistics among them) under
        # frozen="copy"/"exclude": not averaged; "copy" ones are carried at their current value.
        self._layer = _inner_layer(model)
        frozen_names = set() if frozen == "average" else _frozen_names(self._layer)
        held_back = [n for n in candidates if n in frozen_names]
        self._copied = held_back if frozen == "copy" else []
        candidates = {n: t for n, t in candidates.items() if n not in held_back}
        by_id = {id(t): n for n, t in candidates.items()}
        names = _select.choose(list(candidates), list(candidates), parameters, exclude,
                               name_of=lambda item: by_id.get(id(item)), where="the model")
        if not names:
            raise ValueError(
                "the model has no floating-point parameter to average (none, or all excluded)"
            )
        refused = next(filter(None, (self._cannot_offload(n, candidates[n]) for n in names)), None)
        if refused:
            raise ValueError(refused)
        stage3 = _sharding.stage3_wrapper(model)
        if stage3 is not None and sharding is not None:
            raise ValueError(
                "a model wrapped by group_sharded_parallel(level='p_g_os') (stage 3) is sharded by "
                "the model itself: build ModelEMA(model, ...) without sharding= (each rank then "
                "averages its slices of the parameters)"
            )
        cut = [n for n in names if getattr(candidates[n], "fw_storage", None) is not None]
        if stage3 is None and cut:
            raise ValueError(
                f"the model's {_select.some_names(cut)} are cut into slices by "
                "group_sharded_parallel(level='p_g_os') (stage 3), which frees them outside forward: "
                "pass the model group_sharded_parallel returned, not the Layer it wraps"
            )
        # Under stage 3: each rank averages its slices of the parameters Paddle cuts (read anew at
        # every call: Paddle wraps a slice in a new object each step), the others whole.
        # Under fleet's split_param: each rank averages its pieces of the parameters (views of the
        # optimizer's buffers, read anew when a buffer gets new memory), the others whole.
        split = None if sharding is None else _sharding.split_params(sharding)
        self._slices: _sharding.Slices | None = (
            _sharding.Stage3.of(stage3, self._layer) if stage3 is not None else
            _sharding.SplitParams.of(split, self._layer) if split is not None else None)
        # Under a sharded optimizer: the owner (global rank) of each partitioned averaged
        # parameter, in the model's order (the order of every gather, the same on every rank), and
        # those another rank averages. What the optimizer does not partition (buffers, frozen
        # parameters) is averaged on every rank, each its own, as the ranks' models hold them.
        self._partition = (None if sharding is None or split is not None
                           else _sharding.Partition.of(sharding))
        self._layout: _sharding.Layout | None = self._partition or self._slices
        sliced = set() if self._slices is None else set(self._slices.params)
        frozen_sliced = [n for n in [*names, *self._copied]
                         if n in sliced and self._slices.params[n].stop_gradient]
        if frozen_sliced:
            raise ValueError(
                f"stage 3 keeps a parameter that does not train ({_select.some_names(frozen_sliced)}) "
                "cut into slices until the first backward and whole after it, which ModelEMA does not "
                "follow: pass frozen='exclude' (or exclude= it)"
            )
        self._owners: dict[str, int] = {}
        if self._partition is not None:
            every = _named_tensors(model, False).values()
            if all(self._partition.owner(t) is None for t in every):
                raise ValueError(
                    f"sharding={type(sharding).__name__}: its partition holds none of this model's "
                    "trainable parameters; pass the sharded optimizer that trains this model"
                )
            owned = {n: self._partition.owner(candidates[n]) for n in names}
            self._owners = {n: rank for n, rank in owned.items() if rank is not None}
        me = self._partition.global_rank if self._partition is not None else None
        self._elsewhere = [n for n, rank in self._owners.items() if rank != me]
        names = [n for n in names if n not in set(self._elsewhere)]
        self._buffers_too = buffers
        # How tensors the model gains later are chosen (see _follow_model): by the same rule.
        self._chosen_by_name = parameters is not None
        self._exclude = list(exclude or [])
        # The names whose tensors are this rank's slices, in the model's order (that of the gathers);
        # a dict for the membership tests.
        cut_up = {} if self._slices is None else self._slices.params
        self._sliced = dict.fromkeys(n for n in names if n in cut_up)
        slices = {} if self._slices is None else self._slices.local(self._sliced, {})
        self._tensors = {name: slices.get(name, candidates[name]) for name in names}
        self._averages: dict[str, Any] = {}
        # The step weight w and -w per average dtype, 0-d (it broadcasts to any shape), refilled
        # in place each update: an update allocates nothing but the casts of low-precision weights.
        self._weights: dict[str, tuple[Any, Any]] = {}
        self._non_finite: set[str] = set()  # names whose tensors held an inf or NaN when looked at
        self._sources: dict[str, Any] = {}  # master weights averaged in place of their tensors
        self._failed: str | None = None  # why an update failed half-way (see update)
        self._init = init
        for name in names:
            self._start_average(name, self._initial_average)
        self._groups: list[_flat.FlatGroup] = []  # averages of small tensors in flat buffers
        self._pair_for_updates()
        self._update_every = update_every
        self._start_counting()
        # The state: ready, or applied (self._applied is not None: on _apply's record).
        _logger.debug("ModelEMA averages %d tensors", len(self._tensors))

    @property
    def decay(self) -> float:
        """The configured (maximum) decay rate."""
        return self._schedule.decay

    @property
    def names(self) -> list[str]:
        """The structured names of the averaged tensors (parameters and buffers), in the model's order."""
        return list(self._tensors)

    @property
    def parameter_names(self) -> list[str]:
        """Alias of :attr:`names`, the same list (buffers included), as
        :attr:`ExponentialMovingAverage.parameter_names`."""
        return self.names

    @property
    def num_updates(self) -> int:
        """How many averaging updates have run (calls skipped by ``update_every`` not counted)."""
        return self._updates

    def update(self) -> None:
        """Move every average toward the model's current weights; call it after ``optimizer.step()``.

        An update is whole or not at all: Ctrl-C (SIGINT) arriving while it writes the averages is
        held back and raises its KeyboardInterrupt once the update is done and counted. If a kernel
        fails half-way (or another exception stops it there), the EMA refuses every later call until
        :meth:`set_state_dict` sets a state back: its averages would be silently wrong. The model's
        weights are never touched.

        Raises:
            RuntimeError: averages (this EMA's or another's over the same weights) are applied to the
                model: averaging them would lose the trained weights' history. Restore first. Or the
                model no longer has an averaged tensor, holds one of another shape under its name,
                or holds it as a buffer instead of a parameter or the other way round (see the
                class docstring for the changes that are followed). Nothing is changed then. Or a
                kernel failed half-way, in this call or an earlier one (see above).
        """
        self._check_not_failed()
        if _apply.any_applied() and _apply.overlapping(self._swap_probe()):
            raise RuntimeError(
                "update() while averages are applied to the model (by this ModelEMA or another) "
                "would average the averages; call ema.restore() (or leave the `with ema.apply():` "
                "block) before training on"
            )
        if (self._calls + 1) % self._update_every:
            self._calls += 1
            return
        self._follow_model()  # (a model it cannot follow changes nothing)
        self._follow_master_weights()
        call = self._calls + 1  # counted once every average took it
        weight = self._next_weight(call)
        with paddle.no_grad(), _interrupts.SigintDeferred():
            try:
                for positive, negative in self._weights.values():
                    positive.fill_(weight)
                    negative.fill_(-weight)
                for group in self._groups:
                    group.update(*self._weights[group.dtype])
                for average, tensor, cast, move, (positive, negative), infinities in self._update_plan:
                    # (a float16/bfloat16 weight is read as float32: one cast, the only temporary;
                    # offloaded, one more: the copy to host memory)
                    target = tensor.astype(average.dtype) if cast else tensor
                    target = _ir.moved_to(target, average.place) if move else target
                    if infinities:
                        _update_keeping_infinities(average, target, weight, positive, negative)
                    else:
                        _ir.sgd_lerp_(average, target, positive, negative)
            except BaseException as error:
                # Some averages took this update and the others not (or one took half of it): using
                # them would be silently wrong, so this EMA refuses to until a state is set back.
                self._failed = f"{type(error).__name__}: {str(error).strip()[:300]}"
                if not isinstance(error, Exception):
                    raise
                raise RuntimeError(
                    f"ModelEMA.update() failed half-way ({self._failed}); the averages are no longer "
                    "consistent: set_state_dict() a saved state, or build a new ModelEMA"
                ) from error
            self._calls = self._last_update_call = call
            self._bias_correction = schedule.next_bias_correction(self._bias_correction, weight)
            self._updates += 1
            self._last_weight = weight

    def averages(self) -> dict[str, Any]:
        """The bias-corrected averages, as :meth:`apply` would write them, touching nothing.

        Returns:
            ``{name: Tensor}`` in each tensor's dtype; before the first update (with
            ``init="zeros"``), copies of the current weights (there is no average yet). With
            ``frozen="copy"``, the frozen parameters too, as copies of their current value.

        Raises:
            RuntimeError: the model no longer has an averaged tensor, or holds one of another shape
                under its name, or as another kind (see :meth:`update`).
        """
        with paddle.no_grad():
            values = self._whole(self._followed(self._corrected))
            if self._copied:
                params = dict(self._layer.named_parameters())
                values.update((n, _ir.eager_copy(params[n])) for n in self._copied if n in params)
            return values

    def _followed(self, values: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        """``values``, called once this EMA is checked and follows the model as it is now."""
        def local() -> dict[str, Any]:
            self._check_not_failed()
            self._follow_model()
            return values()
        return local

    def _whole(self, local: Callable[[], dict[str, Any]], stored: bool = False) -> dict[str, Any]:
        """``local()`` (this rank's values by name) with, under ``sharding``, the values of the
        parameters other ranks average,
        received from them, in the model's order: ``stored`` values are averages as kept (in the
        accumulator dtype), others as applied (in the tensor's dtype).

        Collective under ``sharding`` and stage 3 (there the values of the parameters cut into slices
        are this rank's slices, made whole): every rank of the group calls it. Before anything is sent,
        the ranks agree that none failed (the one that did raises its error, the others say which
        rank failed, rather than wait on it until the group times out), that they are at the same
        update, and that they hold the same model and partition; nothing is written before every
        value is here.

        Raises:
            RuntimeError: as :meth:`averages`; or, under ``sharding``, another rank failed, or the
                ranks' EMAs are at different updates or over different models.
        """
        if self._layout is None:
            return local()
        failure, values, specs = None, {}, {}
        try:
            values = local()
            if self._slices is not None:  # (every rank holds a piece of each, maybe empty)
                owners = dict.fromkeys(self._sliced, 0)
                specs = {n: (self._slices.sizes[n], _ir.dtype_name(values[n])) for n in self._sliced}
            else:
                owners = self._owners
                params = dict(self._layer.named_parameters())
                for name in self._owners:
                    dtype = _ir.dtype_name(params[name])
                    specs[name] = (list(params[name].shape),
                                   _graph.accumulator_dtype(dtype) if stored else dtype)
        except Exception as error:  # (told to the other ranks, then raised here)
            failure = error
        layout = 0 if failure is not None else _sharding.layout_code(owners, specs)
        facts = (self._updates, self._bias_correction, layout)
        table = self._layout.agree(facts, failure)
        ranks = self._layout.group.ranks
        if len({tuple(row[:2]) for row in table}) > 1:
            counts = ", ".join(f"rank {r}: {int(row[0])} updates" for r, row in zip(ranks, table))
            raise RuntimeError(
                f"the sharding group's EMAs are at different updates ({counts}): each rank keeps "
                "part of the averages, so every rank must call ema.update() after every optimizer "
                "step and load the same checkpoint's shards; nothing was gathered"
            )
        if len({row[2] for row in table}) > 1:
            raise RuntimeError(
                "the sharding group's ranks hold different models or partitions (the names, shapes "
                "or dtypes of the averages they own differ): every rank must build its ModelEMA over "
                "the same model, with the same sharded optimizer; nothing was gathered"
            )
        if self._slices is not None:
            gathered = self._slices.whole({n: values[n] for n in self._sliced})
            if not stored:  # (in the parameter's dtype: Paddle keeps a float16 one's slices in float32)
                gathered = {n: v.astype(self._slices.params[n].dtype) for n, v in gathered.items()}
        else:
            gathered = self._partition.gather(self._owners, values, specs)
        order = self._in_model_order(values, gathered)
        return {n: gathered[n] if n in gathered else values[n] for n in order}

    def apply(self, need_restore: bool = True) -> _apply.Restorer:
        """Swap the bias-corrected averages into the model, setting the trained weights aside first.

        Takes effect when called. The averages are computed into new tensors and the model's
        parameters are pointed at them (the parameter objects stay the same, so optimizers and
        compiled forwards keep working); restore points them back. No weight is copied either way.
        Leaving a ``with`` block restores the trained weights bit-exactly (also on an exception)
        unless ``need_restore`` is False; then call :meth:`restore`. A failure or interrupt before
        the swap changes nothing; during it, the weights are restored before the error propagates.
        Before the first update the weights are left as they are (a warning says so). A forward
        run while applied may bind new tensors to the model's names (``self.seen = self.seen + n``):
        restore puts the model back as apply found it, so every name holds its trained value again
        (names added while applied are removed and casts undone too, with a logged warning).

        Args:
            need_restore: Whether leaving the ``with`` block restores the weights.

        Returns:
            A context manager whose exit restores the weights if ``need_restore``.

        Raises:
            TypeError: ``need_restore`` is not a bool.
            RuntimeError: the averages are already applied, or the model no longer has an averaged
                tensor or holds one of another shape or kind under its name (see
                :meth:`update`; nothing is changed).
        """
        need_restore = _apply.check_need_restore(need_restore)
        if self._applied is not None:
            raise RuntimeError("the averages are already applied; call ema.restore() before applying again")
        if self._bias_correction == 0.0:
            warnings.warn("ModelEMA.apply(): no update has run yet, so the weights are left as they are",
                          RuntimeWarning, stacklevel=2)

        bindings_hold = False

        def corrected() -> dict[str, Any]:
            nonlocal bindings_hold
            self._check_not_failed()
            bindings_hold = self._follow_model()
            return self._corrected()

        def prepare() -> _apply.EagerSwap:
            with paddle.no_grad():
                # New tensors holding the averages (the one pass apply makes); the trained tensors
                # are set aside as they are (no copy).
                # (stage 3: each rank swaps its slices, which the model's forward gathers)
                results = corrected() if self._swaps_pieces() else self._whole(corrected)
                bindings = self._bindings if bindings_hold else None  # (else taken anew)
                tensors = self._averaged_tensors()
                if self._elsewhere:
                    tensors = {n: tensors[n] for n in results}
                return self._swap(self._label(), tensors, results, bindings)

        return _apply.apply(self, prepare, self.restore, need_restore)

    def _swaps_pieces(self) -> bool:
        """Whether apply swaps this rank's averaged pieces of the parameters into the model (stage
        3), rather than whole values."""
        return self._slices is not None and self._slices.swaps_pieces

    def _swap(self, label: str, tensors: dict[str, Any], results: dict[str, Any],
              bindings: Any = None) -> _apply.EagerSwap:
        """The swap of ``results`` into the model's ``tensors`` (see :class:`_apply.EagerSwap`);
        under stage 3, its restore makes the trained slices the parameters' again."""
        swap = _apply.EagerSwap.of(label, self._layer, tensors, results, bindings)
        if self._swaps_pieces():
            slices = {n: tensors[n] for n in self._sliced if n in tensors}
            swap.after_swap_back = lambda: self._slices.put_back(slices)
        return swap

    def _whole_shape(self, name: str, tensor: Any) -> list[int]:
        """The shape of the model's ``tensor`` (named ``name``) whole: under stage 3 a rank holds
        a slice of it."""
        return list((self._slices.params[name] if name in self._sliced else tensor).shape)

    def _local_part(self, name: str, whole: Any) -> Any:
        """What apply swaps into tensor ``name`` for its whole value ``whole``: under stage 3 this
        rank's slice, else ``whole``."""
        return self._slices.cut(name, whole) if name in self._sliced and self._swaps_pieces() else whole

    def _averaged_tensors(self) -> dict[str, Any]:
        """The model's tensors that apply swaps, by name: under ``sharding``, also those whose
        averages other ranks keep; under ``split_param``, the whole parameters this rank averages
        pieces of."""
        if not self._elsewhere and (not self._sliced or self._swaps_pieces()):
            return self._tensors
        params = dict(self._layer.named_parameters())
        whole = {} if self._swaps_pieces() else {n: params[n] for n in self._sliced}
        return {**self._tensors, **whole, **{n: params[n] for n in self._elsewhere}}

    def restore(self) -> None:
        """Put back the weights that :meth:`apply` backed up. Does nothing (logs a warning) if
        nothing is applied; if interrupted, call it again.

        Raises:
            RuntimeError: another ModelEMA over some of the same tensors was applied after this one
                and is not restored yet (nothing is changed).
        """
        if not _apply.restore(self):
            _logger.warning("restore() called with no applied averages; weights left unchanged")

    @property
    def _applied(self) -> _apply.EagerSwap | None:
        """This EMA's swap while applied (set from before a weight is written), else None."""
        return _apply.applied(self)

    def _label(self) -> str:
        return f"{type(self).__name__} of {type(self._layer).__name__} at {id(self._layer):#x}"

    def _swap_probe(self) -> _apply.EagerSwap:
        """What an apply would swap now, to ask the record of applied EMAs what overlaps it."""
        return _apply.EagerSwap(self._label(), self._layer, self._tensors)

    def state_dict(self) -> dict[str, Any]:
        """The EMA's state for ``paddle.save``: averages (not bias-corrected), counts, bias denominator.

        A snapshot: the averages are copies (on the CPU), so the dict keeps what it held when taken,
        counts and averages alike, and :meth:`set_state_dict` with it later goes back to that point
        bit-exactly (also through ``paddle.save``/``paddle.load``).
        """
        self._check_not_failed()
        with paddle.no_grad():
            copies = {name: _ir.host_copy(average) for name, average in self._averages.items()}
        state = {
            "averages": copies,
            "num_updates": self._updates,
            "update_calls": self._calls,
            "bias_correction": self._bias_correction,
        }
        if self._layout is not None:
            state["sharding"] = self._layout.label()
        return state

    def _stored_dtypes(self) -> dict[str, str]:
        """The dtype each average is kept in, by name, in the model's order: this rank's and, under
        ``sharding``, those other ranks keep (as they keep them: the accumulator dtype of the
        parameter as this rank's model holds it)."""
        params = dict(self._layer.named_parameters())
        dtypes = {n: _ir.dtype_name(a) for n, a in self._averages.items()}
        dtypes.update((n, _graph.accumulator_dtype(_ir.dtype_name(params[n]))) for n in self._elsewhere)
        return {n: dtypes[n] for n in self._in_model_order(dtypes)}

    def _in_model_order(self, *named: dict[str, Any]) -> list[str]:
        """The names of ``named`` in the model's order: as the model held them when this EMA last
        followed it (a walk of the model costs ~2 ms per 500 tensors), or walked again if that
        misses one of them (the model changed while averages were applied)."""
        wanted = set().union(*named)
        order = [n for n in self._model_order if n in wanted]
        if len(order) < len(wanted):
            order = [n for n in _named_tensors(self._layer, True) if n in wanted]
        return order

    def _kept_for_gather(self) -> dict[str, Any]:
        """The averages as kept, by name; under ``sharding`` with ``offload``, copied to their
        tensors' devices, where the group's collectives send from."""
        if self._layout is None or not self._offload:
            return dict(self._averages)
        return {n: _ir.moved_to(a, self._tensors[n].place) for n, a in self._averages.items()}

    def consolidated_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` with every average, also those other ranks keep under ``sharding``:
        the state of one process, which a ModelEMA of the same model loads under any sharding or
        none. Collective under ``sharding``: every rank of the group calls it (each gets the whole
        state; save it from one). Over an auto-parallel model, the averages of DistTensors are made
        whole, collective over their mesh too. Otherwise the same as :meth:`state_dict`.

        Raises:
            RuntimeError: as :meth:`averages`.
        """
        if self._layout is None and not any(map(_ir.is_dist, self._averages.values())):
            return self.state_dict()
        with paddle.no_grad():
            averages = self._whole(self._followed(self._kept_for_gather), stored=True)
            # (cloned: a Replicate average's whole value may be its own memory)
            whole = {n: _ir.made_whole(a).clone() for n, a in averages.items() if _ir.is_dist(a)}
        state = self.state_dict()  # (this rank's averages copied, and the counts)
        state.pop("sharding", None)
        state["averages"] = {
            n: whole[n].cpu() if n in whole else
            state["averages"][n] if n in state["averages"] and n not in self._sliced else
            average if average.place.is_cpu_place() else average.cpu()
            for n, average in averages.items()
        }
        return state

    def set_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (e.g. after ``paddle.load``); checks everything first.

        Raises:
            ValueError: the state is not a dict, lacks a field or an average, or has averages of
                other tensors; an average is not a floating-point Tensor or numpy array of its
                tensor's shape; ``num_updates``/``update_calls`` are not ints with
                ``0 <= num_updates <= update_calls``; or ``bias_correction`` is not a float that
                ``num_updates`` updates of this EMA's schedule can reach (in
                ``[1 - decay ** num_updates, 1]``, 0 with no update). Nothing is changed then.
            RuntimeError: the averages are applied; restore first.
        """
        if self._applied is not None:
            raise RuntimeError("set_state_dict() while the averages are applied; call ema.restore() first")
        self._follow_model()  # the averages as the model is now (its dtypes, tensors it gained)
        if not isinstance(state, dict):
            raise ValueError(
                f"state must be the dict ModelEMA.state_dict() returned, got {type(state).__name__}"
            )
        if "gamma" in state and not hasattr(self, "_gamma"):
            raise ValueError(
                "the state is a PowerEMA's (it has a 'gamma'); load it into a paddle_ema.PowerEMA"
            )
        fields = ("averages", "num_updates", "update_calls", "bias_correction")
        missing = [k for k in fields if k not in state]
        if missing:
            raise ValueError(f"the state lacks {missing}; pass what ModelEMA.state_dict() returned")
        averages = state["averages"]
        if not isinstance(averages, dict):
            raise ValueError(
                f"the state's 'averages' must be a dict of tensors by name, got {type(averages).__name__}"
            )
        averages = self._this_ranks_part(state.get("sharding"), averages)
        if set(averages) != set(self._averages):
            missing = sorted(set(self._averages) - set(averages))
            extra = sorted(set(averages) - set(self._averages))
            raise ValueError(
                f"the state averages other tensors (missing: {_select.some_names(missing) or 'none'}; "
                f"extra: {_select.some_names(extra) or 'none'}); was it saved from another model?"
            )
        for name, value in averages.items():
            _check_average(name, value, self._averages[name])
        updates, calls, bias_correction = _counts(state, self._schedule, self._init)
        with paddle.no_grad():
            # Every conversion before the first write: nothing is changed if one fails.
            values = {
                name: _ir.placed_like(_ir.moved_to((
                    value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value)).astype(
                    _ir.dtype_name(self._averages[name])), self._averages[name].place), self._averages[name])
                for name, value in averages.items()
            }
            for name, value in values.items():
                self._averages[name].set_value(value)
        self._updates, self._calls, self._bias_correction = updates, calls, bias_correction
        self._last_update_call = calls  # (PowerEMA, whose weights depend on it, sets it from its state)
        self._failed = None
        for name in self._averages:
            self._look_for_non_finite(name)
        self._pair_for_updates(regroup=True)

    def _this_ranks_part(self, saved: Any, averages: dict[str, Any]) -> dict[str, Any]:
        """The averages of a state this EMA keeps: a shard saved by this rank of the same sharding,
        or its part of a whole state (one process's, or :meth:`consolidated_state_dict`'s).

        Raises:
            ValueError: the state is another layout's shard (another rank, world size or kind of
                sharding, or none).
        """
        mine = self._layout.label() if self._layout is not None else None
        if saved is not None and saved != mine:
            here = "unsharded" if mine is None else (
                f"rank {mine['rank']} of {mine['world_size']} under {mine['kind']}")
            raise ValueError(
                f"the state is one rank's shard ({short_repr(saved)}) and this ModelEMA is {here}: a "
                "shard resumes only on the rank and layout that saved it; save "
                "ema.consolidated_state_dict() instead (the whole state, which any layout loads)"
            )
        if saved is None and self._elsewhere:
            absent = [n for n in self._elsewhere if n not in averages]
            if absent:
                raise ValueError(
                    f"the state lacks the averages of {_select.some_names(absent)}, which other ranks "
                    "keep: pass a whole state (ModelEMA.consolidated_state_dict() on every rank, or "
                    "one process's state_dict())"
                )
            averages = {n: v for n, v in averages.items() if n not in set(self._elsewhere)}
        if saved is None and self._slices is not None:  # (a whole state: this rank's pieces of it)
            averages = dict(averages)
            for name in self._sliced:
                value = averages.get(name)
                if hasattr(value, "shape") and list(value.shape) == list(self._slices.params[name].shape):
                    value = value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value)
                    averages[name] = self._slices.cut(name, value)
                elif value is not None:
                    raise ValueError(
                        f"the state's average of {name!r} is {short_repr(value)}, not a tensor of its "
                        f"parameter's shape {list(self._slices.params[name].shape)}: a whole state "
                        "(ModelEMA.consolidated_state_dict(), or one process's state_dict()) loads "
                        f"under {self._slices.kind}, each rank taking its pieces"
                    )
        return averages

    def _next_weight(self, call: int) -> float:
        """The weight :math:`1 - d` of the averaging update at :meth:`update` call number ``call``."""
        count = self._updates + self._schedule_offset
        return schedule.step_weight(self._schedule, count, steps=count)

    def _initial_average(self, tensor: Any, dtype: str) -> Any:
        """A new average of ``tensor`` as ``init`` says: zeros, or a copy of its value."""
        if self._init == "zeros" or _ir.is_empty(tensor):  # (Paddle 2.6 cannot clone an empty tensor)
            return paddle.zeros_like(tensor, dtype=dtype)
        return tensor.astype(dtype).clone()

    def _start_counting(self) -> None:
        self._calls = 0  # update() calls, for update_every
        self._last_update_call = 0  # the call that last averaged
        self._updates = 0  # averaging updates
        # With init="weights" the copy stands for update 0 (decay 0): the schedule's count is one on.
        self._schedule_offset = 1 if self._init == "weights" else 0
        # 1 - prod(d_i), float64; 1 from the start with init="weights" (and it stays 1: the average
        # of weights that start at the weights needs no correction).
        self._bias_correction = 1.0 if self._init == "weights" else 0.0
        self._last_weight: float | None = None

    @property
    def current_decay(self) -> float | None:
        """The decay the most recent averaging :meth:`update` used (None before the first)."""
        return None if self._last_weight is None else 1.0 - self._last_weight

    def reset(self) -> None:
        """Start over from now: no update counted, every average started again as ``init`` says.

        Raises:
            RuntimeError: the averages are applied (restore first), or the model changed in a way
                that cannot be followed (see :meth:`update`). Nothing is changed then.
        """
        if self._applied is not None:
            raise RuntimeError("reset() while the averages are applied; call ema.restore() first")
        self._follow_model()
        for name in list(self._averages):
            self._start_average(name, self._initial_average)
        self._pair_for_updates()
        self._start_counting()
        self._failed = None

    def averaged_model(self) -> paddle.nn.Layer:
        """A new Layer of the model's class and structure holding the averages in its own tensors.

        The averages are what :meth:`apply` would swap in (bias-corrected; with ``frozen="copy"``
        the frozen parameters at their current value); every other tensor is a copy of the model's.
        The model is not touched, so training can go on while the copy is evaluated, exported or run
        as a teacher. A ``paddle.DataParallel`` wrapper is left out: the copy is the inner Layer.

        Returns:
            The copy (``copy.deepcopy`` of the model, in the model's train/eval mode).

        Raises:
            RuntimeError: as :meth:`averages`; or the model is sharded by stage 3 (its parameters
                are freed outside forward: there is nothing to copy).
        """
        if self._swaps_pieces():
            raise RuntimeError(
                "averaged_model() copies the model, whose parameters stage 3 frees outside forward: "
                "use ema.averages() (the whole averages, on every rank) and set them into a model "
                "built without stage 3, or evaluate inside `with ema.apply():`"
            )
        averages = self.averages()
        twin = copy.deepcopy(self._layer)
        held = dict(twin.named_parameters())
        held.update((n, b) for n, b in twin.named_buffers() if b is not None)
        with paddle.no_grad():
            for name, value in averages.items():
                held[name].set_value(value)
        return twin

    def _check_not_failed(self) -> None:
        if self._failed is not None:
            raise RuntimeError(
                f"an earlier ModelEMA.update() failed half-way ({self._failed}), so the averages are "
                "not consistent; set_state_dict() a saved state, or build a new ModelEMA"
            )

    def _start_average(self, name: str, initial: Any) -> None:
        """Make the average of ``self._tensors[name]``, beside it on its device (in host memory
        with ``offload``): ``initial(tensor, dtype=accumulator dtype)``, and look at whether the
        tensor holds a non-finite value."""
        tensor = self._tensors[name]
        dtype = _graph.accumulator_dtype(_ir.dtype_name(tensor))
        home = paddle.CPUPlace() if self._offload else tensor.place
        with paddle.no_grad():
            self._averages[name] = _ir.moved_to(initial(tensor, dtype=dtype), home)
            if dtype not in self._weights:
                self._weights[dtype] = tuple(
                    paddle.to_tensor(0.0, dtype=dtype, place=home) for _ in range(2)
                )
        self._look_for_non_finite(name)

    def _cannot_offload(self, name: str, tensor: Any) -> str | None:
        """Why ``offload`` cannot keep the average of the model's ``tensor`` in host memory, or None."""
        if self._offload and _ir.is_dist(tensor):
            return (f"offload=True keeps the averages in host memory, but the model's {name!r} is an "
                    "auto-parallel DistTensor, whose average is placed like it (each rank its piece); "
                    "build the EMA without offload")
        return None

    def _look_for_non_finite(self, name: str) -> None:
        if _holds_non_finite(self._tensors[name]) or _holds_non_finite(self._averages[name]):
            self._non_finite.add(name)
        else:
            self._non_finite.discard(name)

    def _pair_for_updates(self, regroup: bool = False) -> None:
        """What each update step works on, paired once rather than looked up per tensor per step:
        the flat groups of small averages (see :mod:`paddle_ema._flat`) and the other averages with
        their tensors; and what tells cheaply that the model still holds those tensors as they were
        (see :meth:`_follow_model`).

        A group whose members and averages are unchanged is kept, pointed at the tensors the model
        holds now (a buffer a forward re-binds each step costs no copy); others are made anew from
        the current averages, and with ``regroup`` every group is (after averages were written by
        name: :meth:`set_state_dict`).
        """
        members: dict[tuple[str, str, bool], list[str]] = {}
        for name, average in self._averages.items():
            tensor = self._tensors[name]
            if name not in self._non_finite and _flat.groupable(tensor, average):
                # (stage-3 slices in groups of their own, which hold no view of them between
                # updates: Paddle frees a slice's memory at the next forward)
                transient = name in self._sliced and self._slices.frees_pieces
                key = (_ir.dtype_name(average), str(tensor.place), transient)
                members.setdefault(key, []).append(name)
        kept = {} if regroup else {group.names: group for group in self._groups}
        groups, grouped = [], set()
        for (_, _, transient), names in members.items():
            if len(names) < 2:
                continue
            group = kept.get(tuple(names))
            if group is not None and group.holds(names, self._averages):
                group.follow(self._tensors[n] for n in names)
            else:
                group = _flat.FlatGroup(names, [self._tensors[n] for n in names],
                                        [self._averages[n] for n in names], transient=transient)
                self._averages.update(group.averages)
            groups.append(group)
            grouped.update(names)
        for group in self._groups:  # an average leaving its group gets memory of its own
            for name in group.names:
                if name not in grouped and self._averages.get(name) is group.averages[name]:
                    self._averages[name] = group.averages[name].clone()
        self._groups = groups
        self._grouped = grouped
        self._plan_updates()
        parameters = {name for name, _ in self._layer.named_parameters()}
        self._kinds = {name: "parameter" if name in parameters else "buffer" for name in self._tensors}
        self._dtypes = {name: _ir.dtype_name(t) for name, t in self._tensors.items()}
        self._bindings = _ir.LayerBindings.of(self._layer)
        self._model_order = tuple(_named_tensors(self._layer, True))

    def _follow_master_weights(self) -> None:
        """With ``master_weights``: average each low-precision tensor's float32 master weight, as
        the optimizer holds it now, in place of the tensor."""
        if self._master_source is None:
            return
        low = {n: self._tensors[n] for n, dtype in self._dtypes.items() if dtype in _masters.LOW_PRECISION}
        found = _masters.lookup(self._master_source, low)
        if found.keys() != self._sources.keys() or any(found[n] is not self._sources[n] for n in found):
            self._sources = found
            self._plan_updates()

    def _plan_updates(self) -> None:
        """The averages an update runs per tensor, each with what it reads (its tensor, or the
        tensor's master weight) and how; and what tells cheaply that the model still holds those
        tensors as they were."""
        read = {name: self._sources.get(name, self._tensors[name]) for name in self._averages}
        self._update_plan = [
            (
                average,
                read[name],
                read[name].dtype != average.dtype,
                not _ir.same_place(average, read[name]),
                self._weights[_ir.dtype_name(average)],
                name in self._non_finite,
            )
            # (a rank's empty piece of a parameter under split_param has nothing to average)
            for name, average in self._averages.items()
            if name not in self._grouped and not _ir.is_empty(average)
        ]
        # A tensor reshaped or cast in place (paddle.assign(x, output=weight), weight.cast_(...)) is
        # the same object: its shape and element size tell (a float16/bfloat16 swap needs nothing).
        # And a tensor made a DistTensor in place (Paddle's shard_optimizer does it to the parameters
        # at its first step, stage 3 when it wraps the optimizer) tells by is_dist().
        self._metas = [(t, t.shape, t.element_size(), _ir.is_dist(t), _ir.is_dist_probe(t))
                       for t in self._tensors.values()]

    def _model_unchanged(self) -> bool:
        return self._bindings.hold() and all(
            [t.shape == shape and t.element_size() == size and is_dist() == dist
             for t, shape, size, dist, is_dist in self._metas]
        )

    def _follow_model(self) -> bool:
        """Average what the model holds now, if it changed since the last look; return whether the
        model is now known to hold what this EMA's bindings say (not looked at while averages are
        applied).

        * A layer may bind a new tensor to a name (``self.count = self.count + 1`` in ``forward``,
          or ``layer.weight = new_parameter``): the new one is averaged on (PaddleDetection's EMA,
          which reads ``model.state_dict()`` every update, follows such tensors too). If the model
          still holds the old tensor under another name (two layers tied to it, one untied), its
          average goes with it, and the re-bound name counts as gained.
        * ``model.to(dtype=...)`` and the like cast tensors in place: their averages are cast to the
          new accumulator dtype (exactly, when it widens).
        * A floating-point tensor the model gained (an adapter added, a cache made by the first
          forward) that this EMA's ``parameters``/``exclude`` rule would have chosen is averaged
          from now on as if it had always held its current value: its applied value is that value
          until it moves. A warning is logged.

        Telling that nothing changed costs a few lookups per tensor and sublayer (see
        :class:`paddle_ema._ir.LayerBindings`); only then are the names walked again.

        Raises:
            RuntimeError: a name is gone, holds a tensor of another shape or a non-floating-point
                one, or moved between the parameters and the buffers (``weight_norm``/
                ``spectral_norm`` applied after the EMA was built). Nothing is changed then.
        """
        if _apply.any_applied() and (self._applied is not None or _apply.overlapping(self._swap_probe())):
            # While averages (this EMA's or another's) are applied, restore binds back what apply
            # saw: following what a forward bound meanwhile would adopt what restore then removes.
            return False
        if self._slices is not None:
            self._follow_slices()
        if self._model_unchanged():
            return True
        params = dict(self._layer.named_parameters())
        params.update((n, self._tensors[n]) for n in self._sliced)  # (the slices _follow_slices read)
        buffers = {n: b for n, b in self._layer.named_buffers() if b is not None}
        held = {**params, **buffers} if self._buffers_too else params
        current = {}
        for name in self._tensors:
            now = (params if self._kinds[name] == "parameter" else buffers).get(name)
            _check_still_averageable(name, self._kinds[name], now, self._dtypes[name],
                                     self._averages[name].shape, params, buffers)
            if self._cannot_offload(name, now):
                raise RuntimeError(self._cannot_offload(name, now))
            current[name] = now
        # An old tensor the model still holds under a name no average has: its average follows it.
        # (Not when parameters= named what to average: the names decide then.)
        unaveraged = {} if self._chosen_by_name else {
            id(t): n for n, t in held.items() if n not in self._tensors
        }
        for name, before in list(self._tensors.items()):
            moved_to = unaveraged.get(id(before)) if current[name] is not before else None
            if moved_to is not None:
                _logger.debug("ModelEMA's average of %s follows its tensor to %s", name, moved_to)
                self._tensors[moved_to], self._averages[moved_to] = before, self._averages.pop(name)
                self._dtypes[moved_to] = self._dtypes.pop(name)
                if name in self._non_finite:
                    self._non_finite.add(moved_to)
                self._non_finite.discard(name)
                del self._tensors[name]
                del current[name]
                current[moved_to] = before
        for name, now in current.items():
            changed = now is not self._tensors[name] or _ir.dtype_name(now) != self._dtypes[name]
            if now is not self._tensors[name]:
                _logger.debug("ModelEMA follows %s, re-bound by the model", name)
                self._tensors[name] = now
            average = self._averages[name]
            if _ir.is_dist(now) and not _ir.is_placed_like(average, now):
                # (sharded by paddle.distributed.shard_tensor after the EMA was built: the average
                # is kept as the tensor is, each rank its piece; its old value is whole on every rank)
                _logger.debug("ModelEMA places the average of %s as the tensor: %s", name, now.placements)
                self._start_average(
                    name, lambda _, dtype, a=average, t=now: _ir.placed_like(a, t).astype(dtype))
                average = self._averages[name]
            if _graph.accumulator_dtype(_ir.dtype_name(now)) != _ir.dtype_name(average):
                _logger.debug("ModelEMA casts the average of %s to %s", name, _ir.dtype_name(now))
                self._start_average(name, lambda _, dtype, a=average: a.astype(dtype))
            elif changed:  # (a cast may have made a value infinite: -1e9 in float16)
                self._look_for_non_finite(name)
        gained = self._gained_tensors(held)
        for name, tensor in gained.items():
            unsupported = _ir.dist_unsupported(name, tensor) or self._cannot_offload(name, tensor)
            if unsupported:
                raise RuntimeError(unsupported)
        if gained:
            _logger.warning(
                "ModelEMA averages %s, new in the model, from now on, as if it had always held its "
                "current value", _select.some_names(list(gained)),
            )
        for name, tensor in gained.items():
            self._tensors[name] = tensor
            self._start_average(name, self._as_if_always_held)
        self._pair_for_updates()
        return True

    def _follow_slices(self) -> None:
        """Average the pieces of the parameters as they are now: under stage 3 the slices the
        model holds (Paddle wraps each in a new object after every step, and a forward gives it
        new memory); under split_param, views of the optimizer's buffers (new ones where a buffer
        got new memory).

        Raises:
            RuntimeError: a parameter is held whole under stage 3, or a buffer was released (see
                ``_sharding.Stage3.local``, ``_sharding.SplitParams.local``); nothing is changed then.
        """
        now = self._slices.local(self._sliced, self._tensors)
        moved = [n for n in self._sliced if now[n] is not self._tensors[n]]
        if moved:
            self._tensors.update((n, now[n]) for n in moved)
            for group in self._groups:
                group.follow(self._tensors[n] for n in group.names)
            self._plan_updates()

    def _as_if_always_held(self, tensor: Any, dtype: str) -> Any:
        """The average ``tensor`` would have if it had always held its value: ``c * tensor``, which
        the shared bias correction ``c`` turns back into ``tensor`` (zero before the first update)."""
        if self._bias_correction == 0.0:
            return paddle.zeros_like(tensor, dtype=dtype)
        return tensor.astype(dtype) * paddle.full([], self._bias_correction, dtype)

    def _gained_tensors(self, held: dict[str, Any]) -> dict[str, Any]:
        """The floating-point tensors the model holds now under a name this EMA does not average,
        that it would have chosen at construction: none if ``parameters`` named them, else those no
        ``exclude`` entry matches. A tensor already averaged under another name is not new."""
        if self._chosen_by_name:
            return {}
        averaged = {id(t) for t in self._tensors.values()}
        averaged.update(id(held[n]) for n in self._elsewhere if n in held)
        gained = {}
        frozen = set() if self._frozen == "average" else _frozen_names(self._layer)
        for name, tensor in held.items():
            if (name in self._tensors or name in self._owners or id(tensor) in averaged
                    or not paddle.is_floating_point(tensor)):
                continue
            if name in frozen:  # frozen="copy"/"exclude": held back, as at construction
                if self._frozen == "copy" and name not in self._copied:
                    self._copied.append(name)
                continue
            if not _select.matches_any(name, self._exclude):
                averaged.add(id(tensor))
                gained[name] = tensor
        return gained

    def _corrected(self) -> dict[str, Any]:
        """Each name with its bias-corrected average in its tensor's dtype (the weights before the
        first update), in new tensors: a few kernels for the grouped averages."""
        first = self._bias_correction == 0.0
        values = {}
        reciprocals = {
            dtype: paddle.full([1], schedule.debias_factor(self._bias_correction, dtype), dtype)
            for dtype in self._weights
        } if not first else {}
        if not first:
            for group in self._groups:
                values.update(group.scaled(reciprocals[group.dtype], group.tensors[0].place))
        for name, tensor in self._tensors.items():
            if name in values:
                continue
            # (before the first update, the weights; a rank's empty piece under split_param: no kernel)
            if first or _ir.is_empty(self._averages[name]):
                values[name] = _ir.eager_copy(tensor)
                continue
            average = self._averages[name]
            value = _ir.moved_to(paddle.scale(average, reciprocals[_ir.dtype_name(average)]), tensor.place)
            value = _ir.placed_like(value, tensor)  # (3.3 replicates an unevenly sharded tensor's scale)
            values[name] = value if value.dtype == tensor.dtype else value.astype(tensor.dtype)
        return {name: values[name] for name in self._tensors}


def _check_still_averageable(
    name: str, kind: str, now: Any, dtype: str, shape: Sequence[int], params: dict[str, Any],
    buffers: dict[str, Any],
) -> None:
    """Raise a RuntimeError unless ``now``, what the model holds under averaged name ``name`` (a
    ``kind`` of ``dtype`` when last seen), can go on being averaged there: present, of the same kind,
    floating-point, of the averaged ``shape``."""
    if now is None:
        if name in (buffers if kind == "parameter" else params):
            what = (f"is now a {'buffer' if kind == 'parameter' else 'parameter'}, no longer a {kind} "
                    "(paddle.nn.utils.weight_norm or spectral_norm applied after the ModelEMA was "
                    "built?)")
        else:
            what = "is gone (removed, or tied to another of the model's tensors, which is named once)"
        raise RuntimeError(
            f"the model's {name!r} {what}; build a new ModelEMA for the changed model (after "
            "wrapping or changing its layers)"
        )
    if not paddle.is_floating_point(now) or list(now.shape) != list(shape):
        raise RuntimeError(
            f"the model's {name!r} now holds a {_ir.dtype_name(now)}{list(now.shape)} tensor, not the "
            f"{dtype}{list(shape)} one this ModelEMA averages (a floating-point tensor of that "
            "shape); build a new ModelEMA for the changed model"
        )
    unsupported = _ir.dist_unsupported(name, now)
    if unsupported:
        raise RuntimeError(unsupported)


def _check_average(name: str, value: Any, average: Any) -> None:
    """Raise a ValueError unless ``value`` can be the average of ``name``: a floating-point paddle
    Tensor or numpy array of ``average``'s shape, a DistTensor only if ``average`` is one."""
    if _ir.is_dist(value) and not _ir.is_dist(average):
        raise ValueError(
            f"the average of {name!r} is an auto-parallel DistTensor ({value.placements}), the "
            "model's tensor is not: in the auto-parallel run, save ema.consolidated_state_dict() "
            "(whole averages, which any ModelEMA of the model loads), or load this state into a "
            "ModelEMA over the model sharded as it was"
        )
    if isinstance(value, paddle.Tensor):
        floating, dtype = paddle.is_floating_point(value), _ir.dtype_name(value)
    elif isinstance(value, np.ndarray):
        floating, dtype = value.dtype in (np.float16, np.float32, np.float64), str(value.dtype)
    else:
        raise ValueError(
            f"the average of {name!r} must be a paddle Tensor or numpy array, got {type(value).__name__}; "
            "pass what ModelEMA.state_dict() returned"
        )
    if not floating:
        raise ValueError(
            f"the average of {name!r} must hold floating-point numbers (float16/32/64, bfloat16), got {dtype}"
        )
    if list(value.shape) != list(average.shape):
        raise ValueError(f"the average of {name!r} has shape {list(value.shape)}, the model's "
                         f"{list(average.shape)}")


def _counts(state: dict[str, Any], plan: schedule.Schedule, init: str) -> tuple[int, int, float]:
    """``num_updates``, ``update_calls`` and ``bias_correction`` of a state dict, checked."""
    updates, calls, bias_correction = state["num_updates"], state["update_calls"], state["bias_correction"]
    for key, value in (("num_updates", updates), ("update_calls", calls)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise ValueError(
                f"the state's {key} must be an int, got {short_repr(value)} of type "
                f"{type(value).__name__}; pass what ModelEMA.state_dict() returned"
            )
    if isinstance(bias_correction, (bool, np.bool_)) or not isinstance(bias_correction, numbers.Real):
        raise ValueError(
            f"the state's bias_correction must be a float, got {short_repr(bias_correction)} of type "
            f"{type(bias_correction).__name__}; pass what ModelEMA.state_dict() returned"
        )
    updates, calls, bias_correction = int(updates), int(calls), float(bias_correction)
    if not 0 <= updates <= calls < 2**63:
        raise ValueError(
            f"the state's counts do not fit together (num_updates {updates}, update_calls {calls}: "
            "0 <= num_updates <= update_calls < 2**63); pass what ModelEMA.state_dict() returned"
        )
    if init == "weights":  # the average started at the weights: no correction, ever
        problem = None if bias_correction == 1.0 else f"{bias_correction!r} (with init='weights' it is 1)"
    else:
        problem = schedule.bias_correction_problem(updates, bias_correction, plan)
    if problem is not None:
        raise ValueError(
            f"the state's bias_correction is {problem}; pass what ModelEMA.state_dict() returned, from "
            "a ModelEMA with the same decay"
        )
    return updates, calls, bias_correction
