"""The thin layer: one Python object per KVM file descriptor, one method per ioctl.

``Kvm`` (the system fd) creates ``VmFd``, which creates ``VcpuFd``, the way
the kernel's objects nest.  Each method wraps one ioctl, checks its result and
raises :class:`pyvt.KvmError` with the errno and the ioctl's name.  Struct
layouts and ioctl numbers come from ``<linux/kvm.h>`` through cffi
(``pyvt._kvm``); nothing here computes an offset.  The high-level ``pyvt.Vm``
is built on these objects; people writing their own VMM can use them directly.

The same ABI is spoken by ``/dev/kvm`` and by the project's ``/dev/pyvt``.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from ._kvm import ffi, lib
from .errors import (
    ApiVersionMismatch,
    ArgumentError,
    ArgumentTypeError,
    BackendError,
    BackendNotFound,
    BackendPermissionError,
    ClosedError,
    KvmError,
    check,
)

if TYPE_CHECKING:
    from .dirty_ring import DirtyRing

#: Every ``KVM_CAP_*`` the build headers define: name -> number.
caps: Dict[str, int] = {
    name: getattr(lib, name) for name in dir(lib) if name.startswith("KVM_CAP_")
}

PAGE_SIZE = mmap.PAGESIZE
KVM_API_VERSION = lib.KVM_API_VERSION
DEFAULT_DEVICE = "/dev/kvm"
PYVT_DEVICE = "/dev/pyvt"


def host_cpuid(leaf: int, subleaf: int = 0) -> tuple:
    """Executes CPUID on the host: returns ``(eax, ebx, ecx, edx)``."""
    out = ffi.new("uint32_t[4]")
    lib.pvt_host_cpuid(_u32(leaf, "CPUID leaf"), _u32(subleaf, "CPUID subleaf"), out)
    return tuple(out)


@dataclass(frozen=True)
class CpuidEntry:
    """One ``struct kvm_cpuid_entry2``."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    def __repr__(self) -> str:
        return (
            f"CpuidEntry(function={self.function:#x}, index={self.index}, "
            f"flags={self.flags:#x}, eax={self.eax:#010x}, ebx={self.ebx:#010x}, "
            f"ecx={self.ecx:#010x}, edx={self.edx:#010x})"
        )


_CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")


def _read_cpuid(fd: _Fd, name: str, request: int) -> List[CpuidEntry]:
    """Runs a CPUID-table ioctl, growing the table until it fits (E2BIG)."""
    nent = 128
    while True:
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2")
                      + nent * ffi.sizeof("struct kvm_cpuid_entry2"))
        cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
        cpuid.nent = nent
        ret = lib.ioctl(fd.fileno(), request, cpuid)
        if ret < 0 and ffi.errno == errno.E2BIG and nent < 4096:
            nent *= 2
            continue
        check(ret, name)
        return [CpuidEntry(*(getattr(cpuid.entries[i], f) for f in _CPUID_FIELDS))
                for i in range(cpuid.nent)]


def cpuid_table(entries: Sequence[CpuidEntry]):
    """A ``struct kvm_cpuid2`` (cffi) holding ``entries``, validated."""
    entries = _as_list(entries, "CPUID entries", "pyvt.kvm.CpuidEntry")
    buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2")
                  + len(entries) * ffi.sizeof("struct kvm_cpuid_entry2"))
    cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
    cpuid.nent = len(entries)
    for i, entry in enumerate(entries):
        if not isinstance(entry, CpuidEntry):
            raise ArgumentError(f"CPUID entries must be pyvt.kvm.CpuidEntry, not {entry!r}")
        for field in _CPUID_FIELDS:
            setattr(cpuid.entries[i], field, _u32(getattr(entry, field), field))
    return buf


def _cpuid2_buffer(table):
    """A bytes-like ``struct kvm_cpuid2`` as cffi, checked to hold its entries
    (KVM reads ``nent`` of them)."""
    try:
        buf = ffi.from_buffer(table)
    except TypeError:
        raise ArgumentTypeError(f"a CPUID table must be a struct kvm_cpuid2 (bytes-like), "
                                f"not {type(table).__name__}") from None
    header = ffi.sizeof("struct kvm_cpuid2")
    nent = ffi.cast("struct kvm_cpuid2 *", buf).nent if len(buf) >= header else 0
    need = header + nent * ffi.sizeof("struct kvm_cpuid_entry2")
    if len(buf) < need:
        raise ArgumentError(f"this CPUID table has {len(buf)} bytes; its header and "
                            f"{nent} entries need {need}")
    return buf


def _cap_number(cap: Union[int, str]) -> int:
    if isinstance(cap, str):
        name = cap if cap.startswith("KVM_CAP_") else "KVM_CAP_" + cap.upper()
        if name not in caps:
            raise ArgumentError(f"unknown capability {cap!r}: see pyvt.kvm.caps")
        return caps[name]
    if isinstance(cap, bool) or not isinstance(cap, int):
        raise ArgumentTypeError(f"capability must be a number or a KVM_CAP_* name, not {cap!r}")
    return _u32(cap, "capability number")


def _enable_cap_struct(cap: Union[int, str], args: Sequence[int], flags: int):
    """The ``struct kvm_enable_cap`` of ``enable_cap`` (VM and vCPU alike)."""
    if len(args) > 4:
        raise ArgumentError("KVM_ENABLE_CAP takes at most 4 arguments")
    return ffi.new("struct kvm_enable_cap *", {
        "cap": _cap_number(cap), "flags": _u32(flags, "flags"),
        "args": [_u64(a, "argument") for a in args] + [0] * (4 - len(args)),
    })


def _arg(value: int):
    return ffi.cast("unsigned long", value)


