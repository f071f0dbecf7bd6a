"""Schedules (start_step, power warm-up, min_decay) and the choice of parameters (parameters=,
exclude=), step by step against the float64 oracle."""

from __future__ import annotations

import numpy as np
import paddle
import pytest
from nets import batch, build_net, read, read_all
from oracle import EmaOracle, decay_at

import paddle_ema
from paddle_ema import schedule

RTOL, ATOL = 1e-5, 1e-7
ALL = ["fc1.w", "fc1.b", "fc2.w", "fc2.b"]


def train_against_oracle(programs, exe, rng, steps, decay, *, counter=False, **options):
    """Train build_net with an EMA of ``options``; after every step the applied averages must be the
    oracle's and the restore bit-exact. Returns the EMA and the decays the oracle used."""
    main, startup = programs
    net = build_net(main, optimizer="adam")
    thres = paddle_ema.global_step_counter() if counter else None
    ema = paddle_ema.ExponentialMovingAverage(decay, thres_steps=thres, **options)
    ema.update()
    exe.run(startup)
    oracle = EmaOracle(decay, ema.parameter_names)
    schedule_keys = ("start_step", "power", "inv_gamma", "min_decay")
    oracle_options = {k: v for k, v in options.items() if k in schedule_keys}
    decays = []
    for update in range(steps):
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
        decays.append(decay_at(update, decay, thres_value=update if counter else None, **oracle_options))
        oracle.step(read_all(ema.parameter_names), decay=decays[-1])
        trained = read_all(ema.parameter_names)
        with ema.apply(exe):
            for name in ema.parameter_names:
                np.testing.assert_allclose(read(name), oracle.debiased(name), rtol=RTOL, atol=ATOL,
                                           err_msg=f"{options}: {name} after {update + 1} updates")
        for name in ema.parameter_names:
            np.testing.assert_array_equal(read(name), trained[name], err_msg=f"restore of {name}")
    return ema, decays


def test_start_step_follows_the_parameter_then_the_constant_decay(programs, exe, rng):
    ema, decays = train_against_oracle(programs, exe, rng, 6, 0.9, start_step=3)
    assert decays == [0.0, 0.0, 0.0, 0.9, 0.9, 0.9]


