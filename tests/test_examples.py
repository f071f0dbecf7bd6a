"""The examples run as scripts, in this tox env's Paddle mode, so they never rot."""

from __future__ import annotations

import pathlib
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def test_seed_example_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "seed_example.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert sum(line.startswith("pass ") for line in lines) == 3, done.stdout
    assert "over 18 steps with decay 0.999; applied and restored them 6 times" in lines[-1], done.stdout
