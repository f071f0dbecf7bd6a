"""Power-function EMA and post-hoc synthesis (EDM2) against float64 numpy written from the paper."""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import paddle
import pytest

import paddle_ema
from paddle_ema import power

# EDM2's Algorithm 2 target values (sigma_rel -> gamma, 4 decimals), as the issue lists them.
CONVERSIONS = {0.05: 16.9722, 0.10: 6.9372, 0.15: 3.5579, 0.28: 0.1693}


def numpy_gamma(sigma_rel):
    """gamma from sigma_rel(gamma) by bisection (not np.roots), on gamma > 0, where it falls."""
    low, high = 0.0, 1e9
    for _ in range(400):
        middle = 0.5 * (low + high)
        width = math.sqrt((middle + 1) / ((middle + 2) ** 2 * (middle + 3)))
        low, high = (middle, high) if width > sigma_rel else (low, middle)
    return 0.5 * (low + high)


def profile_inner_product(t_a, g_a, t_b, g_b):
    """The integral of (g_a+1) tau^g_a / t_a^(g_a+1) times the same for b over (0, min(t_a, t_b)]."""
    shortest = min(t_a, t_b)
    return ((g_a + 1) * (g_b + 1) * shortest ** (g_a + g_b + 1)
            / ((g_a + g_b + 1) * t_a ** (g_a + 1) * t_b ** (g_b + 1)))


def numpy_coefficients(steps, gammas, target_step, target_gamma):
    n = len(steps)
    gram = np.array([[profile_inner_product(steps[i], gammas[i], steps[j], gammas[j]) for j in range(n)]
                     for i in range(n)])
    right = np.array([profile_inner_product(steps[i], gammas[i], target_step, target_gamma)
                      for i in range(n)])
    x = np.linalg.solve(gram, right)
    return x / x.sum()


def numpy_power_ema(trajectory, gamma, every=1, snapshot_steps=()):
    """The float64 power-function EMA of ``trajectory`` (row t-1 is step t), averaging at steps
    every, 2 every, ... with beta = (1 - every / t) ** (gamma + 1); the values at ``snapshot_steps``."""
    average = np.zeros(trajectory.shape[1:])
    taken = {}
    for t in range(every, len(trajectory) + 1, every):
        beta = (1.0 - every / t) ** (gamma + 1.0)
        average = beta * average + (1.0 - beta) * trajectory[t - 1]
        if t in snapshot_steps:
            taken[t] = average.copy()
    return average, taken


class Holder(paddle.nn.Layer):
    """One float32 parameter of ``n`` values, set from a trajectory each step."""

    def __init__(self, n):
        super().__init__()
        self.w = self.create_parameter([n], dtype="float32")


def trajectory(rng, steps, n):
    """A random walk plus a sinusoid per value: it drifts, so the EMA widths differ."""
    walk = np.cumsum(rng.normal(scale=0.01, size=(steps, n)), axis=0)
    t = np.arange(1, steps + 1)[:, None]
    return walk + np.sin(t / 800.0 * (1.0 + np.arange(n) / n))


def test_conversions_match_edm2_and_round_trip():
    for sigma_rel, gamma in CONVERSIONS.items():
        assert round(paddle_ema.sigma_rel_to_gamma(sigma_rel), 4) == gamma, sigma_rel
        assert paddle_ema.sigma_rel_to_gamma(sigma_rel) == pytest.approx(numpy_gamma(sigma_rel), rel=1e-12)
    for sigma_rel in np.linspace(0.001, 0.2886, 200):
        back = paddle_ema.gamma_to_sigma_rel(paddle_ema.sigma_rel_to_gamma(sigma_rel))
        assert back == pytest.approx(sigma_rel, rel=1e-12, abs=0), sigma_rel
    for gamma in (1e-6, 0.5, 7.0, 100.0, 1e4):
        assert paddle_ema.sigma_rel_to_gamma(paddle_ema.gamma_to_sigma_rel(gamma)) == pytest.approx(
            gamma, rel=1e-9), gamma


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.2887, 0.3, float("nan"), float("inf")])
def test_sigma_rel_out_of_range_names_the_argument(bad):
    with pytest.raises(ValueError, match=r"sigma_rel must be in \(0, sqrt\(1/12\)"):
        paddle_ema.sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("bad", [0.0, -0.5, -2.0, float("inf"), float("nan")])
