"""The scenario of Paddle's own fleet EMA test (test/legacy_test/test_ema_fleet.py), with paddle_ema.

Written anew here, step for step: fleet collective with ``without_graph_optimization``, fc(10) on
5 features with the weight "fc.weight", a test program cloned before ``minimize``, fleet's Adam
(lr 0.001), EMA(0.999) after it; two passes of 3 batches, each pass ending in ``apply`` with the test
program run inside it (``need_restore`` True, and False followed by ``restore``), the whole run done
twice from startup. Each applied weight is checked against the float64 oracle of the 6 weights seen,
and the restore bit-exactly. Paddle's test runs one process, where fleet inserts no collective; run
by ``paddle.distributed.launch --nproc_per_node=2`` this runs two, with fleet_worker's CPU shim.

Legacy IR only (``clone(for_test=True)`` and fleet collective do not run under PIR on CPU).

    python fleet_ema_scenario.py OUT  # OUT/scenario_single.npz
    python -m paddle.distributed.launch --nproc_per_node=2 fleet_ema_scenario.py OUT  # scenario_rank<r>
"""

from __future__ import annotations

import os
import sys

import dp_worker as w
import fleet_worker
import numpy as np
import paddle
from oracle import EmaOracle
from paddle import static, utils

import paddle_ema

DECAY, PARAM = 0.999, "fc.weight"


def build(strategy):
    train, startup = static.Program(), static.Program()
    with static.program_guard(train, startup), utils.unique_name.guard():
        x = static.data(name="x", shape=[-1, 5], dtype="float32")
        cost = paddle.mean(static.nn.fc(x=x, size=10, weight_attr=PARAM))
        test = train.clone(for_test=True)
        opt = paddle.distributed.fleet.distributed_optimizer(paddle.optimizer.Adam(0.001), strategy)
        opt.minimize(cost)
        ema = paddle_ema.ExponentialMovingAverage(DECAY)
        ema.update()
    for program in (train, startup, test):
        fleet_worker.drop_sync_ops(program)
    return train, startup, test, ema


def main() -> int:
    assert not w.PIR, "legacy IR only"
    out_dir = sys.argv[1]
    nranks = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
    if nranks > 1:
        w.init_comm(rank, nranks)
    strategy = paddle.distributed.fleet.DistributedStrategy()
    strategy.without_graph_optimization = True
    paddle.distributed.fleet.init(is_collective=True, strategy=strategy)
    train, startup, test, ema = build(strategy)
    collectives = [op.type for op in train.global_block().ops if w.COLLECTIVE.search(op.type)]
    assert (len(collectives) >= 1) == (nranks > 1), collectives

    exe = static.Executor(paddle.CPUPlace())
    data = np.random.default_rng(100 + rank)  # each rank its own batches, as in data parallelism
    result = {}
    for restore in (True, False):
        exe.run(startup)
        oracle = EmaOracle(DECAY, [PARAM])
        for pass_id in range(2):
            for _ in range(3):
                exe.run(train, feed={"x": data.random((10, 5)).astype("float32")})
                oracle.step({PARAM: w.read(PARAM)})
            trained = w.read(PARAM)
            with ema.apply(exe, restore):
                applied = w.read(PARAM)
                exe.run(test, feed={"x": data.random((10, 5)).astype("float32")})
            if not restore:
                np.testing.assert_array_equal(w.read(PARAM), applied)  # still applied
                ema.restore(exe)
            np.testing.assert_array_equal(w.read(PARAM), trained)
            np.testing.assert_allclose(applied, oracle.debiased(PARAM), rtol=1e-5, atol=1e-7)
            assert not np.allclose(applied, trained, rtol=0, atol=1e-5)  # the average is not the weight
            result[f"restore{restore}/pass{pass_id}/applied"] = applied
            result[f"restore{restore}/pass{pass_id}/trained"] = trained
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, f"scenario_{'single' if nranks == 1 else f'rank{rank}'}.npz"), **result)
    print("OK", w.MODE, "ranks", nranks, "collectives", collectives)
    return 0


if __name__ == "__main__":
    sys.exit(main())
