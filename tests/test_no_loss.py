"""No user action loses a trained weight: shared parameters, interrupted or failing apply/restore,
other scopes, several EMAs restored in any order, and thres_steps from another program."""

from __future__ import annotations

import contextlib
import signal
import time

import numpy as np
import paddle
import pytest
from nets import IN_FEATURES, batch, build_net, read, read_all, state_names, train_with_ema
from oracle import EmaOracle
from test_average import assert_applied_matches

import paddle_ema
from paddle_ema import _ir


def assert_same(now, before, what):
    assert now.keys() == before.keys()
    for name in before:
        np.testing.assert_array_equal(now[name], before[name], err_msg=f"{what}: {name}")


def build_shared_net(main):
    """x -> fc(4, shared.w) -> fc(4, shared.w) -> mean: one weight used by two layers."""
    x = paddle.static.data("x", [-1, IN_FEATURES], "float32")
    h = paddle.static.nn.fc(x, IN_FEATURES, weight_attr=paddle.ParamAttr(name="shared.w"),
                            bias_attr=paddle.ParamAttr(name="b1"))
    out = paddle.static.nn.fc(h, IN_FEATURES, weight_attr=paddle.ParamAttr(name="shared.w"),
                              bias_attr=paddle.ParamAttr(name="b2"))
    loss = paddle.mean(out * out)
    paddle.optimizer.SGD(0.05).minimize(loss)
    return loss


def test_a_shared_parameter_is_averaged_backed_up_and_restored_once(programs, exe, rng):
    main, startup = programs
    loss = build_shared_net(main)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    assert sorted(ema.parameter_names) == ["b1", "b2", "shared.w"]
    exe.run(startup)
    oracle = EmaOracle(0.9, ema.parameter_names)
    for _ in range(4):
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[loss])
        oracle.step(read_all(ema.parameter_names))
        assert_applied_matches(ema, exe, oracle, "shared parameter")


@pytest.fixture
def trained(programs, exe, rng):
    """A net with an EMA (decay 0.9) after 3 training steps, its raw weights and expected averages."""
    main, startup = programs
    net = build_net(main, batch_norm=True)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    exe.run(startup)
    oracle = EmaOracle(0.9, ema.parameter_names)
    for _ in range(3):
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
        oracle.step(read_all(ema.parameter_names))
    return ema, read_all(ema.parameter_names), oracle


class Interrupting:
    """An Executor whose ``run`` raises KeyboardInterrupt on call ``at`` (0-based), before or after
    running the program: what Ctrl-C (or any signal handler that raises) does when it lands in the
    Python part of ``Executor.run`` on either side of the C++ run."""

    def __init__(self, exe, at, when):
        self._exe, self._at, self._when, self.calls = exe, at, when, 0

    def __call__(self, *args, **kwargs):
        call, self.calls = self.calls, self.calls + 1
        if call == self._at and self._when == "before":
            raise KeyboardInterrupt
        result = self._exe.__class__.run(self._exe, *args, **kwargs)
        if call == self._at and self._when == "after":
            raise KeyboardInterrupt
        return result


def assert_recoverable(ema, exe, raw, what):
    """The parameters are the raw ones, or restore() brings them back bit-exactly; then usable again."""
    if ema._applied is not None:
        ema.restore(exe)
    assert ema._applied is None
    assert_same(read_all(ema.parameter_names), raw, what)


# apply runs 1 program (the averages into result tensors), restore none: call 0 of a
# `with ema.apply(exe): pass`. The swaps around it are covered by the next test.
@pytest.mark.parametrize("when", ["before", "after"])
def test_keyboard_interrupt_around_the_apply_program_loses_nothing(trained, exe, monkeypatch, when):
    ema, raw, oracle = trained
    state = read_all(state_names(ema))
    interrupting = Interrupting(exe, 0, when)
    monkeypatch.setattr(exe, "run", interrupting)
    with pytest.raises(KeyboardInterrupt):
        with ema.apply(exe):
            pass
    assert interrupting.calls == 1
    monkeypatch.undo()
    assert_recoverable(ema, exe, raw, f"interrupt {when} the apply program")
    assert_same(read_all(state_names(ema)), state, "EMA state after an interrupt")
    assert_applied_matches(ema, exe, oracle, f"apply after an interrupt {when} the apply program")


