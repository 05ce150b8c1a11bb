"""Shared fixtures: the KVM device under test and guest programs.

Guest-running tests need a working KVM device.  Which one: ``$PYVT_BACKEND``
if set (the kernel-module harness sets /dev/pyvt), else what pyvt picks.
Where no device can be opened, those tests skip with the reason.
"""

from __future__ import annotations

import pytest

import pyvt
from guestbuild import LOAD_ADDRESS, build


def _backend_problem():
    try:
        path = pyvt.select_backend()
        pyvt.kvm.Kvm.shared(path)
    except pyvt.Error as e:
        return str(e)
    return None


_PROBLEM = _backend_problem()


def pytest_collection_modifyitems(config, items):
    if _PROBLEM is None:
        return
    skip = pytest.mark.skip(reason=f"no usable KVM device: {_PROBLEM}")
    for item in items:
        if "needs_kvm" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_kvm: runs a guest on a KVM device")


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
def vm():
    with pyvt.Vm(memory="16M") as machine:
        yield machine


@pytest.fixture
def load(vm, guest):
    """``load("mmio", mode="long")`` -> a vCPU ready at the guest's entry."""

    def make(name: str, mode: str, index: int = 0):
        vm.memory.write(LOAD_ADDRESS, guest(name))
        cpu = vm.vcpu(index, mode=mode)
        cpu.regs.rip = LOAD_ADDRESS  # real mode too: CS base is 0
        return cpu

    return make
