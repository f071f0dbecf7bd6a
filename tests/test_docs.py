"""README.md and README_cn.md carry the API reference exactly as the docstrings say it."""

from __future__ import annotations

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import gen_api  # noqa: E402


@pytest.mark.parametrize("readme", gen_api.READMES, ids=lambda p: p.name)
def test_readme_api_block_matches_docstrings(readme):
    text = readme.read_text(encoding="utf-8")
    assert gen_api.api_markdown() in text, f"{readme.name} is stale: run python tools/gen_api.py"


@pytest.mark.parametrize("readme", gen_api.READMES, ids=lambda p: p.name)
def test_readme_set_up_commands(readme):
    """README's two set-up commands are the ones CI and the demo test use."""
    text = readme.read_text(encoding="utf-8")
    assert 'pip install ".[examples]" && python examples/digits.py' in text
    assert "pip install tox && tox" in text
    assert "pip install tox && tox" in (ROOT / ".ci" / "run").read_text()
    assert "docs/digits_ema.png" in text and (ROOT / "docs" / "digits_ema.png").exists()


def test_class_docstring_example_runs(tmp_path):
    """The Example of ExponentialMovingAverage's docstring is a complete program: run it as one."""
    import inspect
    import subprocess
    import textwrap

    import paddle_ema

    doc = inspect.getdoc(paddle_ema.ExponentialMovingAverage)
    code = textwrap.dedent(doc.split(".. code-block:: python")[1].split("\nReferences:")[0])
    script = tmp_path / "docstring_example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