def test_gamma_out_of_range_names_the_argument(bad):
    with pytest.raises(ValueError, match="gamma must be a finite positive number"):
        paddle_ema.gamma_to_sigma_rel(bad)


def test_conversions_refuse_non_numbers():
    with pytest.raises(TypeError, match="sigma_rel must be a number"):
        paddle_ema.sigma_rel_to_gamma("0.05")
    with pytest.raises(TypeError, match="gamma must be a number"):
        paddle_ema.gamma_to_sigma_rel(True)


def test_coefficients_match_the_integrals_and_sum_to_one():
    rng = np.random.default_rng(3)
    steps = list(np.sort(rng.choice(np.arange(100, 20001, 100), 12, replace=False)).astype(float)) * 2
    gammas = [power.sigma_rel_to_gamma(0.05)] * 12 + [power.sigma_rel_to_gamma(0.10)] * 12
    for sigma_rel in (0.03, 0.07, 0.15):
        target = power.sigma_rel_to_gamma(sigma_rel)
        mine = power.posthoc_coefficients(steps, gammas, 20000.0, target)
        expected = numpy_coefficients(steps, gammas, 20000.0, target)
        np.testing.assert_allclose(mine, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max(),
                                   err_msg=str(sigma_rel))
        assert mine.sum() == pytest.approx(1.0, abs=1e-12)


def test_coefficients_refuse_what_the_snapshots_cannot_represent():
    with pytest.raises(ValueError, match="at least one snapshot"):
        power.posthoc_coefficients([], [], 10.0, 1.0)
    with pytest.raises(ValueError, match="every snapshot step must be in"):
        power.posthoc_coefficients([100.0, 200.0], [7.0, 7.0], 150.0, 3.0)
    with pytest.raises(ValueError, match="linearly dependent"):
        power.posthoc_coefficients([100.0, 100.0], [7.0, 7.0], 150.0, 3.0)