class InterruptingScope:
    """``_ir.share_memory`` and ``_ir.release`` raising KeyboardInterrupt at their call
    ``at`` (counted together), before or after doing their work: Ctrl-C during a swap."""

    def __init__(self, at, when):
        self.at, self.when, self.calls = at, when, 0
        self.share, self.release = _ir.share_memory, _ir.release

    def _wrap(self, function):
        def wrapped(*args):
            call, self.calls = self.calls, self.calls + 1
            if call == self.at and self.when == "before":
                raise KeyboardInterrupt
            function(*args)
            if call == self.at and self.when == "after":
                raise KeyboardInterrupt
        return wrapped

    def install(self, monkeypatch):
        monkeypatch.setattr(_ir, "share_memory", self._wrap(self.share))
        monkeypatch.setattr(_ir, "release", self._wrap(self.release))


def test_keyboard_interrupt_at_every_swap_of_apply_and_restore_loses_nothing(trained, exe, monkeypatch):
    """Every share and release call of a `with ema.apply(exe): pass`, interrupted before and after."""
    ema, raw, oracle = trained
    counting = InterruptingScope(-1, "never")
    counting.install(monkeypatch)
    with ema.apply(exe):
        pass
    monkeypatch.undo()
    total = counting.calls
    assert total >= 4 * len(ema.parameter_names), total  # backup, swap in, swap back, releases
    for at in range(total):
        for when in ("before", "after"):
            interrupting = InterruptingScope(at, when)
            interrupting.install(monkeypatch)
            with contextlib.suppress(KeyboardInterrupt):
                with ema.apply(exe):
                    pass
            monkeypatch.undo()
            assert_recoverable(ema, exe, raw, f"interrupt {when} swap call {at} of {total}")
    assert_applied_matches(ema, exe, oracle, "apply after the interrupted swaps")


def test_an_apply_that_fails_half_way_restores_before_raising(trained, exe):
    ema, raw, oracle = trained
    # A kernel failure while averages are written (a missing kernel, or out of memory): one stacked
    # average cannot be read, so the write program fails after backing everything up.
    scope = paddle.static.global_scope()
    group = ema._plan.groups[-1]
    saved = read(group.average)
    scope.find_var(group.average).get_tensor()._clear()
    with pytest.raises(Exception) as failure:
        with ema.apply(exe):
            pytest.fail("the body must not run when apply fails")
    assert not isinstance(failure.value, pytest.fail.Exception)
    assert ema._applied is None, "a failed apply must leave nothing applied"
    assert_same(read_all(ema.parameter_names), raw, "parameters after a failed apply")
    scope.find_var(group.average).get_tensor().set(saved, paddle.CPUPlace())
    assert_applied_matches(ema, exe, oracle, "apply after a failed one")


