"""ModelEMA over a model wrapped by Paddle's stage 3 sharding (``group_sharded_parallel(level="p_g_os")``),
2 CPU processes over gloo.

tests/distributed/stage3_worker.py trains a small MLP under stage 3 (with a test-only CPU shim), its
weights cut into one padded flat slice per rank and its biases whole on every rank, with a ModelEMA
over the wrapped model; and once in one process with an unsharded EMA over the combined batches.
Each rank averages its slices, with no collective in an update; the gathered averages, the applied
model's output and the whole state equal one process's; restore is bit-exact, also after a forward
that stopped half-way; training goes on as if nothing had been applied.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import paddle
import pytest
from test_distributed import HERE, _env, _run
from test_dygraph_sharding import _load, _part

import paddle_ema

# Eager code only: once per Paddle release (conftest.py).
pytestmark = pytest.mark.eager

WORKER = HERE / "stage3_worker.py"
SLICED = ["body.0.weight", "body.2.weight", "body.4.weight"]
SLICE = 32  # values per rank: each weight padded to 64 (256-byte alignment), cut in two
DECAY, STEPS = 0.9, 6


def _cut(whole: np.ndarray, rank: int) -> np.ndarray:
    """Rank ``rank``'s slice of ``whole`` as Paddle lays it out: flat, zero-padded, cut evenly."""
    flat = np.zeros(2 * SLICE, whole.dtype)
    flat[:whole.size] = whole.ravel()
    return flat[rank * SLICE:(rank + 1) * SLICE]


