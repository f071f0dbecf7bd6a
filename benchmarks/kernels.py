"""Count the dygraph ops and kernel launches a Python callable runs, with Paddle's CPU profiler.

A dygraph update over N tensors that launches one kernel per tensor pays Python and dispatch overhead N
times; one that fuses them launches a few. :func:`count_kernels` runs the callable once under
``paddle.profiler.Profiler`` and walks the recorded event tree:

* ``operators``: ``Operator`` events, one per dygraph op entered from Python (named e.g.
  ``'add dygraph'``, ``'sgd_ dygraph'``); ops an op runs inside itself, if any, are counted apart as
  ``nested_operators``, not here;
* ``kernels``: kernel launches. Paddle 3.x records one ``DygraphKernelLaunch`` event under each
  operator (``'add kernel launch'``); Paddle 2.6 has no such event type and records the kernel as an
  ``OperatorInner`` event named ``'<op> compute'`` (beside ``'<op> infer_meta'``), which is what is
  counted there. ``kernel_event`` says which was found;
* ``ops``: a Counter of the operators' names without the `` dygraph`` suffix.

Everything is counted over every thread the profiler recorded. Usage::

    from kernels import count_kernels
    counts = count_kernels(ema.update)   # {'operators': 1026, 'kernels': 1026, 'ops': Counter(...), ...}
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterator

import paddle
from paddle import profiler

OPERATOR = "Operator"
KERNEL_LAUNCH = "DygraphKernelLaunch"  # Paddle 3.x
INNER = "OperatorInner"  # Paddle 2.6 records the kernel as an inner event '<op> compute'
COMPUTE_SUFFIX = " compute"
OP_SUFFIX = " dygraph"


def _walk(node: Any, depth_in_ops: int = 0) -> Iterator[tuple[Any, int]]:
    """Every node under ``node`` (itself included), with how many Operator events enclose it."""
    yield node, depth_in_ops
    inside = depth_in_ops + (node.type.name == OPERATOR)
    for child in node.children_node:
        yield from _walk(child, inside)


def _op_name(event_name: str) -> str:
    return event_name[: -len(OP_SUFFIX)] if event_name.endswith(OP_SUFFIX) else event_name


def count_events(roots: dict[Any, Any]) -> dict[str, Any]:
    """The counts of :func:`count_kernels` from ``profiler_result.get_data()`` (thread -> root node)."""
    ops: collections.Counter[str] = collections.Counter()
    nested = launches = computes = 0
    for root in roots.values():
        for node, enclosing in _walk(root):
            kind = node.type.name
            if kind == OPERATOR:
                if enclosing:
                    nested += 1
                else:
                    ops[_op_name(node.name)] += 1
            elif kind == KERNEL_LAUNCH:
                launches += 1
            elif kind == INNER and node.name.endswith(COMPUTE_SUFFIX):
                computes += 1
    kernel_event = KERNEL_LAUNCH if launches else (f"{INNER} '*{COMPUTE_SUFFIX}'" if computes else None)
    return {
        "operators": sum(ops.values()),
        "kernels": launches if launches else computes,
        "kernel_event": kernel_event,
        "nested_operators": nested,
        "ops": ops,
    }


def count_kernels(fn: Callable[[], Any], warmup: int = 1) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times, then once under the CPU profiler; count what that run launched.

    Returns ``{'operators': int, 'kernels': int, 'kernel_event': str | None, 'nested_operators': int,
    'ops': Counter}`` (see the module's docstring). The profiler writes nothing (``on_trace_ready`` is a
    no-op, so no ``profiler_log`` directory) and leaves no cost behind on later runs.
    """
    for _ in range(warmup):
        fn()
    prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU], on_trace_ready=lambda _prof: None)
    prof.start()
    try:
        fn()
    finally:
        prof.stop()
    return count_events(prof.profiler_result.get_data())


def jsonable(counts: dict[str, Any]) -> dict[str, Any]:
    """``counts`` with its Counter as a plain dict, most frequent op first (for json.dumps)."""
    return {**counts, "ops": dict(counts["ops"].most_common())}


def _self_check() -> None:
    """The counts of a few known calls (run this module as a script)."""
    a, b = paddle.ones([4]), paddle.ones([4])
    for label, fn in (("a + b", lambda: a + b), ("paddle.Tensor()", paddle.Tensor)):
        counts = count_kernels(fn)
        print(f"paddle {paddle.__version__}, {label}: {counts['operators']} operators, {counts['kernels']} "
              f"kernels ({counts['kernel_event']}), {dict(counts['ops'])}")


if __name__ == "__main__":
    _self_check()
