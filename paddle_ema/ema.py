"""The public ExponentialMovingAverage class and its apply/restore state machine."""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import warnings
import weakref
from typing import Any, Sequence

import numpy as np
import paddle

from paddle_ema import _apply, _graph, _ir, _names, _select, schedule
from paddle_ema._select import short_repr

__all__ = ["ExponentialMovingAverage", "updated_emas"]

_logger = logging.getLogger(__name__)


def _check_thres_steps(thres_steps: Any, program: Any) -> Any:
    if thres_steps is None:
        return None
    if not _ir.is_graph_variable(thres_steps):
        raise TypeError(
            "thres_steps must be a static-graph Variable/Value holding the step count (e.g. "
            "paddle_ema.global_step_counter() or paddle.static.data('step', [1], 'int64')), got "
            f"{short_repr(thres_steps)} of type {type(thres_steps).__name__}; for a fixed decay leave it None"
        )
    dtype = _ir.dtype_name(thres_steps)
    if dtype not in ("int32", "int64", "float16", "float32", "float64"):
        raise TypeError(f"thres_steps must have an int or float dtype, got {dtype}")
    if tuple(thres_steps.shape) not in ((1,), ()):
        raise ValueError(
            f"thres_steps must hold one number (shape [1] or []), got shape {list(thres_steps.shape)}; "
            "pass the global step, e.g. paddle_ema.global_step_counter()"
        )
    if _ir.program_of(thres_steps) is not program:
        raise ValueError(
            "thres_steps belongs to another program than the default main program this "
            "ExponentialMovingAverage averages; create it under the same paddle.static.program_guard"
        )
    return thres_steps


def _check_name(name: Any) -> str:
    if name is None:
        return "ema"
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"name must be a non-empty str (the prefix of the EMA's variable names) or None, got "
            f"{short_repr(name)} of type {type(name).__name__}; pass e.g. name='ema'"
        )
    return name


def _check_executor(executor: Any, method: str) -> None:
    if not isinstance(executor, paddle.static.Executor):
        raise TypeError(
            f"{method}(executor) needs a paddle.static.Executor, got {short_repr(executor)} of type "
            f"{type(executor).__name__}; pass the Executor that runs your training program"
        )


def _program_parameters(program: Any) -> tuple[dict[str, Any], set[str]]:
    """Every parameter of ``program`` by name, in program order, and the names of those declared
    inside a control-flow block (PIR only: see :func:`paddle_ema._ir.program_parameters`).

    PIR lists a parameter shared by two layers (one ``ParamAttr`` name) once per use; averaging,
    backing up or restoring it twice would write an average over its backup.
    """
    seen: dict[str, Any] = {}
    nested = set()
    for param, inside in _ir.program_parameters(program):
        seen.setdefault(param.name, param)
        if inside:
            nested.add(param.name)
    return seen, nested


def _selected_parameters(program: Any, parameters: Any, exclude: Any) -> list[Any]:
    """The parameters of ``program`` to average, in program order: by default every parameter whose
    ``do_model_average`` is not False; else the ``parameters`` named (names or graph parameters),
    taken as given; then ``exclude`` leaves some out (see :func:`paddle_ema._select.choose`)."""
    everything, nested = _program_parameters(program)
    # Only floating-point parameters have an average (integer ones, e.g. LookAhead's counters under
    # PIR, are state, and no in-place average kernel takes them).
    default = [
        n for n, p in everything.items()
        if getattr(p, "do_model_average", None) is not False and _ir.dtype_name(p) in _FLOATING
    ]
    names = _select.choose(list(everything), default, parameters, exclude,
                           name_of=functools.partial(_parameter_name, program=program),
                           where="the default main program")
    not_floating = [n for n in names if _ir.dtype_name(everything[n]) not in _FLOATING]
    if not_floating:
        raise TypeError(
            f"parameters: {_select.some_names(not_floating)} is "
            f"{_ir.dtype_name(everything[not_floating[0]])}; only floating-point parameters can be "
            "averaged, leave it out of parameters"
        )
    nested = [n for n in names if n in nested]
    if nested:
        raise RuntimeError(
            f"{_select.some_names(nested)} are created inside paddle.static.nn.cond or while_loop; "
            "under PIR Paddle never trains such parameters (optimizer.minimize() updates the global "
            "block's parameters only, with no error), so there is nothing to average: create the "
            "layer before the control flow and call it inside, or leave them out with exclude="
        )
    return [everything[name] for name in names]


