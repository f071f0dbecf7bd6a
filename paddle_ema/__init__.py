"""paddle_ema: an exact, working exponential moving average for PaddlePaddle.

``ExponentialMovingAverage`` is a drop-in for ``paddle.static.ExponentialMovingAverage`` on Paddle 3.x
(PIR and legacy IR) and 2.6; ``ModelEMA`` is its dygraph twin, with the same maths.
"""

import logging

from paddle_ema import callbacks, compat, posthoc, power
from paddle_ema._version import __version__
from paddle_ema.checkpoint import load, load_averages
from paddle_ema.dygraph import ModelEMA
from paddle_ema.ema import ExponentialMovingAverage
from paddle_ema.posthoc import PostHocEMA, PowerEMA
from paddle_ema.power import gamma_to_sigma_rel, sigma_rel_to_gamma
from paddle_ema.steps import global_step_counter

__all__ = [
    "ExponentialMovingAverage", "ModelEMA", "PostHocEMA", "PowerEMA", "__version__", "callbacks", "compat",
    "gamma_to_sigma_rel", "global_step_counter", "load", "load_averages", "posthoc", "power",
    "sigma_rel_to_gamma",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
