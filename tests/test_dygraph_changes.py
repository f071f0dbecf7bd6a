"""ModelEMA when the model does what real models do: forwards that re-bind buffers (also while the
averages are applied), non-finite buffers (attention masks), layers wrapped, cast or added after the
EMA was built. Each against the float64 oracle; restore is bit-exact."""

from __future__ import annotations

import logging

import numpy as np
import paddle
import pytest
from oracle import EmaOracle

import paddle_ema

RTOL, ATOL = 1e-5, 1e-7



class Seen(paddle.nn.Layer):
    """A layer whose forward counts what it has seen by re-binding its buffers (`x = x + n`): a
    float one, which is averaged, and an int one, which is not."""

    def __init__(self):
        super().__init__()
        self.fc = paddle.nn.Linear(3, 2)
        self.register_buffer("seen", paddle.zeros([1]))
        self.register_buffer("calls", paddle.zeros([1], "int64"))

    def forward(self, x):
        self.seen = self.seen + x.shape[0]
        self.calls = self.calls + 1
        return self.fc(x)


def state(model) -> dict[str, np.ndarray]:
    return {name: value.numpy().copy() for name, value in model.state_dict().items()}


def train(model, ema, oracle, rng, steps, opt=None):
    opt = opt or paddle.optimizer.SGD(0.1, parameters=model.parameters())
    for _ in range(steps):
        loss = model(paddle.to_tensor(rng.standard_normal((3, 3)).astype("float32"))).square().mean()
        loss.backward()
        opt.step()
        opt.clear_grad()
        ema.update()
        if oracle is not None:
            oracle.step(state(model))
    return opt


def test_restore_gives_back_what_a_forward_under_apply_re_bound(dygraph, rng):
    model = Seen()
    ema = paddle_ema.ModelEMA(model, 0.5)
    oracle = EmaOracle(0.5, ema.names)
    assert "seen" in ema.names and "calls" not in ema.names
    opt = train(model, ema, oracle, rng, 4)
    before, objects = state(model), {name: getattr(model, name) for name in ("seen", "calls")}
    assert before["seen"][0] == 12
    with ema.apply():
        model(paddle.ones([3, 3]))  # evaluation: re-binds seen (to average + 3) and calls
        assert model.seen.numpy()[0] == pytest.approx(oracle.debiased("seen")[0] + 3, rel=1e-6)
    after = state(model)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=f"{name} after restore")
    assert model.seen is objects["seen"] and model.calls is objects["calls"]
    train(model, ema, oracle, rng, 2, opt)  # and the average goes on from the trained 12
    with ema.apply():
        for name in ema.names:
            np.testing.assert_allclose(ema._tensors[name].numpy(), oracle.debiased(name), rtol=RTOL,
                                       atol=ATOL, err_msg=name)


def test_restore_after_an_interrupted_restore_binds_back_too(dygraph, rng):
    model = Seen()
    ema = paddle_ema.ModelEMA(model, 0.5)
    train(model, ema, None, rng, 2)
    before = state(model)
    ema.apply(need_restore=False)
    model(paddle.ones([2, 3]))
    ema._applied.bindings.put_back()  # half of a restore, as an interrupt would leave it
    ema.restore()
    ema.restore()  # nothing applied: a no-op
    for name, value in state(model).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


class Masked(paddle.nn.Layer):
    """Attention-style: a causal -inf mask buffer, a +inf bound buffer, a trained linear."""

    def __init__(self, n=4):
        super().__init__()
        self.fc = paddle.nn.Linear(n, n)
        self.register_buffer("mask", paddle.triu(paddle.full([n, n], float("-inf")), 1))
        self.register_buffer("ceiling", paddle.full([2], float("inf")))

    def forward(self, x):
        scores = self.fc(x) + self.mask
        return paddle.nn.functional.softmax(scores, axis=-1)


