"""The examples run as scripts, in this tox env's Paddle mode, so they never rot."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ValueError:  # sys.modules holds None for it: imports of it fail
        return True


# What examples/digits.py imports beyond Paddle: the `examples` extra, which CI installs; a plain
# install (e.g. tests run from the sdist) lacks it.
DEMO_MISSING = [m for m in ("sklearn", "matplotlib", "tqdm") if absent(m)]
needs_demo_extras = pytest.mark.skipif(
    bool(DEMO_MISSING),
    reason=f"examples/digits.py needs {', '.join(DEMO_MISSING)}: pip install \".[examples]\"",
)


def test_seed_example_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "seed_example.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert sum(line.startswith("pass ") for line in lines) == 3, done.stdout
    assert "over 18 steps with decay 0.999; applied and restored them 6 times" in lines[-1], done.stdout


@needs_demo_extras
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


def run_digits(tmp_path, *args, env=None):
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "digits.py"), "--no-progress", "--out", str(tmp_path / "out"), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )


@pytest.mark.parametrize("args, says", [
    (["--epochs", "0"], "--epochs: 0 is out of range: it must be at least 1"),
    (["--epochs", "two"], "--epochs: 'two' is not an int"),
    (["--decay", "1.5"], "--decay: 1.5 is out of range: it must be in [0, 1)"),
    (["--decay", "nan"], "--decay: nan is out of range"),
    (["--lr", "-1"], "--lr: -1 is out of range: it must be positive"),
    (["--seed", "-1"], "--seed: -1 is out of range: it must be in [0, 4294967295]"),
    (["--seed", "99999999999"], "--seed: 99999999999 is out of range"),
    (["--out", "a_file"], "--out: a_file cannot be a folder: a_file is a file"),
    (["--out", "a_file/sub"], "--out: a_file/sub cannot be a folder: a_file is a file"),
])
def test_digits_rejects_bad_options_before_importing_paddle(tmp_path, args, says):
    (tmp_path / "a_file").write_text("")
    done = run_digits(tmp_path, *args, env=without_paddle(tmp_path))
    assert_usage_error(done, says)


def assert_usage_error(done, says):
    """argparse's way: exit status 2, usage, then one line that says what is wrong."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in done.stderr.splitlines()[-1] and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("args, says", [
    (["--out", "a_file"], "--out: a_file cannot be a folder: a_file is a file"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_distributed_rejects_bad_options_before_importing_paddle(tmp_path, args, says):
    (tmp_path / "a_file").write_text("")
    done = subprocess.run([sys.executable, str(EXAMPLES / "distributed.py"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env=without_paddle(tmp_path))
    assert_usage_error(done, says)


@pytest.mark.parametrize("script", ["schedules.py", "seed_example.py", "distributed.py"])
def test_help_prints_help_without_importing_paddle(tmp_path, script):
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env=without_paddle(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"usage: {script}") and done.stderr == "", done.stdout + done.stderr
    assert os.listdir(tmp_path) == ["fake"]  # nothing written


def without_paddle(tmp_path):
    """An environment in which `import paddle` fails: what runs in it never imported Paddle."""
    fake = tmp_path / "fake"
    (fake / "paddle").mkdir(parents=True)
    (fake / "paddle" / "__init__.py").write_text("raise ImportError('paddle must not be imported here')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))


def test_digits_help_does_not_import_paddle(tmp_path):
    done = run_digits(tmp_path, "--help", env=without_paddle(tmp_path))
    assert done.returncode == 0, done.stderr
    for option in ("--epochs", "--decay", "--lr", "--seed", "--out", "--no-progress"):
        assert option in done.stdout


@needs_demo_extras
def test_digits_stops_with_a_clear_error_when_training_diverges(tmp_path):
    done = run_digits(tmp_path, "--epochs", "1", "--lr", "1e10")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "training diverged" in done.stderr and "lower --lr" in done.stderr, done.stderr


@needs_demo_extras
def test_digits_table_headers_count_the_epochs_there_are(tmp_path):
    done = run_digits(tmp_path, "--epochs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "last 2" in done.stdout and "last 5" not in done.stdout, done.stdout


def test_distributed_example_on_cpu(tmp_path):
    """2 processes over gloo: both ranks end with the same EMA, equal to one process's over the same
    global batches; rank 0's checkpoint resumes in one process."""
    script = str(EXAMPLES / "distributed.py")

    def run(*cmd):
        done = subprocess.run([sys.executable, *cmd], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, start_new_session=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    run("-m", "paddle.distributed.launch", "--nproc_per_node=2", "--log_dir", "log", script)
    ranks = [(tmp_path / "log" / f"workerlog.{r}").read_text() for r in range(2)]
    single = run(script, "--out", "single")

    def ending(text: str, rank: int) -> tuple[float, float, float]:
        line = [x for x in text.splitlines() if x.startswith(f"rank {rank}: validation loss")][-1]
        numbers = line.replace(";", "").replace(",", "").split()
        return float(numbers[5]), float(numbers[7]), float(numbers[10])

    assert ending(ranks[0], 0) == ending(ranks[1], 1)  # raw loss, EMA loss, EMA fingerprint
    np.testing.assert_allclose(ending(ranks[0], 0), ending(single, 0), rtol=1e-5)
    assert (tmp_path / "out_distributed" / "model.pdparams").exists()
    resumed = run(script, "--resume", "out_distributed/model", "--steps", "1", "--out", "resumed")
    assert "rank 0: validation loss" in resumed


def test_schedules_example(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "schedules.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    decays = {line.split()[0]: [float(v) for v in line.split(":")[1].split()] for line in lines[:2]}
    # power: 0 for 5 updates, then min_decay 0.5 until 1 - (1 + t)^(-2/3) passes it; threshold: (1+s)/(10+s)
    np.testing.assert_allclose(decays["power"], [0, 0, 0.5, 0.5, 1 - 6 ** (-2 / 3), 1 - 96 ** (-2 / 3),
                                                 1 - 996 ** (-2 / 3)], atol=6e-5)
    np.testing.assert_allclose(decays["threshold"], [(1 + s) / (10 + s) for s in (0, 4, 5, 6, 10, 100, 1000)],
                               atol=6e-5)
    assert "head only EMA applied" in done.stdout and "(averages ['head.w'])" in done.stdout
    assert "head.w average read without applying: shape [32, 1]" in done.stdout


def test_hapi_fit_example_prints_raw_and_averaged_accuracy(tmp_path):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "hapi_fit.py"), "--epochs", "2", "--save-dir", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert len(rows) == 2 and all("raw accuracy" in r and "averaged accuracy" in r for r in rows), done.stdout
    assert (tmp_path / "final_ema.pdparams").exists()
