"""A/B of paddle_ema against an earlier revision of itself, side by side in one process.

A speed claim "N times faster than version X" is only as good as the machine's steadiness between two
runs, which on a busy 2-core machine is a few ms on a 30 ms training step: more than what the EMA
adds. This script imports the package as it was at a git revision (copied out of git under another
name, so both versions live in one process), builds each model's training step without EMA, with the
working tree's paddle_ema and with the revision's, and EMA-only programs of both, and times them in
turn (``bench_ema.Timer``: every repeat times each variant once, in rotating order). The overhead of
an EMA is then taken repeat by repeat (its step minus the step without EMA timed in the same repeat, moments
apart), which cancels the machine's drift; the report gives the median of those paired differences and
their interquartile range. It prints; it writes nothing. Release commits: 0.2.0 is df0456e, 0.3.0
is 147f604 (``git log --oneline``).

    FLAGS_enable_pir_api=1 PYTHONPATH=$PWD python benchmarks/compare_versions.py df0456e --models fc64
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import paddle

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ema  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True
    ).stdout


def import_revision(revision: str, into: Path) -> ModuleType:
    """paddle_ema as it was at git ``revision``, imported as ``paddle_ema_<sha>`` from a copy in ``into``."""
    sha = _git("rev-parse", "--short=7", revision).strip()
    alias = f"paddle_ema_{sha}"
    for path in _git("ls-tree", "-r", "--name-only", revision, "paddle_ema").split():
        if not path.endswith(".py"):
            continue
        # Its own imports of itself (`from paddle_ema import _ir`) must find the copy, not the tree.
        text = re.sub(r"\bpaddle_ema\b", alias, _git("show", f"{revision}:{path}"))
        target = into / alias / Path(path).relative_to("paddle_ema")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    sys.path.insert(0, str(into))
    return importlib.import_module(alias)


def register_flavor(name: str, module: ModuleType) -> None:
    """Let bench_ema build variants with ``module``'s ExponentialMovingAverage under flavor ``name``."""

    def attach() -> Any:
        ema = module.ExponentialMovingAverage(bench_ema.DECAY)
        ema.update()
        return ema

    bench_ema.FLAVORS[name] = attach


def paired(samples: Sequence[float], base: Sequence[float]) -> tuple[float, float, float]:
    """Median and quartiles of ``samples[r] - base[r]`` over repeats ``r``."""
    differences = [a - b for a, b in zip(samples, base)]
    q1, median, q3 = statistics.quantiles(differences, n=4) if len(differences) > 1 else [differences[0]] * 3
    return median, q1, q3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="the git revision to compare with (e.g. df0456e, 0.2.0's commit)")
    parser.add_argument("--models", nargs="+", choices=sorted(bench_ema.MODELS), default=["fc64"])
    parser.add_argument("--repeats", type=int, default=31, help="repeats per timing (default 31)")
    parser.add_argument("--skip-apply", action="store_true", help="time no apply + restore")
    args = parser.parse_args()
    paddle.enable_static()
    timer = bench_ema.Timer(repeats=args.repeats, warmup=5, target_s=0.25, min_runs=5)
    with tempfile.TemporaryDirectory() as tmp:
        old = import_revision(args.revision, Path(tmp))
        register_flavor("revision", old)
        print(f"{bench_ema.mode_name()}: paddle_ema {bench_ema.paddle_ema.__version__} (working tree) "
              f"against {old.__version__} ({args.revision}); medians of {args.repeats} repeats")
        for model in args.models:
            compare_model(model, timer, skip_apply=args.skip_apply)


def compare_model(model: str, timer: bench_ema.Timer, skip_apply: bool) -> None:
    flavors = {"working tree": "paddle_ema", "revision": "revision"}
    train = {"no EMA": bench_ema.build_train(model, None)}
    train.update({label: bench_ema.build_train(model, flavor) for label, flavor in flavors.items()})
    timings = timer({label: variant.step for label, variant in train.items()})
    base = timings["no EMA"]
    print(f"{model}, training step: no EMA {base['ms']:.2f} ms")
    overheads = {}
    for label in flavors:
        median, q1, q3 = paired(timings[label]["samples_ms"], base["samples_ms"])
        overheads[label] = median
        print(f"  + {label:13s} {timings[label]['ms']:8.2f} ms; adds {median:+6.2f} ms per step "
              f"(paired, quartiles {q1:+.2f} .. {q3:+.2f}), {train[label].info['ops_added']} ops")
    if overheads["revision"] > 0:
        print(f"  overhead, working tree / revision: {overheads['working tree'] / overheads['revision']:.2f}")
    del train
    shapes = bench_ema.model_shapes(model)
    ema_only = {
        label: bench_ema.build_ema_only(shapes, flavor, timer.warmup) for label, flavor in flavors.items()
    }
    timings = timer({label: variant.step for label, variant in ema_only.items()})
    ours, theirs = timings["working tree"], timings["revision"]
    ratios = [r / w for w, r in zip(ours["samples_ms"], theirs["samples_ms"])]
    print(f"{model}, EMA only: working tree {ours['ms']:.3f} ms, revision {theirs['ms']:.3f} ms; "
          f"revision / working tree per repeat: median {statistics.median(ratios):.2f} (min "
          f"{min(ratios):.2f}, max {max(ratios):.2f}); page faults per step {ours['minor_faults']:.0f} / "
          f"{theirs['minor_faults']:.0f}")
    if skip_apply:
        return
    applies = {
        label: timer({label: variant.apply_restore})[label]["ms"] for label, variant in ema_only.items()
    }
    print(f"{model}, apply + restore: working tree {applies['working tree']:.2f} ms, revision "
          f"{applies['revision']:.2f} ms ({applies['revision'] / applies['working tree']:.2f}x)")


if __name__ == "__main__":
    main()
