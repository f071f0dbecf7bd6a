"""One rank of a dygraph run (2 CPU processes over gloo) under Paddle's dygraph optimizer sharding,
with a paddle_ema.ModelEMA given the sharded optimizer (``sharding=``).

    python -m paddle.distributed.launch --nproc_per_node=2 --log_dir LOG \
        dygraph_sharding_worker.py OUT --mode fleet1|fleet1f|fleet2|os|os_g
    python dygraph_sharding_worker.py OUT --mode MODE --single  # one process, one unsharded EMA

Modes:
  fleet1  fleet hybrid parallel, ``sharding_degree=2``: DygraphShardingOptimizer (V1, stage 1). Stock.
  fleet1f the same with ``sharding_configs.tensor_fusion``: each rank's parameters are views of one
          fused buffer. Needs the test-only CPU shim in ``_tensor_fusion_on_cpu``.
  fleet2  fleet1 with ``sharding_configs.split_param``: DygraphShardingOptimizerV2, which cuts the
          parameters' padded flat buffers into one share per rank; under MixPrecisionLayer/
          MixPrecisionOptimizer (float32 weights, main_grad), as PaddleNLP trains. Needs the
          test-only CPU shim in ``_split_param_on_cpu``.
  os      ``paddle.distributed.sharding.group_sharded_parallel(level="os")`` (stage 1; Paddle runs it as
  os_g    stage 2, ``level="os_g"``); both need the test-only CPU shim in ``_group_sharded_on_cpu``.

Each rank trains on its half of every global batch and updates its EMA after every step, counting
the collectives the updates call. With ``--resume STATE`` it first loads a whole state another run
saved (each rank takes its part) and records ``averages()`` then (``resumed/``). Writes
OUT/whole_<mode>_<2|single>.pdparams (rank 0: the consolidated state) and
OUT/sharding_<mode>_<rank|single>.npz: the trained weights
(``weight/``), this rank's own averages as kept (``kept/``), ``averages()`` (``average/``), the weights
inside ``with ema.apply()`` (``applied/``) and after it (``restored/``), the consolidated state's
averages (``whole/``), and a JSON ``report`` (names, owners, counts, checks of the state round trips).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np
import paddle
import paddle.distributed as dist

import paddle_ema

STEPS, LOCAL_BATCH, SEED = 6, 4, 3
PADDLE2 = paddle.__version__.startswith("2.")


class Net(paddle.nn.Layer):
    """Linear(5,8)-ReLU-Linear(8,8)-ReLU-Linear(8,3) and a float32 buffer that scales the output;
    with ``batch_norm``, a BatchNorm1D(8) after the first ReLU (its statistics are parameters that
    do not train, which the sharded optimizer's partition holds too)."""

    def __init__(self, batch_norm: bool = False):
        super().__init__()
        norm = [paddle.nn.BatchNorm1D(8)] if batch_norm else []
        self.body = paddle.nn.Sequential(paddle.nn.Linear(5, 8), paddle.nn.ReLU(), *norm,
                                         paddle.nn.Linear(8, 8), paddle.nn.ReLU(), paddle.nn.Linear(8, 3))
        self.register_buffer("scale", paddle.full([3], 0.5, dtype="float32"))

    def forward(self, x):
        return self.body(x) * self.scale


class _Patched:
    """A stand-in for a module inside one Paddle module's namespace: overrides some attributes."""

    def __init__(self, module, **overrides):
        self._module, self._overrides = module, overrides

    def __getattr__(self, name):
        return self._overrides[name] if name in self._overrides else getattr(self._module, name)


@contextlib.contextmanager
def _group_sharded_on_cpu():
    """Test-only shim: lets group_sharded_parallel (levels os/os_g) run on a CPU-only build, only
    inside this ``with``. Each patch is local to one Paddle module's namespace, and each is needed
    (without it, on 3.3.1 / 2.6.2):

    * group_sharded.py asserts the device from paddle.get_device() ("cpu"): "AssertionError:
      group_sharded_parallel only support gpu, xpu and custom_device now" (2.6: "... only support
      gpu and xpu now"). That module sees "gpu:0" ...
    * ... and passes device="gpu" on, but the stage-2 optimizer and layer must get device="cpu"
      (else device_guard's set_device fails: "ValueError: The device should not be ... 'gpu:0',
      since PaddlePaddle is not compiled with CUDA").
    * GroupShardedOptimizerStage2.__init__ asserts core.is_compiled_with_cuda(): "AssertionError:
      Only GPU and XPU and CustomDevice is supported now"; that module sees a CUDA build ...
    * ... and parses its device id from paddle.get_device(): "IndexError: list index out of range"
      on "cpu"; that module sees "cpu:0".
    * ParamStorage.add_rank_params(convert_gpu=True) copies the parameters out (``param.cpu()``
      shares memory on CPU, then ``param._clear_data()``) and moves the flat buffer to the GPU: 3.3
      "RuntimeError: (PreconditionNotMet) Tensor not initialized yet when DenseTensor::place() is
      called", 2.6 "OSError: Only supported compiled paddle with gpu/rocm and xpu , but current
      verison is compiled with cpu." (cvt_to_device). convert_gpu=False keeps buffer and views on CPU.
    """
    from paddle.distributed.fleet.meta_parallel.sharding import (
        group_sharded_optimizer_stage2 as opt_stage2,
    )
    from paddle.distributed.fleet.meta_parallel.sharding import group_sharded_storage as storage
    from paddle.distributed.sharding import group_sharded as gs

    def on_cpu(cls):
        return lambda *args, **kwargs: cls(*args, **{**kwargs, "device": "cpu"})

    add_rank_params = storage.ParamStorage.add_rank_params
    saved = [(gs, "paddle", gs.paddle), (opt_stage2, "paddle", opt_stage2.paddle),
             (opt_stage2, "core", opt_stage2.core),
             (gs, "GroupShardedOptimizerStage2", gs.GroupShardedOptimizerStage2),
             (gs, "GroupShardedStage2", gs.GroupShardedStage2),
             (storage.ParamStorage, "add_rank_params", add_rank_params)]
    gs.paddle = _Patched(paddle, get_device=lambda: "gpu:0")
    opt_stage2.paddle = _Patched(paddle, get_device=lambda: "cpu:0")
    opt_stage2.core = _Patched(opt_stage2.core, is_compiled_with_cuda=lambda: True)
    gs.GroupShardedOptimizerStage2 = on_cpu(gs.GroupShardedOptimizerStage2)
    gs.GroupShardedStage2 = on_cpu(gs.GroupShardedStage2)
    storage.ParamStorage.add_rank_params = (
        lambda self, params, param2align, convert_gpu=True: add_rank_params(self, params, param2align, False))
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


class _Done:
    """A finished communication task."""

    def wait(self):
        return True


def _fusion_on_cpu():
    """Test-only shim: fleet's tensor_fusion_helper, which lays parameters end to end in flat
    buffers, on a CPU-only build, for the rest of the process. It pads each parameter to the
    device's alignment and asserts the device (3.3.1): "AssertionError: tensor fusion helper now only
    support dict_keys(['gpu', 'npu', 'xpu']), but got device cpu instead" ("... device unknown ..."
    once "cpu" is in the table). A 16-byte alignment (GPUs: 256), so that split_param's shares cut
    this small model's parameters mid-way and one share ends in padding (Paddle 2.6 pads by the
    "gpu" entry on any device)."""
    from paddle.distributed.fleet.utils import tensor_fusion_helper as fusion

    fusion.alignment.update(cpu=16, gpu=16)
    fusion.__current_device_type__ = "cpu"


def _split_param_on_cpu():
    """Test-only shim: lets DygraphShardingOptimizerV2 (split_param) run on a CPU-only build, for the
    rest of the process: :func:`_fusion_on_cpu`, and a reduce-scatter, which gloo does not have
    ("NotImplementedError: (Unimplemented) ProcessGroupGLOO does not support reduce_scatter with
    sync_op flag"): tensor_fusion_helper's all-reduces the gradient buffer and keeps the rank's
    share, which is what a reduce-scatter leaves there.
    """
    from paddle.distributed.fleet.utils import tensor_fusion_helper as fusion

    def reduce_scatter(out, full, op=dist.ReduceOp.SUM, group=None, sync_op=True):
        dist.all_reduce(full, op=op, group=group)
        share = int(full.shape[0]) // group.nranks
        mine = full._slice(share * group.rank, share * (group.rank + 1))
        if not out._is_shared_buffer_with(full):
            out.copy_(mine, False)
        return _Done()

    _fusion_on_cpu()
    fusion.paddle = _Patched(paddle, distributed=_Patched(paddle.distributed, reduce_scatter=reduce_scatter))


def _tensor_fusion_on_cpu():
    """Test-only shim: lets DygraphShardingOptimizer's tensor_fusion run on a CPU-only build, for the
    rest of the process: :func:`_fusion_on_cpu`, and the fused buffers kept on the CPU:
    ParamStorage.add_rank_params(convert_gpu=False), as in :func:`_group_sharded_on_cpu` (else 3.3
    "RuntimeError: (PreconditionNotMet) Tensor not initialized yet when DenseTensor::place() is
    called"), and on Paddle 2.6, which makes them with device="gpu" whatever the device, the
    storages made with device="cpu" (else "ValueError: The device should not be ... 'gpu:0', since
    PaddlePaddle is not compiled with CUDA")."""
    from paddle.distributed.fleet.meta_parallel.sharding import group_sharded_storage as storage

    def on_cpu(cls):
        return lambda size, dtype, device, *args, **kwargs: cls(size, dtype, "cpu", *args, **kwargs)

    add_rank_params = storage.ParamStorage.add_rank_params
    _fusion_on_cpu()
    storage.ParamStorage.add_rank_params = (
        lambda self, params, param2align, convert_gpu=True: add_rank_params(self, params, param2align, False))
    storage.ParamStorage = on_cpu(storage.ParamStorage)
    storage.GradStorage = on_cpu(storage.GradStorage)


def wrap(mode: str, model, opt):
    """(trained layer, optimizer to step, sharding facts): the facts are this rank's ``owned`` param
    objects, the sharding ``group``, ``owner`` (param.name -> owner's global rank) and ``opt_rank``
    (the rank in the group the optimizer believes it is)."""
    if mode in ("fleet1", "fleet1f"):
        from paddle.distributed import fleet

        trained, wrapped = fleet.distributed_model(model), fleet.distributed_optimizer(opt)
        inner = wrapped._inner_opt  # HybridParallelOptimizer -> DygraphShardingOptimizer (V1)
        assert type(inner).__name__ == "DygraphShardingOptimizer", type(inner)
        hcg = fleet.get_hybrid_communicate_group()
        group, opt_rank = hcg.get_sharding_parallel_group(), hcg.get_sharding_parallel_rank()
        assert opt_rank == inner._sharding_rank
        owned = inner.filter_parameters(model.parameters(), hcg)  # public; == _rank2params[opt_rank]
        assert {id(p) for p in owned} == {id(p) for p in inner._rank2params[opt_rank]}
        if mode == "fleet1":  # V1 also narrows the user's optimizer to the owned parameters
            assert {id(p) for p in opt._parameter_list} == {id(p) for p in owned}
        else:  # (to views of one fused buffer per rank)
            assert all(p._is_shared_buffer_with(inner._rank2fused[opt_rank][0]) for p in owned)
        owner = {name: group.ranks[r] for name, r in inner._param2rank.items()}
        return trained, wrapped, owned, group, owner, opt_rank
    if mode == "fleet2":
        from paddle.distributed import fleet
        from paddle.distributed.fleet.utils import mix_precision_utils as mix

        trained = fleet.distributed_model(mix.MixPrecisionLayer(model, dtype="bfloat16"))
        wrapped = fleet.distributed_optimizer(mix.MixPrecisionOptimizer(opt))
        inner = wrapped._inner_opt
        assert type(inner).__name__ == "DygraphShardingOptimizerV2", type(inner)
        hcg = fleet.get_hybrid_communicate_group()
        group, opt_rank = hcg.get_sharding_parallel_group(), hcg.get_sharding_parallel_rank()
        # (owned: the parameters whose padded span in the buffers meets this rank's share)
        owned = [p for buffer in inner._comm_buffer_list for p in buffer.params
                 if buffer._sharding_param_grad_view[p.name]._param_begin
                 < buffer._sharding_param_grad_view[p.name]._param_end]
        return trained, wrapped, owned, group, None, opt_rank
    with _group_sharded_on_cpu():
        trained, wrapped, _ = dist.sharding.group_sharded_parallel(model, opt, level=mode)
    group, opt_rank = wrapped._group, wrapped._rank  # GroupShardedOptimizerStage2
    # group=None: the layer and the optimizer each make their own new_group over all ranks (two
    # groups, two ids); the optimizer's is the one its partition and broadcasts use.
    assert trained._group.ranks == group.ranks and trained._rank == opt_rank
    owner = {name: group.ranks[r] for name, r in wrapped.param2rank.items()}
    owned = [p for p in wrapped.local_params if wrapped.param2rank[p.name] == opt_rank]
    return trained, wrapped, owned, group, owner, opt_rank


COLLECTIVES = ("broadcast", "all_reduce", "all_gather", "all_gather_object", "reduce", "reduce_scatter",
               "scatter", "alltoall", "send", "recv", "barrier")


@contextlib.contextmanager
def counting_collectives(counts: dict):
    """Count the calls of paddle.distributed's collectives made inside the ``with``."""
    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counted(name, fn):
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        return call
    for name, fn in saved.items():
        setattr(dist, name, counted(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def check_states(ema, report: dict) -> dict:
    """State round trips a user runs: the shard into the same rank, the whole state into a sharded
    EMA (it takes its part), a shard claiming another rank (refused, nothing changed)."""
    kept = {n: a.numpy().copy() for n, a in ema._averages.items()}
    shard = ema.state_dict()
    whole = ema.consolidated_state_dict()
    ema.set_state_dict(shard)
    same_after_shard = all(np.array_equal(a.numpy(), kept[n]) for n, a in ema._averages.items())
    ema.set_state_dict(whole)
    same_after_whole = all(np.array_equal(a.numpy(), kept[n]) for n, a in ema._averages.items())
    foreign = dict(shard, sharding={**shard["sharding"], "rank": 1 - shard["sharding"]["rank"]})
    try:
        ema.set_state_dict(foreign)
        refused = None
    except ValueError as error:
        refused = str(error)
    unchanged = all(np.array_equal(a.numpy(), kept[n]) for n, a in ema._averages.items())
    report.update(shard_names=sorted(shard["averages"]), shard_label=shard["sharding"],
                  whole_names=sorted(whole["averages"]), same_after_shard=same_after_shard,
                  same_after_whole=same_after_whole, foreign_refused=refused,
                  unchanged_after_refusal=unchanged)
    return whole


def check_against_reference(ema, reference, model, report: dict, others: dict, out: str) -> dict:
    """With batch norm: the sharded EMA against an unsharded one over the same rank's model, then
    what a rank out of step with the others gets. Each rank's batch-norm statistics are its own
    (Paddle 3.x broadcasts no tensor without a gradient), so a rank's averages must be its own
    EMA's, bit for bit, for the partitioned parameters (the ranks' weights agree) and the
    statistics alike; a gather between ranks at different updates, or with a rank that failed,
    raises on every rank."""
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    result = {f"weight/{n}": p.numpy() for n, p in named.items()}
    result.update({f"average/{n}": a.numpy() for n, a in ema.averages().items()})
    result.update({f"reference/{n}": a.numpy() for n, a in reference.averages().items()})
    with ema.apply():
        result.update({f"applied/{n}": p.numpy() for n, p in named.items()})
    result.update({f"restored/{n}": p.numpy() for n, p in named.items()})
    # A PowerEMA given the sharded optimizer, against one that is not.
    result.update({f"power/{n}": a.numpy() for n, a in others["power"].averages().items()})
    unsharded = others["power_reference"].averages()
    result.update({f"power_reference/{n}": a.numpy() for n, a in unsharded.items()})
    # PostHocEMA(sharding=): rank 0 writes the gathered snapshots; an unsharded PostHocEMA on each
    # rank over the same directory, where rank 0 only writes (the other would mix its run in).
    sharded, unsharded = others["posthoc"], others["posthoc_reference"]
    for label, posthoc in (("posthoc", sharded), ("posthoc_reference", unsharded)):
        report[f"{label}_files"] = sorted(os.listdir(posthoc.snapshot_dir))
        result.update({f"{label}_synth/{n}": t.numpy() for n, t in posthoc.synthesize(0.07).items()})
    for (sigma_rel, step, path), (_, _, reference_path) in zip(
            paddle_ema.posthoc.snapshots(sharded.snapshot_dir),
            paddle_ema.posthoc.snapshots(unsharded.snapshot_dir)):
        snapshot, reference_snapshot = paddle.load(path), paddle.load(reference_path)
        report.setdefault("posthoc_snapshots", []).append([sigma_rel, step])
        result.update({f"posthoc_snapshot/{sigma_rel}/{step}/{n}": np.asarray(v)
                       for n, v in snapshot["averages"].items()})
        result.update({f"posthoc_reference_snapshot/{sigma_rel}/{step}/{n}": np.asarray(v)
                       for n, v in reference_snapshot["averages"].items()})
    with sharded.apply(0.07):
        result.update({f"posthoc_applied/{n}": p.numpy() for n, p in named.items()})
    report["posthoc_restored"] = all(np.array_equal(p.numpy(), result[f"weight/{n}"])
                                     for n, p in named.items())
    # A client's checkpoint: every rank saves (rank 0 writes), every rank loads its part.
    prefix = os.path.join(out, "ppdet_ema")
    paddle_ema.compat.save(ema, prefix, format="ppdet")
    others["fresh"].set_state_dict(ema.state_dict())  # (anything else first: load must overwrite)
    others["fresh"].reset()
    paddle_ema.compat.load(others["fresh"], prefix, format="ppdet", step=ema.num_updates)
    result.update({f"ppdet/{n}": a.numpy() for n, a in others["fresh"].averages().items()})
    # model.to(float64) after the EMAs were built: the consolidated state follows the cast.
    model.to(dtype="float64")
    whole = ema.consolidated_state_dict()
    result.update({f"whole64/{n}": a.numpy() for n, a in whole["averages"].items()})
    result.update({f"reference64/{n}": a.numpy() for n, a in reference.state_dict()["averages"].items()})
    report["whole64_dtypes"] = sorted({str(a.numpy().dtype) for a in whole["averages"].values()})

    def refusal(call) -> str | None:
        try:
            call()
        except RuntimeError as error:
            return str(error)
        return None
    # One rank fails before the gather (its model re-bound an averaged tensor to another shape):
    # each rank hears it at once.
    rank, norm = dist.get_rank(), model.body[2]
    saved = norm._mean
    if rank == 1:
        norm._mean = paddle.create_parameter([4], "float64")
    start = time.perf_counter()
    report["failed_gather"] = refusal(ema.averages)
    report["failed_gather_s"] = time.perf_counter() - start
    norm._mean = saved
    # One rank skips an update: the next gather is refused on every rank, with nothing changed.
    if rank == 0:
        ema.update()
    report["stale_gather"] = refusal(ema.averages)
    report["stale_apply"] = refusal(ema.apply)
    report["stale_whole"] = refusal(ema.consolidated_state_dict)
    report["weights_unchanged"] = all(np.array_equal(p.numpy(), result[f"weight/{n}"].astype("float64"))
                                      for n, p in named.items())
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--mode", choices=["fleet1", "fleet1f", "fleet2", "os", "os_g"], required=True)
    parser.add_argument("--single", action="store_true")
    parser.add_argument("--resume", help="a whole EMA state (paddle.save) to load before training")
    parser.add_argument("--batch-norm", action="store_true",
                        help="a model with batch norm, checked against an unsharded EMA on each rank")
    args = parser.parse_args()
    paddle.set_device("cpu")
    if not args.single:
        if args.mode in ("fleet1", "fleet1f", "fleet2"):
            from paddle.distributed import fleet

            strategy = fleet.DistributedStrategy()
            strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 1, "pp_degree": 1, "sharding_degree": 2}
            if args.mode == "fleet1f":
                strategy.hybrid_configs["sharding_configs"].tensor_fusion = True
                _tensor_fusion_on_cpu()
            if args.mode == "fleet2":
                strategy.hybrid_configs["sharding_configs"].split_param = True
                _split_param_on_cpu()
            fleet.init(is_collective=True, strategy=strategy)
        else:
            dist.init_parallel_env()
    rank = 0 if args.single else dist.get_rank()
    paddle.seed(SEED)  # the same initial weights on every rank and in the single process
    model = Net(args.batch_norm)
    named = dict(model.named_parameters())  # structured names of the unwrapped model
    opt = paddle.optimizer.AdamW(0.05, parameters=model.parameters(), weight_decay=0.01)
    start = time.perf_counter()
    if args.single:
        trained, stepper, owned, group, owner, opt_rank = model, opt, list(named.values()), None, None, 0
    else:
        trained, stepper, owned, group, owner, opt_rank = wrap(args.mode, model, opt)
    wrap_s = time.perf_counter() - start
    rng = np.random.default_rng(11)
    mine = slice(0, 2 * LOCAL_BATCH) if args.single else slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    ema = paddle_ema.ModelEMA(trained, 0.9, warmup="threshold",
                              sharding=None if args.single else stepper)
    reference, others = None, {}
    if args.mode == "fleet2":  # (PowerEMA and PostHocEMA keep pieces too; checked against one process)
        phema = os.path.join(args.out, f"phema_fleet2_{'single' if args.single else 2}")
        sharding = None if args.single else stepper
        others = {"power": paddle_ema.PowerEMA(trained, 0.1, sharding=sharding),
                  "posthoc": paddle_ema.PostHocEMA(trained, snapshot_dir=phema, snapshot_every=3,
                                                   sharding=sharding)}
    if args.batch_norm:
        reference = paddle_ema.ModelEMA(trained, 0.9, warmup="threshold")
        phema = os.path.join(args.out, f"phema_{args.mode}")
        others = {"power": paddle_ema.PowerEMA(trained, 0.1, sharding=stepper),
                  # (offload: on the CPU the averages stay where they are; the gathers take the path
                  # that copies them to their tensors' devices)
                  "posthoc": paddle_ema.PostHocEMA(trained, snapshot_dir=phema, snapshot_every=2,
                                                   sharding=stepper, offload=True),
                  "posthoc_reference": paddle_ema.PostHocEMA(trained, snapshot_dir=phema + "_reference",
                                                             snapshot_every=2),
                  "power_reference": paddle_ema.PowerEMA(trained, 0.1),
                  "fresh": paddle_ema.ModelEMA(trained, 0.9, warmup="threshold", sharding=stepper)}
    resumed = {}
    if args.resume:  # (another layout's whole state: each rank takes its part; then go on afresh)
        ema.set_state_dict(paddle.load(args.resume))
        resumed = {f"resumed/{n}": a.numpy() for n, a in ema.averages().items()}
        ema.reset()
    counts: dict = {}

    def train_step():
        x = rng.standard_normal((2 * LOCAL_BATCH, 5)).astype("float32")
        y = rng.standard_normal((2 * LOCAL_BATCH, 3)).astype("float32")
        loss = (trained(paddle.to_tensor(x[mine])) - paddle.to_tensor(y[mine])).square().mean()
        loss.backward()
        stepper.step()
        stepper.clear_grad()

    start = time.perf_counter()
    for _ in range(STEPS):
        train_step()
        with counting_collectives(counts):
            ema.update()
        if reference is not None:
            reference.update()
            others["power"].update()
            others["power_reference"].update()
            others["posthoc"].update()
            others["posthoc_reference"].update()
        elif others:
            others["power"].update()
            others["posthoc"].update()
    train_s = time.perf_counter() - start
    if reference is not None:
        report = {"kept_names": sorted(ema._averages), "collectives_in_updates": counts}
        result = check_against_reference(ema, reference, model, report, others, args.out)
        result["report"] = np.array(json.dumps(report))
        os.makedirs(args.out, exist_ok=True)
        np.savez(os.path.join(args.out, f"batch_norm_{args.mode}_{rank}.npz"), **result)
        return 0
    if args.mode in ("os", "os_g") and not args.single:
        # The same partition as the stage-2 layer sees it (filled on the first forward, not at wrap).
        assert trained._trainable_param2rank == stepper.param2rank, trained._trainable_param2rank

    by_id = {id(p): n for n, p in named.items()}
    report = {"mode": args.mode, "paddle": paddle.__version__, "owned": sorted(by_id[id(p)] for p in owned),
              "wrap_s": wrap_s, "train_s": train_s, "collectives_in_updates": counts,
              "kept_names": sorted(ema._averages), "averaged_names": ema.names,
              "kept_numel": sum(int(np.prod(a.shape)) for a in ema._averages.values()),
              # (where master_weights=stepper looks for the master weights: the optimizer that steps)
              "master_weights_of": paddle_ema._masters.source(stepper) is opt}
    if not args.single:
        report.update(
            get_rank=dist.get_rank(), world_size=dist.get_world_size(), opt_rank=opt_rank,
            group_ranks=list(group.ranks), group_rank=group.rank, group_nranks=group.nranks,
            owner={n: owner[p.name] for n, p in named.items()} if owner is not None else None,
            rank_numbering_agrees=(group.ranks[opt_rank] == dist.get_rank() and group.rank == opt_rank
                                   and group.get_group_rank(dist.get_rank()) == opt_rank))
    result = {f"weight/{n}": p.numpy() for n, p in named.items()}
    result.update({f"buffer/{n}": b.numpy() for n, b in model.named_buffers()})
    result.update({f"kept/{n}": a.numpy() for n, a in ema._averages.items()})
    result.update({f"average/{n}": a.numpy() for n, a in ema.averages().items()})
    held = {**named, **dict(model.named_buffers())}
    with ema.apply():
        result.update({f"applied/{n}": t.numpy() for n, t in held.items()})
    result.update({f"restored/{n}": t.numpy() for n, t in held.items()})
    if others:
        result.update({f"power/{n}": a.numpy() for n, a in others["power"].averages().items()})
        synthesized = others["posthoc"].synthesize(0.07)
        result.update({f"posthoc_synth/{n}": t.numpy() for n, t in synthesized.items()})
        with others["posthoc"].apply(0.07):
            result.update({f"posthoc_applied/{n}": t.numpy() for n, t in named.items()})
        result.update({f"posthoc_restored/{n}": t.numpy() for n, t in named.items()})
        twin = ema.averaged_model()
        result.update({f"twin/{n}": t.numpy() for n, t in twin.named_parameters()})
        try:
            paddle_ema.compat.save(ema, os.path.join(args.out, "ppdet_fleet2"), format="ppdet")
        except ValueError as error:
            report["compat_refused"] = str(error)
    whole = check_states(ema, report) if not args.single else ema.state_dict()
    if args.mode == "fleet2" and not args.single:
        buffers = stepper._inner_opt._comm_buffer_list
        report["rows"] = {n: list(r) for n, r in ema._slices.rows.items()}
        report["buffers_hold_the_weights"] = all(
            p._is_shared_buffer_with(b.param_storage) for b in buffers for p in b.params)
    train_step()  # (training goes on after apply/restore and the state round trips, as in one process)
    ema.update()
    result.update({f"after_weight/{n}": p.numpy() for n, p in named.items()})
    result.update({f"after_average/{n}": a.numpy() for n, a in ema.averages().items()})
    os.makedirs(args.out, exist_ok=True)
    if rank == 0:
        layout = "single" if args.single else 2
        paddle.save(whole, os.path.join(args.out, f"whole_{args.mode}_{layout}.pdparams"))
    result.update(resumed)
    result.update({f"whole/{n}": np.asarray(a.numpy()) for n, a in whole["averages"].items()})
    result["report"] = np.array(json.dumps(report))
    stem = f"sharding_{args.mode}_{'single' if args.single else rank}"
    np.savez(os.path.join(args.out, f"{stem}.npz"), **result)
    print("OK", json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
