"""The EMA's state: persistable, not trainable, saved and loaded with the program, and usable when the
EMA is added after the startup program has run."""

from __future__ import annotations

import numpy as np
import paddle
import pytest
from nets import batch, build_net, read, read_all, state_names
from oracle import EmaOracle
from test_average import assert_applied_matches

import paddle_ema


def test_state_is_persistable_and_not_trainable(programs):
    main, _ = programs
    build_net(main)
    ema = paddle_ema.ExponentialMovingAverage(0.9, name="avg")
    ema.update()
    names = state_names(ema)
    assert all(n.startswith("avg") for n in names), names
    params = {p.name for p in main.global_block().all_parameters()}
    assert not params & set(names), "EMA state must not become parameters (it would be trained)"
    if paddle.framework.in_pir_mode():
        persistable = {
            op.result(0).name for op in main.global_block().ops
            if op.name() == "pd_op.data" and op.result(0).persistable
        }
    else:
        persistable = {v.name for v in main.list_vars() if v.persistable}
    assert set(names) <= persistable


def test_names_and_their_alias_parameter_names_list_the_averaged_parameters(programs):
    main, _ = programs
    build_net(main, frozen=True)
    ema = paddle_ema.ExponentialMovingAverage(0.9, exclude=["fc1.b"])
    names = ema.names
    assert sorted(names) == ["fc1.w", "fc2.b", "fc2.w"]  # do_model_average=False ones left out
    assert ema.parameter_names == names
    ema.names.append("x")  # a copy each time
    assert ema.names == ema.parameter_names == names


def test_names_derive_from_name_and_are_unique_per_instance(programs):
    main, _ = programs
    build_net(main)
    a = paddle_ema.ExponentialMovingAverage(0.9, name="avg")
    b = paddle_ema.ExponentialMovingAverage(0.9, name="avg")
    assert not set(state_names(a)) & set(state_names(b))


def test_save_and_load_resume_bit_exactly(programs, exe, rng, tmp_path):
    main, startup = programs
    net = build_net(main, optimizer="adam")
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    exe.run(startup)
    for _ in range(3):
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
    prefix = str(tmp_path / "ckpt")
    paddle.static.save(main, prefix)
    saved = read_all(state_names(ema))
    feeds = [batch(rng) for _ in range(3)]

    def continue_training():
        for x in feeds:
            exe.run(main, feed={"x": x}, fetch_list=[net.loss])
        with ema.apply(exe):
            applied = read_all(ema.parameter_names)
        return read_all(state_names(ema)), applied

    first_state, first_applied = continue_training()
    paddle.static.load(main, prefix)
    for name, value in read_all(state_names(ema)).items():
        np.testing.assert_array_equal(value, saved[name], err_msg=f"loaded {name}")
    second_state, second_applied = continue_training()
    for name in first_state:
        np.testing.assert_array_equal(second_state[name], first_state[name], err_msg=f"resumed {name}")
    for name in first_applied:
        np.testing.assert_array_equal(second_applied[name], first_applied[name], err_msg=f"applied {name}")


def test_ema_built_after_the_startup_program_ran(programs, exe, rng):
    main, startup = programs
    net = build_net(main)
    exe.run(startup)
    exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
    trained = read_all([p.name for p in main.global_block().all_parameters()])
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    for name, value in trained.items():
        np.testing.assert_array_equal(read(name), value, err_msg=f"building the EMA changed {name}")
    oracle = EmaOracle(0.9, ema.parameter_names)
    with ema.apply(exe):  # t = 0: nothing to apply yet
        for name, value in trained.items():
            np.testing.assert_array_equal(read(name), value, err_msg=f"apply at t = 0 changed {name}")
    for _ in range(4):
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
        oracle.step(read_all(ema.parameter_names))
        assert_applied_matches(ema, exe, oracle, "EMA built after startup")


def test_a_checkpoint_of_paddle_ema_0_1_fails_to_load_before_training(programs, exe, rng, tmp_path):
    """paddle_ema 0.1 kept the bias denominator in float32 as ``<name>.debias``; 0.2 keeps it in float64
    under another name, so loading a 0.1 checkpoint fails in paddle.static.load and names the missing
    state, rather than under PIR in the middle of the first training step."""
    import pickle

    main, startup = programs
    net = build_net(main)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    exe.run(startup)
    exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
    prefix = str(tmp_path / "ckpt")
    paddle.static.save(main, prefix)
    with open(prefix + ".pdopt", "rb") as f:  # persistables that are not parameters
        saved = pickle.load(f)
    debias = saved.pop(ema._plan.debias)
    assert debias.dtype == np.float64
    saved[ema._plan.debias.rsplit(".", 1)[0] + ".debias"] = debias.astype(np.float32)  # 0.1's layout
    with open(prefix + ".pdopt", "wb") as f:
        pickle.dump(saved, f, protocol=2)
    with pytest.raises(AssertionError, match=rf"Can not find \[{ema._plan.debias}\] in model file"):
        paddle.static.load(main, prefix)


def build_params_in_order(order):
    """Six small parameters of one trailing shape (so they share a stacked average) created in
    ``order``, a loss over all of them, and SGD."""
    x = paddle.static.data("x", [-1, 5], "float32")
    params = {}
    for i in order:
        params[i] = paddle.static.create_parameter(
            [i + 1, 5], "float32", attr=paddle.ParamAttr(name=f"p{i}"),
            default_initializer=paddle.nn.initializer.Constant(0.1 * (i + 1)))
    # Elementwise only: Paddle 3.3's legacy IR rejects paddle.matmul on Variables.
    loss = sum(paddle.mean(params[i] * params[i]) for i in sorted(params)) * paddle.mean(x * x)
    paddle.optimizer.SGD(0.1).minimize(loss)
    return loss


def test_state_names_and_layout_do_not_depend_on_parameter_order(exe, rng, tmp_path):
    """A checkpoint written by one program loads into the same model whose parameters come in another
    order (as under fleet's graph passes), and applies the same averages."""
    prefix = str(tmp_path / "ckpt")
    feeds = [batch(rng) for _ in range(3)]
    applied = {}
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 4, 2]):
        main, startup = paddle.static.Program(), paddle.static.Program()
        with paddle.utils.unique_name.guard(), paddle.static.scope_guard(paddle.static.Scope()), \
                paddle.static.program_guard(main, startup):
            loss = build_params_in_order(order)
            ema = paddle_ema.ExponentialMovingAverage(0.9)
            ema.update()
            assert any(len(g.members) == 6 for g in ema._plan.groups), "the six must share a stack"
            exe.run(startup)
            if not applied:
                for x in feeds:
                    exe.run(main, feed={"x": x}, fetch_list=[loss])
                paddle.static.save(main, prefix)
            else:
                paddle.static.load(main, prefix)
            with ema.apply(exe):
                applied[tuple(order)] = read_all(ema.parameter_names)
    first, second = applied.values()
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(second[name], first[name], err_msg=name)
