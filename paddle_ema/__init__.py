"""paddle_ema: an exact, working exponential moving average for PaddlePaddle.

``ExponentialMovingAverage`` is a drop-in for ``paddle.static.ExponentialMovingAverage`` on Paddle 3.x
(PIR and legacy IR) and 2.6; ``ModelEMA`` is its dygraph twin, with the same maths.
"""

import logging

from paddle_ema import callbacks, compat
from paddle_ema._version import __version__
from paddle_ema.checkpoint import load, load_averages
from paddle_ema.dygraph import ModelEMA
from paddle_ema.ema import ExponentialMovingAverage
from paddle_ema.steps import global_step_counter

__all__ = [
    "ExponentialMovingAverage", "ModelEMA", "__version__", "callbacks", "compat", "global_step_counter",
    "load", "load_averages",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
