"""Run the test suite once per IR mode of the Paddle installed in this env, or say why it cannot.

tox calls it, e.g. ``python tools/run_tests.py 3.3 pir legacy -- -k apply``: pytest runs once under
PIR (``FLAGS_enable_pir_api=1``) and once under the legacy IR (``=0``), sharing one installed Paddle,
and each run checks that it got the mode it asked for (``PADDLE_EMA_EXPECT_MODE``, see conftest.py).
Paddle 2.6 runs with the flag unset: there a 1 turns on its experimental PIR.

Where no wheel of the wanted Paddle exists for this Python (tox.ini's markers then install none, or
pip brings another release through paddle_ema's own requirement), it prints why and runs nothing
instead of failing or building numpy from source for minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata


def installed_paddle() -> str | None:
    try:
        return metadata.version("paddlepaddle")
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    ours, pytest_args = argv[:split], argv[split + 1:]
    version, modes = ours[0], ours[1:]
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = installed_paddle()
    if found is None or not (found == version or found.startswith(version + ".")):
        print(f"SKIPPED: Paddle {version} has no wheel for Python {python} (installed: {found or 'none'}); "
              "this env runs no test on this Python", flush=True)
        return 0
    status = 0
    for mode in modes:
        env = dict(os.environ, PADDLE_EMA_EXPECT_MODE=f"{version}-{mode}")
        env.pop("FLAGS_enable_pir_api", None)
        if not version.startswith("2."):
            env["FLAGS_enable_pir_api"] = "1" if mode == "pir" else "0"
        print(f"==> Paddle {found}, {mode} IR, Python {python}", flush=True)
        status = subprocess.call([sys.executable, "-m", "pytest", *pytest_args], env=env) or status
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
