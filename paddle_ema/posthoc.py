"""Choose the EMA after training: power-function EMAs, their snapshots and post-hoc synthesis (EDM2).

:class:`PowerEMA` is a :class:`~paddle_ema.ModelEMA` whose decay follows the power-function profile
of relative width ``sigma_rel`` (see :mod:`paddle_ema.power`). :class:`PostHocEMA` tracks a few of
them and writes snapshots during training; afterwards :func:`synthesize` combines the snapshots into
the EMA of any width at any snapshot step, without training again.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import uuid
from typing import Any, Sequence

import numpy as np
import paddle

from paddle_ema import _apply, _ir, _snapshots, power
from paddle_ema._select import short_repr
from paddle_ema.dygraph import ModelEMA

__all__ = ["PostHocEMA", "PowerEMA", "snapshots", "synthesize"]

_logger = logging.getLogger(__name__)

_SNAPSHOT_DTYPES = ("float32", "float64")


def _exponent(sigma_rel: Any, gamma: Any) -> float:
    """The exponent from exactly one of ``sigma_rel`` and ``gamma``."""
    if gamma is None:
        if sigma_rel is None:
            raise ValueError("pass sigma_rel (e.g. 0.05) or gamma (e.g. 16.97)")
        return power.sigma_rel_to_gamma(sigma_rel)
    if sigma_rel is not None and not (isinstance(sigma_rel, numbers.Real) and sigma_rel == 0.05):
        raise ValueError(
            f"pass sigma_rel or gamma, not both (got sigma_rel={short_repr(sigma_rel)}, "
            f"gamma={short_repr(gamma)}); leave sigma_rel at its default (or None) when giving gamma"
        )
    power.gamma_to_sigma_rel(gamma)  # checks the range
    return float(gamma)


class PowerEMA(ModelEMA):
    """The power-function EMA of a dygraph model (EDM2), with ModelEMA's guarantees and API.

    At training step :math:`t` (the count of :meth:`update` calls, from 1), an averaging update that
    covers the :math:`\\Delta` steps since the previous one moves every average with decay
    :math:`\\beta = (1 - \\Delta / t)^{\\gamma + 1}`; the first copies the weights. The average is a
    weighted mean of all the weights seen so far with weights :math:`\\propto \\tau^\\gamma`: its
    length grows with training while its relative width ``sigma_rel`` stays fixed. With
    ``update_every=k`` every k-th call averages with :math:`\\Delta = k`: the same profile, sampled
    every k steps, not the per-step formula applied to every k-th step.

    Everything else is :class:`~paddle_ema.ModelEMA`'s: float32 averages for float16/bfloat16
    models, ``with ema.apply():`` and a bit-exact restore, ``state_dict``/``set_state_dict``, the
    model followed as it changes. (No bias correction is needed: the first update copies.)

    Args:
        model: The ``paddle.nn.Layer`` to average.
        sigma_rel: The relative width, in (0, 0.2887); EDM2 tracks 0.05 and 0.10.
        gamma: The exponent instead of ``sigma_rel`` (then leave ``sigma_rel`` at its default).
        update_every: Average on every ``update_every``-th call only.
        parameters: As in :class:`~paddle_ema.ModelEMA`.
        exclude: As in :class:`~paddle_ema.ModelEMA`.
        buffers: As in :class:`~paddle_ema.ModelEMA`.
        sharding: As in :class:`~paddle_ema.ModelEMA`: under Paddle's dygraph sharding stage 1/2,
            each rank averages only what its optimizer partition updates.
        offload: As in :class:`~paddle_ema.ModelEMA`: keep the averages in host memory.
        master_weights: As in :class:`~paddle_ema.ModelEMA`: the optimizer whose float32 master
            weights of float16/bfloat16 parameters are averaged in their place.

    Raises:
        TypeError: an option has the wrong type.
        ValueError: ``sigma_rel``/``gamma`` out of range or both given, or an option as in
            :class:`~paddle_ema.ModelEMA`.

    Example:
        .. code-block:: python

            import paddle
            import paddle_ema

            model = paddle.nn.Linear(4, 1)
            opt = paddle.optimizer.SGD(learning_rate=0.1, parameters=model.parameters())
            ema = paddle_ema.PowerEMA(model, sigma_rel=0.10)
            for _ in range(20):
                loss = model(paddle.randn([8, 4])).square().mean()
                loss.backward()
                opt.step()
                opt.clear_grad()
                ema.update()
            with ema.apply():
                print(model(paddle.ones([1, 4])))
    """

    def __init__(
        self,
        model: paddle.nn.Layer,
        sigma_rel: float | None = 0.05,
        *,
        gamma: float | None = None,
        update_every: int = 1,
        parameters: Sequence[Any] | None = None,
        exclude: Sequence[str] | None = None,
        buffers: bool = True,
        sharding: Any = None,
        offload: bool = False,
        master_weights: Any = None,
    ) -> None:
        self._gamma = _exponent(sigma_rel, gamma)
        # decay 0 bounds the schedule's weights at 1, so set_state_dict accepts a bias correction of
        # exactly 1 after the first update (the first power-function update copies) and 0 before.
        super().__init__(model, 0.0, update_every=update_every, parameters=parameters, exclude=exclude,
                         buffers=buffers, sharding=sharding, offload=offload, master_weights=master_weights)

    @property
    def gamma(self) -> float:
        """The power-function exponent :math:`\\gamma`."""
        return self._gamma

    @property
    def sigma_rel(self) -> float:
        """The relative width of the averaging profile."""
        return power.gamma_to_sigma_rel(self._gamma)

    @property
    def decay(self) -> float:
        """The decay :math:`\\beta` of the most recent averaging update (0.0 before the first)."""
        return self.current_decay or 0.0

    @property
    def step(self) -> int:
        """The training step the averages stand at: the number of :meth:`update` calls."""
        return self._calls

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`ModelEMA.state_dict`, with the exponent ``gamma`` and the call that last averaged
        (the next update's :math:`\\Delta` counts from it, whatever ``update_every`` the run resumes
        with)."""
        state = super().state_dict()
        state["gamma"] = self._gamma
        state["last_update_call"] = self._last_update_call
        return state

    def set_state_dict(self, state: dict[str, Any]) -> None:
        """As :meth:`ModelEMA.set_state_dict`; the state's ``gamma`` must be this EMA's.

        Raises:
            ValueError: as :meth:`ModelEMA.set_state_dict`, or the state has no ``gamma`` (not a
                PowerEMA's) or another one. Nothing is changed then.
        """
        if not isinstance(state, dict) or "gamma" not in state:
            raise ValueError("the state has no 'gamma': pass what PowerEMA.state_dict() returned")
        saved = state["gamma"]
        if isinstance(saved, bool) or not isinstance(saved, numbers.Real) or not math.isclose(
                float(saved), self._gamma, rel_tol=1e-12):
            raise ValueError(
                f"the state is of a PowerEMA with gamma {short_repr(saved)}, this one's is "
                f"{self._gamma!r}; build the PowerEMA with the sigma_rel (or gamma) of the run that saved it"
            )
        last = state.get("last_update_call")
        calls, updates = state.get("update_calls"), state.get("num_updates")
        counted = isinstance(calls, numbers.Integral) and not isinstance(last, bool)
        if (not counted or not isinstance(last, numbers.Integral) or not 0 <= last <= calls
                or (last == 0) != (updates == 0)):
            raise ValueError(
                f"the state's last_update_call must be an int in [1, update_calls] after an update (0 "
                f"before), got {short_repr(last)}; pass what PowerEMA.state_dict() returned"
            )
        super().set_state_dict(state)
        self._last_update_call = int(last)

    def _next_weight(self, call: int) -> float:
        # The update covers the calls since the last one that averaged: update_every of them, or
        # other than that after a resume with another update_every.
        return float(np.float32(power.step_weight(self._gamma, call, call - self._last_update_call)))


