"""Shared fixtures: a fresh program pair, scope and name generator per test, in whichever Paddle IR
mode this tox env selects (3.3 PIR, 3.3 legacy IR, 2.6 legacy IR)."""

from __future__ import annotations

import os

import numpy as np
import paddle
import pytest

paddle.enable_static()


def ir_mode() -> str:
    """'3.3-pir', '3.3-legacy', '2.6-legacy', ...: the Paddle minor version and the active IR."""
    major_minor = ".".join(paddle.__version__.split(".")[:2])
    return f"{major_minor}-{'pir' if paddle.framework.in_pir_mode() else 'legacy'}"


def pytest_report_header(config):
    return f"paddle {paddle.__version__}, IR mode {ir_mode()}"


def pytest_configure(config):
    config.addinivalue_line("markers", "eager: runs eager code only; once per Paddle release (see "
                            "pytest_collection_modifyitems)")
    # Each tox env says which mode it means to test; a mismatch (wrong wheel, flag not applied) would
    # make the whole run test the wrong thing, so stop before any test passes.
    expected = os.environ.get("PADDLE_EMA_EXPECT_MODE")
    if expected and expected != ir_mode():
        pytest.exit(f"tox env expects Paddle mode {expected}, but this run is {ir_mode()}", returncode=3)


def pytest_collection_modifyitems(config, items):
    """Under the legacy IR of Paddle 3.x, deselect the tests marked ``eager`` (the default: see
    ``PADDLE_EMA_EAGER_EVERY_IR``). They run eager code only, with no program and no
    ``paddle.jit.to_static``, and ``FLAGS_enable_pir_api`` selects the IR of static programs only
    (``paddle.framework.in_pir_mode()`` is False in dygraph either way): they run once per Paddle
    release, under PIR, rather than twice the same. Paddle 2.6 has one mode and runs them there."""
    mode = ir_mode()
    if mode.startswith("2.") or not mode.endswith("-legacy") or os.environ.get("PADDLE_EMA_EAGER_EVERY_IR"):
        return
    eager = [item for item in items if item.get_closest_marker("eager")]
    if eager:
        config.hook.pytest_deselected(items=eager)
        items[:] = [item for item in items if not item.get_closest_marker("eager")]


@pytest.fixture
def mode() -> str:
    return ir_mode()


@pytest.fixture(autouse=True)
def fresh_static_world():
    """A new main/startup program, scope and unique-name generator, so tests never see each other."""
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.utils.unique_name.guard(), paddle.static.scope_guard(paddle.static.Scope()):
        with paddle.static.program_guard(main, startup):
            yield main, startup


@pytest.fixture
def programs(fresh_static_world):
    return fresh_static_world


@pytest.fixture
def dygraph():
    """Dygraph mode (with a fixed seed) for one test; the other tests build static programs."""
    paddle.disable_static()
    paddle.seed(7)
    try:
        yield
    finally:
        paddle.enable_static()


@pytest.fixture
def exe():
    return paddle.static.Executor(paddle.CPUPlace())


@pytest.fixture
def rng():
    return np.random.default_rng(20261125)
