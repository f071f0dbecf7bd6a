"""One rank of a dygraph run (2 CPU processes over gloo) under Paddle's stage 3 sharding,
``group_sharded_parallel(level="p_g_os")``, with a paddle_ema.ModelEMA over the wrapped model.

    python -m paddle.distributed.launch --nproc_per_node=2 --log_dir LOG stage3_worker.py OUT
    python stage3_worker.py OUT --single  # one process, the same global batches, an unsharded EMA
    ... [--resume STATE]  # first load a whole state (each rank cuts its slices), record averages()

The model (``dygraph_sharding_worker.Net``) is wrapped with ``segment_size=16``: its three weights
(40, 64 and 24 values) are cut into slices, one per rank; its biases (8, 8, 3 values) and its buffer
stay whole on every rank. Each rank trains on its half of every global batch and updates its EMA
after every step, counting the collectives the updates call. Then, on every rank: ``averages()``,
an eval forward inside ``with ema.apply()`` and after it, an eval forward that raises half-way
inside ``with ema.apply()`` (a forward pre-hook on the last layer), one more training step, and the
state round trips. Writes OUT/stage3_<rank|single>.npz: ``slice/`` (this rank's trained slices,
as Paddle holds them), ``weight/`` (the whole trained weights, gathered here with Paddle's
collectives, not the library's), ``kept/`` (the EMA's own averages), ``average/`` (and a
PowerEMA's, ``power/``, and a PostHocEMA's ``synthesized/`` at sigma_rel 0.08), ``out/`` (eval
outputs), ``restored/`` (slices after each restore), ``step<i>/`` (one process: the weights at each
update), ``final/`` (weights after the last step), ``whole/`` (the consolidated state's averages),
``resumed/``, and a JSON ``report``; rank 0 saves the whole state as
OUT/whole_stage3_<2|single>.pdparams.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import numpy as np
import paddle
import paddle.distributed as dist
from dygraph_sharding_worker import LOCAL_BATCH, SEED, STEPS, Net, _Patched, counting_collectives

import paddle_ema

SEGMENT = 16  # parameters of more values are cut into slices
# Bytes each slice is aligned to (Paddle's table: 256 on GPUs, 4096 on the CPU, where a 40-value
# weight would be one rank's values and the other's padding): 256 cuts each weight across both ranks.
ALIGN = 256


@contextlib.contextmanager
def _stage3_on_cpu():
    """Test-only shim: lets group_sharded_parallel(level="p_g_os") run on a CPU-only build, only
    inside this ``with`` (wrapping; nothing is patched while training). Each patch is local to one
    Paddle module's namespace, and each is needed (without it, on 3.3.1 / 2.6.2):

    * group_sharded.py asserts the device from paddle.get_device() ("cpu"): "AssertionError:
      group_sharded_parallel only support gpu, xpu and custom_device now" (2.6: "... only support
      gpu and xpu now"). That module sees "gpu:0" ...
    * ... and passes device="gpu" on, but the stage-3 layer must get device="cpu": "ValueError: The
      device should not be 'gpu:0', since PaddlePaddle is not compiled with CUDA".
    * GroupShardedStage3.__init__ asserts a CUDA build: "AssertionError: Only support CUDA / XPU /
      CustomDevice." (2.6: "Only support CUDA / CustomDevice."); that module sees one.
    * Not a fix: the CPU entry of the stage-3 alignment table is set to the GPU's (see ``ALIGN``).
    """
    from paddle.distributed.fleet.meta_parallel.sharding import group_sharded_stage3 as stage3
    from paddle.distributed.sharding import group_sharded as gs

    stage3_cls = gs.GroupShardedStage3
    saved = [(gs, "paddle", gs.paddle), (gs, "GroupShardedStage3", stage3_cls), (stage3, "core", stage3.core)]
    alignment = dict(stage3.alignment)
    gs.paddle = _Patched(paddle, get_device=lambda: "gpu:0")
    gs.GroupShardedStage3 = lambda *args, **kwargs: stage3_cls(*args, **{**kwargs, "device": "cpu"})
    stage3.core = _Patched(stage3.core, is_compiled_with_cuda=lambda: True)
    stage3.alignment["cpu"] = ALIGN
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        stage3.alignment.clear()
        stage3.alignment.update(alignment)


def whole_weights(wrapper, layer) -> dict[str, np.ndarray]:
    """Every parameter's whole value: the sliced ones all-gathered from the ranks' ``fw_storage``
    and cut to size (Paddle's layout, independent of the library's gather)."""
    out = {}
    for name, param in layer.named_parameters():
        piece = getattr(param, "fw_storage", None)
        if piece is None:
            out[name] = param.numpy()
            continue
        parts: list = []
        dist.all_gather(parts, piece, group=wrapper._group)
        flat = np.concatenate([p.numpy() for p in parts])
        out[name] = flat[:int(np.prod(param.shape))].reshape(param.shape)
    return out


class HalfWayError(Exception):
    """Raised by the last layer's forward pre-hook, after stage 3 gathered its weight."""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--single", action="store_true")
    parser.add_argument("--resume", help="a whole EMA state (paddle.save) to load before training")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    paddle.set_device("cpu")
    if not args.single:
        dist.init_parallel_env()
    rank = 0 if args.single else dist.get_rank()
    paddle.seed(SEED)
    layer = Net()
    opt = paddle.optimizer.AdamW(0.05, parameters=layer.parameters(), weight_decay=0.01)
    report: dict = {"paddle": paddle.__version__}
    if args.single:
        model = layer
    else:
        with _stage3_on_cpu():
            model, opt, _ = dist.sharding.group_sharded_parallel(layer, opt, level="p_g_os",
                                                                 segment_size=SEGMENT)
        report["sliced"] = sorted(n for n, p in layer.named_parameters()
                                  if getattr(p, "fw_storage", None) is not None)
        try:
            paddle_ema.ModelEMA(model, 0.9, sharding=opt)
        except ValueError as error:
            report["sharding_refused"] = str(error)
    ema = paddle_ema.ModelEMA(model, 0.9, warmup="threshold")
    power = paddle_ema.PowerEMA(model, 0.1)
    posthoc = paddle_ema.PostHocEMA(model, snapshot_every=2, snapshot_dir=os.path.join(
        args.out, f"phema_{'single' if args.single else 2}"))
    resumed = {}
    if args.resume:  # (a whole state: each rank cuts its slices; then go on afresh)
        ema.set_state_dict(paddle.load(args.resume))
        resumed = {f"resumed/{n}": a.numpy() for n, a in ema.averages().items()}
        ema.reset()
    rng = np.random.default_rng(11)
    mine = slice(0, 2 * LOCAL_BATCH) if args.single else slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    counts: dict = {}

    def train_step() -> None:
        x = rng.standard_normal((2 * LOCAL_BATCH, 5)).astype("float32")
        y = rng.standard_normal((2 * LOCAL_BATCH, 3)).astype("float32")
        loss = (model(paddle.to_tensor(x[mine])) - paddle.to_tensor(y[mine])).square().mean()
        loss.backward()
        opt.step()
        opt.clear_grad()

    steps = {}
    for step in range(STEPS):
        train_step()
        with counting_collectives(counts):
            ema.update()
            power.update()
        posthoc.update()  # (a snapshot every other step gathers the slices: collective)
        if args.single:  # (the weights each update averaged, for a float64 numpy EMA)
            steps.update({f"step{step}/{n}": p.numpy() for n, p in layer.named_parameters()})
    report["collectives_in_updates"] = counts
    report["kept_numel"] = sum(int(np.prod(a.shape)) for a in ema._averages.values())

    def slices() -> dict[str, np.ndarray]:
        return {} if args.single else {n: p.fw_storage.numpy() for n, p in layer.named_parameters()
                                       if getattr(p, "fw_storage", None) is not None}

    def weights() -> dict[str, np.ndarray]:
        return ({n: p.numpy() for n, p in layer.named_parameters()} if args.single
                else whole_weights(model, layer))

    result = {f"slice/{n}": v for n, v in slices().items()}
    result.update({f"weight/{n}": v for n, v in weights().items()})
    result.update({f"kept/{n}": a.numpy() for n, a in ema._averages.items()})
    result.update({f"average/{n}": a.numpy() for n, a in ema.averages().items()})
    result.update({f"power/{n}": a.numpy() for n, a in power.averages().items()})
    result.update({f"synthesized/{n}": a.numpy() for n, a in posthoc.synthesize(0.08).items()})
    x_eval = paddle.to_tensor(np.random.default_rng(5).standard_normal((3, 5)).astype("float32"))
    model.eval()
    with paddle.no_grad():
        result["out/trained"] = model(x_eval).numpy()
        with ema.apply():
            result["out/applied"] = model(x_eval).numpy()
        result.update({f"restored/{n}": v for n, v in slices().items()})
        with posthoc.apply(sigma_rel=0.08):
            result["out/posthoc"] = model(x_eval).numpy()
        result.update({f"restored_posthoc/{n}": v for n, v in slices().items()})
        result["out/restored"] = model(x_eval).numpy()
        hook = layer.body[-1].register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(HalfWayError()))
        try:
            with ema.apply():
                model(x_eval)
        except HalfWayError:
            report["half_way"] = True
        hook.remove()
        result.update({f"restored_half_way/{n}": v for n, v in slices().items()})
        result["out/after_half_way"] = model(x_eval).numpy()
    model.train()
    train_step()
    result.update({f"final/{n}": v for n, v in weights().items()})
    if not args.single:
        try:
            ema.averaged_model()
        except RuntimeError as error:
            report["averaged_model_refused"] = str(error)
        # The shard into a new EMA on the same rank (bit for bit); the whole state.
        shard = ema.state_dict()
        twin = paddle_ema.ModelEMA(model, 0.9, warmup="threshold")
        twin.set_state_dict(shard)
        report["shard_label"] = shard["sharding"]
        report["shard_round_trip"] = all(np.array_equal(twin._averages[n].numpy(), a.numpy())
                                         for n, a in ema._averages.items())
    whole = ema.consolidated_state_dict()
    if rank == 0:
        paddle.save(whole, os.path.join(args.out, f"whole_stage3_{'single' if args.single else 2}.pdparams"))
    result.update({f"whole/{n}": np.asarray(a.numpy()) for n, a in whole["averages"].items()})
    result.update(resumed)
    result.update(steps)
    result["report"] = np.array(json.dumps(report))
    np.savez(os.path.join(args.out, f"stage3_{'single' if args.single else rank}.npz"), **result)
    print("OK", json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
