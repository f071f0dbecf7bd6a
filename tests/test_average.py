"""The averages and their bias correction against the float64 oracle, step by step."""

from __future__ import annotations

import numpy as np
import paddle
import pytest
from nets import batch, build_net, read, read_all, read_average, state_names, train_with_ema
from oracle import EmaOracle

import paddle_ema

# Paddle's own unit test bar: decay 0.999, 6 steps, rtol 1e-5 against float64.
RTOL = 1e-5
ATOL = 1e-7


def assert_applied_matches(ema, exe, oracle, case):
    trained = read_all(ema.parameter_names)
    with ema.apply(exe):
        for name in ema.parameter_names:
            np.testing.assert_allclose(
                read(name), oracle.debiased(name), rtol=RTOL, atol=ATOL,
                err_msg=f"{case}: applied average of {name} after {oracle.steps} steps",
            )
    for name in ema.parameter_names:
        np.testing.assert_array_equal(read(name), trained[name], err_msg=f"{case}: restore of {name}")


# 0.99999999 rounds to 1.0 in float32: its weight 1e-8 must still move the average.
@pytest.mark.parametrize("decay", [0.99999999, 0.999, 0.9, 0.5, 0.0])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_constant_decay_matches_oracle_each_step(programs, exe, rng, decay, optimizer):
    main, startup = programs
    net = build_net(main, optimizer=optimizer)
    ema = paddle_ema.ExponentialMovingAverage(decay)
    ema.update()
    exe.run(startup)
    oracle = EmaOracle(decay, ema.parameter_names)
    for _ in range(6):
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
        oracle.step(read_all(ema.parameter_names))
        assert_applied_matches(ema, exe, oracle, f"decay={decay}, {optimizer}")


def test_raw_averages_are_float32_zero_start_and_biased(programs, exe, rng):
    main, startup = programs
    net = build_net(main)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    exe.run(startup)
    plan = ema._plan
    assert any(len(g.members) > 1 for g in plan.groups), "the test net must exercise stacked averages"
    for slot in plan.slots:
        average = read_average(slot)
        assert average.dtype == np.float32, slot.average
        np.testing.assert_array_equal(average, np.zeros(slot.shape, np.float32), err_msg=slot.average)
    oracle = EmaOracle(0.9, ema.parameter_names)
    for _ in range(3):
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
        oracle.step(read_all(ema.parameter_names))
    for slot in plan.slots:
        np.testing.assert_allclose(read_average(slot), oracle.averages[slot.param], rtol=RTOL, atol=ATOL,
                                   err_msg=f"stored (biased) average of {slot.param}")
    np.testing.assert_array_equal(read(plan.step), [3])
    np.testing.assert_allclose(read(plan.debias), [1 - 0.9**3], rtol=1e-6)


def test_averages_cover_batch_norm_statistics_and_skip_do_model_average_false(programs, exe, rng):
    main, startup = programs
    net = build_net(main, batch_norm=True, frozen=True)
    ema = paddle_ema.ExponentialMovingAverage(0.8)
    ema.update()
    names = set(ema.parameter_names)
    bn_stats = {p.name for p in main.global_block().all_parameters() if not p.trainable}
    assert len(bn_stats) == 2, f"expected batch-norm mean/variance parameters, got {bn_stats}"
    assert bn_stats <= names
    assert {"fc1.w", "fc1.b", "bn.w", "bn.b", "fc2.w", "fc2.b"} <= names
    assert not names & {"frozen.w", "frozen.b"}
    exe.run(startup)
    oracle = EmaOracle(0.8, ema.parameter_names)
    for _ in range(4):
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
        oracle.step(read_all(ema.parameter_names))
    frozen = read_all(["frozen.w", "frozen.b"])
    assert_applied_matches(ema, exe, oracle, "batch norm + frozen")
    with ema.apply(exe):
        for name, value in frozen.items():
            np.testing.assert_array_equal(read(name), value, err_msg=f"{name} must not be averaged")


# Both sides of min(decay, (1+s)/(10+s)), which crosses 0.95 at s = 161; and negative steps, which
# count as 0 (the doc's formula would give decay 0 at s = -1, an infinite one at -10, 1.9 at -20).
@pytest.mark.parametrize("dtype, values", [
    ("int64", [0, 1, 5, 100, 160, 161, 162, 1000]),
    ("int64", [-1, -10, -20, -3, 4]),
    ("float32", [-1.0, -10.0, -20.0, -0.5, 4.0]),
])
def test_thres_steps_fed_as_data_schedules_the_decay(programs, exe, rng, dtype, values):
    main, startup = programs
    step = paddle.static.data("step", [1], dtype)
    net = build_net(main)
    ema = paddle_ema.ExponentialMovingAverage(0.95, thres_steps=step)
    ema.update()
    exe.run(startup)
    oracle = EmaOracle(0.95, ema.parameter_names)
    for s in values:
        exe.run(main, feed={"x": batch(rng), "step": np.array([s], dtype)}, fetch_list=[net.loss])
        oracle.step(read_all(ema.parameter_names), thres_value=s)
        assert_applied_matches(ema, exe, oracle, f"thres_steps={s}")


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32"])
def test_thres_steps_of_any_numeric_dtype(programs, exe, rng, dtype):
    main, startup = programs
    step = paddle.static.data("step", [1], dtype)
    net = build_net(main)
    ema = paddle_ema.ExponentialMovingAverage(0.999, thres_steps=step)
    ema.update()
    exe.run(startup)
    oracle = EmaOracle(0.999, ema.parameter_names)
    for s in [0.0, 3.0, 7.0]:
        exe.run(main, feed={"x": batch(rng), "step": np.array([s], dtype)}, fetch_list=[net.loss])
        oracle.step(read_all(ema.parameter_names), thres_value=s)
    assert_applied_matches(ema, exe, oracle, f"thres_steps dtype {dtype}")


