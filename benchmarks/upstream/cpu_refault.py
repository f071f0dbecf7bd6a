"""Show that a large per-run temporary of a static program is page-faulted back in on every run (CPU).

A program concatenates 256 float32 tensors of 64x64 (4 MB) and averages the result, run many times; the
same program writing the concatenation into a persistable variable, which keeps its allocation, is
timed beside it (interleaved, median of repeats). Prints ms per run and minor page faults per run.
Runs in the Paddle mode of the process: set FLAGS_enable_pir_api=0|1 before starting it (never on
Paddle 2.6). Nothing else is needed: ``python benchmarks/upstream/cpu_refault.py``.
"""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np
import paddle

paddle.enable_static()
TENSORS, SIDE, RUNS, REPEATS = 256, 64, 50, 9


def build(persistent: bool) -> tuple[paddle.static.Program, paddle.static.Program, object]:
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup):
        parts = [
            paddle.static.create_parameter(
                [SIDE, SIDE], "float32", attr=paddle.ParamAttr(trainable=False),
                default_initializer=paddle.nn.initializer.Constant(1.0),
            )
            for _ in range(TENSORS)
        ]
        if not persistent:
            stacked = paddle.concat(parts, axis=0)
        elif paddle.framework.in_pir_mode():
            stacked = paddle.concat(parts, axis=0)
            stacked.persistable = True
            paddle._pir_ops.set_persistable_value(stacked, "kept_concat")
        else:
            block = main.global_block()
            stacked = block.create_var(
                name="kept_concat", shape=[TENSORS * SIDE, SIDE], dtype="float32", persistable=True
            )
            block.append_op(type="concat", inputs={"X": parts}, outputs={"Out": [stacked]},
                            attrs={"axis": 0})
        total = paddle.mean(stacked)  # paddle.sum rejects legacy Variables on Paddle 3.3
    return main, startup, total


def main() -> None:
    exe = paddle.static.Executor(paddle.CPUPlace())
    variants = {}
    for persistent in (False, True):
        scope = paddle.static.Scope()
        with paddle.static.scope_guard(scope):
            main_program, startup, total = build(persistent)
            exe.run(startup)
        variants["persistable output" if persistent else "temporary"] = (main_program, scope, total)
    samples = {name: ([], []) for name in variants}
    for program, scope, total in variants.values():
        for _ in range(10):
            exe.run(program, scope=scope, fetch_list=[total])
    for _ in range(REPEATS):
        for name, (program, scope, total) in variants.items():
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            for _ in range(RUNS):
                exe.run(program, scope=scope, fetch_list=[total])
            samples[name][0].append((time.perf_counter() - start) / RUNS * 1e3)
            samples[name][1].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / RUNS)
    mode = "pir" if paddle.framework.in_pir_mode() else "legacy"
    print(f"Paddle {paddle.__version__} {mode}: concat of {TENSORS} x [{SIDE}, {SIDE}] float32 "
          f"({TENSORS * SIDE * SIDE * 4 / 2**20:.0f} MiB), then mean; median of {REPEATS} x {RUNS} runs")
    for name, (ms, faults) in samples.items():
        print(f"  {name:20s} {statistics.median(ms):7.3f} ms/run  "
              f"{statistics.median(faults):7.0f} minor faults/run")
    np.testing.assert_allclose(
        *[exe.run(p, scope=s, fetch_list=[t])[0] for p, s, t in variants.values()]
    )


if __name__ == "__main__":
    main()
