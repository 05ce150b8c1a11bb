"""The linter and the type checker are part of the test suite."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(tool, *args):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: pip install '.[test]'")
    return subprocess.run([tool, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff():
    if not (ROOT / "pyvt" / "vm.py").exists():
        pytest.skip("needs the source checkout")
    out = _run("ruff", "check", "--no-cache", "--select", "E,F,W,B", "--ignore", "E501",
               "pyvt", "tests", "benchmarks")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy():
    if not (ROOT / "pyvt" / "vm.py").exists():
        pytest.skip("needs the source checkout")
    # No cache: the checkout may be read-only (the kernel-module harness).
    out = _run("mypy", "--cache-dir=/dev/null", "--ignore-missing-imports", "--no-error-summary",
               "pyvt")
    assert out.returncode == 0, out.stdout + out.stderr
