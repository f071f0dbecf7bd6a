"""The measurements behind ModelEMA's CPU grouping rule (``paddle_ema._flat.CPU_POLICY``).

1. Paddle's CPU allocator by block size: page faults and time of one ``paddle.scale`` whose output
   (a new block) is freed before the next, for 1 to 4 MiB. Blocks from about 2 MiB (3 MiB in every run
   seen, 2 MiB in some) are mapped afresh
   and faulted in page by page every time; smaller ones are reused. So the groups' temporaries (a
   slice's concatenated tensors, an apply's new values) are made in slices of 1 MiB.
2. ModelEMA.update() on bench_dygraph.py's ``yolo`` and ``fc512`` models with the CPU rule (tensors up
   to 32,768 elements grouped) against grouping every float32 tensor (in 1 MiB slices): median ms
   [quartiles] over alternating repeats, and the kernels one update launches.

    PYTHONPATH=$PWD python benchmarks/flat_policy.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import resource
import time

import bench_dygraph
import numpy as np
import paddle
from kernels import count_kernels

import paddle_ema
from paddle_ema import _flat


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def allocator_table(runs: int = 200) -> None:
    print(f"Paddle {paddle.__version__}: paddle.scale into a new block, {runs} runs each")
    print("| block | faults per run | us per run |\n|---:|---:|---:|")
    for kib in (1024, 1536, 2048, 3072, 4096):
        x = paddle.ones([kib * 256])  # float32: 256 values a KiB
        for _ in range(5):
            paddle.scale(x, 2.0)
        faults, start = minor_faults(), time.perf_counter()
        for _ in range(runs):
            paddle.scale(x, 2.0)
        elapsed = (time.perf_counter() - start) / runs * 1e6
        print(f"| {kib} KiB | {(minor_faults() - faults) / runs:.0f} | {elapsed:.1f} |")


def grouping_table(repeats: int, calls: int = 20) -> None:
    cpu_rule = _flat.CPU_POLICY
    group_all = _flat.Policy(max_numel=2**40, slice_bytes=cpu_rule.slice_bytes)
    print(f"\nPaddle {paddle.__version__}: ModelEMA.update(), {repeats} alternating repeats of {calls} calls")
    print("| model | grouped | ms [quartiles] | kernels |\n|---|---|---:|---:|")
    for name in ("yolo", "fc512"):
        emas = {}
        for label, rule in (("up to 32,768 elements", cpu_rule), ("every float32 tensor", group_all)):
            _flat.CPU_POLICY = rule  # read when ModelEMA groups, at construction
            try:
                model = bench_dygraph.build_model(name)[0]
                ema = paddle_ema.ModelEMA(model, 0.999)
            finally:
                _flat.CPU_POLICY = cpu_rule
            ema.update()
            emas[label] = (model, ema, count_kernels(ema.update)["kernels"])
        times: dict[str, list[float]] = {label: [] for label in emas}
        for _ in range(repeats):
            for label, (_, ema, _) in emas.items():
                start = time.perf_counter()
                for _ in range(calls):
                    ema.update()
                times[label].append((time.perf_counter() - start) / calls * 1e3)
        for label, (_, _, kernels) in emas.items():
            q1, median, q3 = np.percentile(times[label], [25, 50, 75])
            print(f"| {name} | {label} | {median:.3f} [{q1:.3f} .. {q3:.3f}] | {kernels} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    allocator_table()
    grouping_table(args.repeats)


if __name__ == "__main__":
    main()
