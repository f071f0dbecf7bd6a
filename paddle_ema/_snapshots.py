"""PostHocEMA's snapshot directory: the files, the run's manifest, and their combination.

A run writes, per snapshot step and tracked width, ``phema-<sigma_rel>-<step>.pdparams`` (``repr`` of
the width, so it parses back to the same float), each holding the run's id, the width, the exponent,
the step and the averages. The manifest ``phema-run.json`` names the run and lists every snapshot it
wrote with the tensors' names and shapes (as a few distinct layouts); a snapshot is in the directory
once the manifest lists it. Every file is written to a ``.partial`` name first and renamed, so none is
ever seen half-written. Files the manifest does not list (another tool's, a failed write's) are
ignored; snapshots of another run are refused, never mixed in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
from typing import Any, Sequence

import numpy as np
import paddle

from paddle_ema import power
from paddle_ema._select import short_repr

__all__ = [
    "MANIFEST", "Entry", "Manifest", "check_distinct", "combine", "file_name", "replace_later_than",
    "write_snapshot",
]

_logger = logging.getLogger(__name__)

MANIFEST = "phema-run.json"
_FORMAT = "paddle_ema.posthoc/1"
_REPLACED = "replaced"  # where a resumed run moves the snapshots of the run it replaces


@dataclasses.dataclass(frozen=True)
class Entry:
    """One snapshot: its file (in the directory), step, width, exponent and layout (an index)."""

    file: str
    step: int
    sigma_rel: float
    gamma: float
    layout: int


@dataclasses.dataclass
class Manifest:
    """The run a snapshot directory belongs to and the snapshots it wrote there."""

    run: str
    entries: list[Entry] = dataclasses.field(default_factory=list)
    layouts: list[dict[str, list[int]]] = dataclasses.field(default_factory=list)

    @classmethod
    def read(cls, folder: str) -> Manifest | None:
        """The manifest of ``folder``, or None if it has none.

        Raises:
            ValueError: the manifest is not one this module wrote (hand-edited, truncated).
        """
        path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as handle:
                raw = json.load(handle)
            layouts = [{str(n): [int(d) for d in shape] for n, shape in layout.items()}
                       for layout in raw["layouts"]]
            entries = [Entry(str(e["file"]), _int(e["step"]), float(e["sigma_rel"]), float(e["gamma"]),
                             _int(e["layout"])) for e in raw["entries"]]
            if raw["format"] != _FORMAT or not isinstance(raw["run"], str):
                raise ValueError("not this format")
            if any(not 0 <= e.layout < len(layouts) or e.step < 1 or os.path.basename(e.file) != e.file
                   for e in entries):
                raise ValueError("an entry does not fit")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"{path!r} is not a PostHocEMA manifest ({type(error).__name__}: {error}); it was edited "
                "or truncated: restore it, or pass a directory of one run"
            ) from error
        return cls(raw["run"], entries, layouts)

    def write(self, folder: str) -> None:
        """Replace the manifest of ``folder`` whole."""
        content = {"format": _FORMAT, "run": self.run, "layouts": self.layouts,
                   "entries": [dataclasses.asdict(e) for e in self.entries]}
        _atomic_write(os.path.join(folder, MANIFEST), lambda path: _write_json(path, content))

    def layout_of(self, shapes: dict[str, list[int]]) -> int:
        """The index of ``shapes`` among the layouts, added if new."""
        if shapes not in self.layouts:
            self.layouts.append(shapes)
        return self.layouts.index(shapes)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{value!r} is not an int")
    return int(value)


def _write_json(path: str, content: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle)


def _atomic_write(path: str, write: Any) -> None:
    """Write ``path`` whole or not at all: to ``path + '.partial'``, then renamed.

    Raises:
        RuntimeError: the write or the rename failed (the partial file is removed); it names the path.
    """
    partial = path + ".partial"
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(f"a directory is in the way at {path!r}")
        write(partial)
        os.replace(partial, path)
    except BaseException as error:
        if os.path.exists(partial) and not os.path.isdir(partial):
            os.remove(partial)
        if not isinstance(error, Exception):
            raise
        raise RuntimeError(f"could not write {path!r}: {type(error).__name__}: {error}") from error


def file_name(sigma_rel: float, step: int) -> str:
    return f"phema-{sigma_rel!r}-{step:010d}.pdparams"


def write_snapshot(folder: str, run: str, sigma_rel: float, gamma: float, step: int,
                   averages: dict[str, np.ndarray]) -> str:
    """Write one snapshot file whole; returns its name. See :func:`_atomic_write` for the errors."""
    name = file_name(sigma_rel, step)
    content = {"format": _FORMAT, "run": run, "sigma_rel": sigma_rel, "gamma": gamma, "step": step,
               "averages": averages}
    _atomic_write(os.path.join(folder, name), lambda path: paddle.save(content, path))
    return name


def replace_later_than(folder: str, manifest: Manifest, step: int) -> list[Entry]:
    """Drop the entries after ``step`` from ``manifest`` (written first) and move their files into
    ``folder/replaced/``: a run resumed at ``step`` replaces them. Returns the entries moved."""
    later = [e for e in manifest.entries if e.step > step]
    if not later:
        return []
    manifest.entries = [e for e in manifest.entries if e.step <= step]
    manifest.write(folder)
    aside = os.path.join(folder, _REPLACED)
    os.makedirs(aside, exist_ok=True)
    for entry in later:
        source = os.path.join(folder, entry.file)
        if os.path.isfile(source):
            os.replace(source, os.path.join(aside, entry.file))
    return later


def combine(
    folder: str, manifest: Manifest, sigma_rel: float, step: int | None,
) -> tuple[dict[str, np.ndarray], str]:
    """The EMA of width ``sigma_rel`` at snapshot step ``step`` (default the last) from the snapshots
    of ``manifest``: float64 arrays by name, and the snapshots' dtype.

    Each tensor is solved for with the snapshots that hold it (a tensor the model gained during the run
    is in the later ones only) at the step's shape. A snapshot is read once, and checked against the
    manifest (run, step, exponent, names and shapes) before it is used.

    Raises:
        ValueError: ``sigma_rel`` out of range, ``step`` not a snapshot step, or a snapshot that
            does not match the manifest.
    """
    gamma = power.sigma_rel_to_gamma(sigma_rel)
    steps = sorted({e.step for e in manifest.entries})
    if not steps:
        raise ValueError(f"the run in {folder!r} has written no snapshot yet")
    target = steps[-1] if step is None else step
    if isinstance(target, bool) or not isinstance(target, numbers.Integral):
        raise TypeError(f"step must be an int (a snapshot step), got {short_repr(step)}")
    target = int(target)
    if target not in steps:
        before = [s for s in steps if s < target][-1:]
        after = [s for s in steps if s > target][:1]
        near = before + after
        raise ValueError(
            f"step {target} is not a snapshot step (the EMA is reconstructed at the steps snapshots were "
            f"taken; the nearest: {near}; the snapshots span {steps[0]}..{steps[-1]})"
        )
    used = [e for e in manifest.entries if e.step <= target]
    last = [e for e in used if e.step == target]
    targets = manifest.layouts[last[0].layout]
    if any(manifest.layouts[e.layout] != targets for e in last):
        raise ValueError(
            f"the snapshots of step {target} hold different tensors: the manifest is inconsistent"
        )
    # Per tensor, the snapshots holding it at the target's shape; tensors sharing that set share the
    # solve.
    holders = {name: tuple(i for i, e in enumerate(used) if manifest.layouts[e.layout].get(name) == shape)
               for name, shape in targets.items()}
    coefficients = {}
    for group in set(holders.values()):
        chosen = [used[i] for i in group]
        coefficients[group] = dict(zip(group, power.posthoc_coefficients(
            [e.step for e in chosen], [e.gamma for e in chosen], float(target), gamma)))
    totals: dict[str, np.ndarray] = {}
    never_negative = dict.fromkeys(targets, True)
    dtype = None
    for index, entry in enumerate(used):
        path = os.path.join(folder, entry.file)
        averages = _load_checked(path, manifest, entry)
        for name, value in averages.items():
            group = holders.get(name)
            if group is None or index not in group:
                continue
            array = np.asarray(value)
            dtype = dtype or str(array.dtype)
            never_negative[name] = never_negative[name] and bool(array.min(initial=0.0) >= 0)
            weighted = coefficients[group][index] * array.astype(np.float64)
            totals[name] = weighted if name not in totals else totals[name] + weighted
    negative = sorted(n for n, total in totals.items() if never_negative[n] and total.min(initial=0.0) < 0)
    if negative:
        _logger.warning(
            "the EMA of sigma_rel %s synthesized at step %d has negative values in %s, which no snapshot "
            "has (a batch-norm variance?): widths far from the tracked ones extrapolate; choose one "
            "nearer them", sigma_rel, target, negative[:5],
        )
    return totals, dtype or "float32"


def _load_checked(path: str, manifest: Manifest, entry: Entry) -> dict[str, Any]:
    """The averages of snapshot ``path``, checked against its manifest entry.

    Raises:
        ValueError: the file is missing, unreadable or does not match (naming the file and what).
    """
    try:
        content = paddle.load(path, return_numpy=True)
    except Exception as error:  # noqa: BLE001 - any failure to read is the same problem for the user
        raise ValueError(f"cannot read the snapshot {path!r} ({type(error).__name__}: {error})") from error
    problem = None
    if not isinstance(content, dict) or content.get("format") != _FORMAT:
        problem = "it is not a PostHocEMA snapshot"
    elif content.get("run") != manifest.run:
        problem = f"it is of run {short_repr(content.get('run'))}, the manifest's is {manifest.run!r}"
    elif content.get("step") != entry.step or content.get("gamma") != entry.gamma:
        problem = (f"it holds step {content.get('step')!r} and gamma {content.get('gamma')!r}, the manifest "
                   f"says {entry.step} and {entry.gamma}")
    elif not isinstance(content.get("averages"), dict):
        problem = "it holds no averages"
    else:
        shapes = {n: list(np.shape(v)) for n, v in content["averages"].items()}
        if shapes != manifest.layouts[entry.layout]:
            problem = "its tensors' names or shapes are not the manifest's"
    if problem:
        raise ValueError(f"the snapshot {path!r} does not match the run's manifest: {problem}")
    return content["averages"]


def check_distinct(sigma_rels: Sequence[float]) -> None:
    """Widths closer than 10% carry nearly the same profile: the solve turns ill-conditioned
    (condition number 6e7 at 0.05 and 0.055 with 80 snapshots each, 1e15 at 0.05 and 0.050001)."""
    ordered = sorted(sigma_rels)
    for low, high in zip(ordered, ordered[1:]):
        if high < 1.1 * low or math.isclose(low, high):
            raise ValueError(
                f"sigma_rels {low!r} and {high!r} are within 10% of each other: they carry nearly the same "
                "information and make the post-hoc solve ill-conditioned; track widths at least 10% apart, "
                "e.g. (0.05, 0.10)"
            )
