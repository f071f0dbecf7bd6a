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
import re
from typing import Any, Sequence

import numpy as np
import paddle

from paddle_ema import _apply, power
from paddle_ema._select import short_repr
from paddle_ema.dygraph import ModelEMA

__all__ = ["PostHocEMA", "PowerEMA", "snapshots", "synthesize"]

_logger = logging.getLogger(__name__)

# A snapshot file: phema-<sigma_rel to 6 decimals>-<step, 10 digits>.pdparams
_SNAPSHOT = re.compile(r"phema-(\d+\.\d{6})-(\d{10})\.pdparams")
_FORMAT = "paddle_ema.posthoc/1"
_SNAPSHOT_DTYPES = ("float32", "float64")


def _snapshot_name(sigma_rel: float, step: int) -> str:
    return f"phema-{sigma_rel:.6f}-{step:010d}.pdparams"


def _exponent(sigma_rel: Any, gamma: Any) -> float:
    """The exponent from exactly one of ``sigma_rel`` and ``gamma``."""
    if gamma is None:
        if sigma_rel is None:
            raise ValueError("pass sigma_rel (e.g. 0.05) or gamma (e.g. 16.97)")
        return power.sigma_rel_to_gamma(sigma_rel)
    if sigma_rel is not None and sigma_rel != 0.05:
        raise ValueError(
            f"pass sigma_rel or gamma, not both (got sigma_rel={sigma_rel!r}, gamma={gamma!r}); "
            "leave sigma_rel at its default (or None) when giving gamma"
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
    ) -> None:
        self._gamma = _exponent(sigma_rel, gamma)
        # decay 0 bounds the schedule's weights at 1, so set_state_dict accepts a bias correction of
        # exactly 1 after the first update (the first power-function update copies) and 0 before.
        super().__init__(model, 0.0, update_every=update_every, parameters=parameters, exclude=exclude,
                         buffers=buffers)

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
        """As :meth:`ModelEMA.state_dict`, with the exponent ``gamma``."""
        state = super().state_dict()
        state["gamma"] = self._gamma
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
                f"the state is of a PowerEMA with gamma {saved!r}, this one's is {self._gamma!r}; build "
                "the PowerEMA with the sigma_rel (or gamma) of the run that saved it"
            )
        super().set_state_dict(state)

    def _next_weight(self) -> float:
        return float(np.float32(power.step_weight(self._gamma, self._calls, self._update_every)))


