"""paddle_ema.callbacks.EMACallback in paddle.Model.fit: updates per batch, evaluation under the
averages with a bit-exact restore, averaged weights saved beside fit's checkpoints."""

from __future__ import annotations

import os

import numpy as np
import paddle
import pytest

import paddle_ema
from paddle_ema.callbacks import EMACallback


class Points(paddle.io.Dataset):
    def __init__(self, n=48, seed=0):
        rng = np.random.default_rng(seed)
        self.x = rng.standard_normal((n, 4)).astype("float32")
        self.y = (self.x.sum(1, keepdims=True) > 0).astype("int64")

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def weights(network):
    return {n: t.numpy().copy() for n, t in network.state_dict().items()}


class Watch(paddle.callbacks.Callback):
    """Placed after the EMACallback: the network before each evaluation, during it, after it."""

    def __init__(self):
        super().__init__()
        self.before, self.during, self.after = [], [], []

    def on_epoch_end(self, epoch, logs=None):
        self.before.append(weights(self.model.network))

    def on_eval_begin(self, logs=None):
        self.during.append(weights(self.model.network))

    def on_eval_end(self, logs=None):
        self.after.append(weights(self.model.network))


def prepared():
    network = paddle.nn.Sequential(paddle.nn.Linear(4, 8), paddle.nn.ReLU(), paddle.nn.Linear(8, 2))
    model = paddle.Model(network)
    model.prepare(paddle.optimizer.Adam(0.05, parameters=network.parameters()),
                  paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy())
    return network, model


def test_fit_evaluates_the_averages_and_restores_bit_exactly(dygraph, tmp_path):
    network, model = prepared()
    ema, watch = EMACallback(decay=0.9, warmup="threshold"), Watch()
    averages_at_eval = []

    class Averages(paddle.callbacks.Callback):  # before the EMACallback: what apply will write
        def on_eval_begin(self, logs=None):
            averages_at_eval.append({n: v.numpy() for n, v in ema.ema.averages().items()})

    model.fit(Points(), Points(seed=1), batch_size=16, epochs=2, verbose=0, save_dir=str(tmp_path),
              callbacks=[Averages(), ema, watch])
    assert ema.ema.num_updates == 6  # 3 batches x 2 epochs
    assert len(watch.during) == 2
    for before, during, after, averages in zip(watch.before, watch.during, watch.after, averages_at_eval):
        for name, value in averages.items():
            np.testing.assert_array_equal(during[name], value, err_msg=f"evaluated {name}")
            assert not np.array_equal(during[name], before[name]), name
        for name, value in before.items():
            np.testing.assert_array_equal(after[name], value, err_msg=f"restored {name}")
    for name in ("0", "1", "final"):
        assert os.path.exists(tmp_path / f"{name}_ema.pdparams"), name
    final = {n: v.numpy() for n, v in ema.ema.averages().items()}
    trained = weights(network)
    model.load(str(tmp_path / "final_ema"))
    for name, value in weights(network).items():
        np.testing.assert_array_equal(value, final[name], err_msg=f"final_ema: {name}")
    model.load(str(tmp_path / "final"))
    for name, value in weights(network).items():
        np.testing.assert_array_equal(value, trained[name], err_msg=f"final: {name}")


def test_evaluate_with_the_callback_after_fit_reports_the_averages(dygraph):
    network, model = prepared()
    ema = EMACallback(decay=0.5)
    model.fit(Points(), batch_size=16, epochs=1, verbose=0, callbacks=[ema])
    trained = weights(network)
    raw = model.evaluate(Points(seed=2), batch_size=16, verbose=0)
    averaged = model.evaluate(Points(seed=2), batch_size=16, verbose=0, callbacks=[ema])
    with ema.ema.apply():
        expected = model.evaluate(Points(seed=2), batch_size=16, verbose=0)
    assert averaged == expected and raw != averaged
    for name, value in weights(network).items():
        np.testing.assert_array_equal(value, trained[name], err_msg=name)


def test_an_option_modelema_lacks_is_refused():
    with pytest.raises(TypeError, match="EMACallback got \\['warm_up'\\], which ModelEMA does not take"):
        EMACallback(decay=0.9, warm_up="power")


def test_static_mode_is_refused_naming_the_static_class():
    network = paddle.nn.Sequential(paddle.nn.Linear(4, 2))
    x = paddle.static.InputSpec([None, 4], "float32", "x")
    y = paddle.static.InputSpec([None, 1], "int64", "y")
    model = paddle.Model(network, x, y)
    model.prepare(paddle.optimizer.SGD(0.1, parameters=network.parameters()), paddle.nn.CrossEntropyLoss())
    with pytest.raises(RuntimeError, match="paddle_ema.ExponentialMovingAverage"):
        model.fit(Points(), batch_size=16, epochs=1, verbose=0, callbacks=[EMACallback()])


def test_the_package_exposes_the_callbacks_module():
    assert paddle_ema.callbacks.EMACallback is EMACallback
