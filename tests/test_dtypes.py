"""Low-precision parameters get float32 averages, and 0-d parameters keep their shape."""

from __future__ import annotations

import numpy as np
import paddle
from nets import batch, read, read_all, read_average
from oracle import EmaOracle
from test_average import assert_applied_matches

import paddle_ema

BATCH = 4


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """numpy holds bfloat16 tensors as their uint16 bit patterns."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def round_to_bf16(x: np.ndarray, truncate: bool = False) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), or toward zero, as float32."""
    bits = x.astype(np.float32).view(np.uint32)
    if not truncate:
        bits = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    return (bits & np.uint32(0xFFFF0000)).view(np.float32)


def cast_truncates(dtype: str) -> bool:
    """Whether Paddle's CPU cast from float32 to ``dtype`` truncates instead of rounding to nearest.

    Paddle 2.6 truncates to float16 and bfloat16, 3.0 and 3.1 to float16 only (1.242112 -> 1.2412109
    in float16), 3.2 and later round: asked of Paddle itself rather than of its version number.
    """
    value = np.array([1.242112], np.float32)
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup), paddle.static.scope_guard(paddle.static.Scope()):
        x = paddle.static.data("x", [1], "float32")
        (cast,) = paddle.static.Executor(paddle.CPUPlace()).run(
            main, feed={"x": value}, fetch_list=[paddle.cast(x, dtype)])
    if dtype == "bfloat16":
        return bool(bf16_to_float32(cast)[0] != round_to_bf16(value)[0])
    return bool(cast[0] != value.astype(np.float16)[0])


def debias_factor(ema) -> np.float32:
    """What apply multiplies a float32 average by: 1 / (1 - prod of decays), in float64, rounded once."""
    return np.float32(1.0 / read(ema._plan.debias)[0])


def read_low(name: str) -> np.ndarray:
    value = read(name)
    return bf16_to_float32(value) if value.dtype == np.uint16 else value.astype(np.float32)


def build_bf16_net():
    """loss = mean((x * w + b)^2) with bfloat16 w [4, 5] and b [5], trained by SGD."""
    x = paddle.static.data("x", [BATCH, 5], "float32")
    init = paddle.nn.initializer
    w = paddle.static.create_parameter(
        [BATCH, 5], "bfloat16", attr=paddle.ParamAttr(name="bf.w", initializer=init.Uniform(0.5, 1.5)))
    b = paddle.static.create_parameter(
        [5], "bfloat16", attr=paddle.ParamAttr(name="bf.b", initializer=init.Constant(1.0)))
    y = x * paddle.cast(w, "float32") + paddle.cast(b, "float32")
    loss = paddle.mean(y * y)
    paddle.optimizer.SGD(0.05).minimize(loss)
    return loss


def trained_bf16_ema(programs, exe, decay, steps, seed):
    """build_bf16_net with an EMA of ``decay``, started up and trained for ``steps`` steps."""
    main, startup = programs
    loss = build_bf16_net()
    ema = paddle_ema.ExponentialMovingAverage(decay)
    ema.update()
    exe.run(startup)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        exe.run(main, feed={"x": rng.standard_normal((BATCH, 5)).astype("float32")}, fetch_list=[loss])
    return ema


def test_bfloat16_parameters_train_with_float32_averages_that_follow_float64(programs, exe):
    main, startup = programs
    loss = build_bf16_net()
    ema = paddle_ema.ExponentialMovingAverage(0.999)
    ema.update()
    assert {g.dtype for g in ema._plan.groups} == {"float32"}
    exe.run(startup)
    rng = np.random.default_rng(3)
    names = ema.parameter_names
    oracle = EmaOracle(0.999, names)
    emulated_bf16 = {n: np.zeros(s.shape, np.float32) for n, s in zip(names, ema._plan.slots)}
    weight, kept = np.float32(1 - 0.999), np.float32(0.0)
    for _ in range(1000):
        x = (0.3 * rng.standard_normal((BATCH, 5))).astype("float32")
        exe.run(main, feed={"x": x}, fetch_list=[loss])
        theta = {n: read_low(n) for n in names}
        oracle.step(theta)
        for n in names:  # the same EMA with its average kept in bfloat16
            a = emulated_bf16[n]
            emulated_bf16[n] = round_to_bf16(a + weight * (theta[n] - a))
        kept = np.float32(kept + weight * (1 - kept))
    raw = read_all(names)
    for slot in ema._plan.slots:
        reference = oracle.debiased(slot.param)
        ours = read_average(slot) / (1.0 - oracle.decay_product)
        scale = np.max(np.abs(reference))
        assert np.max(np.abs(ours - reference)) / scale < 1e-5, f"float32 average of {slot.param}"
        stalled = emulated_bf16[slot.param] / kept
        assert np.max(np.abs(stalled - reference)) / scale > 1e-2, "a bfloat16 average should stall"
    reciprocal = debias_factor(ema)
    truncate = cast_truncates("bfloat16")
    with ema.apply(exe):
        for slot in ema._plan.slots:
            assert read(slot.param).dtype == np.uint16, f"{slot.param} must stay bfloat16 while applied"
            np.testing.assert_array_equal(
                read_low(slot.param), round_to_bf16(read_average(slot) * reciprocal, truncate),
                err_msg=f"applied {slot.param}: its float32 average, debiased, rounded once to bfloat16")
    for name in names:
        np.testing.assert_array_equal(read(name), raw[name], err_msg=f"restore of {name}")


