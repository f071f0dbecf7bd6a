"""A hypothesis state machine over a model that changes while a ModelEMA averages it.

Rules: train (the forward re-binds a float and an int buffer each call); evaluate under apply (the
forward re-binds them again); replace a parameter object; add an adapter sublayer; cast the model to
float64; save and load the EMA's state (a state from before the adapter was added is refused, nothing
changed). After every rule each tensor of the model is bit-exactly what training left (nothing is
applied outside the rules), and at every apply the averages match a float64 oracle that treats an
added tensor as if it had always held the value it had at its first update.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import paddle
import pytest
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from test_dygraph_changes import Seen
from test_stateful import EmaUser

import paddle_ema

DECAY = 0.8


class Counting(Seen):
    """Seen, and an adapter once one is added."""

    def forward(self, x):
        y = super().forward(x)
        return y + self.adapter(x) if "adapter" in self._sub_layers else y


class Oracle:
    """float64 averages by name; a name first seen (at an update, apply or averages call) starts as
    if it had always held the value it has then (its average is then theta * (1 - prod d))."""

    def __init__(self):
        self.averages: dict[str, np.ndarray] = {}
        self.product = 1.0

    def see(self, values):
        for name, theta in values.items():
            if name not in self.averages:
                self.averages[name] = np.asarray(theta, np.float64) * (1.0 - self.product)

    def step(self, values):
        self.see(values)
        for name, theta in values.items():
            self.averages[name] = DECAY * self.averages[name] + (1.0 - DECAY) * np.asarray(theta, np.float64)
        self.product *= DECAY

    def debiased(self, name):
        return self.averages[name] / (1.0 - self.product)


def float_state(model):
    return {n: t.numpy().copy() for n, t in model.state_dict().items() if paddle.is_floating_point(t)}


def every_state(model):
    return {n: t.numpy().copy() for n, t in model.state_dict().items()}


class ChangingModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        paddle.disable_static()
        paddle.seed(3)
        self.model = Counting()
        self.ema = paddle_ema.ModelEMA(self.model, DECAY)
        self.oracle = Oracle()
        self.rng = np.random.default_rng(1)
        self.trained = every_state(self.model)
        self.directory = tempfile.mkdtemp()
        self.saved = None  # (names averaged when saved, oracle then)

    def teardown(self):
        shutil.rmtree(self.directory, ignore_errors=True)
        paddle.enable_static()

    def batch(self):
        dtype = "float64" if self.model.fc.weight.dtype == paddle.float64 else "float32"
        return paddle.to_tensor(self.rng.standard_normal((2, 3)).astype(dtype))

    @rule()
    def train(self):
        opt = paddle.optimizer.SGD(0.1, parameters=self.model.parameters())
        self.model(self.batch()).square().mean().backward()
        opt.step()
        opt.clear_grad()
        self.ema.update()
        self.oracle.step(float_state(self.model))
        self.trained = every_state(self.model)

    @rule()
    def evaluate_under_apply(self):
        if self.oracle.product == 1.0:
            return  # no update yet: apply leaves the model as it is
        self.oracle.see(float_state(self.model))
        with self.ema.apply():
            applied = float_state(self.model)
            for name, value in applied.items():
                    np.testing.assert_allclose(value, self.oracle.debiased(name), rtol=1e-5, atol=1e-6,
                                           err_msg=f"{name} applied")
            self.model(self.batch())  # re-binds seen and calls while applied

    @rule()
    def replace_a_parameter_object(self):
        value = self.model.fc.weight.numpy()
        weight = paddle.create_parameter(list(value.shape), str(value.dtype))
        weight.set_value(value + 0.5)
        self.model.fc.weight = weight
        self.trained = every_state(self.model)

    @precondition(lambda self: "adapter" not in self.model._sub_layers)
    @rule()
    def add_an_adapter(self):
        self.model.adapter = paddle.nn.Linear(3, 2)
        self.model.adapter.to(dtype=self.model.fc.weight.dtype)
        self.trained = every_state(self.model)

    @precondition(lambda self: self.model.fc.weight.dtype == paddle.float32)
    @rule()
    def cast_to_float64(self):
        self.model.to(dtype="float64")
        self.trained = every_state(self.model)

    @rule()
    def save(self):
        paddle.save(self.ema.state_dict(), os.path.join(self.directory, "ema.pdparams"))
        self.saved = (sorted(self.ema.names), {n: a.copy() for n, a in self.oracle.averages.items()},
                      self.oracle.product)

    @precondition(lambda self: self.saved is not None)
    @rule()
    def load(self):
        names, averages, product = self.saved
        state = paddle.load(os.path.join(self.directory, "ema.pdparams"))
        self.ema.averages()  # the EMA sees the model as it is now (it may have gained tensors)
        self.oracle.see(float_state(self.model))
        if names != sorted(self.ema.names):
            counts = (self.ema.num_updates, self.ema._bias_correction)
            with pytest.raises(ValueError, match="averages other tensors"):
                self.ema.set_state_dict(state)
            assert (self.ema.num_updates, self.ema._bias_correction) == counts
            return
        self.ema.set_state_dict(state)
        self.oracle.averages = {n: a.copy() for n, a in averages.items()}
        self.oracle.product = product

    @invariant()
    def the_model_holds_what_training_left(self):
        for name, value in every_state(self.model).items():
            np.testing.assert_array_equal(value, self.trained[name], err_msg=name)


ChangingModel.TestCase.settings = EmaUser.TestCase.settings
TestChangingModel = ChangingModel.TestCase
