"""One rank of an auto-parallel run (2 CPU processes over gloo) whose optimizer is sharded by
``paddle.distributed.shard_optimizer(AdamW, ShardingStage{1,2,3}("x", mesh))``, with a
paddle_ema.ModelEMA built over the dense model before the optimizer is wrapped.

    python -m paddle.distributed.launch --nproc_per_node=2 --log_dir LOG autoshard_worker.py OUT --stage N

The MLP's input batch is sharded ``Shard(0)`` over mesh [0, 1] ("x"). ``shard_optimizer`` turns the
parameters into DistTensors in place: ``Replicate()`` at the first step (stages 1/2), ``Shard(0)``
when it wraps the optimizer (stage 3); the EMA follows. A dense copy of the model, trained in this
process on the whole batches, is what the sharded run must train. Writes OUT/autoshard_s<N>_<rank>.npz:
the whole weights after every step (``step<k>/``, and the dense copy's ``ref<k>/``), ``averages()``
made whole (``average/``), the weights inside ``with ema.apply()`` (``applied/``) and the eval
output (``eval_out``, of ``eval_x``), and a JSON ``report`` (placements, local shapes, collectives in
the updates, the restore and state checks).

Test-only shim (``_reshard_via_replicate``): Paddle's CPU build has no reduce-scatter kernel, which
the Partial -> Shard reshard of the gradients needs ("NotImplementedError: (Unimplemented)
Unimplemented cpu kernel for CReduceScatterOp."); it is done as Partial -> Replicate (all-reduce)
then Replicate -> Shard (a slice).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import paddle
import paddle.distributed as dist
from auto_parallel_worker import MLP, local, whole
from dygraph_sharding_worker import counting_collectives
from paddle.distributed.auto_parallel import api as dist_api

import paddle_ema

STEPS, SEED, DECAY, LR, BATCH = 6, 3, 0.9, 0.05, 8
_reshard = dist_api.reshard


def _reshard_via_replicate(tensor, mesh, placements):
    """Partial -> Shard as Partial -> Replicate (all-reduce) then Replicate -> Shard (slice)."""
    if (tensor.is_dist() and any(p.is_partial() for p in tensor.placements)
            and any(p.is_shard() for p in placements)):
        tensor = _reshard(tensor, tensor.process_mesh,
                          [dist.Replicate() if p.is_partial() else p for p in tensor.placements])
    return _reshard(tensor, mesh, placements)


def layout(tensors: dict) -> dict:
    return {n: [str(t.placements) if t.is_dist() else None, list(local(t).shape)] for n, t in tensors.items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--stage", type=int, choices=[1, 2, 3], required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    paddle.set_device("cpu")
    dist_api.reshard = dist.reshard = _reshard_via_replicate  # (stages 2/3's gradient hooks; stage 1)
    rank = dist.get_rank()
    mesh = dist.ProcessMesh([0, 1], dim_names=["x"])
    paddle.seed(SEED)
    model, reference = MLP(), MLP()
    reference.set_state_dict(model.state_dict())
    ref_opt = paddle.optimizer.AdamW(LR, parameters=reference.parameters())
    ema = paddle_ema.ModelEMA(model, DECAY)  # over the dense model, as a user builds it
    stage = {1: dist.ShardingStage1, 2: dist.ShardingStage2, 3: dist.ShardingStage3}[args.stage]
    opt = dist.shard_optimizer(paddle.optimizer.AdamW(LR, parameters=model.parameters()), stage("x", mesh))
    rng = np.random.default_rng(0)
    report: dict = {"paddle": paddle.__version__, "stage": args.stage}
    result: dict = {}
    counts: dict = {}

    def sharded(value):
        return dist.shard_tensor(paddle.to_tensor(value), mesh, [dist.Shard(0)])

    for step in range(STEPS):
        x = rng.standard_normal((BATCH, 6)).astype("float32")
        y = rng.standard_normal((BATCH, 4)).astype("float32")
        (model(sharded(x)) - sharded(y)).square().mean().backward()
        opt.step()
        opt.clear_grad()
        (reference(paddle.to_tensor(x)) - paddle.to_tensor(y)).square().mean().backward()
        ref_opt.step()
        ref_opt.clear_grad()
        with counting_collectives(counts):
            ema.update()
        result.update({f"step{step}/{n}": whole(p) for n, p in model.named_parameters()})
        result.update({f"ref{step}/{n}": p.numpy() for n, p in reference.named_parameters()})
    report["collectives_in_updates"] = counts
    report["parameters"] = layout(dict(model.named_parameters()))
    report["kept"] = layout(ema._averages)
    averages = ema.averages()
    report["averages"] = layout(averages)
    result.update({f"average/{n}": whole(a) for n, a in averages.items()})
    eval_x = np.random.default_rng(7).standard_normal((BATCH, 6)).astype("float32")
    result["eval_x"] = eval_x
    trained = {n: local(p).copy() for n, p in model.named_parameters()}
    placements = layout(dict(model.named_parameters()))
    with ema.apply():
        result.update({f"applied/{n}": whole(p) for n, p in model.named_parameters()})
        report["applied"] = layout(dict(model.named_parameters()))
        with paddle.no_grad():  # (stage 3's forward takes a batch-sharded input only)
            result["eval_out"] = whole(model(sharded(eval_x)))
    report["restored_bit_exact"] = all(np.array_equal(local(p), trained[n])
                                       for n, p in model.named_parameters())
    report["restored_placements"] = layout(dict(model.named_parameters())) == placements
    kept = {n: local(a).copy() for n, a in ema._averages.items()}
    state = ema.state_dict()
    fresh = paddle_ema.ModelEMA(model, DECAY)
    fresh.set_state_dict(state)
    report["state_round_trip"] = fresh.num_updates == STEPS and all(
        np.array_equal(local(a), kept[n]) for n, a in fresh._averages.items())
    consolidated = ema.consolidated_state_dict()
    report["consolidated_dense"] = not any(a.is_dist() for a in consolidated["averages"].values())
    result.update({f"consolidated/{n}": a.numpy() for n, a in consolidated["averages"].items()})
    result["report"] = np.array(json.dumps(report))
    np.savez(os.path.join(args.out, f"autoshard_s{args.stage}_{rank}.npz"), **result)
    print("OK", json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
