"""A/B of paddle_ema's dygraph ModelEMA against an earlier revision of itself, side by side in one process.

The dygraph twin of compare_versions.py: it imports the package as it was at a git revision (copied
out of git under another name by ``compare_versions.import_revision``, so both versions live in one
process) and, for each model of bench_dygraph.py, times in turn (``bench_ema.Timer``: every repeat
times each variant once, in rotating order):

* ``ModelEMA.update()`` of the working tree and of the revision, each on its own copy of the model;
* one ``with ema.apply(): pass`` of each (after the updates, so real averages are swapped in);
* the training step (bench_dygraph.py's: forward, backward, SGD, ``clear_grad``) without EMA and
  followed by each version's update, each on its own model.

It prints each time's median and interquartile range over the repeats, and the ratio revision /
working tree taken repeat by repeat (both timed moments apart, so the machine's drift cancels): its
median and quartiles. What an EMA adds to a training step is paired the same way with the step
without EMA of the same repeat. Then it counts the dygraph kernels one update and one apply + restore
of each version launch (``kernels.count_kernels``). It prints; it writes nothing unless ``--json``
is given. Release commits: 0.4.0 is dde492e (``git log --oneline``).

    PYTHONPATH=$PWD python benchmarks/compare_dygraph.py dde492e --models fc64 yolo
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

import paddle

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dygraph  # noqa: E402
import bench_ema  # noqa: E402
import compare_versions  # noqa: E402
from kernels import count_kernels, jsonable  # noqa: E402

import paddle_ema  # noqa: E402

TREE, REVISION = "working tree", "revision"


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile of ``values`` (all three the value if only one)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4)
    return q1, median, q3


def ratios(timings: dict[str, dict[str, Any]], numerator: str, denominator: str) -> list[float]:
    """``numerator``'s time over ``denominator``'s, repeat by repeat."""
    pairs = zip(timings[numerator]["samples_ms"], timings[denominator]["samples_ms"])
    return [a / b for a, b in pairs]


def summary(timing: dict[str, Any]) -> dict[str, float]:
    q1, median, q3 = quartiles(timing["samples_ms"])
    return {"ms": median, "q1_ms": q1, "q3_ms": q3}


def fmt_time(timing: dict[str, float], digits: int = 3) -> str:
    return f"{timing['ms']:.{digits}f} ms [{timing['q1_ms']:.{digits}f} .. {timing['q3_ms']:.{digits}f}]"


def fmt_ratio(values: Sequence[float]) -> str:
    q1, median, q3 = quartiles(values)
    return f"{median:.2f} [{q1:.2f} .. {q3:.2f}]"


def emas(name: str, revision: ModuleType) -> dict[str, tuple[paddle.nn.Layer, Any]]:
    """Each version's ModelEMA on its own (untrained, identically seeded) copy of model ``name``."""
    result = {}
    for label, module in ((TREE, paddle_ema), (REVISION, revision)):
        model = bench_dygraph.build_model(name)[0]
        result[label] = (model, module.ModelEMA(model, bench_dygraph.DECAY))
    return result


def trainers(name: str, revision: ModuleType) -> dict[str, bench_dygraph.Trainer]:
    """The training step of model ``name`` without EMA and followed by each version's update."""
    variants = {"no EMA": bench_dygraph.Trainer(*bench_dygraph.build_model(name))}
    for label, module in ((TREE, paddle_ema), (REVISION, revision)):
        model, x = bench_dygraph.build_model(name)
        variants[label] = bench_dygraph.Trainer(model, x, module.ModelEMA(model, bench_dygraph.DECAY).update)
    return variants


