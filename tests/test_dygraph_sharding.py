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

# Eager code only: once per Paddle release (conftest.py).
pytestmark = pytest.mark.eager

WORKER = HERE / "dygraph_sharding_worker.py"
# All run on 3.3.1 and 2.6.2 (the worker shims fleet1f, os and os_g for the CPU). Fleet's tensor fusion
# (fleet1f) takes no batch norm: it asserts that every parameter it fuses trains ("AssertionError: param
# must be trainable...", from tensor_fusion_helper.flatten_dense_tensors).
MODES = ["fleet1", "fleet1f", "os", "os_g"]
BATCH_NORM_MODES = ["fleet1", "os", "os_g"]


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
    # The training itself: ranks agree, and agree with one process, also in a step after apply,
    # restore and the state round trips (and so does the EMA's update after it).
    for data, _ in ranks:
        for prefix in ("weight/", "after_weight/", "after_average/"):
            for name, value in _part(single, prefix).items():
                np.testing.assert_array_equal(data[prefix + name], ranks[0][0][prefix + name])
                np.testing.assert_allclose(data[prefix + name], value, rtol=1e-5, atol=1e-6, err_msg=name)

    # Each rank keeps the averages of the parameters its optimizer owns, and the buffer's.
    owned = [set(r["owned"]) for r in reports]
    assert owned[0] and owned[1] and not owned[0] & owned[1] and owned[0] | owned[1] == set(weights)
    for r, report in enumerate(reports):
        assert set(report["kept_names"]) == owned[r] | {"scale"}, report
        assert set(report["averaged_names"]) == set(report["kept_names"])
        assert report["collectives_in_updates"] == {}, report  # no communication per update
        assert report["master_weights_of"], "master_weights= does not find the optimizer that steps"
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


@pytest.mark.parametrize("mode", BATCH_NORM_MODES)
def test_batch_norm_statistics_stay_each_ranks_own_and_ranks_out_of_step_are_refused(tmp_path, mode):
    """Batch-norm statistics are parameters that do not train, in the optimizer's partition too, and
    each rank's model holds its own: each rank averages its own (before the fix, the owner's
    averages were applied on every rank). The sharded EMA (and PowerEMA) equals an unsharded one
    over the same rank's model, bit for bit; PostHocEMA(sharding=)'s snapshots, which rank 0 writes,
    are an unsharded PostHocEMA's, and one directory shared by unsharded PostHocEMAs on both ranks
    is written by rank 0 alone; a ppdet checkpoint compat.save writes under sharding
    loads back with compat.load on every rank; the consolidated state follows model.to(float64);
    a gather with a
    rank that failed, or between ranks at different updates, raises on every rank."""
    python, env, out = sys.executable, _env(), tmp_path / "out"
    _run([python, "-m", "paddle.distributed.launch", "--nproc_per_node=2", "--log_dir",
          str(tmp_path / "log"), str(WORKER), str(out), "--mode", mode, "--batch-norm"], env,
         tmp_path / "launch.log")
    ranks = [_load(out / f"batch_norm_{mode}_{r}.npz") for r in range(2)]
    statistics = {"body.2._mean", "body.2._variance"}
    for r, (data, report) in enumerate(ranks):
        assert statistics <= set(report["kept_names"]), report  # averaged on every rank
        assert report["collectives_in_updates"] == {}, report
        reference = _part(data, "reference/")
        average = _part(data, "average/")
        assert set(average) == set(reference) and statistics <= set(average)
        for name, value in reference.items():
            np.testing.assert_array_equal(average[name], value, err_msg=f"rank {r}: {name}")
            np.testing.assert_array_equal(data[f"applied/{name}"], value, err_msg=f"rank {r}: {name}")
            np.testing.assert_array_equal(data[f"restored/{name}"], data[f"weight/{name}"], err_msg=name)
        power, power_reference = _part(data, "power/"), _part(data, "power_reference/")
        assert set(power) == set(reference)
        for name, value in power_reference.items():  # PowerEMA(sharding=): the same, bit for bit
            np.testing.assert_array_equal(power[name], value, err_msg=f"rank {r}: {name}")
        # PostHocEMA(sharding=): rank 0 wrote every snapshot, gathered, as an unsharded PostHocEMA of
        # rank 0 writes it (bit for bit); an unsharded one on both ranks over one directory: rank 0
        # alone wrote it. Both ranks synthesize (and apply) from the files.
        taken = [(w, t) for w in (0.05, 0.1) for t in (2, 4, 6)]
        listed = ["phema-run.json"] + [f"phema-{w}-{t:010d}.pdparams" for w, t in taken]
        for label in ("posthoc_files", "posthoc_reference_files"):
            assert sorted(report[label]) == sorted(listed), report
        assert sorted(map(tuple, report["posthoc_snapshots"])) == taken
        snapshots = _part(data, "posthoc_snapshot/")
        assert len(snapshots) == 6 * len(reference)
        for key, value in snapshots.items():
            np.testing.assert_array_equal(value, data[f"posthoc_reference_snapshot/{key}"], err_msg=key)
            np.testing.assert_array_equal(value, ranks[0][0][f"posthoc_snapshot/{key}"], err_msg=key)
        synthesized = _part(data, "posthoc_synth/")
        assert set(synthesized) == set(reference)
        for name, value in synthesized.items():
            np.testing.assert_array_equal(value, data[f"posthoc_reference_synth/{name}"], err_msg=name)
            np.testing.assert_array_equal(value, ranks[0][0][f"posthoc_synth/{name}"], err_msg=name)
            np.testing.assert_array_equal(data[f"posthoc_applied/{name}"], value, err_msg=name)
        assert report["posthoc_restored"], report
        # compat.save/load under sharding: the file is one model's (rank 0's, its statistics too),
        # and every rank loads all of it.
        ppdet = _part(data, "ppdet/")
        assert set(ppdet) == set(reference)
        for name, value in _part(ranks[0][0], "reference/").items():
            np.testing.assert_allclose(ppdet[name], value, rtol=1e-6, atol=1e-7, err_msg=f"rank {r}: {name}")
        whole, reference64 = _part(data, "whole64/"), _part(data, "reference64/")
        assert set(whole) == set(reference64) and report["whole64_dtypes"] == ["float64"], report
        for name, value in reference64.items():
            np.testing.assert_array_equal(whole[name], value, err_msg=f"rank {r}: {name}")
        failed = report["failed_gather"]
        assert failed is not None and report["failed_gather_s"] < 10, report
        assert ("rank 1 of the sharding group failed" in failed) == (r == 0), failed
        stale = "EMAs are at different updates (rank 0: 7 updates, rank 1: 6 updates)"
        for key in ("stale_gather", "stale_apply", "stale_whole"):
            assert stale in report[key], report
        assert report["weights_unchanged"], report
    # The statistics are the ranks' own: they differ between ranks (3.x); the weights agree.
    trained = [n for n in _part(ranks[0][0], "weight/") if n not in statistics]
    for name in trained:
        np.testing.assert_array_equal(ranks[0][0][f"weight/{name}"], ranks[1][0][f"weight/{name}"])


