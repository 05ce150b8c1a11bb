"""Read the raw facts ``pyvt caps`` reports on, from this machine.

Every reader returns plain data plus an error string instead of raising, so
a missing device, a missing module or a permission problem becomes a
labelled gap in the report, never a traceback.
"""

from __future__ import annotations

import errno as errno_mod
import functools
import json
import os
import platform
import re
import struct
import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from .._kvm import lib as uapi
from . import svm as svm_mod
from . import vmx as vmx_mod
from .feature_control import IA32_FEATURE_CONTROL
from .report import KvmRaw, RawCaps

KVM_MODULES = ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm")
KVM_HEADER = "/usr/include/linux/kvm.h"

#: MSRs read through /dev/cpu/N/msr (only those the CPU's vendor defines).
INTEL_MSRS = (IA32_FEATURE_CONTROL, *sorted(vmx_mod.MSR_NAMES))
AMD_MSRS = (svm_mod.MSR_VM_CR, svm_mod.MSR_EFER)


# --- host CPUID ---------------------------------------------------------------

def _cpuid_reader() -> tuple[Callable[[int, int], tuple] | None, str, str | None]:
    try:
        from pyvt import kvm as pyvt_kvm  # type: ignore[attr-defined]
        host_cpuid = pyvt_kvm.host_cpuid
        return (lambda leaf, sub: tuple(host_cpuid(leaf, sub))), "CPUID instruction (pyvt.kvm.host_cpuid)", None
    except Exception as exc:  # the compiled extension may be missing: fall back
        first_error = f"pyvt.kvm.host_cpuid unavailable ({exc.__class__.__name__}: {exc})"
    path = "/dev/cpu/0/cpuid"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return None, path, f"{first_error}; {path}: {exc.strerror}"

    def read(leaf: int, sub: int) -> tuple:
        return struct.unpack("<4I", os.pread(fd, 16, (sub << 32) | leaf))

    return read, path, None


def read_host_cpuid() -> tuple[dict | None, str | None, str | None]:
    """Dump the CPUID leaves the report decodes: ``(dump, source, error)``."""
    read, source, error = _cpuid_reader()
    if read is None:
        return None, None, error
    dump: dict[tuple[int, int], tuple] = {}
    try:
        leaf0 = read(0, 0)
        dump[(0, 0)] = leaf0
        for leaf in range(1, min(leaf0[0], 0x20) + 1):
            dump[(leaf, 0)] = read(leaf, 0)
        if leaf0[0] >= 7:
            for sub in range(1, min(dump[(7, 0)][0], 4) + 1):
                dump[(7, sub)] = read(7, sub)
        ext0 = read(0x80000000, 0)
        dump[(0x80000000, 0)] = ext0
        if 0x80000000 < ext0[0] < 0x80000100:
            for leaf in range(0x80000001, ext0[0] + 1):
                dump[(leaf, 0)] = read(leaf, 0)
        if (1, 0) in dump and dump[(1, 0)][2] >> 31 & 1:
            hv0 = read(0x40000000, 0)
            dump[(0x40000000, 0)] = hv0
            for leaf in range(0x40000001, min(hv0[0], 0x40000010) + 1):
                dump[(leaf, 0)] = read(leaf, 0)
    except OSError as exc:
        return (dump or None), source, f"{source}: {exc.strerror}"
    return dump, source, None


# --- MSRs ----------------------------------------------------------------------

def read_msr_device(indices: Iterable[int], cpu: int = 0) -> tuple[dict[int, int] | None, str | None]:
    """Read MSRs through /dev/cpu/N/msr; an MSR that faults is left out."""
    path = f"/dev/cpu/{cpu}/msr"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        hint = " (modprobe msr; needs root)" if exc.errno in (errno_mod.ENOENT, errno_mod.EACCES, errno_mod.EPERM) else ""
        return None, f"{path}: {exc.strerror}{hint}"
    values: dict[int, int] = {}
    try:
        for index in indices:
            try:
                values[index] = struct.unpack("<Q", os.pread(fd, 8, index))[0]
            except OSError:
                continue  # #GP on RDMSR: the MSR does not exist on this CPU
    finally:
        os.close(fd)
    return (values or None), (None if values else f"{path}: no MSR could be read")


