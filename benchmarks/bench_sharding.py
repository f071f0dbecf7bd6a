"""Benchmark paddle_ema.ModelEMA(sharding=optimizer) under fleet's dygraph sharding stage 1, 2 CPU ranks.

Run with no arguments, the script is the launcher: it starts itself under ``python -m
paddle.distributed.launch --nproc_per_node=2`` (gloo on CPU), waits, collects each rank's JSON and
writes ``results/sharding-<paddle major.minor>.json`` and prints a table. With ``--worker DIR`` it is
one rank: it builds ``bench_dygraph.py``'s ``fc64`` model (256 fc layers 64x64 + bias: 512 tensors,
1.06M parameters), wraps it in fleet hybrid parallel with ``sharding_degree=2``
(``DygraphShardingOptimizer``, V1) around AdamW, and keeps two EMAs of it side by side: an unsharded
``ModelEMA(model, 0.999)`` and a sharded ``ModelEMA(model, 0.999, sharding=optimizer)``. Per rank, as
the median of ``--repeats`` repeats, it measures each EMA's state (bytes of its averages on that rank),
``update()``, one ``with ema.apply(): pass`` and ``averages()``, and the training step (forward,
backward, ``optimizer.step()``, ``clear_grad()``), with the paddle.distributed collectives each call
makes. It checks that the sharded EMA's gathered averages are bit-equal to the unsharded one's.

With ``--stage3`` the model is wrapped by ``group_sharded_parallel(level="p_g_os")`` instead (stage 3,
``segment_size`` 1024: each 64x64 weight is cut into one slice per rank, the biases stay whole; with
the test-only CPU shim of ``tests/distributed/stage3_worker.py``, as Paddle asserts a GPU), the sharded
EMA is ``ModelEMA(wrapped_model, 0.999)``, and the unsharded one averages an unwrapped copy of the
model that is given the whole trained weights after every training step (gathered outside the timings),
so that both average the same numbers.

With ``--split-param`` it is fleet hybrid parallel with ``sharding_degree=2`` and
``sharding_configs.split_param`` (``DygraphShardingOptimizerV2``, which lays the parameters end to end in
padded flat buffers and gives each rank's optimizer an equal share of each buffer), around
``MixPrecisionLayer(model, dtype="bfloat16")`` and ``MixPrecisionOptimizer(AdamW)`` (the weights stay
float32), as PaddleNLP trains; with the test-only CPU shim of ``tests/distributed/dygraph_sharding_worker.py``
(``_split_param_on_cpu``: tensor fusion asserts a GPU, gloo has no reduce-scatter), then the GPU's
256-byte alignment instead of the shim's 16. The sharded EMA is ``ModelEMA(wrapped_model, 0.999,
sharding=optimizer)`` (each rank averages its piece of each parameter); the unsharded one is
``ModelEMA(wrapped_model, 0.999)``: the step all-gathers the buffers, so every rank holds every
parameter whole between steps and both average the same numbers. Results go to
``results/sharding-split-<paddle major.minor>.json``. See benchmarks/README.md ("Sharding").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import bench_dygraph
import bench_ema
import numpy as np
import paddle
import paddle.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from process_tree import kill_tree  # noqa: E402

import paddle_ema

HERE = Path(__file__).resolve().parent
# Parameters of more values are cut into slices under --stage3 (fc64's weights: 4096 values each).
STAGE3_SEGMENT = 1024
# Bytes tensor fusion pads each parameter to under --split-param: Paddle's value on GPUs (the test shim
# sets 16, to cut its small model's weights mid-way).
SPLIT_ALIGN = 256
RESULTS_DIR = HERE / "results"
MODEL = "fc64"
DECAY = bench_ema.DECAY  # 0.999, as the other benchmarks
LEARNING_RATE = bench_dygraph.LEARNING_RATE  # (AdamW's steps are ~lr each: the deep stack stays finite)
WORLD = 2
SEED = bench_dygraph.SEED
# Training steps (each followed by both EMAs' updates) before anything is timed or compared: the
# averages then hold real, distinct values, and the bias correction is no longer trivial.
WARM_STEPS = 5
# The whole 2-process run is killed past this: a rank that dies leaves the other waiting in a collective.
LAUNCH_TIMEOUT_S = 600
EMAS = ("unsharded", "sharded")
# Every paddle.distributed function that talks to other ranks (those a Paddle version lacks are skipped).
COLLECTIVES = (
    "broadcast", "all_reduce", "all_gather", "all_gather_object", "reduce", "reduce_scatter", "scatter",
    "alltoall", "alltoall_single", "send", "recv", "isend", "irecv", "batch_isend_irecv", "barrier",
    "broadcast_object_list", "scatter_object_list", "gather",
)
# Timed calls, in the order of the table: (key prefix, what one call is).
CALLS = (("update", "update()"), ("apply_restore", "apply + restore"), ("averages", "averages()"))
TRAIN_KEY = "train_step"


# ---------------------------------------------------------------------------------------- launcher


def launch_env() -> dict[str, str]:
    """The environment of the 2-process run, as tests/test_distributed.py's ``_env()``: no PADDLE_*
    variable of an enclosing launch (the launcher sets its own, and stale ones confuse it), and the
    benchmarks folder and the repository first on PYTHONPATH, so each rank imports the same
    paddle_ema as this process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    return env


