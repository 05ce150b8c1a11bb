"""One vCPU's architectural state: what :meth:`pyvt.Vcpu.save_state` returns
and :meth:`pyvt.Vcpu.restore_state` puts back (snapshots keep one per vCPU).

The state is kept as the kernel structs' bytes (what a snapshot file
stores), read and written through the thin layer (:mod:`pyvt.kvm`):

- general registers; special registers (``KVM_GET_SREGS2`` where the backend
  has KVM_CAP_SREGS2: it adds the PAE PDPTRs, which ``KVM_SET_SREGS`` would
  reload from guest memory; else ``KVM_GET_SREGS``);
- the XSAVE area (``KVM_GET_XSAVE2`` where available, else ``KVM_GET_XSAVE``:
  x87, SSE, AVX, AVX-512, PKRU...), the XCRs and the legacy FPU view;
- the MSRs of KVM's MSR index list that KVM will read back, IA32_TSC among
  them (see "The TSC" below), the LAPIC, pending events, MP state, debug
  registers, and the nested-virtualization state where the backend has
  KVM_CAP_NESTED_STATE;
- the CPUID table (a clone sets it before anything else).

The TSC.  KVM documents two ways to carry a guest's TSC: the IA32_TSC MSR
(in KVM's MSR index list, taken by KVM_SET_MSRS) and, for live migration,
the vCPU attribute KVM_VCPU_TSC_OFFSET together with KVM_GET_CLOCK's
``realtime``/``host_tsc`` (Documentation/virt/kvm/devices/vcpu.rst, "TSC
offset"), whose algorithm advances the guest's TSC by the wall-clock time
between save and restore.  A snapshot is the other case: the guest resumes
at the instant it was taken, however often and however much later, like
the KVM clock the VM restores without KVM_CLOCK_REALTIME (see
:meth:`pyvt.Vm.restore_clock`).  So the TSC travels as IA32_TSC, with the
other MSRs, in the one KVM_SET_MSRS a restore makes anyway: no extra
ioctl, and it works on backends without KVM_CAP_VCPU_ATTRIBUTES.  KVM may
align a write within a second of the VM's previous one with that write
(its TSC synchronisation), so a guest sees its TSC continue from the
snapshot's value give or take that.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ._kvm import ffi, lib
from .errors import SnapshotError
from .kvm import caps, cpuid_table, msrs_struct, struct_bytes
from .kvm_base import _variable_struct

__all__ = ["VcpuState"]

#: kvm_sregs and kvm_sregs2 share their first bytes (segments, descriptor
#: tables, control registers, EFER, APIC base): the rest differs.
_SREGS_COMMON = ffi.offsetof("struct kvm_sregs", "interrupt_bitmap")
assert _SREGS_COMMON == ffi.offsetof("struct kvm_sregs2", "flags")

MSR_IA32_TSC = 0x10


@dataclass
class VcpuState:
    """One vCPU's architectural state, as the kernel structs' bytes."""

    index: int
    mode: str
    regs: bytes
    #: ``struct kvm_sregs``, where the backend lacks KVM_CAP_SREGS2; else None.
    sregs: Optional[bytes]
    fpu: bytes
    events: Optional[bytes]  # None where the backend lacks the ioctl (pyvt.ko)
    debugregs: Optional[bytes]
    mp_state: Optional[int]
    cpuid: bytes
    msrs: Dict[int, int] = field(default_factory=dict)
    xcrs: Optional[bytes] = None
    lapic: Optional[bytes] = None
    #: KVM_GET_XSAVE2 (or KVM_GET_XSAVE): x87, SSE, AVX and later state.
    xsave: Optional[bytes] = None
    #: ``struct kvm_sregs2`` where the backend has KVM_CAP_SREGS2 (then
    #: ``sregs`` is None).
    sregs2: Optional[bytes] = None
    #: KVM_GET_NESTED_STATE's struct and data, where the backend has it.
    nested: Optional[bytes] = None
    #: The privilege level the vCPU was made for (``vm.vcpu(..., ring=3)``).
    ring: int = 0
    #: The KVM_SET_MSRS block last built from ``msrs`` (see _write_msrs).
    _msr_block: Any = field(default=None, init=False, repr=False, compare=False)
    #: (TSC value, its KVM_SET_MSRS block), for write_tsc.
    _tsc_block: Any = field(default=None, init=False, repr=False, compare=False)
    #: The kernel structs last built from ``xsave`` and ``fpu`` (see
    #: _cached_struct): a restore loop passes them again.
    _structs: Dict[str, Any] = field(default_factory=dict, init=False, repr=False,
                                     compare=False)


# -- reading --------------------------------------------------------------------

_READABLE_MSRS: Dict[str, List[int]] = {}


def _readable_msrs(fd) -> List[int]:
    """KVM's MSR index list minus the MSRs KVM will not read back (cached
    per device).  KVM_GET_MSRS stops at the first one it refuses: skip it."""
    kvm = fd.vm.kvm
    cached = _READABLE_MSRS.get(kvm.path)
    if cached is not None:
        return cached
    indices = kvm.get_msr_index_list()
    readable: List[int] = []
    at = 0
    while at < len(indices):
        got = fd.get_msrs(indices[at:], partial=True)
        readable.extend(indices[at:at + len(got)])
        at += len(got) + 1
    # IA32_TSC first: the TSC deadline (and anything else relative to the
    # TSC) is written after the TSC it counts in.
    readable.sort(key=lambda index: index != MSR_IA32_TSC)
    _READABLE_MSRS[kvm.path] = readable
    return readable


def _bytes(struct) -> bytes:
    return bytes(ffi.buffer(struct))


def read(fd, regs, index: int, mode: str, ring: int = 0) -> VcpuState:
    """The state of the vCPU behind VcpuFd ``fd``; ``regs`` is its current
    ``struct kvm_regs`` (the owner's cache or sync-regs page)."""
    has = fd.vm.kvm.check_extension
    sregs2 = has("KVM_CAP_SREGS2") if "KVM_CAP_SREGS2" in caps else 0
    return VcpuState(
        index=index, mode=mode, ring=ring, regs=_bytes(ffi.addressof(regs)),
        sregs=None if sregs2 else _bytes(fd.get_sregs()),
        sregs2=_bytes(fd.get_sregs2()) if sregs2 else None,
        fpu=_bytes(fd.get_fpu()),
        events=_bytes(fd.get_vcpu_events()) if has("KVM_CAP_VCPU_EVENTS") else None,
        debugregs=_bytes(fd.get_debugregs()) if has("KVM_CAP_DEBUGREGS") else None,
        mp_state=fd.get_mp_state() if has("KVM_CAP_MP_STATE") else None,
        cpuid=bytes(ffi.buffer(cpuid_table(fd.get_cpuid2()))),
        msrs=fd.get_msrs(_readable_msrs(fd)),
        xcrs=_bytes(fd.get_xcrs()) if has("KVM_CAP_XCRS") else None,
        lapic=_bytes(fd.get_lapic()) if fd.vm.has_irqchip else None,
        xsave=_read_xsave(fd),
        nested=_read_nested(fd))


def _read_xsave(fd) -> Optional[bytes]:
    """The whole XSAVE area (KVM_GET_XSAVE2 where the headers and the
    backend have it), or None for a backend without XSAVE."""
    has = fd.vm.kvm.check_extension
    if lib.PVT_HAVE_KVM_GET_XSAVE2 and "KVM_CAP_XSAVE2" in caps and has("KVM_CAP_XSAVE2"):
        return struct_bytes(fd.get_xsave2())
    return struct_bytes(fd.get_xsave()) if has("KVM_CAP_XSAVE") else None


def _read_nested(fd) -> Optional[bytes]:
    if "KVM_CAP_NESTED_STATE" not in caps or not fd.vm.kvm.check_extension(
            "KVM_CAP_NESTED_STATE"):
        return None
    return struct_bytes(fd.get_nested_state())


# -- writing --------------------------------------------------------------------


def write(fd, state: VcpuState, put_regs) -> None:
    """Puts ``state`` into the vCPU behind ``fd``; ``put_regs(bytes)`` writes
    the general registers (through the owner, which may cache them).  The
    order matters; CPUID (set first, for a clone) decides which CR4 and
    XCR0 bits KVM accepts.

    1. SREGS (or SREGS2): CR0/CR4/EFER, and the APIC base, which says how
       the LAPIC state (4) is read (xAPIC or x2APIC).
    2. REGS.  KVM_SET_REGS drops a pending exception: before VCPU_EVENTS (7).
    3. XCRS, XSAVE, FPU.  XCR0 says which state components are enabled, and
       changing it may put components in their initial state, so the XSAVE
       area (x87, SSE, AVX...) goes in once XCR0 has its final value.
       KVM_SET_XSAVE copies only the components its XSTATE_BV names and
       leaves stale bytes under the others, which KVM_GET_FPU reads raw;
       KVM_SET_FPU last puts the x87/SSE bytes back as they were, so that
       both reads match the snapshot.
    4. LAPIC, after SREGS and before MSRS: KVM takes IA32_TSC_DEADLINE only
       while the LAPIC timer is in TSC-deadline mode (kvm_set_lapic_tscdeadline_msr
       drops it otherwise), and KVM_SET_LAPIC does not carry the deadline.
       Firecracker documents the same order for the same reason.
    5. MSRS, IA32_TSC first, so that the TSC deadline counts in the
       restored TSC.
    6. NESTED_STATE, after SREGS (EFER.SVME, CR4.VMXE) and the MSRs (KVM
       refuses the VMX capability MSRs once the vCPU is in VMX operation).
    7. VCPU_EVENTS: pending exception, interrupt, NMI, interrupt shadow.
    8. DEBUGREGS, then MP_STATE.
    """
    _write_sregs(fd, state)
    put_regs(state.regs)
    if state.xcrs is not None:
        fd.set_xcrs(_struct(state.xcrs, "struct kvm_xcrs"))
    if state.xsave is not None:
        if len(state.xsave) > fd.xsave_size():
            raise SnapshotError(
                f"vCPU {state.index}'s XSAVE area is {len(state.xsave)} bytes, more than this "
                f"host's KVM takes ({fd.xsave_size()}): the snapshot comes from a host with "
                "more XSAVE state (AMX?)")
        fd.set_xsave(_xsave_struct(fd, state))
    fd.set_fpu(_cached_struct(state, "fpu", "struct kvm_fpu"))
    if state.lapic is not None:
        fd.set_lapic(state.lapic)
    _write_msrs(fd, state)
    if state.nested is not None:
        fd.set_nested_state(state.nested)
    if state.events is not None:
        fd.set_vcpu_events(_struct(state.events, "struct kvm_vcpu_events"))
    if state.debugregs is not None:
        fd.set_debugregs(_struct(state.debugregs, "struct kvm_debugregs"))
    if state.mp_state is not None:
        fd.set_mp_state(state.mp_state)


#: The fields a run or a write can change (all but the identity ones).
_CONTENT_FIELDS = operator.attrgetter(
    "regs", "sregs", "sregs2", "fpu", "xsave", "xcrs", "lapic", "events", "debugregs",
    "mp_state", "nested", "cpuid", "mode", "ring")


def fingerprint(state: VcpuState) -> tuple:
    """What :func:`unchanged` compares: the objects ``state``'s fields hold
    now (kept alive, so compared by identity first), its MSR values (a
    copy: a dict compares faster than the items it would be built from)
    and their order (which a write follows: compared by the callers that
    keep ioctl batches built from it)."""
    return state, _CONTENT_FIELDS(state), dict(state.msrs), tuple(state.msrs)


def unchanged(print_: tuple, state: VcpuState) -> bool:
    """True if ``state`` is the object ``print_`` was taken of, with the
    same field values and MSR values (a caller may reassign a field or edit
    ``msrs`` in place).  The MSRs' order is not compared: a vCPU that holds
    these values holds them whatever order they were written in."""
    held, fields, msrs, _ = print_
    return held is state and fields == _CONTENT_FIELDS(state) and msrs == state.msrs


def write_tsc(fd, state: VcpuState) -> None:
    """IA32_TSC alone: what a vCPU that holds ``state`` and has not run
    since still sees change (it counts on while the vCPU waits).  The
    KVM_SET_MSRS block is kept with the state."""
    value = state.msrs.get(MSR_IA32_TSC)
    if value is None:
        return
    cached = state._tsc_block
    if cached is None or cached[0] != value:
        cached = state._tsc_block = (value, msrs_struct({MSR_IA32_TSC: value}))
    fd.set_msrs(cached[1])


#: XSTATE_BV's x87 and SSE bits, at byte 512 of the XSAVE area.
_XSTATE_BV_OFFSET = 512
_XFEATURE_FP_SSE = 0x3


def _fpu_in_xsave(xsave: Optional[bytes]) -> bool:
    """True if KVM_SET_XSAVE of ``xsave`` writes every byte KVM_GET_FPU
    reads (its XSTATE_BV names x87 and SSE), so KVM_SET_FPU adds nothing."""
    if xsave is None or len(xsave) < _XSTATE_BV_OFFSET + 8:
        return False
    bv = int.from_bytes(xsave[_XSTATE_BV_OFFSET:_XSTATE_BV_OFFSET + 8], "little")
    return bv & _XFEATURE_FP_SSE == _XFEATURE_FP_SSE


def write_user_mode(fd, state: VcpuState, put_regs, current_sregs, current_events) -> None:
    """Puts ``state`` back into a vCPU that held it and has since run only
    CPL-3 code (see :meth:`pyvt.Vm.restore`'s ``user_mode_only``): what such
    code can change is the general registers, the segment registers and
    their bases (sregs), the x87/SSE/AVX/PKRU state (XSAVE, with its FPU
    view) and the interrupt shadow (events).  ``current_sregs`` and
    ``current_events`` are the vCPU's values as bytes, when known without an
    ioctl (KVM_SYNC_X86_SREGS/EVENTS), else None: a part equal to the
    state's is not written again."""
    put_regs(state.regs)
    sregs = state.sregs2 if state.sregs2 is not None else state.sregs
    if (sregs is None or current_sregs is None
            or current_sregs[:_SREGS_COMMON] != sregs[:_SREGS_COMMON]):
        _write_sregs(fd, state)
    if state.xsave is not None:
        fd.set_xsave(_xsave_struct(fd, state))
    if not _fpu_in_xsave(state.xsave):
        fd.set_fpu(_cached_struct(state, "fpu", "struct kvm_fpu"))
    if state.events is not None and current_events != state.events:
        fd.set_vcpu_events(_struct(state.events, "struct kvm_vcpu_events"))


def _cached_struct(state: VcpuState, name: str, ctype: str, length: int = 0):
    """A ``ctype *`` holding field ``name`` of ``state`` (over ``length``
    bytes, zero-padded, for a variable-size struct), kept with the state
    for as long as the field holds the same bytes object."""
    data = getattr(state, name)
    cached = state._structs.get(name)
    if cached is not None and cached[0] is data and cached[1] == length:
        return cached[2]
    if length:
        value = _variable_struct(ctype, length)
        ffi.buffer(value, len(data))[:] = data
    else:
        value = _struct(data, ctype)
    state._structs[name] = (data, length, value)
    return value


def _xsave_struct(fd, state: VcpuState):
    """The XSAVE area as this vCPU's KVM_SET_XSAVE takes it: xsave_size()
    bytes, the state's zero-padded (see VcpuFd.set_xsave)."""
    if state.xsave is None or len(state.xsave) < ffi.sizeof("struct kvm_xsave"):
        return state.xsave  # VcpuFd.set_xsave refuses it, saying why
    return _cached_struct(state, "xsave", "struct kvm_xsave", fd.xsave_size())


def _struct(data: bytes, ctype: str):
    value = ffi.new(ctype + " *")
    ffi.buffer(value)[:] = data
    return value


def _write_sregs(fd, state: VcpuState) -> None:
    """KVM_SET_SREGS2 where the backend has it, else KVM_SET_SREGS; state
    saved as the other struct is converted (their common part is the same:
    sregs2's PDPTRs are not valid then, so KVM reads them from guest
    memory, as KVM_SET_SREGS does; sregs's interrupt bitmap is dropped, the
    pending interrupt travelling in VCPU_EVENTS)."""
    if "KVM_CAP_SREGS2" in caps and fd.vm.kvm.check_extension("KVM_CAP_SREGS2"):
        fd.set_sregs2(_sregs_as(state.sregs2, state.sregs, "struct kvm_sregs2"))
    else:
        fd.set_sregs(_sregs_as(state.sregs, state.sregs2, "struct kvm_sregs"))


def _sregs_as(same: Optional[bytes], other: Optional[bytes], ctype: str):
    """A ``ctype *`` from the state saved as ``ctype`` (``same``) or as the
    other special-register struct (``other``: their common part)."""
    data = same
    if data is None:
        if other is None:
            raise SnapshotError("this vCPU state has no special registers")
        data = other[:_SREGS_COMMON] + bytes(ffi.sizeof(ctype) - _SREGS_COMMON)
    return _struct(data, ctype)


_REFUSED_MSRS: Dict[str, set] = {}


def _write_msrs(fd, state: VcpuState) -> None:
    """KVM_SET_MSRS, skipping the few MSRs KVM reports but will not take back
    (it stops at the first refusal; those are remembered per device).  The
    block KVM took whole is kept with the state: a restore loop reuses it."""
    refused = _REFUSED_MSRS.setdefault(fd.vm.kvm.path, set())
    key = (len(refused), tuple(state.msrs.items()))  # `refused` only grows
    cached = state._msr_block
    if cached is not None and cached[0] == key:
        _, block = cached
        if fd.set_msrs(block, partial=True) == block.nmsrs:
            return
    items = {k: v for k, v in state.msrs.items() if k not in refused}
    first = True
    while items:
        block = msrs_struct(items)
        done = fd.set_msrs(block, partial=True)
        if first and done == len(items):
            state._msr_block = (key, block)
        first = False
        if done < len(items):
            refused.add(block.entries[done].index)
        items = dict(list(items.items())[done + 1:])
