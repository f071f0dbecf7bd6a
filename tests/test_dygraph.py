"""ModelEMA, the dygraph twin: step by step against the float64 oracle, apply/restore, state_dict,
errors, and the same numbers as the static class for the same weight sequence."""

from __future__ import annotations

import numpy as np
import paddle
import pytest
from nets import IN_FEATURES
from oracle import EmaOracle, decay_at

import paddle_ema

RTOL, ATOL = 1e-5, 1e-7



class Net(paddle.nn.Layer):
    """fc(4) -> BatchNorm1D -> fc(2), and a float buffer; fc2 shares nothing."""

    def __init__(self):
        super().__init__()
        self.fc1 = paddle.nn.Linear(IN_FEATURES, 4)
        self.bn = paddle.nn.BatchNorm1D(4)
        self.fc2 = paddle.nn.Linear(4, 2)
        self.register_buffer("scale", paddle.ones([2]))

    def forward(self, x):
        return self.fc2(self.bn(self.fc1(x))) * self.scale


def train_step(model, opt, rng):
    x = paddle.to_tensor(rng.standard_normal((8, IN_FEATURES)).astype("float32"))
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    opt.clear_grad()
    with paddle.no_grad():  # move the buffer too, so that its average means something
        model.scale.set_value(model.scale * 0.9 + 0.05)


def trained(rng, steps, decay=0.9, **options):
    """A Net, its SGD and a ModelEMA of it, after ``steps`` training steps each followed by an update."""
    model = Net()
    opt = paddle.optimizer.SGD(0.1, parameters=model.parameters())
    ema = paddle_ema.ModelEMA(model, decay, **options)
    for _ in range(steps):
        train_step(model, opt, rng)
        ema.update()
    return model, opt, ema


def weights(ema) -> dict[str, np.ndarray]:
    return {name: ema._tensors[name].numpy().copy() for name in ema.names}


def check_applied(ema, oracle, case):
    trained = weights(ema)
    with ema.apply():
        for name in ema.names:
            np.testing.assert_allclose(ema._tensors[name].numpy(), oracle.debiased(name), rtol=RTOL,
                                       atol=ATOL, err_msg=f"{case}: {name} after {oracle.steps} updates")
    for name, value in weights(ema).items():
        np.testing.assert_array_equal(value, trained[name], err_msg=f"{case}: restore of {name}")


@pytest.mark.parametrize("options", [
    dict(decay=0.999),
    dict(decay=0.99, warmup="threshold"),
    dict(decay=0.9999, warmup="power", power=0.75, inv_gamma=2.0, start_step=2, min_decay=0.3),
    dict(decay=0.9, start_step=3),
], ids=["constant", "threshold", "power", "start_step"])
def test_every_schedule_matches_the_oracle_each_step(dygraph, rng, options):
    model = Net()
    opt = paddle.optimizer.Adam(0.05, parameters=model.parameters())
    ema = paddle_ema.ModelEMA(model, **options)
    names = ["fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "bn._mean", "bn._variance", "fc2.weight",
             "fc2.bias", "scale"]
    assert sorted(ema.names) == sorted(names)
    oracle = EmaOracle(options["decay"], ema.names)
    schedule = {k: v for k, v in options.items() if k in ("start_step", "power", "inv_gamma", "min_decay")}
    for update in range(7):
        train_step(model, opt, rng)
        ema.update()
        thres = update if options.get("warmup") == "threshold" else None
        decay = decay_at(update, options["decay"], thres_value=thres, **schedule)
        oracle.step(weights(ema), decay=decay)
        check_applied(ema, oracle, str(options))


def test_update_every_averages_every_kth_call(dygraph, rng):
    model = Net()
    opt = paddle.optimizer.SGD(0.1, parameters=model.parameters())
    ema = paddle_ema.ModelEMA(model, 0.8, update_every=3)
    oracle = EmaOracle(0.8, ema.names)
    for call in range(1, 10):
        train_step(model, opt, rng)
        ema.update()
        if call % 3 == 0:
            oracle.step(weights(ema))
    assert ema.num_updates == oracle.steps == 3
    check_applied(ema, oracle, "update_every=3")


