"""Bad input: a clear error that names the argument, and nothing built or changed."""

from __future__ import annotations

import warnings

import numpy as np
import paddle
import pytest
from nets import build_net, read_all, state_names, train_with_ema

import paddle_ema


@pytest.mark.parametrize("decay", [1.0, 1.5, -0.1, float("nan"), float("inf")])
def test_decay_out_of_range(programs, decay):
    build_net(programs[0])
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        paddle_ema.ExponentialMovingAverage(decay)


@pytest.mark.parametrize("decay", ["0.9", None, True, [0.9], np.array([0.9])])
def test_decay_not_a_number(programs, decay):
    build_net(programs[0])
    with pytest.raises(TypeError, match="decay must be a float"):
        paddle_ema.ExponentialMovingAverage(decay)


def test_numpy_float_decay_is_accepted(programs):
    build_net(programs[0])
    assert paddle_ema.ExponentialMovingAverage(np.float32(0.5)).decay == 0.5


@pytest.mark.parametrize("thres_steps", [10, 10.0, np.array([10]), "step"])
def test_thres_steps_not_a_graph_variable(programs, thres_steps):
    build_net(programs[0])
    with pytest.raises(TypeError, match="thres_steps must be a static-graph Variable/Value"):
        paddle_ema.ExponentialMovingAverage(0.9, thres_steps=thres_steps)


def test_thres_steps_of_a_non_numeric_dtype(programs):
    build_net(programs[0])
    flag = paddle.static.data("flag", [1], "bool")
    with pytest.raises(TypeError, match="thres_steps must have an int or float dtype, got bool"):
        paddle_ema.ExponentialMovingAverage(0.9, thres_steps=flag)


def test_update_twice_raises_and_adds_nothing(programs):
    main, _ = programs
    build_net(main)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    n_ops = len(main.global_block().ops)
    with pytest.raises(RuntimeError, match=r"update\(\) was already called"):
        ema.update()
    assert len(main.global_block().ops) == n_ops


def test_update_under_another_program_raises_and_adds_nothing(programs):
    main, _ = programs
    build_net(main)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    other = paddle.static.Program()
    with paddle.static.program_guard(other, paddle.static.Program()):
        with pytest.raises(RuntimeError, match="same paddle.static.program_guard"):
            ema.update()
    assert len(other.global_block().ops) == 0


@pytest.fixture
def trained(programs, exe, rng):
    return train_with_ema(programs, exe, rng, steps=1)[1]


@pytest.mark.parametrize("executor", [None, "exe", paddle.CPUPlace()])
def test_apply_and_restore_need_an_executor(trained, exe, executor):
    ema = trained
    names = ema.parameter_names + state_names(ema)
    before = read_all(names)
    with pytest.raises(TypeError, match=r"apply\(executor\) needs a paddle.static.Executor"):
        with ema.apply(executor):
            pass
    with ema.apply(exe, need_restore=False):
        pass
    applied = read_all(names)
    with pytest.raises(TypeError, match=r"restore\(executor\) needs a paddle.static.Executor"):
        ema.restore(executor)
    for name, value in read_all(names).items():
        np.testing.assert_array_equal(value, applied[name], err_msg=name)
    ema.restore(exe)
    for name, value in read_all(names).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_apply_before_update_raises(programs, exe):
    main, startup = programs
    build_net(main)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    exe.run(startup)
    with pytest.raises(RuntimeError, match=r"call ema.update\(\)"):
        with ema.apply(exe):
            pass


def test_apply_before_startup_raises(programs, exe):
    main, _ = programs
    build_net(main)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    with pytest.raises(RuntimeError, match=r"startup program .* before ExponentialMovingAverage\.apply\(\)"):
        with ema.apply(exe):
            pass
    with pytest.raises(RuntimeError, match="run the startup program"):  # and nothing was left applied
        with ema.apply(exe):
            pass


def test_averages_before_startup_names_averages(programs, exe):
    main, _ = programs
    build_net(main)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    with pytest.raises(RuntimeError, match=r"startup program .* ExponentialMovingAverage\.averages\(\)"):
        ema.averages(exe)


def program_sizes(programs):
    return tuple(len(p.global_block().ops) for p in programs)


def test_decay_too_large_for_a_float(programs):
    build_net(programs[0])
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\), got 1000"):
        paddle_ema.ExponentialMovingAverage(10**400)


@pytest.mark.parametrize("name", [1, b"ema", "", ["ema"]])
def test_name_must_be_a_str(programs, name):
    build_net(programs[0])
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        paddle_ema.ExponentialMovingAverage(0.9, name=name)


@pytest.mark.parametrize("shape", [[2], [1, 1], [-1]])
def test_thres_steps_must_hold_one_number(programs, shape):
    build_net(programs[0])
    step = paddle.static.data("step", shape, "int64")
    sizes = program_sizes(programs)
    with pytest.raises(ValueError, match=r"thres_steps must hold one number \(shape \[1\] or \[\]\)"):
        paddle_ema.ExponentialMovingAverage(0.9, thres_steps=step)
    assert program_sizes(programs) == sizes


