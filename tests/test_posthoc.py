"""Power-function EMA and post-hoc synthesis (EDM2) against float64 numpy written from the paper."""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import paddle
import pytest

import paddle_ema
from paddle_ema import _snapshots, power

# Eager code only: once per Paddle release (conftest.py).
pytestmark = pytest.mark.eager

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

    def __init__(self, n, dtype="float32"):
        super().__init__()
        self.w = self.create_parameter([n], dtype=dtype)


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
        subset = _snapshots.Manifest.read(str(run))  # the run's manifest, listing the chosen steps only
        subset.entries = [e for e in subset.entries if e.step in chosen]
        subset.write(str(folder))
        for entry in subset.entries:
            shutil.copy(run / entry.file, folder)
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
    files = sorted(os.listdir(tmp_path / "split"))
    assert sum(f.endswith(".pdparams") for f in files) == 12, files  # 6 steps x 2 widths
    assert not any(f.endswith(".partial") for f in files), files
    # the dead run's step-80 snapshots, replaced on resume, were moved aside
    assert sorted(os.listdir(tmp_path / "split" / "replaced")) == [
        "phema-0.05-0000000080.pdparams", "phema-0.1-0000000080.pdparams"]
    for target in (0.04, 0.12):
        for step in (60, 120):
            a = paddle_ema.posthoc.synthesize(tmp_path / "whole", target, step)["w"].numpy()
            b = second.synthesize(target, step)["w"].numpy()
            np.testing.assert_array_equal(a, b, err_msg=f"{target} at {step}")


def test_in_a_multi_process_run_rank_0_alone_writes_and_every_rank_synthesizes(dygraph, rng, tmp_path,
                                                                           monkeypatch):
    """Data parallel: every rank tracks a PostHocEMA over one snapshot_dir (ranks 0 and 1 played in
    one process). Rank 0 alone writes (before, each rank wrote its own run into the directory);
    rank 1 writes nothing, synthesizes and applies from rank 0's files, resumes rank 0's state
    without moving a file, and takes no snapshot copies."""
    steps, n = 40, 6
    path = trajectory(rng, steps, n)
    paddle.seed(1)
    model = Holder(n)
    emas = {}
    for rank in (1, 0):
        monkeypatch.setattr(paddle.distributed, "get_rank", lambda r=rank: r)
        emas[rank] = paddle_ema.PostHocEMA(model, snapshot_dir=tmp_path / "run", snapshot_every=10)
    monkeypatch.setattr(paddle.distributed, "get_rank", lambda: 1)  # (only the construction decides)
    alone = paddle_ema.PostHocEMA(Holder(n), snapshot_dir=tmp_path / "alone", snapshot_every=10)
    for t in range(steps):
        model.w.set_value(path[t].astype(np.float32))
        alone._emas[0]._layer.w.set_value(path[t].astype(np.float32))
        if t == 25:  # rank 1 reads the directory mid-run: what rank 0 has written so far
            np.testing.assert_array_equal(emas[1].synthesize(0.08)["w"].numpy(),
                                          emas[0].synthesize(0.08)["w"].numpy())
        emas[0].update()
        emas[1].update()
        alone.update()
        assert emas[1]._unwritten == []
        if t + 1 == 20:
            saved = emas[0].state_dict()
    assert os.listdir(tmp_path / "alone") == []  # (a lone process of rank 1 writes nothing either)
    files = sorted(os.listdir(tmp_path / "run"))
    assert files == ["phema-0.05-0000000010.pdparams", "phema-0.05-0000000020.pdparams",
                     "phema-0.05-0000000030.pdparams", "phema-0.05-0000000040.pdparams",
                     "phema-0.1-0000000010.pdparams", "phema-0.1-0000000020.pdparams",
                     "phema-0.1-0000000030.pdparams", "phema-0.1-0000000040.pdparams", "phema-run.json"]
    for target, step in ((0.08, None), (0.12, 20)):
        expected = paddle_ema.posthoc.synthesize(tmp_path / "run", target, step)["w"].numpy()
        for rank in (0, 1):
            np.testing.assert_array_equal(emas[rank].synthesize(target, step)["w"].numpy(), expected)
    with emas[1].apply(0.08):
        np.testing.assert_array_equal(model.w.numpy(), emas[0].synthesize(0.08)["w"].numpy())
    np.testing.assert_array_equal(model.w.numpy(), path[-1].astype(np.float32))
    # Resume rank 0's state of step 20 on rank 1: the later snapshots stay where rank 0 wrote them.
    emas[1].set_state_dict(saved)
    assert emas[1].step == 20 and sorted(os.listdir(tmp_path / "run")) == files


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
    with pytest.raises(ValueError, match="within 10%"):
        paddle_ema.PostHocEMA(model, (0.05, 0.05), snapshot_dir=tmp_path, snapshot_every=5)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        paddle_ema.PostHocEMA(model, (0.05, 0.3), snapshot_dir=tmp_path, snapshot_every=5)
    with pytest.raises(FileNotFoundError, match="holds no PostHocEMA run"):
        paddle_ema.posthoc.synthesize(tmp_path, 0.1)
    ema = paddle_ema.PostHocEMA(model, snapshot_dir=tmp_path, snapshot_every=5)
    for _ in range(10):
        ema.update()
    with pytest.raises(ValueError, match="step 4 is not a snapshot step"):
        paddle_ema.posthoc.synthesize(tmp_path, 0.1, step=4)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        ema.synthesize(0.29)
    with pytest.raises(ValueError, match="step 15 is not a snapshot step"):
        ema.synthesize(0.1, step=15)


