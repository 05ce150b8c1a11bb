"""The vCPU file descriptor of the thin layer: :class:`VcpuFd` (re-exported by
:mod:`pyvt.kvm`)."""

from __future__ import annotations

import errno
import mmap
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Union

from ._kvm import ffi, lib
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    ClosedError,
    KvmError,
)
from .kvm_base import (caps, PAGE_SIZE, CpuidEntry, _LENGTHS, _Fd, _arg, _as_list, _cpuid2_buffer, _enable_cap_struct, _get_msrs, _read_cpuid, _require_cap, _struct_arg, _struct_pointer, _u32, _u64, _variable_struct, cpuid_table, msrs_struct, struct_bytes)
# In-kernel devices and binary statistics build on _Fd (issue 12, sections B and D).
from .kvm_device import get_device_attr as _get_device_attr
from .kvm_device import has_device_attr as _has_device_attr
from .kvm_device import set_device_attr as _set_device_attr
from .kvm_stats import StatsFd
from .kvm_stats import open_stats_fd as _open_stats_fd

if TYPE_CHECKING:
    from .dirty_ring import DirtyRing
    from .kvm_vm import VmFd


#: ioctls that only read a vCPU's state (the rest may change it).
_READING_IOCTLS = ("KVM_GET_", "KVM_CHECK_EXTENSION", "KVM_TRANSLATE", "KVM_HAS_DEVICE_ATTR")


