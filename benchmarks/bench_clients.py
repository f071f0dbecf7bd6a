"""Each client's EMA formulation against ModelEMA configured like it, on bench_dygraph's models.

For PaddleClas (``ppcls/utils/ema.py``: a deep copy, ``paddle.assign(d e + (1 - d) m, e)`` per state
entry), PaddleSeg (``paddleseg/core/train.py``: a new state dict each update, then
``set_state_dict``) and ppdiffusers (``EMAModel.step``: ``s.copy_(s - (1 - d)(s - p))`` per
parameter), re-typed here from reading their sources, it times one update of theirs and of
``paddle_ema.ModelEMA`` with the options of docs/clients.md's migration table, in the same run, after
checking that both give the same averages; and the evaluation swap: ppdiffusers'
``store`` + ``copy_to`` + ``restore`` against ``with ema.apply(): pass`` (PaddleClas and PaddleSeg
evaluate their copy, which costs no swap; ModelEMA's ``averaged_model()`` is that copy).

    python benchmarks/bench_clients.py [--models fc64 convnet] [--repeats 9]

Prints a markdown table (ms per update, medians) and writes results/clients-<major.minor>.json.
"""

from __future__ import annotations

import copy
import json

import bench_dygraph
import bench_ema
import paddle

import paddle_ema

DECAY = 0.999
CHECK_STEPS = 5


class PaddleClasEMA:
    def __init__(self, model: paddle.nn.Layer) -> None:
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.model = model

    @paddle.no_grad()
    def update(self) -> None:
        for e, m in zip(self.module.state_dict().values(), self.model.state_dict().values()):
            paddle.assign(DECAY * e + (1 - DECAY) * m, e)

    def averages(self) -> dict[str, paddle.Tensor]:
        return dict(self.module.state_dict())


class PaddleSegEMA:
    def __init__(self, model: paddle.nn.Layer) -> None:
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.model = model
        self.iter = 0

    @paddle.no_grad()
    def update(self) -> None:
        self.iter += 1
        d = min(1 - 1 / (self.iter + 1), DECAY)
        ema, model = self.module.state_dict(), self.model.state_dict()
        self.module.set_state_dict({
            k: d * v + (1 - d) * model[k] if paddle.is_floating_point(v) else v for k, v in ema.items()
        })

    def averages(self) -> dict[str, paddle.Tensor]:
        return dict(self.module.state_dict())


class PpdiffusersEMA:
    def __init__(self, model: paddle.nn.Layer) -> None:
        self.params = list(model.parameters())
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.clone().detach() for p in self.params]
        self.step_count = 0

    @paddle.no_grad()
    def update(self) -> None:
        self.step_count += 1
        d = min(1 - (1 + self.step_count) ** (-2 / 3), DECAY)
        for s, p in zip(self.shadow, self.params):
            if p.stop_gradient:
                s.copy_(p.astype(s.dtype), False)
            else:
                s.copy_(s - (1 - d) * (s - p.astype(s.dtype)), False)

    def swap(self) -> None:
        """store, copy_to, evaluate (nothing), restore."""
        stored = [p.detach().cpu().clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            p.copy_(s.astype(p.dtype), False)
        for c, p in zip(stored, self.params):
            p.copy_(c, False)

    def averages(self) -> dict[str, paddle.Tensor]:
        return dict(zip(self.names, self.shadow))


CLIENTS = {
    "ppcls": (PaddleClasEMA, dict(init="weights")),
    "ppseg": (PaddleSegEMA, dict(init="weights", warmup="power", power=1.0)),
    "ppdiffusers": (PpdiffusersEMA, dict(init="weights", warmup="power", frozen="copy", buffers=False)),
}


def check(name: str, client: str) -> float:
    """Both EMAs over the same training: the largest normwise relative difference of their averages."""
    make, options = CLIENTS[client]
    model, x = bench_dygraph.build_model(name)
    theirs, ours = make(model), paddle_ema.ModelEMA(model, DECAY, **options)
    train = bench_dygraph.Trainer(model, x)
    for _ in range(CHECK_STEPS):
        train.step()
        theirs.update()
        ours.update()
    mine, other = ours.averages(), theirs.averages()
    return bench_dygraph.max_rel_diff({k: mine[k] for k in other if k in mine},
                                      {k: v for k, v in other.items() if k in mine})


def bench(name: str, timer: bench_ema.Timer) -> dict:
    row = {}
    for client, (make, options) in CLIENTS.items():
        row[f"{client}_check"] = check(name, client)
        model_theirs, model_ours = bench_dygraph.build_model(name)[0], bench_dygraph.build_model(name)[0]
        theirs, ours = make(model_theirs), paddle_ema.ModelEMA(model_ours, DECAY, **options)
        timings = timer({f"{client}": theirs.update, f"{client}_model_ema": ours.update})
        row.update({k: v["ms"] for k, v in timings.items()})
        if client == "ppdiffusers":
            def apply_restore(ema=ours) -> None:
                with ema.apply():
                    pass

            swaps = timer({"ppdiffusers_swap": theirs.swap, "ppdiffusers_swap_model_ema": apply_restore})
            row.update({k: v["ms"] for k, v in swaps.items()})
    return row


def main() -> None:
    args = bench_dygraph.parse_args()
    paddle.disable_static()
    paddle.set_device("cpu")
    timer = (bench_ema.Timer(repeats=args.repeats, warmup=2, target_s=0.03, min_runs=2) if args.quick
             else bench_ema.Timer(repeats=args.repeats, warmup=5, target_s=0.25, min_runs=5))
    results = {"paddle": paddle.__version__, "repeats": args.repeats, "models": {}}
    for name in args.models:
        results["models"][name] = bench(name, timer)
        print(name, {k: round(v, 3) for k, v in results["models"][name].items()}, flush=True)
    lines = ["| model | client | check (rel. diff) | client update | ModelEMA update | client / ModelEMA |",
             "|---|---|---:|---:|---:|---:|"]
    for name, row in results["models"].items():
        for client in CLIENTS:
            ratio = row[client] / row[f"{client}_model_ema"]
            lines.append(f"| {name} | {client} | {row[f'{client}_check']:.1e} | {row[client]:.3f} | "
                         f"{row[f'{client}_model_ema']:.3f} | {ratio:.2f} |")
        lines.append(f"| {name} | ppdiffusers store/copy_to/restore vs apply+restore | | "
                     f"{row['ppdiffusers_swap']:.3f} | {row['ppdiffusers_swap_model_ema']:.3f} | "
                     f"{row['ppdiffusers_swap'] / row['ppdiffusers_swap_model_ema']:.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    major_minor = ".".join(paddle.__version__.split(".")[:2])
    out = bench_dygraph.RESULTS_DIR / f"clients-{major_minor}.json"
    out.write_text(json.dumps({**results, "table": table}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
