"""What EMA buys: a noisy classifier on scikit-learn's handwritten digits, raw weights vs averaged.

A static-graph MLP is trained with momentum SGD at a deliberately high learning rate on the 8x8 digits
that scikit-learn ships (1,797 images, no download). After every epoch the validation set is evaluated
with the raw weights and, inside ``ema.apply(exe)``, with paddle_ema's averaged weights. The decay warms
up from the global step (``thres_steps``). At the end the averaged model is exported for inference and
loaded back to show it reproduces the EMA accuracy.

Run: ``python examples/digits.py [--epochs 30] [--decay 0.99] [--lr 0.3] [--seed 0] [--out out]
[--no-progress]``
Needs the demo extras: ``pip install .[examples]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path


def _in_range(kind, ok, what: str):
    """An argparse type: a finite ``kind`` for which ``ok`` holds, else a usage error saying ``what``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n' if kind is int else ''} "
                                             f"{kind.__name__}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {what}")
        return value

    return parse


def _folder(text: str) -> Path:
    """An argparse type: a folder that exists or can be made (no part of the path is a file)."""
    path = Path(text)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise argparse.ArgumentTypeError(f"{text} cannot be a folder: {part} is a file")
            break
    return path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=_in_range(int, lambda n: n >= 1, "at least 1"), default=30,
                        help="training epochs, at least 1 (default 30)")
    parser.add_argument("--decay", type=_in_range(float, lambda d: 0 <= d < 1, "in [0, 1)"), default=0.99,
                        help="EMA decay in [0, 1) (default 0.99)")
    parser.add_argument("--lr", type=_in_range(float, lambda lr: lr > 0, "positive"), default=0.3,
                        help="momentum SGD learning rate, positive; high on purpose (default 0.3)")
    parser.add_argument("--seed", type=_in_range(int, lambda s: 0 <= s < 2**32, f"in [0, {2**32 - 1}]"),
                        default=0, help="seed for the split, init and shuffling, in [0, 2**32) (default 0)")
    parser.add_argument("--out", type=_folder, default=Path("out"), help="folder for the plot and model")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()  # --help and bad arguments end here, before Paddle is imported
    os.environ.setdefault("GLOG_minloglevel", "2")  # read by Paddle's C++ logging when it loads

import numpy as np  # noqa: E402
import paddle  # noqa: E402

import paddle_ema  # noqa: E402

HIDDEN = 128
BATCH_SIZE = 32
MOMENTUM = 0.9
LAST_EPOCHS = 5  # the spread of validation accuracy is reported over this many final epochs


@dataclasses.dataclass
class Model:
    """The handles a training loop needs, in the active IR."""

    main: paddle.static.Program
    startup: paddle.static.Program
    test_program: paddle.static.Program
    train_loss: object
    test_inputs: tuple  # (images, labels) as seen in test_program
    test_logits: object
    test_loss: object
    ema: paddle_ema.ExponentialMovingAverage


@dataclasses.dataclass
class History:
    raw_acc: list = dataclasses.field(default_factory=list)
    ema_acc: list = dataclasses.field(default_factory=list)
    raw_loss: list = dataclasses.field(default_factory=list)
    ema_loss: list = dataclasses.field(default_factory=list)


def load_data(seed: int):
    """Train/validation split of scikit-learn's digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.data / 16.0).astype("float32")
    labels = digits.target.astype("int64").reshape(-1, 1)
    return train_test_split(images, labels, test_size=0.25, random_state=seed, stratify=labels)


def clone_for_test(main, values):
    """An inference copy of ``main`` and ``values`` as seen in it (PIR clones through an IrMapping)."""
    if paddle.framework.in_pir_mode():
        mapping = paddle.pir.IrMapping()
        program = main.clone(mapping)
        return program, [mapping.look_up(v) for v in values]
    return main.clone(for_test=True), list(values)


def build_model(n_features: int, decay: float, lr: float, seed: int) -> Model:
    main, startup = paddle.static.Program(), paddle.static.Program()
    main.random_seed = startup.random_seed = seed
    with paddle.static.program_guard(main, startup):
        images = paddle.static.data("images", [-1, n_features], "float32")
        labels = paddle.static.data("labels", [-1, 1], "int64")
        hidden = paddle.nn.functional.relu(paddle.static.nn.fc(images, HIDDEN))
        logits = paddle.static.nn.fc(hidden, 10)
        loss = paddle.nn.functional.cross_entropy(logits, labels)
        test_program, (test_images, test_labels, test_logits, test_loss) = clone_for_test(
            main, [images, labels, logits, loss]
        )
        paddle.optimizer.Momentum(learning_rate=lr, momentum=MOMENTUM).minimize(loss)
        step = paddle_ema.global_step_counter()
        ema = paddle_ema.ExponentialMovingAverage(decay, thres_steps=step)
        ema.update()
    return Model(main, startup, test_program, loss, (test_images, test_labels), test_logits, test_loss, ema)


def evaluate(exe, program, logits, loss, images, labels) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``program`` on a data set (fed as "images", "labels")."""
    out_logits, out_loss = exe.run(
        program, feed={"images": images, "labels": labels}, fetch_list=[logits, loss]
    )
    accuracy = float(np.mean(np.argmax(out_logits, axis=1) == labels.reshape(-1)))
    return accuracy, float(np.mean(out_loss))