@pytest.mark.parametrize("options", [
    dict(decay=0.9), dict(decay=0.99, warmup="power"), dict(decay=0.9, start_step=2),
], ids=["constant", "power (decay 0 first)", "start_step (decay 0 first)"])
def test_a_tensor_constant_at_infinity_averages_to_itself(dygraph, rng, options):
    model = Masked()
    mask, ceiling = model.mask.numpy().copy(), model.ceiling.numpy().copy()
    ema = paddle_ema.ModelEMA(model, **options)
    oracle = EmaOracle(options["decay"], ["fc.weight", "fc.bias"])
    for update in range(5):
        with paddle.no_grad():
            model.fc.weight.set_value(model.fc.weight + 0.1)
        ema.update()
        oracle.step(state(model), decay=_decay(update, options))
    averages = ema.averages()
    np.testing.assert_array_equal(averages["mask"].numpy(), mask)
    np.testing.assert_array_equal(averages["ceiling"].numpy(), ceiling)
    x = paddle.ones([4, 4])
    with ema.apply():
        np.testing.assert_array_equal(model.mask.numpy(), mask)
        assert np.isfinite(model(x).numpy()).all()
        for name in ("fc.weight", "fc.bias"):
            np.testing.assert_allclose(model.state_dict()[name].numpy(), oracle.debiased(name),
                                       rtol=RTOL, atol=ATOL, err_msg=name)


def _decay(update, options):
    from oracle import decay_at
    power = 2 / 3 if options.get("warmup") == "power" else None
    return decay_at(update, options["decay"], power=power, start_step=options.get("start_step", 0))


def test_infinities_that_arrive_later_by_re_binding_are_kept(dygraph, rng):
    """A finite buffer replaced by a -inf one (a mask made in the first forward): its elements at
    -inf average to -inf (the oracle's d * a + w * theta), the others as usual; a NaN stays NaN in its
    element only."""
    model = paddle.nn.Linear(2, 2)
    model.register_buffer("bias_mask", paddle.zeros([3]))
    ema = paddle_ema.ModelEMA(model, 0.8)
    oracle = EmaOracle(0.8, ["bias_mask"])
    values = [np.zeros(3, "float32"), np.array([-np.inf, 1.0, 2.0], "float32"),
              np.array([-np.inf, np.nan, 2.0], "float32"), np.array([-np.inf, 1.0, 3.0], "float32")]
    for value in values:
        model.bias_mask = paddle.to_tensor(value)
        ema.update()
        oracle.step({"bias_mask": value})
    average = ema.averages()["bias_mask"].numpy()
    assert average[0] == -np.inf and np.isnan(average[1])
    np.testing.assert_allclose(average[2], oracle.debiased("bias_mask")[2], rtol=RTOL)


def test_weight_norm_after_the_ema_is_refused_with_what_to_do(dygraph, rng):
    model = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.Linear(4, 2))
    ema = paddle_ema.ModelEMA(model, 0.9)
    train(model, ema, None, rng, 2)
    raw = {name: value.numpy() for name, value in ema._averages.items()}
    paddle.nn.utils.weight_norm(model[0])
    for call in (ema.update, ema.apply, ema.averages):
        with pytest.raises(RuntimeError, match=r"'0.weight' is now a buffer, no longer a parameter.*"
                                               r"weight_norm.*build a new ModelEMA"):
            call()
    assert ema.num_updates == 2 and ema._applied is None
    for name, value in ema._averages.items():
        np.testing.assert_array_equal(value.numpy(), raw[name], err_msg=name)


def test_spectral_norm_after_the_ema_is_refused(dygraph):
    model = paddle.nn.Sequential(paddle.nn.Linear(3, 4))
    ema = paddle_ema.ModelEMA(model, 0.9, buffers=False)
    paddle.nn.utils.spectral_norm(model[0])
    with pytest.raises(RuntimeError, match="'0.weight' is now a buffer"):
        ema.update()