def launch(args: argparse.Namespace, work: Path) -> float:
    """Run the 2 ranks under paddle.distributed.launch; their JSON lands in ``work``. Return wall seconds.

    Raises:
        SystemExit: the run failed or timed out (the tail of every rank's log is printed).
    """
    log_dir = work / "log"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", f"--nproc_per_node={WORLD}",
           "--log_dir", str(log_dir), str(Path(__file__).resolve()), "--worker", str(work),
           "--repeats", str(args.repeats), *(["--quick"] if args.quick else []),
           *(["--stage3"] if args.stage3 else []), *(["--split-param"] if args.split_param else [])]
    start = time.monotonic()
    with open(work / "launch.log", "w") as out:
        proc = subprocess.Popen(cmd, env=launch_env(), cwd=work, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None:  # (a timeout, or Ctrl-C here)
                kill_tree(proc)
    wall = time.monotonic() - start
    if rc != 0:
        logs = "".join(f"\n--- {log.name}\n{log.read_text()[-3000:]}"
                       for log in sorted(log_dir.glob("workerlog.*")))
        why = f"timed out after {LAUNCH_TIMEOUT_S}s" if rc is None else f"exited {rc} after {wall:.0f}s"
        raise SystemExit(f"{' '.join(cmd)} {why}:\n{(work / 'launch.log').read_text()[-3000:]}{logs}")
    return wall


def run_launcher(args: argparse.Namespace) -> None:
    # The load before and after: 2 ranks on a 2-core machine time each other's waits, so another busy
    # process shows up in every collective (a 1-min load well above 2 after the run means it was shared).
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_sharding_") as tmp:
        wall = launch(args, Path(tmp))
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(WORLD)]
    versions = {r["paddle_version"] for r in ranks}
    if versions != {paddle.__version__}:
        raise SystemExit(f"the ranks ran Paddle {sorted(versions)}, this process {paddle.__version__}")
    if args.stage3:
        sharding = f"group_sharded_parallel(level='p_g_os'), segment_size={STAGE3_SEGMENT} (stage 3)"
    elif args.split_param:
        sharding = (f"fleet hybrid parallel, sharding_degree={WORLD}, split_param "
                    f"({ranks[0]['inner_optimizer']}), MixPrecisionLayer/Optimizer, "
                    f"{SPLIT_ALIGN}-byte alignment")
    else:
        sharding = f"fleet hybrid parallel, sharding_degree={WORLD} ({ranks[0]['inner_optimizer']})"
    results = {
        "kind": "sharding", **bench_ema.machine_and_run(args), "model": MODEL, "world_size": WORLD,
        "sharding": sharding,
        "optimizer": ranks[0]["optimizer"], "launch_wall_s": wall,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "ranks": ranks,
    }
    major_minor = ".".join(paddle.__version__.split(".")[:2])
    mode = "-stage3" if args.stage3 else "-split" if args.split_param else ""
    out = args.out or RESULTS_DIR / f"sharding{mode}-{major_minor}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"Paddle {paddle.__version__}, {MODEL}, {sharding} over {WORLD} CPU ranks (gloo), "
          f"per rank, ms per call (median of {args.repeats}); run took {wall:.0f} s\n")
    print(markdown(results))
    print(f"\nwrote {out}")


