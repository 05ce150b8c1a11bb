"""pytest fixtures for the pyvt caps tests."""

import pytest
from capsfixtures import kvm_usable


@pytest.fixture(scope="session")
def real_kvm():
    """The path of a working /dev/kvm; skips (with the reason) when there is none."""
    ok, why = kvm_usable()
    if not ok:
        pytest.skip(f"needs a working /dev/kvm: {why}")
    return "/dev/kvm"