def test_thres_steps_from_global_step_counter(programs, exe, rng):
    main, startup = programs
    step = paddle_ema.global_step_counter()
    build_net(main)
    ema = paddle_ema.ExponentialMovingAverage(0.999, thres_steps=step)
    ema.update()
    exe.run(startup)
    oracle = EmaOracle(0.999, ema.parameter_names)
    for t in range(6):
        (seen,) = exe.run(main, feed={"x": batch(rng)}, fetch_list=[step])
        assert int(seen[0]) == t
        oracle.step(read_all(ema.parameter_names), thres_value=t)
        assert_applied_matches(ema, exe, oracle, f"global step {t}")


def test_test_program_never_updates_the_averages(programs, exe, rng):
    net, ema = train_with_ema(programs, exe, rng, steps=1)
    before = read_all(state_names(ema))
    for _ in range(3):
        exe.run(net.test_program, feed={"x": batch(rng)}, fetch_list=[net.test_out])
        with ema.apply(exe):
            exe.run(net.test_program, feed={"x": batch(rng)}, fetch_list=[net.test_out])
    for name, value in before.items():
        np.testing.assert_array_equal(read(name), value, err_msg=f"{name} changed by the test program")


def test_legacy_test_clone_after_update_drops_ema_ops(programs, exe, rng, mode):
    if mode.endswith("pir"):
        pytest.skip("PIR Program.clone() has no for_test: PIR test programs are cloned before minimize")
    main, startup = programs
    net = build_net(main)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    late_test = main.clone(for_test=True)
    ema_vars = set(state_names(ema))
    written = {n for op in late_test.global_block().ops for n in op.output_arg_names}
    assert not written & ema_vars, f"test clone still writes {written & ema_vars}"
    exe.run(startup)
    before = read(ema._plan.step)
    exe.run(late_test, feed={"x": batch(rng)}, fetch_list=[net.out])
    np.testing.assert_array_equal(read(ema._plan.step), before)


def test_two_instances_are_independent(programs, exe, rng):
    main, startup = programs
    net = build_net(main)
    fast = paddle_ema.ExponentialMovingAverage(0.5, name="fast")
    fast.update()
    slow = paddle_ema.ExponentialMovingAverage(0.99, name="slow")
    slow.update()
    assert fast.parameter_names == slow.parameter_names
    exe.run(startup)
    names = fast.parameter_names
    oracles = {"fast": EmaOracle(0.5, names), "slow": EmaOracle(0.99, names)}
    for _ in range(5):
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
        for oracle in oracles.values():
            oracle.step(read_all(fast.parameter_names))
    assert_applied_matches(fast, exe, oracles["fast"], "instance fast")
    assert_applied_matches(slow, exe, oracles["slow"], "instance slow")


def test_float64_parameters_get_float64_averages(programs, exe, rng):
    main, startup = programs
    x = paddle.static.data("x", [-1, 5], "float64")
    out = paddle.static.nn.fc(x, 3)
    loss = paddle.mean(out * out)
    paddle.optimizer.SGD(0.1).minimize(loss)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    exe.run(startup)
    oracle = EmaOracle(0.9, ema.parameter_names)
    for _ in range(4):
        exe.run(main, feed={"x": rng.standard_normal((8, 5))}, fetch_list=[loss])
        oracle.step(read_all(ema.parameter_names))
    for slot in ema._plan.slots:
        assert read_average(slot).dtype == np.float64, slot.average
    # The weight 1 - d is a float32 scalar cast to float64, so allow its float32 rounding.
    assert_applied_matches(ema, exe, oracle, "float64 parameters")


def build_wide_or_conv(kind):
    """Nets whose averages take the scale_ + sgd_ path: a 4-d conv weight, and a 2-d fc weight too large
    to stack or to lerp."""
    if kind == "conv":
        x = paddle.static.data("x", [-1, 3, 6, 6], "float32")
        h = paddle.nn.Conv2D(3, 8, 3, weight_attr=paddle.ParamAttr(name="conv.w"))(x)
        h = paddle.nn.BatchNorm2D(8)(h)
        return x, paddle.mean(h * h), (4, 3, 6, 6)
    x = paddle.static.data("x", [-1, 300], "float32")
    h = paddle.static.nn.fc(x, 200, weight_attr=paddle.ParamAttr(name="wide.w"))
    return x, paddle.mean(h * h), (4, 300)


@pytest.mark.parametrize("kind", ["conv", "wide"])
def test_large_and_conv_parameters_match_oracle_each_step(programs, exe, rng, kind):
    main, startup = programs
    x, loss, batch_shape = build_wide_or_conv(kind)
    paddle.optimizer.Adam(0.01).minimize(loss)
    ema = paddle_ema.ExponentialMovingAverage(0.999)
    ema.update()
    big = "conv.w" if kind == "conv" else "wide.w"
    group = next(g for g in ema._plan.groups if ema._plan.slots[g.members[0]].param == big)
    assert len(group.members) == 1 and not paddle_ema._graph._lerp_is_faster(group.shape)
    exe.run(startup)
    oracle = EmaOracle(0.999, ema.parameter_names)
    for _ in range(6):
        exe.run(main, feed={"x": rng.standard_normal(batch_shape).astype("float32")}, fetch_list=[loss])
        oracle.step(read_all(ema.parameter_names))
        assert_applied_matches(ema, exe, oracle, f"{kind} net")
