"""A hypothesis state machine over everything a user can do between training steps.

Rules: train; apply in a ``with`` block (ending normally, by an exception or by KeyboardInterrupt);
apply with ``need_restore=False``; restore (in or out of order); an interrupt inside apply; a
test-program run; save; load; all of it over two EMAs of one model. After every rule each parameter
is bit-exactly what it must be: its raw trained value, or while averages are applied, the
bias-corrected average (per the float64 oracle) of the EMA applied last; after any restore, bit-exactly
the value it had before that apply.

``PADDLE_EMA_DEEP=1`` runs many more examples (see docs/development.md); CI runs a modest number.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile

import numpy as np
import paddle
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from nets import batch, build_net, read_all, state_names
from oracle import EmaOracle
from test_no_loss import Interrupting

import paddle_ema

DEEP = os.environ.get("PADDLE_EMA_DEEP") == "1"
EMAS = st.sampled_from(["a", "b"])


class EmaUser(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.guards = contextlib.ExitStack()
        main, startup = paddle.static.Program(), paddle.static.Program()
        self.guards.enter_context(paddle.utils.unique_name.guard())
        self.guards.enter_context(paddle.static.scope_guard(paddle.static.Scope()))
        self.guards.enter_context(paddle.static.program_guard(main, startup))
        self.main = main
        # No batch norm: PIR's test clone (made before minimize, no for_test) runs batch norm in
        # training mode, so a test-program run would move its statistics.
        self.net = build_net(main)
        self.step = paddle_ema.global_step_counter()
        self.emas = {
            "a": paddle_ema.ExponentialMovingAverage(0.9, name="a"),
            "b": paddle_ema.ExponentialMovingAverage(0.99, thres_steps=self.step, name="b"),
        }
        for ema in self.emas.values():
            ema.update()
        self.names = self.emas["a"].parameter_names
        self.exe = paddle.static.Executor(paddle.CPUPlace())
        self.exe.run(startup)
        self.rng = np.random.default_rng(0)
        self.oracles = {"a": EmaOracle(0.9, self.names), "b": EmaOracle(0.99, self.names)}
        self.raw = read_all(self.names)
        self.applied: list[tuple[str, dict[str, np.ndarray]]] = []  # (EMA, values before its apply)
        self.checkpoint_dir = tempfile.mkdtemp()
        self.checkpoint = None

    def teardown(self):
        for key, _ in reversed(self.applied):
            self.emas[key].restore(self.exe)
        self.guards.close()
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def ema_state(self):
        return read_all([n for ema in self.emas.values() for n in state_names(ema)] + [self.step.name])

    def is_applied(self, key):
        return any(k == key for k, _ in self.applied)

    def assert_averages_of(self, key, what):
        oracle = self.oracles[key]
        values = read_all(self.names)
        for name in self.names:
            if oracle.steps == 0:  # apply before any update step leaves parameters as they are
                continue
            np.testing.assert_allclose(values[name], oracle.debiased(name), rtol=1e-5, atol=1e-7,
                                       err_msg=f"{what}: {name} while {key} is applied")

    # ------------------------------------------------------------------ rules

    @precondition(lambda self: not self.applied)
    @rule()
    def train(self):
        (step,) = self.exe.run(self.main, feed={"x": batch(self.rng)}, fetch_list=[self.step])
        self.raw = read_all(self.names)
        self.oracles["a"].step(self.raw)
        self.oracles["b"].step(self.raw, thres_value=float(step[0]))

    @rule(key=EMAS, ending=st.sampled_from(["normally", "exception", "interrupt"]))
    def apply_in_a_with_block(self, key, ending):
        if self.is_applied(key):
            return
        before = read_all(self.names)
        raised = {"exception": ValueError, "interrupt": KeyboardInterrupt}.get(ending)
        with contextlib.suppress(ValueError, KeyboardInterrupt):
            with self.emas[key].apply(self.exe):
                self.assert_averages_of(key, "inside with")
                if raised:
                    raise raised
        self.assert_bit_exact(before, f"after a with block ending {ending}")

    @rule(key=EMAS)
    def apply_and_keep(self, key):
        if self.is_applied(key):
            return
        before = read_all(self.names)
        self.emas[key].apply(self.exe, need_restore=False)
        self.applied.append((key, before))

    @rule(key=EMAS)
    def restore(self, key):
        if not self.is_applied(key):
            self.emas[key].restore(self.exe)  # a no-op with a warning
            return
        if self.applied[-1][0] != key:
            values = read_all(self.names)
            with pytest.raises(RuntimeError, match="reverse order"):
                self.emas[key].restore(self.exe)
            self.assert_bit_exact(values, "after a refused out-of-order restore")
            return
        _, before = self.applied.pop()
        self.emas[key].restore(self.exe)
        self.assert_bit_exact(before, "after restore")

    @rule(key=EMAS, at=st.integers(0, 1), when=st.sampled_from(["before", "after"]))
    def interrupted_apply(self, key, at, when):
        if self.is_applied(key):
            return
        before = read_all(self.names)
        ema = self.emas[key]
        ema_run = Interrupting(self.exe, at, when)
        self.exe.run = ema_run
        try:
            with contextlib.suppress(KeyboardInterrupt):
                ema.apply(self.exe, need_restore=False)
        finally:
            del self.exe.run
        if ema._applied is not None:  # the interrupt came after apply's last run: it is applied
            self.applied.append((key, before))
            return
        self.assert_bit_exact(before, f"after an apply interrupted {when} run {at}")

    @rule()
    def run_the_test_program(self):
        state, values = self.ema_state(), read_all(self.names)
        self.exe.run(self.net.test_program, feed={"x": batch(self.rng)}, fetch_list=[self.net.test_out])
        self.assert_bit_exact(values, "after a test-program run")
        for name, value in self.ema_state().items():
            np.testing.assert_array_equal(value, state[name], err_msg=f"test program changed {name}")

    @precondition(lambda self: not self.applied)
    @rule()
    def save(self):
        paddle.static.save(self.main, os.path.join(self.checkpoint_dir, "ckpt"))
        self.checkpoint = (copy.deepcopy(self.oracles), self.raw)

    @precondition(lambda self: not self.applied and self.checkpoint is not None)
    @rule()
    def load(self):
        paddle.static.load(self.main, os.path.join(self.checkpoint_dir, "ckpt"))
        oracles, self.raw = self.checkpoint
        self.oracles = copy.deepcopy(oracles)

    # ------------------------------------------------------------------ invariant

    def assert_bit_exact(self, expected, what):
        for name, value in read_all(self.names).items():
            np.testing.assert_array_equal(value, expected[name], err_msg=f"{what}: {name}")

    @invariant()
    def parameters_are_raw_or_the_last_applied_average(self):
        if not self.applied:
            self.assert_bit_exact(self.raw, "nothing applied")
        else:
            self.assert_averages_of(self.applied[-1][0], "applied")


EmaUser.TestCase.settings = settings(
    max_examples=500 if DEEP else 40,
    stateful_step_count=50 if DEEP else 25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEmaUser = EmaUser.TestCase