class _Fd:
    """A file descriptor that ioctls go to; closing is idempotent."""

    _fd: int = -1

    def fileno(self) -> int:
        if self._fd < 0:
            raise ClosedError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _ioctl(self, name: str, request: int, arg=None, hint: str = "") -> int:
        fd = self.fileno()
        ret = lib.ioctl(fd, request, _arg(0) if arg is None else arg)
        return check(ret, name, hint)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class Kvm(_Fd):
    """The system file descriptor of a KVM-ABI device (``/dev/kvm``, ``/dev/pyvt``).

    Opening checks the API version (``KVM_GET_API_VERSION`` must be 12).
    """

    _shared: Dict[str, "Kvm"] = {}
    _shared_lock = threading.Lock()
    #: Whether the backend implements KVM_INTERRUPT (VcpuFd.has_interrupt).
    _has_interrupt: Optional[bool] = None

    def __init__(self, path: str = DEFAULT_DEVICE):
        self.path = _device_path(path)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BackendNotFound(
                errno.ENOENT,
                f"{self.path} does not exist: this host has no KVM "
                "(load kvm-intel/kvm-amd, enable virtualization in the "
                "firmware, or pass backend= another device)",
            ) from None
        except PermissionError:
            raise BackendPermissionError(
                errno.EACCES,
                f"no permission to open {self.path}: run as root or add "
                "this user to the group that owns it (often 'kvm')",
            ) from None
        except OSError as e:
            raise KvmError(f"open({self.path})", e.errno) from None
        self._cpuid_cache: Dict[str, List[CpuidEntry]] = {}
        self._extensions: Dict[int, int] = {}
        self._cpuid_buffers: Dict[str, bytes] = {}
        self._mmap_size: Optional[int] = None
        try:
            version = self.api_version()
        except KvmError as e:
            self.close()
            if e.errno in (errno.ENOTTY, errno.EINVAL):
                raise BackendError(f"{self.path} is not a KVM device: it does not answer "
                                   "KVM_GET_API_VERSION") from None
            raise
        if version != KVM_API_VERSION:
            self.close()
            raise ApiVersionMismatch(
                f"{self.path} speaks KVM API version {version}; pyvt needs "
                f"{KVM_API_VERSION}"
            )

    @classmethod
    def shared(cls, path: str = DEFAULT_DEVICE) -> "Kvm":
        """A per-process system fd for ``path``, opened once and reused."""
        path = _device_path(path)
        with cls._shared_lock:
            kvm = cls._shared.get(path)
            if kvm is None or kvm.closed:
                kvm = cls._shared[path] = cls(path)
            return kvm

    def __repr__(self) -> str:
        return f"<Kvm {self.path} fd={self._fd}>"

    def api_version(self) -> int:
        """``KVM_GET_API_VERSION``."""
        return self._ioctl("KVM_GET_API_VERSION", lib.KVM_GET_API_VERSION)

    def check_extension(self, cap: Union[int, str]) -> int:
        """``KVM_CHECK_EXTENSION``: 0 if unsupported, else a positive value.

        ``cap`` is a number or a name (``"KVM_CAP_IRQCHIP"`` or ``"irqchip"``).
        The system fd's answers never change, so each is asked once.
        """
        number = _cap_number(cap)
        answer = self._extensions.get(number)
        if answer is None:
            answer = self._extensions[number] = self._ioctl(
                "KVM_CHECK_EXTENSION", lib.KVM_CHECK_EXTENSION, _arg(number))
        return answer

    def vcpu_mmap_size(self) -> int:
        """``KVM_GET_VCPU_MMAP_SIZE``: bytes to mmap from a vCPU fd."""
        if self._mmap_size is None:
            self._mmap_size = self._ioctl("KVM_GET_VCPU_MMAP_SIZE",
                                          lib.KVM_GET_VCPU_MMAP_SIZE)
        return self._mmap_size

    def _get_cpuid(self, name: str, request: int) -> List[CpuidEntry]:
        cached = self._cpuid_cache.get(name)
        if cached is None:
            cached = self._cpuid_cache[name] = _read_cpuid(self, name, request)
        return list(cached)

    def supported_cpuid_table(self) -> bytes:
        """``KVM_GET_SUPPORTED_CPUID`` as a ready ``struct kvm_cpuid2`` (bytes),
        built once: what :meth:`VcpuFd.set_cpuid2_table` takes."""
        table = self._cpuid_buffers.get("supported")
        if table is None:
            table = self._cpuid_buffers["supported"] = bytes(
                ffi.buffer(cpuid_table(self.get_supported_cpuid())))
        return table

    def get_supported_cpuid(self) -> List[CpuidEntry]:
        """``KVM_GET_SUPPORTED_CPUID``: what a guest may be shown."""
        return self._get_cpuid("KVM_GET_SUPPORTED_CPUID", lib.KVM_GET_SUPPORTED_CPUID)

    def get_emulated_cpuid(self) -> List[CpuidEntry]:
        """``KVM_GET_EMULATED_CPUID``: features KVM emulates in software."""
        return self._get_cpuid("KVM_GET_EMULATED_CPUID", lib.KVM_GET_EMULATED_CPUID)

    def get_supported_hv_cpuid(self) -> List[CpuidEntry]:
        """``KVM_GET_SUPPORTED_HV_CPUID`` on the system fd (4.118, needs
        KVM_CAP_SYS_HYPERV_CPUID): the Hyper-V CPUID leaves KVM can show a
        guest.  Older kernels have only the vCPU variant
        (:meth:`VcpuFd.get_supported_hv_cpuid`, KVM_CAP_HYPERV_CPUID)."""
        _require_cap(self, "KVM_CAP_SYS_HYPERV_CPUID", "KVM_GET_SUPPORTED_HV_CPUID",
                     "the vCPU variant (VcpuFd.get_supported_hv_cpuid) needs "
                     "KVM_CAP_HYPERV_CPUID")
        return self._get_cpuid("KVM_GET_SUPPORTED_HV_CPUID", lib.KVM_GET_SUPPORTED_HV_CPUID)

    def _msr_list(self, name: str, request: int) -> List[int]:
        head = ffi.new("struct kvm_msr_list *")
        ret = lib.ioctl(self.fileno(), request, head)
        if ret < 0 and ffi.errno != errno.E2BIG:
            check(ret, name)
        n = head.nmsrs
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_msr_list") + 4 * n)
        msr_list = ffi.cast("struct kvm_msr_list *", buf)
        msr_list.nmsrs = n
        check(lib.ioctl(self.fileno(), request, msr_list), name)
        return [msr_list.indices[i] for i in range(msr_list.nmsrs)]

    def get_msr_index_list(self) -> List[int]:
        """``KVM_GET_MSR_INDEX_LIST``: MSRs a vCPU's state includes."""
        return self._msr_list("KVM_GET_MSR_INDEX_LIST", lib.KVM_GET_MSR_INDEX_LIST)

    def get_msr_feature_index_list(self) -> List[int]:
        """``KVM_GET_MSR_FEATURE_INDEX_LIST`` (needs KVM_CAP_GET_MSR_FEATURES)."""
        return self._msr_list("KVM_GET_MSR_FEATURE_INDEX_LIST",
                              lib.KVM_GET_MSR_FEATURE_INDEX_LIST)

    def get_msrs(self, indices: Iterable[int]) -> Dict[int, int]:
        """``KVM_GET_MSRS`` on the system fd: feature MSRs (e.g. VMX capabilities).

        Returns the MSRs KVM could read; one it cannot ends the list early.
        """
        return _get_msrs(self, indices, "KVM_GET_MSRS (system)")

    # -- pyvt.ko extras (kernel_module/include/uapi/pyvt.h) -------------------

    def _pyvt_ioctl(self, name: str, request: int, arg) -> None:
        try:
            self._ioctl(name, request, arg)
        except KvmError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL):
                raise KvmError(name, e.errno, f"only /dev/pyvt (kernel_module/, pyvt.ko) "
                               f"answers {name}; {self.path} does not") from None
            raise

    def get_hw_caps(self) -> dict:
        """``PYVT_GET_HW_CAPS`` (``/dev/pyvt`` only): what each host CPU says
        about its virtualization hardware, raw: CPUID 0x8000000A, VM_CR,
        IA32_FEATURE_CONTROL and the VMX capability MSRs.

        Returns ``{"abi_version", "vendor", "nr_cpus", "npt_levels", "cpus":
        [{"cpu", "flags", ..., "vmx_msrs": [...]}, ...]}``.
        """
        max_cpus = os.cpu_count() or 1
        while True:
            cpus = ffi.new("struct pyvt_cpu_caps[]", max_cpus)
            caps = ffi.new("struct pyvt_hw_caps *", {
                "max_cpus": max_cpus, "cpus": int(ffi.cast("uintptr_t", cpus))})
            self._pyvt_ioctl("PYVT_GET_HW_CAPS", lib.PYVT_GET_HW_CAPS, caps)
            if caps.nr_cpus <= max_cpus:
                break
            max_cpus = caps.nr_cpus
        if caps.abi_version != lib.PYVT_ABI_VERSION:
            raise KvmError("PYVT_GET_HW_CAPS", errno.EPROTO,
                           f"pyvt.ko speaks ABI {caps.abi_version}, this pyvt was built "
                           f"for {lib.PYVT_ABI_VERSION}: rebuild one to match the other")
        fields = [name for name, _ in ffi.typeof("struct pyvt_cpu_caps").fields]
        return {
            "abi_version": caps.abi_version, "vendor": caps.vendor, "nr_cpus": caps.nr_cpus,
            "npt_levels": caps.npt_levels,
            "cpus": [{name: (list(getattr(cpus[i], name)) if name == "vmx_msrs"
                             else getattr(cpus[i], name)) for name in fields}
                     for i in range(caps.nr_cpus)],
        }

    def measure_roundtrip(self, iterations: int = 1000) -> dict:
        """``PYVT_MEASURE_ROUNDTRIP`` (``/dev/pyvt`` only): the world-switch round
        trip of a trivial guest (VMRUN to #VMEXIT on AMD, VMLAUNCH/VMRESUME to
        VM exit on Intel), in TSC cycles (min, median, max)."""
        if isinstance(iterations, bool) or not isinstance(iterations, int) or \
                not 1 <= iterations <= lib.PYVT_ROUNDTRIP_MAX_ITERATIONS:
            raise ArgumentError(f"iterations must be 1-{lib.PYVT_ROUNDTRIP_MAX_ITERATIONS}, "
                                f"not {iterations!r}")
        trip = ffi.new("struct pyvt_roundtrip *", {"iterations": iterations})
        self._pyvt_ioctl("PYVT_MEASURE_ROUNDTRIP", lib.PYVT_MEASURE_ROUNDTRIP, trip)
        return {name: getattr(trip, name) for name, _ in ffi.typeof("struct pyvt_roundtrip").fields
                if name != "reserved"}

    def create_vm(self, machine_type: int = 0) -> "VmFd":
        """``KVM_CREATE_VM``."""
        fd = self._ioctl("KVM_CREATE_VM", lib.KVM_CREATE_VM,
                         _arg(_u64(machine_type, "machine_type")),
                         hint="the host may be out of memory or of VM slots")
        return VmFd(self, fd)


