"""Benchmark paddle_ema.ModelEMA in dygraph mode against PaddleDetection's EMA formulation; write JSON.

For the static benchmark's three models, built from ``paddle.nn`` layers, it times a dygraph training step
(forward, backward, SGD, ``clear_grad``) without EMA, with ``paddle_ema.ModelEMA(model, 0.999).update()``
and with the update of PaddleDetection's ``ModelEMA`` (``ppdet/optimizer/ema.py``, re-implemented here as
:class:`PpdetStyleEMA`); each EMA's update alone; and one ``with ema.apply(): pass`` of ModelEMA. Every
time is a median over repeats, in milliseconds per step, on ``CPUPlace`` in fp32. Before timing, it
checks that both EMAs compute the same averages, so the comparison is of two implementations of one
thing. Beside the updates it times a floor, the cheapest one-pass EMA over as many float32 values
(two ``sgd_`` kernels on one flat buffer), and it counts the dygraph ops and kernels that one update
and one apply + restore of ModelEMA launch (``kernels.count_kernels``), and what a call that
``update_every`` skips costs. A fourth model, ``yolo``, is a
YOLO-like conv net of ~120 conv + batch-norm blocks (~600 small tensors). Dygraph does not depend on
the static IR flag: run it once per Paddle version (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import weakref
from pathlib import Path
from typing import Any, Callable

import bench_ema
import numpy as np
import paddle
from bench_ema import Timer  # the static benchmark's timer: same warm-up, calibration, rotation
from kernels import count_kernels, jsonable

import paddle_ema

DECAY = bench_ema.DECAY  # the static benchmark's decay, recorded as such by bench_ema.machine_and_run
# The loss is the mean of the squared output at learning rate 1e-4, not bench_ema.py's mean of the output
# at 1e-3: that loss has no lower bound and the deep linear stacks reach inf and NaN within tens of
# steps (fc64 within ten), after which a step times arithmetic on NaN. Here every weight stays finite
# over a thousand steps and still moves (about 1e-3 relative), so the EMA averages real training. The
# cost of a step does not depend on either choice but for one square and its gradient.
LEARNING_RATE = 1e-4
FC_BATCH = 8
CONV_INPUT = (8, 3, 32, 32)
YOLO_INPUT = (8, 3, 64, 64)
# paddle_ema._names.stack_max_numel(): the static EMA stacks the averages of tensors up to this size.
# The model summary counts the tensors above it, which a fused dygraph update may treat apart too.
LARGE_NUMEL = 32768
SEED = 0
# Training steps of the equivalence check: enough for the weights to move and rounding to accumulate.
CHECK_STEPS = 20
# The check's bound on max |ModelEMA - ppdet| / max |ppdet| over a model's averages. The two round in
# different places (two sgd_ kernels with a float32 weight, against scale, scale and add), which after 20
# float32 updates leaves up to about 1e-6 (measured: 1e-7 to 9e-7); an error in the maths (another decay,
# a step off) leaves 1e-3 or more.
CHECK_RTOL = 2e-6
RESULTS_DIR = Path(__file__).resolve().parent / "results"

TRAIN_KEYS = ("train_no_ema", "train_model_ema", "train_ppdet")
UPDATE_KEYS = ("update_model_ema", "update_ppdet")
FLOOR_KEY = "floor_update"
SKIPPED_KEY = "update_skipped"  # a ModelEMA.update() call that update_every skips
SKIPPING_EVERY = 2**62
APPLY_KEY = "apply_restore"


# ----------------------------------------------------------------------------------------- models


def _fc_stack(width: int, depth: int) -> paddle.nn.Layer:
    """``depth`` linear fc layers of ``width`` x ``width`` with bias, no activation (as bench_ema.py)."""
    return paddle.nn.Sequential(*(paddle.nn.Linear(width, width) for _ in range(depth)))


class _ConvBN(paddle.nn.Layer):
    """Conv (no bias: the batch norm has one) + BatchNorm2D, then relu unless ``relu`` is False."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, relu: bool = True) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(cin, cout, kernel, stride=stride, padding=kernel // 2, bias_attr=False)
        self.bn = paddle.nn.BatchNorm2D(cout)
        self.relu = relu

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.bn(self.conv(x))
        return paddle.nn.functional.relu(y) if self.relu else y