def test_low_precision_weights_get_float32_averages(dygraph, rng):
    model = paddle.nn.Linear(IN_FEATURES, 3)
    model.to(dtype="bfloat16")
    ema = paddle_ema.ModelEMA(model, 0.9)
    assert {str(a.dtype) for a in ema._averages.values()} == {"paddle.float32"}
    oracle = EmaOracle(0.9, ema.names)
    for _ in range(4):
        with paddle.no_grad():
            for p in model.parameters():
                p.set_value((p.astype("float32") + 0.01).astype("bfloat16"))
        ema.update()
        oracle.step({n: ema._tensors[n].astype("float32").numpy() for n in ema.names})
    for name, value in ema.averages().items():
        assert value.dtype == paddle.bfloat16
        np.testing.assert_allclose(value.astype("float32").numpy(), oracle.debiased(name), rtol=2 ** -7,
                                   err_msg=name)


def test_parameters_and_exclude_choose_what_is_averaged(dygraph):
    model = Net()
    ema = paddle_ema.ModelEMA(model, parameters=[model.fc1.weight, "fc2.weight", "fc2.bias"],
                              exclude=[r".*\.bias"])
    assert ema.names == ["fc1.weight", "fc2.weight"]
    assert "scale" not in paddle_ema.ModelEMA(model, buffers=False).names


def test_data_parallel_names_have_no_wrapper_prefix(dygraph):
    model = Net()
    wrapped = paddle.DataParallel(model)
    assert paddle_ema.ModelEMA(wrapped).names == paddle_ema.ModelEMA(model).names


def test_state_dict_resumes_bit_exactly_through_paddle_save(dygraph, rng, tmp_path):
    model, opt, ema = trained(rng, 3, 0.99, warmup="threshold")
    paddle.save(ema.state_dict(), str(tmp_path / "ema.pdparams"))
    resumed = paddle_ema.ModelEMA(model, 0.99, warmup="threshold")
    resumed.set_state_dict(paddle.load(str(tmp_path / "ema.pdparams")))
    for _ in range(3):
        train_step(model, opt, rng)
        ema.update()
        resumed.update()
    assert resumed.num_updates == ema.num_updates == 6
    assert resumed._bias_correction == ema._bias_correction
    mine, theirs = ema.averages(), resumed.averages()
    for name in ema.names:
        np.testing.assert_array_equal(theirs[name].numpy(), mine[name].numpy(), err_msg=name)


def test_the_same_weights_give_the_static_classes_numbers(dygraph, rng):
    """Feed the same weight sequence to ModelEMA and to the static class: same averages."""
    sequence = [rng.standard_normal((IN_FEATURES, 3)).astype("float32") for _ in range(6)]
    model = paddle.nn.Linear(IN_FEATURES, 3)
    ema = paddle_ema.ModelEMA(model, 0.99, warmup="power", start_step=1, parameters=["weight"])
    for value in sequence:
        model.weight.set_value(value)
        ema.update()
    dygraph_average = ema.averages()["weight"].numpy()

    paddle.enable_static()
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup), paddle.utils.unique_name.guard():
        w = paddle.static.create_parameter([IN_FEATURES, 3], "float32", name="w")
        feed = paddle.static.data("value", [IN_FEATURES, 3], "float32")
        paddle.assign(feed, output=w)  # the "optimizer": writes the next weight of the sequence
        static_ema = paddle_ema.ExponentialMovingAverage(0.99, power=2 / 3, start_step=1)
        static_ema.update()
    exe = paddle.static.Executor(paddle.CPUPlace())
    with paddle.static.scope_guard(paddle.static.Scope()):
        exe.run(startup)
        for value in sequence:
            exe.run(main, feed={"value": value})
        static_average = static_ema.averages(exe)["w"]
    paddle.disable_static()
    np.testing.assert_allclose(dygraph_average, static_average, rtol=1e-6, atol=1e-7)


def test_update_while_applied_raises_and_changes_nothing(dygraph, rng):
    model = Net()
    ema = paddle_ema.ModelEMA(model, 0.9)
    ema.update()
    with ema.apply():
        applied = weights(ema)
        with pytest.raises(RuntimeError, match="would average the averages"):
            ema.update()
        other = paddle_ema.ModelEMA(model, 0.5)  # another EMA of the same model: refused as well
        with pytest.raises(RuntimeError, match="by this ModelEMA or another"):
            other.update()
        assert ema.num_updates == 1 and other.num_updates == 0
        for name, value in weights(ema).items():
            np.testing.assert_array_equal(value, applied[name])


