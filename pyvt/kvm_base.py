"""The thin layer's shared part: the fd base class, capability names,
CPUID tables, MSR blocks, kernel-struct arguments and argument checks
(re-exported by :mod:`pyvt.kvm`)."""

from __future__ import annotations

import errno
import mmap
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Sequence, Union

from ._kvm import ffi, lib
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    ClosedError,
    KvmError,
    check,
)

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
        path = getattr(fd, "kvm", fd).path  # a VmFd answers for its Kvm
        raise KvmError(ioctl, errno.ENOTTY, f"{path} lacks {cap}"
                       + (f"; {hint}" if hint else ""))
    return have

