"""paddle_ema under data parallelism: 2 CPU processes over gloo, in this run's Paddle mode.

``paddle.distributed.launch --nproc_per_node=2`` runs tests/distributed/dp_worker.py (a hand-built
data-parallel step: backward, all-reduce of every gradient, 1/n, apply) or, in the legacy IR,
fleet_worker.py (fleet's collective optimizer with a test-only CPU shim), each run hard-timed with its
whole process tree killed on failure; then one process runs over the combined batches. The ranks must
agree bit for bit on parameters, EMA state and applied weights, and with the single process to ~1e-6
(which catches a run that never all-reduces); the EMA adds no collective op. Rank 0's checkpoint,
saved mid-run, resumes bit-exactly on both ranks and in one process. And the scenario of Paddle's own
fleet EMA test (test_ema_fleet.py) runs in one process and in two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import ir_mode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from process_tree import kill_tree  # noqa: E402

HERE = Path(__file__).resolve().parent / "distributed"
WORKER = HERE / "dp_worker.py"
FLEET_WORKER = HERE / "fleet_worker.py"  # legacy IR only, with a test-only CPU shim
DYGRAPH_WORKER = HERE / "dygraph_worker.py"  # paddle.DataParallel with paddle_ema.ModelEMA
SHARD_WORKER = HERE / "shard_worker.py"  # fleet's static sharding, legacy IR only
FLEET_SCENARIO = HERE / "fleet_ema_scenario.py"  # Paddle's test_ema_fleet.py scenario, legacy IR only
FLEET_UNDER_PIR = ("fleet's collective minimize does not run under PIR on CPU (on 3.3: TypeError: "
                   "clone(): incompatible function arguments, in fleet's own "
                   "default_startup_program().clone(for_test=False))")
TIMEOUT = 60  # seconds, per run
STEPS = 6  # as in dp_worker.py


def _env() -> dict[str, str]:
    """This run's environment (its Paddle mode flag included) without the launcher's PADDLE_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    return env


def _run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Run ``cmd`` in its own process group, kill the whole group after TIMEOUT; return wall seconds."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            pytest.fail(f"{cmd} timed out after {TIMEOUT}s; see {log}")
        finally:
            if proc.poll() is None:  # e.g. KeyboardInterrupt
                kill_tree(proc)
    wall = time.monotonic() - start
    if rc != 0:
        logs = "".join(p.read_text()[-3000:] for p in sorted(log.parent.glob("**/workerlog.*")))
        pytest.fail(f"{cmd} exited {rc} after {wall:.1f}s:\n{log.read_text()[-3000:]}\n{logs}")
    return wall


@dataclass
class Runs:
    worker: Path
    out: Path
    walls: dict[str, float]

    def load(self, stem: str) -> dict[str, np.ndarray]:
        return dict(np.load(self.out / f"{stem}.npz"))


@pytest.fixture(scope="module", params=[WORKER, FLEET_WORKER], ids=["hand_built_step", "fleet"])
def runs(request, tmp_path_factory) -> Runs:
    """The 2-process run (rank 0 saves a checkpoint after step SAVE_AT), the single process over the
    combined batches, and both resumed from rank 0's checkpoint: 2 processes, and 1."""
    worker, mode = request.param, ir_mode()
    if worker is FLEET_WORKER and mode.endswith("pir"):
        pytest.skip(FLEET_UNDER_PIR)
    tmp = tmp_path_factory.mktemp(worker.stem)
    out, ckpt, python, env = tmp / "out", str(tmp / "out" / "ckpt" / "model"), sys.executable, _env()

    def launch(name: str, *args: str) -> float:
        return _run([python, "-m", "paddle.distributed.launch", "--nproc_per_node=2", "--log_dir",
                     str(tmp / f"log_{name}"), str(worker), str(out), *args], env, tmp / f"{name}.log")

    # The reference is always the fleet-free worker in one process (plain minimize).
    walls = {"2 processes": launch("dist"),
             "single process": _run([python, str(WORKER), str(out), "--single"], env, tmp / "single.log"),
             "2 processes resumed": launch("dist_resumed", "--resume", ckpt),
             "single process resumed": _run([python, str(WORKER), str(out), "--single", "--resume", ckpt],
                                            env, tmp / "single_resumed.log")}
    print(f"\n{mode} {worker.stem}: " + ", ".join(f"{k} {v:.1f}s" for k, v in walls.items()))
    return Runs(worker, out, walls)