def test_the_gather_sends_one_flat_buffer_per_owner_and_dtype_and_cuts_it_back(dygraph, monkeypatch):
    """Partition.gather in one process, with paddle.distributed's broadcast and rank played by a
    fake two-rank group: rank 0 and rank 1 each send what they own (float32 and float64, an empty
    tensor among them) in one buffer per dtype, and each receives the other's values exactly."""
    import paddle

    from paddle_ema import _sharding

    rng = np.random.default_rng(0)
    specs = {"a": ([3, 2], "float32"), "b": ([0, 4], "float32"), "c": ([5], "float64"),
             "d": ([2, 2], "float32"), "e": ([1], "float64")}
    owners = {"a": 0, "b": 0, "c": 1, "d": 1, "e": 0}
    truth = {n: rng.standard_normal(shape).astype(dtype) for n, (shape, dtype) in specs.items()}
    # Call number -> (sender, flat buffer), worked out independently of the code under test.
    expected = {**_flat_sends(owners, specs, truth, 0), **_flat_sends(owners, specs, truth, 1)}
    assert sorted(expected) == [0, 1, 2, 3]  # (0, f32: a, b empty) (1, f64) (1, f32) (0, f64)
    playing = {"rank": 0, "calls": 0}

    def broadcast(tensor, src, group=None):
        sender, flat = expected[playing["calls"]]
        playing["calls"] += 1
        assert src == sender
        if src == playing["rank"]:  # what the owner sends is its values, flat, in order
            np.testing.assert_array_equal(tensor.numpy(), flat)
        else:
            assert list(tensor.shape) == [flat.size] and str(tensor.numpy().dtype) == str(flat.dtype)
            tensor.set_value(paddle.to_tensor(flat))

    class Group:
        ranks, rank, nranks = [0, 1], 0, 2

    monkeypatch.setattr(paddle.distributed, "broadcast", broadcast)
    partition = _sharding.Partition("test", Group(), 0, 2, {})
    for rank in (0, 1):
        monkeypatch.setattr(paddle.distributed, "get_rank", lambda r=rank: r)
        playing.update(rank=rank, calls=0)
        mine = {n: paddle.to_tensor(truth[n]) for n, r in owners.items() if r == rank}
        got = partition.gather(owners, mine, specs)
        assert playing["calls"] == 4 and set(got) == set(owners)
        for name, value in got.items():
            assert list(value.shape) == specs[name][0] and str(value.numpy().dtype) == specs[name][1]
            np.testing.assert_array_equal(value.numpy(), truth[name], err_msg=f"rank {rank}: {name}")


