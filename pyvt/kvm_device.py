"""In-kernel devices (``KVM_CREATE_DEVICE``) and the device-attribute ioctls.

``KVM_SET/GET/HAS_DEVICE_ATTR`` go to a device fd (:class:`DeviceFd`, made
by :meth:`pyvt.kvm.VmFd.create_device`), and on architectures that define
attributes for them to the VM and vCPU fds too (Documentation/virt/kvm/api.rst
4.80 and 4.81): the functions here are what all of them issue.  An attribute
is named by ``(group, attr)``; its value is bytes in the kernel's layout for
that attribute (most are one ``__u64``), passed by address.
"""

from __future__ import annotations

import errno
from typing import Optional

from ._kvm import ffi, lib
from .errors import ArgumentError, ArgumentTypeError, KvmError
from .kvm_base import _Fd, _u32, _u64

#: ``KVM_DEV_TYPE_*`` names by number (those the build headers define).
DEVICE_TYPES = {
    getattr(lib, name): name for name in dir(lib) if name.startswith("KVM_DEV_TYPE_")
}


# Bytes every attribute buffer has at least: more than any x86 attribute's value.
_ATTR_SLACK = 4096


def device_type_name(device_type: int) -> str:
    return DEVICE_TYPES.get(device_type, f"device type {device_type}")


def _attr(group: int, attr: int, data, flags: int):
    """The ``struct kvm_device_attr`` for ``(group, attr)``, its ``addr``
    pointing at ``data`` (a cffi buffer kept alive by the caller) or 0."""
    return ffi.new("struct kvm_device_attr *", {
        "flags": _u32(flags, "flags"), "group": _u32(group, "group"),
        "attr": _u64(attr, "attr"),
        "addr": 0 if data is None else int(ffi.cast("uintptr_t", data)),
    })


def _attr_ioctl(fd: _Fd, name: str, request: int, attr, where: str) -> None:
    try:
        fd._ioctl(name, request, attr)
    except KvmError as e:
        what = f"group {attr.group} attribute {attr.attr}"
        if e.errno == errno.ENXIO:
            raise KvmError(name, e.errno, f"{where} has no {what}") from None
        if e.errno == errno.EPERM:
            raise KvmError(name, e.errno, f"{where} does not let {what} be "
                           f"{'read' if request == lib.KVM_GET_DEVICE_ATTR else 'written'}") from None
        raise


def set_device_attr(fd: _Fd, group: int, attr: int, data=None, *, flags: int = 0,
                    where: str = "the device") -> None:
    """``KVM_SET_DEVICE_ATTR`` on ``fd``: writes ``data`` (bytes-like, or
    None for an attribute that takes no value) to ``(group, attr)``."""
    buf = None
    if data is not None:
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            raise ArgumentTypeError(f"KVM_SET_DEVICE_ATTR's data must be bytes-like or None, "
                                    f"not {type(data).__name__}") from None
        if len(view) == 0:
            raise ArgumentError("KVM_SET_DEVICE_ATTR's data is empty: pass None for an "
                                "attribute that takes no value")
        # The kernel reads as many bytes as the attribute has, whatever was
        # passed: a zero-padded copy keeps a short value from reading past it.
        buf = ffi.new("char[]", max(len(view), _ATTR_SLACK))
        ffi.buffer(buf, len(view))[:] = view
    _attr_ioctl(fd, "KVM_SET_DEVICE_ATTR", lib.KVM_SET_DEVICE_ATTR,
                _attr(group, attr, buf, flags), where)


