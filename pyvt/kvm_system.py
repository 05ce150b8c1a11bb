"""The system file descriptor of the thin layer: :class:`Kvm` (re-exported by
:mod:`pyvt.kvm`)."""

from __future__ import annotations

import errno
import os
import threading
from typing import Dict, Iterable, List, Optional, Union

from ._kvm import ffi, lib
from .errors import (
    ApiVersionMismatch,
    ArgumentError,
    BackendError,
    BackendNotFound,
    BackendPermissionError,
    KvmError,
    check,
)
from .kvm_base import (KVM_API_VERSION, DEFAULT_DEVICE, CpuidEntry, _Fd, _arg, _cap_number, _device_path, _get_msrs, _read_cpuid, _require_cap, _u64, cpuid_table)
from .kvm_vm import VmFd


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