def test_an_ema_built_before_the_network_raises(programs):
    with pytest.raises(ValueError, match="no parameter to average"):
        paddle_ema.ExponentialMovingAverage(0.9)


def test_an_ema_of_only_do_model_average_false_parameters_raises(programs):
    x = paddle.static.data("x", [-1, 3], "float32")
    paddle.static.nn.fc(x, 2, weight_attr=paddle.ParamAttr(do_model_average=False),
                        bias_attr=paddle.ParamAttr(do_model_average=False))
    with pytest.raises(ValueError, match="no parameter to average"):
        paddle_ema.ExponentialMovingAverage(0.9)


def test_an_ema_in_dygraph_mode_raises():
    paddle.disable_static()
    try:
        with pytest.raises(RuntimeError, match=r"static program's parameters; call paddle.enable_static"):
            paddle_ema.ExponentialMovingAverage(0.9)
    finally:
        paddle.enable_static()


def test_update_before_minimize_raises_adds_nothing_and_works_after(programs, exe, rng):
    main, startup = programs
    x = paddle.static.data("x", [-1, 5], "float32")
    loss = paddle.mean(paddle.static.nn.fc(x, 2) ** 2)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    sizes = program_sizes(programs)
    with pytest.raises(RuntimeError, match=r"call ema.update\(\) after optimizer.minimize\(loss\)"):
        ema.update()
    assert program_sizes(programs) == sizes
    paddle.optimizer.SGD(0.1).minimize(loss)
    ema.update()  # a failed update() leaves the EMA usable
    exe.run(startup)
    exe.run(main, feed={"x": rng.standard_normal((4, 5)).astype("float32")}, fetch_list=[loss])
    with ema.apply(exe):
        pass


@pytest.mark.parametrize("need_restore", ["no", 0, None])
def test_need_restore_must_be_a_bool(trained, exe, need_restore):
    ema = trained
    names = ema.parameter_names + state_names(ema)
    before = read_all(names)
    with pytest.raises(TypeError, match="need_restore must be a bool"):
        ema.apply(exe, need_restore=need_restore)
    for name, value in read_all(names).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    assert ema._applied is None


def test_a_compiled_program_built_before_update_is_named(programs, exe, rng, mode):
    if mode.endswith("pir"):
        pytest.skip("CompiledProgram rejects PIR programs (TypeError: The type of program_to_graph "
                    "parameter is wrong, expected Graph or Program)")
    main, startup = programs
    net = build_net(main)
    compiled = paddle.static.CompiledProgram(main)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    with pytest.warns(RuntimeWarning, match="CompiledProgram was built from this program before"):
        ema.update()
    exe.run(startup)
    for _ in range(2):
        exe.run(compiled, feed={"x": rng.standard_normal((4, 5)).astype("float32")}, fetch_list=[net.loss])
    trained = read_all(ema.parameter_names)
    with pytest.warns(RuntimeWarning, match="no update step has run yet.*CompiledProgram built before"):
        with ema.apply(exe):
            for name, value in read_all(ema.parameter_names).items():
                np.testing.assert_array_equal(value, trained[name], err_msg=name)


def _int_parameter():
    """A trainable-by-nothing int32 parameter beside a float net, as LookAhead's counters are."""
    attr = paddle.ParamAttr(name="counter", initializer=paddle.nn.initializer.Constant(3), trainable=False)
    return paddle.static.create_parameter([2], "int32", attr=attr)


def test_integer_parameters_are_not_averaged_and_cannot_be_asked_for(programs, exe, rng):
    main, startup = programs
    net = build_net(main)
    _int_parameter()
    sizes = program_sizes(programs)
    with pytest.raises(TypeError, match=r"parameters: counter is int32; only floating-point"):
        paddle_ema.ExponentialMovingAverage(0.9, parameters=["fc1.w", "counter"])
    assert program_sizes(programs) == sizes
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    assert "counter" not in ema.parameter_names and "fc1.w" in ema.parameter_names
    ema.update()
    exe.run(startup)
    exe.run(main, feed={"x": rng.standard_normal((4, 5)).astype("float32")}, fetch_list=[net.loss])
    with ema.apply(exe):
        np.testing.assert_array_equal(read_all(["counter"])["counter"], [3, 3])


def test_two_emas_of_one_name_in_one_program_raise_and_add_nothing(programs):
    main, _ = programs
    build_net(main)
    with paddle.utils.unique_name.guard():
        paddle_ema.ExponentialMovingAverage(0.9).update()
    with paddle.utils.unique_name.guard():  # the generator starts again: the same name, ema_0
        second = paddle_ema.ExponentialMovingAverage(0.5)
    sizes = program_sizes(programs)
    with pytest.raises(RuntimeError, match=r"already holds .*ema_0.*would share it; pass another name="):
        second.update()
    assert program_sizes(programs) == sizes