@pytest.mark.parametrize("at", [0, 2])
def test_an_interrupted_restore_can_be_finished(trained, exe, monkeypatch, at):
    ema, raw, oracle = trained
    ema.apply(exe, need_restore=False)
    InterruptingScope(at, "before").install(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        ema.restore(exe)
    monkeypatch.undo()
    assert ema._applied is not None, "an interrupted restore must leave the EMA applied"
    ema.restore(exe)
    assert_same(read_all(ema.parameter_names), raw, "restore after an interrupted one")
    assert_applied_matches(ema, exe, oracle, "apply after an interrupted restore")


def test_an_interrupt_while_backups_are_freed_leaves_the_ema_usable(trained, exe, monkeypatch):
    ema, raw, oracle = trained
    release = _ir.release
    calls = []

    def interrupted_release(tensor):
        calls.append(tensor)
        if len(calls) == 2:
            raise KeyboardInterrupt
        release(tensor)

    monkeypatch.setattr(_ir, "release", interrupted_release)
    with pytest.raises(KeyboardInterrupt):
        with ema.apply(exe):
            pass
    monkeypatch.undo()
    assert_same(read_all(ema.parameter_names), raw, "parameters after an interrupted release")
    for _ in range(2):
        assert_applied_matches(ema, exe, oracle, "apply after an interrupted release")


def test_real_signals_during_apply_restore_loops_lose_nothing(trained, exe):
    """SIGALRM at random moments of apply/restore cycles, its handler raising KeyboardInterrupt.

    Where an interrupt lands depends on the machine's load (CI once caught only 2 of 60 while applied), so
    trials go on until both kinds of landing were reached often enough: while the averages are applied
    (the evaluation after ``need_restore=False``) and anywhere else (inside apply, restore, the context
    manager). The cap only bounds a broken run; a healthy one needs ~60 trials.
    """
    ema, raw, oracle = trained
    timing = np.random.default_rng(7)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    landed = {True: 0, False: 0}  # applied when the interrupt landed -> count
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        for trial in range(600):
            if min(landed.values()) >= 10:
                break
            try:
                signal.setitimer(signal.ITIMER_REAL, float(timing.uniform(1e-4, 1e-2)))
                for _ in range(1000):
                    with ema.apply(exe):
                        read_all(ema.parameter_names)  # an evaluation, briefly
                    ema.apply(exe, need_restore=False)
                    time.sleep(5e-4)  # an evaluation while applied: where interrupts must be survived
                    ema.restore(exe)
            except KeyboardInterrupt:
                pass
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            landed[ema._applied is not None] += 1
            assert_recoverable(ema, exe, raw, f"SIGALRM trial {trial}")
    finally:
        signal.signal(signal.SIGALRM, previous)
    print(f"\ninterrupts landed: {landed[True]} while applied, {landed[False]} elsewhere")
    assert min(landed.values()) >= 10, f"the interrupts did not reach both states often enough: {landed}"
    assert_applied_matches(ema, exe, oracle, "apply after the signal trials")


def test_restore_acts_on_the_scope_apply_used(programs, exe, rng):
    elsewhere = paddle.static.Scope()
    with paddle.static.scope_guard(elsewhere):
        net, ema = train_with_ema(programs, exe, rng, steps=3)
        raw = read_all(ema.parameter_names)
        ema.apply(exe, need_restore=False)
        backups = ema._applied.backups
        applied = read_all(ema.parameter_names)
    assert any(not np.array_equal(applied[n], raw[n]) for n in raw)
    ema.restore(exe)  # outside the scope_guard: the current scope holds nothing of this model
    with paddle.static.scope_guard(elsewhere):
        assert_same(read_all(ema.parameter_names), raw, "restore outside the scope of apply")
        assert not any(b._is_initialized() for b in backups), "backups not freed"


def test_apply_in_a_child_scope_works_on_the_parameters_it_sees_through_its_parent(programs, exe, rng):
    """Trained in a child scope whose parent holds the parameters (the startup program ran in the
    parent): apply under scope_guard(child) averages those parameters, and declares nothing in the
    child that would hide them (an empty local `fc1.w` would break every later program run there)."""
    main, startup = programs
    net = build_net(main)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    exe.run(startup)
    oracle = EmaOracle(0.9, ema.parameter_names)
    child = paddle.static.global_scope().new_scope()
    for _ in range(3):
        exe.run(main, feed={"x": batch(rng)}, scope=child)
        oracle.step(read_all(ema.parameter_names))
    x = batch(rng)
    with paddle.static.scope_guard(child):
        assert_applied_matches(ema, exe, oracle, "apply in a child scope")
    for name in ema.parameter_names:
        assert child.find_var(name) is paddle.static.global_scope().find_var(name), f"{name} hidden"
    # A program the executor has not run in this scope yet finds the trained parameters.
    (out,) = exe.run(net.test_program, feed={"x": x}, fetch_list=[net.test_out], scope=child)
    w = read_all(ema.parameter_names)
    expected = (x.astype(np.float64) @ w["fc1.w"] + w["fc1.b"]) @ w["fc2.w"] + w["fc2.b"]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_apply_where_the_parameters_hold_no_data_raises_and_declares_nothing(programs, exe, rng):
    net, ema = train_with_ema(programs, exe, rng, steps=2)
    empty = paddle.static.Scope()
    # The EMA's state alone, as if a checkpoint of it were loaded into a scope without the model.
    for name in state_names(ema):
        empty.var(name).get_tensor().set(read(name), paddle.CPUPlace())
    with paddle.static.scope_guard(empty), pytest.raises(RuntimeError, match="holds no data"):
        ema.apply(exe)
    assert ema._applied is None
    assert all(empty.find_var(name) is None for name in ema.parameter_names), "a parameter was declared"


def two_emas(programs, exe, rng):
    main, startup = programs
    net = build_net(main)
    a = paddle_ema.ExponentialMovingAverage(0.5, name="a")
    a.update()
    b = paddle_ema.ExponentialMovingAverage(0.9, name="b")
    b.update()
    exe.run(startup)
    oracles = {"a": EmaOracle(0.5, a.parameter_names), "b": EmaOracle(0.9, b.parameter_names)}
    for _ in range(3):
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
        for oracle in oracles.values():
            oracle.step(read_all(a.parameter_names))
    return a, b, oracles


def test_restoring_two_emas_out_of_order_raises_and_loses_nothing(programs, exe, rng):
    a, b, oracles = two_emas(programs, exe, rng)
    raw = read_all(a.parameter_names)
    a.apply(exe, need_restore=False)
    b.apply(exe, need_restore=False)
    b_applied = read_all(b.parameter_names)
    for name in b.parameter_names:
        np.testing.assert_allclose(b_applied[name], oracles["b"].debiased(name), rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="'b.*' was applied after EMA 'a.*' .*reverse order"):
        a.restore(exe)
    assert_same(read_all(a.parameter_names), b_applied, "a refused restore changed parameters")
    b.restore(exe)
    for name in a.parameter_names:
        np.testing.assert_allclose(read(name), oracles["a"].debiased(name), rtol=1e-5, atol=1e-7)
    a.restore(exe)
    assert_same(read_all(a.parameter_names), raw, "restore in reverse order")


def test_nested_with_blocks_of_two_emas_restore_in_order(programs, exe, rng):
    a, b, oracles = two_emas(programs, exe, rng)
    raw = read_all(a.parameter_names)
    with a.apply(exe):
        with b.apply(exe):
            for name in b.parameter_names:
                np.testing.assert_allclose(read(name), oracles["b"].debiased(name), rtol=1e-5, atol=1e-7)
        for name in a.parameter_names:
            np.testing.assert_allclose(read(name), oracles["a"].debiased(name), rtol=1e-5, atol=1e-7)
    assert_same(read_all(a.parameter_names), raw, "nested apply")


def test_thres_steps_from_another_program_is_refused(programs):
    main, startup = programs
    build_net(main)
    other = paddle.static.Program()
    with paddle.static.program_guard(other, paddle.static.Program()):
        step = paddle.static.data("step", [1], "int64")
    n_ops = len(main.global_block().ops), len(startup.global_block().ops)
    with pytest.raises(ValueError, match="thres_steps belongs to another program"):
        paddle_ema.ExponentialMovingAverage(0.9, thres_steps=step)
    assert (len(main.global_block().ops), len(startup.global_block().ops)) == n_ops


def test_a_child_scope_dropped_while_applied_loses_nothing(programs, exe, rng):
    """apply under scope_guard(child) of the scope holding the parameters, then the parent drops its
    kids: the backups are no scope's variables, so restore still has every trained value."""
    net, ema = train_with_ema(programs, exe, rng, steps=3)
    raw = read_all(ema.parameter_names)
    parent = paddle.static.global_scope()
    with paddle.static.scope_guard(parent.new_scope()):
        ema.apply(exe, need_restore=False)
    parent.drop_kids()
    ema.restore(exe)
    assert_same(read_all(ema.parameter_names), raw, "restore after the apply's scope was dropped")


def test_emas_applied_from_a_scope_and_its_child_restore_in_reverse_order(programs, exe, rng):
    """The child scope sees the parent's parameters: the two applies overlap although their scopes
    differ, so restoring the first one first is refused (it would put the trained weights back under
    the second, whose restore would then write the first one's averages over them)."""
    a, b, oracles = two_emas(programs, exe, rng)
    raw = read_all(a.parameter_names)
    a.apply(exe, need_restore=False)
    child = paddle.static.global_scope().new_scope()
    with paddle.static.scope_guard(child):
        b.apply(exe, need_restore=False)
    with pytest.raises(RuntimeError, match="'b.*' was applied after EMA 'a.*' .*reverse order"):
        a.restore(exe)
    with paddle.static.scope_guard(child):
        b.restore(exe)
    for name in a.parameter_names:
        np.testing.assert_allclose(read(name), oracles["a"].debiased(name), rtol=1e-5, atol=1e-7)
    a.restore(exe)
    assert_same(read_all(a.parameter_names), raw, "restore in reverse order across scopes")


def test_emas_applied_in_sibling_scopes_with_their_own_parameters_restore_in_any_order(programs, exe, rng):
    """Two scopes holding their own copies of the parameters share nothing: any order is fine."""
    a, b, _ = two_emas(programs, exe, rng)
    main, startup = programs
    first, second = paddle.static.Scope(), paddle.static.Scope()
    for scope in (first, second):
        with paddle.static.scope_guard(scope):
            exe.run(startup)
            exe.run(main, feed={"x": batch(rng)})
    with paddle.static.scope_guard(first):
        raw_first = read_all(a.parameter_names)
        a.apply(exe, need_restore=False)
    with paddle.static.scope_guard(second):
        b.apply(exe, need_restore=False)
    with paddle.static.scope_guard(first):
        a.restore(exe)
        assert_same(read_all(a.parameter_names), raw_first, "restore in its own scope")
    with paddle.static.scope_guard(second):
        b.restore(exe)
