"""Benchmark paddle_ema in the Paddle mode of the current process and write the results as JSON.

For each model it times a training step without EMA, with paddle_ema and with a hand-written 4-op
chain (Paddle 2.6's formulation), programs that hold only the EMA update, one apply + restore, and a
numpy floor that moves the same bytes (12 per fp32 parameter). On Paddle 2.x it also times Paddle's
own ``paddle.static.ExponentialMovingAverage``. Every time is a median over repeats, in milliseconds
per step. The Paddle mode is fixed when paddle is imported, so run this once per mode (see
benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import paddle
from paddle.base import core
from paddle.base.data_feeder import convert_dtype

import paddle_ema

DECAY = 0.999
# The loss is the mean of the squared output at 1e-4: the plain mean of the output (0.2's choice, at
# 1e-3) has no lower bound, and the deep linear stacks went to inf and NaN within a few steps (fc64 at
# step 4), so most timed training steps ran on NaN weights. Now the loss stays finite (checked after
# timing: bench_model raises otherwise) and the weights still move; a step costs one square and its
# gradient more.
LEARNING_RATE = 1e-4
FC_BATCH = 8
CONV_INPUT = (8, 3, 32, 32)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PADDLE_CLASS_VARIANTS = ["train_paddle_class", "ema_only_paddle_class", "apply_restore_paddle_class"]
PLACE = paddle.CPUPlace()


# ----------------------------------------------------------------------------------------- models


def _fc_stack(width: int, depth: int) -> tuple[dict[str, np.ndarray], Any]:
    """``depth`` linear fc layers of ``width`` x ``width`` with bias; loss = mean of the squared output."""
    x = paddle.static.data("x", [FC_BATCH, width], "float32")
    h = x
    for i in range(depth):
        weight, bias = paddle.ParamAttr(name=f"fc{i}.w"), paddle.ParamAttr(name=f"fc{i}.b")
        h = paddle.static.nn.fc(h, width, weight_attr=weight, bias_attr=bias)
    feed = {"x": np.random.default_rng(0).standard_normal((FC_BATCH, width)).astype("float32")}
    return feed, paddle.mean(paddle.square(h))


def _conv_bn(x: Any, cin: int, cout: int, kernel: int, stride: int, relu: bool = True) -> Any:
    conv = paddle.nn.Conv2D(cin, cout, kernel, stride=stride, padding=kernel // 2, bias_attr=False)
    y = paddle.nn.BatchNorm2D(cout)(conv(x))
    return paddle.nn.functional.relu(y) if relu else y


def _residual_block(x: Any, cin: int, cout: int, stride: int) -> Any:
    y = _conv_bn(x, cin, cout, 3, stride)
    y = _conv_bn(y, cout, cout, 3, 1, relu=False)
    shortcut = x if stride == 1 and cin == cout else _conv_bn(x, cin, cout, 1, stride, relu=False)
    return paddle.nn.functional.relu(y + shortcut)


def _convnet() -> tuple[dict[str, np.ndarray], Any]:
    """A small ResNet: a conv stem and six residual blocks (32, 64, 128 channels), then fc(10)."""
    x = paddle.static.data("x", list(CONV_INPUT), "float32")
    h = _conv_bn(x, CONV_INPUT[1], 32, 3, 1)
    cin = 32
    for cout, stride in ((32, 1), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1)):
        h = _residual_block(h, cin, cout, stride)
        cin = cout
    logits = paddle.static.nn.fc(paddle.mean(h, axis=[2, 3]), 10)
    feed = {"x": np.random.default_rng(0).standard_normal(CONV_INPUT).astype("float32")}
    return feed, paddle.mean(paddle.square(logits))


MODELS: dict[str, Callable[[], tuple[dict[str, np.ndarray], Any]]] = {
    "fc512": functools.partial(_fc_stack, 512, 64),
    "fc64": functools.partial(_fc_stack, 64, 256),
    "convnet": _convnet,
}


# ------------------------------------------------------------------------------------ IR helpers


def in_pir() -> bool:
    return bool(paddle.framework.in_pir_mode())


def mode_name() -> str:
    """'paddle3.3.1-pir', 'paddle3.3.1-legacy', 'paddle2.6.2-legacy'."""
    return f"paddle{paddle.__version__}-{'pir' if in_pir() else 'legacy'}"


def op_types(program: Any) -> list[str]:
    """The op types of a program's global block, without PIR's dialect prefix ('pd_op.')."""
    if in_pir():
        return [op.name().split(".")[-1] for op in program.global_block().ops]
    return [op.type for op in program.global_block().ops]


def clone_for_test(program: Any) -> Any:
    """The IR's inference copy of ``program``: PIR's clone() has no for_test."""
    return program.clone() if in_pir() else program.clone(for_test=True)


def averaged_params(program: Any) -> list[Any]:
    """The parameters an EMA averages: all of them unless ``do_model_average`` is False."""
    params = program.global_block().all_parameters()
    return [p for p in params if getattr(p, "do_model_average", None) is not False]


def zero_state(name: str, shape: Sequence[int]) -> Any:
    """A persistable fp32 tensor, zero-initialised by the current startup program."""
    if in_pir():
        from paddle.pir.core import create_persistable_value

        return create_persistable_value(
            "float32", list(shape), name=name, initializer=paddle.nn.initializer.Constant(0.0)
        )
    return paddle.static.create_global_var(list(shape), 0.0, "float32", persistable=True, name=name)


# ------------------------------------------------------------------------------------ EMA flavors


def attach_paddle_ema() -> paddle_ema.ExponentialMovingAverage:
    ema = paddle_ema.ExponentialMovingAverage(DECAY)
    ema.update()
    return ema


def attach_4op() -> None:
    """Paddle 2.6's per-parameter chain with a python-float decay: mul, mul, add, assign."""
    for param in averaged_params(paddle.static.default_main_program()):
        ema = zero_state(f"{param.name}.ema4op", param.shape)
        tmp1 = ema * DECAY
        tmp2 = param * (1.0 - DECAY)
        tmp3 = tmp1 + tmp2
        paddle.assign(tmp3, output=ema)


