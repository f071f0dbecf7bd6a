"""paddle_ema: an exact, working ExponentialMovingAverage for PaddlePaddle static graphs.

Drop-in for ``paddle.static.ExponentialMovingAverage`` on Paddle 3.x (PIR and legacy IR) and 2.6.
"""

import logging

from paddle_ema._version import __version__
from paddle_ema.checkpoint import load, load_averages
from paddle_ema.ema import ExponentialMovingAverage
from paddle_ema.steps import global_step_counter

__all__ = ["ExponentialMovingAverage", "__version__", "global_step_counter", "load", "load_averages"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