# ------------------------------------------------------------------------------------------ worker


class Collectives:
    """Counts the calls of paddle.distributed's collectives while :meth:`counting` is active.

    Each function is replaced by a counting wrapper on the ``paddle.distributed`` module, which is
    where both paddle_ema and fleet's sharding optimizer look them up at each call. A collective
    called from inside another (e.g. an object gather built on a tensor gather) counts once.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._depth = 0

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        for name, fn in saved.items():
            setattr(dist, name, self._counted(name, fn))
        try:
            yield
        finally:
            for name, fn in saved.items():
                setattr(dist, name, fn)

    def _counted(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self._depth == 0:
                self.counts[name] = self.counts.get(name, 0) + 1
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return call


def sync() -> None:
    """Wait for every rank (a 1-element all-reduce; not counted), so that a timed batch of calls that
    communicate does not start with the time the other rank needs to finish its previous batch."""
    dist.all_reduce(paddle.zeros([1], dtype="float32"))


def agree_max(values: list[int]) -> list[int]:
    """The element-wise maximum of ``values`` over the ranks: every rank must make the same number of
    calls that communicate, or one waits for a call the other never makes."""
    tensor = paddle.to_tensor(values, dtype="float64")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [int(v) for v in tensor.numpy()]


@dataclasses.dataclass
class Timer:
    """bench_ema.Timer for ranks that communicate: warm-up runs, then ``repeats`` repeats of enough
    runs to last about ``target_s``, the steps given together timed in turn (rotating order) within
    each repeat. Unlike bench_ema's, the number of runs is agreed between the ranks (the larger), each
    batch starts after a :func:`sync`, and the collectives every timed call makes are counted."""

    repeats: int
    warmup: int
    target_s: float
    min_runs: int
    max_runs: int = 2000

    def __call__(self, steps: dict[str, Callable[[], Any]], same_runs: bool = False) -> dict[str, Any]:
        """Time ``steps``; with ``same_runs`` every step runs as many times (the most any needs)."""
        names = list(steps)
        for step in steps.values():
            for _ in range(self.warmup):
                step()
        wanted = []
        for name in names:
            sync()
            one = bench_ema._ms_per_run(steps[name], 1) / 1e3
            wanted.append(max(self.min_runs, min(self.max_runs, round(self.target_s / max(one, 1e-9)))))
        if same_runs:
            wanted = [max(wanted)] * len(wanted)
        runs = dict(zip(names, agree_max(wanted)))
        samples: dict[str, list[float]] = {name: [] for name in names}
        counters = {name: Collectives() for name in names}
        for repeat in range(self.repeats):
            for name in names[repeat % len(names):] + names[: repeat % len(names)]:
                sync()
                with counters[name].counting():
                    samples[name].append(bench_ema._ms_per_run(steps[name], runs[name]))
        results = {}
        for name in names:
            calls = runs[name] * self.repeats
            by_kind = {kind: n / calls for kind, n in sorted(counters[name].counts.items())}
            results[name] = {
                "ms": statistics.median(samples[name]), "min_ms": min(samples[name]),
                "samples_ms": samples[name], "runs_per_repeat": runs[name],
                "collectives_per_call": sum(by_kind.values()), "collectives_by_kind": by_kind,
            }
        return results


def init_fleet(split_param: bool = False) -> Any:
    """fleet hybrid parallel on this rank: sharding only (``sharding_degree`` = the world size); with
    ``split_param``, DygraphShardingOptimizerV2, on the CPU by the tests' shim, at the GPU's alignment."""
    from paddle.distributed import fleet

    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 1, "pp_degree": 1, "sharding_degree": WORLD}
    if split_param:
        from paddle.distributed.fleet.utils import tensor_fusion_helper as fusion

        strategy.hybrid_configs["sharding_configs"].split_param = True
        sys.path.insert(0, str(HERE.parent / "tests" / "distributed"))
        from dygraph_sharding_worker import _split_param_on_cpu  # (the test-only CPU shim)

        _split_param_on_cpu()
        fusion.alignment.update(cpu=SPLIT_ALIGN, gpu=SPLIT_ALIGN)
    fleet.init(is_collective=True, strategy=strategy)
    return fleet


def inner_optimizer(optimizer: Any) -> Any:
    """The sharding optimizer fleet wrapped (HybridParallelOptimizer -> DygraphShardingOptimizer or
    DygraphShardingOptimizerV2 -> ...)."""
    while getattr(optimizer, "_inner_opt", None) is not None and \
            type(optimizer).__name__ not in ("DygraphShardingOptimizer", "DygraphShardingOptimizerV2"):
        optimizer = optimizer._inner_opt
    return optimizer


def ema_state(ema: paddle_ema.ModelEMA) -> dict[str, Any]:
    """What the EMA keeps on this rank: its averages (views of flat buffers, or tensors of their own:
    either way each value is stored once), their count (``nonempty``: those of any values; under
    ``--split-param`` a rank keeps an empty piece of each parameter its share does not meet), values
    and bytes."""
    averages = list(ema._averages.values())
    numel = sum(math.prod(a.shape) for a in averages)
    state_bytes = sum(math.prod(a.shape) * a.element_size() for a in averages)
    return {"tensors": len(averages), "nonempty": sum(math.prod(a.shape) > 0 for a in averages),
            "values": numel, "bytes": state_bytes, "mib": state_bytes / 2**20}


def compare(unsharded: paddle_ema.ModelEMA, sharded: paddle_ema.ModelEMA) -> dict[str, Any]:
    """Whether the sharded EMA's gathered ``averages()`` are the unsharded one's, bit for bit (both
    averaged the same weights with the same kernels; only where the values are kept differs)."""
    ours, theirs = sharded.averages(), unsharded.averages()
    equal = list(ours) == list(theirs) and all(
        np.array_equal(ours[n].numpy(), theirs[n].numpy()) for n in ours)
    diff = max((float(np.abs(ours[n].numpy() - theirs[n].numpy()).max()) for n in ours if n in theirs),
               default=math.nan)
    return {"names_equal": list(ours) == list(theirs), "bit_equal": equal, "max_abs_diff": diff,
            "tensors": len(ours), "updates": sharded.num_updates}


@contextlib.contextmanager
def library_warnings(caught: list[str]) -> Iterator[None]:
    """Collect what paddle_ema warns or logs at WARNING and above (it should say nothing here);
    Paddle's own warnings and logs are left alone."""

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            caught.append(f"log {record.name}: {record.getMessage()}")

    handler, logger = Keep(logging.WARNING), logging.getLogger("paddle_ema")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            yield
        library = str(Path(paddle_ema.__file__).parent)
        caught.extend(f"{w.category.__name__}: {w.message}" for w in seen if w.filename.startswith(library))
    finally:
        logger.removeHandler(handler)