class _ResidualBlock(paddle.nn.Layer):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.first = _ConvBN(cin, cout, 3, stride)
        self.second = _ConvBN(cout, cout, 3, 1, relu=False)
        # A projection only where the shape changes, as in bench_ema.py.
        self.shortcut = None if stride == 1 and cin == cout else _ConvBN(cin, cout, 1, stride, relu=False)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return paddle.nn.functional.relu(self.second(self.first(x)) + shortcut)


class _ConvNet(paddle.nn.Layer):
    """A small ResNet: a conv stem and six residual blocks (32, 64, 128 channels), then fc(10)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _ConvBN(CONV_INPUT[1], 32, 3, 1)
        blocks, cin = [], 32
        for cout, stride in ((32, 1), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1)):
            blocks.append(_ResidualBlock(cin, cout, stride))
            cin = cout
        self.blocks = paddle.nn.Sequential(*blocks)
        self.head = paddle.nn.Linear(cin, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(paddle.mean(self.blocks(self.stem(x)), axis=[2, 3]))


class _Bottleneck(paddle.nn.Layer):
    """YOLO's residual bottleneck: 1x1 conv to ``hidden`` channels, 3x3 conv back, plus the input."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.reduce = _ConvBN(channels, hidden, 1, 1)
        self.expand = _ConvBN(hidden, channels, 3, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x + self.expand(self.reduce(x))


def _conv_stack(cin: int, cout: int, hidden: int) -> paddle.nn.Sequential:
    """YOLOv3's five-conv neck stack: 1x1 to ``cout``, then 3x3 to ``hidden`` and 1x1 back, twice."""
    return paddle.nn.Sequential(
        _ConvBN(cin, cout, 1, 1), _ConvBN(cout, hidden, 3, 1), _ConvBN(hidden, cout, 1, 1),
        _ConvBN(cout, hidden, 3, 1), _ConvBN(hidden, cout, 1, 1),
    )


class _Yolo(paddle.nn.Layer):
    """A YOLO-like detector for its tensor count: many small conv + BatchNorm2D blocks (16-128 channels).

    A Darknet-style backbone (a stride-2 stem, then four stride-2 stages of 8, 16, 10 and 6 residual
    bottlenecks: 32, 64, 128, 128 channels), a PAN neck over the last three stages (five five-conv
    stacks, top-down with nearest upsampling and bottom-up with stride-2 convs) and a head per scale
    (three conv + BN blocks, then a 1x1 conv with bias to 3 anchors x (5 + 10 classes)): 123 conv + BN
    blocks of five tensors each (conv weight, BN weight and bias, mean, variance) and three output
    convs, 621 tensors, 3.1M values, 31 of them (3x3 conv weights) above 32768 elements. On an
    8x3x64x64 input the scales are 8x8, 4x4 and 2x2. The output is every scale's map, flattened and
    concatenated.
    """

    OUTPUTS = 3 * (5 + 10)

    def __init__(self) -> None:
        super().__init__()
        self.stem = _ConvBN(YOLO_INPUT[1], 16, 3, 2)
        stages, cin = [], 16
        for cout, depth in ((32, 8), (64, 16), (128, 10), (128, 6)):
            blocks = [_ConvBN(cin, cout, 3, 2)] + [_Bottleneck(cout, cout // 2) for _ in range(depth)]
            stages.append(paddle.nn.Sequential(*blocks))
            cin = cout
        self.stages = paddle.nn.LayerList(stages)
        # Top-down: P5 (128) -> lateral 1x1 -> up + P4 (128); then -> up + P3 (64).
        self.top5 = _conv_stack(128, 64, 128)
        self.lateral5 = _ConvBN(64, 32, 1, 1)
        self.top4 = _conv_stack(128 + 32, 64, 128)
        self.lateral4 = _ConvBN(64, 32, 1, 1)
        self.top3 = _conv_stack(64 + 32, 32, 64)
        # Bottom-up: N3 -> stride-2 conv + top4 -> N4 -> stride-2 conv + top5 -> N5.
        self.down3 = _ConvBN(32, 64, 3, 2)
        self.bottom4 = _conv_stack(64 + 64, 64, 128)
        self.down4 = _ConvBN(64, 64, 3, 2)
        self.bottom5 = _conv_stack(64 + 64, 64, 128)
        self.heads = paddle.nn.LayerList(
            paddle.nn.Sequential(
                _ConvBN(cin, 2 * cin, 3, 1), _ConvBN(2 * cin, cin, 1, 1), _ConvBN(cin, 2 * cin, 3, 1),
                paddle.nn.Conv2D(2 * cin, self.OUTPUTS, 1),
            )
            for cin in (32, 64, 64)
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        c3, c4, c5 = features[1:]
        up = paddle.nn.functional.interpolate
        t5 = self.top5(c5)
        t4 = self.top4(paddle.concat([up(self.lateral5(t5), scale_factor=2), c4], axis=1))
        n3 = self.top3(paddle.concat([up(self.lateral4(t4), scale_factor=2), c3], axis=1))
        n4 = self.bottom4(paddle.concat([self.down3(n3), t4], axis=1))
        n5 = self.bottom5(paddle.concat([self.down4(n4), t5], axis=1))
        outputs = [head(n) for head, n in zip(self.heads, (n3, n4, n5))]
        return paddle.concat([paddle.flatten(out, 1) for out in outputs], axis=1)


# name: (the layer's constructor, the input's shape)
DYGRAPH_MODELS: dict[str, tuple[Callable[[], paddle.nn.Layer], tuple[int, ...]]] = {
    "fc512": (lambda: _fc_stack(512, 64), (FC_BATCH, 512)),
    "fc64": (lambda: _fc_stack(64, 256), (FC_BATCH, 64)),
    "convnet": (_ConvNet, CONV_INPUT),
    "yolo": (_Yolo, YOLO_INPUT),
}


def build_model(name: str) -> tuple[paddle.nn.Layer, paddle.Tensor]:
    """The model (in train mode: batch norm uses and updates batch statistics) and its fixed input.

    Seeded, so every variant of a model starts from the same weights.
    """
    make, shape = DYGRAPH_MODELS[name]
    paddle.seed(SEED)
    model = make()
    model.train()
    x = paddle.to_tensor(np.random.default_rng(SEED).standard_normal(shape).astype("float32"))
    return model, x


# ------------------------------------------------------------------------------------- the EMAs


class PpdetStyleEMA:
    """PaddleDetection's ``ModelEMA`` update, as written in ``ppdet/optimizer/ema.py``, for timing.

    Follows their formulation, reduced to what a training step runs (no black list, reset or apply):

    * one float32 average per ``model.state_dict()`` entry, from ``paddle.zeros_like``; the model's
      tensors are held by weak reference;
    * each update computes ``v = decay * v + (1 - decay) * tensor.astype('float32')`` per entry, a new
      tensor every time, marks it ``stop_gradient`` and stores it in place of the old one;
    * decay ``'threshold'`` (their default): ``min(decay, (1 + step) / (10 + step))``; ``'normal'``:
      ``decay``.

    Their trainer calls ``update()`` outside ``paddle.no_grad()``, so this does too: the arithmetic on
    trainable parameters is recorded by autograd, which is part of what that formulation costs.
    """

    def __init__(self, model: paddle.nn.Layer, decay: float, decay_type: str = "threshold") -> None:
        if decay_type not in ("threshold", "normal"):
            raise ValueError(f"decay_type must be 'threshold' or 'normal', got {decay_type!r}")
        self.decay = decay
        self.decay_type = decay_type
        self.step = 0
        state = model.state_dict()
        self._tensors = {name: weakref.ref(tensor) for name, tensor in state.items()}
        self.averages = {name: paddle.zeros_like(tensor, dtype="float32") for name, tensor in state.items()}

    def update(self) -> None:
        if self.decay_type == "threshold":
            decay = min(self.decay, (1 + self.step) / (10 + self.step))
        else:
            decay = self.decay
        tensors = {name: ref() for name, ref in self._tensors.items()}
        for name, average in self.averages.items():
            new = decay * average + (1 - decay) * tensors[name].astype("float32")
            new.stop_gradient = True
            self.averages[name] = new
        self.step += 1


# ------------------------------------------------------------------------------------- variants


@dataclasses.dataclass
class Trainer:
    """A model, its SGD optimizer and fixed input; ``after`` (an EMA's update) runs after each step.

    The loss is the mean of the squared output (see LEARNING_RATE for why not the mean).
    """

    model: paddle.nn.Layer
    x: paddle.Tensor
    after: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        self.optimizer = paddle.optimizer.SGD(learning_rate=LEARNING_RATE, parameters=self.model.parameters())

    def loss(self) -> paddle.Tensor:
        return paddle.mean(paddle.square(self.model(self.x)))

    def step(self) -> None:
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.clear_grad()
        if self.after is not None:
            self.after()

    def health(self) -> dict[str, Any]:
        """The loss at the current weights and whether every weight is finite: a step on inf or NaN
        (or denormal) values could time differently from a real one."""
        with paddle.no_grad():
            loss = float(self.loss())
            finite = all(bool(paddle.isfinite(p).all()) for p in self.model.parameters())
        return {"final_loss": loss, "weights_finite": finite}


def train_variant(name: str, flavor: str | None) -> tuple[Trainer, Any]:
    """A training variant of model ``name``: no EMA, ``model_ema`` or ``ppdet``; and its EMA."""
    model, x = build_model(name)
    ema: Any = None
    if flavor == "model_ema":
        ema = paddle_ema.ModelEMA(model, DECAY)
    elif flavor == "ppdet":
        ema = PpdetStyleEMA(model, DECAY)
    return Trainer(model, x, None if ema is None else ema.update), ema


def apply_restore(ema: paddle_ema.ModelEMA) -> Callable[[], None]:
    def step() -> None:
        with ema.apply():
            pass

    return step


class FloorEMA:
    """The cheapest one-pass EMA over ``numel`` float32 values, as a floor for an update's time.

    One flat float32 average and one flat target of that size, and per update the two in-place
    ``sgd_`` kernels ModelEMA runs per tensor (``average -= w * average``, ``average += w * target``,
    w a 0-d float32 tensor): each value is read twice and written twice by two kernels in all, what any
    EMA over that many values does at least, with no per-tensor cost and no weight to fill.
    """

    def __init__(self, numel: int, decay: float) -> None:
        rng = np.random.default_rng(SEED)
        self.average = paddle.zeros([numel], dtype="float32")
        self.target = paddle.to_tensor(rng.standard_normal(numel).astype("float32"))
        self.weight = paddle.to_tensor(1 - decay, dtype="float32")
        self.weight_neg = paddle.to_tensor(-(1 - decay), dtype="float32")

    def update(self) -> None:
        paddle._C_ops.sgd_(self.average, self.weight, self.average, None, False)
        paddle._C_ops.sgd_(self.average, self.weight_neg, self.target, None, False)


def model_sizes(model: paddle.nn.Layer) -> dict[str, int]:
    """``model.state_dict()``'s tensor and element counts, those of its floating-point tensors (what an
    EMA averages) and how many tensors have more than LARGE_NUMEL elements."""
    numels = [math.prod(t.shape) for t in model.state_dict().values()]
    floating = [math.prod(t.shape) for t in model.state_dict().values() if paddle.is_floating_point(t)]
    return {
        "tensors": len(numels),
        "params": sum(numels),
        "averaged_tensors": len(floating),
        "averaged_values": sum(floating),
        f"tensors_over_{LARGE_NUMEL}": sum(n > LARGE_NUMEL for n in numels),
    }


def model_summary(name: str, sizes: dict[str, int]) -> str:
    return (f"{name}: {sizes['tensors']} tensors ({sizes[f'tensors_over_{LARGE_NUMEL}']} with more than "
            f"{LARGE_NUMEL} elements), {sizes['params'] / 1e6:.2f}M values")


# ----------------------------------------------------------------------------- equivalence check


def max_rel_diff(ours: dict[str, paddle.Tensor], theirs: dict[str, paddle.Tensor]) -> float:
    """max |ours - theirs| / max |theirs| over every tensor: normwise, so near-zero entries do not blow up."""
    if set(ours) != set(theirs):
        raise AssertionError(f"the EMAs average different tensors: {sorted(set(ours) ^ set(theirs))}")
    diff = max(float((ours[n].astype("float64") - theirs[n].astype("float64")).abs().max()) for n in ours)
    scale = max(float(theirs[n].abs().max()) for n in ours)
    return diff / scale if scale else diff


def check_equivalence(name: str, steps: int = CHECK_STEPS) -> dict[str, Any]:
    """Train ``name`` for ``steps`` steps and update a ModelEMA and a PpdetStyleEMA after each, both from
    zeros with the same decay sequence (constant, then the threshold warm-up); compare their averages.

    ModelEMA's raw averages (``state_dict()``, before its bias correction) must match ppdet's. With a
    constant decay both bias corrections divide by ``1 - decay ** steps``, so the corrected averages
    must match too; with the threshold warm-up ppdet divides by ``1 - last_decay ** steps`` instead of
    the exact ``1 - prod(decays)``, so only the raw averages are compared there.
    """
    result: dict[str, Any] = {"steps": steps, "rtol": CHECK_RTOL}
    for warmup, decay_type in ((None, "normal"), ("threshold", "threshold")):
        model, x = build_model(name)
        ours = paddle_ema.ModelEMA(model, DECAY, warmup=warmup)
        theirs = PpdetStyleEMA(model, DECAY, decay_type)
        train = Trainer(model, x)
        for _ in range(steps):
            train.step()
            ours.update()
            theirs.update()
        raw = ours.state_dict()["averages"]  # before ModelEMA's bias correction, like ppdet's
        result[f"{decay_type}_raw_max_rel_diff"] = max_rel_diff(raw, theirs.averages)
        if decay_type == "normal":
            # ppdet's apply(): v / (1 - decay ** step), then cast to the tensor's dtype (float32 here).
            corrected = {n: v / (1 - DECAY**steps) for n, v in theirs.averages.items()}
            result["normal_corrected_max_rel_diff"] = max_rel_diff(ours.averages(), corrected)
    result["passed"] = all(v <= CHECK_RTOL for k, v in result.items() if k.endswith("max_rel_diff"))
    return result


# -------------------------------------------------------------------------------------- running


def bench_model(name: str, timer: Timer) -> dict[str, Any]:
    """Check that the EMAs agree, then time the training group, the update group and apply + restore."""
    checks = check_equivalence(name)
    if not checks["passed"]:
        raise SystemExit(f"{name}: ModelEMA and the ppdet-style EMA disagree, nothing timed: {checks}")
    flavors = (None, "model_ema", "ppdet")
    variants = {key: train_variant(name, flavor) for key, flavor in zip(TRAIN_KEYS, flavors)}
    sizes = model_sizes(next(iter(variants.values()))[0].model)
    print(model_summary(name, sizes), flush=True)
    timings = timer({key: variant.step for key, (variant, _) in variants.items()})
    health = {key: variant.health() for key, (variant, _) in variants.items()}
    del variants  # free three models, their gradients and two EMAs before the next group
    # The EMA alone: each on its own (untrained) model, so neither shares caches or tensors with the other.
    # The models are kept in variables: PpdetStyleEMA, like ppdet's class, holds weak references only.
    # The floor is timed in the same group, so update / floor is a ratio of one run.
    model_ema_model, ppdet_model = build_model(name)[0], build_model(name)[0]
    model_ema = paddle_ema.ModelEMA(model_ema_model, DECAY)
    ppdet = PpdetStyleEMA(ppdet_model, DECAY)
    floor = FloorEMA(sizes["averaged_values"], DECAY)
    updates = {"update_model_ema": model_ema.update, "update_ppdet": ppdet.update, FLOOR_KEY: floor.update}
    timings.update(timer(updates))
    # After the update group's warm-up and repeats, so apply swaps in real averages.
    timings.update(timer({APPLY_KEY: apply_restore(model_ema)}))
    # A call that update_every skips (it never averages within the run): what the other k - 1 cost.
    skipping = paddle_ema.ModelEMA(model_ema_model, DECAY, update_every=SKIPPING_EVERY)
    timings.update(timer({SKIPPED_KEY: skipping.update}))
    # Counted last: the profiler is not running while anything is timed.
    kernels = {
        "update": count_kernels(model_ema.update),
        APPLY_KEY: count_kernels(apply_restore(model_ema)),
        "update_ppdet": count_kernels(ppdet.update),
        "floor": count_kernels(floor.update),
    }
    counts = {
        "kernels_update": kernels["update"]["kernels"],
        "kernels_apply_restore": kernels[APPLY_KEY]["kernels"],
        "operators_update": kernels["update"]["operators"],
        "operators_apply_restore": kernels[APPLY_KEY]["operators"],
    }
    return {
        **sizes, **counts, "kernels": {key: jsonable(c) for key, c in kernels.items()}, "checks": checks,
        "health": health, "timings": timings, "derived": derived(timings),
    }


def derived(timings: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The EMAs' added time per training step (ms, and % of the step without EMA) and the update ratio."""
    ms = {key: timing["ms"] for key, timing in timings.items()}
    base = ms["train_no_ema"]
    return {
        "added_ms_model_ema": ms["train_model_ema"] - base,
        "added_ms_ppdet": ms["train_ppdet"] - base,
        "added_pct_model_ema": (ms["train_model_ema"] / base - 1) * 100,
        "added_pct_ppdet": (ms["train_ppdet"] / base - 1) * 100,
        "update_ppdet_over_model_ema": ms["update_ppdet"] / ms["update_model_ema"],
        "update_model_ema_over_floor": ms["update_model_ema"] / ms[FLOOR_KEY],
    }


def ops_cell(counts: dict[str, Any]) -> str:
    """A kernel count's ops, most frequent first: ``sgd_ 1024, fill_ 2``."""
    return ", ".join(f"{op} {n}" for op, n in counts["ops"].items()) or "none"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def markdown(results: dict[str, Any]) -> str:
    """One row per model: times in ms per step, the EMAs' added time, the update ratios and the kernel
    counts; then a second table of the ops each count is made of."""
    header = [
        "model", "train, no EMA", "train + ModelEMA", "train + ppdet", "added: ModelEMA", "added: ppdet",
        "update: ModelEMA", "update: ppdet", "ppdet / ModelEMA", "floor", "ModelEMA / floor",
        "apply + restore", "kernels: update", "kernels: apply + restore", "skipped update (µs)",
    ]
    rows, op_rows = [], []
    for name, model in results["models"].items():
        ms = {key: timing["ms"] for key, timing in model["timings"].items()}
        d = derived(model["timings"])
        rows.append([
            name, *(f"{ms[k]:.3f}" for k in TRAIN_KEYS),
            f"{d['added_ms_model_ema']:+.3f} ({d['added_pct_model_ema']:+.1f} %)",
            f"{d['added_ms_ppdet']:+.3f} ({d['added_pct_ppdet']:+.1f} %)",
            *(f"{ms[k]:.3f}" for k in UPDATE_KEYS),
            f"{d['update_ppdet_over_model_ema']:.2f}", f"{ms[FLOOR_KEY]:.3f}",
            f"{d['update_model_ema_over_floor']:.2f}", f"{ms[APPLY_KEY]:.3f}",
            str(model["kernels_update"]), str(model["kernels_apply_restore"]),
            f"{ms[SKIPPED_KEY] * 1000:.2f}" if SKIPPED_KEY in ms else "–",
        ])
        kernels = model["kernels"]
        op_rows.append([
            name, str(model["tensors"]), str(model[f"tensors_over_{LARGE_NUMEL}"]),
            ops_cell(kernels["update"]), ops_cell(kernels[APPLY_KEY]),
            str(kernels["update_ppdet"]["kernels"]),
        ])
    ops_header = [
        "model", "tensors", f"> {LARGE_NUMEL} elements", "ModelEMA update: ops", "apply + restore: ops",
        "ppdet update: kernels",
    ]
    return "\n".join(_table(header, rows) + ["", "Dygraph ops per call:", ""] + _table(ops_header, op_rows))


def parse_args() -> argparse.Namespace:
    return bench_ema.parse_args(__doc__.splitlines()[0], DYGRAPH_MODELS, "results/dygraph-<major.minor>.json")


def environment(args: argparse.Namespace) -> dict[str, Any]:
    return {"kind": "dygraph", "mode": f"paddle{paddle.__version__}-dygraph",
            **bench_ema.machine_and_run(args), "ppdet_decay_type": "threshold"}


def main() -> None:
    args = parse_args()
    paddle.disable_static()  # the default; said so the mode never depends on an import's side effects
    paddle.set_device("cpu")
    if args.quick:
        timer = Timer(repeats=args.repeats, warmup=2, target_s=0.03, min_runs=2)
    else:
        timer = Timer(repeats=args.repeats, warmup=5, target_s=0.25, min_runs=5)
    results = environment(args)
    results["models"] = {}
    for name in args.models:
        results["models"][name] = bench_model(name, timer)
        summary = {k: round(v["ms"], 3) for k, v in results["models"][name]["timings"].items()}
        print(f"{results['mode']} {name}: {summary}", flush=True)
    major_minor = ".".join(paddle.__version__.split(".")[:2])
    out = args.out or RESULTS_DIR / f"dygraph-{major_minor}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nPaddle {paddle.__version__}, dygraph, ms per step (median of {args.repeats}); kernels per "
          "call:\n")
    print(markdown(results))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
