"""Show that PIR's executor prints the whole program on every run (Paddle 3.x, FLAGS_enable_pir_api=1).

``Executor.run`` looks its cached interpreter up by a key that ``_get_strong_program_cache_key_for_new_exe``
builds with ``str(program)``, so every run of a PIR program prints it: a cost that grows with the
number of ops even when they do nothing heavy. This script builds a training program (256 fc layers
of 64x64 + SGD: ~2000 ops), then times one run and one ``str(program)``, interleaved, median of
repeats, and again with 500 more elementwise ops on small tensors appended. Prints ms per run and
the share spent printing. ``FLAGS_enable_pir_api=1 python benchmarks/upstream/pir_cache_key.py``
"""

from __future__ import annotations

import functools
import statistics
import time

import numpy as np
import paddle

paddle.enable_static()
DEPTH, WIDTH, BATCH, EXTRA_OPS, REPEATS = 256, 64, 8, 500, 9


def build(extra_ops: int):
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup):
        h = x = paddle.static.data("x", [BATCH, WIDTH], "float32")
        for _ in range(DEPTH):
            h = paddle.static.nn.fc(h, WIDTH)
        loss = paddle.mean(paddle.square(h))
        paddle.optimizer.SGD(1e-4).minimize(loss)
        small = paddle.static.create_parameter([4], "float32", attr=paddle.ParamAttr(trainable=False))
        for _ in range(extra_ops):  # cheap in-place ops, as an EMA over small tensors would add
            paddle._C_ops.scale_(small, 1.0, 0.0, True)
    return main, startup, x, loss


def median_ms(step, runs: int) -> float:
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(runs):
            step()
        samples.append((time.perf_counter() - start) / runs * 1e3)
    return statistics.median(samples)


def main() -> None:
    if not paddle.framework.in_pir_mode():
        raise SystemExit("run under PIR: FLAGS_enable_pir_api=1 (Paddle 3.x)")
    exe = paddle.static.Executor(paddle.CPUPlace())
    feed = {"x": np.random.default_rng(0).standard_normal((BATCH, WIDTH)).astype("float32")}
    print(f"Paddle {paddle.__version__} PIR, {DEPTH} fc layers {WIDTH}x{WIDTH} + SGD, CPU; "
          f"median of {REPEATS} repeats")
    for extra in (0, EXTRA_OPS):
        with paddle.static.scope_guard(paddle.static.Scope()):
            program, startup, x, loss = build(extra)
            exe.run(startup)
            step = functools.partial(exe.run, program, feed=feed, fetch_list=[loss])
            for _ in range(5):
                step()
            run_ms = median_ms(step, 10)
            print_ms = median_ms(functools.partial(str, program), 10)
        ops = len(program.global_block().ops)
        print(f"  {ops:5d} ops: run {run_ms:7.2f} ms, str(program) {print_ms:6.2f} ms "
              f"({print_ms / run_ms:.0%} of the run)")


if __name__ == "__main__":
    main()