_FLOATING = ("float16", "bfloat16", "float32", "float64")


def _parameter_name(item: Any, program: Any) -> str | None:
    """The name of graph parameter ``item`` given in ``parameters=``, or None if it has none.

    Raises:
        ValueError: ``item`` belongs to another program (its name would pick this program's
            parameter of that name).
        TypeError: ``item`` is a graph value without a name (under PIR, an activation).
    """
    if not _ir.is_graph_variable(item):
        return getattr(item, "name", None)
    if _ir.program_of(item) is not program:
        raise ValueError(
            f"parameters: {short_repr(item)} belongs to another program than the default main program this "
            "ExponentialMovingAverage averages; pass this program's parameters, or their names"
        )
    try:
        return item.name
    except Exception as error:  # noqa: BLE001 - PIR raises its own (InvalidArgument) error type
        raise TypeError(
            f"parameters must hold parameter names or parameters of the default main program, got a "
            f"value that is not a parameter ({error}); pass e.g. parameters=['fc_0.w_0']"
        ) from None


def _compiled_programs_of(program: Any) -> bool:
    """Whether a ``paddle.static.CompiledProgram`` was built from ``program`` and is still alive."""
    compiled = getattr(paddle.static, "CompiledProgram", None)
    if compiled is None:
        return False
    return any(
        isinstance(obj, compiled) and getattr(obj, "_program", None) is program
        for obj in gc.get_objects()
    )


@dataclasses.dataclass(frozen=True, eq=False)
class _StateView:
    """What a checkpoint holds of one :class:`ExponentialMovingAverage`, and what loading it needs."""

    name: str  # the EMA's unique name, the prefix of its state (see paddle_ema._names)
    plan: _graph.EmaPlan  # the names and layout of its state
    schedule: schedule.Schedule  # to check a checkpoint's bias correction against
    counter: str | None  # the paddle_ema.global_step_counter its warm-up reads, if any


# Every EMA whose ops are in a program, so that paddle_ema.load can tell EMA state from the rest.
_UPDATED: weakref.WeakSet[ExponentialMovingAverage] = weakref.WeakSet()


def updated_emas(program: Any) -> list[ExponentialMovingAverage]:
    """The live EMAs whose update() appended their ops to ``program``."""
    return [e for e in list(_UPDATED) if e._program is program]