def test_during_start_step_the_applied_value_is_the_parameter(programs, exe, rng):
    main, startup = programs
    net = build_net(main)
    ema = paddle_ema.ExponentialMovingAverage(0.999, start_step=2)
    ema.update()
    exe.run(startup)
    for _ in range(2):
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
        np.testing.assert_array_equal(read(ema._plan.debias), [1.0])
        for name, value in ema.averages(exe).items():
            np.testing.assert_allclose(value, read(name), rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("options", [
    dict(power=2 / 3),
    dict(power=3 / 4, inv_gamma=10.0),
    dict(power=2 / 3, start_step=2, min_decay=0.5),
], ids=["power", "power_inv_gamma", "power_start_min_decay"])
def test_power_warmup_matches_the_oracle_each_step(programs, exe, rng, options):
    ema, decays = train_against_oracle(programs, exe, rng, 8, 0.999, **options)
    start = options.get("start_step", 0)
    assert decays[start] == options.get("min_decay", 0.0)  # t = 0: no decay, up to min_decay
    assert all(a <= b for a, b in zip(decays[start:], decays[start + 1:])) and decays[-1] > decays[start]


def test_threshold_warmup_with_min_decay_and_start_step(programs, exe, rng):
    ema, decays = train_against_oracle(programs, exe, rng, 7, 0.99, counter=True, start_step=2,
                                       min_decay=0.25)
    assert decays[:2] == [0.0, 0.0] and decays[2] == 0.25 and decays[3] == pytest.approx(4 / 13)


def test_power_weight_is_precise_at_large_steps(programs, exe):
    """In float32, 1 - d would lose the weight (1 + t)^-p to rounding once it nears 1e-7; the graph
    computes the weight itself, to float32's relative precision, at any step."""
    sched = schedule.Schedule.make(0.99999999, power=2 / 3)
    main, startup = programs
    with paddle.static.program_guard(main, startup):
        update = paddle.static.data("update", [1], "int64")
        weight = schedule.emit_step_weight(sched, update)
    updates = [0, 1, 10, 10**4, 10**6, 10**9]
    got = [float(exe.run(main, feed={"update": np.array([u], "int64")}, fetch_list=[weight])[0][0])
           for u in updates]
    want = [(1.0 + u) ** (-2 / 3) for u in updates]
    np.testing.assert_allclose(got, want, rtol=1e-7)
    assert got == [schedule.step_weight(sched, u) for u in updates]  # the two definitions agree


def test_the_python_and_graph_weights_agree_for_every_schedule(programs, exe):
    main, startup = programs
    cases = [
        (schedule.Schedule.make(0.999), None),
        (schedule.Schedule.make(0.999, start_step=3), None),
        (schedule.Schedule.make(0.999, threshold=True, min_decay=0.3, start_step=1), "steps"),
        (schedule.Schedule.make(0.9999, power=0.75, inv_gamma=7.0, min_decay=0.1, start_step=2), None),
    ]
    with paddle.static.program_guard(main, startup):
        update = paddle.static.data("update", [1], "int64")
        steps = paddle.static.data("steps", [1], "float32")
        weights = [schedule.emit_step_weight(s, update, steps if thres else None) for s, thres in cases]
    for u in range(12):
        got = exe.run(main, feed={"update": np.array([u], "int64"), "steps": np.array([u - 2], "float32")},
                      fetch_list=weights)
        for (sched, thres), value in zip(cases, got):
            want = schedule.step_weight(sched, u, u - 2 if thres else None)
            assert float(value[0]) == want, (sched, u)
            oracle = 1.0 - decay_at(u, sched.decay, thres_value=(u - 2) if thres else None,
                                    start_step=sched.start_step, power=sched.power,
                                    inv_gamma=sched.inv_gamma, min_decay=sched.min_decay)
            np.testing.assert_allclose(want, oracle, rtol=2e-7, err_msg=f"{sched}, update {u}")


def test_a_scheduled_ema_resumes_its_schedule_from_a_checkpoint(programs, exe, rng, tmp_path):
    """The schedule counts the EMA's own step, which the checkpoint carries."""
    main, startup = programs
    net = build_net(main)
    ema = paddle_ema.ExponentialMovingAverage(0.999, power=2 / 3, start_step=1)
    ema.update()
    exe.run(startup)
    feeds = [batch(rng) for _ in range(6)]
    for feed in feeds[:3]:
        exe.run(main, feed={"x": feed}, fetch_list=[net.loss])
    paddle.static.save(main, str(tmp_path / "model"))
    for feed in feeds[3:]:
        exe.run(main, feed={"x": feed}, fetch_list=[net.loss])
    uninterrupted = ema.averages(exe)
    exe.run(startup)
    paddle_ema.load(main, str(tmp_path / "model"))
    for feed in feeds[3:]:
        exe.run(main, feed={"x": feed}, fetch_list=[net.loss])
    for name, value in ema.averages(exe).items():
        np.testing.assert_array_equal(value, uninterrupted[name], err_msg=name)


# --- which parameters -----------------------------------------------------------------------------

@pytest.mark.parametrize("by", ["name", "graph parameter"])
def test_parameters_selects_what_is_averaged(programs, exe, rng, by):
    main, _ = programs
    build_net(main)
    chosen = ["fc2.w", "fc1.b"]
    params = {p.name: p for p in main.global_block().all_parameters()}
    listed = chosen if by == "name" else [params[n] for n in chosen]
    ema = paddle_ema.ExponentialMovingAverage(0.9, parameters=listed)
    assert sorted(ema.parameter_names) == ["fc1.b", "fc2.w"]


@pytest.mark.parametrize("exclude, left", [
    (["fc1.w"], ["fc1.b", "fc2.w", "fc2.b"]),
    ([r".*\.b"], ["fc1.w", "fc2.w"]),
    ([r"fc2\..*", "fc1.b"], ["fc1.w"]),
])
def test_exclude_leaves_out_names_and_patterns(programs, exclude, left):
    build_net(programs[0])
    assert sorted(paddle_ema.ExponentialMovingAverage(0.9, exclude=exclude).parameter_names) == sorted(left)


def test_excluded_parameters_are_never_touched(programs, exe, rng):
    """Averaged parameters match the oracle; an excluded one keeps its trained value while applied
    and has no EMA state."""
    ema, _ = train_against_oracle(programs, exe, rng, 4, 0.9, parameters=["fc1.w", "fc1.b", "fc2.w"],
                                  exclude=["fc1.b"])
    assert sorted(ema.parameter_names) == ["fc1.w", "fc2.w"]
    trained = read_all(ALL)
    with ema.apply(exe):
        for name in ("fc1.b", "fc2.b"):
            np.testing.assert_array_equal(read(name), trained[name], err_msg=name)
        assert not np.array_equal(read("fc1.w"), trained["fc1.w"])
    assert not [s for s in ema._plan.slots if s.param in ("fc1.b", "fc2.b")]
    assert set(ema.averages(exe)) == {"fc1.w", "fc2.w"}


# --- bad input: a typed error naming the argument, nothing appended -------------------------------

@pytest.mark.parametrize("options, error, says", [
    (dict(parameters="fc1.w"), TypeError, "parameters must be a list"),
    (dict(parameters=["fc9.w"]), ValueError, "parameters: 'fc9.w' is not a parameter"),
    (dict(parameters=[3]), TypeError, "parameters must hold parameter names or parameters of the default"),
    (dict(exclude="fc1.w"), TypeError, "exclude must be a list"),
    (dict(exclude=["fc9.*"]), ValueError, r"exclude: 'fc9\.\*' matches none"),
    (dict(exclude=["fc1"]), ValueError, r"exclude: 'fc1' matches none.*re\.fullmatch"),
    (dict(exclude=["fc1.w("]), ValueError, "neither a parameter name nor a valid regular expression"),
    (dict(parameters=["fc1.w"], exclude=["fc2.w"]), ValueError, "exclude: 'fc2.w' matches none"),
    (dict(exclude=[".*"]), ValueError, "no parameter to average"),
    (dict(start_step=-1), ValueError, "start_step must be at least 0"),
    (dict(start_step=2.0), TypeError, "start_step must be an int"),
    (dict(start_step=True), TypeError, "start_step must be an int"),
    (dict(power=0.0), ValueError, "power must be positive"),
    (dict(power="2/3"), TypeError, "power must be a number"),
    (dict(inv_gamma=0.0, power=1.0), ValueError, "inv_gamma must be positive"),
    (dict(inv_gamma=10.0), ValueError, "inv_gamma=10.0 only scales the power warm-up"),
    (dict(min_decay=0.95), ValueError, r"min_decay must be in \[0, decay\] = \[0, 0.9\]"),
    (dict(min_decay=-0.1), ValueError, "min_decay must be in"),
    (dict(power=1.0, thres=True), ValueError, "thres_steps and power"),
])
def test_bad_options_raise_before_anything_is_appended(programs, options, error, says):
    main, startup = programs
    build_net(main)
    if options.pop("thres", False):
        options["thres_steps"] = paddle_ema.global_step_counter()
    sizes = [len(p.global_block().ops) for p in programs]
    with pytest.raises(error, match=says):
        paddle_ema.ExponentialMovingAverage(0.9, **options)
    assert [len(p.global_block().ops) for p in programs] == sizes


def test_new_options_are_keyword_only(programs):
    build_net(programs[0])
    with pytest.raises(TypeError):
        paddle_ema.ExponentialMovingAverage(0.9, None, "ema", ["fc1.w"])


@pytest.mark.parametrize("after, min_value", [(0, 0.0), (3, 0.0), (3, 0.2)])
def test_the_ema_pytorch_mapping_in_the_readme(after, min_value):
    """ema-pytorch (update_every=1): update k (from 0) copies while k <= update_after_step, then
    uses 1 - (1 + (k - update_after_step) / inv_gamma) ** -power clipped to [min_value, beta].
    docs/schedules.md says start_step=update_after_step gives the same decays, but for update k itself when
    min_value > 0."""
    beta, power, inv_gamma = 0.999, 0.75, 2.0

    def ema_pytorch(k):
        epoch = max(k + 1 - after - 1, 0)
        if k <= after or epoch <= 0:
            return 0.0
        return min(max(1 - (1 + epoch / inv_gamma) ** -power, min_value), beta)

    ours = schedule.Schedule.make(beta, start_step=after, power=power, inv_gamma=inv_gamma,
                                  min_decay=min_value)
    for k in range(50):
        want = min_value if (k == after and min_value > 0) else ema_pytorch(k)
        assert 1 - schedule.step_weight(ours, k) == pytest.approx(want, rel=1e-6, abs=1e-7), k
