"""Runs tests/keras3/check_*.py (triton_bn.keras3 and Keras's own BatchNormalization tests) in a
fresh process with KERAS_BACKEND=torch: Keras picks its backend once per process, at import, so the
rest of the suite never imports it (the check_ prefix keeps those files out of its collection).
Skipped when keras is not installed (.ci/run installs the [keras] extra)."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("keras") is None,
                    reason="keras is not installed (pip install 'triton_bn[keras]')")
def test_keras3_tests_pass_on_the_torch_backend():
    env = {**os.environ, "KERAS_BACKEND": "torch",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
         "ignore::DeprecationWarning", "-o", "addopts=-ra", "-o", "python_files=check_*.py",
         str(ROOT / "tests" / "keras3")],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"{summary}\n{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}"
    passed = re.search(r"(\d+) passed", summary)
    # Keras's 33 BatchNormalization tests plus ours, none skipped or left out
    assert passed and int(passed[1]) >= 33 + 26 and "skipped" not in summary, summary
