"""One rank of a dygraph paddle.DataParallel run (2 CPU processes over gloo) with paddle_ema.ModelEMA.

    python -m paddle.distributed.launch --nproc_per_node=2 --log_dir LOG dygraph_worker.py OUT
    python dygraph_worker.py OUT --single  # one process over the combined batches

Each rank trains on its half of every global batch; DataParallel all-reduces the gradients. The
model's forward is compiled with paddle.jit.to_static when --to-static is given. Writes
OUT/dygraph_<rank|single>.npz: the weights, the averages and the applied weights.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import paddle
import paddle.distributed as dist

import paddle_ema

STEPS, LOCAL_BATCH = 6, 4


def main() -> int:
    out_dir, single = sys.argv[1], "--single" in sys.argv
    if not single:
        dist.init_parallel_env()
    rank, nranks = (0, 1) if single else (dist.get_rank(), dist.get_world_size())
    paddle.seed(3)  # the same initial weights on every rank and in the single process
    model = paddle.nn.Sequential(paddle.nn.Linear(5, 8), paddle.nn.ReLU(), paddle.nn.Linear(8, 3))
    if "--to-static" in sys.argv:
        model = paddle.jit.to_static(model, full_graph=True)  # AST mode: SOT needs PIR on 3.x
    trained = model if single else paddle.DataParallel(model)
    opt = paddle.optimizer.Momentum(0.1, momentum=0.9, parameters=trained.parameters())
    ema = paddle_ema.ModelEMA(trained, 0.9, warmup="threshold")
    rng = np.random.default_rng(11)
    mine = slice(0, 2 * LOCAL_BATCH) if single else slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    for _ in range(STEPS):
        x = rng.standard_normal((2 * LOCAL_BATCH, 5)).astype("float32")
        y = rng.standard_normal((2 * LOCAL_BATCH, 3)).astype("float32")
        loss = (trained(paddle.to_tensor(x[mine])) - paddle.to_tensor(y[mine])).square().mean()
        loss.backward()
        opt.step()
        opt.clear_grad()
        ema.update()
    result = {f"weight/{n}": t.numpy() for n, t in ema._tensors.items()}
    result.update({f"average/{n}": a.numpy() for n, a in ema.averages().items()})
    with ema.apply():
        result.update({f"applied/{n}": t.numpy() for n, t in ema._tensors.items()})
    for name, tensor in ema._tensors.items():
        np.testing.assert_array_equal(tensor.numpy(), result[f"weight/{name}"])  # restored
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, f"dygraph_{'single' if single else rank}.npz"), **result)
    print("OK", rank, nranks, sorted(ema.names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
