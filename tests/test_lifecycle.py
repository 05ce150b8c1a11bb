"""Creating and closing many VMs leaks neither file descriptors nor memory."""

import gc
import os
import resource

import pytest

import pyvt
from pyvt import exits

pytestmark = [pytest.mark.requires_kvm, pytest.mark.slow]

VM_COUNT = 2000


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _spawn_and_run_once():
    with pyvt.Vm("1M") as vm:
        vm.memory.write(0x1000, b"\xf4")
        vm.on_io(0x10, lambda e: 0)
        cpu = vm.vcpu(0, mode="real")
        cpu.regs.rip = 0x1000
        assert isinstance(cpu.run(timeout=5), exits.Hlt)


def test_thousands_of_vms_leak_nothing():
    for _ in range(50):  # warm caches (CPUID table, the shared /dev/kvm fd)
        _spawn_and_run_once()
    gc.collect()
    fds, rss = _open_fds(), _rss_kib()
    for _ in range(VM_COUNT):
        _spawn_and_run_once()
    gc.collect()
    assert _open_fds() == fds
    grown = _rss_kib() - rss
    assert grown < 16 * 1024, f"RSS grew by {grown} KiB over {VM_COUNT} VMs"


def test_forgotten_vm_is_freed_by_the_garbage_collector():
    gc.collect()
    fds = _open_fds()
    for _ in range(20):
        vm = pyvt.Vm("1M")
        cpu = vm.vcpu(0)
        vm.on_io(0x10, lambda e, vm=vm: vm)  # a handler holding its VM: a cycle
        del vm, cpu
    gc.collect()
    assert _open_fds() == fds
