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


@pytest.mark.parametrize("cls", ["ExponentialMovingAverage", "ModelEMA", "callbacks.EMACallback"])
def test_class_docstring_example_runs(tmp_path, cls):
    """The Example of each class's docstring is a complete program: run it as one."""
    import functools
    import inspect
    import subprocess
    import textwrap

    import paddle_ema

    doc = inspect.getdoc(functools.reduce(getattr, cls.split("."), paddle_ema))
    code = textwrap.dedent(doc.split(".. code-block:: python")[1].split("\nReferences:")[0])
    script = tmp_path / "docstring_example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_sdist_carries_a_runnable_test_suite_and_a_page_that_renders(tmp_path):
    """Every test module's helpers, and the examples, tools and files the tests read, are in the sdist;
    its long description has no repository-relative image or link."""
    import subprocess
    import tarfile

    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True)
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        pkg_info = tar.extractfile(next(n for n in tar.getnames() if n.endswith("/PKG-INFO"))).read().decode()
    # PyPI's page: README without the images and relative links that only resolve in the repository.
    assert "# paddle_ema" in pkg_info and "## API reference" in pkg_info
    assert "![" not in pkg_info and "](README_cn.md)" not in pkg_info and "](docs/" not in pkg_info
    needed = {str(p.relative_to(ROOT)) for folder in ("tests", "examples", "tools")
              for p in (ROOT / folder).glob("*.py")}
    needed |= {"README.md", "README_cn.md", "CHANGELOG.md", "tox.ini", ".ci/run", "docs/digits_ema.png"}
    assert needed <= shipped, f"missing from the sdist: {sorted(needed - shipped)}"
