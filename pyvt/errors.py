"""pyvt's exceptions.  Every error pyvt raises is a :class:`Error`.

Each message says what went wrong and, where there is one, what to do about
it.  OS-level failures of an ioctl carry the errno and the ioctl's name.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Optional


class Error(Exception):
    """Base class of every pyvt error."""


class BackendError(Error):
    """The virtualization device cannot be used."""


class _OSErrorMessage(OSError):
    """Prints just the message, not OSError's "[Errno N]" prefix."""

    def __str__(self) -> str:
        return self.strerror or ""


class BackendNotFound(_OSErrorMessage, BackendError, FileNotFoundError):
    """The device node (``/dev/kvm`` or ``/dev/pyvt``) does not exist."""


class BackendPermissionError(_OSErrorMessage, BackendError, PermissionError):
    """The device node exists but this process may not open it."""


class ApiVersionMismatch(BackendError):
    """The device speaks a KVM API version other than 12."""


class KvmError(_OSErrorMessage, Error):
    """An ioctl failed.  ``errno`` and ``ioctl`` say which and why."""

    def __init__(self, ioctl: str, errno: Optional[int], hint: str = ""):
        self.ioctl = ioctl
        errno = errno or _errno.EIO
        message = f"{ioctl} failed: {os.strerror(errno)} ({_errno.errorcode.get(errno, errno)})"
        if hint:
            message += f"; {hint}"
        OSError.__init__(self, errno, message)


class MemoryConfigError(Error, ValueError):
    """A memory size or guest-physical range is not usable."""


class RegionOverlapError(MemoryConfigError):
    """A memory region or an I/O range overlaps one that exists."""


class OutOfRangeError(Error, IndexError):
    """An access to guest memory falls outside every memory region."""


class InvalidModeError(Error, ValueError):
    """A CPU mode name other than real, protected or long."""


class VcpuIndexError(Error, IndexError):
    """A vCPU index outside what the backend allows, or one already used."""


class ClosedError(Error):
    """The VM (or vCPU) was closed and cannot be used any more."""


class ArgumentError(Error, ValueError):
    """A call got an argument of the wrong type or value."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument (or a handler's return value) of the wrong type.  Also a
    TypeError, what Python itself raises there, so ``except TypeError``
    keeps working."""


class GuestError(Error):
    """The guest stopped in a way that needs attention (see ``exit``)."""

    def __init__(self, exit):
        self.exit = exit
        super().__init__(exit.describe())


class TripleFault(GuestError):
    """The guest triple-faulted (``KVM_EXIT_SHUTDOWN``)."""


class EntryFailed(GuestError):
    """VM entry failed (``KVM_EXIT_FAIL_ENTRY``)."""


class InternalError(GuestError):
    """KVM could not handle what the guest did (``KVM_EXIT_INTERNAL_ERROR``)."""


class SnapshotError(Error):
    """A snapshot cannot be taken, restored, saved or read (the message says why)."""


class SnapshotFileError(_OSErrorMessage, SnapshotError):
    """A snapshot file cannot be written or read: ``errno`` and ``filename``
    say which and why."""


class SnapshotFileNotFound(SnapshotFileError, FileNotFoundError):
    """``Snapshot.load()`` of a file that does not exist."""


class MsrFault(Error):
    """Raised by a ``vm.on_msr`` handler to refuse the guest's access: its
    ``rdmsr``/``wrmsr`` takes a general-protection fault (#GP), as for an
    MSR the CPU does not have.  pyvt catches it; ``run()`` goes on."""


class UnmappedAddressError(Error, LookupError):
    """A guest-virtual address the guest's page tables do not map."""


def check(ret: int, ioctl: str, hint: str = "") -> int:
    """Turns a C-style return (-1 with errno set) into a KvmError."""
    if ret < 0:
        from ._kvm import ffi

        raise KvmError(ioctl, ffi.errno, hint)
    return ret


# -- Sandbox (guest function calls, pyvt.sandbox) ----------------------------


class SandboxError(Error):
    """A :class:`pyvt.Sandbox` call did not return normally: the guest
    halted, called a host function nobody registered, or stopped otherwise
    (the message says how).  The sandbox is back at its snapshot."""


class GuestFault(SandboxError):
    """The guest function took an exception (or, at ring 0, triple-faulted).
    ``exit`` is the run's exit, ``regs`` the registers at the faulting
    instruction, ``instruction`` its bytes and ``disassembly`` the
    instruction as text (when ``capstone`` is installed), ``location`` the
    function and offset it lies in.  The sandbox is back at its snapshot."""

    def __init__(self, message: str, exit=None, regs=None, instruction: bytes = b"",
                 disassembly: str = "", location: str = ""):
        super().__init__(message)
        self.exit = exit
        self.regs = regs
        self.instruction = instruction
        self.disassembly = disassembly
        self.location = location


class SandboxTimeout(SandboxError, TimeoutError):
    """A :class:`pyvt.Sandbox` call ran past its ``timeout``; the guest was
    stopped and the sandbox is back at its snapshot."""


# -- DEVICES (issue 13): failures of pyvt's native devices and I/O bus --------
# No ioctl is involved in these, so they are not KvmErrors.


class DeviceError(Error):
    """A native device (or pyvt's native I/O bus) refused an operation: the
    message says which and why."""


class DeviceStateError(DeviceError, ArgumentError):
    """A device state that does not fit the device: from another pyvt build,
    or not what the device's ``save_state()`` returns."""


# -- virtio (pyvt.virtio; the native workers, pyvt._virtio) --

class VirtioError(DeviceError):
    """A virtio device (:mod:`pyvt.virtio`) cannot be made or used as asked."""


class VirtqueueError(VirtioError, ArgumentError):
    """A virtqueue that cannot be served: the guest's driver set it up wrong
    (a size that is not a power of two up to 32768, a misaligned ring, a
    ring or buffer outside guest RAM, a bad descriptor chain).  The device
    stops serving it and asks for a reset (DEVICE_NEEDS_RESET), as the
    virtio specification says."""


class DiskImageError(_OSErrorMessage, VirtioError):
    """``vm.add_disk()``: the disk image is missing, not a regular file or
    block device, or cannot be opened as asked (``errno`` says why)."""


class TapError(_OSErrorMessage, VirtioError):
    """``vm.add_net(tap=...)``: the tap device does not exist or cannot be
    attached (``errno`` says why)."""



# -- RUN CONTROL (issue 17): pausing, resuming and ending vm.run() -------------


class RunControlError(Error):
    """``vm.pause()`` could not pause the VM (a vCPU did not stop in time,
    or it was called from a vCPU's own thread), or ``vm.run()`` was started
    twice at once: the message says which; the VM runs on."""


class ControlError(RunControlError):
    """A control socket cannot be served (``vm.serve_control``, ``--control``):
    its path exists and is not a stale socket, is another process's live
    socket, is too long, or cannot be bound; or ``pyvt ctl`` cannot reach it."""


# -- MIGRATION (issue 17): live migration and its stream ------------------------


class MigrationError(Error):
    """A live migration could not start, failed or was cancelled (the source
    VM runs on unchanged), or ``pyvt.Vm.incoming`` refused or lost the
    incoming VM (it never runs a VM it did not wholly receive): the message
    says which and why."""