class PostHocEMA:
    """Power-function EMAs of a few widths and their snapshots, to choose the EMA after training.

    Tracks one :class:`PowerEMA` per ``sigma_rels`` entry and, every ``snapshot_every`` training
    steps (calls of :meth:`update`), writes each one's averages to ``snapshot_dir``
    (``phema-<sigma_rel>-<step>.pdparams``, each written whole or not at all) and lists them in the
    run's manifest ``phema-run.json``. After (or during) training, :meth:`synthesize`,
    :meth:`apply` or :func:`synthesize` combine the snapshots into the EMA of any ``sigma_rel`` at
    any snapshot step, by EDM2's least-squares fit of the power-function profiles. Widths far outside
    the tracked ones extrapolate (large coefficients of both signs): a synthesized value that no
    snapshot could have (a negative batch-norm variance) is logged as a warning.

    In a multi-process run, one process writes: the process of rank 0 (under ``sharding``, rank 0
    of the sharding group, which writes the averages gathered from every rank; the others return
    once it has written). Every process tracks the EMAs, and every one can synthesize from the
    directory once the snapshots are written (a filesystem all of them read). Without ``sharding``
    there is no communication: a process other than rank 0 reading the directory during training
    reads what rank 0 has written so far.

    A snapshot directory belongs to one run: :meth:`update` refuses to write into a directory that
    holds another run's snapshots (start in an empty one, or :meth:`set_state_dict` that run's state
    to resume it). A resumed run moves the snapshots the replaced run took after the resumed step into
    ``snapshot_dir/replaced/``. If writing a snapshot fails (a full disk), :meth:`update` raises and
    keeps it, and the next :meth:`update` writes it before anything else.

    Args:
        model: The ``paddle.nn.Layer`` to average.
        sigma_rels: The widths to track, each in (0, 0.2887), at least 10% apart; EDM2's are
            (0.05, 0.10).
        snapshot_dir: Where snapshots go (created if missing).
        snapshot_every: Training steps between snapshots; a multiple of ``update_every``.
        update_every: Average on every ``update_every``-th call only.
        parameters: As in :class:`~paddle_ema.ModelEMA`.
        exclude: As in :class:`~paddle_ema.ModelEMA`.
        buffers: As in :class:`~paddle_ema.ModelEMA`.
        snapshot_dtype: ``"float32"`` (default) or ``"float64"``.
        sharding: As in :class:`~paddle_ema.ModelEMA`: under Paddle's dygraph sharding stage 1/2,
            each rank averages only what its optimizer partition updates; every snapshot gathers
            the averages (every rank calls :meth:`update`). Under stage 3 pass the wrapped model
            and no ``sharding``: each rank averages its slices, and snapshots gather them.
        offload: As in :class:`~paddle_ema.ModelEMA`: keep every tracked EMA's averages in host
            memory (a PostHocEMA keeps one copy of the model per width).
        master_weights: As in :class:`~paddle_ema.ModelEMA`.

    Raises:
        TypeError, ValueError: an argument is of the wrong type or out of range (named).

    Example:
        .. code-block:: python

            import tempfile

            import paddle
            import paddle_ema

            model = paddle.nn.Linear(4, 1)
            opt = paddle.optimizer.SGD(learning_rate=0.1, parameters=model.parameters())
            ema = paddle_ema.PostHocEMA(model, snapshot_dir=tempfile.mkdtemp(), snapshot_every=10)
            for _ in range(100):
                loss = model(paddle.randn([8, 4])).square().mean()
                loss.backward()
                opt.step()
                opt.clear_grad()
                ema.update()
            with ema.apply(sigma_rel=0.15):  # an EMA that was never tracked
                print(model(paddle.ones([1, 4])))
    """

    def __init__(
        self,
        model: paddle.nn.Layer,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        *,
        snapshot_dir: str | os.PathLike,
        snapshot_every: int,
        update_every: int = 1,
        parameters: Sequence[Any] | None = None,
        exclude: Sequence[str] | None = None,
        buffers: bool = True,
        snapshot_dtype: str = "float32",
        sharding: Any = None,
        offload: bool = False,
        master_weights: Any = None,
    ) -> None:
        if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence) or not sigma_rels:
            raise TypeError(
                f"sigma_rels must be a non-empty sequence of floats, e.g. (0.05, 0.10); got "
                f"{short_repr(sigma_rels)}"
            )
        gammas = [power.sigma_rel_to_gamma(s) for s in sigma_rels]
        _snapshots.check_distinct([float(s) for s in sigma_rels])
        for argument, value in (("snapshot_every", snapshot_every), ("update_every", update_every)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{argument} must be an int, got {short_repr(value)}")
            if value < 1:
                raise ValueError(f"{argument} must be at least 1, got {value!r}")
        if snapshot_every % update_every:
            raise ValueError(
                f"snapshot_every ({snapshot_every}) must be a multiple of update_every ({update_every}), "
                "so every snapshot is taken right after an averaging update"
            )
        if snapshot_dtype not in _SNAPSHOT_DTYPES:
            raise ValueError(
                f"snapshot_dtype must be 'float32' or 'float64', got {short_repr(snapshot_dtype)}"
            )
        if not isinstance(snapshot_dir, (str, os.PathLike)):
            raise TypeError(f"snapshot_dir must be a path, got {short_repr(snapshot_dir)}")
        if os.path.exists(snapshot_dir) and not os.path.isdir(snapshot_dir):
            raise ValueError(f"snapshot_dir {os.fspath(snapshot_dir)!r} is a file; pass a directory")
        self._emas = [
            PowerEMA(model, gamma=g, update_every=update_every, parameters=parameters, exclude=exclude,
                     buffers=buffers, sigma_rel=None, sharding=sharding, offload=offload,
                     master_weights=master_weights)
            for g in gammas
        ]
        layout = self._emas[0]._layout
        # One writer: every process writing its own run into one directory would mix the runs.
        self._writes = (layout.rank if layout is not None else paddle.distributed.get_rank()) == 0
        found = None
        if self._writes and os.path.isdir(snapshot_dir):
            found = _snapshots.Manifest.read(os.fspath(snapshot_dir))
        self._sigma_rels = [float(s) for s in sigma_rels]
        self._dir = os.fspath(snapshot_dir)
        self._every = snapshot_every
        self._dtype = snapshot_dtype
        self._manifest = _snapshots.Manifest(uuid.uuid4().hex)
        # Another run's manifest: update() refuses to write here unless set_state_dict resumes it.
        self._foreign = found
        self._unwritten: list[tuple[float, PowerEMA, int, dict[str, np.ndarray]]] = []
        os.makedirs(self._dir, exist_ok=True)

    @property
    def emas(self) -> list[PowerEMA]:
        """The tracked PowerEMAs, one per ``sigma_rels`` entry."""
        return list(self._emas)

    @property
    def step(self) -> int:
        """The training step: the number of :meth:`update` calls."""
        return self._emas[0].step

    @property
    def snapshot_dir(self) -> str:
        """Where the snapshots are written."""
        return self._dir

    def update(self) -> None:
        """Update every tracked EMA (call it after ``optimizer.step()``); every ``snapshot_every``-th
        call, write their snapshots.

        Raises:
            ValueError: ``snapshot_dir`` holds another run's snapshots (nothing changed).
            RuntimeError: as :meth:`ModelEMA.update` (averages applied, the model changed); the
                tracked EMAs are at different steps (an earlier update was interrupted between them:
                :meth:`set_state_dict` a saved state); or a snapshot could not be written (it is kept
                and written by the next call).
        """
        if self._foreign is not None:  # (only ever found by the writer)
            raise ValueError(
                f"snapshot_dir {self._dir!r} holds the snapshots of another run "
                f"({len(self._foreign.entries)} listed in its phema-run.json); start this run in an empty "
                "directory, or set_state_dict() that run's state to resume it"
            )
        self._write_unwritten()
        steps = {ema.step for ema in self._emas}
        if len(steps) > 1:
            raise RuntimeError(
                f"the tracked EMAs are at different steps {sorted(steps)} (an update() was interrupted "
                "between them); set_state_dict() a saved state"
            )
        for ema in self._emas:
            ema.update()
        if self.step % self._every == 0:
            self._take_snapshots()

    def synthesize(self, sigma_rel: float, step: int | None = None) -> dict[str, paddle.Tensor]:
        """The EMA of width ``sigma_rel`` at snapshot step ``step`` (default: this run's latest
        snapshot), from this run's snapshots. See :func:`synthesize`."""
        return _as_tensors(*_snapshots.combine(self._dir, self._written(), sigma_rel, step))

    def _written(self) -> _snapshots.Manifest:
        """The manifest of this run's snapshots: this process's, if it writes them; else the one
        in the directory (the writing process's)."""
        return self._manifest if self._writes else _read_run(self._dir)

    def apply(self, sigma_rel: float, step: int | None = None, need_restore: bool = True) -> _apply.Restorer:
        """Swap the synthesized EMA of width ``sigma_rel`` at snapshot ``step`` into the model; leaving
        the ``with`` block restores the trained weights bit-exactly (as :meth:`ModelEMA.apply`).
        Tensors the model gained after ``step`` keep their current value (logged).

        Raises:
            ValueError: as :func:`synthesize`, or the snapshots hold a tensor at another shape than
                the model's.
            RuntimeError: averages are already applied, or the model changed so that it can no
                longer be averaged (nothing is changed).
        """
        need_restore = _apply.check_need_restore(need_restore)
        if _apply.applied(self) is not None:
            raise RuntimeError("a synthesized EMA is already applied; call restore() before applying again")
        for ema in self._emas:
            ema._follow_model()
        first = self._emas[0]
        tensors = first._averaged_tensors()
        totals, _ = _snapshots.combine(self._dir, self._written(), sigma_rel, step)
        for name, total in totals.items():
            if name in tensors and list(total.shape) != first._whole_shape(name, tensors[name]):
                raise ValueError(
                    f"the snapshots hold {name!r} as {list(total.shape)}, the model as "
                    f"{first._whole_shape(name, tensors[name])}; synthesize at a step after the change"
                )
        kept = sorted(set(tensors) - set(totals))
        if kept:
            _logger.info("PostHocEMA.apply(): %s are not in the snapshots of that step and keep their "
                         "current value", kept[:5])
        swapped = {name: tensor for name, tensor in tensors.items() if name in totals}

        def prepare() -> _apply.EagerSwap:
            with paddle.no_grad():
                results = {
                    name: _ir.placed_like(first._local_part(name, paddle.to_tensor(
                        totals[name], place=tensor.place)).astype(tensor.dtype), tensor)
                    for name, tensor in swapped.items()
                }
                return first._swap(f"PostHocEMA of {type(first._layer).__name__}", swapped, results)

        return _apply.apply(self, prepare, self.restore, need_restore)

    def restore(self) -> None:
        """Put back the weights :meth:`apply` set aside (a no-op, logged, if nothing is applied)."""
        if not _apply.restore(self):
            _logger.warning("restore() called with no applied averages; weights left unchanged")

    def state_dict(self) -> dict[str, Any]:
        """The tracked EMAs' states, the run's id and the snapshot options, for ``paddle.save``."""
        return {
            "run": self._manifest.run,
            "sigma_rels": list(self._sigma_rels),
            "snapshot_every": self._every,
            "emas": [ema.state_dict() for ema in self._emas],
        }

    def set_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the run of ``state``: its EMAs, and its snapshots in ``snapshot_dir`` up to the
        state's step (later ones, of the run being replaced, move to ``snapshot_dir/replaced/``).

        Raises:
            ValueError: the state is not a PostHocEMA's with these ``sigma_rels`` and
                ``snapshot_every``, an EMA's state does not fit, or ``snapshot_dir`` holds another
                run's snapshots. Nothing is changed then.
        """
        keys = {"run", "sigma_rels", "snapshot_every", "emas"}
        if not isinstance(state, dict) or not keys <= state.keys():
            raise ValueError(f"the state must be what PostHocEMA.state_dict() returned (keys {sorted(keys)})")
        run, sigma_rels, emas = state["run"], state["sigma_rels"], state["emas"]
        if not isinstance(run, str) or not isinstance(emas, (list, tuple)) or len(emas) != len(self._emas):
            raise ValueError(f"the state's run or emas do not fit {len(self._emas)} tracked widths")
        if (not isinstance(sigma_rels, (list, tuple)) or len(sigma_rels) != len(self._sigma_rels)
                or not all(isinstance(s, numbers.Real) and math.isclose(s, t, rel_tol=1e-9)
                           for s, t in zip(sigma_rels, self._sigma_rels))):
            raise ValueError(
                f"the state tracks sigma_rels {short_repr(sigma_rels)}, this one {self._sigma_rels}"
            )
        if state["snapshot_every"] != self._every:
            raise ValueError(
                f"the state took snapshots every {short_repr(state['snapshot_every'])} steps, this one "
                f"{self._every}"
            )
        found = None
        if self._writes:  # (the directory is the writing process's to check and change)
            found = self._foreign if self._foreign is not None else _snapshots.Manifest.read(self._dir)
        if found is not None and found.run != run:
            raise ValueError(
                f"snapshot_dir {self._dir!r} holds the snapshots of another run than the state's; pass the "
                "directory the state's run wrote"
            )
        # Every EMA's state, checked and set, or none (an EMA that failed half-way has no state to
        # put back, and stays failed).
        saved = [None if ema._failed else ema.state_dict() for ema in self._emas]
        try:
            for ema, ema_state in zip(self._emas, emas):
                ema.set_state_dict(ema_state)
            if len({ema.step for ema in self._emas}) > 1:
                raise ValueError(
                    "the state's EMAs are at different steps; pass what PostHocEMA.state_dict() returned"
                )
        except BaseException:
            for ema, ema_state in zip(self._emas, saved):
                if ema_state is not None:
                    ema.set_state_dict(ema_state)
            raise
        manifest = found or _snapshots.Manifest(run)
        moved = _snapshots.replace_later_than(self._dir, manifest, self.step) if self._writes else []
        if moved:
            _logger.info("%d snapshots after step %d, of the run being replaced, moved to %s", len(moved),
                         self.step, os.path.join(self._dir, "replaced"))
        self._manifest, self._foreign, self._unwritten = manifest, None, []

    def _take_snapshots(self) -> None:
        """Copy every EMA's averages now and write them (see :meth:`_write_unwritten`); under
        ``sharding``, gather them first, and return once the writer has written them (collective)."""
        for sigma_rel, ema in zip(self._sigma_rels, self._emas):
            with paddle.no_grad():
                kept = ema._whole(ema._kept_for_gather, stored=True)
                # (an auto-parallel DistTensor's whole value: collective over its mesh)
                kept = {n: _ir.made_whole(a) if _ir.is_dist(a) else a for n, a in kept.items()}
                if self._writes:
                    averages = {name: a.astype(self._dtype).numpy() for name, a in kept.items()}
                    self._unwritten.append((sigma_rel, ema, ema.step, averages))
        layout = self._emas[0]._layout
        failure = None
        try:
            self._write_unwritten()
        except Exception as error:  # (told to the other ranks, then raised here)
            failure = error
        if layout is not None:  # every rank returns once the snapshots are written
            layout.agree((), failure, "writing the PostHocEMA's snapshots (kept; the next update() "
                            "writes them)")
        elif failure is not None:
            raise failure

    def _write_unwritten(self) -> None:
        """Write the snapshots taken but not yet written, then list them in the manifest.

        Raises:
            RuntimeError: a write failed; the snapshot stays in memory for the next call.
        """
        while self._unwritten:
            sigma_rel, ema, step, averages = self._unwritten[0]
            name = _snapshots.write_snapshot(self._dir, self._manifest.run, sigma_rel, ema.gamma, step,
                                             averages)
            layout = self._manifest.layout_of({n: list(v.shape) for n, v in averages.items()})
            entry = _snapshots.Entry(name, step, sigma_rel, ema.gamma, layout)
            self._manifest.entries = [e for e in self._manifest.entries if e.file != name] + [entry]
            self._manifest.write(self._dir)
            self._unwritten.pop(0)


def snapshots(snapshot_dir: str | os.PathLike) -> list[tuple[float, int, str]]:
    """The snapshots of the run in ``snapshot_dir`` as ``(sigma_rel, step, path)``, by step then width.

    Raises:
        FileNotFoundError: the directory holds no PostHocEMA run.
        ValueError: its manifest is not readable.
    """
    manifest = _read_run(snapshot_dir)
    folder = os.fspath(snapshot_dir)
    found = [(e.sigma_rel, e.step, os.path.join(folder, e.file)) for e in manifest.entries]
    return sorted(found, key=lambda s: (s[1], s[0]))


def synthesize(
    snapshot_dir: str | os.PathLike, sigma_rel: float, step: int | None = None,
) -> dict[str, paddle.Tensor]:
    """The EMA of width ``sigma_rel`` at snapshot step ``step``, from a run's snapshots.

    Uses every snapshot of the run taken at a step in ``(0, step]``; the coefficients come from
    :func:`paddle_ema.power.posthoc_coefficients` (float64, summing to 1) and the snapshots are
    combined in float64, then rounded to the snapshots' dtype. A tensor the model gained during the
    run is combined from the snapshots that hold it.

    Args:
        snapshot_dir: The ``snapshot_dir`` of a :class:`PostHocEMA`.
        sigma_rel: The width to synthesize, in (0, 0.2887).
        step: A snapshot step to synthesize at (default: the last).

    Returns:
        ``{name: Tensor}`` on the CPU, in the snapshots' dtype (float32 unless the run wrote
        float64).

    Raises:
        FileNotFoundError: ``snapshot_dir`` holds no PostHocEMA run (no ``phema-run.json``).
        TypeError: ``step`` is not an int.
        ValueError: ``sigma_rel`` out of range, ``step`` not a snapshot step, or a snapshot that does
            not match the run's manifest (a hand-edited or foreign file; named).
    """
    return _as_tensors(*_snapshots.combine(os.fspath(snapshot_dir), _read_run(snapshot_dir), sigma_rel, step))


def _as_tensors(totals: dict[str, np.ndarray], dtype: str) -> dict[str, paddle.Tensor]:
    """Combined float64 arrays as CPU tensors of the snapshots' dtype."""
    return {name: paddle.to_tensor(total.astype(dtype)) for name, total in totals.items()}


def _read_run(snapshot_dir: str | os.PathLike) -> _snapshots.Manifest:
    folder = os.fspath(snapshot_dir)
    manifest = _snapshots.Manifest.read(folder) if os.path.isdir(folder) else None
    if manifest is None:
        raise FileNotFoundError(
            f"{folder!r} holds no PostHocEMA run (no {_snapshots.MANIFEST}); pass a PostHocEMA's snapshot_dir"
        )
    return manifest
