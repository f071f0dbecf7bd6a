"""Which tensors an EMA averages: the ``parameters=`` and ``exclude=`` options of both classes."""

from __future__ import annotations

import re
import reprlib
from typing import Any, Callable, Sequence

__all__ = ["choose", "matches_any", "short_repr", "some_names"]

# A user value shown in an error can be huge: a list of parameters reprs every tensor (207 KB for
# resnet18). reprlib shows a few items of a container and the ends of a long repr only.
_SHORT = reprlib.Repr()
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = _SHORT.maxfrozenset = _SHORT.maxdict = 4
_SHORT.maxstring = _SHORT.maxother = 100
_SHORT.maxlevel = 2


def short_repr(value: Any, limit: int = 200) -> str:
    """``repr(value)`` on one line and at most about ``limit`` characters, for an error message.

    Args:
        value: What the user passed.
        limit: The longest result.

    Returns:
        The repr, with a container's first few items and a long repr's two ends only.
    """
    text = re.sub(r"\s*\n\s*", " ", _SHORT.repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def some_names(names: Sequence[str]) -> str:
    """At most the first few of ``names``, for an error message."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` is one of ``patterns`` or matches one as a regular expression (``re.fullmatch``),
    as ``exclude`` entries are matched."""
    for pattern in patterns:
        try:
            if name == pattern or re.fullmatch(pattern, name):
                return True
        except re.error:
            continue  # an entry that is a name only (checked by choose)
    return False


def _listed(argument: str, items: Any, what: str) -> list[Any]:
    if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)):
        raise TypeError(
            f"{argument} must be a list of {what}, got {short_repr(items)} of type {type(items).__name__}; "
            f"pass e.g. {argument}=['fc_0.w_0']"
        )
    return list(items)


def choose(
    candidates: Sequence[str],
    default: Sequence[str],
    parameters: Sequence[Any] | None,
    exclude: Sequence[str] | None,
    name_of: Callable[[Any], str | None],
    where: str,
) -> list[str]:
    """The names to average, in the order of ``candidates``.

    Args:
        candidates: Every name that may be averaged.
        default: What is averaged when ``parameters`` is None.
        parameters: Names, or objects that ``name_of`` names, taken as given; must be candidates.
        exclude: Names or regular expressions (``re.fullmatch``) to leave out, after ``parameters``;
            each must match some name left by ``parameters``.
        name_of: The candidate name of a non-str item of ``parameters``, or None if it has none.
        where: What holds the candidates, for error messages (e.g. "the default main program").

    Raises:
        TypeError: ``parameters`` or ``exclude`` is not a list, or holds something unnamed.
        ValueError: a name in ``parameters`` is not a candidate, or an entry of ``exclude`` matches
            nothing (or is neither a name nor a valid regular expression).
    """
    if parameters is None:
        chosen = list(default)
    else:
        named = set()
        for item in _listed("parameters", parameters, "parameter names or parameters"):
            name = item if isinstance(item, str) else name_of(item)
            if not isinstance(name, str):
                raise TypeError(
                    f"parameters must hold parameter names or parameters of {where}, got "
                    f"{short_repr(item)} of type {type(item).__name__}"
                )
            if name not in candidates:
                raise ValueError(
                    f"parameters: {name!r} is not a parameter of {where} (it has "
                    f"{some_names(list(candidates))})"
                )
            named.add(name)
        chosen = [name for name in candidates if name in named]
    if exclude is None:
        return chosen
    left_out: set[str] = set()
    for pattern in _listed("exclude", exclude, "parameter names or regular expressions"):
        if not isinstance(pattern, str):
            raise TypeError(f"exclude must hold str names or patterns, got {short_repr(pattern)}")
        try:
            regex = re.compile(pattern)
        except re.error as error:
            if pattern not in chosen:
                raise ValueError(f"exclude: {pattern!r} is neither a parameter name nor a valid regular "
                                 f"expression ({error})") from None
            regex = None
        matched = {n for n in chosen if n == pattern or (regex is not None and regex.fullmatch(n))}
        if not matched:
            raise ValueError(
                f"exclude: {pattern!r} matches none of the parameters to average "
                f"({some_names(chosen)}); a pattern must match a whole name (re.fullmatch), e.g. "
                "r'.*\\.b_0' for every bias"
            )
        left_out |= matched
    return [name for name in chosen if name not in left_out]