def _rebuilt_program_in_this_scope(parameters=None):
    """The net and an EMA built again in a new program pair, in the current scope, startup not run."""
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.utils.unique_name.guard(), paddle.static.program_guard(main, startup):
        net = build_net(main)
        ema = paddle_ema.ExponentialMovingAverage(0.9, parameters=parameters)
        ema.update()
    return main, net, ema


def test_an_ema_rebuilt_in_a_scope_that_holds_its_state_carries_it_on(programs, exe, rng, caplog):
    net, first = train_with_ema(programs, exe, rng, steps=3)
    averages, state = first.averages(exe), read_all(state_names(first))
    main, net, second = _rebuilt_program_in_this_scope()
    assert state_names(second) == state_names(first)
    assert "carries on the state it finds in the current scope (step 3)" in caplog.text
    for name, value in read_all(state_names(second)).items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    for name, value in second.averages(exe).items():
        np.testing.assert_array_equal(value, averages[name], err_msg=name)
    exe.run(main, feed={"x": rng.standard_normal((4, 5)).astype("float32")}, fetch_list=[net.loss])
    assert read_all([second._plan.step])[second._plan.step] == 4


def test_an_ema_whose_name_the_scope_holds_for_other_state_raises_and_changes_nothing(programs, exe, rng):
    net, first = train_with_ema(programs, exe, rng, steps=2)
    state = read_all(state_names(first))
    with pytest.raises(RuntimeError, match="state named like 'ema_0''s that does not fit"):
        _rebuilt_program_in_this_scope(parameters=["fc1.b"])  # first stacked with fc2.b, now alone
    for name, value in read_all(state_names(first)).items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)


def test_parameters_written_after_update_are_named_once(programs, exe, rng):
    main, startup = programs
    x = paddle.static.data("x", [-1, 5], "float32")
    hidden = paddle.static.nn.fc(x, 4, weight_attr=paddle.ParamAttr(name="a.w"), bias_attr=False)
    out = paddle.static.nn.fc(hidden, 2, weight_attr=paddle.ParamAttr(name="b.w"), bias_attr=False)
    loss = paddle.mean(out * out)
    params = {p.name: p for p in main.global_block().all_parameters()}
    paddle.optimizer.Adam(0.1).minimize(loss, parameters=[params["a.w"]])
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    paddle.optimizer.Adam(0.1).minimize(loss, parameters=[params["b.w"]])  # too late for the EMA
    exe.run(startup)
    exe.run(main, feed={"x": rng.standard_normal((4, 5)).astype("float32")}, fetch_list=[loss])
    with pytest.warns(RuntimeWarning, match=r"after ExponentialMovingAverage.update\(\) write b.w:") as said:
        ema.averages(exe)
    assert "a.w" not in str(said[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        with ema.apply(exe):
            pass


# A user value shown in an error is cut short: a list of parameters or a big array once printed whole.
BIG = np.arange(100_000, dtype="float32")


def assert_short(info, says):
    message = str(info.value)
    assert says in message, message
    assert "\n" not in message and len(message) < 500, f"{len(message)} characters: {message[:300]}"


@pytest.mark.parametrize("options, says", [
    (dict(decay=BIG), "decay must be a float in [0, 1), got array("),
    (dict(name=[BIG]), "name must be a non-empty str"),
    (dict(thres_steps=BIG), "thres_steps must be a"),
    (dict(parameters=BIG), "parameters must be a list"),
    (dict(parameters=[BIG]), "parameters must hold"),
    (dict(exclude=[BIG]), "exclude must hold str"),
    (dict(start_step=BIG), "start_step must be an int"),
    (dict(power=BIG), "power must be a number"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_huge_bad_option_is_shown_short(programs, options, says):
    build_net(programs[0])
    with pytest.raises(TypeError) as info:
        paddle_ema.ExponentialMovingAverage(**{"decay": 0.9, **options})
    assert_short(info, says)


@pytest.mark.parametrize("options, says", [
    (dict(begin=list(range(100_000))), "begin must be an int"),
    (dict(name=BIG), "name must be a non-empty str"),
])
def test_a_huge_bad_counter_option_is_shown_short(programs, options, says):
    with pytest.raises(TypeError) as info:
        paddle_ema.global_step_counter(**options)
    assert_short(info, says)


def test_a_huge_executor_is_shown_short(trained):
    with pytest.raises(TypeError) as info:
        trained.averages(BIG)
    assert_short(info, "averages(executor) needs a paddle.static.Executor, got array(")


@pytest.mark.parametrize("call, says", [
    (lambda: paddle_ema.load(BIG, "ckpt"), "program must be a paddle.static.Program"),
    (lambda: paddle_ema.load(paddle.static.default_main_program(), BIG), "path_prefix must be a str"),
    (lambda: paddle_ema.load_averages(BIG), "path_prefix must be a str"),
    (lambda: paddle_ema.load_averages("ckpt", name=[BIG]), "name must be a non-empty str"),
], ids=["load program", "load path", "load_averages path", "load_averages name"])
def test_a_huge_bad_checkpoint_argument_is_shown_short(programs, call, says):
    with pytest.raises(TypeError) as info:
        call()
    assert_short(info, says)
