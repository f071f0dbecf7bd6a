"""Benchmark paddle_ema.PostHocEMA: its update against two ModelEMAs, and a snapshot's write time.

For the dygraph benchmark's models it times, in the same run (medians over repeats, ms per call, on
``CPUPlace`` in fp32): ``PostHocEMA(model, (0.05, 0.10)).update()`` on calls that write no snapshot,
the updates of two ``ModelEMA(model, 0.999)`` (what tracking two widths costs with the plain class),
and the write of one snapshot set (both widths, float32, ``paddle.save`` then an atomic rename) into a
temporary directory. Run: ``python benchmarks/bench_posthoc.py [--quick] [--models fc64 ...]``.
"""

from __future__ import annotations

import json
import tempfile
import time
from typing import Any

import bench_dygraph
import bench_ema
import paddle
from bench_ema import Timer

import paddle_ema

RESULTS_DIR = bench_dygraph.RESULTS_DIR


def bench_model(name: str, timer: Timer, snapshot_repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        posthoc_model, plain_model = bench_dygraph.build_model(name)[0], bench_dygraph.build_model(name)[0]
        # snapshot_every is large so the timed updates write none.
        posthoc = paddle_ema.PostHocEMA(posthoc_model, (0.05, 0.10), snapshot_dir=folder,
                                        snapshot_every=10**9)
        plain = [paddle_ema.ModelEMA(plain_model, 0.999) for _ in range(2)]

        def two_model_emas() -> None:
            for ema in plain:
                ema.update()

        timings = timer({"update_posthoc": posthoc.update, "update_two_model_emas": two_model_emas})
        state = posthoc_model.state_dict()
        sizes = {"tensors": len(state), "params": sum(int(t.size) for t in state.values())}
        writes = []
        for _ in range(snapshot_repeats):
            start = time.perf_counter()
            posthoc._write_snapshots()
            writes.append((time.perf_counter() - start) * 1e3)
    writes.sort()
    timings["snapshot_write"] = {"ms": writes[len(writes) // 2], "min_ms": writes[0], "samples_ms": writes}
    ratio = timings["update_posthoc"]["ms"] / timings["update_two_model_emas"]["ms"]
    return {**sizes, "timings": timings, "derived": {"posthoc_over_two_model_emas": ratio}}


def main() -> None:
    args = bench_ema.parse_args(__doc__.splitlines()[0], bench_dygraph.DYGRAPH_MODELS,
                                "results/posthoc-<major.minor>.json")
    paddle.disable_static()
    paddle.set_device("cpu")
    if args.quick:
        timer = Timer(repeats=args.repeats, warmup=2, target_s=0.03, min_runs=2)
    else:
        timer = Timer(repeats=args.repeats, warmup=5, target_s=0.25, min_runs=5)
    results = {"kind": "posthoc", "mode": f"paddle{paddle.__version__}-dygraph",
               **bench_ema.machine_and_run(args), "models": {}}
    for name in args.models:
        results["models"][name] = bench_model(name, timer, snapshot_repeats=max(3, args.repeats))
        row = results["models"][name]
        summary = {k: round(v["ms"], 3) for k, v in row["timings"].items()}
        print(f"{results['mode']} {name} ({row['tensors']} tensors, {row['params']} values): {summary}, "
              f"PostHocEMA / two ModelEMAs {row['derived']['posthoc_over_two_model_emas']:.2f}", flush=True)
    major_minor = ".".join(paddle.__version__.split(".")[:2])
    out = args.out or RESULTS_DIR / f"posthoc-{major_minor}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
