"""paddle_ema.global_step_counter, the PIR-safe replacement for autoincreased_step_counter."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import paddle_ema


@pytest.mark.parametrize("begin", [0, 1, 100])
def test_counts_from_begin_once_per_run(programs, exe, begin):
    main, startup = programs
    step = paddle_ema.global_step_counter(begin=begin)
    doubled = paddle.cast(step, "float32") * 2.0  # an op after the counter sees this run's value
    exe.run(startup)
    for run in range(4):
        seen, seen_doubled = exe.run(main, fetch_list=[step, doubled])
        assert seen.dtype == np.int64
        np.testing.assert_array_equal(seen, [begin + run])
        np.testing.assert_array_equal(seen_doubled, [2.0 * (begin + run)])


def test_two_counters_are_independent(programs, exe):
    main, startup = programs
    a = paddle_ema.global_step_counter()
    b = paddle_ema.global_step_counter(begin=10)
    exe.run(startup)
    exe.run(main, fetch_list=[a])
    seen_a, seen_b = exe.run(main, fetch_list=[a, b])
    np.testing.assert_array_equal(seen_a, [1])
    np.testing.assert_array_equal(seen_b, [11])


@pytest.mark.parametrize("begin", [1.0, "0", True])
def test_begin_must_be_an_int(programs, begin):
    with pytest.raises(TypeError, match="begin must be an int"):
        paddle_ema.global_step_counter(begin=begin)


def test_a_test_program_never_moves_the_counter(programs, exe, rng, mode):
    if mode.endswith("pir"):
        pytest.skip("PIR's Program.clone() has no for_test and copies every op made so far, the "
                    "counter's increment too; under PIR the test program is cloned before the counter")
    from nets import batch, build_net

    main, startup = programs
    step = paddle_ema.global_step_counter()
    net = build_net(main)
    test_program = main.clone(for_test=True)
    exe.run(startup)
    for run in range(3):
        (seen,) = exe.run(main, feed={"x": batch(rng)}, fetch_list=[step])
        np.testing.assert_array_equal(seen, [run])
        exe.run(test_program, feed={"x": batch(rng)}, fetch_list=[net.out])
    (seen,) = exe.run(main, feed={"x": batch(rng)}, fetch_list=[step])
    np.testing.assert_array_equal(seen, [3], err_msg="test-program runs moved the counter")
