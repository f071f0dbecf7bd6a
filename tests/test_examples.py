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


def test_digits_demo_fast_mode(tmp_path):
    """Two epochs of the README's main job: the table, a valid PNG and an exported model that
    reproduces the EMA accuracy."""
    import matplotlib.image

    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "digits.py"), "--epochs", "2", "--out", str(out), "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert {"raw", "EMA"} <= rows.keys(), done.stdout
    ema_final = float(rows["EMA"].split("|")[2])
    raw_final = float(rows["raw"].split("|")[2])
    assert 0.5 < raw_final <= 1.0 and 0.5 < ema_final <= 1.0, done.stdout
    reloaded = float(done.stdout.split("reloaded: accuracy")[1].split()[0])
    assert reloaded == ema_final, done.stdout
    png = out / "digits_ema.png"
    assert f"plot: {png.resolve()}" in done.stdout
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert (out / "digits_ema.pdmodel").exists() or (out / "digits_ema.json").exists()
