"""apply()/restore(): bit-exact restore, the t = 0 case, need_restore=False, and misuse."""

from __future__ import annotations

import numpy as np
import pytest
from nets import batch, build_net, read_all, state_names, train_with_ema
from oracle import EmaOracle
from test_average import assert_applied_matches

import paddle_ema


@pytest.fixture
def trained(programs, exe, rng):
    """A net with an EMA (decay 0.9) after 3 training steps."""
    return train_with_ema(programs, exe, rng, steps=3, batch_norm=True)


def ema_state(ema):
    return read_all(state_names(ema))


def assert_same(now, before, what):
    assert now.keys() == before.keys()
    for name in before:
        np.testing.assert_array_equal(now[name], before[name], err_msg=f"{what}: {name}")


def test_apply_before_any_update_leaves_parameters_unchanged(programs, exe):
    main, startup = programs
    build_net(main)
    ema = paddle_ema.ExponentialMovingAverage(0.999)
    ema.update()
    exe.run(startup)
    initial = read_all(ema.parameter_names)
    assert any(np.any(v != 0) for v in initial.values())
    with ema.apply(exe):
        assert_same(read_all(ema.parameter_names), initial, "apply at t = 0")
    assert_same(read_all(ema.parameter_names), initial, "restore at t = 0")


def test_apply_changes_parameters_and_restore_is_bit_exact(trained, exe):
    net, ema = trained
    before = read_all(ema.parameter_names)
    state = ema_state(ema)
    for _ in range(3):
        with ema.apply(exe):
            applied = read_all(ema.parameter_names)
            assert any(not np.array_equal(applied[n], before[n]) for n in before), "apply changed nothing"
        assert_same(read_all(ema.parameter_names), before, "after apply/restore")
    assert_same(ema_state(ema), state, "EMA state after apply/restore")


def test_restore_runs_when_the_body_raises(trained, exe):
    net, ema = trained
    before = read_all(ema.parameter_names)
    with pytest.raises(KeyError):
        with ema.apply(exe):
            raise KeyError("evaluation failed")
    assert_same(read_all(ema.parameter_names), before, "restore after an exception")
    with ema.apply(exe):  # and the EMA is usable again
        pass


def test_need_restore_false_keeps_averages_until_restore(trained, exe):
    net, ema = trained
    before = read_all(ema.parameter_names)
    with ema.apply(exe):
        applied = read_all(ema.parameter_names)
    with ema.apply(exe, need_restore=False):
        pass
    assert_same(read_all(ema.parameter_names), applied, "averages kept after need_restore=False")
    ema.restore(exe)
    assert_same(read_all(ema.parameter_names), before, "explicit restore")


def test_second_apply_before_restore_raises_and_keeps_the_backup(trained, exe):
    net, ema = trained
    before = read_all(ema.parameter_names)
    with ema.apply(exe, need_restore=False):
        pass
    applied = read_all(ema.parameter_names)
    state = ema_state(ema)
    with pytest.raises(RuntimeError, match=r"restore\(executor\) before applying again"):
        with ema.apply(exe):
            pass
    assert_same(read_all(ema.parameter_names), applied, "a refused apply must not touch parameters")
    assert_same(ema_state(ema), state, "a refused apply must not touch the EMA state")
    ema.restore(exe)
    assert_same(read_all(ema.parameter_names), before, "restore after a refused second apply")


def test_restore_without_apply_changes_nothing(trained, exe, caplog):
    net, ema = trained
    before = read_all(ema.parameter_names)
    state = ema_state(ema)
    ema.restore(exe)
    assert "no applied averages" in caplog.text
    with ema.apply(exe):
        pass
    ema.restore(exe)  # a second restore is a no-op too
    assert_same(read_all(ema.parameter_names), before, "restore without apply")
    assert_same(ema_state(ema), state, "restore without apply")


