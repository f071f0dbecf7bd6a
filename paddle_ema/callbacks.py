"""An EMA for ``paddle.Model.fit``: a callback that averages the network and evaluates the averages."""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import paddle

from paddle_ema.dygraph import ModelEMA

__all__ = ["EMACallback"]

_logger = logging.getLogger(__name__)

_MODEL_EMA_OPTIONS = set(inspect.signature(ModelEMA).parameters) - {"model", "decay"}


def _fit_arguments() -> dict[str, Any]:
    """``save_dir`` and ``save_freq`` of the ``paddle.Model.fit`` call that is running the callbacks,
    read from its frame (they are public arguments of ``fit``; no callback is told them), or {}."""
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code is paddle.Model.fit.__code__:
            return {key: frame.f_locals.get(key) for key in ("save_dir", "save_freq")}
        frame = frame.f_back
    return {}


class EMACallback(paddle.callbacks.Callback):
    """A :class:`paddle_ema.ModelEMA` of ``paddle.Model``'s network, kept by ``fit``.

    Built on ``on_train_begin`` (``cb.ema``; a later ``fit`` with the same network goes on with it),
    updated after every training batch, and swapped in for every evaluation once it has an average:
    the evaluation inside ``fit`` (``eval_data``) and ``Model.evaluate(..., callbacks=[cb])`` report
    the averaged network's metrics, and the trained weights are restored bit-exactly after. When
    ``fit`` saves checkpoints (``save_dir``), the averaged network's weights are written beside them
    as ``{save_dir}/{epoch}_ema.pdparams`` and ``final_ema.pdparams`` (the keys of the network's
    ``state_dict``), which ``model.load(f"{save_dir}/final_ema")`` reads.

    ``fit(accumulate_grad_batches=k)`` steps the optimizer every ``k`` batches; no callback is told
    which, so pass ``update_every=k`` to average once per optimizer step.

    Dygraph only: ``paddle.Model`` in static mode keeps its weights in a static scope, which
    ``on_train_begin`` refuses to average (build the network with
    :class:`paddle_ema.ExponentialMovingAverage` there).

    Args:
        decay: The decay of the ModelEMA.
        **options: Any other :class:`paddle_ema.ModelEMA` option (``warmup``, ``init``, ...).

    Raises:
        TypeError: an option is not one of ModelEMA's.

    Example:
        .. code-block:: python

            import numpy as np
            import paddle
            import paddle_ema

            class Points(paddle.io.Dataset):
                def __len__(self):
                    return 64
                def __getitem__(self, i):
                    x = np.random.default_rng(i).standard_normal(4).astype("float32")
                    return x, np.array([int(x.sum() > 0)], "int64")

            network = paddle.nn.Sequential(paddle.nn.Linear(4, 16), paddle.nn.ReLU(), paddle.nn.Linear(16, 2))
            model = paddle.Model(network)
            model.prepare(paddle.optimizer.Adam(1e-2, parameters=network.parameters()),
                          paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy())
            ema = paddle_ema.callbacks.EMACallback(decay=0.99, warmup="threshold")
            model.fit(Points(), Points(), batch_size=16, epochs=2, callbacks=[ema], verbose=0)
            print(model.evaluate(Points(), batch_size=16, callbacks=[ema], verbose=0))  # the averages
    """

    def __init__(self, decay: float = 0.999, **options: Any) -> None:
        super().__init__()
        unknown = sorted(set(options) - _MODEL_EMA_OPTIONS)
        if unknown:
            raise TypeError(
                f"EMACallback got {unknown}, which ModelEMA does not take; its options are "
                f"{sorted(_MODEL_EMA_OPTIONS)}"
            )
        self._decay = decay
        self._options = options
        self.ema: ModelEMA | None = None
        self._applied = False
        self._save: dict[str, Any] = {}

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not paddle.in_dynamic_mode():
            raise RuntimeError(
                "EMACallback averages a dygraph network; paddle.Model in static mode keeps its weights "
                "in a static scope: build the network with paddle_ema.ExponentialMovingAverage instead"
            )
        network = self.model.network
        if self.ema is None or self.ema._layer is not network:
            self.ema = ModelEMA(network, self._decay, **self._options)
        self._save = _fit_arguments()

    def on_train_batch_end(self, step: int, logs: dict | None = None) -> None:
        self.ema.update()

    def on_eval_begin(self, logs: dict | None = None) -> None:
        if self.ema is not None and self.ema.num_updates > 0 and not self._applied:
            self.ema.apply(need_restore=False)
            self._applied = True

    def on_eval_end(self, logs: dict | None = None) -> None:
        if self._applied:
            self._applied = False
            self.ema.restore()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        freq = self._save.get("save_freq") or 1
        if epoch % freq == 0:
            self._write(str(epoch))

    def on_train_end(self, logs: dict | None = None) -> None:
        self._write("final")

    def _write(self, name: str) -> None:
        """The averaged network's state dict beside ``fit``'s checkpoint ``name`` (rank 0 only, as
        ``paddle.callbacks.ModelCheckpoint`` saves)."""
        save_dir = self._save.get("save_dir")
        if not save_dir or self.ema is None or paddle.distributed.get_rank() != 0:
            return
        averages = self.ema.averages()
        state = {k: averages.get(k, v) for k, v in self.ema._layer.state_dict().items()}
        path = os.path.join(save_dir, f"{name}_ema.pdparams")
        paddle.save(state, path)
        _logger.debug("EMACallback saved the averaged weights to %s", path)