def _msrs_struct(indices: Sequence[int]):
    buf = ffi.new("char[]", ffi.sizeof("struct kvm_msrs")
                  + len(indices) * ffi.sizeof("struct kvm_msr_entry"))
    msrs = ffi.cast("struct kvm_msrs *", buf)
    msrs.nmsrs = len(indices)
    for i, index in enumerate(indices):
        msrs.entries[i].index = index
    return buf, msrs


def msrs_struct(values: Mapping[int, int]):
    """A ``struct kvm_msrs *`` (cffi) holding ``values`` ({index: value}),
    validated: what :meth:`VcpuFd.set_msrs` takes, for a caller that writes
    the same MSRs many times (a restore loop) and builds the block once."""
    if not isinstance(values, Mapping):
        raise ArgumentTypeError(f"KVM_SET_MSRS takes a mapping {{index: value}}, not {values!r}")
    items = [(_u32(i, "MSR index"), _u64(v, "MSR value")) for i, v in values.items()]
    msrs = _variable_struct("struct kvm_msrs", ffi.sizeof("struct kvm_msrs")
                            + len(items) * ffi.sizeof("struct kvm_msr_entry"))
    msrs.nmsrs = len(items)
    for n, (index, value) in enumerate(items):
        msrs.entries[n].index = index
        msrs.entries[n].data = value
    return msrs


def _get_msrs(fd: _Fd, indices: Iterable[int], name: str) -> Dict[int, int]:
    indices = [_u32(i, "MSR index") for i in _as_list(indices, "MSR indices", "ints")]
    _buf, msrs = _msrs_struct(indices)
    n = fd._ioctl(name, lib.KVM_GET_MSRS, msrs)
    return {msrs.entries[i].index: msrs.entries[i].data for i in range(n)}


def _fill(struct, state: bytes, ctype: str) -> None:
    """Copies ``state`` into a cffi struct, refusing a size from another build."""
    target = ffi.buffer(struct)
    if not isinstance(state, (bytes, bytearray)):
        raise ArgumentTypeError(f"{ctype} state must be a cffi {ctype} * or its bytes, "
                                f"not {type(state).__name__}")
    if len(state) != len(target):
        raise ArgumentError(f"{ctype} state must be {len(target)} bytes, not {len(state)}")
    target[:] = state


#: The whole length of the variable-size structs the getters return (an
#: XSAVE2 area, nested state, an MSR block), which ``ffi.buffer`` cannot
#: see past the fixed part of the C struct.
_LENGTHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _variable_struct(ctype: str, length: int):
    """A zeroed ``ctype *`` over ``length`` bytes (owned by the pointer),
    whose length :func:`struct_bytes` knows."""
    struct = ffi.from_buffer(ctype + " *", bytearray(length))
    _LENGTHS[struct] = length
    return struct


def struct_bytes(struct) -> bytes:
    """The bytes of a kernel struct a getter returned (a cffi pointer or the
    struct), all of them: an XSAVE2 area or nested state runs past the fixed
    part of its C struct.  Setters take these bytes back too."""
    if not isinstance(struct, ffi.CData):
        raise ArgumentTypeError(f"struct_bytes takes a cffi kernel struct, not {struct!r}")
    length = _LENGTHS.get(struct)
    return bytes(ffi.buffer(struct) if length is None else ffi.buffer(struct, length))


def _struct_arg(value, ctype: str, ioctl: str):
    """What a setter hands its ioctl: the ``ctype *`` its getter returned
    (or the struct itself), or that struct's bytes (as snapshots keep them)."""
    if isinstance(value, ffi.CData):
        return _struct_pointer(value, ctype, ioctl)
    struct = ffi.new(ctype + " *")
    _fill(struct, value, ctype)
    return struct


def _device_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"backend must be a device path, not {path!r}")
    return os.fspath(path)


def _as_list(values, what: str, of: str) -> list:
    """``values`` (any iterable) as a list; ArgumentTypeError for a non-iterable."""
    try:
        return list(values)
    except TypeError:
        raise ArgumentTypeError(f"{what} must be an iterable of {of}, not {values!r}") from None


def _struct_pointer(value, ctype: str, ioctl: str):
    """``value`` as the ``ctype *`` an ioctl takes: a cffi pointer to a
    ``ctype`` (what the matching get method returns), or the struct itself."""
    if isinstance(value, ffi.CData):
        kind = ffi.typeof(value)
        if kind is ffi.typeof(f"{ctype} *"):
            return value
        if kind is ffi.typeof(ctype):
            return ffi.addressof(value)
    getter = ioctl.replace("KVM_SET_", "get_").lower()
    raise ArgumentTypeError(f"{ioctl} takes a cffi {ctype} * (as {getter}() returns), "
                            f"not {value!r}")