def timed_pair(timer: bench_ema.Timer, steps: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Time both versions' ``steps`` in one group; their summaries and the per-repeat ratios."""
    timings = timer(steps)
    return {
        **{label: summary(timings[label]) for label in steps},
        "revision_over_tree": ratios(timings, REVISION, TREE),
    }


def compare_model(name: str, timer: bench_ema.Timer, revision: ModuleType) -> dict[str, Any]:
    """Time and count one model's updates, apply + restore and training steps; print and return them."""
    result: dict[str, Any] = {}
    pairs = emas(name, revision)
    sizes = bench_dygraph.model_sizes(pairs[TREE][0])
    print(bench_dygraph.model_summary(name, sizes), flush=True)
    result["update"] = timed_pair(timer, {label: ema.update for label, (_, ema) in pairs.items()})
    result["apply_restore"] = timed_pair(
        timer, {label: bench_dygraph.apply_restore(ema) for label, (_, ema) in pairs.items()}
    )
    for key, title in (("update", "update"), ("apply_restore", "apply + restore")):
        timing = result[key]
        print(f"  {title:16s} working tree {fmt_time(timing[TREE])}, revision {fmt_time(timing[REVISION])}; "
              f"revision / working tree {fmt_ratio(timing['revision_over_tree'])}", flush=True)
    # Counted before the training group, on EMAs the timer has warmed; the profiler is off while timing.
    result["kernels"] = {
        label: {
            "update": jsonable(count_kernels(ema.update)),
            "apply_restore": jsonable(count_kernels(bench_dygraph.apply_restore(ema))),
        }
        for label, (_, ema) in pairs.items()
    }
    del pairs
    for key, title in (("update", "update"), ("apply_restore", "apply + restore")):
        tree, rev = (result["kernels"][label][key] for label in (TREE, REVISION))
        print(f"  kernels, {title + ':':16s} working tree {tree['kernels']} "
              f"({bench_dygraph.ops_cell(tree)}), "
              f"revision {rev['kernels']} ({bench_dygraph.ops_cell(rev)})", flush=True)
    variants = trainers(name, revision)
    timings = timer({label: variant.step for label, variant in variants.items()})
    del variants
    train: dict[str, Any] = {label: summary(timing) for label, timing in timings.items()}
    base = timings["no EMA"]["samples_ms"]
    added = {}
    for label in (TREE, REVISION):
        added[label] = [a - b for a, b in zip(timings[label]["samples_ms"], base)]
        q1, median, q3 = quartiles(added[label])
        train[label].update(added_ms=median, added_q1_ms=q1, added_q3_ms=q3)
    train["revision_over_tree"] = ratios(timings, REVISION, TREE)
    result["train"] = train
    print(f"  training step    no EMA {fmt_time(train['no EMA'], 2)}", flush=True)
    for label in (TREE, REVISION):
        t = train[label]
        print(f"    + {label:12s} {fmt_time(t, 2)}; adds {t['added_ms']:+.2f} ms "
              f"[{t['added_q1_ms']:+.2f} .. {t['added_q3_ms']:+.2f}] (paired with no EMA)")
    added_tree, added_revision = train[TREE]["added_ms"], train[REVISION]["added_ms"]
    added_ratio = f"{added_revision / added_tree:.2f}" if added_tree > 0 else "n/a (working tree adds <= 0)"
    print(f"    revision / working tree: step {fmt_ratio(train['revision_over_tree'])}, added time "
          f"{added_ratio}", flush=True)
    return {**sizes, **result}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="the git revision to compare with (e.g. dde492e, 0.4.0's commit)")
    parser.add_argument("--models", nargs="+", choices=sorted(bench_dygraph.DYGRAPH_MODELS), default=["fc64"])
    parser.add_argument("--repeats", type=int, default=31, help="repeats per timing (default 31)")
    parser.add_argument("--quick", action="store_true", help="few short runs per repeat (smoke test)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    paddle.disable_static()
    paddle.set_device("cpu")
    if args.quick:
        timer = bench_ema.Timer(repeats=args.repeats, warmup=2, target_s=0.03, min_runs=2)
    else:
        timer = bench_ema.Timer(repeats=args.repeats, warmup=5, target_s=0.25, min_runs=5)
    results: dict[str, Any] = {
        "paddle_version": paddle.__version__, "tree_version": paddle_ema.__version__,
        "revision": args.revision, "repeats": args.repeats, "quick": args.quick, "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        old = compare_versions.import_revision(args.revision, Path(tmp))
        results["revision_version"] = old.__version__
        print(f"Paddle {paddle.__version__} dygraph: paddle_ema {paddle_ema.__version__} (working tree) "
              f"against {old.__version__} ({args.revision}); medians of {args.repeats} repeats "
              "[quartiles]", flush=True)
        for name in args.models:
            results["models"][name] = compare_model(name, timer, old)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