# --- modules -------------------------------------------------------------------

def read_modules(root: str = "/sys/module") -> dict[str, dict[str, str]]:
    """Parameters of the loaded KVM modules: ``{module: {param: value}}``."""
    out: dict[str, dict[str, str]] = {}
    for module in KVM_MODULES:
        base = os.path.join(root, module)
        if not os.path.isdir(base):
            continue
        params: dict[str, str] = {}
        pdir = os.path.join(base, "parameters")
        if os.path.isdir(pdir):
            for name in sorted(os.listdir(pdir)):
                try:
                    with open(os.path.join(pdir, name)) as f:
                        params[name] = f.read().strip()
                except OSError as exc:
                    params[name] = f"<unreadable: {exc.strerror}>"
        out[module] = params
    return out


# --- KVM -------------------------------------------------------------------------

def header_capabilities(path: str = KVM_HEADER) -> dict[str, int]:
    """Every ``KVM_CAP_*`` the installed <linux/kvm.h> defines, and the newer
    ones pyvt uses (``NEWER_CAPABILITIES``, as in the built ``pyvt.kvm.caps``)."""
    caps: dict[str, int] = {}
    try:
        with open(path) as f:
            for m in re.finditer(r"^#define\s+(KVM_CAP_\w+)\s+(\d+)\b", f.read(), re.MULTILINE):
                caps[m.group(1)] = int(m.group(2))
    except OSError:
        pass
    try:
        from pyvt._kvm_build import NEWER_CAPABILITIES
    except Exception:  # no cffi or no header: the header's list is all there is
        NEWER_CAPABILITIES = []
    for name, number, _version in NEWER_CAPABILITIES:
        caps.setdefault(name, number)
    return caps


def _status_for(exc: BaseException) -> tuple[str, int | None]:
    code = getattr(exc, "errno", None)
    if isinstance(exc, FileNotFoundError) or code == errno_mod.ENOENT:
        return "missing", code
    if isinstance(exc, PermissionError) or code in (errno_mod.EACCES, errno_mod.EPERM):
        return "permission_denied", code
    return "error", code


class _FcntlKvm:
    """Minimal stand-in for ``pyvt.kvm.Kvm`` when the extension is not built.

    Only the three argument-less system ioctls: ``_IO(KVMIO, n)`` carries no
    size or direction bits, so its number is ``(0xAE << 8) | n``.
    """

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def _io(self, nr: int, arg: int = 0) -> int:
        import fcntl
        return fcntl.ioctl(self.fd, (0xAE << 8) | nr, arg)

    def api_version(self) -> int:
        return self._io(0x00)

    def check_extension(self, cap: int) -> int:
        return self._io(0x03, cap)

    def vcpu_mmap_size(self) -> int:
        return self._io(0x04)

    def close(self) -> None:
        os.close(self.fd)


