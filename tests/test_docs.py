"""The docs as a reader meets them: every Python block of README.md, README_cn.md and docs/*.md runs
as a complete program, the READMEs stay short and carry the set-up commands, and the sdist ships what
these tests read."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
READMES = (ROOT / "README.md", ROOT / "README_cn.md")
PAGES = tuple(sorted((ROOT / "docs").glob("*.md")))
_FENCE = re.compile(r"^([ \t]*)```python\n(.*?)^\1```", re.S | re.M)

# Runs one block as __main__ and marks every warning raised with a paddle_ema frame on the stack
# (the library's own, or Paddle's set off by a library call) and every record of paddle_ema's
# loggers at WARNING or above; Paddle's own warnings (at import, in its optimizers) pass unmarked.
# Paddle is imported first, so that what it says on import is not put down to `import paddle_ema`.
_RUNNER = '''
import logging, os, runpy, sys, traceback, warnings

import paddle  # noqa: F401

LIBRARY = os.environ["PADDLE_EMA_DOCS_LIBRARY"]
MARK = "WARNING CAUSED BY paddle_ema: "


def show(message, category, filename, lineno, file=None, line=None):
    ours = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack() if f.filename.startswith(LIBRARY)]
    mark = MARK if ours or filename.startswith(LIBRARY) else ""
    sys.stderr.write(f"{mark}{filename}:{lineno}: {category.__name__}: {message} {ours}\\n")


class Marked(logging.Handler):
    def emit(self, record):
        sys.stderr.write(f"{MARK}{record.name}: {record.getMessage()}\\n")


warnings.showwarning = show
warnings.simplefilter("always")
logging.getLogger("paddle_ema").addHandler(Marked(logging.WARNING))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def python_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
    """``(line, code)`` of each fenced ``python`` block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, textwrap.dedent(m.group(2))) for m in _FENCE.finditer(text)]


def _blocks():
    """Every distinct block once: README_cn's are README's (checked below), and the getting-started
    page repeats README's quickstarts."""
    seen = set()
    for path in (ROOT / "README.md", *PAGES):
        for line, code in python_blocks(path):
            if code not in seen:
                seen.add(code)
                yield pytest.param(code, id=f"{path.relative_to(ROOT)}:{line}")


def run_as_a_program(folder: pathlib.Path, code: str) -> None:
    """Run ``code`` as a reader would, from a file in ``folder``: it exits 0, with no warning of
    paddle_ema's making (nor one of Paddle's that a paddle_ema call set off)."""
    import os

    import paddle_ema

    library = pathlib.Path(paddle_ema.__file__).resolve().parent
    (folder / "runner.py").write_text(_RUNNER)
    (folder / "block.py").write_text(code)
    # The paddle_ema under test, not a copy the running env may have installed.
    env = dict(os.environ, PYTHONPATH=str(library.parent), PADDLE_EMA_DOCS_LIBRARY=str(library))
    done = subprocess.run([sys.executable, "runner.py", "block.py"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    marked = [line for line in done.stderr.splitlines() if "WARNING CAUSED BY paddle_ema" in line]
    assert not marked, "\n".join(marked)


@pytest.mark.parametrize("code", _blocks())
def test_python_block_runs_as_a_program(tmp_path, code):
    """A reader can paste the block into a file and run it."""
    run_as_a_program(tmp_path, code)


def test_every_page_block_is_found():
    """The blocks run above are all there are: each README has its two quickstarts, README_cn the same
    code as README, and every page that teaches with code has its blocks picked up."""
    english, chinese = (python_blocks(readme) for readme in READMES)
    assert len(english) == 2
    assert [code for _, code in chinese] == [code for _, code in english]
    fences = sum(page.read_text(encoding="utf-8").count("```python") for page in PAGES)
    assert fences == sum(len(python_blocks(page)) for page in PAGES) > 0


def test_api_page_documents_every_public_name():
    """docs/api.md has an autodoc entry for every name paddle_ema exports: its own, or its module's
    (``automodule`` with ``:members:``), so a new public name cannot be left out of the reference."""
    import inspect

    import paddle_ema

    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\.\. auto(?:class|function|module):: ([\w.]+)", page, re.M))

    def entries(name):
        value = getattr(paddle_ema, name)
        if inspect.ismodule(value):
            return {entry for entry in documented if entry.startswith(value.__name__)}
        return documented & {f"paddle_ema.{name}", f"{value.__module__}.{name}", value.__module__}

    missing = [name for name in paddle_ema.__all__ if name != "__version__" and not entries(name)]
    assert not missing, f"docs/api.md lacks {missing}"


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.name)
def test_readme_set_up_commands(readme):
    """README's two set-up commands are the ones CI and the demo test use."""
    text = readme.read_text(encoding="utf-8")
    assert 'pip install ".[examples]" && python examples/digits.py' in text
    assert "pip install tox && tox" in text
    assert "pip install tox && tox" in (ROOT / ".ci" / "run").read_text()
    assert "docs/digits_ema.png" in text and (ROOT / "docs" / "digits_ema.png").exists()


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.name)
def test_readme_is_one_screen_of_links(readme):
    """README stays short (the rest lives in docs/), and each docs page it links to exists."""
    text = readme.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) <= 10 * 1024, f"{readme.name}: {len(text.encode())} bytes"
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", text))
    assert linked and all((ROOT / page).exists() for page in linked), sorted(linked)


@pytest.mark.parametrize("cls", ["ExponentialMovingAverage", "ModelEMA", "callbacks.EMACallback"])
def test_class_docstring_example_runs(tmp_path, cls):
    """The Example of each class's docstring is a complete program: run it as one."""
    import functools
    import inspect

    import paddle_ema

    doc = inspect.getdoc(functools.reduce(getattr, cls.split("."), paddle_ema))
    example = doc.split(".. code-block:: python")[1].split("\nReferences:")[0]
    run_as_a_program(tmp_path, textwrap.dedent(example))


def test_the_sdist_carries_a_runnable_test_suite_and_a_page_that_renders(tmp_path):
    """Every test module's helpers, and the examples, tools, docs and files the tests read, are in
    the sdist; its long description has no repository-relative image or link."""
    import tarfile

    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True)
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        pkg_info = tar.extractfile(next(n for n in tar.getnames() if n.endswith("/PKG-INFO"))).read().decode()
    # PyPI's page: README without the images and relative links that only resolve in the repository.
    assert "# paddle_ema" in pkg_info and "## Quickstart: static graph" in pkg_info
    assert "![" not in pkg_info and "](README_cn.md)" not in pkg_info and "](docs/" not in pkg_info
    needed = {str(p.relative_to(ROOT)) for folder in ("tests", "examples", "tools")
              for p in (ROOT / folder).glob("*.py")}
    needed |= {str(p.relative_to(ROOT)) for p in PAGES}
    needed |= {"README.md", "README_cn.md", "CHANGELOG.md", "tox.ini", ".ci/run", "docs/digits_ema.png",
               "docs/conf.py"}
    assert needed <= shipped, f"missing from the sdist: {sorted(needed - shipped)}"