class ExponentialMovingAverage:
    """Exponential moving average of a static program's parameters, with exact bias correction.

    A drop-in replacement for ``paddle.static.ExponentialMovingAverage`` that works on Paddle 3.x under
    PIR and the legacy IR, and on Paddle 2.6. For every floating-point parameter :math:`\\theta` of
    the default main program whose ``do_model_average`` is not False (batch-norm statistics
    included) it keeps

    .. math::

        \\text{ema}_t = d_t\\,\\text{ema}_{t-1} + (1 - d_t)\\,\\theta_t, \\qquad \\text{ema}_0 = 0,

    updated by the ops that :meth:`update` appends to the training program. :meth:`apply` writes the
    bias-corrected average :math:`\\text{ema}_t / (1 - \\prod_{i \\le t} d_i)` into the parameters (with a
    constant decay the denominator is :math:`1 - d^t`) and :meth:`restore` puts the trained values back.

    With ``thres_steps`` the decay warms up: :math:`d_t = \\min(\\text{decay}, (1 + s_t) / (10 + s_t))`,
    :math:`s_t` being the value of ``thres_steps`` at step ``t``, usually the global step (a negative
    value counts as 0). With ``power`` it warms up as in ema-pytorch and diffusers:
    :math:`d_t = 1 - (1 + t / \\gamma)^{-p}` for the ``t``-th update after ``start_step``, counted from
    0. The first ``start_step`` updates use decay 0 (the average follows the parameter), and every
    schedule's decay is clipped to ``[min_decay, decay]``. The bias correction is exact for all of them.

    Each average is kept in its parameter's dtype, except that float16 and bfloat16 parameters get
    float32 averages (a bfloat16 average stalls at decay 0.999). The weight :math:`1 - d_t` is computed
    precisely (in float64 for a constant decay), so any decay below 1 works, and the bias denominator
    is kept in float64: the applied float32 average stays within 1e-5 relative of a float64 reference
    over 20,000 steps at decay 0.999, 0.9999 and 0.99999 (measured; see docs/precision.md).

    Args:
        decay: The decay rate, in [0, 1); usually close to 1 (0.999, 0.9999).
        thres_steps: Optional int or float Variable/Value of shape [1] or [] in the default main
            program (e.g. from :func:`paddle_ema.global_step_counter`) that schedules the decay as
            above.
        name: Prefix of the state's variable names; made unique per instance. Defaults to ``"ema"``.
        parameters: The parameters to average: a list of names or graph parameters of the default
            main program, taken as given (floating-point ones). Defaults to every floating-point
            parameter whose ``do_model_average`` is not False.
        exclude: Names or regular expressions (matched with ``re.fullmatch``) of parameters to leave
            out, applied after ``parameters``. Every entry must match some parameter. Excluded
            parameters are never backed up, written or restored.
        start_step: The first ``start_step`` updates use decay 0; the schedule starts after them.
        power: The exponent :math:`p` of the power warm-up (e.g. 2/3, or 3/4 for short runs); None
            for none. Excludes ``thres_steps``.
        inv_gamma: The time scale :math:`\\gamma` of the power warm-up.
        min_decay: The lowest decay any schedule may use, in [0, decay].

    Raises:
        TypeError: ``decay``, ``start_step``, ``power``, ``inv_gamma`` or ``min_decay`` is not a
            number, ``name`` is not a str, ``parameters`` or ``exclude`` is not a list,
            ``parameters`` names a parameter that is not floating-point, or ``thres_steps`` is not
            an int/float graph variable.
        ValueError: an option is out of range (the message names it); ``thres_steps`` or a
            parameter in ``parameters`` belongs to another program, or ``thres_steps`` does not
            hold one number; both ``thres_steps`` and ``power`` are given; a name in ``parameters``
            or an entry of ``exclude`` matches no parameter; or no parameter is left to average.
        RuntimeError: called in dygraph mode (this class averages static programs); or, under PIR,
            a parameter to average is created inside ``paddle.static.nn.cond``/``while_loop``
            (Paddle never trains those: create the layer before the control flow and call it
            inside, or exclude them).

    Example:
        .. code-block:: python

            import numpy as np
            import paddle
            from paddle_ema import ExponentialMovingAverage

            paddle.enable_static()
            x = paddle.static.data(name="x", shape=[-1, 5], dtype="float32")
            hidden = paddle.static.nn.fc(x, size=10)
            cost = paddle.mean(hidden)
            paddle.optimizer.Adam(learning_rate=0.001).minimize(cost)

            ema = ExponentialMovingAverage(0.999)
            ema.update()

            exe = paddle.static.Executor(paddle.CPUPlace())
            exe.run(paddle.static.default_startup_program())
            for _ in range(6):
                exe.run(feed={"x": np.random.rand(10, 5).astype("float32")}, fetch_list=[cost])
            with ema.apply(exe):
                pass  # evaluate here: the parameters hold their averages

    References:
        TensorFlow's ``tf.train.ExponentialMovingAverage`` (the warm-up schedule), and Kingma & Ba,
        "Adam" (2015), section 3 (the bias correction).
    """

    def __init__(
        self,
        decay: float = 0.999,
        thres_steps: Any | None = None,
        name: str | None = None,
        *,
        parameters: Sequence[Any] | None = None,
        exclude: Sequence[str] | None = None,
        start_step: int = 0,
        power: float | None = None,
        inv_gamma: float = 1.0,
        min_decay: float = 0.0,
    ) -> None:
        if paddle.in_dynamic_mode():
            raise RuntimeError(
                "ExponentialMovingAverage averages a static program's parameters; call "
                "paddle.enable_static() and build the network before creating it"
            )
        self._program = paddle.static.default_main_program()
        self._schedule = schedule.Schedule.make(
            decay, threshold=thres_steps is not None, start_step=start_step, power=power,
            inv_gamma=inv_gamma, min_decay=min_decay,
        )
        self._thres_steps = _check_thres_steps(thres_steps, self._program)
        # A paddle_ema.global_step_counter's name: a checkpoint without it restarts it with the EMA.
        self._counter = None if thres_steps is None else _ir.persistable_name(thres_steps)
        prefix = _check_name(name)
        self._params = _selected_parameters(self._program, parameters, exclude)
        if not self._params:
            raise ValueError(
                "the default main program has no parameter to average (none, all with "
                "do_model_average=False, or all excluded); build the network and call "
                "optimizer.minimize() before creating the ExponentialMovingAverage"
            )
        self._name = _names.unique_prefix(prefix)
        self._plan = _graph.EmaPlan.for_params(self._name, self._params)
        # The states: new (self._state is None: update() not called yet) -> ready (the EMA ops are in
        # the training program) <-> applied (this EMA is on _apply's record: its averages are written,
        # or about to be, with every parameter backed up in that entry's scope). apply() moves ready to
        # applied, restore() back; a failure in either leaves a state from which restore() recovers.
        self._state: _graph.StateHandles | None = None
        # The programs apply() and averages() run, built by update(): building a program is not safe
        # to interrupt (under PIR an interrupted build can crash the next one), running one is.
        self._write_program: paddle.static.Program | None = None
        self._read_program: paddle.static.Program | None = None
        self._read_fetches: dict[str, Any] = {}
        self._late_writers_said: set[str] = set()  # parameters written after update(), warned of
        self._ops_checked = -1  # the training program's op count when that was last looked at
        _logger.debug("%s averages %d parameters", self._name, len(self._params))

    @property
    def decay(self) -> float:
        """The configured (maximum) decay rate."""
        return self._schedule.decay

    @property
    def names(self) -> list[str]:
        """Names of the parameters this EMA averages, in program order (as :attr:`ModelEMA.names`)."""
        return [slot.param for slot in self._plan.slots]

    @property
    def parameter_names(self) -> list[str]:
        """Alias of :attr:`names`, the same list, kept so that code written for earlier releases runs."""
        return self.names

    def _state_view(self) -> _StateView:
        """What :mod:`paddle_ema.checkpoint` reads of this EMA (its internal surface)."""
        return _StateView(name=self._name, plan=self._plan, schedule=self._schedule, counter=self._counter)

    def update(self) -> None:
        """Append the EMA ops to the default main program.

        Call it once, after ``optimizer.minimize``, so the averages see the updated parameters. Build
        any ``paddle.static.CompiledProgram`` of the training program after it: one built before
        never runs the EMA ops.

        If the startup program has already run in the current scope (it holds the program's
        parameters), the state is set there too: zeros, or, if the scope already holds this EMA's
        whole state (the same EMA of the same model, from an earlier program built in this scope),
        that state, carried on with a warning logged. Otherwise the scope is not looked at: the
        startup program creates the state wherever it runs.
        Ops appended after it that write an averaged parameter (a second optimizer's ``minimize``)
        make that average lag one step; :meth:`apply` and :meth:`averages` warn of them.

        Raises:
            RuntimeError: ``update()`` was already called; the default main program is not the one
                this EMA was built on; no op of the program updates the averaged parameters yet
                (``optimizer.minimize`` has not run); the program already holds the state of another
                EMA of the same name (made under another ``unique_name.guard``); or the current scope
                holds the program's parameters and state under this EMA's names that does not fit
                it. Nothing is appended then.
        """
        if self._state is not None:
            raise RuntimeError(
                f"update() was already called on this ExponentialMovingAverage ({self._plan.step}); call "
                "it once per training program, or create another instance for another program"
            )
        if paddle.static.default_main_program() is not self._program:
            raise RuntimeError(
                "update() must append to the program whose parameters this ExponentialMovingAverage "
                "averages; call it under the same paddle.static.program_guard as the constructor"
            )
        trainable = {p.name for p in self._params if getattr(p, "trainable", True)}
        if trainable and not trainable & _ir.parameters_written(self._program):
            raise RuntimeError(
                "update() found no op that updates the parameters it averages, so the averages would "
                "lag one step behind the trained weights; call ema.update() after "
                "optimizer.minimize(loss). (If it was called: Paddle computes no gradient for "
                "parameters reached only through stop_gradient variables, e.g. in a while_loop whose "
                "loop variable is a feed, so minimize() added no update for them.)"
            )
        taken = set(_graph.state_names(self._plan)) & _ir.persistable_names(self._program)
        if taken:
            raise RuntimeError(
                f"the program already holds {_select.some_names(sorted(taken))}: another "
                f"ExponentialMovingAverage named {self._name!r} (made under another "
                "paddle.utils.unique_name.guard?) keeps its state there, and the two would share it; "
                "pass another name="
            )
        scope = paddle.static.global_scope()
        # The current scope is where the program runs only if its parameters are there (the startup
        # program ran in it): only then must the state be there before the first run, and only then
        # is what the scope holds under this EMA's names looked at. A scope the program may never
        # run in (it will run its startup program, or run elsewhere) is left alone.
        found = _graph.state_found(self._plan, scope) if _graph.parameters_live(self._plan, scope) else None
        if found == "other":
            raise RuntimeError(
                f"the current scope holds this program's parameters (its startup program ran here) and "
                f"state named like {self._name!r}'s that does not fit it (another EMA's, of another "
                "parameter set, under the same name); training here would overwrite it: pass another "
                "name=, or build the program under paddle.static.scope_guard(scope) with the scope it "
                "will run in"
            )
        if _compiled_programs_of(self._program):
            warnings.warn(
                "a paddle.static.CompiledProgram was built from this program before "
                "ExponentialMovingAverage.update(); it will not run the EMA ops: build it again after "
                "update()",
                RuntimeWarning,
                stacklevel=2,
            )
        namesakes = [e for e in list(_UPDATED) if e._name == self._name and e._program is not self._program]
        if namesakes:
            _logger.warning(
                "%s: a live ExponentialMovingAverage of another program has the same name (made "
                "under another paddle.utils.unique_name.guard?), so their state has the same variable "
                "names: running this program's startup program in the scope where the other trains "
                "resets the other's state (as it does optimizer state of the same names); train them "
                "in different scopes, or pass another name=", self._name,
            )
        if found == "all":
            _logger.warning(
                "%s carries on the state it finds in the current scope (step %d), kept from an "
                "earlier program of the same model; to start afresh, give it another name", self._name,
                int(_ir.read_scalar(self._plan.step, scope)),
            )
        with paddle.static.name_scope("ema"), _ir.update_role(self._program):
            state = _graph.emit_state(self._plan, scope, found)
            # (read before emit_update increments the EMA's step: the count of earlier updates)
            weight = schedule.emit_step_weight(self._schedule, state.step, self._thres_steps)
            _graph.emit_update(self._plan, self._params, state, weight)
        self._write_program = _graph.build_write_program(self._plan)
        self._read_program, self._read_fetches = _graph.build_read_program(self._plan)
        self._state = state
        _UPDATED.add(self)

    def _say_if_written_after_update(self) -> None:
        """Warn (once per parameter) if an op appended to the training program after update()
        writes an averaged parameter (a second optimizer's minimize, a clip): its average then
        lags one step behind it. update() cannot see ops appended later, so apply() and averages()
        look."""
        count = _ir.op_count(self._program)
        if count == self._ops_checked:  # nothing appended since the last look
            return
        self._ops_checked = count
        # The EMA's last op moves the bias denominator.
        end_of_update = _ir.last_writer(self._program, self._state.debias)
        late = _ir.parameters_written(self._program, start=end_of_update + 1)
        late = sorted((late & set(self.parameter_names)) - self._late_writers_said)
        if late:
            self._late_writers_said.update(late)
            warnings.warn(
                f"ops appended to the training program after ExponentialMovingAverage.update() write "
                f"{_select.some_names(late)}: the averages of those parameters lag one step behind "
                "them; call ema.update() after every optimizer's minimize (and anything else that "
                "writes the parameters)",
                RuntimeWarning,
                stacklevel=3,
            )

    def apply(self, executor: paddle.static.Executor, need_restore: bool = True) -> _apply.Restorer:
        """Write the bias-corrected averages into the parameters, backing the parameters up first.

        It takes effect when called. Use it as a context manager: leaving the ``with`` block (also
        by an exception) restores the trained parameters bit-exactly, unless ``need_restore`` is
        False; then call :meth:`restore` yourself, with or without ``with``.

        apply is a transaction: it computes the averages into new tensors and keeps the trained
        tensors as backups, then swaps the averages in (no copy; restore swaps back, also without
        copying). If it fails or is interrupted (``KeyboardInterrupt``) before the swap, nothing has
        changed; during the swap, it restores before raising, and if even that is interrupted,
        :meth:`restore` finishes the job. Before the first update
        step has run the parameters are left as they are (there is no average yet) and a warning says
        so. It works on the current scope (``paddle.static.global_scope()``, like the Executor's
        default; wrap it in ``paddle.static.scope_guard(scope)`` if you train in another scope, also
        a child scope that sees its parent's parameters), and :meth:`restore` acts on that same scope.
        Training steps run while applied train the averages, and also move the optimizer's state and
        the EMA; :meth:`restore` puts back the parameters as they were at apply, discarding what
        those steps did to them.

        Args:
            executor: The Executor that runs the training program (its place is used).
            need_restore: Whether leaving the ``with`` block restores the parameters.

        Returns:
            A context manager whose exit restores the parameters if ``need_restore``.

        Raises:
            TypeError: ``executor`` is not a ``paddle.static.Executor``, or ``need_restore`` is not a
                bool (a numpy bool is one).
            RuntimeError: :meth:`update` was never called, the state is not initialised (the startup
                program has not run), a parameter holds no data in the current scope, or the averages
                are already applied and not yet restored.

        Example:
            .. code-block:: python

                with ema.apply(exe):
                    exe.run(test_program, feed=feed, fetch_list=[pred])

                ema.apply(exe, need_restore=False)   # e.g. to save the averaged model
                paddle.static.save_inference_model(path, [x], [pred], exe, program=test_program)
                ema.restore(exe)
        """
        _check_executor(executor, "apply")
        need_restore = _apply.check_need_restore(need_restore)
        if self._state is None:
            raise RuntimeError("apply() needs the EMA ops: call ema.update() after optimizer.minimize()")
        if _apply.applied(self) is not None:
            raise RuntimeError(
                "the averages are already applied and the trained parameters are backed up; call "
                "ema.restore(executor) before applying again"
            )
        self._say_if_written_after_update()
        scope = paddle.static.global_scope()
        label = f"EMA {self._name!r}"
        restore = functools.partial(self.restore, executor)
        if _graph.debias_value(self._plan, scope) == 0.0:
            warnings.warn(
                "ExponentialMovingAverage.apply(): no update step has run yet, so there is no average "
                "and the parameters are left as they are. If you did train, the training program "
                "never ran the EMA ops: was it a paddle.static.CompiledProgram built before "
                "ema.update()? Build it after update().",
                RuntimeWarning,
                stacklevel=2,
            )
            # Applied with nothing to swap: restore() then has nothing to do, as the user expects.
            return _apply.apply(
                self, lambda: _apply.ScopeSwap(label, scope, self.parameter_names), restore, need_restore
            )

        def prepare() -> _apply.ScopeSwap:
            swap = _apply.ScopeSwap.of(label, scope, self._plan.slots)
            try:
                # The averages go into result tensors and the backups share the parameters' memory.
                executor.run(self._write_program, scope=scope)
                swap.set_aside()
            except BaseException:
                swap.release(results=True)
                raise
            return swap

        return _apply.apply(self, prepare, restore, need_restore)

    def averages(self, executor: paddle.static.Executor) -> dict[str, np.ndarray]:
        """The bias-corrected averages, as :meth:`apply` would write them, touching nothing.

        Parameters and EMA state stay as they are (also while the averages are applied). Before the
        first update step there is no average, and the parameters' current values are returned, as
        apply leaves them. Works on the current scope, like :meth:`apply`.

        Args:
            executor: The Executor that runs the training program.

        Returns:
            ``{parameter name: numpy array}``, each in its parameter's dtype, except that bfloat16
            parameters come as float32 (numpy has no bfloat16) holding the bfloat16 value.

        Raises:
            TypeError: ``executor`` is not a ``paddle.static.Executor``.
            RuntimeError: :meth:`update` was never called, or the state is not initialised.

        Example:
            .. code-block:: python

                weights = ema.averages(exe)
                np.save("fc_w_ema.npy", weights["fc_0.w_0"])
        """
        _check_executor(executor, "averages")
        if self._state is None:
            raise RuntimeError("averages() needs the EMA ops: call ema.update() after optimizer.minimize()")
        self._say_if_written_after_update()
        scope = paddle.static.global_scope()
        if _graph.debias_value(self._plan, scope, "averages") == 0.0:
            return {name: _ir.read_array(name, scope) for name in self.parameter_names}
        names = list(self._read_fetches)
        values = executor.run(
            self._read_program, fetch_list=[self._read_fetches[n] for n in names], scope=scope
        )
        return {name: np.asarray(value) for name, value in zip(names, values)}

    def restore(self, executor: paddle.static.Executor) -> None:
        """Put back the parameters that :meth:`apply` backed up, in the scope apply worked on.

        No copy: each parameter is pointed back at the memory apply kept aside, so the trained values
        return bit for bit. Does nothing (and logs a warning) if nothing is applied. If it is
        interrupted, the backups are kept and the EMA stays applied: call it again.

        Args:
            executor: The Executor that runs the training program (Paddle's signature; restore runs
                no program).

        Raises:
            TypeError: ``executor`` is not a ``paddle.static.Executor``.
            RuntimeError: another ExponentialMovingAverage sharing parameters with this one was
                applied after it and is not restored yet; restore that one first.
        """
        _check_executor(executor, "restore")
        if not _apply.restore(self):
            _logger.warning("restore() called with no applied averages; parameters left unchanged")

    @property
    def _applied(self) -> _apply.ScopeSwap | None:
        """This EMA's swap while applied (set from before a parameter is written), else None."""
        return _apply.applied(self)