def test_data_parallel_ema(runs):
    mode, worker, out = ir_mode(), runs.worker, runs.out
    ranks = [runs.load(f"rank{r}") for r in range(2)]
    single = runs.load("single")
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["mode"] == mode and r["nranks"] == 2 for r in reports), reports
    # The EMA adds no collective op (the worker asserts it too). The hand-built step all-reduces each
    # of the 4 gradients; fleet's raw-program optimizer fuses them into one all_reduce.
    for r in reports:
        assert r["collectives_with_ema"] == r["collectives_without_ema"], r
        assert len(r["collectives_with_ema"]) == (4 if worker is WORKER else 1), r
        assert not any("reduce" in t or t.startswith("c_") for t in r["op_types_added_by_ema"])

    ends = sorted(k for k in single if not k.startswith("saved/"))
    assert sorted(k for k in ranks[0] if not k.startswith("saved/")) == ends == sorted(ranks[1])
    assert any(k.startswith("applied/ema_thres/") for k in single)
    for key in ends:
        # Parameters, EMA state and applied weights: identical across ranks ...
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
        # ... and equal to one process over the combined batches.
        np.testing.assert_allclose(ranks[0][key], single[key], rtol=1e-5, atol=1e-6, err_msg=key)

    # Sanity: the EMA counted every step, and its applied weights are not the raw ones.
    assert int(single["global_step"][0]) == STEPS - 1
    steps = [k for k in single if k.startswith("state/") and k.endswith(".step")]
    assert len(steps) == 2 and all(int(single[k].reshape(-1)[0]) == STEPS for k in steps), steps
    for name in [k[len("param/"):] for k in single if k.startswith("param/")]:
        assert not np.allclose(single[f"applied/ema/{name}"], single[f"param/{name}"], atol=1e-4), name
        assert not np.allclose(single[f"applied/ema/{name}"], single[f"applied/ema_thres/{name}"],
                               atol=1e-6), name


def test_a_checkpoint_saved_by_rank_0_resumes_bit_exactly_on_every_rank_and_in_one_process(runs):
    saved = {k[len("saved/"):]: v for k, v in runs.load("rank0").items() if k.startswith("saved/")}
    assert any(k.endswith(".bias_correction") for k in saved) and any("velocity" in k for k in saved)
    uninterrupted = runs.load("rank0")
    for stem in ("rank0_resumed", "rank1_resumed", "single_resumed"):
        resumed = runs.load(stem)
        loaded = {k[len("loaded/"):]: v for k, v in resumed.items() if k.startswith("loaded/")}
        # paddle_ema.load gives every rank, and a single process, exactly what rank 0 saved:
        # parameters, optimizer state, step counter and EMA state.
        assert sorted(loaded) == sorted(saved), stem
        for name in saved:
            np.testing.assert_array_equal(loaded[name], saved[name], err_msg=f"{stem}: {name}")
        ends = [k for k in resumed if k.split("/")[0] in ("param", "state", "applied", "global_step")]
        assert len(ends) == len([k for k in uninterrupted if not k.startswith("saved/")])
        for key in ends:
            if stem == "single_resumed":  # the remaining steps over the combined batches, one process
                np.testing.assert_allclose(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6,
                                           err_msg=f"{stem}: {key}")
            else:  # the remaining steps as the uninterrupted run took them: bit for bit the same end
                np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=f"{stem}: {key}")


def test_the_scenario_of_paddles_fleet_ema_test_in_one_and_two_processes(tmp_path):
    """Paddle's test_ema_fleet.py runs one process, where fleet adds no collective; here also two.
    The script checks each applied weight against the oracle and each restore bit for bit."""
    if ir_mode().endswith("pir"):
        pytest.skip(FLEET_UNDER_PIR)
    python, env, out = sys.executable, _env(), tmp_path / "out"
    one = _run([python, str(FLEET_SCENARIO), str(out)], env, tmp_path / "single.log")
    two = _run([python, "-m", "paddle.distributed.launch", "--nproc_per_node=2", "--log_dir",
                str(tmp_path / "log"), str(FLEET_SCENARIO), str(out)], env, tmp_path / "launch.log")
    print(f"\n{ir_mode()} fleet EMA scenario: 1 process {one:.1f}s, 2 processes {two:.1f}s")
    ranks = [dict(np.load(out / f"scenario_rank{r}.npz")) for r in range(2)]
    assert sorted(ranks[0]) == sorted(ranks[1]) == sorted(np.load(out / "scenario_single.npz"))
    assert len(ranks[0]) == 8
    for key in ranks[0]:  # trained and applied weights: the same on both ranks
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)


