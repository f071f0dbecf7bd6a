"""Data-parallel training with paddle_ema: every rank keeps the same EMA, with no extra communication.

The EMA is added after the data-parallel optimizer as in one process: ``ema.update()`` after
``minimize``. Every rank applies the same all-reduced update to the same parameters, so every rank's
EMA is the same, and rank 0's checkpoint resumes anywhere (``paddle_ema.load``).

GPUs, one process per GPU, with fleet's collective optimizer (fleet's static graph needs the legacy
IR on Paddle 3.x)::

    FLAGS_enable_pir_api=0 python -m paddle.distributed.launch --gpus 0,1 examples/distributed.py

Try it on CPU, 2 processes over gloo, with a hand-built data-parallel step (fleet's collective does
not run on a CPU-only build), in either IR::

    python -m paddle.distributed.launch --nproc_per_node=2 examples/distributed.py

One process over the same global batches, for comparison: ``python examples/distributed.py``.
Each rank prints its losses and a fingerprint of its EMA weights; rank 0 saves ``--out``/model, which
``--resume`` loads (with ``paddle_ema.load``) in any number of processes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

GLOBAL_BATCH, FEATURES = 32, 8


def _folder(text: str) -> str:
    """An argparse type: a folder that exists or can be made (no part of the path is a file)."""
    path = Path(text)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise argparse.ArgumentTypeError(f"{text} cannot be a folder: {part} is a file")
            break
    return text


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--decay", type=float, default=0.95, help="EMA decay (default 0.95)")
    parser.add_argument("--out", type=_folder, default="out_distributed",
                        help="folder for rank 0's checkpoint")
    parser.add_argument("--resume", metavar="PATH",
                        help="a checkpoint to start from, e.g. out_distributed/model")
    args = parser.parse_args()
    if args.steps < 1 or not 0 <= args.decay < 1:
        parser.error(f"--steps must be at least 1 and --decay in [0, 1), got {args.steps} and {args.decay}")
    return args


if __name__ == "__main__":
    ARGS = parse_args()  # --help and bad arguments end here, before Paddle is imported

import numpy as np  # noqa: E402
import paddle  # noqa: E402

import paddle_ema  # noqa: E402

paddle.enable_static()
PIR = paddle.framework.in_pir_mode()


def gloo_ring(rank: int, nranks: int) -> None:
    """CPU only: the gloo communicator of ring 0, which the all-reduce ops use. (On a GPU fleet sets
    up NCCL itself; on a CPU-only build neither fleet nor init_parallel_env does it for static graphs.)"""
    if paddle.__version__.startswith("2."):
        paddle.distributed.init_parallel_env()
    else:
        from paddle.base import core

        store = core.create_or_get_global_tcp_store()
        core.CommContextManager.create_gloo_comm_context(store, "0", rank, nranks)


def all_reduce_mean(grad, nranks: int):
    """Sum ``grad`` over the ranks in place, then divide by their number."""
    if PIR:
        paddle.distributed.all_reduce(grad)
    elif paddle.__version__.startswith("2."):
        grad.block.append_op(type="c_allreduce_sum", inputs={"X": [grad]}, outputs={"Out": [grad]},
                             attrs={"ring_id": 0, "use_calc_stream": True})
    else:  # in legacy static graphs paddle.distributed.all_reduce fails ("expected str instance,
        # ReduceOp found"); this is the op fleet emits (c_allreduce_sum is gone from 3.1 on)
        grad.block.append_op(type="all_reduce", inputs={"x": [grad]}, outputs={"out": [grad]},
                             attrs={"ring_id": 0, "reduce_type": int(paddle.distributed.ReduceOp.SUM)})
    return paddle.scale(grad, 1.0 / nranks)


def data_parallel_minimize(optimizer, loss, nranks: int, on_gpu: bool) -> None:
    if nranks == 1:
        optimizer.minimize(loss)
    elif on_gpu:
        from paddle.distributed import fleet

        strategy = fleet.DistributedStrategy()
        strategy.without_graph_optimization = True  # one all-reduce per gradient, in the program
        fleet.distributed_optimizer(optimizer, strategy=strategy).minimize(loss)
    else:
        params_grads = paddle.static.append_backward(loss)
        optimizer.apply_gradients([(p, all_reduce_mean(g, nranks)) for p, g in params_grads if g is not None])


def main(args: argparse.Namespace) -> int:
    env = paddle.distributed.ParallelEnv()
    rank, nranks = env.rank, env.world_size
    on_gpu = paddle.is_compiled_with_cuda()
    if nranks > 1 and on_gpu:
        from paddle.distributed import fleet

        if PIR:  # fleet fails in its own startup-program clone under PIR
            sys.exit("fleet's collective optimizer needs the legacy IR: set FLAGS_enable_pir_api=0")

        fleet.init(is_collective=True)
    elif nranks > 1:
        gloo_ring(rank, nranks)

    main_prog, startup = paddle.static.Program(), paddle.static.Program()
    main_prog.random_seed = startup.random_seed = 1  # the same initial parameters on every rank
    with paddle.static.program_guard(main_prog, startup):
        x = paddle.static.data("x", [-1, FEATURES], "float32")
        y = paddle.static.data("y", [-1, 1], "float32")
        hidden = paddle.static.nn.fc(x, 32, activation="relu")
        loss = paddle.mean(paddle.square(paddle.static.nn.fc(hidden, 1) - y))
        test_prog, test_loss = forward_only_clone(main_prog, loss)
        step = paddle_ema.global_step_counter()
        data_parallel_minimize(paddle.optimizer.Momentum(0.05, momentum=0.9), loss, nranks, on_gpu)
        ema = paddle_ema.ExponentialMovingAverage(args.decay, thres_steps=step)
        ema.update()  # after minimize, exactly as in one process

    place = paddle.CUDAPlace(env.dev_id) if on_gpu else paddle.CPUPlace()
    exe = paddle.static.Executor(place)
    exe.run(startup)
    if args.resume:  # parameters, optimizer state, step counter and the EMA, on every rank
        paddle_ema.load(main_prog, args.resume)

    # Every rank draws the same global batches and trains on its own slice of each.
    rng = np.random.default_rng(0)
    truth = rng.standard_normal((FEATURES, 1)).astype("float32")
    batch = GLOBAL_BATCH // nranks
    for t in range(args.steps):
        xs = rng.standard_normal((GLOBAL_BATCH, FEATURES)).astype("float32")
        ys = np.tanh(xs @ truth) + 0.3 * rng.standard_normal((GLOBAL_BATCH, 1)).astype("float32")
        mine = slice(rank * batch, (rank + 1) * batch)
        (value,) = exe.run(main_prog, feed={"x": xs[mine], "y": ys[mine]}, fetch_list=[loss])
        if (t + 1) % 20 == 0:
            print(f"rank {rank}: step {t + 1}, loss on this rank's slice {float(value):.4f}")

    val_x = rng.standard_normal((256, FEATURES)).astype("float32")
    val_y = np.tanh(val_x @ truth).astype("float32")
    feed = {"x": val_x, "y": val_y}
    (raw,) = exe.run(test_prog, feed=feed, fetch_list=[test_loss])
    with ema.apply(exe):  # the averaged weights in place of the trained ones, restored on exit
        (averaged,) = exe.run(test_prog, feed=feed, fetch_list=[test_loss])
    fingerprint = sum(float(np.abs(a.astype("float64")).sum()) for a in ema.averages(exe).values())
    print(f"rank {rank}: validation loss raw {float(raw):.4f}, EMA {float(averaged):.4f}; "
          f"EMA fingerprint {fingerprint:.9f}")
    if rank == 0:
        path = os.path.join(args.out, "model")
        paddle.static.save(main_prog, path)
        print(f"rank 0 saved {path} (resume: --resume {path})")
    return 0


def forward_only_clone(program, loss):
    """The program so far (the forward pass) for evaluation, and its loss to fetch. PIR's clone has
    no ``for_test`` and gives new values, found through an IrMapping."""
    if PIR:
        mapping = paddle.pir.IrMapping()
        clone = program.clone(mapping)
        return clone, mapping.look_up(loss)
    return program.clone(for_test=True), loss


if __name__ == "__main__":
    sys.exit(main(ARGS))