def _uint(value, what: str, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{what} must be an integer in [0, 2**{bits}), not {value!r}")
    if not 0 <= value < 1 << bits:
        raise ArgumentError(f"{what} must be an integer in [0, 2**{bits}), not {value!r}")
    return value


def _u32(value, what: str) -> int:
    return _uint(value, what, 32)


def _u64(value, what: str) -> int:
    return _uint(value, what, 64)


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated: use {new}", DeprecationWarning, stacklevel=3)


def _require_cap(fd, cap: str, ioctl: str, hint: str = "") -> int:
    """``fd``'s answer for ``cap`` (a :class:`Kvm`, or a :class:`VmFd`, which
    answers for its VM's type); a KvmError naming it (ENOTTY, as the kernel
    would answer the ioctl) where the backend or the headers lack it."""
    have = fd.check_extension(cap) if cap in caps else 0
    if not have:
        path = fd.path if isinstance(fd, Kvm) else fd.kvm.path
        raise KvmError(ioctl, errno.ENOTTY, f"{path} lacks {cap}"
                       + (f"; {hint}" if hint else ""))
    return have


class VmFd(_Fd):
    """A VM file descriptor, made by :meth:`Kvm.create_vm`."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self._fd = fd
        #: Set once KVM_CREATE_IRQCHIP / KVM_CREATE_PIT2 succeeded.
        self.has_irqchip = False
        self.has_pit = False

    def __repr__(self) -> str:
        return f"<VmFd fd={self._fd} on {self.kvm.path}>"

    def check_extension(self, cap: Union[int, str]) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd (per-VM answers)."""
        return self._ioctl("KVM_CHECK_EXTENSION", lib.KVM_CHECK_EXTENSION,
                           _arg(_cap_number(cap)))

    def set_user_memory_region(self, slot: int, guest_phys_addr: int,
                               memory_size: int, userspace_addr: int,
                               flags: int = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION``.

        Safety: ``userspace_addr`` must stay mapped for ``memory_size`` bytes
        as long as the slot exists; the guest reads and writes it.
        """
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": _u32(slot, "slot"), "flags": _u32(flags, "flags"),
            "guest_phys_addr": _u64(guest_phys_addr, "guest_phys_addr"),
            "memory_size": _u64(memory_size, "memory_size"),
            "userspace_addr": _u64(userspace_addr, "userspace_addr"),
        })
        self._ioctl("KVM_SET_USER_MEMORY_REGION", lib.KVM_SET_USER_MEMORY_REGION, region)

    def create_vcpu(self, index: int) -> "VcpuFd":
        """``KVM_CREATE_VCPU``, then mmap of its ``struct kvm_run``."""
        fd = self._ioctl("KVM_CREATE_VCPU", lib.KVM_CREATE_VCPU,
                         _arg(_u32(index, "vCPU index")))
        vcpu = VcpuFd(self, fd, index)
        self._vcpu_created(vcpu)
        return vcpu

    def set_tss_addr(self, address: int) -> None:
        """``KVM_SET_TSS_ADDR``: three pages KVM may use for real mode on VMX."""
        self._ioctl("KVM_SET_TSS_ADDR", lib.KVM_SET_TSS_ADDR, _arg(_u32(address, "address")))

    def set_identity_map_addr(self, address: int) -> None:
        """``KVM_SET_IDENTITY_MAP_ADDR``."""
        addr = ffi.new("__u64 *", _u64(address, "address"))
        self._ioctl("KVM_SET_IDENTITY_MAP_ADDR", lib.KVM_SET_IDENTITY_MAP_ADDR, addr)

    def create_irqchip(self) -> None:
        """``KVM_CREATE_IRQCHIP``: in-kernel PIC, IOAPIC and LAPICs."""
        self._ioctl("KVM_CREATE_IRQCHIP", lib.KVM_CREATE_IRQCHIP)
        self.has_irqchip = True

    def create_pit2(self, flags: int = 0) -> None:
        """``KVM_CREATE_PIT2``: the in-kernel i8254 timer."""
        config = ffi.new("struct kvm_pit_config *", {"flags": _u32(flags, "flags")})
        self._ioctl("KVM_CREATE_PIT2", lib.KVM_CREATE_PIT2, config)
        self.has_pit = True

    def get_irqchip(self, chip_id: int):
        """``KVM_GET_IRQCHIP`` -> ``struct kvm_irqchip``: the state of one
        in-kernel interrupt controller (``KVM_IRQCHIP_PIC_MASTER``,
        ``_PIC_SLAVE``, ``_IOAPIC``); :func:`struct_bytes` gives its bytes."""
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": _u32(chip_id, "chip_id")})
        self._ioctl("KVM_GET_IRQCHIP", lib.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, state) -> None:
        """``KVM_SET_IRQCHIP`` from :meth:`get_irqchip`'s struct (or its bytes)."""
        self._ioctl("KVM_SET_IRQCHIP", lib.KVM_SET_IRQCHIP,
                    _struct_arg(state, "struct kvm_irqchip", "KVM_SET_IRQCHIP"))

    def get_pit2(self):
        """``KVM_GET_PIT2`` -> ``struct kvm_pit_state2``: the in-kernel PIT's state."""
        pit = ffi.new("struct kvm_pit_state2 *")
        self._ioctl("KVM_GET_PIT2", lib.KVM_GET_PIT2, pit)
        return pit

    def set_pit2(self, state) -> None:
        """``KVM_SET_PIT2`` from :meth:`get_pit2`'s struct (or its bytes)."""
        self._ioctl("KVM_SET_PIT2", lib.KVM_SET_PIT2,
                    _struct_arg(state, "struct kvm_pit_state2", "KVM_SET_PIT2"))

    def irq_line(self, irq: int, level: int) -> None:
        """``KVM_IRQ_LINE``: drive an interrupt line of the in-kernel irqchip."""
        line = ffi.new("struct kvm_irq_level *", {"irq": _u32(irq, "irq"),
                                                  "level": 1 if level else 0})
        self._ioctl("KVM_IRQ_LINE", lib.KVM_IRQ_LINE, line)

    def register_ioeventfd(self, fd: int, addr: int, length: int = 0, *, pio: bool = False,
                           datamatch: Optional[int] = None) -> None:
        """``KVM_IOEVENTFD`` (4.59): a guest write of ``length`` bytes (0: any)
        to ``addr`` (a port with ``pio``), of value ``datamatch`` if given,
        signals eventfd ``fd`` instead of exiting."""
        self._ioeventfd(fd, addr, length, pio, datamatch, 0)

    def unregister_ioeventfd(self, fd: int, addr: int, length: int = 0, *, pio: bool = False,
                             datamatch: Optional[int] = None) -> None:
        """``KVM_IOEVENTFD`` with ``KVM_IOEVENTFD_FLAG_DEASSIGN``: undoes the
        :meth:`register_ioeventfd` made with the same arguments."""
        self._ioeventfd(fd, addr, length, pio, datamatch, lib.KVM_IOEVENTFD_FLAG_DEASSIGN)

    def _ioeventfd(self, fd: int, addr: int, length: int, pio: bool,
                   datamatch: Optional[int], flags: int) -> None:
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        event = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": _u64(datamatch or 0, "datamatch"),
            "addr": _u64(addr, "addr"), "len": _u32(length, "length"),
            "fd": _uint(fd, "fd", 31), "flags": flags,
        })
        self._ioctl("KVM_IOEVENTFD", lib.KVM_IOEVENTFD, event)

    def ioeventfd(self, fd: int, addr: int, length: int = 0, *, pio: bool = False,
                  datamatch: Optional[int] = None, deassign: bool = False) -> None:
        """Deprecated: :meth:`register_ioeventfd`, or with ``deassign=True``
        :meth:`unregister_ioeventfd`."""
        _deprecated("VmFd.ioeventfd(..., deassign=)",
                    "register_ioeventfd() / unregister_ioeventfd()")
        register = self.unregister_ioeventfd if deassign else self.register_ioeventfd
        register(fd, addr, length, pio=pio, datamatch=datamatch)

    def register_irqfd(self, fd: int, gsi: int, *, resamplefd: Optional[int] = None) -> None:
        """``KVM_IRQFD`` (4.75): signalling eventfd ``fd`` raises interrupt ``gsi``.

        With ``resamplefd`` (KVM_IRQFD_FLAG_RESAMPLE, KVM_CAP_IRQFD_RESAMPLE)
        the line is level-triggered: it stays asserted until the guest EOIs
        the interrupt, which de-asserts it and signals eventfd ``resamplefd``
        (the device then re-raises ``fd`` if it still needs service)."""
        flags = 0 if resamplefd is None else lib.KVM_IRQFD_FLAG_RESAMPLE
        self._irqfd(fd, gsi, flags, 0 if resamplefd is None else _u32(resamplefd, "resamplefd"))

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        """``KVM_IRQFD`` with ``KVM_IRQFD_FLAG_DEASSIGN``: eventfd ``fd`` no
        longer raises ``gsi`` (its resampler, if any, goes with it)."""
        self._irqfd(fd, gsi, lib.KVM_IRQFD_FLAG_DEASSIGN, 0)

    def _irqfd(self, fd: int, gsi: int, flags: int, resamplefd: int) -> None:
        irqfd = ffi.new("struct kvm_irqfd *", {
            "fd": _u32(fd, "fd"), "gsi": _u32(gsi, "gsi"), "flags": flags,
            "resamplefd": resamplefd,
        })
        self._ioctl("KVM_IRQFD", lib.KVM_IRQFD, irqfd)

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False,
              resamplefd: Optional[int] = None) -> None:
        """Deprecated: :meth:`register_irqfd`, or with ``deassign=True``
        :meth:`unregister_irqfd`."""
        _deprecated("VmFd.irqfd(..., deassign=)", "register_irqfd() / unregister_irqfd()")
        if not deassign:
            self.register_irqfd(fd, gsi, resamplefd=resamplefd)
        elif resamplefd is not None:
            raise ArgumentError("KVM_IRQFD: deassign takes no resamplefd "
                                "(deassigning fd from gsi drops its resampler too)")
        else:
            self.unregister_irqfd(fd, gsi)

    def get_dirty_log(self, slot: int, pages: int) -> bytes:
        """``KVM_GET_DIRTY_LOG``: the slot's dirty bitmap (one bit per page)."""
        bitmap = ffi.new("uint64_t[]", max(1, (_u32(pages, "pages") + 63) // 64))
        log = ffi.new("struct kvm_dirty_log *", {"slot": _u32(slot, "slot"),
                                                 "dirty_bitmap": bitmap})
        self._ioctl("KVM_GET_DIRTY_LOG", lib.KVM_GET_DIRTY_LOG, log)
        return bytes(ffi.buffer(bitmap))

    def enable_cap(self, cap: Union[int, str], *args: int, flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on the VM."""
        self._ioctl("KVM_ENABLE_CAP", lib.KVM_ENABLE_CAP, _enable_cap_struct(cap, args, flags))

    def register_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        """``KVM_REGISTER_COALESCED_MMIO``: guest writes there are queued in a
        ring instead of exiting (``pio=True`` needs KVM_CAP_COALESCED_PIO)."""
        zone = ffi.new("struct kvm_coalesced_mmio_zone *", {
            "addr": _u64(addr, "addr"), "size": _u32(size, "size"), "pio": int(pio)})
        self._ioctl("KVM_REGISTER_COALESCED_MMIO", lib.KVM_REGISTER_COALESCED_MMIO, zone)

    def unregister_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        """``KVM_UNREGISTER_COALESCED_MMIO``."""
        zone = ffi.new("struct kvm_coalesced_mmio_zone *", {
            "addr": _u64(addr, "addr"), "size": _u32(size, "size"), "pio": int(pio)})
        self._ioctl("KVM_UNREGISTER_COALESCED_MMIO", lib.KVM_UNREGISTER_COALESCED_MMIO, zone)

    # -- interrupts, MSI and GSI routing, translation, clocks, nested state, sregs2 ---

    def get_clock(self):
        """``KVM_GET_CLOCK`` (4.29, KVM_CAP_ADJUST_CLOCK) -> ``struct kvm_clock_data``:
        the guests' kvmclock in ns (``clock``), with ``realtime`` and
        ``host_tsc`` where ``flags`` has KVM_CLOCK_REALTIME / KVM_CLOCK_HOST_TSC."""
        _require_cap(self.kvm, "KVM_CAP_ADJUST_CLOCK", "KVM_GET_CLOCK")
        data = ffi.new("struct kvm_clock_data *")
        self._ioctl("KVM_GET_CLOCK", lib.KVM_GET_CLOCK, data)
        return data

    def set_clock(self, clock: Union[int, object], flags: int = 0, realtime: int = 0) -> None:
        """``KVM_SET_CLOCK`` (4.30): sets the kvmclock to ``clock`` ns, or from a
        ``struct kvm_clock_data`` (as :meth:`get_clock` returns, whose flags
        and realtime are used).  With ``flags=KVM_CLOCK_REALTIME`` KVM adds the
        time elapsed since ``realtime`` (CLOCK_REALTIME ns)."""
        _require_cap(self.kvm, "KVM_CAP_ADJUST_CLOCK", "KVM_SET_CLOCK")
        if isinstance(clock, ffi.CData):
            data = _struct_pointer(clock, "struct kvm_clock_data", "KVM_SET_CLOCK")
        else:
            data = ffi.new("struct kvm_clock_data *", {
                "clock": _u64(clock, "clock"), "flags": _u32(flags, "flags"),
                "realtime": _u64(realtime, "realtime")})
        self._ioctl("KVM_SET_CLOCK", lib.KVM_SET_CLOCK, data)

    def signal_msi(self, address: int, data: int, flags: int = 0, devid: int = 0) -> int:
        """``KVM_SIGNAL_MSI`` (4.71, KVM_CAP_SIGNAL_MSI): delivers one MSI
        message to the in-kernel LAPICs.  Returns how many LAPICs took it
        (0: the guest blocked it, e.g. a software-disabled LAPIC)."""
        _require_cap(self.kvm, "KVM_CAP_SIGNAL_MSI", "KVM_SIGNAL_MSI")
        address = _u64(address, "MSI address")
        msi = ffi.new("struct kvm_msi *", {
            "address_lo": address & 0xFFFFFFFF, "address_hi": address >> 32,
            "data": _u32(data, "MSI data"), "flags": _u32(flags, "flags"),
            "devid": _u32(devid, "devid")})
        return self._ioctl("KVM_SIGNAL_MSI", lib.KVM_SIGNAL_MSI, msi,
                           hint="no LAPIC took it: the VM needs the in-kernel irqchip "
                                "(KVM_CREATE_IRQCHIP) and a vCPU whose APIC ID the "
                                "address names")

    def set_gsi_routing(self, entries) -> None:
        """``KVM_SET_GSI_ROUTING`` (4.52, KVM_CAP_IRQ_ROUTING): replaces the whole
        GSI routing table (the irqchip's default routes too: see
        :func:`pyvt.gsi_routes.irqchip_routes`).  ``entries`` is an iterable of
        :class:`pyvt.gsi_routes.IrqchipRoute`, :class:`pyvt.gsi_routes.MsiRoute`
        or cffi ``struct kvm_irq_routing_entry``; or a whole cffi
        ``struct kvm_irq_routing *``.  Needs the in-kernel irqchip."""
        from .gsi_routes import routing_table

        max_gsi = _require_cap(self.kvm, "KVM_CAP_IRQ_ROUTING", "KVM_SET_GSI_ROUTING")
        if isinstance(entries, ffi.CData) and ffi.typeof(entries) is ffi.typeof(
                "struct kvm_irq_routing *"):
            table = entries
        else:
            table = routing_table(entries, max_gsi)
        self._ioctl("KVM_SET_GSI_ROUTING", lib.KVM_SET_GSI_ROUTING, table,
                    hint="routes need the in-kernel irqchip (KVM_CREATE_IRQCHIP), "
                         "valid irqchip pins and GSIs below KVM_CAP_IRQ_ROUTING")

    # -- memory slots v2, guest_memfd, devices, memory encryption --------------

    def set_user_memory_region2(self, slot: int, guest_phys_addr: int, memory_size: int,
                                userspace_addr: int, flags: int = 0, *,
                                guest_memfd: int = 0, guest_memfd_offset: int = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION2`` (api.rst 4.140, Linux 6.8; needs
        KVM_CAP_USER_MEMORY2): :meth:`set_user_memory_region` plus a
        guest_memfd range, used where ``flags`` has ``KVM_MEM_GUEST_MEMFD``.

        Safety: as for :meth:`set_user_memory_region`, ``userspace_addr``
        must stay mapped for ``memory_size`` bytes as long as the slot exists.
        """
        region = ffi.new("struct kvm_userspace_memory_region2 *", {
            "slot": _u32(slot, "slot"), "flags": _u32(flags, "flags"),
            "guest_phys_addr": _u64(guest_phys_addr, "guest_phys_addr"),
            "memory_size": _u64(memory_size, "memory_size"),
            "userspace_addr": _u64(userspace_addr, "userspace_addr"),
            "guest_memfd_offset": _u64(guest_memfd_offset, "guest_memfd_offset"),
            "guest_memfd": _u32(guest_memfd, "guest_memfd"),
        })
        _require_cap(self, "KVM_CAP_USER_MEMORY2", "KVM_SET_USER_MEMORY_REGION2")
        hint = ""
        if flags & lib.KVM_MEM_GUEST_MEMFD:
            hint = ("a KVM_MEM_GUEST_MEMFD slot needs guest_memfd from this VM's "
                    "create_guest_memfd(), a page-aligned range inside it not bound to "
                    "another slot, and a VM type that takes guest_memfd (KVM_CAP_GUEST_MEMFD)")
        self._ioctl("KVM_SET_USER_MEMORY_REGION2", lib.KVM_SET_USER_MEMORY_REGION2, region,
                    hint=hint)

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """``KVM_CREATE_GUEST_MEMFD`` (api.rst 4.142, Linux 6.8; needs
        KVM_CAP_GUEST_MEMFD): a new guest_memfd file of ``size`` bytes (a
        multiple of the page size) for this VM's private memory.  ``flags``
        are ``GUEST_MEMFD_FLAG_*`` (those KVM_CAP_GUEST_MEMFD_FLAGS lists;
        ``GUEST_MEMFD_FLAG_MMAP`` lets the host mmap it, Linux 6.18).

        Returns the file descriptor; the caller owns it (``os.close``).
        """
        size = _u64(size, "size")
        flags = _u64(flags, "flags")
        if size == 0 or size % PAGE_SIZE:
            raise ArgumentError(f"a guest_memfd's size must be a positive multiple of "
                                f"{PAGE_SIZE} bytes, not {size}")
        _require_cap(self, "KVM_CAP_GUEST_MEMFD", "KVM_CREATE_GUEST_MEMFD")
        if flags:
            supported = self.check_extension("KVM_CAP_GUEST_MEMFD_FLAGS")
            if flags & ~supported:
                raise KvmError("KVM_CREATE_GUEST_MEMFD", errno.EINVAL,
                               f"flags {flags:#x}: this VM's KVM_CAP_GUEST_MEMFD_FLAGS offers "
                               f"only {supported:#x}")
        create = ffi.new("struct kvm_create_guest_memfd *", {"size": size, "flags": flags})
        return self._ioctl("KVM_CREATE_GUEST_MEMFD", lib.KVM_CREATE_GUEST_MEMFD, create)

    def set_memory_attributes(self, address: int, size: int, attributes: int,
                              flags: int = 0) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES`` (api.rst 4.141, Linux 6.8; needs
        KVM_CAP_MEMORY_ATTRIBUTES): sets ``attributes`` (``KVM_MEMORY_ATTRIBUTE_*``,
        e.g. PRIVATE) on the guest-physical pages ``[address, address + size)``.
        ``flags`` must be 0."""
        attrs = ffi.new("struct kvm_memory_attributes *", {
            "address": _u64(address, "address"), "size": _u64(size, "size"),
            "attributes": _u64(attributes, "attributes"), "flags": _u64(flags, "flags"),
        })
        if size == 0 or size % PAGE_SIZE or address % PAGE_SIZE:
            raise ArgumentError(f"memory attributes cover whole pages: address {address:#x} "
                                f"and size {size:#x} must be multiples of {PAGE_SIZE:#x}, "
                                f"the size not 0")
        supported = _require_cap(self, "KVM_CAP_MEMORY_ATTRIBUTES", "KVM_SET_MEMORY_ATTRIBUTES")
        if attributes & ~supported:
            raise KvmError("KVM_SET_MEMORY_ATTRIBUTES", errno.EINVAL,
                           f"attributes {attributes:#x}: this VM's KVM_CAP_MEMORY_ATTRIBUTES "
                           f"offers only {supported:#x}")
        self._ioctl("KVM_SET_MEMORY_ATTRIBUTES", lib.KVM_SET_MEMORY_ATTRIBUTES, attrs)

    def _memory_encrypt(self, name: str, request: int, arg) -> int:
        try:
            return self._ioctl(name, request, arg)
        except KvmError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL) and not _memory_encryption_host():
                raise KvmError(name, e.errno,
                               f"{name} is for hosts with memory encryption (AMD SEV/SEV-ES/"
                               f"SEV-SNP with kvm_amd sev=1, or Intel TDX): {self.kvm.path} "
                               f"has none") from None
            raise

    def memory_encrypt_op(self, command):
        """``KVM_MEMORY_ENCRYPT_OP`` (api.rst 4.110; SEV or TDX hosts only): runs
        a vendor command, ``command`` being a cffi pointer to its struct
        (``struct kvm_sev_cmd *`` on SEV) or a writable buffer holding it.
        Returns ``command``, which the kernel may have written to (e.g. ``error``)."""
        if isinstance(command, ffi.CData) and ffi.typeof(command).kind == "pointer":
            arg, size = command, ffi.sizeof(ffi.typeof(command).item)
        else:
            try:
                arg = ffi.from_buffer(command, require_writable=True)
            except (TypeError, BufferError):
                raise ArgumentTypeError(
                    f"KVM_MEMORY_ENCRYPT_OP takes a cffi pointer to the command struct "
                    f"(struct kvm_sev_cmd * on SEV) or a writable buffer, not {command!r}") from None
            size = len(arg)
        # The kernel reads and writes a whole command (SEV's and TDX's are both
        # this size): a smaller one would let it run past the end.
        if size < ffi.sizeof("struct kvm_sev_cmd"):
            raise ArgumentError(f"a KVM_MEMORY_ENCRYPT_OP command is at least "
                                f"{ffi.sizeof('struct kvm_sev_cmd')} bytes, not {size}")
        self._memory_encrypt("KVM_MEMORY_ENCRYPT_OP", lib.KVM_MEMORY_ENCRYPT_OP, arg)
        return command

    def _enc_region(self, addr: int, size: int):
        if _u64(size, "size") == 0:
            raise ArgumentError("an encrypted region's size must not be 0")
        return ffi.new("struct kvm_enc_region *", {"addr": _u64(addr, "addr"), "size": size})

    def memory_encrypt_reg_region(self, addr: int, size: int) -> None:
        """``KVM_MEMORY_ENCRYPT_REG_REGION`` (api.rst 4.111; SEV hosts only): pins
        the host memory ``[addr, addr + size)`` that holds encrypted guest memory."""
        self._memory_encrypt("KVM_MEMORY_ENCRYPT_REG_REGION",
                             lib.KVM_MEMORY_ENCRYPT_REG_REGION, self._enc_region(addr, size))

    def memory_encrypt_unreg_region(self, addr: int, size: int) -> None:
        """``KVM_MEMORY_ENCRYPT_UNREG_REGION`` (api.rst 4.112; SEV hosts only):
        undoes :meth:`memory_encrypt_reg_region` for the same range."""
        self._memory_encrypt("KVM_MEMORY_ENCRYPT_UNREG_REGION",
                             lib.KVM_MEMORY_ENCRYPT_UNREG_REGION, self._enc_region(addr, size))

    def create_device(self, device_type: int, test: bool = False) -> "Optional[DeviceFd]":
        """``KVM_CREATE_DEVICE`` (api.rst 4.79; needs KVM_CAP_DEVICE_CTRL): a new
        in-kernel device of ``device_type`` (``KVM_DEV_TYPE_*``) as a
        :class:`DeviceFd`.  ``test=True`` sets ``KVM_CREATE_DEVICE_TEST``: it
        only checks that the host can make that type (raising if not) and
        returns None."""
        return _create_device(self, device_type, test)

    def set_device_attr(self, group: int, attr: int, data=None, *, flags: int = 0) -> None:
        """``KVM_SET_DEVICE_ATTR`` on the VM (api.rst 4.80; needs
        KVM_CAP_VM_ATTRIBUTES): writes ``data`` (bytes-like, or None)."""
        _require_cap(self, "KVM_CAP_VM_ATTRIBUTES", "KVM_SET_DEVICE_ATTR")
        _set_device_attr(self, group, attr, data, flags=flags, where="this VM")

    def get_device_attr(self, group: int, attr: int, size: int = 8, *, flags: int = 0) -> bytes:
        """``KVM_GET_DEVICE_ATTR`` on the VM (api.rst 4.80; needs
        KVM_CAP_VM_ATTRIBUTES): the attribute's ``size`` bytes."""
        _require_cap(self, "KVM_CAP_VM_ATTRIBUTES", "KVM_GET_DEVICE_ATTR")
        return _get_device_attr(self, group, attr, size, flags=flags, where="this VM")

    def has_device_attr(self, group: int, attr: int, *, flags: int = 0) -> bool:
        """``KVM_HAS_DEVICE_ATTR`` on the VM (api.rst 4.81; needs
        KVM_CAP_VM_ATTRIBUTES): whether the VM has that attribute."""
        _require_cap(self, "KVM_CAP_VM_ATTRIBUTES", "KVM_HAS_DEVICE_ATTR")
        return _has_device_attr(self, group, attr, flags=flags, where="this VM")

    # -- the dirty ring --------------------------------------------------------

    #: The dirty ring's size in bytes once enable_dirty_log_ring() succeeded, else 0.
    dirty_ring_size = 0

    def enable_dirty_log_ring(self, size: int) -> str:
        """``KVM_ENABLE_CAP`` of ``KVM_CAP_DIRTY_LOG_RING_ACQ_REL`` (or of
        ``KVM_CAP_DIRTY_LOG_RING`` where the kernel lacks it) with a ring of
        ``size`` bytes per vCPU (``size // 16`` struct kvm_dirty_gfn): see
        "8.29 KVM_CAP_DIRTY_LOG_RING/KVM_CAP_DIRTY_LOG_RING_ACQ_REL".

        Only before the VM has any vCPU; ``size`` is a power of two from
        the page size up to what ``KVM_CHECK_EXTENSION`` answers for the
        capability (the largest ring in bytes).  From then on KVM logs
        guest writes to slots with ``KVM_MEM_LOG_DIRTY_PAGES`` in the vCPUs'
        rings (:meth:`VcpuFd.dirty_ring`), never in a bitmap:
        ``KVM_GET_DIRTY_LOG`` fails.  Returns the capability's name.
        """
        if isinstance(size, bool) or not isinstance(size, int):
            raise ArgumentTypeError(f"the dirty ring size must be an int (bytes), not {size!r}")
        if self.dirty_ring_size:
            raise ArgumentError(f"this VM has a dirty ring already ({self.dirty_ring_size} "
                                "bytes); KVM sets it once")
        if self._vcpu_fds:
            raise ArgumentError("the dirty ring must be enabled before the VM's first vCPU "
                                f"is created; this VM has {len(self._vcpu_fds)}: enable it "
                                "right after create_vm() (pyvt.Vm(dirty_ring=...))")
        name = next((cap for cap in ("KVM_CAP_DIRTY_LOG_RING_ACQ_REL", "KVM_CAP_DIRTY_LOG_RING")
                     if cap in caps and self.check_extension(cap)), None)
        if name is None:
            raise KvmError("KVM_ENABLE_CAP", errno.EOPNOTSUPP,
                           f"{self.kvm.path} has no dirty ring (KVM_CAP_DIRTY_LOG_RING); "
                           "use the dirty bitmap (KVM_GET_DIRTY_LOG)")
        largest = self.check_extension(name)
        if size < PAGE_SIZE or size > largest or size & (size - 1):
            raise ArgumentError(f"the dirty ring size must be a power of two from {PAGE_SIZE} "
                                f"to {largest} bytes ({name}), not {size}")
        try:
            self.enable_cap(name, size)
        except KvmError as e:
            raise KvmError("KVM_ENABLE_CAP", e.errno,
                           f"{name} with {size} bytes refused (KVM refuses a vCPU made "
                           "before it, and a ring too small for its reserved entries)") from None
        self.dirty_ring_size = size
        return name

    def reset_dirty_rings(self) -> int:
        """``KVM_RESET_DIRTY_RINGS`` (see 8.29): KVM re-protects the pages of
        every harvested ring entry and frees the entries.  Returns how many."""
        return self._ioctl("KVM_RESET_DIRTY_RINGS", lib.KVM_RESET_DIRTY_RINGS,
                           hint="the VM needs KVM_CAP_DIRTY_LOG_RING (enable_dirty_log_ring)")

    @property
    def _vcpu_fds(self) -> List["VcpuFd"]:
        """The open vCPU fds this VmFd created (in creation order)."""
        fds = self.__dict__.setdefault("_vcpu_refs", [])
        alive = [v for v in (ref() for ref in fds) if v is not None and not v.closed]
        fds[:] = [weakref.ref(v) for v in alive]
        return alive

    def _vcpu_created(self, vcpu: "VcpuFd") -> None:
        """Keeps ``vcpu`` (weakly) and maps its dirty ring if the VM has one:
        harvesting must see every vCPU's ring."""
        self.__dict__.setdefault("_vcpu_refs", []).append(weakref.ref(vcpu))
        if self.dirty_ring_size:
            try:
                ring = vcpu.dirty_ring()
            except BaseException:
                vcpu.close()
                raise
            self.__dict__.setdefault("_rings", []).append(ring)

    def dirty_rings(self) -> List["DirtyRing"]:
        """The dirty rings of this VM's open vCPUs (empty without a ring)."""
        rings = self.__dict__.get("_rings", [])
        if any(ring.closed for ring in rings):
            rings[:] = [ring for ring in rings if not ring.closed]
        return list(rings)

    # -- binary statistics -----------------------------------------------------

    def get_stats_fd(self) -> "StatsFd":
        """``KVM_GET_STATS_FD`` on the VM (api.rst "4.133 KVM_GET_STATS_FD",
        needs KVM_CAP_BINARY_STATS_FD): a new :class:`pyvt.kvm_stats.StatsFd`
        of the VM's statistics, with its header and descriptors decoded.
        The caller owns it: close it (or use ``with``) when done."""
        return _open_stats_fd(self, self.kvm, "VM")

    # -- MSR filters and user-space MSR exits ----------------------------------

    def x86_set_msr_filter(self, ranges=(), *, default_deny: bool = False) -> None:
        """``KVM_X86_SET_MSR_FILTER`` (needs KVM_CAP_X86_MSR_FILTER): which
        guest ``rdmsr``/``wrmsr`` KVM allows.  See the KVM API documentation,
        "4.97 KVM_X86_SET_MSR_FILTER".

        ``ranges`` holds up to ``KVM_MSR_FILTER_MAX_RANGES`` (16) tuples
        ``(base, nmsrs, flags, allowed)``: the range covers MSRs ``base`` to
        ``base + nmsrs - 1`` (``nmsrs`` at most ``8 *
        KVM_MSR_FILTER_MAX_BITMAP_SIZE``) for the accesses in ``flags``
        (``KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE``); ``allowed`` is the
        bitmap, bytes whose bit ``i`` allows MSR ``base + i`` (at least
        ``(nmsrs + 7) // 8`` of them), or an iterable of the MSR indices
        allowed (the others in the range are denied).  An access no range
        covers gets the default: allowed, or denied with ``default_deny``.
        No ranges and no ``default_deny`` removes the filter.

        A denied access raises #GP in the guest, or exits to user space as
        :class:`pyvt.exits.Msr` once ``enable_cap("KVM_CAP_X86_USER_SPACE_MSR",
        KVM_MSR_EXIT_REASON_FILTER)`` asked for that ("7.21
        KVM_CAP_X86_USER_SPACE_MSR").  ``ranges`` may also be a cffi
        ``struct kvm_msr_filter`` (or pointer), passed as it is.
        """
        if isinstance(ranges, ffi.CData):
            if default_deny:
                raise ArgumentError("default_deny goes in the flags of the struct kvm_msr_filter "
                                    "passed, not as an argument")
            msr_filter, keep = _struct_pointer(ranges, "struct kvm_msr_filter",
                                               "KVM_X86_SET_MSR_FILTER"), ()
        else:
            msr_filter, keep = self._msr_filter_struct(ranges, default_deny)
        try:
            self._ioctl("KVM_X86_SET_MSR_FILTER", lib.KVM_X86_SET_MSR_FILTER, msr_filter)
        except KvmError as e:
            if self.check_extension("KVM_CAP_X86_MSR_FILTER"):
                raise
            raise KvmError("KVM_X86_SET_MSR_FILTER", e.errno,
                           "this KVM lacks KVM_CAP_X86_MSR_FILTER") from None
        del keep  # the bitmaps: KVM has copied them

    @staticmethod
    def _msr_filter_struct(ranges, default_deny: bool):
        """(struct kvm_msr_filter *, its bitmaps) from x86_set_msr_filter's
        plain ranges, validated."""
        ranges = _as_list(ranges, "MSR filter ranges", "(base, nmsrs, flags, allowed) tuples")
        limit = lib.KVM_MSR_FILTER_MAX_RANGES
        if len(ranges) > limit:
            raise ArgumentError(f"an MSR filter holds at most {limit} ranges, not {len(ranges)}")
        msr_filter = ffi.new("struct kvm_msr_filter *", {
            "flags": lib.KVM_MSR_FILTER_DEFAULT_DENY if default_deny
            else lib.KVM_MSR_FILTER_DEFAULT_ALLOW})
        bitmaps = []
        valid_flags = lib.KVM_MSR_FILTER_READ | lib.KVM_MSR_FILTER_WRITE
        from .msr_filter import RANGE_MSRS as max_msrs
        for n, spec in enumerate(ranges):
            if not isinstance(spec, tuple) or len(spec) != 4:
                raise ArgumentTypeError(f"MSR filter range {n} must be a tuple (base, nmsrs, flags, "
                                        f"allowed), not {spec!r}")
            base, nmsrs, flags, allowed = spec
            base = _u32(base, "MSR filter range base")
            if isinstance(nmsrs, bool) or not isinstance(nmsrs, int) or not 1 <= nmsrs <= max_msrs:
                raise ArgumentError(f"MSR filter range {base:#x}: nmsrs must be 1-{max_msrs} "
                                    f"(KVM_MSR_FILTER_MAX_BITMAP_SIZE bytes of bitmap), not {nmsrs!r}")
            if base + nmsrs > 1 << 32:
                raise ArgumentError(f"MSR filter range {base:#x}+{nmsrs:#x} runs past MSR 0xffffffff")
            flags = _u32(flags, "MSR filter range flags")
            if not flags or flags & ~valid_flags:
                raise ArgumentError(f"MSR filter range {base:#x}: flags must be KVM_MSR_FILTER_READ, "
                                    f"KVM_MSR_FILTER_WRITE or both, not {flags:#x}")
            # KVM copies whole longs of bitmap: allocate that much, zeroed.
            bitmap = ffi.new("__u8[]", (nmsrs + 63) // 64 * 8)
            VmFd._fill_msr_bitmap(bitmap, base, nmsrs, allowed)
            bitmaps.append(bitmap)
            msr_filter.ranges[n] = {"flags": flags, "nmsrs": nmsrs, "base": base, "bitmap": bitmap}
        return msr_filter, bitmaps

    @staticmethod
    def _fill_msr_bitmap(bitmap, base: int, nmsrs: int, allowed) -> None:
        """Sets the bits of ``allowed`` (bytes, or MSR indices) in ``bitmap``."""
        need = (nmsrs + 7) // 8
        if isinstance(allowed, (bytes, bytearray, memoryview)):
            raw = bytes(allowed)
            if len(raw) < need:
                raise ArgumentError(f"MSR filter range {base:#x}: {nmsrs} MSRs need a bitmap of "
                                    f"{need} bytes, not {len(raw)}")
            ffi.buffer(bitmap, need)[:] = raw[:need]
            return
        for index in _as_list(allowed, f"MSR filter range {base:#x}'s allowed MSRs",
                              "MSR indices (or a bytes bitmap)"):
            if isinstance(index, bool) or not isinstance(index, int) \
                    or not base <= index < base + nmsrs:
                raise ArgumentError(f"MSR filter range {base:#x}+{nmsrs:#x}: allowed MSR {index!r} "
                                    "is outside the range")
            bit = index - base
            bitmap[bit // 8] |= 1 << (bit % 8)


class VcpuFd(_Fd):
    """A vCPU file descriptor with its mmap'd ``struct kvm_run`` (``.run``)."""

    _mmap: Optional[mmap.mmap] = None

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


def _memory_encryption_host() -> bool:
    """Whether this host's KVM was set up for encrypted guests (kvm_amd's sev
    or kvm_intel's tdx parameter on)."""
    for parameter in ("/sys/module/kvm_amd/parameters/sev",
                      "/sys/module/kvm_intel/parameters/tdx"):
        try:
            with open(parameter) as f:
                if f.read().strip() in ("Y", "1"):
                    return True
        except OSError:
            pass
    return False


# In-kernel devices build on _Fd above, so they are imported last (issue 12, section B).
from .kvm_device import DeviceFd  # noqa: E402
from .kvm_device import create_device as _create_device  # noqa: E402
from .kvm_device import get_device_attr as _get_device_attr  # noqa: E402
from .kvm_device import has_device_attr as _has_device_attr  # noqa: E402
from .kvm_device import set_device_attr as _set_device_attr  # noqa: E402
# The binary statistics reader builds on _Fd too (issue 12, section D).
from .kvm_stats import StatsFd  # noqa: E402
from .kvm_stats import open_stats_fd as _open_stats_fd  # noqa: E402