def test_fleet_sharding_each_rank_averages_the_parameters_it_owns(tmp_path):
    """Static sharding gives each rank some of the parameters: each rank's EMA averages those, and
    together the ranks' averages, applied weights and parameters are one process's."""
    if ir_mode().endswith("pir"):
        pytest.skip(FLEET_UNDER_PIR)
    python, env, out = sys.executable, _env(), tmp_path / "out"
    wall = _run([python, "-m", "paddle.distributed.launch", "--nproc_per_node=2", "--log_dir",
                 str(tmp_path / "log"), str(SHARD_WORKER), str(out)], env, tmp_path / "launch.log")
    _run([python, str(WORKER), str(out), "--single"], env, tmp_path / "single.log")
    print(f"\n{ir_mode()} fleet sharding: 2-process run {wall:.1f}s")
    single = dict(np.load(out / "single.npz"))
    ranks = [{k: v for k, v in np.load(out / f"rank{r}.npz").items() if not k.startswith("saved/")}
             for r in range(2)]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in reports:  # sharding's broadcasts and reduces; none added by the EMA
        assert r["collectives_with_ema"] == r["collectives_without_ema"], r
        assert {"broadcast", "reduce"} <= set(r["collectives_with_ema"]) or \
            {"c_broadcast", "c_reduce_sum"} <= set(r["collectives_with_ema"]), r

    owned = [{k[len("param/"):] for k in rank if k.startswith("param/")} for rank in ranks]
    assert owned[0] and owned[1] and not owned[0] & owned[1], owned
    assert owned[0] | owned[1] == {k[len("param/"):] for k in single if k.startswith("param/")}
    # Together the ranks hold exactly what one process holds, and agree with it.
    assert set(ranks[0]) | set(ranks[1]) == set(single)
    for rank in ranks:
        for key, value in rank.items():
            np.testing.assert_allclose(value, single[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # The step counts and bias corrections are every rank's: bit for bit the same.
    shared = [k for k in single if k == "global_step" or k.endswith((".step", ".bias_correction"))]
    assert len(shared) == 5, shared
    for key in shared:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)


@pytest.mark.parametrize("to_static", [pytest.param(False, marks=pytest.mark.eager, id="eager"),
                                       pytest.param(True, id="to_static")])
def test_model_ema_under_dygraph_data_parallel(tmp_path, to_static):
    """paddle.DataParallel in 2 processes: every rank's ModelEMA is the same, and one process's over
    both ranks' batches (the forward also compiled with paddle.jit.to_static)."""
    python, env, out = sys.executable, _env(), tmp_path / "out"
    extra = ["--to-static"] if to_static else []
    wall = _run([python, "-m", "paddle.distributed.launch", "--nproc_per_node=2", "--log_dir",
                 str(tmp_path / "log"), str(DYGRAPH_WORKER), str(out), *extra], env, tmp_path / "launch.log")
    _run([python, str(DYGRAPH_WORKER), str(out), "--single", *extra], env, tmp_path / "single.log")
    print(f"\n{ir_mode()} dygraph DataParallel{' to_static' if to_static else ''}: 2-process run {wall:.1f}s")
    ranks = [dict(np.load(out / f"dygraph_{r}.npz")) for r in range(2)]
    single = dict(np.load(out / "dygraph_single.npz"))
    assert sorted(ranks[0]) == sorted(ranks[1]) == sorted(single) and len(single) == 12
    for key in single:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
        np.testing.assert_allclose(ranks[0][key], single[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for name in [k[len("weight/"):] for k in single if k.startswith("weight/")]:
        assert not np.allclose(single[f"applied/{name}"], single[f"weight/{name}"], atol=1e-4), name