def test_weight_norm_before_the_ema_averages_its_parameters(dygraph, rng):
    model = paddle.nn.Sequential(paddle.nn.utils.weight_norm(paddle.nn.Linear(3, 4)))
    ema = paddle_ema.ModelEMA(model, 0.8)
    assert {"0.weight_g", "0.weight_v"} <= set(ema.names)
    oracle = EmaOracle(0.8, ["0.weight_g", "0.weight_v", "0.bias"])
    train(model, ema, oracle, rng, 4)
    x = paddle.ones([1, 3])
    trained = state(model)
    with ema.apply():
        applied = model(x).numpy()
        for name in oracle.averages:
            np.testing.assert_allclose(model.state_dict()[name].numpy(), oracle.debiased(name),
                                       rtol=RTOL, atol=ATOL, err_msg=name)
    for name, value in state(model).items():
        np.testing.assert_array_equal(value, trained[name], err_msg=name)
    g, v, b = (oracle.debiased(n) for n in ("0.weight_g", "0.weight_v", "0.bias"))
    # weight_norm(dim=0): each row of v scaled to norm g (Paddle's Linear weight is [in, out])
    expected = np.ones((1, 3)) @ (g.reshape(-1, 1) * v / np.linalg.norm(v, axis=1, keepdims=True)) + b
    np.testing.assert_allclose(applied, expected, rtol=1e-5)


def test_a_model_cast_to_float64_gets_float64_averages(dygraph, rng):
    model = paddle.nn.Linear(3, 2)
    ema = paddle_ema.ModelEMA(model, 0.9)
    oracle = EmaOracle(0.9, ema.names)
    for _ in range(3):
        with paddle.no_grad():
            model.weight.set_value(model.weight + 0.25)
        ema.update()
        oracle.step(state(model))
    model.to(dtype="float64")
    for _ in range(3):
        with paddle.no_grad():
            model.weight.set_value(model.weight + 1e-9)  # a step float32 would not see
        ema.update()
        oracle.step(state(model))
    assert {str(a.dtype) for a in ema._averages.values()} == {"paddle.float64"}
    for name, value in ema.averages().items():
        assert value.dtype == paddle.float64
        # float32 history (rounded at the first 3 steps), float64 since: 1e-9 steps are seen.
        np.testing.assert_allclose(value.numpy(), oracle.debiased(name), rtol=1e-7, err_msg=name)