@pytest.mark.parametrize("every", [1, 3])
def test_power_ema_follows_float64_numpy_step_by_step(dygraph, rng, every):
    steps, n = 300, 16
    path = trajectory(rng, steps, n)
    model = Holder(n)
    gamma = power.sigma_rel_to_gamma(0.10)
    ema = paddle_ema.PowerEMA(model, 0.10, update_every=every)
    average = np.zeros(n)
    for t in range(1, steps + 1):
        model.w.set_value(path[t - 1].astype(np.float32))
        ema.update()
        if t % every == 0:
            beta = (1.0 - every / t) ** (gamma + 1.0)
            average = beta * average + (1.0 - beta) * path[t - 1].astype(np.float32)
        if t >= every:
            np.testing.assert_allclose(ema.averages()["w"].numpy(), average, rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {t}, update_every={every}")
    assert ema.step == steps and ema.num_updates == steps // every
    assert ema.decay == pytest.approx((1.0 - every / (steps - steps % every)) ** (gamma + 1.0), rel=1e-6)


def test_power_ema_update_every_tracks_the_per_step_ema(dygraph, rng):
    """update_every=10 samples the same profile: within 1e-3 of the per-step EMA on a drifting path."""
    steps, n = 2000, 32
    t = np.arange(1, steps + 1)[:, None]
    # A drift of up to 1e-4 per step: sampling every 10th step centres the profile ~5 steps later (5e-4).
    path = rng.normal(size=n) + rng.uniform(-1e-4, 1e-4, size=n) * t + 0.01 * np.sin(t / 300.0)
    model = Holder(n)
    ema = paddle_ema.PowerEMA(model, 0.10, update_every=10)
    for t in range(1, steps + 1):
        model.w.set_value(path[t - 1].astype(np.float32))
        ema.update()
    per_step, _ = numpy_power_ema(path, power.sigma_rel_to_gamma(0.10))
    got = ema.averages()["w"].numpy()
    assert np.abs(got - per_step).max() < 1e-3
    # and it is not the per-step formula applied every 10th step, which lags far behind
    lagging = np.zeros(n)
    gamma = power.sigma_rel_to_gamma(0.10)
    for t in range(10, steps + 1, 10):
        beta = (1.0 - 1.0 / t) ** (gamma + 1.0)
        lagging = beta * lagging + (1.0 - beta) * path[t - 1]
    assert np.abs(lagging - per_step).max() > 10 * np.abs(got - per_step).max()


def test_power_ema_apply_restores_bit_exactly_and_checks_its_state(dygraph, rng):
    model = paddle.nn.Linear(4, 3)
    opt = paddle.optimizer.Adam(learning_rate=0.05, parameters=model.parameters())
    ema = paddle_ema.PowerEMA(model, 0.05)
    for _ in range(5):
        model(paddle.to_tensor(rng.normal(size=(8, 4)).astype("float32"))).square().mean().backward()
        opt.step()
        opt.clear_grad()
        ema.update()
    raw = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    with ema.apply():
        for name, value in ema.averages().items():
            np.testing.assert_array_equal(model.state_dict()[name].numpy(), value.numpy())
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), raw[name], err_msg=name)
    state = ema.state_dict()
    other = paddle_ema.PowerEMA(model, 0.10)
    with pytest.raises(ValueError, match="gamma"):
        other.set_state_dict(state)
    with pytest.raises(ValueError, match="no 'gamma'"):
        other.set_state_dict(paddle_ema.ModelEMA(model).state_dict())
    twin = paddle_ema.PowerEMA(model, 0.05)
    twin.set_state_dict(state)
    for name, value in twin.averages().items():
        np.testing.assert_array_equal(value.numpy(), ema.averages()[name].numpy())


def test_power_ema_takes_one_of_sigma_rel_and_gamma(dygraph):
    model = paddle.nn.Linear(2, 2)
    assert paddle_ema.PowerEMA(model, gamma=6.9372).sigma_rel == pytest.approx(0.10, abs=1e-5)
    with pytest.raises(ValueError, match="not both"):
        paddle_ema.PowerEMA(model, 0.10, gamma=7.0)
    with pytest.raises(ValueError, match="pass sigma_rel"):
        paddle_ema.PowerEMA(model, None)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        paddle_ema.PowerEMA(model, 0.5)


def errors_against(synthesized, direct):
    """max |error| / max |value|, the measure the reconstruction table reports."""
    return float(np.abs(synthesized - direct).max() / np.abs(direct).max())


