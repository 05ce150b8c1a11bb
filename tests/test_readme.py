"""The README's example runs and prints what the README says it prints."""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.requires_kvm


def test_readme_example_runs():
    if not README.exists():
        pytest.skip("README.md is not beside the tests (installed without the checkout)")
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example, "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines == ["guest says 42", "Hlt(rip=0x100a)", "0x2a"], lines
