"""A hypothesis state machine over what a dygraph user can do with two ModelEMAs of one model.

Rules: train; apply in a ``with`` block (ending normally, by an exception or by KeyboardInterrupt);
apply with ``need_restore=False``; restore (in or out of order); an apply interrupted while it writes
the weights; update while applied (refused); save and load through ``paddle.save``/``paddle.load``.
After every rule each weight is bit-exactly its raw trained value, or while averages are applied, the
bias-corrected average (per the float64 oracle) of the EMA applied last; after any restore,
bit-exactly what it was before that apply.
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
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from nets import IN_FEATURES
from oracle import EmaOracle
from test_stateful import EmaUser

import paddle_ema
from paddle_ema import _ir

EMAS = st.sampled_from(["a", "b"])


class InterruptedSwap:
    """``_ir.eager_swap_in`` raising KeyboardInterrupt at its call ``at`` (once), before or after
    swapping: Ctrl-C while apply or restore points the weights at other tensors."""

    def __init__(self, at, when):
        self.at, self.when, self.calls, self.original = at, when, 0, _ir.eager_swap_in

    def __call__(self, tensor, source):
        call, self.calls = self.calls, self.calls + 1
        if call == self.at and self.when == "before":
            raise KeyboardInterrupt
        self.original(tensor, source)
        if call == self.at and self.when == "after":
            raise KeyboardInterrupt


class ModelEmaUser(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        paddle.disable_static()
        paddle.seed(5)
        self.model = paddle.nn.Sequential(paddle.nn.Linear(IN_FEATURES, 4), paddle.nn.BatchNorm1D(4),
                                          paddle.nn.Linear(4, 2))
        self.opt = paddle.optimizer.Adam(0.05, parameters=self.model.parameters())
        self.emas = {"a": paddle_ema.ModelEMA(self.model, 0.9),
                     "b": paddle_ema.ModelEMA(self.model, 0.99, warmup="threshold")}
        self.names = self.emas["a"].names
        self.oracles = {key: EmaOracle(ema.decay, self.names) for key, ema in self.emas.items()}
        self.rng = np.random.default_rng(0)
        self.raw = self.weights()
        self.applied: list[tuple[str, dict[str, np.ndarray]]] = []  # (EMA, weights before its apply)
        self.checkpoint_dir = tempfile.mkdtemp()
        self.checkpoint = None

    def teardown(self):
        for key, _ in reversed(self.applied):
            self.emas[key].restore()
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        paddle.enable_static()

    def weights(self):
        return {n: self.emas["a"]._tensors[n].numpy().copy() for n in self.names}

    def is_applied(self, key):
        return any(k == key for k, _ in self.applied)

    def assert_bit_exact(self, expected, what):
        for name, value in self.weights().items():
            np.testing.assert_array_equal(value, expected[name], err_msg=f"{what}: {name}")

    def assert_averages_of(self, key, what):
        oracle = self.oracles[key]
        if oracle.steps == 0:  # apply before any update leaves the weights as they are
            return
        for name, value in self.weights().items():
            np.testing.assert_allclose(value, oracle.debiased(name), rtol=1e-5, atol=1e-7,
                                       err_msg=f"{what}: {name} while {key} is applied")

    @precondition(lambda self: not self.applied)
    @rule()
    def train(self):
        x = paddle.to_tensor(self.rng.standard_normal((8, IN_FEATURES)).astype("float32"))
        self.model(x).square().mean().backward()
        self.opt.step()
        self.opt.clear_grad()
        self.raw = self.weights()
        for key, ema in self.emas.items():
            update = ema.num_updates
            ema.update()
            self.oracles[key].step(self.raw, thres_value=update if key == "b" else None)

    @precondition(lambda self: self.applied)
    @rule(key=EMAS)
    def update_while_applied_is_refused(self, key):
        values, count = self.weights(), self.emas[key].num_updates
        with pytest.raises(RuntimeError, match="would average the averages"):
            self.emas[key].update()
        assert self.emas[key].num_updates == count
        self.assert_bit_exact(values, "after a refused update")

    @rule(key=EMAS, ending=st.sampled_from(["normally", "exception", "interrupt"]))
    def apply_in_a_with_block(self, key, ending):
        if self.is_applied(key):
            return
        before = self.weights()
        raised = {"exception": ValueError, "interrupt": KeyboardInterrupt}.get(ending)
        with contextlib.suppress(ValueError, KeyboardInterrupt):
            with self.emas[key].apply():
                self.assert_averages_of(key, "inside with")
                if raised:
                    raise raised
        self.assert_bit_exact(before, f"after a with block ending {ending}")

    @rule(key=EMAS)
    def apply_and_keep(self, key):
        if self.is_applied(key):
            return
        before = self.weights()
        self.emas[key].apply(need_restore=False)
        self.applied.append((key, before))

    @rule(key=EMAS)
    def restore(self, key):
        if not self.is_applied(key):
            self.emas[key].restore()  # a no-op with a warning
            return
        if self.applied[-1][0] != key:
            values = self.weights()
            with pytest.raises(RuntimeError, match="reverse order"):
                self.emas[key].restore()
            self.assert_bit_exact(values, "after a refused out-of-order restore")
            return
        _, before = self.applied.pop()
        self.emas[key].restore()
        self.assert_bit_exact(before, "after restore")

    @rule(key=EMAS, at=st.integers(0, 8), when=st.sampled_from(["before", "after"]))
    def interrupted_apply(self, key, at, when):
        if self.is_applied(key):
            return
        before = self.weights()
        interrupting = InterruptedSwap(at, when)
        _ir.eager_swap_in = interrupting
        try:
            with contextlib.suppress(KeyboardInterrupt):
                self.emas[key].apply(need_restore=False)
        finally:
            _ir.eager_swap_in = interrupting.original
        if self.emas[key]._applied is not None:  # the interrupt missed: it is applied
            self.applied.append((key, before))
            return
        self.assert_bit_exact(before, f"after an apply interrupted {when} swap {at}")

    @precondition(lambda self: self.applied)
    @rule(at=st.integers(0, 8))
    def interrupted_restore(self, at):
        key, before = self.applied[-1]
        interrupting = InterruptedSwap(at, "before")
        _ir.eager_swap_in = interrupting
        try:
            with contextlib.suppress(KeyboardInterrupt):
                self.emas[key].restore()
        finally:
            _ir.eager_swap_in = interrupting.original
        if self.emas[key]._applied is None:  # the interrupt missed: it is restored
            self.applied.pop()
            self.assert_bit_exact(before, "after restore")
            return
        self.emas[key].restore()  # an interrupted restore is finished by calling it again
        self.applied.pop()
        self.assert_bit_exact(before, f"after a restore interrupted at swap {at}, then finished")

    @precondition(lambda self: not self.applied)
    @rule()
    def save(self):
        for key, ema in self.emas.items():
            paddle.save(ema.state_dict(), os.path.join(self.checkpoint_dir, f"{key}.pdparams"))
        self.checkpoint = copy.deepcopy(self.oracles)

    @precondition(lambda self: not self.applied and self.checkpoint is not None)
    @rule()
    def load(self):
        for key, ema in self.emas.items():
            ema.set_state_dict(paddle.load(os.path.join(self.checkpoint_dir, f"{key}.pdparams")))
        self.oracles = copy.deepcopy(self.checkpoint)

    @invariant()
    def weights_are_raw_or_the_last_applied_average(self):
        if not self.applied:
            self.assert_bit_exact(self.raw, "nothing applied")
        else:
            self.assert_averages_of(self.applied[-1][0], "applied")


ModelEmaUser.TestCase.settings = EmaUser.TestCase.settings  # as many examples (PADDLE_EMA_DEEP too)
TestModelEmaUser = ModelEmaUser.TestCase