class PostHocEMA:
    """Power-function EMAs of a few widths and their snapshots, to choose the EMA after training.

    Tracks one :class:`PowerEMA` per ``sigma_rels`` entry and, every ``snapshot_every`` training
    steps (calls of :meth:`update`), writes each one's averages to ``snapshot_dir`` (one file per width
    and step, ``phema-<sigma_rel>-<step>.pdparams``, written whole or not at all). After (or during)
    training, :meth:`synthesize` or :func:`synthesize` combine the snapshots into the EMA of any
    ``sigma_rel`` at any snapshot step, by EDM2's least-squares fit of the power-function profiles.

    Args:
        model: The ``paddle.nn.Layer`` to average.
        sigma_rels: The widths to track, distinct, each in (0, 0.2887); EDM2's are (0.05, 0.10).
        snapshot_dir: Where snapshots go (created if missing).
        snapshot_every: Training steps between snapshots; a multiple of ``update_every``.
        update_every: Average on every ``update_every``-th call only.
        parameters: As in :class:`~paddle_ema.ModelEMA`.
        exclude: As in :class:`~paddle_ema.ModelEMA`.
        buffers: As in :class:`~paddle_ema.ModelEMA`.
        snapshot_dtype: ``"float32"`` (default) or ``"float64"``.

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
    ) -> None:
        if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence) or not sigma_rels:
            raise TypeError(
                f"sigma_rels must be a non-empty sequence of floats, e.g. (0.05, 0.10); got "
                f"{short_repr(sigma_rels)}"
            )
        gammas = [power.sigma_rel_to_gamma(s) for s in sigma_rels]
        if len(set(round(float(s), 6) for s in sigma_rels)) != len(sigma_rels):
            raise ValueError(f"sigma_rels must be distinct (to 6 decimals), got {list(sigma_rels)}")
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
                     buffers=buffers, sigma_rel=None)
            for g in gammas
        ]
        self._sigma_rels = [float(s) for s in sigma_rels]
        self._dir = os.fspath(snapshot_dir)
        self._every = snapshot_every
        self._dtype = snapshot_dtype
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
            RuntimeError: as :meth:`ModelEMA.update` (averages applied, the model changed).
        """
        for ema in self._emas:
            ema.update()
        if self.step % self._every == 0:
            self._write_snapshots()

    def synthesize(self, sigma_rel: float, step: int | None = None) -> dict[str, paddle.Tensor]:
        """The EMA of width ``sigma_rel`` at snapshot step ``step`` (default: the latest snapshot up to
        now), from this run's snapshots. See :func:`synthesize`."""
        return synthesize(self._dir, sigma_rel, self._snapshot_step(step))

    def apply(self, sigma_rel: float, step: int | None = None, need_restore: bool = True) -> _apply.Restorer:
        """Swap the synthesized EMA of width ``sigma_rel`` at ``step`` into the model; leaving the
        ``with`` block restores the trained weights bit-exactly (as :meth:`ModelEMA.apply`).

        Raises:
            ValueError: as :func:`synthesize`.
            RuntimeError: averages are already applied, or the model changed so that it can no
                longer be averaged (nothing is changed).
        """
        need_restore = _apply.check_need_restore(need_restore)
        if _apply.applied(self) is not None:
            raise RuntimeError("a synthesized EMA is already applied; call restore() before applying again")
        ema = self._emas[0]
        ema._follow_model()
        values = _combine(self._dir, sigma_rel, self._snapshot_step(step))
        missing = sorted(set(ema._tensors) - set(values))
        if missing:
            raise ValueError(f"the snapshots lack {missing[:5]}: they were written for another model")

        def prepare() -> _apply.EagerSwap:
            with paddle.no_grad():
                results = {
                    name: paddle.to_tensor(values[name].astype(np.float32), place=tensor.place)
                    .astype(tensor.dtype) for name, tensor in ema._tensors.items()
                }
                return _apply.EagerSwap.of(f"PostHocEMA of {type(ema._layer).__name__}", ema._layer,
                                           ema._tensors, results)

        return _apply.apply(self, prepare, self.restore, need_restore)

    def restore(self) -> None:
        """Put back the weights :meth:`apply` set aside (a no-op, logged, if nothing is applied)."""
        if not _apply.restore(self):
            _logger.warning("restore() called with no applied averages; weights left unchanged")

    def state_dict(self) -> dict[str, Any]:
        """The tracked EMAs' states and the snapshot options, for ``paddle.save``."""
        return {
            "sigma_rels": list(self._sigma_rels),
            "snapshot_every": self._every,
            "emas": [ema.state_dict() for ema in self._emas],
        }

    def set_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the snapshots written up to its step stay and are used;
        later ones (of the run being replaced) are overwritten as training reaches their steps.

        Raises:
            ValueError: the state is not a PostHocEMA's with these ``sigma_rels`` and
                ``snapshot_every``, or an EMA's state does not fit (nothing is changed).
        """
        if not isinstance(state, dict) or not {"sigma_rels", "snapshot_every", "emas"} <= state.keys():
            raise ValueError("pass what PostHocEMA.state_dict() returned")
        if [round(float(s), 6) for s in state["sigma_rels"]] != [round(s, 6) for s in self._sigma_rels]:
            raise ValueError(
                f"the state tracks sigma_rels {state['sigma_rels']}, this one {self._sigma_rels}"
            )
        if state["snapshot_every"] != self._every:
            raise ValueError(
                f"the state took snapshots every {state['snapshot_every']} steps, this one {self._every}"
            )
        saved = [ema.state_dict() for ema in self._emas]
        try:
            for ema, ema_state in zip(self._emas, state["emas"]):
                ema.set_state_dict(ema_state)
        except BaseException:
            for ema, ema_state in zip(self._emas, saved):  # all or nothing
                ema.set_state_dict(ema_state)
            raise

    def _snapshot_step(self, step: int | None) -> int:
        if step is None:
            step = self.step - self.step % self._every
        if step > self.step:
            raise ValueError(f"step {step} is after the current training step {self.step}")
        return step

    def _write_snapshots(self) -> None:
        for sigma_rel, ema in zip(self._sigma_rels, self._emas):
            with paddle.no_grad():
                averages = {name: a.astype(self._dtype).numpy() for name, a in ema._averages.items()}
            content = {"format": _FORMAT, "sigma_rel": sigma_rel, "gamma": ema.gamma, "step": ema.step,
                       "averages": averages}
            path = os.path.join(self._dir, _snapshot_name(sigma_rel, ema.step))
            partial = path + ".partial"
            paddle.save(content, partial)
            os.replace(partial, path)  # whole or not at all


def snapshots(snapshot_dir: str | os.PathLike) -> list[tuple[float, int, str]]:
    """The snapshots in ``snapshot_dir`` as ``(sigma_rel, step, path)``, by step then width."""
    found = []
    for entry in os.listdir(snapshot_dir):
        match = _SNAPSHOT.fullmatch(entry)
        if match:
            found.append((float(match.group(1)), int(match.group(2)), os.path.join(snapshot_dir, entry)))
    return sorted(found, key=lambda s: (s[1], s[0]))


def synthesize(
    snapshot_dir: str | os.PathLike, sigma_rel: float, step: int | None = None,
) -> dict[str, paddle.Tensor]:
    """The EMA of width ``sigma_rel`` at training step ``step``, from a run's snapshots.

    Uses every snapshot of ``snapshot_dir`` taken at a step in ``(0, step]``; the coefficients come
    from :func:`paddle_ema.power.posthoc_coefficients` (float64, summing to 1) and the snapshots are
    combined in float64.

    Args:
        snapshot_dir: The ``snapshot_dir`` of a :class:`PostHocEMA`.
        sigma_rel: The width to synthesize, in (0, 0.2887).
        step: The training step to synthesize at (default: the latest snapshot's).

    Returns:
        ``{name: float32 Tensor}`` (on the CPU).

    Raises:
        FileNotFoundError: ``snapshot_dir`` holds no snapshot.
        ValueError: ``sigma_rel`` out of range, ``step`` before the first snapshot, or snapshots that
            do not fit together (other tensors, a snapshot not of this format).
    """
    return {name: paddle.to_tensor(total.astype(np.float32))
            for name, total in _combine(snapshot_dir, sigma_rel, step).items()}


def _combine(snapshot_dir: str | os.PathLike, sigma_rel: float, step: int | None) -> dict[str, np.ndarray]:
    """:func:`synthesize` in float64 numpy arrays."""
    gamma = power.sigma_rel_to_gamma(sigma_rel)
    if not os.path.isdir(snapshot_dir):
        raise FileNotFoundError(f"no snapshot directory {os.fspath(snapshot_dir)!r}")
    found = snapshots(snapshot_dir)
    if not found:
        raise FileNotFoundError(
            f"{os.fspath(snapshot_dir)!r} holds no PostHocEMA snapshot (phema-*.pdparams)"
        )
    target = found[-1][1] if step is None else step
    if isinstance(target, bool) or not isinstance(target, numbers.Integral):
        raise TypeError(f"step must be an int, got {short_repr(step)}")
    used = [s for s in found if 0 < s[1] <= target]
    if not used:
        raise ValueError(
            f"no snapshot at or before step {target} (the first is at step {found[0][1]}); pass a later step"
        )
    # The widths from the file names (written from the sigma_rel the run was given) decide the
    # coefficients, so each snapshot is read once, streaming; its content must agree.
    gammas = [power.sigma_rel_to_gamma(sigma) for sigma, _, _ in used]
    coefficients = power.posthoc_coefficients([s[1] for s in used], gammas, float(target), gamma)
    totals: dict[str, np.ndarray] = {}
    for (sigma, taken, path), snapshot_gamma, coefficient in zip(used, gammas, coefficients):
        content = paddle.load(path, return_numpy=True)
        if not (isinstance(content, dict) and content.get("format") == _FORMAT
                and content.get("step") == taken
                and math.isclose(content.get("gamma", math.nan), snapshot_gamma, rel_tol=1e-6)):
            raise ValueError(f"{path!r} is not a PostHocEMA snapshot of sigma_rel {sigma} at step {taken}")
        if totals and set(content["averages"]) != set(totals):
            raise ValueError(f"{path!r} holds other tensors than {used[0][2]!r}: snapshots of two models?")
        for name, value in content["averages"].items():
            weighted = coefficient * np.asarray(value, dtype=np.float64)
            if name in totals:
                totals[name] += weighted
            else:
                totals[name] = weighted
    return totals
