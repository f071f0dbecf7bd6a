"""Split the cost of one ``Executor.run`` under PIR and under the legacy IR (Paddle 3.x, CPU).

For each program it times, interleaved, median of repeats: the whole ``exe.run``; the cache key
``Executor.run`` computes first (``paddle/base/executor.py:_get_strong_program_cache_key_for_new_exe``:
``str(program)`` under PIR, the cached ``program.desc.cached_hash_str()`` in the legacy IR); and the
cached interpreter's own run (the ``_StandaloneExecutor`` that ``Executor.run`` finds with that key,
run directly, back to back). The programs: one in-place ``scale`` on a [4] tensor; 100 of them; the 512
parameters of 256 fc layers of 64x64 (+ bias) referenced and one ``scale``; and those 512 parameters
with a stacked moving-average update (each stack's concatenation into a persistable buffer, then
``average += w * (stack - average)``: two ``sgd`` for the weights, one ``lerp`` for the biases), as an
EMA of such a model runs it. Beside them, a numpy floor: ``np.add(param, average, out=average)`` per
parameter tensor, which moves the bytes any such update must move.

Runs each IR in a child process (the IR is fixed when paddle is imported) and prints one table.
``python benchmarks/upstream/pir_run_overhead.py`` (``--repeats N``, default 9)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

DEPTH, WIDTH, SMALL_OPS = 256, 64, 100
SHAPES = [shape for _ in range(DEPTH) for shape in ((WIDTH, WIDTH), (WIDTH,))]
WEIGHT = 1e-3  # 1 - decay


def child(repeats: int) -> dict:
    import numpy as np
    import paddle
    from paddle.base import executor as executor_module

    paddle.enable_static()
    pir = bool(paddle.framework.in_pir_mode())

    def state(name, shape, value=0.0):
        attr = paddle.ParamAttr(name=name, initializer=paddle.nn.initializer.Constant(value),
                                trainable=False)
        return paddle.static.create_parameter(list(shape), "float32", attr=attr)

    def scale_(x):
        if pir:
            paddle._C_ops.scale_(x, 1.0, 0.0, True)
        else:
            x.block.append_op(type="scale", inputs={"X": [x]}, outputs={"Out": [x]}, attrs={"scale": 1.0})

    def sgd_(param, lr, grad):  # param -= lr * grad, in place
        if pir:
            return paddle._C_ops.sgd_(param, lr, grad, None, False)[0]
        param.block.append_op(type="sgd", inputs={"Param": [param], "LearningRate": [lr], "Grad": [grad]},
                              outputs={"ParamOut": [param]}, attrs={"multi_precision": False})
        return param

    def lerp_(x, y, weight):  # x += weight * (y - x), in place
        if pir:
            paddle._C_ops.lerp_(x, y, weight)
        else:
            x.block.append_op(type="lerp", inputs={"X": [x], "Y": [y], "Weight": [weight]},
                              outputs={"Out": [x]})

    def concat_into(members, name):  # a persistable output keeps its memory between runs
        if pir:
            out = paddle.concat(members, axis=0)
            out.persistable = True
            paddle._pir_ops.set_persistable_value(out, name)
            return out
        out = state(name, [sum(m.shape[0] for m in members), *members[0].shape[1:]])
        members[0].block.append_op(type="concat", inputs={"X": members}, outputs={"Out": [out]},
                                   attrs={"axis": 0})
        return out

    def build(small_ops, params, ema):
        main, startup = paddle.static.Program(), paddle.static.Program()
        with paddle.static.program_guard(main, startup):
            small = state("small", [4])
            for _ in range(small_ops):
                scale_(small)
            p = [state(f"p{i}", shape, 1.0) for i, shape in enumerate(SHAPES[:params])]
            if ema:
                w = paddle.full([1], WEIGHT, "float32")
                minus_w = paddle.full([1], -WEIGHT, "float32")
                weights = concat_into(p[0::2], "stack.w")
                biases = concat_into(p[1::2], "stack.b")
                avg_w = state("avg.w", weights.shape)
                avg_b = state("avg.b", biases.shape)
                sgd_(sgd_(avg_w, w, avg_w), minus_w, weights)
                lerp_(avg_b, biases, w)
        return main, startup

    place = paddle.CPUPlace()
    cases = {
        "1 scale": (1, 0, False),
        f"{SMALL_OPS} scale": (SMALL_OPS, 0, False),
        "512 params + 1 scale": (1, len(SHAPES), False),
        "512 params + EMA update": (0, len(SHAPES), True),
    }
    steps, ops = {}, {}
    for label, spec in cases.items():
        scope = paddle.static.Scope()
        exe = paddle.static.Executor(place)
        with paddle.static.scope_guard(scope), paddle.utils.unique_name.guard():
            program, startup = build(*spec)
            exe.run(startup)
        run = functools.partial(exe.run, program, feed={}, fetch_list=[], scope=scope)
        run()
        cache = exe._executor_cache
        if pir:
            interpreter = cache.get_pir_program_and_executor(program, {}, [], "feed", "fetch", place,
                                                             scope, exe.plan)[1]
        else:
            interpreter = cache.get_program_and_executor(program, {}, [], "feed", "fetch", place, scope)[1]
        steps[label] = {
            "run": run,
            "key": functools.partial(executor_module._get_strong_program_cache_key_for_new_exe,
                                     program, scope, {}, []),
            "interpreter": functools.partial(interpreter.run, [], True),
        }
        ops[label] = len(program.global_block().ops)

    params = [np.full(shape, 1.0, np.float32) for shape in SHAPES]
    averages = [np.zeros(shape, np.float32) for shape in SHAPES]

    def floor():
        for param, average in zip(params, averages):
            np.add(param, average, out=average)

    flat = [(label, part, step) for label, parts in steps.items() for part, step in parts.items()]
    flat.append(("numpy floor", "run", floor))
    runs = []
    for _, _, step in flat:  # warm up, and enough runs for ~40 ms a repeat
        for _ in range(3):
            step()
        start = time.perf_counter()
        step()
        runs.append(max(3, min(2000, round(0.04 / max(time.perf_counter() - start, 1e-7)))))
    samples = [[] for _ in flat]
    for repeat in range(repeats):  # interleaved, in a rotating order
        order = list(range(len(flat)))
        order = order[repeat % len(order):] + order[:repeat % len(order)]
        for i in order:
            start = time.perf_counter()
            for _ in range(runs[i]):
                flat[i][2]()
            samples[i].append((time.perf_counter() - start) / runs[i] * 1e3)
    result = {"mode": f"Paddle {paddle.__version__} {'PIR' if pir else 'legacy IR'}", "ops": ops, "ms": {}}
    for (label, part, _), values in zip(flat, samples):
        result["ms"].setdefault(label, {})[part] = statistics.median(values)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.repeats)))
        return
    results = []
    for flag in ("1", "0"):
        env = dict(os.environ, FLAGS_enable_pir_api=flag, GLOG_minloglevel="2")
        out = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats)],
                             env=env, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"CPU, {os.cpu_count()} cores, median of {args.repeats} repeats, ms per run; "
          "rest = run - key - interpreter")
    print(f"| {'mode':22} | {'program':24} | {'ops':>4} | {'run':>6} | {'cache key':>9} "
          f"| {'interpreter':>11} | {'rest':>6} |")
    print(f"|{'-' * 24}|{'-' * 26}|{'-' * 5}:|{'-' * 7}:|{'-' * 10}:|{'-' * 12}:|{'-' * 7}:|")
    for result in results:
        for label, ms in result["ms"].items():
            if label == "numpy floor":
                continue
            rest = ms["run"] - ms["key"] - ms["interpreter"]
            print(f"| {result['mode']:22} | {label:24} | {result['ops'][label]:4d} | {ms['run']:6.3f} "
                  f"| {ms['key']:9.3f} | {ms['interpreter']:11.3f} | {rest:6.3f} |")
    floors = ", ".join(f"{r['ms']['numpy floor']['run']:.3f}" for r in results)
    print(f"numpy floor for the 512 parameters (np.add per tensor, 12 bytes a parameter): {floors} ms "
          "(in each child)")


if __name__ == "__main__":
    main()