def _flat_sends(owners, specs, truth, rank) -> dict:
    """What rank ``rank`` sends, by call number: the flat buffers per (owner, dtype) in first-seen
    order, skipping empty tensors (independent of the code under test's own concat)."""
    batches: dict = {}
    for name, owner in owners.items():
        batches.setdefault((owner, specs[name][1]), []).append(name)
    sends, call = {}, 0
    for (owner, _), names in batches.items():
        sized = [n for n in names if np.prod(specs[n][0])]
        if not sized:
            continue
        if owner == rank:
            sends[call] = (owner, np.concatenate([truth[n].ravel() for n in sized]))
        call += 1
    return sends


def _fake_stage2(model, owner_of):
    """An object Partition.of reads as group_sharded_parallel's optimizer (two ranks, this one 0),
    whose partition puts each parameter of ``model`` on ``owner_of(structured name)``."""
    class Group:
        ranks, rank, nranks = [0, 1], 0, 2

    class GroupShardedOptimizerStage2:
        _group = Group()
        param2rank = {p.name: owner_of(n) for n, p in model.named_parameters()}

    return GroupShardedOptimizerStage2()


def test_statistics_and_frozen_parameters_are_averaged_on_every_rank(dygraph):
    """The optimizer's partition holds batch-norm statistics and frozen parameters when it was
    given model.parameters(); no rank's optimizer updates them, each rank's model holds its own, so
    each rank averages its own, whoever the partition says owns them."""
    import paddle

    import paddle_ema

    model = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.BatchNorm1D(4), paddle.nn.Linear(4, 2))
    model[2].bias.stop_gradient = True
    ema = paddle_ema.ModelEMA(model, 0.9, sharding=_fake_stage2(model, lambda name: 1))
    assert ema.names == ["1._mean", "1._variance", "2.bias"]
    assert sorted(ema._elsewhere) == ["0.bias", "0.weight", "1.bias", "1.weight", "2.weight"]


def test_an_optimizer_whose_partition_holds_none_of_the_model_is_refused(dygraph):
    import paddle

    import paddle_ema

    model, other = paddle.nn.Linear(3, 2), paddle.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="its partition holds none of this model's trainable parameters"):
        paddle_ema.ModelEMA(model, 0.9, sharding=_fake_stage2(other, lambda name: 0))
    frozen = paddle.nn.Linear(3, 2)  # (a partition of only parameters that do not train)
    for p in frozen.parameters():
        p.stop_gradient = True
    with pytest.raises(ValueError, match="its partition holds none"):
        paddle_ema.ModelEMA(frozen, 0.9, sharding=_fake_stage2(frozen, lambda name: 0))
    # parameters= choosing only a buffer is still an EMA of this model under its optimizer.
    with_buffer = paddle.nn.BatchNorm1D(2)
    ema = paddle_ema.ModelEMA(with_buffer, 0.9, parameters=["_mean"],
                              sharding=_fake_stage2(with_buffer, lambda name: 1))
    assert ema.names == ["_mean"] and ema._elsewhere == []


def _padded(value: np.ndarray, stop: int) -> np.ndarray:
    flat = value.reshape(-1)
    return np.concatenate([flat, np.zeros(max(0, stop - flat.size), flat.dtype)])