def _numpy_ema(single: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A float64 numpy EMA (threshold warm-up, from zero, bias-corrected) of the weights at each
    update of the one-process run."""
    averages, product = {}, 1.0
    for step in range(STEPS):
        decay = min(DECAY, (1 + step) / (10 + step))
        product *= decay
        for name, value in _part(single, f"step{step}/").items():
            averages[name] = decay * averages.get(name, 0.0) + (1 - decay) * value.astype(np.float64)
    return {name: value / (1 - product) for name, value in averages.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process run and the one-process run, then each resumed from the other's whole state."""
    out = tmp_path_factory.mktemp("stage3")
    env, python = _env(), sys.executable
    launch = [python, "-m", "paddle.distributed.launch", "--nproc_per_node=2", "--log_dir"]
    _run([*launch, str(out / "log"), str(WORKER), str(out / "run")], env, out / "launch.log")
    _run([python, str(WORKER), str(out / "run"), "--single"], env, out / "single.log")
    _run([*launch, str(out / "log_resumed"), str(WORKER), str(out / "resumed"), "--resume",
          str(out / "run" / "whole_stage3_single.pdparams")], env, out / "launch_resumed.log")
    _run([python, str(WORKER), str(out / "resumed"), "--single", "--resume",
          str(out / "run" / "whole_stage3_2.pdparams")], env, out / "single_resumed.log")
    return {key: _load(out / folder / f"stage3_{key}.npz")
            for folder, keys in (("run", (0, 1, "single")),) for key in keys} | {
        f"resumed_{key}": _load(out / "resumed" / f"stage3_{key}.npz") for key in (0, 1, "single")}


def test_each_rank_averages_its_slices_with_no_collective(runs):
    single, _ = runs["single"]
    expected = _numpy_ema(single)
    for rank in (0, 1):
        data, report = runs[rank]
        assert report["sliced"] == SLICED
        assert report["collectives_in_updates"] == {}
        kept = _part(data, "kept/")
        for name in SLICED:
            assert kept[name].shape == (SLICE,)
            np.testing.assert_allclose(kept[name], _cut(_part(single, "kept/")[name], rank), rtol=1e-5,
                                       atol=1e-7, err_msg=f"{name} on rank {rank}")
            padding = _cut(np.ones(_part(single, "kept/")[name].shape), rank) == 0
            assert (kept[name][padding] == 0).all(), "the padding's average is not 0"
        for name in set(kept) - set(SLICED):  # (whole on every rank, the same on both)
            np.testing.assert_array_equal(kept[name], _part(runs[1 - rank][0], "kept/")[name], err_msg=name)
        # Each rank keeps its slices and the whole biases and buffer: 118 of 150 values here (the
        # 64-value padded buffers of weights of 40, 64 and 24 values cost more than half of them).
        assert report["kept_numel"] == 3 * SLICE + 8 + 8 + 3 + 3
        for name, value in _part(data, "average/").items():
            np.testing.assert_array_equal(value, _part(runs[1 - rank][0], "average/")[name], err_msg=name)
            np.testing.assert_allclose(value, _part(single, "average/")[name], rtol=1e-5, atol=1e-6,
                                       err_msg=name)
            if name in expected:
                np.testing.assert_allclose(value, expected[name], rtol=2e-5, atol=1e-6, err_msg=name)
        for kind in ("power", "synthesized"):  # (a PowerEMA's, and a PostHocEMA's from its snapshots)
            for name, value in _part(data, f"{kind}/").items():
                np.testing.assert_array_equal(value, _part(runs[1 - rank][0], f"{kind}/")[name], err_msg=name)
                np.testing.assert_allclose(value, _part(single, f"{kind}/")[name], rtol=1e-5, atol=1e-6,
                                           err_msg=name)
        for name, value in _part(data, "weight/").items():  # (training as in one process)
            np.testing.assert_allclose(value, _part(single, "weight/")[name], rtol=1e-5, atol=1e-6)


def test_apply_gives_the_forward_the_averages_and_restore_is_bit_exact(runs):
    single, _ = runs["single"]
    for rank in (0, 1):
        data, report = runs[rank]
        out = _part(data, "out/")
        np.testing.assert_array_equal(out["applied"], _part(runs[1 - rank][0], "out/")["applied"])
        np.testing.assert_allclose(out["applied"], _part(single, "out/")["applied"], rtol=1e-5, atol=1e-6)
        assert not np.allclose(out["applied"], out["trained"])
        np.testing.assert_array_equal(out["restored"], out["trained"])
        np.testing.assert_array_equal(out["posthoc"], _part(runs[1 - rank][0], "out/")["posthoc"])
        np.testing.assert_allclose(out["posthoc"], _part(single, "out/")["posthoc"], rtol=1e-5, atol=1e-6)
        assert not np.allclose(out["posthoc"], out["applied"])
        # A forward that raised half-way inside `with ema.apply()` left its layer's weight gathered
        # whole (holding averages): restore makes the trained slice the weight's again.
        assert report["half_way"]
        np.testing.assert_array_equal(out["after_half_way"], out["trained"])
        for name, value in _part(data, "slice/").items():
            np.testing.assert_array_equal(_part(data, "restored/")[name], value, err_msg=name)
            np.testing.assert_array_equal(_part(data, "restored_posthoc/")[name], value, err_msg=name)
            np.testing.assert_array_equal(_part(data, "restored_half_way/")[name], value, err_msg=name)
        # One more training step after it all: as in one process, which applied nothing.
        for name, value in _part(data, "final/").items():
            np.testing.assert_allclose(value, _part(single, "final/")[name], rtol=1e-5, atol=1e-6,
                                       err_msg=name)


def test_states_round_trip_and_whole_ones_resume_across_layouts(runs):
    single, _ = runs["single"]
    for rank in (0, 1):
        data, report = runs[rank]
        assert report["shard_label"] == {"kind": "group_sharded_parallel stage 3", "rank": rank,
                                         "world_size": 2}
        assert report["shard_round_trip"]
        whole = _part(data, "whole/")
        for name, value in whole.items():
            np.testing.assert_array_equal(value, _part(runs[1 - rank][0], "whole/")[name], err_msg=name)
            np.testing.assert_allclose(value, _part(single, "whole/")[name], rtol=1e-5, atol=1e-6,
                                       err_msg=name)
        # One process's whole state, each rank taking its slices: the same averages, bit for bit.
        for name, value in _part(runs[f"resumed_{rank}"][0], "resumed/").items():
            np.testing.assert_array_equal(value, _part(single, "average/")[name], err_msg=name)
    # The stage-3 run's whole state, in one process.
    for name, value in _part(runs["resumed_single"][0], "resumed/").items():
        np.testing.assert_array_equal(value, _part(runs[0][0], "average/")[name], err_msg=name)


def test_what_stage_3_cannot_do_is_refused_naming_the_fix(runs):
    _, report = runs[0]
    assert "without sharding=" in report["sharding_refused"]
    assert "use ema.averages()" in report["averaged_model_refused"]


class _FakeStage3(paddle.nn.Layer):
    """What group_sharded_parallel(level="p_g_os") makes of ``layer``, as ModelEMA reads it, for rank
    ``rank`` of 2 in one process: each parameter of more than 4 values gets its zero-padded flat
    slice as ``fw_storage`` (the parameter itself stays, which Paddle would free)."""

    def __init__(self, layer, rank=0):
        super().__init__()
        self._layer = layer
        self._group = types.SimpleNamespace(rank=rank, nranks=2, ranks=[0, 1])
        self._param2buffer, self._param2buffer_size = {}, {}
        self._task_flow = types.SimpleNamespace(full_param={})
        for param in layer.parameters():
            if param.size > 4:
                half = -(-param.size // 2)
                self._param2buffer_size[param.name] = 2 * half
                self._param2buffer[param.name] = [(0, half), (half, 2 * half)]
                padded = np.zeros(2 * half, "float32")
                padded[:param.size] = param.numpy().ravel()
                param.fw_storage = paddle.to_tensor(padded[rank * half:(rank + 1) * half])

    def forward(self, x):
        return self._layer(x)


GroupShardedStage3 = type("GroupShardedStage3", (_FakeStage3,), {})  # (the name ModelEMA looks for)


def test_the_layer_stage_3_wraps_is_refused_naming_what_to_pass(dygraph):
    layer = paddle.nn.Linear(4, 3)
    GroupShardedStage3(layer)
    with pytest.raises(ValueError, match=r"'s weight are cut .* pass the model group_sharded_parallel"):
        paddle_ema.ModelEMA(layer, 0.9)


def test_a_frozen_sliced_parameter_is_refused_unless_excluded(dygraph):
    layer = paddle.nn.Linear(4, 3)
    layer.weight.stop_gradient = True
    model = GroupShardedStage3(layer)
    for frozen in ("average", "copy"):
        with pytest.raises(ValueError, match=r"not train \(weight\) cut into slices .* frozen='exclude'"):
            paddle_ema.ModelEMA(model, 0.9, frozen=frozen)
    ema = paddle_ema.ModelEMA(model, 0.9, frozen="exclude")
    assert ema.names == ["bias"]
    layer.weight.fw_storage = None  # (after the first backward stage 3 keeps it whole)
    ema.update()
    assert ema.num_updates == 1


@pytest.mark.parametrize("call", ["save", "load"])
def test_compat_files_are_refused_under_stage_3_naming_what_to_save(dygraph, tmp_path, call):
    model = GroupShardedStage3(paddle.nn.Linear(4, 3))
    ema = paddle_ema.ModelEMA(model, 0.9, init="weights")
    refusal = (r"the ppcls files hold the model's whole weights, which group_sharded_parallel stage 3 "
               r"keeps cut .* ema.consolidated_state_dict")
    with pytest.raises(ValueError, match=refusal):
        if call == "save":
            paddle_ema.compat.save(ema, str(tmp_path / "ema"), format="ppcls")
        else:
            paddle_ema.compat.load(ema, str(tmp_path / "ema"), format="ppcls")
    assert not list(tmp_path.iterdir())


def test_a_gathered_parameter_or_a_state_of_another_shape_is_refused_and_changes_nothing(dygraph):
    layer = paddle.nn.Linear(4, 3)
    model = GroupShardedStage3(layer, rank=1)
    ema = paddle_ema.ModelEMA(model, 0.9)
    assert list(ema._averages["weight"].shape) == [6]  # (rank 1's half of 12 values)
    ema.update()
    before = {n: a.numpy().copy() for n, a in ema._averages.items()}
    # A whole state (one process's) of another model's shapes:
    state = ema.state_dict()
    state.pop("sharding")
    state["averages"]["weight"] = np.zeros([3, 4], "float32")
    with pytest.raises(ValueError, match=r"'weight' is .*not a tensor of its parameter's shape \[4, 3\]"):
        ema.set_state_dict(state)
    # Rank 1 of a whole state takes its half, zero-padded:
    state["averages"]["weight"] = np.arange(12, dtype="float32").reshape(4, 3)
    ema.set_state_dict(state)
    np.testing.assert_array_equal(ema._averages["weight"].numpy(), np.arange(6, 12, dtype="float32"))
    ema.set_state_dict({**ema.state_dict(), "averages": {n: paddle.to_tensor(v) for n, v in before.items()},
                        "sharding": {"kind": "group_sharded_parallel stage 3", "rank": 1, "world_size": 2}})
    # Inside a forward (or after one that stopped half-way) stage 3 holds the weight whole:
    saved, layer.weight.fw_storage = layer.weight.fw_storage, None
    for call in (ema.update, ema.apply):
        with pytest.raises(RuntimeError, match="stage 3 holds 'weight' gathered whole"):
            call()
    assert ema.num_updates == 1
    layer.weight.fw_storage = saved
    for name, average in ema._averages.items():
        np.testing.assert_array_equal(average.numpy(), before[name], err_msg=name)


def test_apply_swaps_the_slices_and_restore_makes_them_the_parameters_again(dygraph):
    """A forward under stage 3 wraps each slice anew; restore writes the trained slice back."""
    layer = paddle.nn.Linear(4, 3)
    model = GroupShardedStage3(layer)
    ema = paddle_ema.ModelEMA(model, 0.5)
    trained = layer.weight.fw_storage
    trained_values = trained.numpy().copy()
    ema.update()
    with paddle.no_grad():
        layer.weight.fw_storage = paddle.full([6], 3.0)  # (the optimizer's step, in a new wrap)
    stepped = layer.weight.fw_storage
    ema.update()
    np.testing.assert_allclose(ema._averages["weight"].numpy(), 0.25 * trained_values + 0.5 * 3.0, rtol=1e-6)
    with ema.apply():
        applied = layer.weight.fw_storage.numpy().copy()
        layer.weight.fw_storage = layer.weight.fw_storage.clone()  # (a forward wrapped it anew)
        model._task_flow.full_param[layer.weight.name] = "gathered while applied"
    np.testing.assert_allclose(applied, (0.25 * trained_values + 1.5) / 0.75, rtol=1e-6)
    assert layer.weight.fw_storage is stepped
    np.testing.assert_array_equal(stepped.numpy(), np.full([6], 3.0, "float32"))
    assert model._task_flow.full_param == {}


def test_slices_are_averaged_in_a_group_that_keeps_no_view_of_them(dygraph):
    """Paddle gives each slice new memory at every forward: a group's view kept between updates would
    keep the old memory alive; the group views the slices only while it updates them."""
    layer = paddle.nn.Sequential(paddle.nn.Linear(4, 3), paddle.nn.Linear(3, 3))
    model = GroupShardedStage3(layer)
    ema = paddle_ema.ModelEMA(model, 0.5)
    (group,) = [g for g in ema._groups if "0.weight" in g.names]
    assert set(group.names) == {"0.weight", "1.weight"} and group._transient
    expected = {n: np.zeros(ema._slices.sizes[n][0]) for n in group.names}
    for value in (1.0, 3.0):
        with paddle.no_grad():  # (a step, then Paddle's new wrap of each slice, in new memory)
            for name, param in layer.named_parameters():
                if name in expected:
                    param.fw_storage = paddle.full([ema._slices.sizes[name][0]], value)
        ema.update()
        assert not any(v._is_initialized() for v in group._views), "the group holds slices' memory"
        for name in expected:
            expected[name] = 0.5 * expected[name] + 0.5 * value
            np.testing.assert_allclose(ema._averages[name].numpy(), expected[name], rtol=1e-6)