def test_apply_evaluates_the_test_program_with_averaged_weights(programs, exe, rng):
    net, ema = train_with_ema(programs, exe, rng, steps=3)
    x = batch(rng)
    (raw,) = exe.run(net.test_program, feed={"x": x}, fetch_list=[net.test_out])
    with ema.apply(exe):
        (averaged,) = exe.run(net.test_program, feed={"x": x}, fetch_list=[net.test_out])
        w = read_all(ema.parameter_names)
    (raw_again,) = exe.run(net.test_program, feed={"x": x}, fetch_list=[net.test_out])
    np.testing.assert_array_equal(raw_again, raw)
    assert not np.allclose(averaged, raw)
    expected = (x.astype(np.float64) @ w["fc1.w"] + w["fc1.b"]) @ w["fc2.w"] + w["fc2.b"]
    np.testing.assert_allclose(averaged, expected, rtol=1e-5, atol=1e-6)


def test_training_while_applied_trains_the_averages_and_restore_puts_back_the_weights_of_apply(
    programs, exe, rng
):
    main, startup = programs
    net = build_net(main, optimizer="adam")
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    exe.run(startup)
    names = ema.parameter_names
    oracle = EmaOracle(0.9, names)
    for _ in range(3):
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
        oracle.step(read_all(names))
    trained = read_all(names)
    with ema.apply(exe):
        applied = read_all(names)
        for _ in range(2):
            exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
            oracle.step(read_all(names))  # the EMA averaged what the step left in the parameters
        now = read_all(names)
        assert all(not np.array_equal(now[n], applied[n]) for n in names), "the steps trained nothing"
    assert_same(read_all(names), trained, "restore after training while applied")
    assert_applied_matches(ema, exe, oracle, "the EMA after training while applied")


def test_backups_hold_memory_only_between_apply_and_restore(trained, exe):
    net, ema = trained
    trained_values = read_all(ema.parameter_names)
    for _ in range(2):
        with ema.apply(exe):
            backups = ema._applied.backups
            assert all(b._is_initialized() for b in backups)
            for slot, backup in zip(ema._plan.slots, backups):
                np.testing.assert_array_equal(np.array(backup), trained_values[slot.param],
                                              err_msg=f"backup of {slot.param}")
        assert not any(b._is_initialized() for b in backups), "backups must be freed after restore"


def test_apply_takes_effect_when_called_without_with(trained, exe):
    net, ema = trained
    before = read_all(ema.parameter_names)
    with ema.apply(exe):
        averaged = read_all(ema.parameter_names)
    ema.apply(exe, need_restore=False)
    assert_same(read_all(ema.parameter_names), averaged, "apply(need_restore=False) without with")
    ema.restore(exe)
    assert_same(read_all(ema.parameter_names), before, "restore after apply without with")
    ema.apply(exe)  # need_restore only acts when a with block exits: the averages stay applied
    assert_same(read_all(ema.parameter_names), averaged, "apply() without with")
    ema.restore(exe)
    assert_same(read_all(ema.parameter_names), before, "restore after apply() without with")


@pytest.mark.parametrize("steps", [0, 3])
def test_averages_returns_what_apply_writes_and_touches_nothing(programs, exe, rng, steps):
    net, ema = train_with_ema(programs, exe, rng, steps=steps, batch_norm=True)
    names = ema.parameter_names + state_names(ema)
    before = read_all(names)
    averages = ema.averages(exe)
    assert_same(read_all(names), before, "averages() must not change parameters or state")
    with ema.apply(exe):
        applied = read_all(ema.parameter_names)
        assert_same(ema.averages(exe), applied, "averages() while applied")
    assert_same(averages, applied, f"averages() vs apply after {steps} steps")


def test_averages_of_bfloat16_parameters_are_their_bfloat16_values_as_float32(programs, exe):
    from test_dtypes import bf16_to_float32, trained_bf16_ema

    ema = trained_bf16_ema(programs, exe, decay=0.99, steps=5, seed=2)
    averages = ema.averages(exe)
    with ema.apply(exe):
        for name in ema.parameter_names:
            assert averages[name].dtype == np.float32
            np.testing.assert_array_equal(averages[name], bf16_to_float32(read_all([name])[name]), name)


def test_averages_before_update_raises(programs, exe):
    build_net(programs[0])
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    with pytest.raises(RuntimeError, match=r"averages\(\) needs the EMA ops"):
        ema.averages(exe)
    with pytest.raises(TypeError, match=r"averages\(executor\) needs a paddle.static.Executor"):
        ema.averages("exe")