def test_split_param_each_rank_averages_its_pieces_and_gathers_the_whole(tmp_path):
    """Fleet's DygraphShardingOptimizerV2 (split_param), under MixPrecisionLayer as PaddleNLP trains
    (the worker shims its buffers and gloo's reduce-scatter for the CPU, with a 16-byte alignment so
    that the ranks' shares cut a weight mid-way and one share ends in padding). Each rank keeps the
    average of its piece of each parameter: the matching piece of one process's EMA (the padding
    averages 0), about half of the values; no collective in an update. averages(), apply, the
    consolidated state equal one process's on both ranks; restore is bit-exact and leaves the
    weights in the optimizer's buffers, so training goes on as in one process; a whole state
    (one process's) resumes, each rank taking its pieces."""
    python, env, out = sys.executable, _env(), tmp_path / "out"
    _run([python, str(WORKER), str(out), "--mode", "fleet2", "--single"], env, tmp_path / "single.log")
    saved = out / "whole_fleet2_single.pdparams"
    wall = _run([python, "-m", "paddle.distributed.launch", "--nproc_per_node=2", "--log_dir",
                 str(tmp_path / "log"), str(WORKER), str(out), "--mode", "fleet2", "--resume", str(saved)],
                env, tmp_path / "launch.log")
    ranks = [_load(out / f"sharding_fleet2_{r}.npz") for r in range(2)]
    single, single_report = _load(out / "sharding_fleet2_single.npz")
    reports = [report for _, report in ranks]
    print(f"\n{ir_mode()} dygraph sharding split_param: 2-process run {wall:.1f}s; values kept per "
          f"rank {[r['kept_numel'] for r in reports]} of {single_report['kept_numel']}")

    weights = _part(single, "weight/")
    for data, _ in ranks:
        for prefix in ("weight/", "after_weight/"):  # the training: ranks agree, and with one process
            for name, value in _part(single, prefix).items():
                np.testing.assert_array_equal(data[prefix + name], ranks[0][0][prefix + name])
                np.testing.assert_allclose(data[prefix + name], value, rtol=1e-5, atol=1e-6, err_msg=name)

    # Each rank's pieces: where its share meets each padded flat parameter, the shares end to end.
    rows = [report["rows"] for report in reports]
    assert set(rows[0]) == set(weights)
    for name in weights:  # (the pieces a rank holds, in rank order, end to end from 0)
        spans = [tuple(rows[r][name]) for r in range(2) if rows[r][name][0] < rows[r][name][1]]
        ends = [0] + [stop for _, stop in spans]
        assert [start for start, _ in spans] == ends[:-1] and ends[-1] >= weights[name].size, (name, rows)
    assert 0 < rows[0]["body.2.weight"][1] < weights["body.2.weight"].size  # (cut mid-way)
    assert rows[1]["body.4.bias"][1] > weights["body.4.bias"].size  # (a share ending in padding)
    for r, report in enumerate(reports):
        assert report["collectives_in_updates"] == {}, report
        assert report["buffers_hold_the_weights"], report
        kept = _part(ranks[r][0], "kept/")
        assert set(kept) == set(weights) | {"scale"}
        for name, (start, stop) in rows[r].items():
            expected = _padded(single[f"kept/{name}"], stop)[start:stop]
            assert kept[name].shape == (stop - start,), name
            np.testing.assert_allclose(kept[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(kept["scale"], single["kept/scale"], rtol=1e-6)
    full = single_report["kept_numel"]
    assert max(r["kept_numel"] for r in reports) < 0.6 * full

    # Every rank gets every average whole, bit-equal across ranks, equal to one process's.
    for prefix in ("average/", "whole/", "resumed/", "after_average/"):
        expected = _part(single, "average/" if prefix == "resumed/" else prefix)
        for data, _ in ranks:
            got = _part(data, prefix)
            assert set(got) == set(expected), prefix
            for name, value in got.items():
                np.testing.assert_array_equal(value, _part(ranks[0][0], prefix)[name], err_msg=name)
                if prefix == "resumed/":  # (one process's state, cut into pieces and gathered)
                    np.testing.assert_array_equal(value, expected[name], err_msg=name)
                np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for data, _ in ranks:
        for name in weights:
            np.testing.assert_array_equal(data[f"applied/{name}"], data[f"average/{name}"], err_msg=name)
            np.testing.assert_array_equal(data[f"restored/{name}"], data[f"weight/{name}"], err_msg=name)
    # averaged_model(); PowerEMA and PostHocEMA (snapshots gathered from the pieces) as in one
    # process; PostHocEMA's apply swaps whole synthesized weights in and restores them bit for bit.
    for data, _ in ranks:
        for prefix in ("power/", "posthoc_synth/"):
            expected = _part(single, prefix)
            assert set(_part(data, prefix)) == set(expected) and len(expected) == 7, prefix
            for name, value in expected.items():
                np.testing.assert_array_equal(data[prefix + name], ranks[0][0][prefix + name], err_msg=name)
                np.testing.assert_allclose(data[prefix + name], value, rtol=1e-5, atol=1e-6, err_msg=name)
        for name in weights:
            np.testing.assert_array_equal(data[f"twin/{name}"], data[f"average/{name}"])  # averaged_model()
            np.testing.assert_array_equal(data[f"posthoc_applied/{name}"], data[f"posthoc_synth/{name}"])
            np.testing.assert_array_equal(data[f"posthoc_restored/{name}"], data[f"weight/{name}"])
    for r, report in enumerate(reports):
        assert "which fleet sharding split_param keeps cut across the ranks" in report["compat_refused"]
        assert report["shard_label"] == {"kind": "fleet sharding split_param", "rank": r, "world_size": 2}
        assert report["same_after_shard"] and report["same_after_whole"], report
        assert "resumes only on the rank and layout that saved it" in report["foreign_refused"], report
        assert report["unchanged_after_refusal"], report