def test_posthoc_reconstruction_matches_float64_and_improves_with_snapshots(dygraph, rng, tmp_path):
    """EDM2's experiment: EMAs at 0.05 and 0.10, n evenly spaced snapshots each, synthesized 0.03 /
    0.07 / 0.15 at the last step against directly tracked float64 power EMAs.

    PADDLE_EMA_POSTHOC_STEPS (default 20000) sets the run's length."""
    steps, n = int(os.environ.get("PADDLE_EMA_POSTHOC_STEPS", 20000)), 64
    path = trajectory(rng, steps, n)
    model = Holder(n)
    every = steps // 80
    run = tmp_path / "run"
    ema = paddle_ema.PostHocEMA(model, (0.05, 0.10), snapshot_dir=run, snapshot_every=every)
    for t in range(1, steps + 1):
        model.w.set_value(path[t - 1].astype(np.float32))
        ema.update()
    # The float64 snapshots the run took (from the float32 values it saw) and the directly tracked EMAs.
    seen = path.astype(np.float32).astype(np.float64)
    snapshot_steps = set(range(every, steps + 1, every))
    tracked = {s: numpy_power_ema(seen, power.sigma_rel_to_gamma(s), snapshot_steps=snapshot_steps)[1]
               for s in (0.05, 0.10)}
    direct = {s: numpy_power_ema(seen, power.sigma_rel_to_gamma(s))[0] for s in (0.03, 0.07, 0.15)}
    # Each snapshot is the float64 power EMA to float32 tracking precision (see test_precision).
    stored = {}
    for sigma, step, file in paddle_ema.posthoc.snapshots(run):
        stored[step, sigma] = paddle.load(file, return_numpy=True)["averages"]["w"].astype(np.float64)
        reference = tracked[sigma][step]
        np.testing.assert_allclose(stored[step, sigma], reference, rtol=0,
                                   atol=1e-5 * np.abs(reference).max(), err_msg=f"snapshot {sigma} at {step}")
    assert len(stored) == 160
    table = {}
    for count in (10, 40, 80):
        chosen = sorted(snapshot_steps)[80 // count - 1::80 // count]
        folder = tmp_path / f"n{count}"
        folder.mkdir()
        for _, step, file in paddle_ema.posthoc.snapshots(run):
            if step in chosen:
                shutil.copy(file, folder)
        for target in (0.03, 0.07, 0.15):
            got = paddle_ema.posthoc.synthesize(folder, target)["w"].numpy()
            ins = [(t, s) for t in chosen for s in (0.05, 0.10)]
            weights = numpy_coefficients([t for t, _ in ins], [power.sigma_rel_to_gamma(s) for _, s in ins],
                                         float(chosen[-1]), power.sigma_rel_to_gamma(target))
            expected = sum(c * stored[key] for c, key in zip(weights, ins))
            # The float64 combination of the stored snapshots, rounded once to float32.
            np.testing.assert_allclose(got, expected, rtol=2 ** -24, atol=1e-12,
                                       err_msg=f"{count} snapshots, sigma_rel {target}")
            table[count, target] = errors_against(got, direct[target])
    print("max error / max value:", {k: f"{v:.2g}" for k, v in table.items()})
    for target in (0.03, 0.07, 0.15):
        assert table[10, target] > table[40, target] > table[80, target], (target, table)
    # The float64 reference table (its own trajectory): 80 snapshots 1.5e-5 / 7.6e-7 / 1.3e-6.
    if steps == 20000:
        assert table[80, 0.03] < 5e-5 and table[80, 0.07] < 3e-6 and table[80, 0.15] < 5e-6, table


def test_posthoc_resume_neither_loses_nor_duplicates_snapshots(dygraph, rng, tmp_path):
    steps, n = 120, 8
    path = trajectory(rng, steps, n)

    def train(ema, model, start, stop):
        for t in range(start, stop + 1):
            model.w.set_value(path[t - 1].astype(np.float32))
            ema.update()

    paddle.seed(1)
    model = Holder(n)
    whole = paddle_ema.PostHocEMA(model, snapshot_dir=tmp_path / "whole", snapshot_every=20, update_every=2)
    train(whole, model, 1, steps)

    model = Holder(n)
    first = paddle_ema.PostHocEMA(model, snapshot_dir=tmp_path / "split", snapshot_every=20, update_every=2)
    train(first, model, 1, 70)
    paddle.save(first.state_dict(), str(tmp_path / "phema.pdstate"))
    train(first, model, 71, 90)  # a run that dies after its checkpoint at 70: snapshots 80 are stale
    del first
    model = Holder(n)
    second = paddle_ema.PostHocEMA(model, snapshot_dir=tmp_path / "split", snapshot_every=20, update_every=2)
    second.set_state_dict(paddle.load(str(tmp_path / "phema.pdstate")))
    assert second.step == 70
    train(second, model, 71, steps)
    assert [s[:2] for s in paddle_ema.posthoc.snapshots(tmp_path / "split")] == [
        s[:2] for s in paddle_ema.posthoc.snapshots(tmp_path / "whole")]
    assert len(os.listdir(tmp_path / "split")) == 12  # 6 steps x 2 widths, nothing partial
    for target in (0.04, 0.12):
        for step in (60, 120):
            a = paddle_ema.posthoc.synthesize(tmp_path / "whole", target, step)["w"].numpy()
            b = second.synthesize(target, step)["w"].numpy()
            np.testing.assert_array_equal(a, b, err_msg=f"{target} at {step}")


def test_posthoc_apply_restores_bit_exactly_and_refuses_training_meanwhile(dygraph, rng, tmp_path):
    model = paddle.nn.Sequential(paddle.nn.Linear(4, 4), paddle.nn.BatchNorm1D(4))
    opt = paddle.optimizer.SGD(learning_rate=0.1, parameters=model.parameters())
    ema = paddle_ema.PostHocEMA(model, snapshot_dir=tmp_path, snapshot_every=5)
    for _ in range(20):
        model(paddle.to_tensor(rng.normal(size=(8, 4)).astype("float32"))).square().mean().backward()
        opt.step()
        opt.clear_grad()
        ema.update()
    raw = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    synthesized = ema.synthesize(0.2)
    with ema.apply(0.2):
        for name, value in synthesized.items():
            np.testing.assert_array_equal(model.state_dict()[name].numpy(), value.numpy(), err_msg=name)
        with pytest.raises(RuntimeError, match="would average the averages"):
            ema.update()
        with pytest.raises(RuntimeError, match="already applied"):
            ema.apply(0.1)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), raw[name], err_msg=name)
    assert ema.step == 20