def attach_paddle_class() -> Any:
    ema = paddle.static.ExponentialMovingAverage(DECAY)
    ema.update()
    return ema


FLAVORS: dict[str, Callable[[], Any]] = {
    "paddle_ema": attach_paddle_ema,
    "4op": attach_4op,
    "paddle_class": attach_paddle_class,
}


def paddle_class_skip_reason() -> str | None:
    """None where Paddle's own class is benchmarked (2.x), else why not, with the error it raises."""
    if paddle.__version__.startswith("2."):
        return None
    try:
        with fresh_world(), paddle.static.program_guard(paddle.static.Program(), paddle.static.Program()):
            paddle.static.create_parameter([1], "float32")
            attach_paddle_class()
    except Exception as error:  # whatever it raises is the reason
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        return f"paddle.static.ExponentialMovingAverage fails here: {type(error).__name__}: {first_line}"
    return "paddle.static.ExponentialMovingAverage is only benchmarked on Paddle 2.x"


# ------------------------------------------------------------------------------ measuring helpers


@dataclasses.dataclass(frozen=True)
class Timer:
    """Times steps: warm-up runs, then ``repeats`` repeats of enough runs to last ``target_s`` each.

    The steps given together are timed in turn within every repeat (in a rotating order), so a slow
    drift in the machine's load hits them alike and their ratios stay meaningful.
    """

    repeats: int
    warmup: int
    target_s: float
    min_runs: int
    max_runs: int = 2000

    def __call__(self, steps: dict[str, Callable[[], Any]]) -> dict[str, dict[str, Any]]:
        runs = {name: self._calibrate(step) for name, step in steps.items()}
        samples: dict[str, list[float]] = {name: [] for name in steps}
        faults: dict[str, list[float]] = {name: [] for name in steps}
        names = list(steps)
        for repeat in range(self.repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                before = _minor_faults()
                samples[name].append(_ms_per_run(steps[name], runs[name]))
                faults[name].append((_minor_faults() - before) / runs[name])
        return {
            name: {
                "ms": statistics.median(samples[name]),
                "min_ms": min(samples[name]),
                "samples_ms": samples[name],
                "runs_per_repeat": runs[name],
                # Minor page faults per run: memory the step touched for the first time (freshly
                # mapped). Large temporaries freed and re-allocated every step show up here.
                "minor_faults": statistics.median(faults[name]),
            }
            for name in steps
        }

    def _calibrate(self, step: Callable[[], Any]) -> int:
        """Warm ``step`` up and return how many runs make one repeat."""
        for _ in range(self.warmup):
            step()
        one = _ms_per_run(step, 1) / 1e3
        return max(self.min_runs, min(self.max_runs, round(self.target_s / max(one, 1e-9))))


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _ms_per_run(step: Callable[[], Any], runs: int) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        step()
    return (time.perf_counter() - start) / runs * 1e3


@contextlib.contextmanager
def fresh_world() -> Iterator[paddle.static.Executor]:
    """A new scope, unique-name generator and executor, so variants share no state or caches."""
    with paddle.static.scope_guard(paddle.static.Scope()), paddle.utils.unique_name.guard():
        yield paddle.static.Executor(PLACE)


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def peak_rss_delta(into: dict[str, float | None], key: str) -> Iterator[None]:
    """Record in ``into[key]`` how far the peak RSS rose above the starting RSS, in MiB."""
    start = _proc_status_kb("VmRSS")
    can_reset = _reset_peak_rss()
    yield
    peak = _proc_status_kb("VmHWM")
    into[key] = (peak - start) / 1024 if can_reset and start is not None and peak is not None else None


def scope_tensor_bytes() -> dict[str, int] | None:
    """Bytes of every initialised dense tensor in the global scope; None if the scope cannot list names."""
    scope = paddle.static.global_scope()
    if not hasattr(scope, "local_var_names"):  # Paddle 2.6
        return None
    sizes = {}
    for name in scope.local_var_names():
        try:
            tensor = scope.find_var(name).get_tensor()
        except ValueError:  # feed and fetch holders are not dense tensors
            continue
        if tensor._is_initialized():
            sizes[name] = tensor._numel() * np.dtype(convert_dtype(tensor._dtype())).itemsize
    return sizes


def host_allocated_bytes() -> int:
    """Bytes currently allocated by Paddle's CPU allocator."""
    return int(core.host_memory_stat_current_value("Allocated", 0))


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The scope and the allocator before an EMA was added, to measure the state it adds."""

    scope: dict[str, int] | None
    allocated: int

    @classmethod
    def now(cls) -> Baseline:
        return cls(scope_tensor_bytes(), host_allocated_bytes())

    def extra_state(self, n_params: int) -> dict[str, Any]:
        """State added since: new scope tensors (where the scope lists names) and the allocator's delta."""
        allocated = host_allocated_bytes() - self.allocated
        state: dict[str, Any] = {
            "allocator_bytes": allocated,
            "allocator_bytes_per_param": allocated / n_params,
            "scope_bytes": None,
            "scope_tensors": None,
            "scope_bytes_per_param": None,
        }
        scope = scope_tensor_bytes()
        if scope is not None and self.scope is not None:
            new = [size for name, size in scope.items() if name not in self.scope]
            state.update(scope_bytes=sum(new), scope_tensors=len(new))
            state["scope_bytes_per_param"] = sum(new) / n_params
        return state


def count_ops(types: Sequence[str], kinds: set[str]) -> int:
    return sum(t in kinds for t in types)


# ------------------------------------------------------------------------------------- variants


@dataclasses.dataclass
class Variant:
    """A built program with its own scope and executor, ready to be stepped."""

    scope: Any
    exe: paddle.static.Executor
    program: Any
    feed: dict[str, np.ndarray]
    fetch: list[Any]
    ema: Any = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def step(self) -> None:
        self.exe.run(self.program, feed=self.feed, fetch_list=self.fetch, scope=self.scope)

    def apply_restore(self) -> None:
        with paddle.static.scope_guard(self.scope), self.ema.apply(self.exe):
            pass


def build_train(model: str, flavor: str | None) -> Variant:
    """A training step (forward, backward, SGD) with the EMA ``flavor`` appended, or without EMA."""
    main, startup = paddle.static.Program(), paddle.static.Program()
    with fresh_world() as exe:
        with paddle.static.program_guard(main, startup):
            feed, loss = MODELS[model]()
            test_program = clone_for_test(main)
            test_op_count = len(test_program.global_block().ops)
            paddle.optimizer.SGD(LEARNING_RATE).minimize(loss)
            before = op_types(main)
            if flavor is not None:
                FLAVORS[flavor]()
            after = op_types(main)
        exe.run(startup)
        variant = Variant(paddle.static.global_scope(), exe, main, feed, [loss])
    variant.info["ops_added"] = len(after) - len(before)
    if flavor == "paddle_ema":
        variant.info["checks"] = clone_checks(main, test_program, test_op_count, before, after)
    return variant


def clone_checks(
    main: Any, test_program: Any, test_op_count: int, before: list[str], after: list[str]
) -> dict[str, Any]:
    """Whether test programs hold EMA ops: ops of a type that only update() emitted.

    A test program cloned before minimize must hold none and be left alone by update(). In the legacy
    IR, a ``clone(for_test=True)`` made after update() is checked too.
    """
    ema_kinds = set((collections.Counter(after) - collections.Counter(before)).keys()) - set(before)
    test_types = op_types(test_program)
    checks: dict[str, Any] = {
        "ema_op_types": sorted(ema_kinds),
        "test_clone_ema_ops": count_ops(test_types, ema_kinds),
        "test_clone_ema_free": bool(
            ema_kinds and count_ops(test_types, ema_kinds) == 0 and len(test_types) == test_op_count
        ),
        "clone_after_update_ema_free": None,
    }
    if not in_pir():
        late_clone = op_types(main.clone(for_test=True))
        checks["clone_after_update_ema_free"] = count_ops(late_clone, ema_kinds) == 0
    return checks


def build_ema_only(shapes: Sequence[tuple[int, ...]], flavor: str, warmup: int) -> Variant:
    """A program holding only the EMA update over parameters of ``shapes``; measures the EMA's state.

    The EMA's state goes to its own startup program, so the scope before and after it can be compared:
    after ``warmup`` update steps, inside ``apply`` and after ``restore``.
    """
    main, startup, ema_startup = paddle.static.Program(), paddle.static.Program(), paddle.static.Program()
    n_params = sum(math.prod(shape) for shape in shapes)
    with fresh_world() as exe:
        with paddle.static.program_guard(main, startup):
            ones = paddle.nn.initializer.Constant(1.0)
            for i, shape in enumerate(shapes):
                # Not trainable: no optimizer updates them, and paddle_ema's update() requires an
                # optimizer's update of every trainable parameter it averages to come first.
                attr = paddle.ParamAttr(name=f"p{i}", initializer=ones, trainable=False)
                paddle.static.create_parameter(list(shape), "float32", attr=attr)
        exe.run(startup)
        baseline = Baseline.now()
        with paddle.static.program_guard(main, ema_startup):
            ema = FLAVORS[flavor]()
        exe.run(ema_startup)
        variant = Variant(paddle.static.global_scope(), exe, main, {}, [], ema=ema)
        for _ in range(warmup):
            variant.step()
        state = {"after_update": baseline.extra_state(n_params)}
        if ema is not None:
            with ema.apply(exe):
                state["during_apply"] = baseline.extra_state(n_params)
            state["after_restore"] = baseline.extra_state(n_params)
    variant.info["state"] = state
    return variant


def run_floor(shapes: Sequence[tuple[int, ...]], timer: Timer) -> dict[str, Any]:
    """numpy's time to read a parameter and an average and write the average (12 bytes per parameter)."""
    params = [np.full(shape, 1e-3, dtype=np.float32) for shape in shapes]
    averages = [np.zeros(shape, dtype=np.float32) for shape in shapes]
    total = sum(p.size for p in params)
    flat_param, flat_average = np.full(total, 1e-3, dtype=np.float32), np.zeros(total, dtype=np.float32)

    def per_tensor() -> None:
        for param, average in zip(params, averages):
            np.add(param, average, out=average)

    return timer(
        {
            "floor_numpy": per_tensor,
            "floor_numpy_contiguous": lambda: np.add(flat_param, flat_average, out=flat_average),
        }
    )


# ------------------------------------------------------------------------------------ per model


def model_shapes(model: str) -> list[tuple[int, ...]]:
    """Shapes of the parameters an EMA averages in ``model``'s training program."""
    main = paddle.static.Program()
    with paddle.utils.unique_name.guard(), paddle.static.program_guard(main, paddle.static.Program()):
        MODELS[model]()
    return [tuple(int(d) for d in p.shape) for p in averaged_params(main)]


def apply_key(flavor: str) -> str:
    return "apply_restore" if flavor == "paddle_ema" else f"apply_restore_{flavor}"


def bench_model(model: str, flavors: Sequence[str], timer: Timer) -> dict[str, Any]:
    """Build each group of variants side by side (recording each one's peak RSS rise), then time it."""
    shapes = model_shapes(model)
    rss: dict[str, float | None] = {}
    train: dict[str, Variant] = {}
    for flavor in (None, *flavors):
        key = f"train_{flavor or 'no_ema'}"
        with peak_rss_delta(rss, key):
            train[key] = build_train(model, flavor)
            train[key].step()
    timings = timer({key: variant.step for key, variant in train.items()})
    losses = {key: variant.exe.run(variant.program, feed=variant.feed, fetch_list=variant.fetch,
                                   scope=variant.scope)[0] for key, variant in train.items()}
    finite = {key: bool(np.isfinite(np.asarray(loss)).all()) for key, loss in losses.items()}
    if not all(finite.values()):
        raise RuntimeError(f"{model}: a training step ran on non-finite values after timing: {finite}")
    ops_added = {flavor: train[f"train_{flavor}"].info["ops_added"] for flavor in flavors}
    checks = train["train_paddle_ema"].info["checks"]
    del train  # free the training programs' memory before the next group
    ema_only: dict[str, Variant] = {}
    for flavor in flavors:
        with peak_rss_delta(rss, f"ema_only_{flavor}"):
            ema_only[flavor] = build_ema_only(shapes, flavor, timer.warmup)
    timings.update(timer({f"ema_only_{flavor}": variant.step for flavor, variant in ema_only.items()}))
    # One at a time, paddle_ema first: on Paddle 2.6, once the class's apply has run, every other
    # apply + restore in the process runs several times slower for as long as the class's variant lives.
    for flavor, variant in ema_only.items():
        if variant.ema is not None:
            timings.update(timer({apply_key(flavor): variant.apply_restore}))
    state = {flavor: variant.info["state"] for flavor, variant in ema_only.items()}
    del ema_only
    timings.update(run_floor(shapes, timer))
    return {
        "tensors": len(shapes),
        "params": sum(math.prod(shape) for shape in shapes),
        "ops_added_to_train_program": ops_added,
        "state": state,
        "checks": checks,
        "train_loss_finite_after_timing": finite,
        "peak_rss_delta_mib": rss,
        "timings": timings,
    }


# ------------------------------------------------------------------------------------------ CLI


def parse_args(description: str = __doc__.splitlines()[0], models=MODELS,
               default_out: str = "benchmarks/results/<mode>.json") -> argparse.Namespace:
    """The options of both benchmarks (bench_dygraph.py passes its own description, models, output)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, help=f"JSON output (default: {default_out})")
    parser.add_argument("--repeats", type=int, default=9, help="repeats per timing; 9 or more to commit")
    parser.add_argument("--quick", action="store_true", help="few short runs per repeat (smoke test)")
    parser.add_argument("--models", nargs="+", choices=sorted(models), default=list(models))
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform reports."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_and_run(args: argparse.Namespace) -> dict[str, Any]:
    """What every benchmark's JSON records of the software, the machine and the run's options."""
    return {
        "paddle_version": paddle.__version__,
        "paddle_ema_version": paddle_ema.__version__,
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "machine": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "quick": args.quick,
        "decay": DECAY,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def environment(args: argparse.Namespace, skipped: dict[str, Any]) -> dict[str, Any]:
    return {"mode": mode_name(), "ir": "pir" if in_pir() else "legacy", **machine_and_run(args),
            "skipped": skipped}


def main() -> None:
    args = parse_args()
    paddle.enable_static()
    if args.quick:
        timer = Timer(repeats=args.repeats, warmup=2, target_s=0.03, min_runs=2)
    else:
        timer = Timer(repeats=args.repeats, warmup=5, target_s=0.25, min_runs=5)
    reason = paddle_class_skip_reason()
    flavors = ["paddle_ema", "4op"] + (["paddle_class"] if reason is None else [])
    skipped = {} if reason is None else {"variants": PADDLE_CLASS_VARIANTS, "reason": reason}
    results = environment(args, skipped)
    results["models"] = {}
    for model in args.models:
        results["models"][model] = bench_model(model, flavors, timer)
        summary = {k: round(v["ms"], 3) for k, v in results["models"][model]["timings"].items()}
        print(f"{mode_name()} {model}: {summary}", flush=True)
    out = args.out or RESULTS_DIR / f"{mode_name()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
