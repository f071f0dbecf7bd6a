"""One rank of an auto-parallel dygraph run (2 CPU processes over gloo): tensor parallel with
``paddle.distributed.shard_tensor`` placements, a paddle_ema.ModelEMA over the sharded model.

    python -m paddle.distributed.launch --nproc_per_node=2 --log_dir LOG \
        auto_parallel_worker.py OUT --shard before|after

``--shard before`` shards the parameters before the EMA is built, ``after`` after it (the EMA
follows the re-bound DistTensors). fc1's weight is column-parallel (``Shard(1)``) and its bias
``Shard(0)``; fc2's weight row-parallel (``Shard(0)``), its bias dense. Each rank trains with SGD
on the same batches and updates its EMA after every step. Writes OUT/auto_<shard>_<rank>.npz: the
whole weights after every step (``step<k>/``), ``averages()`` (``average/``), the weights inside
``with ema.apply()`` (``applied/``) and after it (``restored/``), this rank's local pieces of the
weights and averages (``local_weight/``, ``local_average/``), and a JSON ``report`` (placements,
local shapes, the state round trips), and ``consolidated_state_dict()``'s whole averages
(``consolidated/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import paddle
import paddle.distributed as dist

import paddle_ema

STEPS, SEED, DECAY = 4, 3, 0.9


def whole(tensor) -> np.ndarray:
    """The whole value of ``tensor`` (collective for a DistTensor: every rank calls it)."""
    if not tensor.is_dist():
        return tensor.numpy()
    return dist.reshard(tensor, tensor.process_mesh, [dist.Replicate()])._local_value().numpy()


def local(tensor) -> np.ndarray:
    return (tensor._local_value() if tensor.is_dist() else tensor).numpy()


class MLP(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.fc1 = paddle.nn.Linear(6, 8)
        self.fc2 = paddle.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(paddle.nn.functional.relu(self.fc1(x)))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--shard", choices=["before", "after"], required=True)
    args = parser.parse_args()
    paddle.set_device("cpu")
    mesh = dist.ProcessMesh([0, 1], dim_names=["x"])
    paddle.seed(SEED)
    model = MLP()

    def shard() -> None:
        model.fc1.weight = dist.shard_tensor(model.fc1.weight, mesh, [dist.Shard(1)])
        model.fc1.bias = dist.shard_tensor(model.fc1.bias, mesh, [dist.Shard(0)])
        model.fc2.weight = dist.shard_tensor(model.fc2.weight, mesh, [dist.Shard(0)])

    if args.shard == "before":
        shard()
    ema = paddle_ema.ModelEMA(model, DECAY)
    if args.shard == "after":
        shard()
    opt = paddle.optimizer.SGD(0.1, parameters=model.parameters())
    rng = np.random.default_rng(0)
    result = {}
    for step in range(STEPS):
        x = paddle.to_tensor(rng.standard_normal((4, 6)).astype("float32"))
        loss = model(dist.shard_tensor(x, mesh, [dist.Replicate()])).square().mean()
        loss.backward()
        opt.step()
        opt.clear_grad()
        ema.update()
        result.update({f"step{step}/{n}": whole(p) for n, p in model.named_parameters()})
    named = dict(model.named_parameters())
    report = {
        "paddle": paddle.__version__,
        "placements": {n: str(p.placements) if p.is_dist() else None for n, p in named.items()},
        "average_placements": {n: str(a.placements) if a.is_dist() else None
                               for n, a in ema._averages.items()},
        "local_shapes": {n: list(local(p).shape) for n, p in named.items()},
        "average_local_shapes": {n: list(local(a).shape) for n, a in ema._averages.items()},
    }
    result.update({f"local_weight/{n}": local(p) for n, p in named.items()})
    result.update({f"local_average/{n}": local(a) for n, a in ema._averages.items()})
    result.update({f"average/{n}": whole(a) for n, a in ema.averages().items()})
    with ema.apply():
        report["applied_placements"] = {n: str(p.placements) if p.is_dist() else None
                                        for n, p in named.items()}
        result.update({f"applied/{n}": whole(p) for n, p in named.items()})
    result.update({f"restored/{n}": local(p) for n, p in named.items()})
    state = ema.state_dict()
    kept = {n: local(a).copy() for n, a in ema._averages.items()}
    ema.reset()
    ema.set_state_dict(state)
    report["state_round_trip"] = all(np.array_equal(local(a), kept[n]) for n, a in ema._averages.items())

    def resumed(saved) -> bool:  # a new EMA of the model resumes ``saved``: its pieces and placements
        fresh = paddle_ema.ModelEMA(model, DECAY)
        fresh.set_state_dict(saved)
        return fresh.num_updates == STEPS and all(
            np.array_equal(local(a), kept[n]) and str(getattr(a, "placements", None))
            == str(getattr(ema._averages[n], "placements", None)) for n, a in fresh._averages.items())

    path = os.path.join(args.out, f"state_{args.shard}_{dist.get_rank()}.pdparams")
    paddle.save(state, path)
    report["saved_round_trip"] = resumed(paddle.load(path))
    consolidated = ema.consolidated_state_dict()  # (collective: the averages made whole)
    report["consolidated_dense"] = not any(a.is_dist() for a in consolidated["averages"].values())
    result.update({f"consolidated/{n}": a.numpy() for n, a in consolidated["averages"].items()})
    report["consolidated_round_trip"] = resumed(consolidated)
    report["num_updates"] = ema.num_updates
    result["report"] = np.array(json.dumps(report))
    os.makedirs(args.out, exist_ok=True)
    np.savez(os.path.join(args.out, f"auto_{args.shard}_{dist.get_rank()}.npz"), **result)
    print("OK", json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