class VcpuFd(_Fd):
    """A vCPU file descriptor with its mmap'd ``struct kvm_run`` (``.run``)."""

    _mmap: Optional[mmap.mmap] = None
    #: How many ioctls that may change the vCPU's state (all but reads) went
    #: through this fd: pyvt.Vcpu's restore skips state it wrote itself only
    #: while this count is the one it saw then, so a write through ``fd``
    #: (not through the Vcpu) is never left in place by a restore.
    writes = 0

    def _ioctl(self, name: str, request: int, arg=None, hint: str = "") -> int:
        if not name.startswith(_READING_IOCTLS):
            self.writes += 1
        return super()._ioctl(name, request, arg, hint)

    def __init__(self, vm: VmFd, fd: int, index: int):
        self.vm = vm
        self.index = index
        self._fd = fd
        self._xsave_size: Optional[int] = None
        size = vm.kvm.vcpu_mmap_size()
        try:
            self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            self.close()
            raise KvmError("mmap(kvm_run)", e.errno) from None
        self._view = ffi.from_buffer(self._mmap)
        #: Zero-copy view of the shared ``struct kvm_run`` page.
        self.run_struct = ffi.cast("struct kvm_run *", self._view)
        self.run_address = int(ffi.cast("uintptr_t", self._view))
        ring_offset = lib.KVM_COALESCED_MMIO_PAGE_OFFSET * PAGE_SIZE
        #: Offset of the VM's coalesced-write ring in this mapping, or 0.
        self.coalesced_ring_offset = (
            ring_offset
            if vm.kvm.check_extension("KVM_CAP_COALESCED_MMIO") and ring_offset < size
            else 0
        )

    def __repr__(self) -> str:
        return f"<VcpuFd {self.index} fd={self._fd}>"

    @property
    def run_page(self) -> mmap.mmap:
        """The vCPU's mapping (``kvm_run`` and the pages after it)."""
        if self._mmap is None:
            raise ClosedError(f"vCPU {self.index} is closed")
        return self._mmap

    def close(self) -> None:
        view, self._view = getattr(self, "_view", None), None
        self.run_struct = None
        if view is not None:
            ffi.release(view)
        mapping = getattr(self, "_mmap", None)
        self._mmap = None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # a run loop still holds the page; unmapped when it lets go
        self._close_dirty_ring()
        super().close()

    def run(self) -> int:
        """``KVM_RUN`` once, from Python (the GIL is released meanwhile).

        Returns the exit reason; the details are in :attr:`run_struct`.
        pyvt's own run loop is native (see :meth:`pyvt.Vcpu.run`).
        """
        self._ioctl("KVM_RUN", lib.KVM_RUN)
        return self.run_struct.exit_reason

    def _open_run_struct(self):
        if self.run_struct is None:
            raise ClosedError(f"vCPU {self.index} is closed")
        return self.run_struct

    @property
    def immediate_exit(self) -> bool:
        """``kvm_run.immediate_exit``: KVM_RUN returns EINTR at once when set."""
        return bool(self._open_run_struct().immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self._open_run_struct().immediate_exit = 1 if value else 0

    def _get(self, name: str, request: int, ctype: str):
        value = ffi.new(ctype)
        self._ioctl(name, request, value)
        return value

    def get_regs(self):
        """``KVM_GET_REGS`` -> ``struct kvm_regs`` (cffi)."""
        return self._get("KVM_GET_REGS", lib.KVM_GET_REGS, "struct kvm_regs *")

    def set_regs(self, regs) -> None:
        """``KVM_SET_REGS``."""
        self._ioctl("KVM_SET_REGS", lib.KVM_SET_REGS,
                    _struct_pointer(regs, "struct kvm_regs", "KVM_SET_REGS"))

    def get_sregs(self):
        """``KVM_GET_SREGS`` -> ``struct kvm_sregs``."""
        return self._get("KVM_GET_SREGS", lib.KVM_GET_SREGS, "struct kvm_sregs *")

    def set_sregs(self, sregs) -> None:
        """``KVM_SET_SREGS``."""
        self._ioctl("KVM_SET_SREGS", lib.KVM_SET_SREGS,
                    _struct_pointer(sregs, "struct kvm_sregs", "KVM_SET_SREGS"))

    def get_fpu(self):
        """``KVM_GET_FPU`` -> ``struct kvm_fpu``."""
        return self._get("KVM_GET_FPU", lib.KVM_GET_FPU, "struct kvm_fpu *")

    def set_fpu(self, fpu) -> None:
        """``KVM_SET_FPU``."""
        self._ioctl("KVM_SET_FPU", lib.KVM_SET_FPU,
                    _struct_pointer(fpu, "struct kvm_fpu", "KVM_SET_FPU"))

    def get_msrs(self, indices: Iterable[int], partial: bool = False) -> Dict[int, int]:
        """``KVM_GET_MSRS``: {index: value}.  KVM reads them in order and stops
        at the first it cannot read: that raises, unless ``partial=True``,
        which returns those read before it."""
        indices = _as_list(indices, "MSR indices", "ints")
        values = _get_msrs(self, indices, "KVM_GET_MSRS")
        if len(values) < len(indices) and not partial:
            bad = indices[len(values)]
            raise KvmError("KVM_GET_MSRS", errno.EINVAL,
                           f"MSR {bad:#x} cannot be read on this vCPU")
        return values

    def set_msrs(self, values, partial: bool = False) -> Optional[int]:
        """``KVM_SET_MSRS`` from ``{index: value}`` (or a ``struct kvm_msrs *``
        from :func:`msrs_struct`, passed as it is).  KVM writes them in order
        and stops at the first it refuses: that raises, naming it, unless
        ``partial=True``, which returns how many KVM took (the refused one is
        ``entries[n]``)."""
        if isinstance(values, ffi.CData):
            msrs = _struct_pointer(values, "struct kvm_msrs", "KVM_SET_MSRS")
        else:
            msrs = msrs_struct(values)
        done = self._ioctl("KVM_SET_MSRS", lib.KVM_SET_MSRS, msrs)
        if partial:
            return done
        if done < msrs.nmsrs:
            refused = msrs.entries[done]
            raise KvmError("KVM_SET_MSRS", errno.EINVAL,
                           f"MSR {refused.index:#x} refused the value {refused.data:#x}")
        return None

    def get_cpuid2(self) -> List[CpuidEntry]:
        """``KVM_GET_CPUID2``: the CPUID table this vCPU shows its guest."""
        return _read_cpuid(self, "KVM_GET_CPUID2", lib.KVM_GET_CPUID2)

    def set_cpuid2(self, entries: Sequence[CpuidEntry]) -> None:
        """``KVM_SET_CPUID2``.  KVM refuses a different table after the first run."""
        self.set_cpuid2_table(cpuid_table(entries))

    def set_cpuid2_table(self, table) -> None:
        """``KVM_SET_CPUID2`` from a prepared ``struct kvm_cpuid2`` buffer
        (see :func:`cpuid_table`)."""
        arg = table if isinstance(table, ffi.CData) else _cpuid2_buffer(table)
        self._ioctl("KVM_SET_CPUID2", lib.KVM_SET_CPUID2, arg,
                    hint="KVM refuses to change CPUID after the vCPU has run")

    def set_guest_debug(self, control: int, debugreg: Sequence[int] = ()) -> None:
        """``KVM_SET_GUEST_DEBUG`` (``KVM_GUESTDBG_*`` flags in ``control``)."""
        debugreg = _as_list(debugreg, "debugreg", "at most 8 ints")
        if len(debugreg) > 8:
            raise ArgumentError(f"debugreg holds DR0-DR7: at most 8 values, not {len(debugreg)}")
        dbg = ffi.new("struct kvm_guest_debug *")
        dbg.control = _u32(control, "control")
        for i, value in enumerate(debugreg):
            dbg.arch.debugreg[i] = _u64(value, "debug register")
        self._ioctl("KVM_SET_GUEST_DEBUG", lib.KVM_SET_GUEST_DEBUG, dbg)

    def get_mp_state(self) -> int:
        """``KVM_GET_MP_STATE`` -> a ``KVM_MP_STATE_*`` value."""
        return self._get("KVM_GET_MP_STATE", lib.KVM_GET_MP_STATE,
                         "struct kvm_mp_state *").mp_state

    def set_mp_state(self, state: int) -> None:
        """``KVM_SET_MP_STATE``."""
        mp = ffi.new("struct kvm_mp_state *", {"mp_state": _u32(state, "state")})
        self._ioctl("KVM_SET_MP_STATE", lib.KVM_SET_MP_STATE, mp)

    def get_lapic(self):
        """``KVM_GET_LAPIC`` -> ``struct kvm_lapic_state``: the local APIC's
        register page (``regs``)."""
        return self._get("KVM_GET_LAPIC", lib.KVM_GET_LAPIC, "struct kvm_lapic_state *")

    def set_lapic(self, state) -> None:
        """``KVM_SET_LAPIC`` from :meth:`get_lapic`'s struct (or its bytes)."""
        self._ioctl("KVM_SET_LAPIC", lib.KVM_SET_LAPIC,
                    _struct_arg(state, "struct kvm_lapic_state", "KVM_SET_LAPIC"))

    def get_vcpu_events(self):
        """``KVM_GET_VCPU_EVENTS`` -> ``struct kvm_vcpu_events``."""
        return self._get("KVM_GET_VCPU_EVENTS", lib.KVM_GET_VCPU_EVENTS,
                         "struct kvm_vcpu_events *")

    def set_vcpu_events(self, events) -> None:
        """``KVM_SET_VCPU_EVENTS``."""
        self._ioctl("KVM_SET_VCPU_EVENTS", lib.KVM_SET_VCPU_EVENTS,
                    _struct_pointer(events, "struct kvm_vcpu_events", "KVM_SET_VCPU_EVENTS"))

    def get_debugregs(self):
        """``KVM_GET_DEBUGREGS`` -> ``struct kvm_debugregs``."""
        return self._get("KVM_GET_DEBUGREGS", lib.KVM_GET_DEBUGREGS, "struct kvm_debugregs *")

    def set_debugregs(self, debugregs) -> None:
        """``KVM_SET_DEBUGREGS``."""
        self._ioctl("KVM_SET_DEBUGREGS", lib.KVM_SET_DEBUGREGS,
                    _struct_pointer(debugregs, "struct kvm_debugregs", "KVM_SET_DEBUGREGS"))

    def get_xcrs(self):
        """``KVM_GET_XCRS`` -> ``struct kvm_xcrs``."""
        return self._get("KVM_GET_XCRS", lib.KVM_GET_XCRS, "struct kvm_xcrs *")

    def set_xcrs(self, xcrs) -> None:
        """``KVM_SET_XCRS``."""
        self._ioctl("KVM_SET_XCRS", lib.KVM_SET_XCRS,
                    _struct_pointer(xcrs, "struct kvm_xcrs", "KVM_SET_XCRS"))

    def xsave_size(self) -> int:
        """How many bytes this vCPU's XSAVE area takes: what
        ``KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)`` answers on the VM fd, or 4096
        (``struct kvm_xsave``) where the backend or the headers lack it."""
        if self._xsave_size is None:
            size = 0
            if lib.PVT_HAVE_KVM_GET_XSAVE2 and "KVM_CAP_XSAVE2" in caps:
                size = self.vm.check_extension("KVM_CAP_XSAVE2")
            self._xsave_size = max(size, ffi.sizeof("struct kvm_xsave"))
        return self._xsave_size

    def get_xsave(self):
        """``KVM_GET_XSAVE`` (needs KVM_CAP_XSAVE) -> ``struct kvm_xsave``: the
        first 4096 bytes of the vCPU's XSAVE area (``region``) in the standard
        (non-compacted) format: x87, SSE, AVX and the other components up to
        there, with the XSAVE header (XSTATE_BV) at offset 512.  Components
        beyond 4096 bytes (AMX tiles) need :meth:`get_xsave2`."""
        return self._get("KVM_GET_XSAVE", lib.KVM_GET_XSAVE, "struct kvm_xsave *")

    def get_xsave2(self):
        """``KVM_GET_XSAVE2`` (needs KVM_CAP_XSAVE2) -> ``struct kvm_xsave``
        holding the whole XSAVE area, :meth:`xsave_size` bytes long
        (:func:`struct_bytes` gives them all)."""
        if not lib.PVT_HAVE_KVM_GET_XSAVE2:
            raise KvmError("KVM_GET_XSAVE2", errno.ENOTTY,
                           "pyvt was built against <linux/kvm.h> older than Linux 5.17, "
                           "which lacks it; use get_xsave()")
        area = _variable_struct("struct kvm_xsave", self.xsave_size())
        self._ioctl("KVM_GET_XSAVE2", lib.KVM_GET_XSAVE2, area)
        return area

    def set_xsave(self, state) -> None:
        """``KVM_SET_XSAVE`` from :meth:`get_xsave` or :meth:`get_xsave2`'s
        struct, or its bytes.

        KVM reads :meth:`xsave_size` bytes: a shorter area (4096 bytes from
        ``get_xsave``) is passed zero-padded, so the components it lacks
        are those its XSTATE_BV leaves in their initial state."""
        size = self.xsave_size()
        if isinstance(state, ffi.CData):
            area = _struct_pointer(state, "struct kvm_xsave", "KVM_SET_XSAVE")
            if _LENGTHS.get(area, ffi.sizeof("struct kvm_xsave")) >= size:
                self._ioctl("KVM_SET_XSAVE", lib.KVM_SET_XSAVE, area)
                return
            state = struct_bytes(area)
        if not isinstance(state, (bytes, bytearray)):
            raise ArgumentTypeError(f"XSAVE state must be a struct kvm_xsave (get_xsave()) or "
                                    f"its bytes, not {type(state).__name__}")
        if not ffi.sizeof("struct kvm_xsave") <= len(state) <= size:
            raise ArgumentError(f"XSAVE state must be {ffi.sizeof('struct kvm_xsave')}-{size} "
                                f"bytes for this vCPU, not {len(state)}")
        area = ffi.new("char[]", size)
        ffi.buffer(area, len(state))[:] = state
        self._ioctl("KVM_SET_XSAVE", lib.KVM_SET_XSAVE, area)

    # -- device attributes of the vCPU (issue 12, section B) --------------------------

    def _require_vcpu_attributes(self, ioctl: str) -> None:
        _require_cap(self.vm, "KVM_CAP_VCPU_ATTRIBUTES", ioctl)

    def set_device_attr(self, group: int, attr: int, data=None, *, flags: int = 0) -> None:
        """``KVM_SET_DEVICE_ATTR`` on the vCPU (api.rst 4.80; needs
        KVM_CAP_VCPU_ATTRIBUTES), e.g. x86's ``KVM_VCPU_TSC_CTRL`` /
        ``KVM_VCPU_TSC_OFFSET``: writes ``data`` (bytes-like, or None)."""
        self._require_vcpu_attributes("KVM_SET_DEVICE_ATTR")
        _set_device_attr(self, group, attr, data, flags=flags, where=f"vCPU {self.index}")

    def get_device_attr(self, group: int, attr: int, size: int = 8, *, flags: int = 0) -> bytes:
        """``KVM_GET_DEVICE_ATTR`` on the vCPU (api.rst 4.80): ``size`` bytes."""
        self._require_vcpu_attributes("KVM_GET_DEVICE_ATTR")
        return _get_device_attr(self, group, attr, size, flags=flags,
                                where=f"vCPU {self.index}")

    def has_device_attr(self, group: int, attr: int, *, flags: int = 0) -> bool:
        """``KVM_HAS_DEVICE_ATTR`` on the vCPU (api.rst 4.81)."""
        self._require_vcpu_attributes("KVM_HAS_DEVICE_ATTR")
        return _has_device_attr(self, group, attr, flags=flags, where=f"vCPU {self.index}")

    # -- interrupts, MSI and GSI routing, translation, clocks, nested state, sregs2 ---

    def interrupt(self, vector: int) -> None:
        """``KVM_INTERRUPT`` (4.16): queues external interrupt ``vector`` for
        the next KVM_RUN.  Only for VMs WITHOUT the in-kernel irqchip (with
        it, KVM refuses: ENXIO).  KVM injects it on entry whatever the
        guest's RFLAGS.IF, so a VMM calls it only when the last exit said
        ``run_struct.ready_for_interrupt_injection``, else sets
        ``run_struct.request_interrupt_window`` and waits for
        KVM_EXIT_IRQ_WINDOW_OPEN (:meth:`pyvt.Vcpu.interrupt` does this)."""
        vector = _u32(vector, "interrupt vector")
        if vector > 0xFF:
            raise ArgumentError(f"an x86 interrupt vector is 0-255, not {vector}")
        irq = ffi.new("struct kvm_interrupt *", {"irq": vector})
        try:
            self._ioctl("KVM_INTERRUPT", lib.KVM_INTERRUPT, irq)
        except KvmError as e:
            if e.errno == errno.ENXIO:
                raise KvmError("KVM_INTERRUPT", e.errno,
                               "this VM has the in-kernel irqchip, which delivers interrupts "
                               "itself: raise them with irq_line, irqfd or signal_msi") from None
            if e.errno == errno.EEXIST:
                raise KvmError("KVM_INTERRUPT", e.errno, "an interrupt is already queued: "
                               "run the vCPU to deliver it first") from None
            raise

    def has_interrupt(self) -> bool:
        """Whether this backend implements ``KVM_INTERRUPT``, which no
        capability announces (KVM has always had it on x86; pyvt.ko has
        not).  Asked once per device with vector 256, which KVM refuses
        (EINVAL) before it looks at anything else, so nothing is queued."""
        kvm = self.vm.kvm  # shared per device: the answer is the backend's
        known = kvm._has_interrupt
        if known is None:
            irq = ffi.new("struct kvm_interrupt *", {"irq": 256})
            known = lib.ioctl(self._fd, lib.KVM_INTERRUPT, irq) < 0 and ffi.errno != errno.ENOTTY
            kvm._has_interrupt = known
        return known

    def nmi(self) -> None:
        """``KVM_NMI`` (4.64, KVM_CAP_USER_NMI): queues an NMI.  Meant for VMs
        without the in-kernel irqchip; with it KVM still injects the NMI
        into the vCPU directly (bypassing the LAPIC's LINT1 LVT)."""
        _require_cap(self.vm.kvm, "KVM_CAP_USER_NMI", "KVM_NMI")
        self._ioctl("KVM_NMI", lib.KVM_NMI)

    def smi(self) -> None:
        """``KVM_SMI`` (4.96, KVM_CAP_X86_SMM): queues a system management interrupt."""
        _require_cap(self.vm.kvm, "KVM_CAP_X86_SMM", "KVM_SMI",
                     "its KVM was built without SMM support (CONFIG_KVM_SMM)")
        self._ioctl("KVM_SMI", lib.KVM_SMI)

    def translate(self, linear_address: int):
        """``KVM_TRANSLATE`` (4.15) -> ``struct kvm_translation``: walks the
        guest's page tables (its current CR3 and paging mode) for
        ``linear_address``: ``valid`` says whether it is mapped, and
        ``physical_address`` where.  On x86, KVM always reports
        ``writeable`` 1 and ``usermode`` 0, whatever the page tables say."""
        tr = ffi.new("struct kvm_translation *",
                     {"linear_address": _u64(linear_address, "linear address")})
        self._ioctl("KVM_TRANSLATE", lib.KVM_TRANSLATE, tr,
                    hint=f"{self.vm.kvm.path} does not implement it (pyvt.ko does not)")
        return tr

    def kvmclock_ctrl(self) -> None:
        """``KVM_KVMCLOCK_CTRL`` (4.70, KVM_CAP_KVMCLOCK_CTRL): tells the guest,
        through its kvmclock page (PVCLOCK_GUEST_STOPPED), that the host
        paused it, so its soft-lockup watchdog does not fire.  Needs a
        guest that enabled kvmclock (EINVAL otherwise)."""
        _require_cap(self.vm.kvm, "KVM_CAP_KVMCLOCK_CTRL", "KVM_KVMCLOCK_CTRL")
        self._ioctl("KVM_KVMCLOCK_CTRL", lib.KVM_KVMCLOCK_CTRL,
                    hint="the guest has not enabled kvmclock (MSR_KVM_SYSTEM_TIME_NEW)")

    def get_tsc_khz(self) -> int:
        """``KVM_GET_TSC_KHZ`` (4.56, KVM_CAP_GET_TSC_KHZ): the guest's TSC rate in kHz."""
        _require_cap(self.vm.kvm, "KVM_CAP_GET_TSC_KHZ", "KVM_GET_TSC_KHZ")
        return self._ioctl("KVM_GET_TSC_KHZ", lib.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        """``KVM_SET_TSC_KHZ`` (4.55, KVM_CAP_TSC_CONTROL): sets the guest's TSC
        rate in kHz (0: the host's).  Kernels since 5.16 refuse every rate
        (EINVAL) where the CPU cannot scale the TSC (KVM_CAP_TSC_CONTROL 0)."""
        khz = _u32(khz, "TSC rate (kHz)")
        hint = ""
        if not self.vm.kvm.check_extension("KVM_CAP_TSC_CONTROL"):
            hint = (f"{self.vm.kvm.path} lacks KVM_CAP_TSC_CONTROL, which setting "
                    "the guest's TSC rate needs")
        self._ioctl("KVM_SET_TSC_KHZ", lib.KVM_SET_TSC_KHZ, _arg(khz), hint=hint)

    def _nested_state_size(self, ioctl: str) -> int:
        return _require_cap(self.vm.kvm, "KVM_CAP_NESTED_STATE", ioctl,
                            "nested virtualization state needs a host with nested "
                            "VMX/SVM (kvm_intel/kvm_amd nested=1)")

    def get_nested_state(self):
        """``KVM_GET_NESTED_STATE`` (4.114, KVM_CAP_NESTED_STATE) -> ``struct
        kvm_nested_state`` followed by its data, ``size`` bytes in all
        (:func:`struct_bytes` gives them)."""
        room = self._nested_state_size("KVM_GET_NESTED_STATE")
        room = max(room, ffi.sizeof("struct kvm_nested_state"))
        state = _variable_struct("struct kvm_nested_state", room)
        state.size = room
        self._ioctl("KVM_GET_NESTED_STATE", lib.KVM_GET_NESTED_STATE, state)
        _LENGTHS[state] = min(state.size, room)
        return state

    def set_nested_state(self, state) -> None:
        """``KVM_SET_NESTED_STATE`` (4.115) from :meth:`get_nested_state`'s
        struct (or its bytes)."""
        self._nested_state_size("KVM_SET_NESTED_STATE")
        if isinstance(state, ffi.CData):
            state = struct_bytes(_struct_pointer(state, "struct kvm_nested_state",
                                                 "KVM_SET_NESTED_STATE"))
        if not isinstance(state, (bytes, bytearray)):
            raise ArgumentTypeError(f"nested state must be a struct kvm_nested_state "
                                    f"(get_nested_state()) or its bytes, not "
                                    f"{type(state).__name__}")
        header = ffi.sizeof("struct kvm_nested_state")
        buf = ffi.new("char[]", max(len(state), header))
        ffi.buffer(buf, len(state))[:] = state
        size = ffi.cast("struct kvm_nested_state *", buf).size
        if len(state) < header or size > len(state):
            raise ArgumentError(f"nested state must hold its {header}-byte header and the "
                                f"size it names ({size}); it has {len(state)} bytes")
        self._ioctl("KVM_SET_NESTED_STATE", lib.KVM_SET_NESTED_STATE, buf)

    def enable_cap(self, cap: Union[int, str], *args: int, flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` (4.37) on the vCPU (e.g. KVM_CAP_ENFORCE_PV_FEATURE_CPUID,
        KVM_CAP_HYPERV_SYNIC)."""
        self._ioctl("KVM_ENABLE_CAP", lib.KVM_ENABLE_CAP, _enable_cap_struct(cap, args, flags))

    def get_sregs2(self):
        """``KVM_GET_SREGS2`` (4.131, KVM_CAP_SREGS2) -> ``struct kvm_sregs2``:
        the special registers with the PAE PDPTRs (``pdptrs``, valid when
        ``flags`` has KVM_SREGS2_FLAGS_PDPTRS_VALID) and no interrupt bitmap."""
        _require_cap(self.vm.kvm, "KVM_CAP_SREGS2", "KVM_GET_SREGS2")
        return self._get("KVM_GET_SREGS2", lib.KVM_GET_SREGS2, "struct kvm_sregs2 *")

    def set_sregs2(self, sregs2) -> None:
        """``KVM_SET_SREGS2`` (4.132)."""
        _require_cap(self.vm.kvm, "KVM_CAP_SREGS2", "KVM_SET_SREGS2")
        self._ioctl("KVM_SET_SREGS2", lib.KVM_SET_SREGS2,
                    _struct_pointer(sregs2, "struct kvm_sregs2", "KVM_SET_SREGS2"))

    def get_supported_hv_cpuid(self) -> List[CpuidEntry]:
        """``KVM_GET_SUPPORTED_HV_CPUID`` on the vCPU (4.118, KVM_CAP_HYPERV_CPUID;
        deprecated in favour of :meth:`Kvm.get_supported_hv_cpuid`)."""
        _require_cap(self.vm.kvm, "KVM_CAP_HYPERV_CPUID", "KVM_GET_SUPPORTED_HV_CPUID")
        return _read_cpuid(self, "KVM_GET_SUPPORTED_HV_CPUID", lib.KVM_GET_SUPPORTED_HV_CPUID)

    # -- the dirty ring --------------------------------------------------------

    _dirty_ring: Optional["DirtyRing"] = None

    def dirty_ring(self) -> "DirtyRing":
        """This vCPU's dirty ring (:class:`pyvt.dirty_ring.DirtyRing`), mapped
        on first use from ``KVM_DIRTY_LOG_PAGE_OFFSET`` pages into the fd
        (see "8.29 KVM_CAP_DIRTY_LOG_RING/KVM_CAP_DIRTY_LOG_RING_ACQ_REL")."""
        from .dirty_ring import DirtyRing

        self.fileno()
        if self._dirty_ring is None:
            if not self.vm.dirty_ring_size:
                raise KvmError("mmap(dirty ring)", errno.ENXIO,
                               "this VM has no dirty ring: VmFd.enable_dirty_log_ring() "
                               "before creating vCPUs")
            self._dirty_ring = DirtyRing(self.fileno(), self.vm.dirty_ring_size, self.index)
        return self._dirty_ring

    def _close_dirty_ring(self) -> None:
        ring, self._dirty_ring = self._dirty_ring, None
        if ring is not None:
            ring.close()

    # -- binary statistics -----------------------------------------------------

    def get_stats_fd(self) -> "StatsFd":
        """``KVM_GET_STATS_FD`` on the vCPU (api.rst "4.133 KVM_GET_STATS_FD",
        needs KVM_CAP_BINARY_STATS_FD): a new :class:`pyvt.kvm_stats.StatsFd`
        of this vCPU's statistics (``exits``, ``io_exits``, ``halt_exits``...).
        The caller owns it: close it (or use ``with``) when done."""
        return _open_stats_fd(self, self.vm.kvm, f"vCPU {self.index}")

