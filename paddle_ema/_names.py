"""The names of paddle_ema's state: every one is made here, and read back from a checkpoint here.

An :class:`~paddle_ema.ExponentialMovingAverage` created with ``name="ema"`` gets a unique prefix
(``ema_0``, then ``ema_1``, ...) and keeps, under it:

* ``ema_0.step``: how many updates ran (int64);
* ``ema_0.bias_correction``: the bias denominator :math:`1 - \\prod d_i` (float64);
* ``ema_0.<key>.average`` per average tensor, ``<key>`` being the parameter's name, or
  ``stack_<digest>`` for the averages of small parameters stacked together (see
  :func:`stack_name`);

and, in the scope only (in no checkpoint), ``ema_0.<key>.stacked`` (a stack's concatenation buffer)
and ``ema_0.<key>.applied`` (what apply swaps in). Paddle's own
``paddle.static.ExponentialMovingAverage`` keeps its state under other, fixed names (see
:func:`paddle_class_prefixes`), which :func:`paddle_ema.load` carries on.

A separate module from the graph builder because a checkpoint's names are read without a program
(:func:`paddle_ema.load_averages` reads the files alone): reading them needs the rules that made
them, and nothing else.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable, Sequence

from paddle.utils import unique_name

__all__ = [
    "PADDLE_DECAY",
    "PADDLE_STEP",
    "applied",
    "average",
    "averages_of",
    "bias_correction",
    "ema_prefixes",
    "is_prefix_of",
    "paddle_class_averages",
    "paddle_class_prefixes",
    "stack_limits",
    "stack_max_numel",
    "stack_name",
    "stacked",
    "step",
    "unique_prefix",
]

_STEP, _BIAS_CORRECTION, _AVERAGE = ".step", ".bias_correction", ".average"
# The float64 bias denominator is named ".bias_correction": paddle_ema 0.1 kept a float32 one as
# ".debias", and under PIR a float32 tensor loaded under the float64 one's name fails the first
# training step half-way (some averages updated, the denominator not). Under a new name, loading a
# 0.1 checkpoint fails in paddle.static.load instead, before training.

# The state of paddle.static.ExponentialMovingAverage (Paddle 2.6; 3.0 and 3.1 in the legacy IR): a
# step counter and the current decay under fixed names, and "<name><param>_ema_<n>" per parameter.
PADDLE_STEP = "@EMA_STEP_COUNTER@"
PADDLE_DECAY = "scheduled_ema_decay_rate"

# The stacking limit of paddle_ema 0.3 and earlier under PIR (see stack_limits).
_PAST_STACK_MAX_NUMEL = (1024,)


def unique_prefix(name: str) -> str:
    """A new EMA's state prefix: ``name`` made unique in the current ``unique_name`` guard
    (``"ema"`` gives ``"ema_0"``, then ``"ema_1"``)."""
    return unique_name.generate(name)


def is_prefix_of(prefix: str, name: str) -> bool:
    """Whether ``prefix`` is the state prefix of an EMA created with ``name`` (or is ``name``)."""
    return prefix == name or re.fullmatch(re.escape(name) + r"_\d+", prefix) is not None


def step(prefix: str) -> str:
    """The name of an EMA's update count."""
    return prefix + _STEP


def bias_correction(prefix: str) -> str:
    """The name of an EMA's bias denominator."""
    return prefix + _BIAS_CORRECTION


def average(prefix: str, key: str) -> str:
    """The name of an average tensor: ``key`` is a parameter's name or a :func:`stack_name`."""
    return f"{prefix}.{key}{_AVERAGE}"


def stacked(prefix: str, key: str) -> str:
    """The name of a stack's concatenation buffer (scope-only)."""
    return f"{prefix}.{key}.stacked"


def applied(prefix: str, key: str) -> str:
    """The name of the tensor apply writes a debiased average into (scope-only)."""
    return f"{prefix}.{key}.applied"


def stack_name(members: Sequence[str]) -> str:
    """``stack_<digest>``: one name per set of member parameters, whatever order they come in.

    The digest is of the sorted member names, so a checkpoint's stack is found again under the same
    model whatever order its parameters are listed in, and a stack whose members changed (a layer
    added) gets a new name instead of another stack's.
    """
    return "stack_" + hashlib.sha1("\n".join(sorted(members)).encode()).hexdigest()[:12]


def ema_prefixes(names: Iterable[str]) -> list[str]:
    """The state prefixes of the EMAs whose bias denominator is among ``names``, sorted."""
    return sorted(n[: -len(_BIAS_CORRECTION)] for n in names if n.endswith(_BIAS_CORRECTION))


def averages_of(prefix: str, names: Iterable[str]) -> dict[str, str]:
    """``{key: name}`` of the average tensors of the EMA ``prefix`` among ``names`` (see
    :func:`average`); a key that is not a parameter's name is a :func:`stack_name`."""
    head = prefix + "."
    return {
        n[len(head): -len(_AVERAGE)]: n for n in names
        if n.startswith(head) and n.endswith(_AVERAGE)
    }


def paddle_class_prefixes(names: Iterable[str], param: str) -> list[str]:
    """The ``name`` prefixes under which Paddle's class saved an average of ``param`` among
    ``names``, sorted.

    Paddle's class names a parameter's average ``name + param + "_ema_<n>"``, ``name`` being the one
    it was built with (default ``""``), the same for every parameter.
    """
    pattern = re.compile("(.*)" + re.escape(param) + r"_ema_\d+")
    return sorted({m.group(1) for n in names if (m := pattern.fullmatch(n))})


def paddle_class_averages(names: Iterable[str], prefix: str, param: str) -> list[str]:
    """The names among ``names`` that Paddle's class built with ``name=prefix`` gives the average
    of ``param`` (one, if its state is there)."""
    pattern = re.compile(re.escape(prefix + param) + r"_ema_\d+")
    return [n for n in names if pattern.fullmatch(n)]


def stack_max_numel() -> int:
    """Largest parameter (in elements) whose average is stacked with others (see _graph.Group).

    Stacking trades one op per tensor for one concatenation pass over it (into a buffer that stays
    allocated: see :func:`paddle_ema._ir.concat_into_buffer`). Measured with candidates side by side
    in one process (EMA-only programs, 2 CPU cores, Paddle 3.3): under PIR, 32k elements cut the ops
    the EMA adds to the 512-tensor fc64 *training* program from 524 to 22 and its EMA-only step from
    4.1 to 3.0 ms (1k: 0.2's limit); 256k doubles the fc512 step (1 MB tensors concatenated for
    nothing). In the legacy IR 32k was already the best of 4k-256k.
    """
    return 32768


def stack_limits() -> tuple[int, ...]:
    """Every stacking limit a checkpoint's stacks can have been made under: under PIR paddle_ema 0.3
    and earlier stacked parameters of up to 1024 elements; since, :func:`stack_max_numel` in both IRs."""
    return tuple(dict.fromkeys((*_PAST_STACK_MAX_NUMEL, stack_max_numel())))
