"""paddle_ema under data parallelism: 2 CPU processes over gloo, in this run's Paddle mode.

``paddle.distributed.launch --nproc_per_node=2`` runs tests/distributed/dp_worker.py (a hand-built
data-parallel step: backward, all-reduce of every gradient, 1/n, apply) or, in the legacy IR,
fleet_worker.py (fleet's collective optimizer with a test-only CPU shim), each run hard-timed with its
whole process tree killed on failure; then one process runs over the combined batches. The ranks must
agree bit for bit on parameters, EMA state and applied weights, and with the single process to ~1e-6
(which catches a run that never all-reduces); the EMA adds no collective op.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ir_mode

HERE = Path(__file__).resolve().parent / "distributed"
WORKER = HERE / "dp_worker.py"
FLEET_WORKER = HERE / "fleet_worker.py"  # legacy IR only, with a test-only CPU shim
TIMEOUT = 60  # seconds, per run
STEPS = 6  # as in dp_worker.py


def _env() -> dict[str, str]:
    """This run's environment (its Paddle mode flag included) without the launcher's PADDLE_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    return env


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc). The launcher starts each worker in a session of
    its own, so killing the launcher's process group leaves the workers running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    pids = _descendants(proc.pid)  # before the launcher dies and its workers are re-parented
    for pid in [proc.pid, *pids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Run ``cmd`` in its own process group, kill the whole group after TIMEOUT; return wall seconds."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=HERE, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            pytest.fail(f"{cmd} timed out after {TIMEOUT}s; see {log}")
        finally:
            if proc.poll() is None:  # e.g. KeyboardInterrupt
                _kill_tree(proc)
    wall = time.monotonic() - start
    if rc != 0:
        logs = "".join(p.read_text()[-3000:] for p in sorted(log.parent.glob("**/workerlog.*")))
        pytest.fail(f"{cmd} exited {rc} after {wall:.1f}s:\n{log.read_text()[-3000:]}\n{logs}")
    return wall


@pytest.mark.parametrize("worker", [WORKER, FLEET_WORKER], ids=["hand_built_step", "fleet"])
def test_data_parallel_ema(worker, tmp_path):
    mode = ir_mode()
    if worker is FLEET_WORKER and mode.endswith("pir"):
        pytest.skip("fleet's collective minimize does not run under PIR on CPU (on 3.3: TypeError: "
                    "clone(): incompatible function arguments, in fleet's own "
                    "default_startup_program().clone(for_test=False))")
    python, env = sys.executable, _env()
    out = tmp_path / "out"
    dist_wall = _run([python, "-m", "paddle.distributed.launch", "--nproc_per_node=2",
                      "--log_dir", str(tmp_path / "log"), str(worker), str(out)],
                     env, tmp_path / "launch.log")
    # The reference is always the fleet-free worker in one process (plain minimize).
    single_wall = _run([python, str(WORKER), str(out), "--single"], env, tmp_path / "single.log")
    print(f"\n{mode} {worker.stem}: 2-process run {dist_wall:.1f}s, single process {single_wall:.1f}s")

    ranks = [dict(np.load(out / f"rank{r}.npz")) for r in range(2)]
    single = dict(np.load(out / "single.npz"))
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["mode"] == mode and r["nranks"] == 2 for r in reports), reports
    # The EMA adds no collective op (the worker asserts it too). The hand-built step all-reduces each
    # of the 4 gradients; fleet's raw-program optimizer fuses them into one all_reduce.
    for r in reports:
        assert r["collectives_with_ema"] == r["collectives_without_ema"], r
        assert len(r["collectives_with_ema"]) == (4 if worker is WORKER else 1), r
        assert not any("reduce" in t or t.startswith("c_") for t in r["op_types_added_by_ema"])

    assert set(ranks[0]) == set(ranks[1]) == set(single)
    assert any(k.startswith("applied/ema_thres/") for k in single)
    for key in sorted(single):
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


