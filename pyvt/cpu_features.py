"""Whether a snapshot's vCPUs can run on this host: the CPUID features they
were shown must all be offered by this host's KVM (:func:`check_cpuid`,
which :meth:`pyvt.Snapshot.load` runs)."""

from __future__ import annotations

from typing import Dict, Tuple

from ._kvm import ffi
from .errors import SnapshotError
from .kvm import cpuid_table

__all__ = ["FEATURE_WORDS", "check_cpuid"]

#: CPUID feature words a guest may have used: (leaf, subleaf, register).
FEATURE_WORDS = ((1, 0, "ecx"), (1, 0, "edx"), (7, 0, "ebx"), (7, 0, "ecx"), (7, 0, "edx"),
                 (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"))

Features = Dict[Tuple[int, int, str], int]


def _features(cpuid_bytes: bytes) -> Features:
    table = ffi.from_buffer("struct kvm_cpuid2 *", cpuid_bytes)
    out = {}
    for i in range(table.nent):
        e = table.entries[i]
        for leaf, sub, reg in FEATURE_WORDS:
            if e.function == leaf and e.index == sub:
                out[(leaf, sub, reg)] = getattr(e, reg)
    return out


_HOST_FEATURES: Dict[str, Features] = {}


def _host_features(kvm) -> Features:
    """The CPUID features a vCPU on this device ends up with: the supported
    table as KVM_SET_CPUID2 adjusts it (some KVMs, PVM among them, add what
    the CPU runs natively), read back from a throwaway vCPU."""
    cached = _HOST_FEATURES.get(kvm.path)
    if cached is None:
        with kvm.create_vm() as vm_fd, vm_fd.create_vcpu(0) as vcpu_fd:
            vcpu_fd.set_cpuid2_table(kvm.supported_cpuid_table())
            table = bytes(ffi.buffer(cpuid_table(vcpu_fd.get_cpuid2())))
            cached = _HOST_FEATURES[kvm.path] = _features(table)
    return cached


def check_cpuid(snap, kvm) -> None:
    """Refuses a snapshot whose vCPUs were shown CPUID features this host's
    KVM (``kvm``, a :class:`pyvt.kvm.Kvm`) does not offer: the guest may be
    using them."""
    host = _host_features(kvm)
    for vcpu in snap.vcpus:
        for word, bits in _features(vcpu.cpuid).items():
            missing = bits & ~host.get(word, 0)
            # OSXSAVE follows the guest's CR4 and the APIC bit its APIC_BASE:
            # state, not features a host could lack.
            if word == (1, 0, "ecx"):
                missing &= ~(1 << 27)
            if word == (1, 0, "edx"):
                missing &= ~(1 << 9)
            if missing:
                leaf, sub, reg = word
                raise SnapshotError(
                    f"this host's KVM lacks CPUID features the snapshot's vCPU {vcpu.index} "
                    f"used: leaf {leaf:#x}.{sub} {reg} bits {missing:#x}")
