"""An independent float64 numpy reference for the EMA, written from the doc's formulas.

It keeps the product of the decays directly (not paddle_ema's moving average of 1), so it checks the
library's bias correction rather than repeating it.
"""

from __future__ import annotations

import numpy as np


def scheduled_decay(decay: float, thres_value: float | None) -> float:
    """The doc's schedule: min(decay, (1 + s) / (10 + s)), or the plain decay without thres_steps.

    paddle_ema counts a negative s as 0 (the doc's formula would give a negative or infinite decay).
    """
    if thres_value is None:
        return decay
    s = max(float(thres_value), 0.0)
    return min(decay, (1.0 + s) / (10.0 + s))


def decay_at(update: int, decay: float, *, thres_value: float | None = None, start_step: int = 0,
             power: float | None = None, inv_gamma: float = 1.0, min_decay: float = 0.0) -> float:
    """The decay of update number ``update`` (from 0), from the formulas of the "beyond" issue:

    0 for the first ``start_step`` updates; then the doc's threshold schedule, or the power warm-up
    d = 1 - (1 + t / inv_gamma) ** -power with t = update - start_step, clipped to [min_decay, decay].
    """
    if update < start_step:
        return 0.0
    if power is not None:
        d = 1.0 - (1.0 + (update - start_step) / inv_gamma) ** (-power)
    else:
        d = scheduled_decay(decay, thres_value)
    return min(max(d, min_decay), decay)


class EmaOracle:
    """Step-by-step reference: ema_t = d_t ema_{t-1} + (1 - d_t) theta_t, from zero."""

    def __init__(self, decay: float, names: list[str]) -> None:
        self.decay = decay
        self.averages = {name: 0.0 for name in names}
        self.decay_product = 1.0
        self.steps = 0

    def step(self, params: dict[str, np.ndarray], thres_value: float | None = None,
             decay: float | None = None) -> None:
        """One update, with ``decay`` if given, else the doc's schedule of ``thres_value``."""
        d = scheduled_decay(self.decay, thres_value) if decay is None else decay
        for name in self.averages:
            theta = np.asarray(params[name], dtype=np.float64)
            self.averages[name] = d * self.averages[name] + (1.0 - d) * theta
        self.decay_product *= d
        self.steps += 1

    def debiased(self, name: str) -> np.ndarray:
        """ema_t / (1 - prod d_i): what apply() must write into the parameter (t >= 1)."""
        assert self.steps > 0, "the oracle has no average before the first step"
        return self.averages[name] / (1.0 - self.decay_product)
