"""Choose the EMA width after training: PostHocEMA on the digits classifier, swept over sigma_rel.

Trains a small MLP on scikit-learn's digits with noisy SGD while a ``paddle_ema.PostHocEMA`` tracks
two power-function EMAs (sigma_rel 0.05 and 0.10) and writes their snapshots. After training it
synthesizes the EMA of each width in a sweep from the snapshots alone, evaluates the validation loss
under each (``with ema.apply(sigma_rel):``, restored exactly after each), and plots loss against
sigma_rel, with the raw weights' loss for comparison. The best width was never tracked.

Run: ``python examples/posthoc.py`` (``--help`` for the options; needs ``pip install ".[examples]"``)
"""

from __future__ import annotations

import argparse
import os
import sys


def options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    parser.add_argument("--out", default="out_posthoc", help="where snapshots and the plot go")
    parser.add_argument("--seed", type=int, default=0, help="random seed, 0..2**32-1 (default 0)")
    args = parser.parse_args(argv)
    if args.steps < 40:
        parser.error(f"--steps: {args.steps} is too few: it must be at least 40 (a snapshot every steps/40)")
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed: {args.seed} is out of range: it must be in 0..2**32-1")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out: {args.out!r} is a file; pass a directory")
    return args


def main(argv: list[str] | None = None) -> None:
    args = options(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import paddle
    from sklearn.datasets import load_digits

    import paddle_ema

    paddle.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int64")
    order = rng.permutation(len(x))
    train, val = order[:1200], order[1200:]
    model = paddle.nn.Sequential(paddle.nn.Linear(64, 64), paddle.nn.ReLU(), paddle.nn.Linear(64, 10))
    opt = paddle.optimizer.SGD(learning_rate=0.2, parameters=model.parameters())
    snapshots = os.path.join(args.out, "snapshots")
    ema = paddle_ema.PostHocEMA(model, (0.05, 0.10), snapshot_dir=snapshots, snapshot_every=args.steps // 40)
    for _ in range(args.steps):
        batch = rng.choice(train, 16)
        logits = model(paddle.to_tensor(x[batch]))
        loss = paddle.nn.functional.cross_entropy(logits, paddle.to_tensor(y[batch]))
        loss.backward()
        opt.step()
        opt.clear_grad()
        ema.update()

    x_val, y_val = paddle.to_tensor(x[val]), paddle.to_tensor(y[val])

    def val_loss() -> float:
        with paddle.no_grad():
            return float(paddle.nn.functional.cross_entropy(model(x_val), y_val))

    raw = val_loss()
    widths = np.round(np.linspace(0.01, 0.25, 13), 3)
    losses = []
    for sigma_rel in widths:
        with ema.apply(float(sigma_rel)):
            losses.append(val_loss())
    assert val_loss() == raw  # every apply restored the trained weights exactly
    best = int(np.argmin(losses))
    print(f"raw weights: validation loss {raw:.4f}")
    for sigma_rel, value in zip(widths, losses):
        mark = "  <- best" if value == losses[best] else ""
        print(f"sigma_rel {sigma_rel:.3f}: validation loss {value:.4f}{mark}")
    print(f"tracked 0.05 and 0.10; the best width, {widths[best]:.3f}, was synthesized after training")

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(widths, losses, "o-", label="post-hoc EMA")
    axes.axhline(raw, color="grey", linestyle="--", label="raw weights")
    axes.axvline(0.05, color="C1", alpha=0.3)
    axes.axvline(0.10, color="C1", alpha=0.3, label="tracked widths")
    axes.set_xlabel("sigma_rel (chosen after training)")
    axes.set_ylabel("validation loss")
    axes.set_title(f"digits MLP, {args.steps} SGD steps")
    axes.legend()
    figure.tight_layout()
    png = os.path.abspath(os.path.join(args.out, "posthoc_sweep.png"))
    figure.savefig(png, dpi=100)
    print(f"plot: {png}")


if __name__ == "__main__":
    main(sys.argv[1:])
