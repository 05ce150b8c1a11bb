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


def test_every_python_package_is_installed():
    """pyproject.toml lists the packages a `pip install .` copies: a new
    subpackage left out works from the checkout and breaks every install
    (it happened to pyvt.migration and pyvt.virtio)."""
    import tomllib

    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("needs the source checkout")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pyvt").rglob("*.py")
             if "__pycache__" not in p.parts}
    assert found <= listed, f"add to pyproject.toml's packages: {sorted(found - listed)}"
