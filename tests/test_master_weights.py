"""ModelEMA(master_weights=optimizer): the averages of float16/bfloat16 parameters follow the optimizer's
float32 master weights (multi_precision=True), not the parameters rounded to 16 bits.

Paddle's CPU build has no float16/bfloat16 matmul or optimizer kernels, so these tests play the
optimizer's part: they make its master weights with its own ``_create_master_weight`` (what its first
step does), move them as a step would, and set each parameter to its master weight cast down (what
the multi-precision kernels write).
"""

from __future__ import annotations

import sys

import numpy as np
import paddle
import pytest

import paddle_ema

# Eager code only: once per Paddle release (conftest.py).
pytestmark = pytest.mark.eager

DECAY = 0.9


def low_precision_model(dtype):
    paddle.seed(4)
    model = paddle.nn.Linear(6, 5)
    model.to(dtype=dtype)
    opt = paddle.optimizer.AdamW(0.1, parameters=model.parameters(), multi_precision=True)
    return model, opt


def step(model, opt, rng, scale=1e-4):
    """A step of the multi-precision optimizer: each master weight moves by about ``scale`` (relative;
    a bias at zero by ``0.1 * scale``), less than a float16 parameter's rounding, and the parameter
    becomes it cast down."""
    with paddle.no_grad():
        for param in model.parameters():
            master = opt._master_weights[param.name]
            value = master.numpy()
            moved = value + scale * (np.abs(value) + 0.1) * rng.standard_normal(param.shape)
            master.set_value(moved.astype("float32"))
            param.set_value(master.astype(param.dtype))


def masters(model, opt):
    return {n: opt._master_weights[p.name].numpy().astype(np.float64) for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_averages_follow_the_master_weights_not_the_rounded_parameters(dygraph, rng, dtype):
    model, opt = low_precision_model(dtype)
    for param in model.parameters():
        opt._create_master_weight(param)
    with_masters = paddle_ema.ModelEMA(model, DECAY, master_weights=opt)
    rounded = paddle_ema.ModelEMA(model, DECAY)
    expected = {n: 0.0 for n in with_masters.names}
    for _ in range(30):
        step(model, opt, rng)
        for name, value in masters(model, opt).items():
            expected[name] = DECAY * expected[name] + (1 - DECAY) * value
        with_masters.update()
        rounded.update()
    correction = 1 - DECAY ** 30
    for name, average in with_masters._averages.items():
        kept = average.numpy().astype(np.float64) / correction
        np.testing.assert_allclose(kept, expected[name] / correction, rtol=2e-6, err_msg=name)
        # The rounded parameters' EMA misses what the steps moved below the parameters' rounding.
        off = np.abs(rounded._averages[name].numpy() / correction - expected[name] / correction)
        assert off.max() > 1e-5 * np.abs(expected[name] / correction).max(), name
        np.testing.assert_allclose(with_masters.averages()[name].astype("float32").numpy(),
                                   expected[name] / correction, rtol=1e-2 if dtype == "bfloat16" else 1e-3,
                                   atol=1e-7)  # (the cast to 16 bits; float16's subnormals are 6e-8 apart)


def test_master_weights_made_later_or_replaced_are_followed(dygraph, rng):
    model, opt = low_precision_model("float16")
    ema = paddle_ema.ModelEMA(model, DECAY, master_weights=opt)
    ema.update()  # (no master weight yet: the optimizer makes them at its first step)
    assert ema._sources == {}
    for param in model.parameters():
        opt._create_master_weight(param)
    step(model, opt, rng)
    ema.update()
    assert set(ema._sources) == {"weight", "bias"}
    # The optimizer's set_state_dict replaces the dict and its tensors: the new ones are read.
    opt._master_weights = {k: paddle.full(v.shape, 0.25, "float32") for k, v in opt._master_weights.items()}
    ema.update()
    assert all(ema._sources[n] is opt._master_weights[p.name] for n, p in model.named_parameters())
    weight = 1 - DECAY
    first = float(ema._averages["bias"].numpy()[0])
    ema.update()
    np.testing.assert_allclose(ema._averages["bias"].numpy()[0], first + weight * (0.25 - first), rtol=1e-6)


def test_apply_writes_the_parameters_not_the_master_weights_and_restores_bit_exactly(dygraph, rng):
    model, opt = low_precision_model("float16")
    for param in model.parameters():
        opt._create_master_weight(param)
    ema = paddle_ema.ModelEMA(model, DECAY, master_weights=opt)
    for _ in range(3):
        step(model, opt, rng, scale=1e-2)
        ema.update()
    trained = {n: p.numpy().copy() for n, p in model.named_parameters()}
    held = masters(model, opt)
    averages = ema.averages()
    with ema.apply():
        for name, param in model.named_parameters():
            assert param.dtype == paddle.float16
            np.testing.assert_array_equal(param.numpy(), averages[name].numpy())
    for name, param in model.named_parameters():
        np.testing.assert_array_equal(param.numpy(), trained[name])
    for name, value in masters(model, opt).items():
        np.testing.assert_array_equal(value, held[name])


def test_float32_parameters_have_no_master_weights_and_the_same_numbers(dygraph, rng):
    model = paddle.nn.Linear(6, 5)
    opt = paddle.optimizer.AdamW(0.1, parameters=model.parameters(), multi_precision=True)
    ema = paddle_ema.ModelEMA(model, DECAY, master_weights=opt)
    plain = paddle_ema.ModelEMA(model, DECAY)
    for _ in range(3):
        with paddle.no_grad():
            for param in model.parameters():
                param.set_value(rng.standard_normal(param.shape).astype("float32"))
        ema.update()
        plain.update()
    assert ema._sources == {}
    for name, average in ema._averages.items():
        np.testing.assert_array_equal(average.numpy(), plain._averages[name].numpy())


@pytest.mark.parametrize("bad", [0.1, "adamw", paddle.nn.Linear(2, 2)])
def test_master_weights_must_be_an_optimizer(dygraph, bad):
    model = paddle.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="master_weights must be the optimizer that trains the model"):
        paddle_ema.ModelEMA(model, DECAY, master_weights=bad)