def test_an_exception_inside_apply_restores(dygraph, rng):
    model, opt, ema = trained(rng, 1)
    train_step(model, opt, rng)
    before = weights(ema)
    with pytest.raises(KeyError):
        with ema.apply():
            raise KeyError("evaluation failed")
    for name, value in weights(ema).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_out_of_order_restore_raises_and_changes_nothing(dygraph, rng):
    model = Net()
    first, second = paddle_ema.ModelEMA(model, 0.9), paddle_ema.ModelEMA(model, 0.5)
    opt = paddle.optimizer.SGD(0.1, parameters=model.parameters())
    for _ in range(2):
        train_step(model, opt, rng)
        first.update()
        second.update()
    trained = weights(first)
    first.apply(need_restore=False)
    second.apply(need_restore=False)
    held = weights(first)
    with pytest.raises(RuntimeError, match="reverse order of apply"):
        first.restore()
    for name, value in weights(first).items():
        np.testing.assert_array_equal(value, held[name])
    second.restore()
    first.restore()
    for name, value in weights(first).items():
        np.testing.assert_array_equal(value, trained[name])


@pytest.mark.parametrize("options, error, says", [
    (dict(decay=1.0), ValueError, r"decay must be in \[0, 1\)"),
    (dict(warmup="cosine"), ValueError, "warmup must be None, 'threshold', 'power' or 'exponential'"),
    (dict(power=0.75), ValueError, "inv_gamma and power shape warmup='power' only"),
    (dict(warmup="power", power=-1.0), ValueError, "power must be positive"),
    (dict(update_every=0), ValueError, "update_every must be an int of at least 1"),
    (dict(update_every=2.0), TypeError, "update_every must be an int"),
    (dict(exclude=[".*"]), ValueError, "no floating-point parameter to average"),
    (dict(parameters=["nope"]), ValueError, "'nope' is not a parameter of the model"),
    (dict(buffers=1), TypeError, "buffers must be a bool"),
])
def test_bad_options_raise(dygraph, options, error, says):
    with pytest.raises(error, match=says):
        paddle_ema.ModelEMA(Net(), **options)


def test_names_and_their_alias_parameter_names_list_parameters_and_buffers(dygraph):
    model = Net()
    ema = paddle_ema.ModelEMA(model, 0.9, exclude=["fc2.bias"])
    expected = [n for n, t in model.state_dict().items() if n != "fc2.bias"]
    names = ema.names
    assert sorted(names) == sorted(expected) and "scale" in expected and "bn._mean" in expected
    assert ema.parameter_names == names
    ema.parameter_names.append("x")  # a copy each time
    assert ema.parameter_names == ema.names == names


def test_a_list_of_parameters_for_model_is_named_in_one_line(dygraph):
    model = paddle.nn.Sequential(*[paddle.nn.Linear(64, 64) for _ in range(8)])
    with pytest.raises(TypeError) as info:
        paddle_ema.ModelEMA(model.parameters())
    message = str(info.value)
    assert message.startswith(
        "model must be a paddle.nn.Layer, got a list of 16 parameters; pass the model (a paddle.nn.Layer)"
    ), message
    assert "\n" not in message and len(message) < 300, message


BIG = np.arange(100_000, dtype="float32")


