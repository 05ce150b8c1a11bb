"""Shared fixtures for pyvt's own tests.

The ``kvm`` and ``vm`` fixtures and the ``requires_kvm``/``requires_cap``/
``requires_cpu`` markers come from pyvt's pytest plugin (pyvt.testing), as
for any user.  Which device: ``$PYVT_BACKEND`` if set (the kernel-module
harness sets /dev/pyvt), else what pyvt picks.  Guest programs are built
from tests/guests/ by the test run.
"""

from __future__ import annotations

import pytest

from guestbuild import LOAD_ADDRESS, build


def pytest_configure(config):
    # Installed, pyvt registers its plugin itself (pytest11 entry point);
    # from a bare source tree, load it here.
    if not config.pluginmanager.has_plugin("pyvt"):
        import pyvt.testing

        config.pluginmanager.register(pyvt.testing, "pyvt")


@pytest.fixture(scope="session")
def guest_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("guests")


@pytest.fixture(scope="session")
def guest(guest_dir):
    """``guest("port_io")`` -> the flat binary of tests/guests/port_io.S."""

    def get(name: str, load_address: int = LOAD_ADDRESS) -> bytes:
        return build(name, guest_dir, load_address)

    return get


@pytest.fixture
def load(vm, guest):
    """``load("mmio", mode="long")`` -> a vCPU ready at the guest's entry."""

    def make(name: str, mode: str, index: int = 0):
        vm.memory.write(LOAD_ADDRESS, guest(name))
        cpu = vm.vcpu(index, mode=mode)
        cpu.regs.rip = LOAD_ADDRESS  # real mode too: CS base is 0
        return cpu

    return make
