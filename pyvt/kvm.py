"""The thin layer: one Python object per KVM file descriptor, one method per ioctl.

``Kvm`` (the system fd) creates ``VmFd``, which creates ``VcpuFd``, the way
the kernel's objects nest.  Each method wraps one ioctl, checks its result and
raises :class:`pyvt.KvmError` with the errno and the ioctl's name.  Struct
layouts and ioctl numbers come from ``<linux/kvm.h>`` through cffi
(``pyvt._kvm``); nothing here computes an offset.  The high-level ``pyvt.Vm``
is built on these objects; people writing their own VMM can use them directly.

The same ABI is spoken by ``/dev/kvm`` and by the project's ``/dev/pyvt``.

The layer lives in modules along the kernel's seams (as rust-vmm's
kvm-ioctls splits it): :mod:`pyvt.kvm_base` (the fd base class and shared
helpers), :mod:`pyvt.kvm_system` (``Kvm``), :mod:`pyvt.kvm_vm` (``VmFd``),
:mod:`pyvt.kvm_vcpu` (``VcpuFd``), :mod:`pyvt.kvm_device` (``DeviceFd``) and
:mod:`pyvt.kvm_stats`; this module exports all of them, as before.
"""

from __future__ import annotations

from ._kvm import ffi, lib  # noqa: F401
from .kvm_base import (  # noqa: F401
    _CPUID_FIELDS,
    _LENGTHS,
    DEFAULT_DEVICE,
    KVM_API_VERSION,
    PAGE_SIZE,
    PYVT_DEVICE,
    CpuidEntry,
    _arg,
    _as_list,
    _cap_number,
    _cpuid2_buffer,
    _deprecated,
    _device_path,
    _enable_cap_struct,
    _Fd,
    _fill,
    _get_msrs,
    _msrs_struct,
    _read_cpuid,
    _require_cap,
    _struct_arg,
    _struct_pointer,
    _u32,
    _u64,
    _uint,
    _variable_struct,
    caps,
    cpuid_table,
    host_cpuid,
    msrs_struct,
    struct_bytes,
)
from .kvm_device import DeviceFd  # noqa: F401
from .kvm_device import create_device as _create_device  # noqa: F401
from .kvm_device import get_device_attr as _get_device_attr  # noqa: F401
from .kvm_device import has_device_attr as _has_device_attr  # noqa: F401
from .kvm_device import set_device_attr as _set_device_attr  # noqa: F401
from .kvm_stats import StatsFd  # noqa: F401
from .kvm_stats import open_stats_fd as _open_stats_fd  # noqa: F401
from .kvm_system import Kvm  # noqa: F401
from .kvm_vcpu import VcpuFd  # noqa: F401
from .kvm_vm import VmFd, _memory_encryption_host  # noqa: F401
