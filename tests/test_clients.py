"""ModelEMA configured as each client configures its own EMA, against that client's formula re-typed in
plain numpy from reading its source (PaddleClas ppcls/utils/ema.py, PaddleSeg paddleseg/core/train.py,
PaddleMIX ppdiffusers/training_utils.py EMAModel, PaddleDetection ppdet/optimizer/ema.py), over a
training run. Also the options that make this possible: init, frozen, warmup="exponential", reset,
current_decay, averaged_model."""

from __future__ import annotations

import math

import numpy as np
import paddle
import pytest

import paddle_ema

# Eager code only: once per Paddle release (conftest.py).
pytestmark = pytest.mark.eager

RTOL = 1e-5
STEPS = 30



class Net(paddle.nn.Layer):
    """fc -> BatchNorm1D -> fc, and a float buffer the training moves."""

    def __init__(self):
        super().__init__()
        self.fc1 = paddle.nn.Linear(4, 6)
        self.bn = paddle.nn.BatchNorm1D(6)
        self.fc2 = paddle.nn.Linear(6, 2)
        self.register_buffer("scale", paddle.ones([2]))

    def forward(self, x):
        return self.fc2(self.bn(self.fc1(x))) * self.scale


def floats(model) -> dict[str, np.ndarray]:
    """The model's floating-point state, float64, by name."""
    return {n: t.numpy().astype(np.float64) for n, t in model.state_dict().items()
            if paddle.is_floating_point(t)}


def train_step(model, opt, rng):
    model.train()
    x = paddle.to_tensor(rng.standard_normal((8, 4)).astype("float32"))
    model(x).square().mean().backward()
    opt.step()
    opt.clear_grad()
    with paddle.no_grad():
        model.scale.set_value(model.scale * 0.95 + 0.1)


def run(model, ema, rng, client_update, steps=STEPS):
    """Train ``steps`` steps; after each, ``ema.update()`` and the client's numpy update."""
    opt = paddle.optimizer.Adam(0.05, parameters=model.parameters())
    for step in range(steps):
        train_step(model, opt, rng)
        ema.update()
        client_update(step, floats(model))


def assert_matches(ema, expected, what, rtol=RTOL):
    ours = {n: v.numpy() for n, v in ema.averages().items()}
    assert sorted(ours) == sorted(expected), what
    for name, value in expected.items():
        np.testing.assert_allclose(ours[name], value, rtol=rtol, atol=1e-6, err_msg=f"{what}: {name}")


def test_paddleclas(dygraph, rng):
    """ppcls ExponentialMovingAverage: a deepcopy of the model, e = D e + (1 - D) m for every state
    entry (batch-norm statistics and buffers too), no warm-up, no bias correction."""
    model, decay = Net(), 0.9
    ema = paddle_ema.ModelEMA(model, decay, init="weights")
    shadow = floats(model)

    def ppcls(step, m):
        for k in shadow:
            shadow[k] = decay * shadow[k] + (1 - decay) * m[k]

    run(model, ema, rng, ppcls)
    assert_matches(ema, shadow, "PaddleClas")


def test_paddleseg(dygraph, rng):
    """PaddleSeg train.py: the EMA starts at the weights, then at iteration i (from 1)
    d = min(i / (i + 1), 0.999) for every floating-point state entry, no bias correction."""
    model = Net()
    ema = paddle_ema.ModelEMA(model, 0.999, init="weights", warmup="power", power=1.0)
    shadow = floats(model)

    def ppseg(step, m):
        i = step + 1
        d = min(1 - 1 / (i + 1), 0.999)
        for k in shadow:
            shadow[k] = d * shadow[k] + (1 - d) * m[k]

    run(model, ema, rng, ppseg)
    assert_matches(ema, shadow, "PaddleSeg")


