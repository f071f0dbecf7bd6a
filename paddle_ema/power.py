"""The power-function EMA of Karras et al. (EDM2): its width, its step weights and the post-hoc solve.

A power-function EMA with exponent :math:`\\gamma` averages the weights seen up to training step
:math:`t` with a profile :math:`\\propto \\tau^\\gamma` over :math:`0 < \\tau \\le t`: its length grows
with training, and its relative width

.. math::

    \\sigma_\\text{rel} = \\sqrt{\\frac{\\gamma + 1}{(\\gamma + 2)^2 (\\gamma + 3)}}

stays fixed. An update at step :math:`t` that covers the :math:`\\Delta` steps since the previous
one uses :math:`\\beta = (1 - \\Delta / t)^{\\gamma + 1}`: exact for any :math:`\\Delta`, not only 1.

Post-hoc, the profile of an EMA of any :math:`\\sigma_\\text{rel}` at any step :math:`T` is
approximated by a linear combination of the profiles of stored snapshots (power-function EMAs of
other widths at earlier steps), the coefficients solving the normal equations of the profiles' closed-
form inner products (EDM2, Algorithm 3), in float64 (the Gram matrix of 80 snapshots has a condition
number of ~4e6).

References:
    Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models", CVPR 2024,
    Appendix C.2 (equations 121-127, 151; Algorithms 2 and 3).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np

from paddle_ema._select import short_repr

__all__ = [
    "MAX_GAMMA", "MAX_SIGMA_REL", "MIN_SIGMA_REL", "correlation", "gamma_to_sigma_rel",
    "posthoc_coefficients", "sigma_rel_to_gamma", "step_weight",
]

# sigma_rel(gamma) is sqrt(1/12) at gamma = 0 (a flat profile) and falls toward 0 as gamma grows.
MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)
# Narrower profiles are copies of the last weights in all but name, and their cubic overflows.
MAX_GAMMA = 1e6
MIN_SIGMA_REL = math.sqrt((MAX_GAMMA + 1.0) / ((MAX_GAMMA + 2.0) ** 2 * (MAX_GAMMA + 3.0)))  # ~1e-6


def _number(value: Any, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{argument} must be a number, got {short_repr(value)} of type {type(value).__name__}"
        )
    return float(value)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent :math:`\\gamma` of the power-function EMA of relative width ``sigma_rel``.

    The largest real root of :math:`\\gamma^3 + 7\\gamma^2 + (16 - \\sigma^{-2})\\gamma + (12 -
    \\sigma^{-2}) = 0` (EDM2, equation 126).

    Args:
        sigma_rel: The relative width, in :math:`(0, \\sqrt{1/12})` (0.2887), at least
            ``MIN_SIGMA_REL`` (1e-6).

    Returns:
        :math:`\\gamma`, positive.

    Raises:
        TypeError: ``sigma_rel`` is not a number.
        ValueError: ``sigma_rel`` is out of range.

    Example:
        .. code-block:: python

            import paddle_ema

            print(round(paddle_ema.sigma_rel_to_gamma(0.10), 4))  # 6.9372
    """
    sigma = _number(sigma_rel, "sigma_rel")
    if not MIN_SIGMA_REL <= sigma < MAX_SIGMA_REL:  # also False for NaN
        raise ValueError(
            f"sigma_rel must be in (0, sqrt(1/12) = {MAX_SIGMA_REL:.4f}) (at least {MIN_SIGMA_REL:g}), got "
            f"{sigma_rel!r}; EDM2 uses e.g. 0.05 and 0.10"
        )
    inv = sigma ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    gamma = float(roots[np.abs(roots.imag) < 1e-9 * (1 + np.abs(roots.real))].real.max())
    # One Newton step on the cubic polishes np.roots' eigenvalue answer to a few ulp.
    value = ((gamma + 7.0) * gamma + 16.0 - inv) * gamma + 12.0 - inv
    slope = (3.0 * gamma + 14.0) * gamma + 16.0 - inv
    return gamma - value / slope if slope else gamma


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of the power-function EMA of exponent ``gamma`` (EDM2, equation 123).

    :math:`\\sigma_\\text{rel}` rises from 0 at :math:`\\gamma = -1` to a peak near :math:`\\gamma =
    -0.3` and falls back to 0 as :math:`\\gamma` grows; from :math:`\\gamma = 0` on (where it is
    :math:`\\sqrt{1/12}`) each width has one exponent, the one :func:`sigma_rel_to_gamma` returns, so
    that is the range used here.

    Args:
        gamma: The exponent, positive, at most ``MAX_GAMMA`` (1e6).

    Returns:
        :math:`\\sqrt{(\\gamma + 1) / ((\\gamma + 2)^2 (\\gamma + 3))}`.

    Raises:
        TypeError: ``gamma`` is not a number.
        ValueError: ``gamma`` is not a finite positive number.
    """
    value = _number(gamma, "gamma")
    if not 0.0 < value <= MAX_GAMMA * (1.0 + 1e-9):  # (the slack: MIN_SIGMA_REL's exponent, rounded)
        raise ValueError(
            f"gamma must be a finite positive number (at most {MAX_GAMMA:g}), got {gamma!r}; EDM2 uses "
            "e.g. 6.94"
        )
    return math.sqrt((value + 1.0) / ((value + 2.0) ** 2 * (value + 3.0)))


def step_weight(gamma: float, step: int, delta: int) -> float:
    """The weight :math:`1 - \\beta = 1 - (1 - \\Delta / t)^{\\gamma + 1}` of an update at training step
    ``step`` (:math:`t`, counted from 1) covering the ``delta`` steps since the previous one.

    In float64, from ``log1p``/``expm1`` (the weight falls like :math:`(\\gamma + 1) \\Delta / t`, which
    ``1 - pow`` would lose digits of). The first update (``step == delta``) has weight 1: it copies.
    """
    if step <= delta:
        return 1.0
    return -math.expm1((gamma + 1.0) * math.log1p(-delta / step))


def correlation(a_step: Any, a_gamma: Any, b_step: Any, b_gamma: Any) -> np.ndarray:
    """The inner products of power-function EMA profiles (EDM2, equation 151), broadcasting.

    Profile :math:`p(\\tau) = (\\gamma + 1) \\tau^\\gamma / t^{\\gamma + 1}` on :math:`(0, t]`; for
    profiles ``a`` and ``b``, :math:`\\int p_a p_b = (\\gamma_a + 1)(\\gamma_b + 1)\\, r^{e} /
    ((\\gamma_a + \\gamma_b + 1) \\max(t_a, t_b))` with :math:`r = t_a / t_b` and :math:`e =
    \\gamma_b` if :math:`t_a < t_b`, else :math:`-\\gamma_a`.
    """
    a_step, a_gamma, b_step, b_gamma = (
        np.asarray(v, dtype=np.float64) for v in (a_step, a_gamma, b_step, b_gamma)
    )
    ratio = a_step / b_step
    exponent = np.where(a_step < b_step, b_gamma, -a_gamma)
    numerator = (a_gamma + 1) * (b_gamma + 1) * ratio ** exponent
    return numerator / ((a_gamma + b_gamma + 1) * np.maximum(a_step, b_step))


def posthoc_coefficients(
    steps: Sequence[float], gammas: Sequence[float], target_step: float, target_gamma: float,
) -> np.ndarray:
    """The coefficients that combine snapshots (power-function EMAs of exponents ``gammas`` taken at
    ``steps``) into the EMA of exponent ``target_gamma`` at ``target_step``: the least-squares fit of
    the target's profile by the snapshots', from the normal equations, in float64, normalised to sum
    to 1 (so a constant weight is reproduced exactly).

    Raises:
        ValueError: no snapshot, a snapshot after ``target_step`` or at a step that is not positive,
            or snapshots whose profiles are linearly dependent (the same one twice).
    """
    steps = np.asarray(steps, dtype=np.float64).reshape(-1)
    gammas = np.asarray(gammas, dtype=np.float64).reshape(-1)
    if steps.size == 0 or steps.shape != gammas.shape:
        raise ValueError("posthoc_coefficients needs one gamma per snapshot step, and at least one snapshot")
    if not (np.all(steps > 0) and np.all(steps <= target_step)):
        raise ValueError(
            f"every snapshot step must be in (0, target_step = {target_step}], got "
            f"{steps.min():g}..{steps.max():g}"
        )
    gram = correlation(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    target = correlation(steps, gammas, target_step, target_gamma)
    try:
        coefficients = np.linalg.solve(gram, target)
    except np.linalg.LinAlgError as error:
        raise ValueError(
            "the snapshots' profiles are linearly dependent (the same sigma_rel and step twice?); "
            "remove the duplicates"
        ) from error
    return coefficients / coefficients.sum()