def test_power_and_posthoc_emas_follow_master_weights_too(dygraph, rng, tmp_path):
    model, opt = low_precision_model("float16")
    for param in model.parameters():
        opt._create_master_weight(param)
    power = paddle_ema.PowerEMA(model, 0.1, master_weights=opt)
    posthoc = paddle_ema.PostHocEMA(model, snapshot_dir=tmp_path, snapshot_every=1, master_weights=opt)
    step(model, opt, rng)
    power.update()
    posthoc.update()
    # (the first power-function update copies: the average is the master weight, exactly)
    for ema in (power, *posthoc._emas):
        for name, value in masters(model, opt).items():
            np.testing.assert_array_equal(ema._averages[name].numpy(), value.astype("float32"), err_msg=name)


def test_under_split_param_each_piece_follows_its_master_weight(tmp_path):
    """Fleet's split_param (DygraphShardingOptimizerV2) keys the master weight of a rank's piece of a
    parameter (its slice parameter, padded) by the parameter's name: each piece's average follows it
    (2 processes, steps played on each rank's pieces: tests/distributed/split_masters_worker.py)."""
    from test_distributed import HERE, _env, _run

    _run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node=2", "--log_dir",
          str(tmp_path / "log"), str(HERE / "split_masters_worker.py"), str(tmp_path / "out")], _env(),
         tmp_path / "worker.log")
    # The buffer: the weight's 30 values padded to 32, the bias's 5 to 16; each rank's share 24.
    sizes = [{"weight": 24, "bias": 0}, {"weight": 8, "bias": 16}]
    for rank in range(2):
        data = dict(np.load(tmp_path / "out" / f"split_masters_{rank}.npz"))
        held = [n for n in ("bias", "weight") if sizes[rank][n]]
        assert list(data["sources"]) == held, rank
        steps = 1 + max(int(k.split("/")[1]) for k in data if k.startswith("master/"))
        correction = 1 - DECAY ** steps
        for name in held:
            expected = 0.0
            for step in range(steps):
                expected = DECAY * expected + (1 - DECAY) * data[f"master/{step}/{name}"].astype(np.float64)
            assert data[f"kept/{name}"].shape == expected.shape == (sizes[rank][name],)
            np.testing.assert_allclose(data[f"kept/{name}"] / correction, expected / correction, rtol=2e-6,
                                       err_msg=f"rank {rank}: {name}")
            off = np.abs(data[f"rounded/{name}"] / correction - expected / correction)
            assert off.max() > 1e-5 * np.abs(expected / correction).max(), name