def run_example(tmp_path, *args):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "posthoc.py")
    # (the library the tests import, also where it is not installed)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(paddle_ema.__file__))}
    return subprocess.run([sys.executable, script, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)


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


# ------------------------------------------------------------------ what a hostile user does to it


def run_posthoc(tmp_path, steps=40, every=10, folder="run", model=None, **options):
    model = model or Holder(4)
    ema = paddle_ema.PostHocEMA(model, snapshot_dir=tmp_path / folder, snapshot_every=every, **options)
    for t in range(1, steps + 1):
        model.w.set_value(np.full([4], t, "float32"))
        ema.update()
    return ema, model


def test_a_directory_belongs_to_one_run(dygraph, tmp_path):
    first, _ = run_posthoc(tmp_path)
    second = paddle_ema.PostHocEMA(Holder(4), snapshot_dir=tmp_path / "run", snapshot_every=5)
    with pytest.raises(ValueError, match="holds the snapshots of another run"):
        second.update()
    assert second.step == 0 and len(paddle_ema.posthoc.snapshots(tmp_path / "run")) == 8
    stranger = paddle_ema.PostHocEMA(Holder(4), snapshot_dir=tmp_path / "run", snapshot_every=10)
    with pytest.raises(ValueError, match="another run than the state's"):
        stranger.set_state_dict(run_posthoc(tmp_path, folder="other")[0].state_dict())
    resumed = paddle_ema.PostHocEMA(Holder(4), snapshot_dir=tmp_path / "run", snapshot_every=10)
    resumed.set_state_dict(first.state_dict())
    resumed.update()  # the same run, resumed: allowed
    assert resumed.step == 41


def test_widths_with_many_decimals_and_the_exact_exponents(dygraph, tmp_path):
    ema, _ = run_posthoc(tmp_path, sigma_rels=(1 / 15, 0.1234567891))
    got = ema.synthesize(0.09)["w"].numpy()
    np.testing.assert_allclose(got, paddle_ema.posthoc.synthesize(tmp_path / "run", 0.09)["w"].numpy())
    for sigma, _, path in paddle_ema.posthoc.snapshots(tmp_path / "run"):
        assert paddle.load(path)["gamma"] == power.sigma_rel_to_gamma(sigma)


def test_only_snapshot_steps_can_be_synthesized(dygraph, tmp_path):
    ema, _ = run_posthoc(tmp_path)
    for step in (9, 11, 45, 0, -10):
        with pytest.raises(ValueError, match=f"step {step} is not a snapshot step"):
            ema.synthesize(0.07, step)
    with pytest.raises(TypeError, match="step must be an int"):
        ema.synthesize(0.07, "40")
    assert ema.synthesize(0.07, np.int64(30))["w"].shape == [4]


def test_snapshots_that_do_not_match_the_manifest_are_refused_by_name(dygraph, tmp_path):
    run_posthoc(tmp_path)
    (_, _, path), *_ = paddle_ema.posthoc.snapshots(tmp_path / "run")
    content = paddle.load(path)
    content["averages"]["w"] = np.zeros([4, 2], "float32")
    paddle.save(content, path)
    with pytest.raises(ValueError, match=f"{os.path.basename(path)}.*names or shapes"):
        paddle_ema.posthoc.synthesize(tmp_path / "run", 0.07)
    with open(path, "wb"):
        pass  # emptied
    with pytest.raises(ValueError, match="cannot read the snapshot"):
        paddle_ema.posthoc.synthesize(tmp_path / "run", 0.07)
    with open(tmp_path / "run" / _snapshots.MANIFEST, "w") as manifest:
        manifest.write('{"format": "paddle_ema.posthoc/1", "run": 3}')
    with pytest.raises(ValueError, match="is not a PostHocEMA manifest"):
        paddle_ema.posthoc.synthesize(tmp_path / "run", 0.07)


def test_a_failed_snapshot_write_is_kept_and_written_next_time(dygraph, tmp_path, monkeypatch):
    model = Holder(4)
    ema = paddle_ema.PostHocEMA(model, snapshot_dir=tmp_path / "run", snapshot_every=5)
    blocked = tmp_path / "run" / _snapshots.file_name(0.05, 5)
    blocked.mkdir(parents=True)
    for _ in range(4):
        ema.update()
    with pytest.raises(RuntimeError, match="could not write .*phema-0.05-0000000005.pdparams"):
        ema.update()
    with pytest.raises(RuntimeError, match="could not write"):
        ema.update()  # still in the way: nothing else happens
    assert ema.step == 5
    blocked.rmdir()
    ema.update()
    assert [s[:2] for s in paddle_ema.posthoc.snapshots(tmp_path / "run")] == [(0.05, 5), (0.1, 5)]
    assert ema.step == 6 and not [f for f in os.listdir(tmp_path / "run") if f.endswith(".partial")]


def test_an_interrupted_update_is_refused_until_a_state_is_set(dygraph, tmp_path, monkeypatch):
    ema, model = run_posthoc(tmp_path, steps=10)
    saved = ema.state_dict()
    calls = []
    original = paddle_ema.PowerEMA.update

    def interrupted(self):
        calls.append(self)
        if len(calls) == 2:
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(paddle_ema.PowerEMA, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ema.update()
    monkeypatch.setattr(paddle_ema.PowerEMA, "update", original)
    with pytest.raises(RuntimeError, match="different steps"):
        ema.update()
    ema.set_state_dict(saved)
    ema.update()
    assert [e.step for e in ema.emas] == [11, 11]


def test_an_interrupted_power_ema_update_does_not_count_the_step(dygraph, monkeypatch):
    model = Holder(4)
    ema = paddle_ema.PowerEMA(model, 0.1)
    ema.update()
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(paddle_ema.dygraph._ir, "sgd_lerp_", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ema.update()
    assert ema.step == 1 and ema.num_updates == 1


def test_power_ema_resumed_with_another_update_every_uses_the_steps_it_covers(dygraph, rng):
    path = rng.normal(size=(10, 4))
    model = Holder(4)
    ema = paddle_ema.PowerEMA(model, 0.1)
    for t in range(1, 8):
        model.w.set_value(path[t - 1].astype("float32"))
        ema.update()
    resumed = paddle_ema.PowerEMA(model, 0.1, update_every=5)
    resumed.set_state_dict(ema.state_dict())
    for t in range(8, 11):
        model.w.set_value(path[t - 1].astype("float32"))
        resumed.update()
    gamma, average = power.sigma_rel_to_gamma(0.1), np.zeros(4)
    for t in list(range(1, 8)) + [10]:  # the resumed run averages at call 10, covering 3 steps
        beta = (1.0 - (3 if t == 10 else 1) / t) ** (gamma + 1.0)
        average = beta * average + (1.0 - beta) * path[t - 1].astype("float32")
    np.testing.assert_allclose(resumed.averages()["w"].numpy(), average, rtol=1e-6)


def test_set_state_dict_recovers_a_run_whose_update_failed(dygraph, tmp_path, monkeypatch):
    ema, _ = run_posthoc(tmp_path, steps=10)
    saved = ema.state_dict()

    def failing(*args):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(paddle_ema.dygraph._ir, "sgd_lerp_", failing)
    with pytest.raises(RuntimeError, match="failed half-way"):
        ema.update()
    monkeypatch.undo()
    ema.set_state_dict(saved)
    ema.update()
    assert ema.step == 11


@pytest.mark.parametrize("break_it, says", [
    (lambda s: s.update(emas=None), "do not fit"),
    (lambda s: s.update(emas=s["emas"][:1]), "do not fit"),
    (lambda s: s.update(sigma_rels=None), "tracks sigma_rels"),
    (lambda s: s.update(run=3), "do not fit"),
    (lambda s: s["emas"][1].update(last_update_call=-1), "last_update_call"),
])
def test_hand_edited_states_are_refused_and_change_nothing(dygraph, tmp_path, break_it, says):
    ema, _ = run_posthoc(tmp_path, steps=10)
    state = ema.state_dict()
    before = {k: v.numpy() for k, v in ema.emas[1].averages().items()}
    break_it(state)
    with pytest.raises(ValueError, match=says):
        ema.set_state_dict(state)
    for name, value in ema.emas[1].averages().items():
        np.testing.assert_array_equal(value.numpy(), before[name])
    assert [e.step for e in ema.emas] == [10, 10]


def test_model_that_gains_a_layer_mid_run(dygraph, tmp_path):
    class Growing(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.a = paddle.nn.Linear(2, 2)

    model = Growing()
    ema = paddle_ema.PostHocEMA(model, snapshot_dir=tmp_path, snapshot_every=5)
    for t in range(20):
        if t == 10:
            model.b = paddle.nn.Linear(2, 2)
        ema.update()
    after = ema.synthesize(0.07, 20)
    assert sorted(after) == ["a.bias", "a.weight", "b.bias", "b.weight"]
    np.testing.assert_allclose(after["b.weight"].numpy(), model.b.weight.numpy(), rtol=1e-6)  # never moved
    before = model.b.weight.numpy().copy()
    with ema.apply(0.07, step=10):
        np.testing.assert_array_equal(model.b.weight.numpy(), before)  # not in that step's snapshots
    np.testing.assert_array_equal(model.b.weight.numpy(), before)


def test_a_failed_apply_leaves_every_tracked_ema_as_it_was(dygraph, tmp_path):
    """A ModelEMA applied while a forward registers a buffer: neither the PowerEMAs nor the
    PostHocEMA adopt what restore will remove."""
    class Caching(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.lin = paddle.nn.Linear(2, 2)

        def forward(self, x):
            if "cache" not in self._buffers:
                self.register_buffer("cache", paddle.ones([2]))
            return self.lin(x)

    model = Caching()
    ema = paddle_ema.PostHocEMA(model, snapshot_dir=tmp_path, snapshot_every=5)
    plain = paddle_ema.ModelEMA(model)
    for _ in range(10):
        ema.update()
        plain.update()
    with plain.apply():
        model(paddle.ones([1, 2]))
        with pytest.raises(RuntimeError, match="reverse order"):
            with ema.apply(0.07):
                plain.restore()
    assert [e.names for e in ema.emas] == [["lin.weight", "lin.bias"]] * 2
    ema.update()  # the model is back as the EMAs know it


def test_negative_synthesized_statistics_are_logged(dygraph, tmp_path, caplog):
    model = Holder(4)
    ema = paddle_ema.PostHocEMA(model, snapshot_dir=tmp_path, snapshot_every=10)
    for t in range(1, 201):
        model.w.set_value(np.full([4], 100.0 if t < 185 else 1e-4, "float32"))
        ema.update()
    with caplog.at_level("WARNING", logger="paddle_ema"):
        value = ema.synthesize(0.01)["w"].numpy()
    assert value.min() < 0 and "negative values in ['w']" in caplog.text


def test_float64_runs_keep_float64(dygraph, tmp_path):
    model = Holder(4, "float64")
    ema = paddle_ema.PostHocEMA(model, snapshot_dir=tmp_path, snapshot_every=5, snapshot_dtype="float64")
    for t in range(1, 11):
        model.w.set_value(np.full([4], 1.0 + t * 1e-9))
        ema.update()
    value = ema.synthesize(0.07)["w"]
    assert value.dtype == paddle.float64
    with ema.apply(0.07):
        np.testing.assert_array_equal(model.w.numpy(), value.numpy())


def test_power_ema_states_and_edge_arguments(dygraph):
    model = Holder(2)
    power_ema = paddle_ema.PowerEMA(model, 0.1)
    power_ema.update()
    with pytest.raises(ValueError, match="PowerEMA's"):
        paddle_ema.ModelEMA(model, 0.9).set_state_dict(power_ema.state_dict())
    for bad in (1e155, float("inf")):
        with pytest.raises(ValueError, match="gamma must be"):
            paddle_ema.PowerEMA(model, gamma=bad)
    for bad in (5e-324, 1e-9):
        with pytest.raises(ValueError, match="sigma_rel must be"):
            paddle_ema.PowerEMA(model, bad)
    with pytest.raises(ValueError, match="within 10%"):
        paddle_ema.PostHocEMA(model, (0.05, 0.052), snapshot_dir="unused", snapshot_every=5)
