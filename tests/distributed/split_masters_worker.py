"""One rank of 2: fleet's DygraphShardingOptimizerV2 (split_param) over a bfloat16 Linear, with a
ModelEMA(sharding=, master_weights=) that averages the optimizer's float32 master weights of its pieces.

    python -m paddle.distributed.launch --nproc_per_node=2 --log_dir LOG split_masters_worker.py OUT

Paddle's CPU build has no bfloat16 optimizer kernel, so the worker plays the optimizer's part, as
tests/test_master_weights.py does: it makes the master weight of each of the rank's pieces (the
optimizer's slice parameter, padded) with the optimizer's own ``_create_master_weight``, moves it as
a step would, and writes it cast to bfloat16 into the optimizer's buffer (what the step leaves
there). Nothing is gathered. Writes OUT/split_masters_<rank>.npz: each step's master weights
(``master/<step>/<name>``), the EMA's averages as kept (``kept/``), those of an EMA without master
weights (``rounded/``), and which averages follow a master weight (``sources``).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import paddle
from dygraph_sharding_worker import _fusion_on_cpu
from paddle.distributed import fleet
from paddle.distributed.fleet.meta_optimizers.dygraph_optimizer import dygraph_sharding_optimizer

import paddle_ema

STEPS, DECAY = 30, 0.9


def main() -> int:
    out = sys.argv[1]
    paddle.set_device("cpu")
    _fusion_on_cpu()  # (16-byte alignment: the weight's 30 values are padded to 32, the bias's 5 to 16)
    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 1, "pp_degree": 1, "sharding_degree": 2}
    strategy.hybrid_configs["sharding_configs"].split_param = True
    fleet.init(is_collective=True, strategy=strategy)
    paddle.seed(4)
    model = paddle.nn.Linear(6, 5)
    model.to(dtype="bfloat16")
    opt = paddle.optimizer.AdamW(0.1, parameters=model.parameters(), multi_precision=True)
    sharded = dygraph_sharding_optimizer.DygraphShardingOptimizerV2(opt, fleet.get_hybrid_communicate_group())
    (buffer,) = sharded._comm_buffer_list
    pieces = {}
    for name, param in model.named_parameters():  # (what the first step does, where the rank has a piece)
        view = buffer._sharding_param_grad_view[param.name]
        if view._param_begin < view._param_end:
            pieces[name] = sharded._slice_params[param.name]
            view.fill_slice_param(pieces[name])
            opt._create_master_weight(pieces[name])
    ema = paddle_ema.ModelEMA(model, DECAY, sharding=sharded, master_weights=sharded)
    rounded = paddle_ema.ModelEMA(model, DECAY, sharding=sharded)
    rng = np.random.default_rng(5)
    result = {}
    with paddle.no_grad():
        for step in range(STEPS):
            for name, param in model.named_parameters():
                if name not in pieces:
                    continue
                master = opt._master_weights[param.name]
                value = master.numpy()
                master.set_value((value + 1e-4 * (np.abs(value) + 0.1)
                                  * rng.standard_normal(value.shape)).astype("float32"))
                pieces[name].copy_(master.astype("bfloat16"), False)  # (into the buffer)
                assert param._is_shared_buffer_with(buffer.param_storage)
                result[f"master/{step}/{name}"] = master.numpy()
            ema.update()
            rounded.update()
    result.update({f"kept/{n}": a.numpy() for n, a in ema._averages.items()})
    result.update({f"rounded/{n}": a.numpy() for n, a in rounded._averages.items()})
    result["sources"] = np.array(sorted(ema._sources))
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, f"split_masters_{paddle.distributed.get_rank()}.npz"), **result)
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
