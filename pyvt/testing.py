"""pytest plugin for people testing code that runs guests (registered as
the ``pyvt`` pytest11 entry point, so it loads when pyvt is installed).

Fixtures:
  ``kvm``  a :class:`pyvt.kvm.Kvm` on the device pyvt would use; skips the
           test, with the reason, when no KVM device can be opened.
  ``vm``   a 16 MiB :class:`pyvt.Vm`, closed after the test.

Markers:
  ``@pytest.mark.requires_kvm``  skips unless a KVM device can be opened;
  ``@pytest.mark.requires_cap("IRQCHIP")``  skips unless the backend reports
      every named ``KVM_CAP_*`` (with or without the prefix);
  ``@pytest.mark.requires_cpu("svm")``  skips unless the host CPU has every
      named feature flag (``/proc/cpuinfo`` names: vmx, svm, ept, npt...).

A skipped test says what was missing; nothing passes silently.
"""

from __future__ import annotations

import functools
from typing import Optional, Set

import pytest

from . import kvm as _kvm
from .errors import Error
from .vm import Vm, select_backend


@functools.lru_cache(maxsize=None)
def _backend() -> tuple:
    """(Kvm or None, why not)."""
    try:
        return _kvm.Kvm.shared(select_backend()), None
    except Error as e:
        return None, str(e)


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> Set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _missing_caps(names) -> Optional[str]:
    kvm, why = _backend()
    if kvm is None:
        return f"no usable KVM device: {why}"
    missing = []
    for name in names:
        try:
            if not kvm.check_extension(name):
                missing.append(name)
        except Error:
            missing.append(f"{name} (unknown to these headers)")
    return f"{kvm.path} lacks {', '.join(missing)}" if missing else None


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_kvm: skip unless a KVM device can be opened")
    config.addinivalue_line("markers", "requires_cap(*names): skip unless KVM reports these KVM_CAP_*")
    config.addinivalue_line("markers", "requires_cpu(*flags): skip unless the host CPU has these flags")


def pytest_runtest_setup(item):
    if item.get_closest_marker("requires_kvm") is not None:
        device, why = _backend()
        if device is None:
            pytest.skip(f"no usable KVM device: {why}")
    for mark in item.iter_markers("requires_cap"):
        reason = _missing_caps(mark.args)
        if reason:
            pytest.skip(reason)
    for mark in item.iter_markers("requires_cpu"):
        missing = [flag for flag in mark.args if flag not in _cpu_flags()]
        if missing:
            pytest.skip(f"host CPU lacks {', '.join(missing)} (per /proc/cpuinfo)")


@pytest.fixture
def kvm():
    """The system fd of the KVM device pyvt would use (skips if none)."""
    device, why = _backend()
    if device is None:
        pytest.skip(f"no usable KVM device: {why}")
    return device


@pytest.fixture
def vm(kvm):
    """A 16 MiB VM on that device, closed after the test."""
    with Vm(memory="16M", backend=kvm.path) as machine:
        yield machine
