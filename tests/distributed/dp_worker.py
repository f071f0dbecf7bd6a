"""One rank of a data-parallel run (2 CPU processes over gloo) with paddle_ema, fleet-free.

Run by tests/test_distributed.py in the Paddle mode of the test run (the interpreter and
FLAGS_enable_pir_api in the environment):

    python -m paddle.distributed.launch --nproc_per_node=2 --log_dir LOG dp_worker.py OUT  # OUT/rank<r>.npz
    python dp_worker.py OUT --single  # one process over the combined batches: OUT/single.npz
    ... dp_worker.py OUT --resume CKPT  # load rank 0's checkpoint, train the steps after it

Rank 0 (only) saves a paddle.static.save checkpoint after step SAVE_AT to OUT/ckpt/model and records
what it saved; a --resume run loads it with paddle_ema.load, records what it loaded, and trains the
remaining steps on the same batches, so its end state can be compared with the uninterrupted run.

Each step is built by hand: append_backward, all-reduce (sum) of every gradient, scale by 1/n,
apply_gradients, with the gloo set-up and all-reduce of examples/distributed.py (so the tests prove
the example's code). Parameters are set from one numpy RNG after startup, so every rank starts
alike without a broadcast. Two EMAs: a constant decay, and one warmed up by global_step_counter().
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import paddle

paddle.enable_static()

import paddle_ema  # noqa: E402

PIR = paddle.framework.in_pir_mode()
MODE = f"{'.'.join(paddle.__version__.split('.')[:2])}-{'pir' if PIR else 'legacy'}"
STEPS, SAVE_AT, LOCAL_BATCH, IN, HIDDEN, OUT = 6, 3, 4, 5, 8, 3
COLLECTIVE = re.compile(
    r"(^|\.)(c_\w+|all_?reduce|all_?gather|broadcast|reduce|reduce_scatter|barrier|send\w*|recv\w*)_?$"
)
# Every parameter of network(), so that each is drawn alike in every run, whichever a rank holds.
SHAPES = {"fc1.b": (HIDDEN,), "fc1.w": (IN, HIDDEN), "fc2.b": (OUT,), "fc2.w": (HIDDEN, OUT)}


def _example():
    """examples/distributed.py, whose CPU data-parallel helpers this worker uses (so the tests prove
    the example's code)."""
    path = Path(__file__).resolve().parents[2] / "examples" / "distributed.py"
    spec = importlib.util.spec_from_file_location("distributed_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE = _example()
init_comm = EXAMPLE.gloo_ring  # the gloo communicator for ring 0, which the all-reduce ops look up
all_reduce_mean = EXAMPLE.all_reduce_mean


def network():
    """x -> fc(8, relu) -> fc(3) -> squared error, with fixed parameter names; and the step counter."""
    x = paddle.static.data("x", [-1, IN], "float32")
    y = paddle.static.data("y", [-1, OUT], "float32")
    h = paddle.static.nn.fc(x, HIDDEN, activation="relu", weight_attr=paddle.ParamAttr(name="fc1.w"),
                            bias_attr=paddle.ParamAttr(name="fc1.b"))
    out = paddle.static.nn.fc(h, OUT, weight_attr=paddle.ParamAttr(name="fc2.w"),
                              bias_attr=paddle.ParamAttr(name="fc2.b"))
    return paddle.mean((out - y) * (out - y)), paddle_ema.global_step_counter()


def attach_emas(step) -> dict:
    """Two EMAs after the optimizer: a constant decay, and one warmed up by the step counter."""
    emas = {
        "ema": paddle_ema.ExponentialMovingAverage(0.9, name="ema"),
        "ema_thres": paddle_ema.ExponentialMovingAverage(0.9, thres_steps=step, name="ema_thres"),
    }
    for ema in emas.values():
        ema.update()
    return emas


def build(nranks: int, with_ema: bool):
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.utils.unique_name.guard(), paddle.static.program_guard(main, startup):
        loss, step = network()
        opt = paddle.optimizer.Momentum(learning_rate=0.1, momentum=0.9)
        if nranks > 1:
            params_grads = paddle.static.append_backward(loss)
            # (PIR lists the step counter with a None gradient)
            opt.apply_gradients([(p, all_reduce_mean(g, nranks)) for p, g in params_grads if g is not None])
        else:
            opt.minimize(loss)
        emas = attach_emas(step) if with_ema else {}
    return main, startup, loss, step, emas


def op_types(program) -> list[str]:
    ops = program.global_block().ops
    return [op.name() for op in ops] if PIR else [op.type for op in ops]


def read(name: str) -> np.ndarray:
    return np.array(paddle.static.global_scope().find_var(name).get_tensor())


def main(build=build, fixup=lambda program: None) -> int:
    """``build(nranks, with_ema)`` makes the programs; ``fixup(program)`` edits each before it runs."""
    out_dir = sys.argv[1]
    single = "--single" in sys.argv
    resume = sys.argv[sys.argv.index("--resume") + 1] if "--resume" in sys.argv else None
    rank = 0 if single else int(os.environ["PADDLE_TRAINER_ID"])
    nranks = 1 if single else int(os.environ["PADDLE_TRAINERS_NUM"])
    if nranks > 1:
        init_comm(rank, nranks)

    main_prog, startup, loss, step, emas = build(nranks, with_ema=True)
    plain_prog = build(nranks, with_ema=False)[0]
    for program in (main_prog, startup, plain_prog):
        fixup(program)

    # The EMA adds no collective op (and the data-parallel program does have some).
    with_ema = [t for t in op_types(main_prog) if COLLECTIVE.search(t)]
    without = [t for t in op_types(plain_prog) if COLLECTIVE.search(t)]
    added = sorted(set(op_types(main_prog)) - set(op_types(plain_prog)))
    report = {"mode": MODE, "rank": rank, "nranks": nranks, "collectives_with_ema": with_ema,
              "collectives_without_ema": without, "op_types_added_by_ema": added}
    assert sorted(with_ema) == sorted(without), report
    assert nranks == 1 or len(without) >= 1, report

    exe = paddle.static.Executor(paddle.CPUPlace())
    exe.run(startup)
    init = np.random.default_rng(7)
    params = sorted(emas["ema"].parameter_names)  # (a sharded rank holds some of them)
    for name, shape in sorted(SHAPES.items()):
        value = init.standard_normal(shape).astype("float32") * 0.5
        if name in params:
            paddle.static.global_scope().find_var(name).get_tensor().set(value, paddle.CPUPlace())

    data = np.random.default_rng(11)
    xs = data.standard_normal((STEPS, nranks_total(single, nranks) * LOCAL_BATCH, IN)).astype("float32")
    ys = data.standard_normal((STEPS, xs.shape[1], OUT)).astype("float32")
    lo, hi = (0, xs.shape[1]) if single else (rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    result = {}
    if resume:
        paddle_ema.load(main_prog, resume)
        result.update({f"loaded/{k}": v for k, v in snapshot(main_prog, emas).items()})
    for t in range(SAVE_AT if resume else 0, STEPS):
        exe.run(main_prog, feed={"x": xs[t, lo:hi], "y": ys[t, lo:hi]}, fetch_list=[loss])
        if t + 1 == SAVE_AT and rank == 0 and not single and not resume:
            paddle.static.save(main_prog, os.path.join(out_dir, "ckpt", "model"))
            result.update({f"saved/{k}": v for k, v in snapshot(main_prog, emas).items()})

    result.update({f"param/{n}": read(n) for n in params})
    result["global_step"] = read_counter(main_prog)
    for key, ema in emas.items():
        plan = ema._plan
        for name in [plan.step, plan.debias] + [g.average for g in plan.groups]:
            result[f"state/{name}"] = read(name)
        with ema.apply(exe):
            for n in params:
                result[f"applied/{key}/{n}"] = read(n)
        for n in params:  # restored
            np.testing.assert_array_equal(read(n), result[f"param/{n}"])
    os.makedirs(out_dir, exist_ok=True)
    stem = ("single" if single else f"rank{rank}") + ("_resumed" if resume else "")
    np.savez(os.path.join(out_dir, f"{stem}.npz"), **result)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(report, f, indent=1)
    print("OK", json.dumps(report))
    return 0


def snapshot(program, emas) -> dict:
    """Every persistable variable of the program that a checkpoint holds: parameters, optimizer
    state, the step counter and the EMAs' state."""
    names = sorted(paddle_ema._ir.persistable_names(program) - {"feed", "fetch"})
    state = {name for ema in emas.values() for name in paddle_ema._graph.state_names(ema._plan)}
    assert state <= set(names), sorted(state - set(names))
    return {name: read(name) for name in names}


def nranks_total(single: bool, nranks: int) -> int:
    # The reference process sees the batches of both ranks.
    return 2 if single else nranks


def read_counter(program) -> np.ndarray:
    names = [n for n in paddle_ema._ir.persistable_names(program) if n.startswith("global_step")]
    assert len(names) == 1, names
    return read(names[0])


if __name__ == "__main__":
    sys.exit(main())