@pytest.mark.parametrize("options", [
    dict(use_ema_warmup=True, update_after_step=2, min_decay=0.0, power=2 / 3, inv_gamma=1.0),
    dict(use_ema_warmup=True, update_after_step=0, min_decay=0.5, power=0.75, inv_gamma=2.0),
    dict(use_ema_warmup=False, update_after_step=0, min_decay=0.0),
], ids=["warm-up, update_after_step 2", "warm-up, min_decay", "no warm-up"])
def test_ppdiffusers_ema_model(dygraph, rng, options):
    """ppdiffusers EMAModel: shadow = clones of the parameters; at step n (from 1), s = n -
    update_after_step; d = 0 for s <= 0, else 1 - (1 + s / inv_gamma) ** -power (warm-up) or
    (1 + s) / (10 + s), clipped to [min_decay, decay]; trainable parameters s -= (1 - d)(s - p),
    the others (stop_gradient, batch-norm statistics) copied. cur_decay_value is d."""
    model, decay = Net(), 0.999
    model.fc1.bias.stop_gradient = True  # a frozen parameter: copied, not averaged
    warm = options["use_ema_warmup"]
    ema = paddle_ema.ModelEMA(
        model, decay, init="weights", frozen="copy", start_step=options["update_after_step"],
        min_decay=options["min_decay"], warmup="power" if warm else "threshold",
        **({"power": options["power"], "inv_gamma": options["inv_gamma"]} if warm else {}),
    )
    trainable = {n for n, p in model.named_parameters() if not p.stop_gradient}
    shadow = {n: v for n, v in floats(model).items() if n in dict(model.named_parameters())}
    decays = []

    def ppdiffusers(step, m):
        s = step + 1 - options["update_after_step"]
        if s <= 0:
            d = 0.0
        else:
            d = 1 - (1 + s / options["inv_gamma"]) ** -options["power"] if warm else (1 + s) / (10 + s)
            d = max(min(d, decay), options["min_decay"])
        decays.append(d)
        for k in shadow:
            shadow[k] = shadow[k] - (1 - d) * (shadow[k] - m[k]) if k in trainable else m[k]

    run(model, ema, rng, ppdiffusers)
    assert ema.current_decay == pytest.approx(decays[-1], rel=1e-6)
    ours = ema.averages()
    ours.pop("scale")  # a buffer: EMAModel takes parameters() only (the recipe passes buffers=False)
    for name, value in shadow.items():
        np.testing.assert_allclose(ours[name].numpy(), value, rtol=RTOL, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kind", ["normal", "exponential", "threshold"])
def test_paddledetection_model_ema(dygraph, rng, kind):
    """ppdet ModelEMA: zeros; d = D, D (1 - exp(-(t + 1) / 2000)) or min(D, (1 + t) / (10 + t)) at
    update t (from 0); apply() gives S / (1 - d_last ** n) ('normal', 'threshold') or S itself
    ('exponential'). Exact for 'normal'; for 'exponential' the zero start's residue, which ppdet
    does not divide out, is below 1e-6 after two updates; for 'threshold' ppdet's correction by the
    last decay over-corrects (ours divides by the product of the decays used)."""
    model, decay = Net(), 0.9998
    warmup = {"normal": None, "exponential": "exponential", "threshold": "threshold"}[kind]
    ema = paddle_ema.ModelEMA(model, decay, warmup=warmup)
    state = {k: np.zeros_like(v) for k, v in floats(model).items()}
    last = {}

    def ppdet(step, m):
        d = {"normal": decay, "exponential": decay * (1 - math.exp(-(step + 1) / 2000)),
             "threshold": min(decay, (1 + step) / (10 + step))}[kind]
        last["d"] = d
        for k in state:
            state[k] = d * state[k] + (1 - d) * m[k]

    run(model, ema, rng, ppdet)
    if kind == "exponential":
        applied = state
    else:
        applied = {k: v / (1 - last["d"] ** STEPS) for k, v in state.items()}
    assert ema.current_decay == pytest.approx(last["d"], rel=1e-6)
    # ppdet's threshold correction: (1 - prod d) / (1 - d_last ** n) - 1 is ~ 1e-2 after 30 steps.
    assert_matches(ema, applied, f"PaddleDetection {kind}", rtol=3e-2 if kind == "threshold" else RTOL)


def test_init_weights_applies_the_copy_before_any_update(dygraph, rng):
    import warnings

    model = Net()
    ema = paddle_ema.ModelEMA(model, 0.9, init="weights")
    copy = floats(model)
    opt = paddle.optimizer.SGD(0.1, parameters=model.parameters())
    train_step(model, opt, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ema.apply():
            for name, value in floats(model).items():
                np.testing.assert_allclose(value, copy[name], rtol=1e-7, err_msg=name)
    assert ema.current_decay is None


def test_reset_starts_over_as_init_says(dygraph, rng):
    for init in ("zeros", "weights"):
        model = Net()
        ema = paddle_ema.ModelEMA(model, 0.9, init=init)
        opt = paddle.optimizer.SGD(0.1, parameters=model.parameters())
        for _ in range(3):
            train_step(model, opt, rng)
            ema.update()
        ema.reset()
        assert ema.num_updates == 0 and ema.current_decay is None
        fresh = paddle_ema.ModelEMA(model, 0.9, init=init)
        for _ in range(2):
            train_step(model, opt, rng)
            ema.update()
            fresh.update()
        mine, theirs = ema.averages(), fresh.averages()
        for name in mine:
            np.testing.assert_array_equal(mine[name].numpy(), theirs[name].numpy(), err_msg=f"{init}: {name}")
        with ema.apply(), pytest.raises(RuntimeError, match="reset\\(\\) while the averages are applied"):
            ema.reset()


def test_averaged_model_is_an_independent_copy_holding_the_averages(dygraph, rng):
    model = Net()
    ema = paddle_ema.ModelEMA(model, 0.9)
    opt = paddle.optimizer.SGD(0.1, parameters=model.parameters())
    for _ in range(3):
        train_step(model, opt, rng)
        ema.update()
    trained = floats(model)
    twin = ema.averaged_model()
    assert type(twin) is Net
    averages = ema.averages()
    for name, value in floats(twin).items():
        np.testing.assert_array_equal(value, averages[name].numpy().astype(np.float64), err_msg=name)
    for name, value in floats(model).items():
        np.testing.assert_array_equal(value, trained[name], err_msg=f"the model's {name}")
    train_step(model, opt, rng)  # training goes on: the twin keeps its values
    for name, value in floats(twin).items():
        np.testing.assert_array_equal(value, averages[name].numpy().astype(np.float64), err_msg=name)


def test_frozen_exclude_leaves_out_what_does_not_train(dygraph):
    model = Net()
    model.fc1.bias.stop_gradient = True
    ema = paddle_ema.ModelEMA(model, 0.9, frozen="exclude")
    assert "fc1.bias" not in ema.names and "bn._mean" not in ema.names and "fc1.weight" in ema.names
    assert "fc1.bias" not in ema.averages()


@pytest.mark.parametrize("options, says", [
    (dict(init="ones"), "init must be 'zeros' or 'weights'"),
    (dict(frozen="skip"), "frozen must be 'average', 'copy' or 'exclude'"),
    (dict(tau=100.0), "tau shapes warmup='exponential' only"),
    (dict(warmup="exponential", tau=-1.0), "tau must be positive"),
])
def test_bad_new_options_raise(dygraph, options, says):
    with pytest.raises(ValueError, match=says):
        paddle_ema.ModelEMA(Net(), 0.9, **options)


def test_set_state_dict_of_an_init_weights_ema_keeps_no_correction(dygraph, rng):
    model = Net()
    ema = paddle_ema.ModelEMA(model, 0.9, init="weights")
    opt = paddle.optimizer.SGD(0.1, parameters=model.parameters())
    train_step(model, opt, rng)
    ema.update()
    state = ema.state_dict()
    assert state["bias_correction"] == 1.0
    ema.set_state_dict(state)
    with pytest.raises(ValueError, match="with init='weights' it is 1"):
        ema.set_state_dict(dict(state, bias_correction=0.5))


def test_paddledetection_filter_no_grad_recipe(dygraph, rng):
    """ppdet ModelEMA(ema_filter_no_grad=True): stop_gradient parameters are black-listed (apply()
    gives their live value) except the running statistics of BatchNorm2D/SyncBatchNorm, which are
    averaged. docs/clients.md's recipe: exclude the frozen names that are not batch-norm statistics."""
    import re

    model = paddle.nn.Sequential(paddle.nn.Conv2D(2, 3, 1), paddle.nn.BatchNorm2D(3),
                                 paddle.nn.Conv2D(3, 1, 1))
    model[0].weight.stop_gradient = True  # a frozen weight
    frozen = [n for n, p in model.named_parameters()
              if p.stop_gradient and not n.endswith(("._mean", "._variance"))]
    ema = paddle_ema.ModelEMA(model, 0.9, exclude=[re.escape(n) for n in frozen])
    black = set(frozen)
    state = {k: np.zeros_like(v) for k, v in floats(model).items()}
    opt = paddle.optimizer.SGD(0.1, parameters=[p for p in model.parameters() if not p.stop_gradient])
    for _ in range(5):
        model.train()
        x = paddle.to_tensor(rng.standard_normal((2, 2, 3, 3)).astype("float32"))
        model(x).square().mean().backward()
        opt.step()
        opt.clear_grad()
        ema.update()
        for k, v in floats(model).items():
            state[k] = 0.9 * state[k] + 0.1 * v
    live = floats(model)
    applied = {k: live[k] if k in black else v / (1 - 0.9 ** 5) for k, v in state.items()}
    assert "1._mean" in ema.names and "0.weight" not in ema.names
    with ema.apply():
        for name, value in floats(model).items():
            np.testing.assert_allclose(value, applied[name], rtol=RTOL, atol=1e-6, err_msg=name)
