"""paddle_ema.compat: a client's EMA checkpoint, written as the client writes it (its formula re-typed
in numpy), carried on by a ModelEMA configured like the client, which then goes on as the client
would; and save() writing what load() reads back."""

from __future__ import annotations

import os

import numpy as np
import paddle
import pytest
from test_clients import Net, floats, train_step

import paddle_ema
from paddle_ema import compat

# Eager code only: once per Paddle release (conftest.py).
pytestmark = pytest.mark.eager

K, M = 5, 4  # steps before the checkpoint, and after the resume



def trained(rng, client_step, shadow, steps, model=None, opt=None):
    model = model or Net()
    opt = opt or paddle.optimizer.Adam(0.05, parameters=model.parameters())
    for step in range(steps):
        train_step(model, opt, rng)
        client_step(step, floats(model))
    return model, opt


def go_on(model, opt, ema, rng, client_step, first):
    for step in range(first, first + M):
        train_step(model, opt, rng)
        ema.update()
        client_step(step, floats(model))


def assert_applied(ema, expected, what):
    ours = ema.averages()
    for name in ema.names:
        np.testing.assert_allclose(ours[name].numpy(), expected[name], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{what}: {name}")


def test_ppdet_checkpoint_resumes(dygraph, rng, tmp_path):
    decay, state = 0.9, {}

    def ppdet(step, m):  # ema_decay_type "normal": S = d S + (1 - d) W from zeros
        for k, v in m.items():
            state[k] = decay * state.get(k, 0.0) + (1 - decay) * v

    model, opt = trained(rng, ppdet, state, K)
    prefix = str(tmp_path / "epoch_1")
    applied = {k: (v / (1 - decay ** K)).astype("float32") for k, v in state.items()}
    paddle.save({**{k: v for k, v in model.state_dict().items()}, **applied}, prefix + ".pdparams")
    paddle.save({"LR_Scheduler": {"last_epoch": K}}, prefix + ".pdopt")
    ema = paddle_ema.ModelEMA(model, decay)
    compat.load(ema, prefix, format="ppdet")
    assert ema.num_updates == K
    go_on(model, opt, ema, rng, ppdet, K)
    assert_applied(ema, {k: v / (1 - decay ** (K + M)) for k, v in state.items()}, "ppdet resumed")


def test_ppcls_checkpoint_resumes(dygraph, rng, tmp_path):
    decay = 0.8
    model = Net()
    shadow = floats(model)

    def ppcls(step, m):
        for k in shadow:
            shadow[k] = decay * shadow[k] + (1 - decay) * m[k]

    model, opt = trained(rng, ppcls, shadow, K, model=model)
    prefix = str(tmp_path / "latest")
    paddle.save({k: v.astype("float32") for k, v in shadow.items()}, prefix + ".pdparams")
    ema = paddle_ema.ModelEMA(model, decay, init="weights")
    compat.load(ema, prefix, format="ppcls")
    go_on(model, opt, ema, rng, ppcls, K)
    assert_applied(ema, shadow, "ppcls resumed")


def test_ppseg_checkpoint_resumes_with_the_step_of_its_directory(dygraph, rng, tmp_path):
    model = Net()
    shadow = floats(model)

    def ppseg(step, m):
        d = min(1 - 1 / (step + 2), 0.999)
        for k in shadow:
            shadow[k] = d * shadow[k] + (1 - d) * m[k]

    model, opt = trained(rng, ppseg, shadow, K, model=model)
    directory = tmp_path / f"iter_{K}"
    directory.mkdir()
    paddle.save({k: v.astype("float32") for k, v in shadow.items()}, str(directory / "ema_model.pdparams"))
    ema = paddle_ema.ModelEMA(model, 0.999, init="weights", warmup="power", power=1.0)
    compat.load(ema, str(directory), format="ppseg")
    assert ema.num_updates == K
    go_on(model, opt, ema, rng, ppseg, K)
    assert_applied(ema, shadow, "ppseg resumed")


def test_ppdiffusers_state_resumes_and_saves_back(dygraph, rng, tmp_path):
    decay, uas, power = 0.999, 1, 2 / 3
    model = Net()
    model.fc1.bias.stop_gradient = True
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if not p.stop_gradient}
    shadow = {n: v for n, v in floats(model).items() if n in params}

    def ppdiffusers(step, m):
        s = step + 1 - uas
        d = 0.0 if s <= 0 else min(1 - (1 + s) ** -power, decay)
        for k in shadow:
            shadow[k] = shadow[k] - (1 - d) * (shadow[k] - m[k]) if k in trainable else m[k]

    model, opt = trained(rng, ppdiffusers, shadow, K, model=model)
    state = {"decay": decay, "min_decay": 0.0, "optimization_step": K, "update_after_step": uas,
             "use_ema_warmup": True, "inv_gamma": 1.0, "power": power,
             "shadow_params": [paddle.to_tensor(shadow[n].astype("float32")) for n in params]}
    ema = paddle_ema.ModelEMA(model, decay, init="weights", frozen="copy", buffers=False, start_step=uas,
                              warmup="power", power=power)
    compat.load(ema, state, format="ppdiffusers")
    go_on(model, opt, ema, rng, ppdiffusers, K)
    assert_applied(ema, shadow, "ppdiffusers resumed")
    compat.save(ema, str(tmp_path / "ema"), format="ppdiffusers")
    saved = paddle.load(str(tmp_path / "ema.pdparams"))
    assert saved["optimization_step"] == K + M
    for name, value in zip(params, saved["shadow_params"]):
        np.testing.assert_allclose(value.numpy(), shadow[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("format, options", [
    ("ppdet", dict(warmup="threshold")), ("ppcls", dict(init="weights")),
    ("ppseg", dict(init="weights", warmup="power", power=1.0)),
])
def test_save_writes_what_load_reads(dygraph, rng, tmp_path, format, options):
    model = Net()
    opt = paddle.optimizer.SGD(0.1, parameters=model.parameters())
    ema = paddle_ema.ModelEMA(model, 0.9, **options)
    for _ in range(3):
        train_step(model, opt, rng)
        ema.update()
    prefix = str(tmp_path / "ckpt")
    compat.save(ema, prefix, format=format)
    if format in ("ppdet", "ppcls"):
        raw = paddle.load(prefix + ".pdema")
        for name, value in model.state_dict().items():
            np.testing.assert_array_equal(raw[name].numpy(), value.numpy(), err_msg=f".pdema {name}")
    resumed = paddle_ema.ModelEMA(model, 0.9, **options)
    compat.load(resumed, prefix, format=format, step=ema.num_updates)
    mine, theirs = ema.averages(), resumed.averages()
    for name in ema.names:
        np.testing.assert_allclose(theirs[name].numpy(), mine[name].numpy(), rtol=1e-6, err_msg=name)


def test_bad_sources_raise_and_change_nothing(dygraph, rng, tmp_path):
    model = Net()
    opt = paddle.optimizer.SGD(0.1, parameters=model.parameters())
    ema = paddle_ema.ModelEMA(model, 0.9)
    for _ in range(2):
        train_step(model, opt, rng)
        ema.update()
    before = {n: v.numpy() for n, v in ema.averages().items()}
    good = {k: v for k, v in model.state_dict().items()}
    cases = [
        (dict(source=good, format="ppcls"), "build the ModelEMA with init='weights'"),
        (dict(source=good, format="yolo"), "format must be one of"),
        (dict(source=good, format="ppdet"), "holds no EMA step count: pass step="),
        (dict(source={**good, "head.w": np.ones(2, "float32")}, format="ppdet", step=2), "another model's"),
        (dict(source={k: v for k, v in good.items() if k != "fc1.weight"}, format="ppdet", step=2),
         "no average of \\['fc1.weight'\\]"),
        (dict(source={**good, "fc1.weight": np.ones((4, 6), "int64")}, format="ppdet", step=2),
         "not a floating-point array"),
        (dict(source=good, format="ppdet", step=-1), "step must be an int of at least 0"),
        (dict(source=str(tmp_path / "missing"), format="ppdet", step=1), "no file"),
    ]
    for kwargs, says in cases:
        error = FileNotFoundError if says == "no file" else ValueError
        with pytest.raises(error, match=says):
            compat.load(ema, **kwargs)
        assert ema.num_updates == 2
        for name, value in ema.averages().items():
            np.testing.assert_array_equal(value.numpy(), before[name], err_msg=f"{kwargs}: {name}")
    weights = paddle_ema.ModelEMA(model, 0.9, init="weights", buffers=False, warmup="power")
    state = {"decay": 0.5, "optimization_step": 1, "shadow_params": [p for p in model.parameters()]}
    with pytest.raises(ValueError, match="configured otherwise: decay=0.5"):
        compat.load(weights, state, format="ppdiffusers")
    assert os.path.exists(tmp_path)


def test_a_huge_bad_value_is_shown_short(dygraph):
    model = Net()
    ema = paddle_ema.ModelEMA(model, 0.9)
    weights = paddle_ema.ModelEMA(model, 0.9, init="weights", buffers=False, warmup="power")
    big = np.arange(100_000, dtype="float32")
    shadow = [p for p in model.parameters()]
    cases = [
        (ema, dict(source={}, format="x" * 100_000), "format must be one of"),
        (ema, dict(source=model.state_dict(), format="ppdet", step=big), "step must be an int of at least 0"),
        (weights, dict(source={"decay": paddle.to_tensor(0.5), "optimization_step": 1,
                               "shadow_params": shadow}, format="ppdiffusers"),
         "configured otherwise: decay=Tensor(shape=[]"),
    ]
    for target, kwargs, says in cases:
        with pytest.raises(ValueError) as info:
            compat.load(target, **kwargs)
        message = str(info.value)
        assert says in message, message
        assert "\n" not in message and len(message) < 500, message
