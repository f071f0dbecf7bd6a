"""Summarise the benchmark results: RESULTS.md (also printed) and ema_benchmark.png.

Reads every ``*.json`` that ``bench_ema.py`` wrote into the results directory, and every
``dygraph-*.json`` that ``bench_dygraph.py`` wrote (a "Dygraph" table; the chart is static-graph only).
Needs only numpy and matplotlib, not paddle.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import ticker

matplotlib.use("Agg")  # files only, no display; pyplot picks its backend at the first figure

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# bench_dygraph.py's files: one per Paddle version, with other keys than bench_ema.py's.
DYGRAPH_PREFIX = "dygraph-"
STATIC_PREFIX = "paddle"  # bench_ema.py's files are named by their mode, e.g. paddle3.3.1-pir.json
MIN_REPEATS = 9
MISSING = "–"

TIMINGS = [
    ("train_no_ema", "train step, no EMA"),
    ("train_paddle_ema", "train step + paddle_ema"),
    ("train_4op", "train step + 4-op chain"),
    ("train_paddle_class", "train step + Paddle's class"),
    ("ema_only_paddle_ema", "EMA only: paddle_ema"),
    ("ema_only_4op", "EMA only: 4-op chain"),
    ("ema_only_paddle_class", "EMA only: Paddle's class"),
    ("floor_numpy", "numpy floor, per tensor"),
    ("floor_numpy_contiguous", "numpy floor, one array"),
    ("apply_restore", "apply + restore: paddle_ema"),
    ("apply_restore_paddle_class", "apply + restore: Paddle's class"),
]

# Bars of the chart: timing key, label, colour.
BARS = [
    ("ema_only_paddle_ema", "paddle_ema", "tab:blue"),
    ("ema_only_4op", "4-op chain", "tab:orange"),
    ("ema_only_paddle_class", "Paddle's class (2.6)", "tab:red"),
    ("floor_numpy", "numpy floor", "tab:gray"),
]


def ms(model: dict[str, Any], key: str) -> float | None:
    timing = model["timings"].get(key)
    return None if timing is None else timing["ms"]


def ratio(model: dict[str, Any], numerator: str, denominator: str) -> float | None:
    top, bottom = ms(model, numerator), ms(model, denominator)
    return None if top is None or not bottom else top / bottom


def overhead_pct(model: dict[str, Any], key: str) -> float | None:
    relative = ratio(model, key, "train_no_ema")
    return None if relative is None else (relative - 1.0) * 100.0


def bytes_per_param(model: dict[str, Any], flavor: str, phase: str) -> float | None:
    """Extra state per parameter: from the scope tensors where the run could list them, else the allocator."""
    state = model["state"].get(flavor, {}).get(phase)
    if state is None:
        return None
    scope = state["scope_bytes_per_param"]
    return state["allocator_bytes_per_param"] if scope is None else scope


def fmt(value: Any, spec: str) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec)


def fmt_pct(value: float | None) -> str:
    return MISSING if value is None else f"{value:+.1f} %"


Cell = Callable[[dict[str, Any]], str]


def ratio_cell(numerator: str, denominator: str, spec: str = ".2f") -> Cell:
    return lambda m: fmt(ratio(m, numerator, denominator), spec)


def overhead_cell(key: str) -> Cell:
    return lambda m: fmt_pct(overhead_pct(m, key))


def ops_cell(flavor: str) -> Cell:
    return lambda m: fmt(m["ops_added_to_train_program"].get(flavor), "d")


def state_cell(flavor: str) -> Cell:
    """Extra bytes per parameter after the update steps / inside apply / after restore."""
    phases = ("after_update", "during_apply", "after_restore")

    def cell(model: dict[str, Any]) -> str:
        values = [bytes_per_param(model, flavor, phase) for phase in phases]
        return MISSING if all(v is None for v in values) else " / ".join(fmt(v, ".2f") for v in values)

    return cell


def faults_cell(*keys: str) -> Cell:
    """Minor page faults per step of each timing, median over repeats, separated by slashes."""

    def cell(model: dict[str, Any]) -> str:
        values = [model["timings"].get(key, {}).get("minor_faults") for key in keys]
        return MISSING if all(v is None for v in values) else " / ".join(fmt(v, ".0f") for v in values)

    return cell


def rss_cell(variant: str) -> Cell:
    return lambda m: fmt(m["peak_rss_delta_mib"].get(variant), ".0f")


def derived_rows() -> list[tuple[str, Cell]]:
    """The ratios and facts under the timings: label and how to compute the cell."""
    return [
        ("**4-op / paddle_ema** (EMA only)", ratio_cell("ema_only_4op", "ema_only_paddle_ema")),
        ("**class / paddle_ema** (EMA only)", ratio_cell("ema_only_paddle_class", "ema_only_paddle_ema")),
        ("**paddle_ema / floor** (EMA only)", ratio_cell("ema_only_paddle_ema", "floor_numpy", ".1f")),
        ("**EMA overhead in training**: paddle_ema", overhead_cell("train_paddle_ema")),
        ("EMA overhead in training: 4-op chain", overhead_cell("train_4op")),
        ("EMA overhead in training: Paddle's class", overhead_cell("train_paddle_class")),
        ("ops added per step: paddle_ema", ops_cell("paddle_ema")),
        ("ops added per step: 4-op chain", ops_cell("4op")),
        ("ops added per step: Paddle's class", ops_cell("paddle_class")),
        ("page faults per step (EMA only): paddle_ema", faults_cell("ema_only_paddle_ema")),
        ("page faults per step (train, no EMA / + paddle_ema)",
         faults_cell("train_no_ema", "train_paddle_ema")),
        ("state B/param (updated / in apply / restored): paddle_ema", state_cell("paddle_ema")),
        ("state B/param (updated / in apply / restored): class", state_cell("paddle_class")),
        ("test clone holds no EMA op", lambda m: fmt(m["checks"].get("test_clone_ema_free"), "")),
        ("peak RSS rise, train + paddle_ema (MiB)", rss_cell("train_paddle_ema")),
    ]


def version_sort_key(result: dict[str, Any]) -> tuple[int, ...]:
    """Newest Paddle first."""
    version = tuple(int(part) for part in result["paddle_version"].split(".")[:3] if part.isdigit())
    return tuple(-v for v in version)


def mode_sort_key(result: dict[str, Any]) -> tuple[Any, ...]:
    """Newest Paddle first, PIR before the legacy IR."""
    return version_sort_key(result), result["ir"] != "pir"


def load_results(directory: Path) -> list[dict[str, Any]]:
    """bench_ema.py's results (``paddle<version>-<ir>.json``; not bench_dygraph.py's or
    bench_clients.py's), newest Paddle first."""
    paths = sorted(directory.glob(f"{STATIC_PREFIX}*.json"))
    return sorted((json.loads(path.read_text()) for path in paths), key=mode_sort_key)


