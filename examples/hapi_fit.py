"""paddle.Model.fit with paddle_ema's EMACallback: raw against averaged accuracy on a small task.

A noisy two-class problem (points around two centres, a quarter of the labels flipped), learnt by a
small MLP with a high learning rate, so the raw weights jitter from batch to batch and their average
generalises better. ``fit`` evaluates the averages after every epoch; the raw network is evaluated
beside them. Prints one line per epoch and writes the averaged weights beside fit's checkpoints.

    python examples/hapi_fit.py [--epochs 6] [--save-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import paddle

import paddle_ema


class Noisy(paddle.io.Dataset):
    def __init__(self, n: int, seed: int, flip: float) -> None:
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 2, n)
        centres = np.array([[1.0, 1.0, 0.0, 0.0], [-1.0, -1.0, 0.0, 0.0]], "float32")
        self.x = (centres[labels] + rng.standard_normal((n, 4))).astype("float32")
        noisy = rng.random(n) < flip
        self.y = np.where(noisy, 1 - labels, labels).astype("int64")

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i:i + 1]


class RawAccuracy(paddle.callbacks.Callback):
    """Evaluates the raw network at the end of each epoch, beside fit's evaluation of the averages."""

    def __init__(self, data: paddle.io.Dataset) -> None:
        super().__init__()
        self.data, self.rows = data, []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.rows.append(self.model.evaluate(self.data, batch_size=64, verbose=0)["acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--save-dir", default=None)
    args = parser.parse_args()
    paddle.seed(0)
    train, test = Noisy(2048, 1, 0.25), Noisy(2048, 2, 0.0)
    network = paddle.nn.Sequential(paddle.nn.Linear(4, 64), paddle.nn.ReLU(), paddle.nn.Linear(64, 2))
    model = paddle.Model(network)
    model.prepare(paddle.optimizer.SGD(0.5, parameters=network.parameters()),
                  paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy())
    ema = paddle_ema.callbacks.EMACallback(decay=0.98, warmup="threshold")
    raw = RawAccuracy(test)
    averaged = []

    class Record(paddle.callbacks.Callback):
        def on_eval_end(self, logs: dict | None = None) -> None:
            averaged.append(logs["acc"])

    save_dir = args.save_dir or tempfile.mkdtemp()
    model.fit(train, test, batch_size=32, epochs=args.epochs, callbacks=[raw, ema, Record()],
              save_dir=save_dir, verbose=0)
    for epoch, (r, a) in enumerate(zip(raw.rows, averaged)):
        print(f"epoch {epoch}: raw accuracy {r:.4f}, averaged accuracy {a:.4f}")
    print(f"averaged weights: {save_dir}/final_ema.pdparams")


if __name__ == "__main__":
    main()