class WithAdapter(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.base = paddle.nn.Linear(3, 3)

    def forward(self, x):
        y = self.base(x)
        return y + self.adapter(x) if "adapter" in self._sub_layers else y


def test_a_sublayer_added_later_is_averaged_from_then_on(dygraph, rng, caplog):
    """LoRA-style: the adapter's average starts as if it had always held the value it has at the
    first update that sees it."""
    model = WithAdapter()
    ema = paddle_ema.ModelEMA(model, 0.7)
    oracle = EmaOracle(0.7, ["base.weight", "base.bias", "adapter.weight", "adapter.bias"])
    opt = paddle.optimizer.SGD(0.1, parameters=model.parameters())
    history = []
    for _ in range(3):
        train(model, ema, None, rng, 1, opt)
        history.append(state(model))
    model.adapter = paddle.nn.Linear(3, 3)
    opt = paddle.optimizer.SGD(0.1, parameters=model.parameters())
    with caplog.at_level(logging.WARNING, logger="paddle_ema"):
        train(model, ema, None, rng, 1, opt)
    assert "adapter.weight" in caplog.text and "from now on" in caplog.text
    seen = state(model)
    for past in history:  # the oracle: the adapter held that value all along
        oracle.step({**past, "adapter.weight": seen["adapter.weight"], "adapter.bias": seen["adapter.bias"]})
    oracle.step(seen)
    train(model, ema, oracle, rng, 2, opt)
    assert sorted(ema.names) == sorted(oracle.averages)
    trained = state(model)
    with ema.apply():
        for name in oracle.averages:
            np.testing.assert_allclose(model.state_dict()[name].numpy(), oracle.debiased(name),
                                       rtol=RTOL, atol=ATOL, err_msg=name)
    for name, value in state(model).items():
        np.testing.assert_array_equal(value, trained[name], err_msg=name)


@pytest.mark.parametrize("options, names", [
    (dict(parameters=["base.weight", "base.bias"]), ["base.weight", "base.bias"]),
    (dict(exclude=[r".*\.bias"]), ["base.weight", "adapter.weight"]),
], ids=["parameters: only those", "exclude: matched again"])
def test_a_sublayer_added_later_follows_the_selection_rule(dygraph, rng, options, names):
    model = WithAdapter()
    ema = paddle_ema.ModelEMA(model, 0.7, **options)
    model.adapter = paddle.nn.Linear(3, 3)
    train(model, ema, None, rng, 2)
    assert ema.names == names


def test_need_restore_takes_numpy_bools(dygraph, rng):
    model = Seen()
    ema = paddle_ema.ModelEMA(model, 0.5)
    train(model, ema, None, rng, 1)
    before = state(model)
    with ema.apply(need_restore=np.bool_(True)):
        pass
    for name, value in state(model).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    with pytest.raises(TypeError, match="need_restore must be a bool"):
        ema.apply(need_restore="yes")


@pytest.mark.parametrize("key, value, says", [
    ("averages", {"fc.weight": np.ones((3, 2), "int64")}, "'fc.weight' must hold floating-point"),
    ("averages", {"fc.weight": np.ones((3, 2), bool)}, "'fc.weight' must hold floating-point"),
    ("averages", {"fc.weight": [[1.0] * 2] * 3}, "'fc.weight' must be a paddle Tensor or numpy array"),
    ("averages", {"fc.weight": None}, "'fc.weight' must be a paddle Tensor or numpy array"),
    ("averages", {"fc.weight": "x"}, "'fc.weight' must be a paddle Tensor or numpy array"),
    ("averages", [], "'averages' must be a dict"),
    ("num_updates", "3", "num_updates must be an int"),
    ("num_updates", 2.7, "num_updates must be an int"),
    ("num_updates", True, "num_updates must be an int"),
    ("update_calls", float("inf"), "update_calls must be an int"),
    ("bias_correction", 1e-300, "bias_correction is 1e-300, which 3 update"),
    ("bias_correction", float("nan"), "bias_correction is nan, which"),
    ("bias_correction", 1.5, "bias_correction is 1.5, which"),
    ("bias_correction", True, "bias_correction must be a float"),
])
def test_set_state_dict_refuses_what_state_dict_never_gives(dygraph, rng, key, value, says):
    model = Seen()
    ema = paddle_ema.ModelEMA(model, 0.9)
    train(model, ema, None, rng, 3)
    raw = {name: value.numpy() for name, value in ema._averages.items()}
    counts = (ema.num_updates, ema._calls, ema._bias_correction)
    good = ema.state_dict()
    bad = dict(good, **{key: dict(good["averages"], **value) if key == "averages" and isinstance(value, dict)
                        else value})
    with pytest.raises(ValueError, match=says):
        ema.set_state_dict(bad)
    assert (ema.num_updates, ema._calls, ema._bias_correction) == counts
    for name, average in ema._averages.items():
        np.testing.assert_array_equal(average.numpy(), raw[name], err_msg=name)
    ema.set_state_dict(good)  # what state_dict gives is taken, also with its numpy arrays
    ema.set_state_dict(dict(good, averages={n: a.numpy() for n, a in good["averages"].items()}))


class Tied(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.a, self.b = paddle.nn.Linear(2, 2), paddle.nn.Linear(2, 2)
        self.b.weight = self.a.weight


def test_untying_a_tied_weight_keeps_its_average_with_its_tensor(dygraph, rng, caplog):
    model = Tied()
    ema = paddle_ema.ModelEMA(model, 0.5)
    assert "b.weight" not in ema.names  # one tensor, averaged once under its first name
    shared, history, product = model.a.weight, [], 1.0
    for step in range(2):
        shared.set_value(np.full((2, 2), step + 1.0, "float32"))
        ema.update()
        history.append(step + 1.0)
        product *= 0.5
    model.a.weight = paddle.create_parameter([2, 2], "float32")  # untied: b keeps the old tensor
    model.a.weight.set_value(np.full((2, 2), 10.0, "float32"))
    with caplog.at_level(logging.WARNING, logger="paddle_ema"):
        for step in range(2):
            shared.set_value(np.full((2, 2), step + 3.0, "float32"))
            ema.update()
            history.append(step + 3.0)
            product *= 0.5
    assert "a.weight" in caplog.text  # averaged from its first update on
    averages = ema.averages()
    expected = sum(0.5 * 0.5 ** (3 - i) * v for i, v in enumerate(history)) / (1 - product)
    np.testing.assert_allclose(averages["b.weight"].numpy(), np.full((2, 2), expected), rtol=1e-6)
    np.testing.assert_allclose(averages["a.weight"].numpy(), np.full((2, 2), 10.0), rtol=1e-6)


def test_an_ema_of_a_model_whose_other_ema_is_applied_refuses_to_update(dygraph, rng):
    model = paddle.nn.Sequential(paddle.nn.Linear(3, 2), paddle.nn.Linear(2, 1))
    whole = paddle_ema.ModelEMA(model, 0.9)
    head = paddle_ema.ModelEMA(model, 0.9, parameters=["1.weight", "1.bias"])
    model[1] = paddle.nn.Linear(2, 1)  # a new head: head's tensors are stale until it looks
    whole.update()
    with whole.apply():
        with pytest.raises(RuntimeError, match="would average the averages"):
            head.update()
    assert head.num_updates == 0


def test_a_value_made_infinite_by_a_cast_is_kept(dygraph):
    model = paddle.nn.Linear(2, 2)
    model.register_buffer("mask", paddle.full([3], -1e9))
    ema = paddle_ema.ModelEMA(model, 0.9)
    for _ in range(2):
        ema.update()
    model.to(dtype="float16")  # -1e9 is -inf in float16
    for _ in range(3):
        ema.update()
    assert np.all(ema.averages()["mask"].numpy() == -np.inf)
    with ema.apply():
        assert np.all(model.mask.numpy() == -np.inf)


def test_a_tensor_reshaped_in_place_is_refused(dygraph):
    model = paddle.nn.Linear(2, 2)
    ema = paddle_ema.ModelEMA(model, 0.9)
    ema.update()
    raw = {name: value.numpy() for name, value in ema._averages.items()}
    paddle.assign(paddle.ones([3, 3]), output=model.weight)
    with pytest.raises(RuntimeError, match=r"'weight' now holds a float32\[3, 3\] tensor"):
        ema.update()
    assert ema.num_updates == 1
    for name, value in ema._averages.items():
        np.testing.assert_array_equal(value.numpy(), raw[name], err_msg=name)


def test_a_tensor_cast_in_place_is_followed(dygraph, rng):
    model = paddle.nn.Linear(2, 2)
    ema = paddle_ema.ModelEMA(model, 0.9, parameters=["weight"])
    oracle = EmaOracle(0.9, ["weight"])
    ema.update()
    oracle.step({"weight": model.weight.numpy()})
    paddle.assign(paddle.to_tensor(np.full((2, 2), 0.5), "float64"), output=model.weight)
    assert model.weight.dtype == paddle.float64
    for _ in range(2):
        ema.update()
        oracle.step({"weight": model.weight.numpy()})
    value = ema.averages()["weight"]
    assert value.dtype == paddle.float64
    # (the first update was averaged in float32: its rounding, ~1e-8, stays in the history)
    np.testing.assert_allclose(value.numpy(), oracle.debiased("weight"), rtol=1e-7, atol=1e-7)


def test_a_float_buffer_re_bound_to_an_int_tensor_is_refused(dygraph):
    model = Seen()
    ema = paddle_ema.ModelEMA(model, 0.5)
    model(paddle.ones([1, 3]))
    ema.update()
    raw = {name: value.numpy() for name, value in ema._averages.items()}
    model.seen = paddle.to_tensor([3], dtype="int64")
    with pytest.raises(RuntimeError, match=r"'seen' now holds a int64\[1\] tensor"):
        ema.update()
    for name, value in ema._averages.items():
        np.testing.assert_array_equal(value.numpy(), raw[name], err_msg=name)
        assert value.dtype == paddle.float32


def test_restore_undoes_what_changed_the_model_while_applied(dygraph, rng, caplog):
    model = paddle.nn.Sequential(paddle.nn.Linear(3, 2))
    ema = paddle_ema.ModelEMA(model, 0.9)
    train(model, ema, None, rng, 2)
    before, keys = state(model), list(model[0]._parameters)
    ema.apply(need_restore=False)
    model.to(dtype="float64")
    paddle.nn.utils.weight_norm(model[0])
    with caplog.at_level(logging.WARNING, logger="paddle_ema"):
        ema.restore()
    assert "0.weight_g added" in caplog.text and "cast" in caplog.text
    assert list(model[0]._parameters) == keys
    for name, value in state(model).items():
        assert value.dtype == np.float32, name
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_set_state_dict_after_the_model_changed_resumes_bit_exactly(dygraph, rng):
    model = WithAdapter()
    ema = paddle_ema.ModelEMA(model, 0.7)
    train(model, ema, None, rng, 2)
    model.to(dtype="float64")
    model.adapter = paddle.nn.Linear(3, 3)
    model.adapter.to(dtype="float64")
    for _ in range(2):
        with paddle.no_grad():
            for p in model.parameters():
                p.set_value(p + 1e-9)  # a change float32 would not see
        ema.update()
    saved = ema.state_dict()
    resumed = paddle_ema.ModelEMA(WithAdapter(), 0.7)  # a new process: float32, no adapter yet
    resumed._layer.to(dtype="float64")
    resumed._layer.adapter = paddle.nn.Linear(3, 3)
    resumed._layer.adapter.to(dtype="float64")
    resumed.set_state_dict(saved)
    for name, value in saved["averages"].items():
        assert resumed._averages[name].dtype == paddle.float64, name
        np.testing.assert_array_equal(resumed._averages[name].numpy(), value.numpy(), err_msg=name)


@pytest.mark.parametrize("at", [1, 2])
def test_a_failed_update_makes_the_ema_refuse_until_a_state_is_set(dygraph, rng, monkeypatch, at):
    """A kernel failing before anything is written (``at`` 1) or between the two kernels of an
    average (2: every average of the group scaled, none moved)."""
    model = Seen()
    ema = paddle_ema.ModelEMA(model, 0.5)
    train(model, ema, None, rng, 1)
    good = ema.state_dict()
    calls = []
    original = paddle._C_ops.sgd_

    def failing(*args):
        calls.append(1)
        if len(calls) == at:
            raise ValueError("a kernel error")
        return original(*args)

    monkeypatch.setattr(paddle._C_ops, "sgd_", failing)
    with pytest.raises(RuntimeError, match="failed half-way .*a kernel error"):
        ema.update()
    monkeypatch.undo()
    for call in (ema.update, ema.apply, ema.averages, ema.state_dict):
        with pytest.raises(RuntimeError, match="an earlier ModelEMA.update\\(\\) failed half-way"):
            call()
    ema.set_state_dict(good)
    ema.update()
    assert ema.num_updates == 2


@pytest.mark.parametrize("key, value, says", [
    ("num_updates", 10**400, "num_updates <= update_calls < 2\\*\\*63"),
    ("averages", {"fc.weight": np.ones((3, 2), np.longdouble)}, "'fc.weight' must hold floating-point"),
])
def test_set_state_dict_refuses_counts_and_dtypes_beyond_reach(dygraph, rng, key, value, says):
    model = Seen()
    ema = paddle_ema.ModelEMA(model, 0.9)
    train(model, ema, None, rng, 3)
    good = ema.state_dict()
    bad = dict(good, **({key: dict(good["averages"], **value)} if key == "averages" else {key: value}))
    if key == "num_updates":
        bad["update_calls"] = 10**400
    with pytest.raises(ValueError, match=says):
        ema.set_state_dict(bad)


def test_set_state_dict_takes_a_float32_bias_correction_and_tensors_quietly(dygraph, rng):
    import warnings

    model = Seen()
    ema = paddle_ema.ModelEMA(model, 0.9)
    train(model, ema, None, rng, 3)
    good = ema.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema.set_state_dict(dict(good, bias_correction=np.float32(good["bias_correction"])))
