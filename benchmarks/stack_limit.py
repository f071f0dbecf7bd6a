"""A/B of the stacking limit: how large a parameter's average may be and still be stacked with others.

paddle_ema stacks the averages of parameters of up to ``paddle_ema._names.stack_max_numel()`` elements
(one op per stack, plus one concatenation pass). This script builds, in the Paddle mode of the
process, each model's training step without EMA and with paddle_ema under each candidate limit, and
EMA-only programs under each limit, all side by side, and times them in turn (``bench_ema.Timer``:
median of repeats). It prints ms per step, what the EMA adds to the training step, the ops it adds,
and minor page faults per step. Results are printed, not written: they chose the limit in
``_names.stack_max_numel`` (see its docstring).

    FLAGS_enable_pir_api=1 PYTHONPATH=$PWD python benchmarks/stack_limit.py --models fc64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import paddle

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ema  # noqa: E402

from paddle_ema import _names  # noqa: E402

LIMITS = (1024, 4096, 32768, 262144)


def built_with_limit(limit: int, build, *args, **kwargs):
    """``build(*args, **kwargs)`` with the stacking limit set to ``limit``; the library's own after."""
    original = _names.stack_max_numel
    _names.stack_max_numel = lambda: limit
    try:
        return build(*args, **kwargs)
    finally:
        _names.stack_max_numel = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(bench_ema.MODELS), default=["fc64"])
    parser.add_argument("--limits", nargs="+", type=int, default=list(LIMITS))
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    paddle.enable_static()
    timer = bench_ema.Timer(repeats=args.repeats, warmup=5, target_s=0.25, min_runs=5)
    print(f"{bench_ema.mode_name()}: library limit {_names.stack_max_numel()} elements")
    for model in args.models:
        shapes = bench_ema.model_shapes(model)
        train = {"no EMA": bench_ema.build_train(model, None)}
        ema_only = {}
        for limit in args.limits:
            train[f"limit {limit}"] = built_with_limit(limit, bench_ema.build_train, model, "paddle_ema")
            ema_only[f"limit {limit}"] = built_with_limit(
                limit, bench_ema.build_ema_only, shapes, "paddle_ema", warmup=3)
        for title, variants in (("training step", train), ("EMA only", ema_only)):
            timings = timer({name: variant.step for name, variant in variants.items()})
            base = timings.get("no EMA", {}).get("ms")
            print(f"{model}, {title}:")
            for name, timing in timings.items():
                added = "" if base is None or name == "no EMA" else f"  adds {timing['ms'] - base:+6.2f} ms"
                ops = variants[name].info.get("ops_added")
                ops_text = "" if ops is None or name == "no EMA" else f", {ops} ops"
                print(f"  {name:14s} {timing['ms']:8.2f} ms [{timing['min_ms']:.2f} min]{added}{ops_text}, "
                      f"{timing['minor_faults']:.0f} faults/step")


if __name__ == "__main__":
    main()