def train(model: Model, exe, data, epochs: int, seed: int, progress: bool) -> History:
    from tqdm import tqdm

    x_train, x_val, y_train, y_val = data
    rng = np.random.default_rng(seed)
    history = History()
    n_batches = -(-len(x_train) // BATCH_SIZE)
    bar = tqdm(total=epochs * n_batches, unit="batch", disable=not progress, dynamic_ncols=True)
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            (loss,) = exe.run(
                model.main,
                feed={"images": x_train[batch], "labels": y_train[batch]},
                fetch_list=[model.train_loss],
            )
            if not np.isfinite(loss).all():
                bar.close()
                sys.exit(f"training diverged: the loss is {float(np.mean(loss))} in epoch {epoch + 1}; "
                         "lower --lr")
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(np.mean(loss)):.3f}", refresh=False)
        raw = evaluate(exe, model.test_program, model.test_logits, model.test_loss, x_val, y_val)
        with model.ema.apply(exe):
            averaged = evaluate(exe, model.test_program, model.test_logits, model.test_loss, x_val, y_val)
        for series, value in zip(
            (history.raw_acc, history.raw_loss, history.ema_acc, history.ema_loss), raw + averaged
        ):
            series.append(value)
        bar.set_postfix(epoch=epoch + 1, raw_acc=f"{raw[0]:.3f}", ema_acc=f"{averaged[0]:.3f}")
    bar.close()
    return history


def export_and_reload(model: Model, exe, out: Path, x_val, y_val) -> float:
    """Save the averaged weights as an inference model, load it into a fresh scope, return its accuracy."""
    prefix = str(out / "digits_ema")
    with model.ema.apply(exe):
        paddle.static.save_inference_model(
            prefix, [model.test_inputs[0]], [model.test_logits], exe, program=model.test_program
        )
    with paddle.static.scope_guard(paddle.static.Scope()):
        program, feed_names, fetch_targets = paddle.static.load_inference_model(prefix, exe)
        (logits,) = exe.run(program, feed={feed_names[0]: x_val}, fetch_list=fetch_targets)
    return float(np.mean(np.argmax(logits, axis=1) == y_val.reshape(-1)))


def plot(history: History, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history.raw_acc) + 1)
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, raw, averaged, label in (
        (acc_ax, history.raw_acc, history.ema_acc, "validation accuracy"),
        (loss_ax, history.raw_loss, history.ema_loss, "validation loss"),
    ):
        ax.plot(epochs, raw, "o-", color="tab:gray", label="raw weights", markersize=3)
        ax.plot(epochs, averaged, "o-", color="tab:blue", label="EMA weights (paddle_ema)", markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    loss_ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(history: History, exported_acc: float) -> str:
    """A markdown table of raw vs EMA validation metrics: final, spread over the last epochs, best."""
    last_n = min(LAST_EPOCHS, len(history.raw_acc))
    header = (
        f"| weights | final acc | mean acc, last {last_n} | std acc, last {last_n} "
        f"| min acc, last {last_n} | mean acc, all epochs | best acc | final loss |"
    )
    lines = [header, "|" + "|".join("---" for _ in range(8)) + "|"]
    for name, acc, loss in (
        ("raw", history.raw_acc, history.raw_loss),
        ("EMA", history.ema_acc, history.ema_loss),
    ):
        last = np.array(acc[-last_n:])
        lines.append(
            f"| {name} | {acc[-1]:.4f} | {last.mean():.4f} | {last.std():.4f} | {last.min():.4f} "
            f"| {np.mean(acc):.4f} | {max(acc):.4f} | {loss[-1]:.4f} |"
        )
    lines.append(f"\nexported EMA inference model, reloaded: accuracy {exported_acc:.4f}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    paddle.enable_static()
    paddle.seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    data = load_data(args.seed)
    x_train, x_val = data[0], data[1]
    model = build_model(x_train.shape[1], args.decay, args.lr, args.seed)
    exe = paddle.static.Executor(paddle.CPUPlace())
    with paddle.static.scope_guard(paddle.static.Scope()):
        exe.run(model.startup)
        history = train(model, exe, data, args.epochs, args.seed, progress=not args.no_progress)
        exported_acc = export_and_reload(model, exe, args.out, x_val, data[3])

    mode = "PIR" if paddle.framework.in_pir_mode() else "legacy IR"
    title = (
        f"digits MLP, momentum SGD lr={args.lr}, EMA decay={args.decay} "
        f"(paddle {paddle.__version__}, {mode}, seed {args.seed})"
    )
    png = args.out / "digits_ema.png"
    plot(history, png, title)
    print(title)
    print(f"{len(x_train)} training / {len(x_val)} validation images, {args.epochs} epochs\n")
    print(summary_table(history, exported_acc))
    print(f"\nplot: {png.resolve()}")
    print(f"inference model: {(args.out / 'digits_ema').resolve()}.*")
    return {"history": dataclasses.asdict(history), "exported_acc": exported_acc, "png": str(png)}


if __name__ == "__main__":
    main(ARGS)
