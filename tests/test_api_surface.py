"""Every paddle_ema module lists its public definitions in ``__all__``, and only those."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil

import pytest

import paddle_ema


def _modules() -> list[str]:
    return ["paddle_ema"] + [
        info.name for info in pkgutil.walk_packages(paddle_ema.__path__, prefix="paddle_ema.")
    ]


def _public_definitions(module) -> set[str]:
    """The names a module defines at its top level (functions, classes, assignments), without a
    leading underscore; imports are not definitions."""
    tree = ast.parse(inspect.getsource(module))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                elements = target.elts if isinstance(target, ast.Tuple) else [target]
                names.update(e.id for e in elements if isinstance(e, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


def test_the_package_walk_finds_the_modules():
    found = set(_modules())
    assert {"paddle_ema.ema", "paddle_ema.dygraph", "paddle_ema._graph", "paddle_ema._ir"} <= found, found


@pytest.mark.parametrize("name", [m for m in _modules() if m != "paddle_ema"])
def test_all_lists_exactly_the_public_definitions(name):
    module = importlib.import_module(name)
    public = _public_definitions(module)
    listed = getattr(module, "__all__", None)
    if listed is None:
        assert not public, f"{name} defines public names {sorted(public)} but has no __all__"
        return
    assert len(listed) == len(set(listed)), f"{name}.__all__ lists a name twice"
    assert set(listed) == public, (
        f"{name}.__all__ lacks {sorted(public - set(listed))} and lists {sorted(set(listed) - public)}, "
        "which it does not define"
    )


def test_the_package_exports_what_its_all_lists():
    assert all(hasattr(paddle_ema, n) for n in paddle_ema.__all__)
    expected = {"ExponentialMovingAverage", "ModelEMA", "PostHocEMA", "PowerEMA", "__version__", "callbacks",
                "compat", "gamma_to_sigma_rel", "global_step_counter", "load", "load_averages", "posthoc",
                "power", "sigma_rel_to_gamma"}
    assert set(paddle_ema.__all__) == expected