def test_float16_parameters_get_float32_averages(programs, exe, rng):
    """Paddle has no float16 optimizer kernel on CPU (sgd_: 'expected_dtype: bfloat16, float32,
    float64'), so this float16 parameter is trained by an explicit assign."""
    main, startup = programs
    ones = paddle.nn.initializer.Constant(1.0)
    w = paddle.static.create_parameter(
        [3, 4], "float16", attr=paddle.ParamAttr(name="half.w", initializer=ones))
    step = paddle.static.data("delta", [3, 4], "float32")
    paddle.assign(paddle.cast(paddle.cast(w, "float32") + step, "float16"), output=w)
    ema = paddle_ema.ExponentialMovingAverage(0.99)
    ema.update()
    assert [g.dtype for g in ema._plan.groups] == ["float32"]
    exe.run(startup)
    oracle = EmaOracle(0.99, ["half.w"])
    for _ in range(50):
        exe.run(main, feed={"delta": (0.01 + 0.01 * rng.standard_normal((3, 4))).astype("float32")})
        oracle.step({"half.w": read_low("half.w")})
    raw = read("half.w")
    with ema.apply(exe):
        assert read("half.w").dtype == np.float16
        # Half an ulp of float16 when rounded to nearest, a whole one when the cast truncates.
        np.testing.assert_allclose(read("half.w"), oracle.debiased("half.w"),
                                   rtol=2**-10 if cast_truncates("float16") else 2**-11)
    np.testing.assert_array_equal(read("half.w"), raw, err_msg="restore of a float16 parameter")


def test_a_0d_parameter_keeps_its_shape(programs, exe, rng):
    main, startup = programs
    x = paddle.static.data("x", [-1, 5], "float32")
    scale = paddle.static.create_parameter(
        [], "float32", attr=paddle.ParamAttr(name="scale", initializer=paddle.nn.initializer.Constant(2.0)))
    h = paddle.static.nn.fc(x, 3, weight_attr=paddle.ParamAttr(name="fc.w"))
    loss = paddle.mean((h * scale) ** 2)
    paddle.optimizer.SGD(0.05).minimize(loss)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    exe.run(startup)
    oracle = EmaOracle(0.9, ema.parameter_names)
    for _ in range(4):
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[loss])
        oracle.step(read_all(ema.parameter_names))
        slot = next(s for s in ema._plan.slots if s.param == "scale")
        assert read_average(slot).shape == (), "the average of a 0-d parameter must be 0-d"
        with ema.apply(exe):
            assert read("scale").shape == (), "a 0-d parameter must stay 0-d while applied"
        assert read("scale").shape == ()
        assert_applied_matches(ema, exe, oracle, "0-d parameter")


def test_stacks_of_one_dtype_are_applied_by_one_op_and_mixed_stacks_per_member(programs, exe):
    """A stack of bfloat16 parameters gets one stacked result (one divide, one cast) that each member
    is pointed at; a stack mixing bfloat16 and float32 members (one float32 average) rounds each member
    to its own dtype. Both apply the debiased average, rounded once, and restore bit-exactly."""
    main, startup = programs
    x = paddle.static.data("x", [BATCH, 3], "float32")
    init = paddle.nn.initializer.Uniform(0.5, 1.5)
    shapes = {"u1": ([2, 3], "bfloat16"), "u2": ([4, 3], "bfloat16"),
              "m1": ([5], "bfloat16"), "m2": ([5], "float32")}
    params = {
        name: paddle.static.create_parameter(shape, dtype, attr=paddle.ParamAttr(name=name, initializer=init))
        for name, (shape, dtype) in shapes.items()
    }
    loss = sum(paddle.mean(paddle.cast(p, "float32") ** 2) for p in params.values()) * paddle.mean(x)
    paddle.optimizer.SGD(0.05).minimize(loss)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    slots = {slot.param: slot for slot in ema._plan.slots}
    assert slots["u1"].shares_result and slots["u1"].result == slots["u2"].result
    assert slots["m1"].average == slots["m2"].average, "the test needs a mixed stack"
    assert not slots["m1"].shares_result and slots["m1"].result != slots["m2"].result
    scales = [t for t in _op_types(ema._write_program) if t.split(".")[-1] == "scale"]
    assert len(scales) == 3, f"one scale op for the bfloat16 stack, one per mixed member: {scales}"
    exe.run(startup)
    rng = np.random.default_rng(5)
    for _ in range(5):
        exe.run(main, feed={"x": rng.standard_normal((BATCH, 3)).astype("float32")}, fetch_list=[loss])
    raw = read_all(list(shapes))
    reciprocal = debias_factor(ema)
    truncate = cast_truncates("bfloat16")
    with ema.apply(exe):
        for name, slot in slots.items():
            expected = read_average(slot) * reciprocal
            if slot.dtype == "bfloat16":
                expected = round_to_bf16(expected, truncate)
                assert read(name).dtype == np.uint16, f"{name} must stay bfloat16 while applied"
            np.testing.assert_array_equal(read_low(name), expected, err_msg=f"applied {name}")
    for name in shapes:
        np.testing.assert_array_equal(read(name), raw[name], err_msg=f"restore of {name}")


def _op_types(program) -> list[str]:
    if paddle.framework.in_pir_mode():
        return [op.name() for op in program.global_block().ops]
    return [op.type for op in program.global_block().ops]