def apply_restore(ema: paddle_ema.ModelEMA) -> Callable[[], None]:
    def step() -> None:
        with ema.apply():
            pass

    return step


def whole_weights_into(model: Any, wrapper: Any, twin: Any) -> None:
    """Set ``twin``'s parameters to stage-3 ``model``'s whole trained weights: each sliced one
    all-gathered from the ranks' slices (``fw_storage``) and cut to size (collective)."""
    held = dict(twin.named_parameters())
    with paddle.no_grad():
        for name, param in model.named_parameters():
            piece = getattr(param, "fw_storage", None)
            if piece is None:
                held[name].set_value(param)
                continue
            parts: list[Any] = []
            dist.all_gather(parts, piece, group=wrapper._group)
            held[name].set_value(paddle.concat(parts)[:math.prod(param.shape)].reshape(param.shape))


def run_worker(args: argparse.Namespace) -> None:
    paddle.disable_static()
    paddle.set_device("cpu")
    fleet = None if args.stage3 else init_fleet(args.split_param)
    if args.stage3:
        dist.init_parallel_env()
    rank = dist.get_rank()
    if args.quick:
        timer = Timer(repeats=args.repeats, warmup=2, target_s=0.03, min_runs=2)
    else:
        timer = Timer(repeats=args.repeats, warmup=5, target_s=0.25, min_runs=5)
    model, _ = bench_dygraph.build_model(MODEL)  # seeded: the same weights on every rank
    shape = bench_dygraph.DYGRAPH_MODELS[MODEL][1]
    # Each rank its own batch, as in data parallelism (the sharding group is the data-parallel one).
    x = paddle.to_tensor(np.random.default_rng(SEED + rank).standard_normal(shape).astype("float32"))
    opt = paddle.optimizer.AdamW(learning_rate=LEARNING_RATE, parameters=model.parameters())
    if args.stage3:
        sys.path.insert(0, str(HERE.parent / "tests" / "distributed"))
        from stage3_worker import _stage3_on_cpu  # (the test-only CPU shim)

        twin, _ = bench_dygraph.build_model(MODEL)  # the unsharded EMA's model, given the weights
        with _stage3_on_cpu():
            trained, stepper, _ = dist.sharding.group_sharded_parallel(
                model, opt, level="p_g_os", segment_size=STAGE3_SEGMENT)
        inner = stepper
    elif args.split_param:
        from paddle.distributed.fleet.utils import mix_precision_utils as mix

        twin = None  # (the step all-gathers the buffers: every rank holds every parameter whole)
        trained = fleet.distributed_model(mix.MixPrecisionLayer(model, dtype="bfloat16"))
        stepper = fleet.distributed_optimizer(mix.MixPrecisionOptimizer(opt))
        inner = inner_optimizer(stepper)
        if type(inner).__name__ != "DygraphShardingOptimizerV2":
            raise SystemExit(f"expected fleet's DygraphShardingOptimizerV2, got {type(inner).__name__}")
    else:
        twin = None
        trained, stepper = fleet.distributed_model(model), fleet.distributed_optimizer(opt)
        inner = inner_optimizer(stepper)
        if type(inner).__name__ != "DygraphShardingOptimizer":
            raise SystemExit(f"expected fleet's DygraphShardingOptimizer (V1), got {type(inner).__name__}")
    caught: list[str] = []
    with library_warnings(caught):
        emas = {"unsharded": paddle_ema.ModelEMA(trained if twin is None else twin, DECAY),
                "sharded": paddle_ema.ModelEMA(trained, DECAY, sharding=None if args.stage3 else stepper)}

        def train_step() -> None:
            loss = paddle.mean(paddle.square(trained(x)))
            loss.backward()
            stepper.step()
            stepper.clear_grad()

        for _ in range(WARM_STEPS):
            train_step()
            if twin is not None:
                whole_weights_into(model, trained, twin)
            for ema in emas.values():
                ema.update()
        checks = {"before_timing": compare(emas["unsharded"], emas["sharded"])}
        # Both EMAs update as many times (same_runs), so they can be compared again at the end.
        timings = timer({f"update_{k}": ema.update for k, ema in emas.items()}, same_runs=True)
        timings.update(timer({f"apply_restore_{k}": apply_restore(ema) for k, ema in emas.items()}))
        timings.update(timer({f"averages_{k}": ema.averages for k, ema in emas.items()}))
        timings.update(timer({TRAIN_KEY: train_step}))
        checks["after_timing"] = compare(emas["unsharded"], emas["sharded"])
    with paddle.no_grad():
        loss = float(paddle.mean(paddle.square(trained(x))))
        finite = all(bool(paddle.isfinite(p).all()) for p in (model if twin is None else twin).parameters())
    report = {
        "rank": rank, "world_size": dist.get_world_size(), "paddle_version": paddle.__version__,
        "sharded_values_per_rank": sum(math.prod(a.shape) for a in emas["sharded"]._averages.values()),
        "optimizer": type(opt).__name__, "inner_optimizer": type(inner).__name__,
        "model_sizes": bench_dygraph.model_sizes(model),
        "state": {k: ema_state(ema) for k, ema in emas.items()},
        "checks": checks, "timings": timings, "library_warnings": caught,
        "health": {"final_loss": loss, "weights_finite": finite},
    }
    Path(args.worker, f"rank{rank}.json").write_text(json.dumps(report, indent=2) + "\n")


