"""ModelEMA(sharding=optimizer) under Paddle's dygraph optimizer sharding, 2 CPU processes over gloo.

tests/distributed/dygraph_sharding_worker.py trains a small MLP under fleet's DygraphShardingOptimizer
(V1, ``sharding_degree=2``) or ``group_sharded_parallel`` (levels ``os``/``os_g``, with a test-only CPU
shim), with an EMA given the sharded optimizer, and once in one process with an unsharded EMA over
the combined batches. Each rank averages the parameters its optimizer partition updates and the
buffer, with no collective in an update; the gathered averages, the applied model and the whole
state equal one process's; restore is bit-exact; a shard resumes on its own rank only.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import ir_mode
from test_distributed import HERE, _env, _run

WORKER = HERE / "dygraph_sharding_worker.py"
MODES = ["fleet1", "os", "os_g"]  # all three run on 3.3.1 and 2.6.2 (the worker shims os/os_g for CPU)


def _load(path) -> tuple[dict[str, np.ndarray], dict]:
    data = dict(np.load(path))
    return data, json.loads(str(data.pop("report")))


def _part(data: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}


@pytest.mark.parametrize("mode", MODES)
def test_each_rank_averages_what_it_owns_and_gathers_the_rest(tmp_path, mode):
    python, env, out = sys.executable, _env(), tmp_path / "out"
    wall = _run([python, "-m", "paddle.distributed.launch", "--nproc_per_node=2", "--log_dir",
                 str(tmp_path / "log"), str(WORKER), str(out), "--mode", mode], env, tmp_path / "launch.log")
    _run([python, str(WORKER), str(out), "--mode", mode, "--single"], env, tmp_path / "single.log")
    ranks = [_load(out / f"sharding_{mode}_{r}.npz") for r in range(2)]
    single, single_report = _load(out / f"sharding_{mode}_single.npz")
    reports = [report for _, report in ranks]
    print(f"\n{ir_mode()} dygraph sharding {mode}: 2-process run {wall:.1f}s; values kept per rank "
          f"{[r['kept_numel'] for r in reports]} of {single_report['kept_numel']}")

    weights = _part(single, "weight/")
    assert len(weights) == 6
    for data, _ in ranks:  # the training itself: ranks agree, and agree with one process
        for name, value in weights.items():
            np.testing.assert_array_equal(data[f"weight/{name}"], ranks[0][0][f"weight/{name}"])
            np.testing.assert_allclose(data[f"weight/{name}"], value, rtol=1e-5, atol=1e-6, err_msg=name)

    # Each rank keeps the averages of the parameters its optimizer owns, and the buffer's.
    owned = [set(r["owned"]) for r in reports]
    assert owned[0] and owned[1] and not owned[0] & owned[1] and owned[0] | owned[1] == set(weights)
    for r, report in enumerate(reports):
        assert set(report["kept_names"]) == owned[r] | {"scale"}, report
        assert set(report["averaged_names"]) == set(report["kept_names"])
        assert report["collectives_in_updates"] == {}, report  # no communication per update
        kept = _part(ranks[r][0], "kept/")
        assert set(kept) == set(report["kept_names"])
        for name, value in kept.items():  # the matching slices of one process's EMA
            np.testing.assert_allclose(value, single[f"kept/{name}"], rtol=1e-5, atol=1e-6, err_msg=name)
    full = single_report["kept_numel"]
    assert reports[0]["kept_numel"] + reports[1]["kept_numel"] == full + 3  # (the buffer on both)
    assert max(r["kept_numel"] for r in reports) < 0.6 * full

    # Where a whole model is needed, every rank gets every average: averages(), apply, the state.
    for prefix in ("average/", "whole/"):
        expected = _part(single, prefix)
        assert set(expected) == set(weights) | {"scale"}, prefix
        for data, _ in ranks:
            got = _part(data, prefix)
            assert set(got) == set(expected), prefix
            for name, value in got.items():
                if name != "scale":  # (each rank's buffer is its own)
                    np.testing.assert_array_equal(value, _part(ranks[0][0], prefix)[name], err_msg=name)
                np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for data, _ in ranks:
        for name in weights:
            np.testing.assert_array_equal(data[f"applied/{name}"], data[f"average/{name}"], err_msg=name)
            np.testing.assert_array_equal(data[f"restored/{name}"], data[f"weight/{name}"], err_msg=name)
        np.testing.assert_array_equal(data["restored/scale"], data["buffer/scale"])

    # States: a shard resumes on its rank, a whole state on any rank (each takes its part), a shard
    # of another rank is refused with nothing changed.
    for r, report in enumerate(reports):
        assert report["shard_names"] == sorted(report["kept_names"])
        assert report["shard_label"]["rank"] == r and report["shard_label"]["world_size"] == 2
        assert report["whole_names"] == sorted(weights | {"scale": None})
        assert report["same_after_shard"] and report["same_after_whole"], report
        assert "resumes only on the rank and layout that saved it" in report["foreign_refused"], report
        assert report["unchanged_after_refusal"], report


def test_an_optimizer_that_is_not_sharded_is_refused_naming_what_to_pass(dygraph):
    import paddle

    import paddle_ema

    model = paddle.nn.Linear(3, 2)
    opt = paddle.optimizer.AdamW(0.1, parameters=model.parameters())
    with pytest.raises(TypeError, match="sharding must be the optimizer fleet.distributed_optimizer"):
        paddle_ema.ModelEMA(model, 0.9, sharding=opt)


def test_a_shard_does_not_load_into_an_unsharded_ema_and_changes_nothing(dygraph):
    import paddle

    import paddle_ema

    model = paddle.nn.Linear(3, 2)
    ema = paddle_ema.ModelEMA(model, 0.9)
    ema.update()
    state = ema.state_dict()
    before = {n: a.numpy().copy() for n, a in ema._averages.items()}
    shard = dict(state, averages={n: a * 2 for n, a in state["averages"].items()},
                 sharding={"kind": "fleet sharding stage 1", "rank": 1, "world_size": 2})
    with pytest.raises(ValueError, match="this ModelEMA is unsharded: a shard resumes only"):
        ema.set_state_dict(shard)
    for name, average in ema._averages.items():
        np.testing.assert_array_equal(average.numpy(), before[name])


def test_a_consolidated_state_resumes_in_one_process_and_under_another_partition(tmp_path):
    """fleet stage 1's consolidated state, loaded by group_sharded_parallel's ranks (another
    partition of the parameters) and by one process: the same averages, bit for bit."""
    python, env, out = sys.executable, _env(), tmp_path / "out"
    launch = [python, "-m", "paddle.distributed.launch", "--nproc_per_node=2", "--log_dir"]
    _run([*launch, str(tmp_path / "log1"), str(WORKER), str(out), "--mode", "fleet1"], env,
         tmp_path / "a.log")
    saved = out / "whole_fleet1_2.pdparams"
    _run([*launch, str(tmp_path / "log2"), str(WORKER), str(out), "--mode", "os", "--resume", str(saved)],
         env, tmp_path / "b.log")
    _run([python, str(WORKER), str(out), "--mode", "os", "--single", "--resume", str(saved)], env,
         tmp_path / "c.log")
    expected = _part(_load(out / "sharding_fleet1_0.npz")[0], "average/")
    owned = [set(_load(out / f"sharding_os_{r}.npz")[1]["owned"]) for r in range(2)]
    assert owned != [set(r["owned"]) for r in (_load(out / f"sharding_fleet1_{r}.npz")[1] for r in range(2))]
    for stem in ("sharding_os_0", "sharding_os_1", "sharding_os_single"):
        resumed = _part(_load(out / f"{stem}.npz")[0], "resumed/")
        assert set(resumed) == set(expected), stem
        for name, value in resumed.items():
            np.testing.assert_array_equal(value, expected[name], err_msg=f"{stem}: {name}")