def load_dygraph_results(directory: Path) -> list[dict[str, Any]]:
    """bench_dygraph.py's results, newest Paddle first."""
    paths = sorted(directory.glob(f"{DYGRAPH_PREFIX}*.json"))
    return sorted((json.loads(path.read_text()) for path in paths), key=version_sort_key)


def model_names(results: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for result in results:
        names += [name for name in result["models"] if name not in names]
    return names


def markdown_table(header: list[str], rows: list[list[str]], numeric: bool = True) -> list[str]:
    """A markdown table; with ``numeric``, every column but the first is right-aligned."""
    align = "---:" if numeric else "---"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [align] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def model_section(name: str, results: list[dict[str, Any]]) -> list[str]:
    """One table for one model: a row per timing or ratio, a column per Paddle mode."""
    present = [r for r in results if name in r["models"]]
    models = [r["models"][name] for r in present]
    first = models[0]
    rows = [[label] + [fmt(ms(m, key), ".3f") for m in models] for key, label in TIMINGS]
    rows = [row for row in rows if any(cell != MISSING for cell in row[1:])]
    rows += [[label] + [cell(m) for m in models] for label, cell in derived_rows()]
    title = f"## {name}: {first['tensors']} tensors, {first['params'] / 1e6:.2f}M parameters"
    return [title, "", "Times in ms per step (median over repeats).", ""] + markdown_table(
        ["", *(r["mode"] for r in present)], rows
    )


def runs_section(results: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in results:
        smoke = r["quick"] or r["repeats"] < MIN_REPEATS
        machine = f"{r['cpu']}, {r['cpu_count']} CPUs, {r['machine']}"
        rows.append([r["mode"], str(r["repeats"]), "yes" if smoke else "no", r["date"], machine])
    lines = markdown_table(["mode", "repeats", "smoke run", "date", "machine"], rows, numeric=False)
    for r in results:
        if r["skipped"]:
            skipped = ", ".join(r["skipped"]["variants"])
            lines.append(f"\n{r['mode']}: skipped {skipped}: {r['skipped']['reason']}")
    return ["## Runs", ""] + lines


def dygraph_ms(model: dict[str, Any], key: str) -> str:
    return fmt(ms(model, key), ".3f")


def dygraph_added(model: dict[str, Any], key: str) -> str:
    """The EMA's added time per training step: ms, and % of the step without EMA."""
    with_ema, without = ms(model, key), ms(model, "train_no_ema")
    if with_ema is None or without is None:
        return MISSING
    return f"{with_ema - without:+.3f} ({overhead_pct(model, key):+.1f} %)"


def dygraph_kernels(model: dict[str, Any]) -> str:
    """The kernels one ModelEMA update and one apply + restore launch (runs before they were counted: -)."""
    if "kernels_update" not in model:
        return MISSING
    return f"{model['kernels_update']} / {model['kernels_apply_restore']}"


# Columns of the dygraph table after the model and the Paddle version: header and cell.
DYGRAPH_COLUMNS: list[tuple[str, Cell]] = [
    ("train step, no EMA", lambda m: dygraph_ms(m, "train_no_ema")),
    ("train + ModelEMA", lambda m: dygraph_ms(m, "train_model_ema")),
    ("train + ppdet", lambda m: dygraph_ms(m, "train_ppdet")),
    ("**added: ModelEMA**", lambda m: dygraph_added(m, "train_model_ema")),
    ("added: ppdet", lambda m: dygraph_added(m, "train_ppdet")),
    ("update: ModelEMA", lambda m: dygraph_ms(m, "update_model_ema")),
    ("update: ppdet", lambda m: dygraph_ms(m, "update_ppdet")),
    ("**ppdet / ModelEMA** (update)", ratio_cell("update_ppdet", "update_model_ema")),
    ("floor", lambda m: dygraph_ms(m, "floor_update")),
    ("**ModelEMA / floor** (update)", ratio_cell("update_model_ema", "floor_update")),
    ("apply + restore: ModelEMA", lambda m: dygraph_ms(m, "apply_restore")),
    ("kernels: update / apply + restore", dygraph_kernels),
    ("update_every: a skipped call (µs)", lambda m: fmt(None if ms(m, "update_skipped") is None
                                                        else ms(m, "update_skipped") * 1000, ".2f")),
]


def dygraph_section(results: list[dict[str, Any]]) -> list[str]:
    """bench_dygraph.py's results: one table, a row per model and Paddle version, then the runs."""
    rows = []
    for name in model_names(results):
        for r in results:
            if name in r["models"]:
                model = r["models"][name]
                rows.append([name, r["paddle_version"]] + [cell(model) for _, cell in DYGRAPH_COLUMNS])
    lines = [
        "## Dygraph",
        "",
        "`bench_dygraph.py`: ms per step (median over repeats) in dygraph mode. *ppdet* is PaddleDetection's",
        "EMA formulation; *added* is a training step's time with the EMA minus without (and in % of it);",
        "*floor* is two in-place kernels over one flat float32 buffer of the averaged size (the least a",
        "one-pass update can cost); *kernels* are counted with Paddle's profiler (benchmarks/kernels.py).",
        "",
    ]
    lines += markdown_table(["model", "Paddle", *(header for header, _ in DYGRAPH_COLUMNS)], rows)
    lines.append("")
    for r in results:
        smoke = " (smoke run)" if r["quick"] or r["repeats"] < MIN_REPEATS else ""
        checks = [m["checks"] for m in r["models"].values()]
        worst = max(v for c in checks for k, v in c.items() if k.endswith("max_rel_diff"))
        agree = "agree" if all(c["passed"] for c in checks) else "DISAGREE"
        lines.append(
            f"- Paddle {r['paddle_version']}: {r['repeats']} repeats{smoke}, {r['date']}, {r['cpu']}, "
            f"{r['cpu_count']} CPUs. ModelEMA's and the ppdet-style averages {agree} after "
            f"{checks[0]['steps']} training steps: max relative difference {worst:.1e}."
        )
    return lines


def render_markdown(results: list[dict[str, Any]], dygraph: Sequence[dict[str, Any]] = ()) -> str:
    lines = [
        "# paddle_ema benchmark results",
        "",
        "Generated by `benchmarks/report.py`; see `benchmarks/README.md` for what is measured.",
        "",
    ]
    for name in model_names(results):
        lines += model_section(name, results) + [""]
    if dygraph:
        lines += dygraph_section(list(dygraph)) + [""]
    if results:
        lines += runs_section(results)
    return "\n".join(lines).rstrip("\n") + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """EMA-only ms per step, one panel per model: paddle_ema, the 4-op chain, Paddle's class, the floor."""
    names = model_names(results)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.5), squeeze=False)
    width = 0.8 / len(BARS)
    for ax, name in zip(axes[0], names):
        present = [r for r in results if name in r["models"]]
        x = np.arange(len(present))
        for i, (key, label, colour) in enumerate(BARS):
            values = [ms(r["models"][name], key) for r in present]
            heights = [np.nan if v is None else v for v in values]
            ax.bar(x + (i - (len(BARS) - 1) / 2) * width, heights, width, label=label, color=colour)
        ax.set_xticks(x, [r["mode"].replace("paddle", "") for r in present], fontsize=8)
        ax.set_yscale("log")
        lowest = min(
            m for r in present for key, _, _ in BARS if (m := ms(r["models"][name], key)) is not None
        )
        ax.set_ylim(bottom=lowest / 2)  # log bars start at the bottom edge: keep the shortest visible
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(name)
        ax.set_ylabel("ms per EMA step (log)")
        ax.grid(axis="y", which="both", alpha=0.3)
    # One legend for all panels, below them, so it never hides a bar.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle("EMA update alone: time per step")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="directory of the benchmarks' JSON")
    args = parser.parse_args()
    results = load_results(args.results)
    dygraph = load_dygraph_results(args.results)
    if not results and not dygraph:
        raise SystemExit(f"no *.json results in {args.results}; run bench_ema.py or bench_dygraph.py first")
    markdown = render_markdown(results, dygraph)
    (args.results / "RESULTS.md").write_text(markdown)
    if results:  # the chart shows bench_ema.py's EMA-only programs
        plot(results, args.results / "ema_benchmark.png")
    print(markdown)


if __name__ == "__main__":
    main()