def _call(k: KvmRaw, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:
        k.errors[what] = f"{exc.__class__.__name__}: {exc}"
        return None


def query_kvm(device: str) -> tuple[KvmRaw, dict[int, int] | None, str | None]:
    """Ask the device everything the report needs.

    Returns the KVM facts, the feature MSRs (``KVM_GET_MSRS`` on the system
    fd) and why those could not be read.
    """
    k = KvmRaw(device=device, status="error")
    try:
        from pyvt import kvm as pyvt_kvm  # type: ignore[attr-defined]
        opener: Callable[[str], Any] = pyvt_kvm.Kvm
        cap_numbers = dict(getattr(pyvt_kvm, "caps", {})) or header_capabilities()
        k.interface = "pyvt.kvm.Kvm"
    except Exception as exc:
        opener = _FcntlKvm
        cap_numbers = header_capabilities()
        k.interface = f"fcntl fallback (pyvt.kvm not importable: {exc.__class__.__name__})"
    try:
        if not os.path.exists(device):
            raise FileNotFoundError(errno_mod.ENOENT, os.strerror(errno_mod.ENOENT), device)
        handle = opener(device)
    except Exception as exc:
        k.status, k.errno = _status_for(exc)
        k.error = f"{device}: {getattr(exc, 'strerror', None) or exc}"
        return k, None, "KVM device unavailable"
    try:
        k.api_version = _call(k, "api_version", handle.api_version)
        k.status = "ok" if k.api_version is not None else "error"
        if k.api_version is None:
            k.error = k.errors.get("api_version")
        for name, number in sorted(cap_numbers.items(), key=lambda kv: kv[1]):
            value = _call(k, name, functools.partial(handle.check_extension, number))
            k.capabilities[name] = int(value) if value is not None and value >= 0 else 0
        k.vcpu_mmap_size = _call(k, "vcpu_mmap_size", handle.vcpu_mmap_size)
        feature_msrs: dict[int, int] | None = None
        feature_error: str | None = "not supported by the interface in use"
        if hasattr(handle, "get_supported_cpuid"):
            from .cpuid import dump_from_entries
            entries = _call(k, "supported_cpuid", handle.get_supported_cpuid)
            k.supported_cpuid = dump_from_entries(entries) if entries is not None else None
            entries = _call(k, "emulated_cpuid", handle.get_emulated_cpuid)
            k.emulated_cpuid = dump_from_entries(entries) if entries is not None else None
            k.msr_index_list = _call(k, "msr_index_list", lambda: list(handle.get_msr_index_list()))
            k.msr_feature_index_list = _call(
                k, "msr_feature_index_list", lambda: list(handle.get_msr_feature_index_list()))
            if k.msr_feature_index_list:
                values = _call(k, "feature_msrs", lambda: handle.get_msrs(k.msr_feature_index_list))
                feature_msrs = {int(i): int(v) for i, v in values.items()} if values else None
                feature_error = k.errors.get("feature_msrs") or (None if feature_msrs else "no values")
            else:
                feature_error = k.errors.get("msr_feature_index_list", "KVM lists no feature MSRs")
        return k, feature_msrs, feature_error
    finally:
        close = getattr(handle, "close", None)
        if close is not None:
            _call(k, "close", close)


def read_pyvt_hw_caps(device: str) -> tuple[Any, str | None]:
    """PYVT_GET_HW_CAPS, when the device is /dev/pyvt and the library can ask it."""
    if not device.rstrip("/").endswith("pyvt"):
        return None, None
    try:
        from pyvt import kvm as pyvt_kvm  # type: ignore[attr-defined]
        handle = pyvt_kvm.Kvm(device)
        for name in ("get_hw_caps", "hw_caps"):
            getter = getattr(handle, name, None)
            if callable(getter):
                return getter(), None
        return None, "pyvt.kvm.Kvm has no get_hw_caps() yet"
    except Exception as exc:
        return None, f"{exc.__class__.__name__}: {exc}"


#: Members of ``struct pyvt_cpu_caps`` other than ``vmx_msrs``, all integers.
_CPU_CAPS_FIELDS = ("cpu", "flags", "ext_ecx", "feat_ecx", "svm_eax", "svm_ebx", "svm_ecx", "svm_edx",
                    "vm_cr", "feature_control")


class HwCapsFileError(ValueError):
    """A ``--hw-caps-json`` dump that cannot be read or has the wrong shape."""


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


def parse_hw_caps(doc: Any) -> dict:
    """Check a PYVT_GET_HW_CAPS dump: the dict ``pyvt.kvm.Kvm.get_hw_caps()`` returns.

    ``{"abi_version", "vendor", "nr_cpus", "npt_levels", "cpus": [{"cpu", "flags",
    "ext_ecx", "feat_ecx", "svm_eax", "svm_ebx", "svm_ecx", "svm_edx", "vm_cr",
    "feature_control", "vmx_msrs": [PYVT_VMX_NR_MSRS integers]}, ...]}``, every value an
    unsigned integer. Raises :class:`HwCapsFileError` saying what is wrong.
    """
    if not isinstance(doc, dict):
        raise HwCapsFileError("expected a JSON object")
    for key in ("abi_version", "vendor", "nr_cpus", "npt_levels"):
        if not _is_uint(doc.get(key)):
            raise HwCapsFileError(f"{key!r} must be an unsigned integer")
    if doc["abi_version"] != uapi.PYVT_ABI_VERSION:
        raise HwCapsFileError(f"written by a pyvt.ko speaking ABI {doc['abi_version']}; "
                              f"this pyvt reads ABI {uapi.PYVT_ABI_VERSION}")
    cpus = doc.get("cpus")
    if not isinstance(cpus, list) or not cpus:
        raise HwCapsFileError("'cpus' must be a non-empty list")
    for i, cpu in enumerate(cpus):
        if not isinstance(cpu, dict):
            raise HwCapsFileError(f"cpus[{i}] must be an object")
        for key in _CPU_CAPS_FIELDS:
            if not _is_uint(cpu.get(key)):
                raise HwCapsFileError(f"cpus[{i}].{key} must be an unsigned integer")
        msrs = cpu.get("vmx_msrs")
        if not isinstance(msrs, list) or len(msrs) != uapi.PYVT_VMX_NR_MSRS or not all(map(_is_uint, msrs)):
            raise HwCapsFileError(f"cpus[{i}].vmx_msrs must be a list of {uapi.PYVT_VMX_NR_MSRS} unsigned integers")
    return {"abi_version": doc["abi_version"], "vendor": doc["vendor"], "nr_cpus": doc["nr_cpus"],
            "npt_levels": doc["npt_levels"],
            "cpus": [{**{k: cpu[k] for k in _CPU_CAPS_FIELDS}, "vmx_msrs": list(cpu["vmx_msrs"])}
                     for cpu in cpus]}


def read_hw_caps_json(path: str, stdin: TextIO | None = None) -> dict:
    """Load a PYVT_GET_HW_CAPS dump from *path* (``-``: *stdin*), as :func:`parse_hw_caps` checks it."""
    try:
        if path == "-":
            text = (stdin or sys.stdin).read()
        else:
            with open(path) as f:
                text = f.read()
    except OSError as exc:
        raise HwCapsFileError(f"{path}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise HwCapsFileError(f"{path}: not JSON ({exc})") from None
    try:
        return parse_hw_caps(doc)
    except HwCapsFileError as exc:
        raise HwCapsFileError(f"{path}: {exc}") from None


def tool_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("pyvt")
    except Exception:
        return None


def collect(device: str = "/dev/kvm", pyvt_hw_caps: dict | None = None) -> RawCaps:
    """Gather every source for the report (the probe is run separately)."""
    cpuid_dump, cpuid_source, cpuid_error = read_host_cpuid()
    kvm, feature_msrs, feature_error = query_kvm(device)
    vendor = None
    if cpuid_dump and (0, 0) in cpuid_dump:
        _, ebx, ecx, edx = cpuid_dump[(0, 0)]
        vendor = struct.pack("<3I", ebx, edx, ecx).decode("ascii", "replace")
    indices = INTEL_MSRS if vendor == "GenuineIntel" else AMD_MSRS if vendor == "AuthenticAMD" else ()
    msr_values, msr_error = read_msr_device(indices) if indices else (None, "unknown CPU vendor")
    hw_error = None
    if pyvt_hw_caps is None:
        pyvt_hw_caps, hw_error = read_pyvt_hw_caps(device)
    return RawCaps(
        kvm=kvm,
        host_cpuid=cpuid_dump,
        host_cpuid_source=cpuid_source,
        host_cpuid_error=cpuid_error,
        msr_device=msr_values,
        msr_device_error=msr_error,
        kvm_feature_msrs=feature_msrs,
        kvm_feature_msrs_error=feature_error,
        pyvt_hw_caps=pyvt_hw_caps,
        pyvt_hw_caps_error=hw_error,
        modules=read_modules(),
        kernel=platform.release(),
        tool_version=tool_version(),
    )