@pytest.mark.parametrize("options, says", [
    (dict(model=BIG), "model must be a paddle.nn.Layer, got array("),
    (dict(init=list(range(100_000))), "init must be 'zeros' or 'weights', got [0, 1, 2, 3, ...]"),
    (dict(frozen="x" * 100_000), "frozen must be"),
    (dict(update_every=BIG), "update_every must be an int"),
    (dict(buffers=BIG), "buffers must be a bool"),
    (dict(min_decay=BIG), "min_decay must be a number"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_huge_bad_option_is_shown_short(dygraph, options, says):
    options = {"model": Net(), **options}
    with pytest.raises((TypeError, ValueError)) as info:
        paddle_ema.ModelEMA(**options)
    message = str(info.value)
    assert says in message, message
    assert "\n" not in message and len(message) < 500, message


@pytest.mark.parametrize("options, says", [
    (dict(sigma_rel=BIG), "sigma_rel must be a number, got array("),
    (dict(gamma=BIG, sigma_rel=None), "gamma must be a number, got array("),
    (dict(sigma_rels=BIG), "sigma_rels must be a non-empty sequence of floats"),
    (dict(snapshot_every=BIG), "snapshot_every must be an int"),
    (dict(snapshot_dtype="x" * 100_000), "snapshot_dtype must be 'float32' or 'float64'"),
    (dict(snapshot_dir=BIG), "snapshot_dir must be a path"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_huge_bad_power_option_is_shown_short(dygraph, tmp_path, options, says):
    if "sigma_rel" in options:
        make = paddle_ema.PowerEMA
    else:
        options = {"snapshot_dir": str(tmp_path), "snapshot_every": 10, **options}
        make = paddle_ema.PostHocEMA
    with pytest.raises((TypeError, ValueError)) as info:
        make(Net(), **options)
    message = str(info.value)
    assert says in message, message
    assert "\n" not in message and len(message) < 500, message


@pytest.mark.parametrize("key", ["num_updates", "bias_correction"])
def test_a_huge_bad_state_value_is_shown_short(dygraph, key):
    ema = paddle_ema.ModelEMA(Net(), 0.9)
    state = ema.state_dict()
    state[key] = [BIG]
    with pytest.raises(ValueError) as info:
        ema.set_state_dict(state)
    message = str(info.value)
    assert f"the state's {key} must be" in message, message
    assert "\n" not in message and len(message) < 500, message


def test_set_state_dict_of_another_model_raises_and_changes_nothing(dygraph):
    ema = paddle_ema.ModelEMA(Net(), 0.9)
    other = paddle_ema.ModelEMA(paddle.nn.Linear(3, 3), 0.9)
    with pytest.raises(ValueError, match="averages other tensors"):
        ema.set_state_dict(other.state_dict())
    assert ema.num_updates == 0


@pytest.mark.parametrize("bad", [
    {"num_updates": None}, {"bias_correction": "x"}, {"update_calls": 1},  # fewer calls than updates
    {"bias_correction": 0.0}, {"averages": "strings"},
], ids=["num_updates None", "bias_correction str", "calls < updates", "bias 0 after updates", "str average"])
def test_set_state_dict_with_bad_values_raises_and_changes_nothing(dygraph, rng, bad):
    model, opt, ema = trained(rng, 2)
    state = ema.state_dict()
    train_step(model, opt, rng)
    ema.update()
    before = {name: value.numpy() for name, value in ema.averages().items()}
    raw = {name: value.numpy() for name, value in ema._averages.items()}
    if bad == {"averages": "strings"}:
        last = ema.names[-1]
        state["averages"][last] = np.full(ema._averages[last].shape, "x")
    else:
        state.update(bad)
    with pytest.raises(ValueError):
        ema.set_state_dict(state)
    assert ema.num_updates == 3
    for name, value in ema._averages.items():
        np.testing.assert_array_equal(value.numpy(), raw[name], err_msg=f"average of {name} changed")
    for name, value in ema.averages().items():
        np.testing.assert_array_equal(value.numpy(), before[name], err_msg=name)


def test_state_dict_is_a_snapshot_that_set_state_dict_goes_back_to(dygraph, rng):
    model, opt, ema = trained(rng, 1)
    state = ema.state_dict()
    then = {name: value.numpy() for name, value in ema.averages().items()}
    for _ in range(2):
        train_step(model, opt, rng)
        ema.update()
    ema.set_state_dict(state)
    assert ema.num_updates == 1
    for name, value in ema.averages().items():
        np.testing.assert_array_equal(value.numpy(), then[name], err_msg=name)


class Counting(paddle.nn.Layer):
    """A layer whose forward puts a new tensor under its buffer's name, as `x = x + 1` code does."""

    def __init__(self):
        super().__init__()
        self.fc = paddle.nn.Linear(3, 3)
        self.register_buffer("count", paddle.zeros([2]))

    def forward(self, x):
        self.count = self.count + 1
        return self.fc(x)


def test_tensors_the_model_rebinds_are_followed(dygraph, rng):
    model = Counting()
    ema = paddle_ema.ModelEMA(model, 0.5)
    oracle = EmaOracle(0.5, ema.names)
    for _ in range(3):
        model(paddle.ones([1, 3]))
        ema.update()
        oracle.step({name: tensor.numpy() for name, tensor in model.state_dict().items()})
    model.fc.weight = paddle.create_parameter([3, 3], "float32")  # a new parameter object
    model(paddle.ones([1, 3]))
    ema.update()
    oracle.step({name: tensor.numpy() for name, tensor in model.state_dict().items()})
    assert ema._tensors["count"] is model.count and ema._tensors["fc.weight"] is model.fc.weight
    model.fc = paddle.nn.Linear(3, 3)  # a new sublayer, new tensors under the same names
    model(paddle.ones([1, 3]))
    ema.update()
    oracle.step({name: tensor.numpy() for name, tensor in model.state_dict().items()})
    assert ema._tensors["fc.bias"] is model.fc.bias
    check_applied(ema, oracle, "re-bound tensors")
    np.testing.assert_allclose(ema.averages()["count"].numpy(), oracle.debiased("count"), rtol=RTOL)


def test_a_tensor_rebound_with_another_shape_raises_before_averaging(dygraph, rng):
    model = Counting()
    ema = paddle_ema.ModelEMA(model, 0.5)
    model(paddle.ones([1, 3]))
    ema.update()
    raw = {name: value.numpy() for name, value in ema._averages.items()}
    model.count = paddle.zeros([5])
    for call in (ema.update, ema.apply, ema.averages):
        with pytest.raises(RuntimeError, match=r"'count' now holds a float32\[5\] tensor"):
            call()
    assert ema.num_updates == 1 and ema._applied is None
    for name, value in ema._averages.items():
        np.testing.assert_array_equal(value.numpy(), raw[name], err_msg=name)


def test_model_ema_in_static_mode_raises():
    with pytest.raises(RuntimeError, match="ModelEMA averages a dygraph model"):
        paddle_ema.ModelEMA(None)


def test_a_to_static_model_is_averaged_like_an_eager_one(dygraph, rng):
    """The forward compiled with paddle.jit.to_static (AST mode: SOT needs PIR on Paddle 3.x) trains
    the same parameters, and ModelEMA averages them as the oracle does."""
    model = paddle.jit.to_static(Net(), full_graph=True)
    opt = paddle.optimizer.Adam(0.05, parameters=model.parameters())
    ema = paddle_ema.ModelEMA(model, 0.9, warmup="threshold")
    oracle = EmaOracle(0.9, ema.names)
    for update in range(4):
        train_step(model, opt, rng)
        ema.update()
        oracle.step(weights(ema), thres_value=update)
    check_applied(ema, oracle, "to_static")
    # The compiled forward sees the swapped-in averages: the same output as with them copied in.
    model.eval()
    x = paddle.to_tensor(rng.standard_normal((4, IN_FEATURES)).astype("float32"))
    with ema.apply():
        swapped = model(x).numpy()
    trained, averages = weights(ema), ema.averages()
    with paddle.no_grad():
        for name, value in averages.items():
            ema._tensors[name].set_value(value)
        copied = model(x).numpy()
        for name, value in trained.items():
            ema._tensors[name].set_value(value)
    np.testing.assert_array_equal(swapped, copied)
    assert not np.allclose(swapped, model(x).numpy(), atol=1e-6)  # and the raw weights differ


def test_decay_zero_state_round_trips(dygraph):
    """decay=0 copies the weights each update (c = 1): its state loads (log1p(-1) once raised)."""
    model = paddle.nn.Linear(3, 2)
    ema = paddle_ema.ModelEMA(model, 0.0)
    for _ in range(3):
        ema.update()
    twin = paddle_ema.ModelEMA(model, 0.0)
    twin.set_state_dict(ema.state_dict())
    for name, value in twin.averages().items():
        np.testing.assert_array_equal(value.numpy(), model.state_dict()[name].numpy(), err_msg=name)


def test_an_empty_buffer_is_carried_through_every_call(dygraph, rng, tmp_path):
    """A model with an empty floating-point buffer (Paddle 2.6 clones no empty tensor: before the
    fix, state_dict() and an apply before the first update raised "We can only support initialized
    tensor in clone" there)."""
    model = paddle.nn.Linear(3, 2)
    model.register_buffer("empty", paddle.zeros([0]))
    ema = paddle_ema.ModelEMA(model, 0.9)
    assert "empty" in ema.names
    ema.state_dict()
    with pytest.warns(RuntimeWarning, match="no update has run yet"):
        with ema.apply():
            assert model.empty.shape == [0]
    oracle = EmaOracle(0.9, ["weight", "bias"])
    for _ in range(3):
        with paddle.no_grad():
            for p in model.parameters():
                p.set_value(rng.standard_normal(p.shape).astype("float32"))
        oracle.step({n: p.numpy() for n, p in model.named_parameters()})
        ema.update()
    paddle.save(ema.state_dict(), str(tmp_path / "ema.pdparams"))
    resumed = paddle_ema.ModelEMA(model, 0.9)
    resumed.set_state_dict(paddle.load(str(tmp_path / "ema.pdparams")))
    trained = model.weight.numpy().copy()
    with resumed.apply():
        assert model.empty.shape == [0]
        np.testing.assert_allclose(model.weight.numpy(), oracle.debiased("weight"), rtol=1e-6)
    np.testing.assert_array_equal(model.weight.numpy(), trained)
    assert resumed.averages()["empty"].shape == [0]