def get_device_attr(fd: _Fd, group: int, attr: int, size: int = 8, *, flags: int = 0,
                    where: str = "the device") -> bytes:
    """``KVM_GET_DEVICE_ATTR`` on ``fd``: the ``size`` bytes the kernel writes
    for ``(group, attr)`` (8 for the usual ``__u64``)."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise ArgumentTypeError(f"size must be an integer number of bytes, not {size!r}")
    if not 1 <= size <= 1 << 20:
        raise ArgumentError(f"size must be 1 byte to 1 MiB, not {size}")
    # The kernel writes as many bytes as the attribute has, whatever size
    # says: the slack keeps a too-small size from overrunning the buffer.
    buf = ffi.new("char[]", max(size, _ATTR_SLACK))
    _attr_ioctl(fd, "KVM_GET_DEVICE_ATTR", lib.KVM_GET_DEVICE_ATTR,
                _attr(group, attr, buf, flags), where)
    return bytes(ffi.buffer(buf, size))


def has_device_attr(fd: _Fd, group: int, attr: int, *, flags: int = 0,
                    where: str = "the device") -> bool:
    """``KVM_HAS_DEVICE_ATTR`` on ``fd``: whether ``(group, attr)`` exists
    (the kernel's ENXIO is False; other failures raise)."""
    try:
        _attr_ioctl(fd, "KVM_HAS_DEVICE_ATTR", lib.KVM_HAS_DEVICE_ATTR,
                    _attr(group, attr, None, flags), where)
    except KvmError as e:
        if e.errno == errno.ENXIO:
            return False
        raise
    return True


class DeviceFd(_Fd):
    """An in-kernel device's file descriptor, made by
    :meth:`pyvt.kvm.VmFd.create_device` (api.rst 4.79 KVM_CREATE_DEVICE)."""

    def __init__(self, vm, fd: int, device_type: int):
        self.vm = vm
        #: The ``KVM_DEV_TYPE_*`` it was made as.
        self.device_type = device_type
        self._fd = fd

    def __repr__(self) -> str:
        return f"<DeviceFd {device_type_name(self.device_type)} fd={self._fd}>"

    def _where(self) -> str:
        return f"this {device_type_name(self.device_type)} device"

    def set_device_attr(self, group: int, attr: int, data=None, *, flags: int = 0) -> None:
        """``KVM_SET_DEVICE_ATTR`` (api.rst 4.80 KVM_SET_DEVICE_ATTR/KVM_GET_DEVICE_ATTR):
        writes ``data`` (bytes-like; None for an attribute without a value)."""
        set_device_attr(self, group, attr, data, flags=flags, where=self._where())

    def get_device_attr(self, group: int, attr: int, size: int = 8, *, flags: int = 0) -> bytes:
        """``KVM_GET_DEVICE_ATTR`` (api.rst 4.80): the attribute's ``size`` bytes."""
        return get_device_attr(self, group, attr, size, flags=flags, where=self._where())

    def has_device_attr(self, group: int, attr: int, *, flags: int = 0) -> bool:
        """``KVM_HAS_DEVICE_ATTR`` (api.rst 4.81): whether the device has it."""
        return has_device_attr(self, group, attr, flags=flags, where=self._where())


def create_device(vm: _Fd, device_type: int, test: bool = False) -> Optional[DeviceFd]:
    """``KVM_CREATE_DEVICE`` on the VM fd ``vm``; see :meth:`pyvt.kvm.VmFd.create_device`."""
    create = ffi.new("struct kvm_create_device *", {
        "type": _u32(device_type, "device type"),
        "flags": lib.KVM_CREATE_DEVICE_TEST if test else 0,
    })
    try:
        vm._ioctl("KVM_CREATE_DEVICE", lib.KVM_CREATE_DEVICE, create)
    except KvmError as e:
        if e.errno == errno.ENODEV:
            raise KvmError("KVM_CREATE_DEVICE", e.errno,
                           f"this host's KVM cannot make {device_type_name(device_type)} "
                           f"(kernel built without it, or another architecture's)") from None
        if e.errno == errno.EEXIST:
            raise KvmError("KVM_CREATE_DEVICE", e.errno,
                           f"this VM has a {device_type_name(device_type)} already and "
                           f"takes only one") from None
        raise
    return None if test else DeviceFd(vm, create.fd, device_type)