def test_posthoc_refuses_bad_arguments_and_targets(dygraph, tmp_path):
    model = paddle.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="multiple of update_every"):
        paddle_ema.PostHocEMA(model, snapshot_dir=tmp_path, snapshot_every=5, update_every=2)
    with pytest.raises(ValueError, match="distinct"):
        paddle_ema.PostHocEMA(model, (0.05, 0.05), snapshot_dir=tmp_path, snapshot_every=5)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        paddle_ema.PostHocEMA(model, (0.05, 0.3), snapshot_dir=tmp_path, snapshot_every=5)
    with pytest.raises(FileNotFoundError, match="no PostHocEMA snapshot"):
        paddle_ema.posthoc.synthesize(tmp_path, 0.1)
    ema = paddle_ema.PostHocEMA(model, snapshot_dir=tmp_path, snapshot_every=5)
    for _ in range(10):
        ema.update()
    with pytest.raises(ValueError, match="no snapshot at or before step 4"):
        paddle_ema.posthoc.synthesize(tmp_path, 0.1, step=4)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        ema.synthesize(0.29)
    with pytest.raises(ValueError, match="after the current training step"):
        ema.synthesize(0.1, step=15)


def run_example(tmp_path, *args):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "posthoc.py")
    return subprocess.run([sys.executable, script, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)


def test_the_posthoc_example_sweeps_widths_after_training(tmp_path):
    extra = "examples/posthoc.py needs the examples extra: pip install '.[examples]'"
    pytest.importorskip("sklearn", reason=extra)
    matplotlib_image = pytest.importorskip("matplotlib.image", reason=extra)
    done = run_example(tmp_path, "--steps", "400", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("sigma_rel ")]
    assert len(lines) == 13 and sum("<- best" in line for line in lines) == 1, done.stdout
    assert len(paddle_ema.posthoc.snapshots(tmp_path / "out" / "snapshots")) == 80
    png = tmp_path / "out" / "posthoc_sweep.png"
    assert f"plot: {png}" in done.stdout
    assert matplotlib_image.imread(png).shape[1] > 400


@pytest.mark.parametrize("args, says", [
    (["--steps", "10"], "--steps: 10 is too few"),
    (["--seed", "-1"], "--seed: -1 is out of range"),
])
def test_the_posthoc_example_refuses_bad_flags(tmp_path, args, says):
    done = run_example(tmp_path, *args)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_posthoc_example_prints_help(tmp_path):
    done = run_example(tmp_path, "--help")
    assert done.returncode == 0 and "--steps" in done.stdout and not (tmp_path / "out_posthoc").exists()