# ------------------------------------------------------------------------------------------- table


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---|---" + "|---:" * (len(header) - 2) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def _collectives(timing: dict[str, Any]) -> str:
    """``3 (all_gather 1, broadcast 2)``; ``0``."""
    kinds = ", ".join(f"{k} {n:g}" for k, n in timing["collectives_by_kind"].items())
    return f"{timing['collectives_per_call']:g}" + (f" ({kinds})" if kinds else "")


def markdown(results: dict[str, Any]) -> str:
    """Per rank: a row per EMA and a row of their ratio (sharded / unsharded, of this run), then a
    table of the training step and the checks."""
    header = ["rank", "EMA", "state (MiB)", "update (ms)", "apply + restore (ms)", "averages() (ms)",
              "collectives: update", "collectives: apply + restore", "collectives: averages()"]
    rows, train_rows = [], []
    for report in results["ranks"]:
        t, rank = report["timings"], str(report["rank"])
        for ema in EMAS:
            rows.append([rank, ema, f"{report['state'][ema]['mib']:.2f}",
                         *(f"{t[f'{key}_{ema}']['ms']:.2f}" for key, _ in CALLS),
                         *(_collectives(t[f"{key}_{ema}"]) for key, _ in CALLS)])
        ratio = report["state"]["sharded"]["bytes"] / report["state"]["unsharded"]["bytes"]
        rows.append([rank, "sharded / unsharded", f"{ratio:.2f}",
                     *(f"{t[f'{key}_sharded']['ms'] / t[f'{key}_unsharded']['ms']:.2f}" for key, _ in CALLS),
                     "", "", ""])
        checks = report["checks"]
        train_rows.append([
            rank, f"{t[TRAIN_KEY]['ms']:.1f}", _collectives(t[TRAIN_KEY]),
            " / ".join("yes" if checks[k]["bit_equal"] else "NO" for k in ("before_timing", "after_timing")),
            str(len(report["library_warnings"])),
        ])
    train_header = ["rank", "training step (ms)", "collectives per step",
                    "sharded averages() bit-equal (before / after timing)", "library warnings"]
    return "\n".join(_table(header, rows) + [""] + _table(train_header, train_rows))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        help="JSON output (default: results/sharding[-stage3|-split]-<major.minor>.json)")
    parser.add_argument("--repeats", type=int, default=9, help="repeats per timing; 9 or more to commit")
    parser.add_argument("--quick", action="store_true", help="few short runs per repeat (smoke test)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--stage3", action="store_true",
                      help="group_sharded_parallel(level='p_g_os') instead of fleet's stage 1")
    mode.add_argument("--split-param", action="store_true",
                      help="fleet's sharding_configs.split_param (DygraphShardingOptimizerV2) "
                           "instead of stage 1")
    parser.add_argument("--worker", metavar="DIR",
                        help="run as one rank under paddle.distributed.launch, writing DIR/rank<r>.json")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
    else:
        run_launcher(args)


if __name__ == "__main__":
    main()
