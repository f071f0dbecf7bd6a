"""The library prints nothing and triggers no warning, its own or Paddle's, in ordinary use."""

from __future__ import annotations

import warnings

import paddle
import pytest
from test_callbacks import Points, prepared

import paddle_ema
from paddle_ema import compat
from paddle_ema.callbacks import EMACallback


def rearm_paddle_warnings():
    """Paddle warns about paddle.to_tensor(tensor) once per process: re-arm it, so that an earlier
    call cannot hide one that follows."""
    creation = paddle.tensor.creation
    if hasattr(creation, "_warned_in_tensor"):
        creation._warned_in_tensor = False


@pytest.fixture
def heard(capfd):
    """Everything written to stdout/stderr (Python and C++) and every Python warning since the last
    call of ``heard()``, which returns it."""
    rearm_paddle_warnings()
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def read():
            out, err = capfd.readouterr()
            text = out + err + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
            caught.clear()
            rearm_paddle_warnings()
            return text

        yield read


def train(model, opt, ema, rng, steps):
    for _ in range(steps):
        loss = model(paddle.to_tensor(rng.standard_normal((8, 4)).astype("float32"))).square().mean()
        loss.backward()
        opt.step()
        opt.clear_grad()
        ema.update()


def test_model_ema_says_nothing(dygraph, rng, tmp_path, heard):
    model = paddle.nn.Sequential(paddle.nn.Linear(4, 8), paddle.nn.ReLU(), paddle.nn.Linear(8, 2))
    model.register_buffer("scale", paddle.ones([2]))  # buffers are averaged too
    opt = paddle.optimizer.Adam(0.05, parameters=model.parameters())
    ema = paddle_ema.ModelEMA(model, 0.9)
    train(model, opt, ema, rng, 3)
    state = ema.state_dict()
    paddle.save(state, str(tmp_path / "ema.pdparams"))
    ema.set_state_dict(state)
    ema.set_state_dict(paddle.load(str(tmp_path / "ema.pdparams")))
    ema.set_state_dict({**state, "averages": {k: v.numpy() for k, v in state["averages"].items()}})
    with ema.apply():
        model(paddle.ones([2, 4]))
    ema.apply(need_restore=False)
    ema.restore()
    ema.averages()
    for format in compat.FORMATS:
        init = "zeros" if format == "ppdet" else "weights"
        client = paddle_ema.ModelEMA(model, 0.9, init=init, buffers=format != "ppdiffusers",
                                     warmup="power" if format == "ppdiffusers" else None)
        train(model, opt, client, rng, 1)
        prefix = str(tmp_path / format)
        compat.save(client, prefix, format=format)
        source = paddle.load(prefix + ".pdparams") if format == "ppdiffusers" else prefix
        compat.load(client, source, format=format, **({} if format == "ppdiffusers" else {"step": 1}))
    assert heard() == ""


def test_the_callback_adds_nothing_to_what_fit_prints(dygraph, tmp_path, heard):
    """hapi itself prints and warns (its checkpoints, paddle.to_tensor on the labels): the same fit
    with the callback must print just that."""

    def fit(callbacks):
        paddle.seed(3)
        _, model = prepared()
        model.fit(Points(), Points(16, 1), batch_size=16, epochs=2, callbacks=callbacks, verbose=0,
                  save_dir=str(tmp_path))
        model.evaluate(Points(16, 1), batch_size=16, callbacks=callbacks, verbose=0)
        return heard()

    heard()
    without = fit([])
    ema = EMACallback(decay=0.9, warmup="threshold")
    assert fit([ema]) == without
    assert ema.ema.num_updates == 6
