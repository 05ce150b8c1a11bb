"""Why a vCPU stopped: one small immutable class per kind of exit.

``Vcpu.run()`` returns one of these.  Each mirrors a ``KVM_EXIT_*`` reason
(named in its docstring) or one of pyvt's own stops (``DebugExit``,
``Timeout``).  An exit reason pyvt has no class for is an ``Unhandled`` value,
never a crash.  The failure exits (``Shutdown``, ``FailEntry``,
``InternalError``) have ``failed = True`` and can raise the matching
:class:`pyvt.GuestError` with :meth:`Exit.raise_for_failure`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Optional, Tuple, Union

from . import _native, errors

if TYPE_CHECKING:
    from .registers import Registers


def _hex(value: Optional[int]) -> str:
    return "?" if value is None else f"{value:#x}"


class Exit(abc.ABC):  # noqa: B024 (an ABC only so that the C types Io, Mmio register)
    """Base class of every exit."""

    __slots__ = ()
    #: True for exits that mean the guest cannot go on as it is.
    failed: ClassVar[bool] = False
    #: The exception class :meth:`raise_for_failure` raises.
    error_class: ClassVar[Optional[type]] = None

    def describe(self) -> str:
        """A one-line human description."""
        return repr(self)

    def raise_for_failure(self) -> "Exit":
        """Raises the matching :class:`pyvt.GuestError` if this exit failed."""
        if self.failed and self.error_class is not None:
            raise self.error_class(self)
        return self


def _fault_details(vector, error_code, cr2, instruction: bytes, disassembly: str) -> str:
    """What a debugger shows of a fault: the vector, error code, CR2 (those
    known) and the instruction at rip."""
    text = ""
    if vector is not None:
        name = GuestException.NAMES.get(vector, f"vector {vector}")
        text += f"; pending exception {name} (vector {vector}"
        text += f", error code {error_code:#x})" if error_code is not None else ")"
    if cr2 is not None:
        text += f", cr2={cr2:#x}"
    if instruction:
        text += f"; instruction: {instruction.hex(' ')}"
        if disassembly:
            text += f" ({disassembly})"
    return text


@dataclass(frozen=True, slots=True, repr=False)
class Hlt(Exit):
    """``KVM_EXIT_HLT``: the guest executed ``hlt`` (rip is past it)."""

    rip: Optional[int] = None

    def __repr__(self) -> str:
        return f"Hlt(rip={_hex(self.rip)})"


# Io, Mmio and Msr are C types (see pyvt/_native.pyx for why): the exits
# most often built, one per exit that reaches a Python handler.
Io = _native.Io
Mmio = _native.Mmio
Msr = _native.Msr
Exit.register(Io)
Exit.register(Mmio)
Exit.register(Msr)

#: What ``Vcpu.run()`` returns, for type checkers (Io, Mmio, Msr are C types).
AnyExit = Union[Exit, Io, Mmio, Msr]


@dataclass(frozen=True, slots=True, repr=False)
class DebugExit(Exit):
    """The native isa-debug-exit device was written: ``status`` is what QEMU
    would exit with, ``(code << 1) | 1``."""

    code: int
    port: int = _native.DEBUG_EXIT_PORT
    rip: Optional[int] = None

    @property
    def status(self) -> int:
        return ((self.code << 1) | 1) & 0xFF

    def __repr__(self) -> str:
        return (f"DebugExit(code={self.code:#x}, status={self.status}, "
                f"port={self.port:#x}, rip={_hex(self.rip)})")


@dataclass(frozen=True, slots=True, repr=False)
class Timeout(Exit):
    """``run(timeout=...)`` ran out of time; the vCPU can be run again."""

    timeout: float
    rip: Optional[int] = None

    def __repr__(self) -> str:
        return f"Timeout({self.timeout:g}s, rip={_hex(self.rip)})"


@dataclass(frozen=True, slots=True, repr=False)
class Shutdown(Exit):
    """``KVM_EXIT_SHUTDOWN``: a triple fault (or a shutdown cycle); ``regs``
    holds the registers at that point."""

    regs: Optional["Registers"] = None
    rip: Optional[int] = None
    #: The exception pending when the CPU shut down (the one that could not
    #: be delivered), its error code and CR2, where KVM reports them.
    vector: Optional[int] = None
    error_code: Optional[int] = None
    cr2: Optional[int] = None
    #: The bytes at rip and, with capstone installed, their first instruction.
    instruction: bytes = b""
    disassembly: str = ""
    failed: ClassVar[bool] = True
    error_class: ClassVar[type] = errors.TripleFault

    def describe(self) -> str:
        text = f"guest triple-faulted (KVM_EXIT_SHUTDOWN) at rip={_hex(self.rip)}"
        text += _fault_details(self.vector, self.error_code, self.cr2,
                               self.instruction, self.disassembly)
        if self.regs is not None:
            text += "\n" + self.regs.dump()
        return text

    def __repr__(self) -> str:
        return f"Shutdown(rip={_hex(self.rip)})"


# Hardware reasons for a failed VM entry, from Intel SDM Vol. 3, appendix C
# ("basic exit reasons" with bit 31 set) and AMD's VMEXIT_INVALID.
_ENTRY_FAILURES = {
    33: "invalid guest state (VM-entry failure due to guest state)",
    34: "MSR loading failed on VM entry",
    41: "machine-check event during VM entry",
}


# When VMLAUNCH/VMRESUME itself fails (VMfailValid), KVM and pyvt.ko report
# the VM-instruction error number instead (Intel SDM Vol. 3, section 31.4).
_VM_INSTRUCTION_ERRORS = {
    4: "VMLAUNCH with a non-clear VMCS",
    5: "VMRESUME with a non-launched VMCS",
    6: "VMRESUME after VMXOFF",
    7: "VM entry with invalid control field(s)",
    8: "VM entry with invalid host-state field(s)",
    26: "VM entry with events blocked by MOV SS",
}


def describe_entry_failure(reason: int) -> str:
    """Names a ``hardware_entry_failure_reason`` as VMX or SVM reports it."""
    if reason in (0xFFFFFFFFFFFFFFFF, 0xFFFFFFFF):
        return "VMRUN failed: VMEXIT_INVALID (illegal guest state in the VMCB)"
    basic = reason & 0xFFFF
    if basic in _ENTRY_FAILURES:
        return f"VMX: {_ENTRY_FAILURES[basic]}"
    if reason in _VM_INSTRUCTION_ERRORS:
        return f"VMX: VM-instruction error {reason}: {_VM_INSTRUCTION_ERRORS[reason]}"
    return f"unrecognised hardware reason {reason:#x}"


@dataclass(frozen=True, slots=True, repr=False)
class FailEntry(Exit):
    """``KVM_EXIT_FAIL_ENTRY``: the hardware refused to enter the guest."""

    hardware_entry_failure_reason: int
    cpu: int = 0
    regs: Optional["Registers"] = None
    rip: Optional[int] = None
    failed: ClassVar[bool] = True
    error_class: ClassVar[type] = errors.EntryFailed

    @property
    def reason(self) -> str:
        return describe_entry_failure(self.hardware_entry_failure_reason)

    def describe(self) -> str:
        text = (f"VM entry failed on host CPU {self.cpu}: {self.reason} "
                f"(hardware_entry_failure_reason={self.hardware_entry_failure_reason:#x})")
        if self.regs is not None:
            text += "\n" + self.regs.dump()
        return text

    def __repr__(self) -> str:
        return (f"FailEntry(reason={self.hardware_entry_failure_reason:#x} "
                f"{self.reason!r}, cpu={self.cpu})")


INTERNAL_ERROR_NAMES = {
    1: "emulation failure (KVM could not emulate an instruction)",
    2: "simultaneous exceptions",
    3: "unexpected exit while delivering an event",
    4: "unexpected exit reason",
}


@dataclass(frozen=True, slots=True, repr=False)
class InternalError(Exit):
    """``KVM_EXIT_INTERNAL_ERROR``: KVM could not handle what the guest did.

    ``instruction`` holds the bytes at RIP (from KVM when it reports them,
    otherwise read from guest memory); ``disassembly`` is filled in when the
    optional ``capstone`` package is installed.
    """

    suberror: int
    data: Tuple[int, ...] = ()
    instruction: bytes = b""
    disassembly: str = ""
    regs: Optional["Registers"] = None
    rip: Optional[int] = None
    failed: ClassVar[bool] = True
    error_class: ClassVar[type] = errors.InternalError

    @property
    def reason(self) -> str:
        return INTERNAL_ERROR_NAMES.get(self.suberror, f"suberror {self.suberror}")

    def describe(self) -> str:
        text = f"KVM internal error: {self.reason} at rip={_hex(self.rip)}"
        if self.instruction:
            text += f"; bytes at rip: {self.instruction.hex(' ')}"
        if self.disassembly:
            text += f" ({self.disassembly})"
        if self.data:
            text += "; data: " + " ".join(f"{d:#x}" for d in self.data)
        if self.regs is not None:
            text += "\n" + self.regs.dump()
        return text

    def __repr__(self) -> str:
        insn = f", instruction={self.instruction.hex(' ')!r}" if self.instruction else ""
        return f"InternalError({self.reason!r}, rip={_hex(self.rip)}{insn})"


@dataclass(frozen=True, slots=True, repr=False)
class Debug(Exit):
    """``KVM_EXIT_DEBUG``: a single step, breakpoint or watchpoint (guest debug)."""

    exception: int
    pc: int
    dr6: int = 0
    dr7: int = 0
    rip: Optional[int] = None
    #: The address of the breakpoint (``vm.breakpoints``) that fired, or None.
    breakpoint: Optional[int] = None
    #: The address of the watchpoint (``vm.watchpoints``) that fired, or None.
    watchpoint: Optional[int] = None
    #: True when a single step (``cpu.step()``) ended here.
    step: bool = False

    def describe(self) -> str:
        if self.breakpoint is not None:
            return f"breakpoint at {self.breakpoint:#x}"
        if self.watchpoint is not None:
            return f"watchpoint at {self.watchpoint:#x} hit at rip={_hex(self.rip)}"
        if self.step:
            return f"single step to rip={_hex(self.rip)}"
        return repr(self)

    def __repr__(self) -> str:
        what = ""
        if self.breakpoint is not None:
            what = f", breakpoint={self.breakpoint:#x}"
        elif self.watchpoint is not None:
            what = f", watchpoint={self.watchpoint:#x}"
        elif self.step:
            what = ", step"
        return (f"Debug(exception={self.exception}, pc={self.pc:#x}, "
                f"dr6={self.dr6:#x}, dr7={self.dr7:#x}{what})")


@dataclass(frozen=True, slots=True, repr=False)
class GuestException(Exit):
    """The guest took an exception it could not handle: ``KVM_EXIT_EXCEPTION``
    (an exception KVM reflected to user space), or an exception at CPL 3 on
    a ``ring=3`` vCPU, caught by pyvt's IDT (:mod:`pyvt.guest_exceptions`).
    ``rip`` is the instruction that faulted (the vCPU's registers are put
    back as they were there, so running again retries it); ``cr2`` is the
    faulting address of a page fault (vector 14), else None."""

    exception: int
    error_code: int = 0
    rip: Optional[int] = None
    cr2: Optional[int] = None
    #: The bytes at rip and, with capstone installed, their first instruction.
    instruction: bytes = b""
    disassembly: str = ""

    NAMES: ClassVar[dict] = {
        0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
        8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
        17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP"}

    failed: ClassVar[bool] = True
    error_class: ClassVar[type] = errors.GuestError

    @property
    def vector(self) -> int:
        """The exception vector (same as ``exception``)."""
        return self.exception

    def describe(self) -> str:
        name = self.NAMES.get(self.exception, f"vector {self.exception}")
        text = (f"guest exception {name} (vector {self.exception}, error code "
                f"{self.error_code:#x}) at rip={_hex(self.rip)}")
        text += f", cr2={self.cr2:#x}" if self.cr2 is not None else ""
        return text + _fault_details(None, None, None, self.instruction, self.disassembly)

    def __repr__(self) -> str:
        name = self.NAMES.get(self.exception, "")
        cr2 = f", cr2={self.cr2:#x}" if self.cr2 is not None else ""
        return (f"GuestException(vector={self.exception}{' ' + name if name else ''}, "
                f"error_code={self.error_code:#x}, rip={_hex(self.rip)}{cr2})")


@dataclass(frozen=True, slots=True, repr=False)
class SystemEvent(Exit):
    """``KVM_EXIT_SYSTEM_EVENT``: shutdown, reset or crash requested."""

    type: int
    rip: Optional[int] = None

    NAMES: ClassVar[dict] = {1: "shutdown", 2: "reset", 3: "crash"}

    def __repr__(self) -> str:
        return f"SystemEvent({self.NAMES.get(self.type, self.type)})"


@dataclass(frozen=True, slots=True, repr=False)
class Hypercall(Exit):
    """``KVM_EXIT_HYPERCALL``."""

    nr: int
    args: Tuple[int, ...] = field(default_factory=tuple)
    rip: Optional[int] = None

    def __repr__(self) -> str:
        return f"Hypercall(nr={self.nr}, args={tuple(hex(a) for a in self.args)})"


@dataclass(frozen=True, slots=True, repr=False)
class Unhandled(Exit):
    """Any exit reason pyvt has no class for; ``reason`` is the KVM_EXIT_* number."""

    reason: int
    hardware_exit_reason: int = 0
    rip: Optional[int] = None

    def __repr__(self) -> str:
        return (f"Unhandled(reason={self.reason}, "
                f"hardware_exit_reason={self.hardware_exit_reason:#x}, rip={_hex(self.rip)})")


__all__ = [
    "Exit", "Hlt", "Io", "Mmio", "Msr", "DebugExit", "Timeout", "Shutdown", "FailEntry",
    "InternalError", "Debug", "GuestException", "SystemEvent", "Hypercall", "Unhandled",
    "describe_entry_failure",
]


@dataclass(frozen=True, slots=True, repr=False)
class Stopped(Exit):
    """``cpu.stop()`` (or ``vm.close()``) from another thread ended the run."""

    rip: Optional[int] = None

    def __repr__(self) -> str:
        return f"Stopped(rip={_hex(self.rip)})"


__all__.append("Stopped")


@dataclass(frozen=True, slots=True, repr=False)
class Reset(Exit):
    """The guest asked to reset the machine through a native device:
    ``source`` names it (``"i8042"``: 0xfe written to port 0x64, or the
    output port's reset bit cleared; the ACPI reset register points there
    too).  Like QEMU with ``-no-reboot``, pyvt stops instead of rebooting."""

    source: str
    port: int = _native.I8042_COMMAND_PORT
    rip: Optional[int] = None

    def __repr__(self) -> str:
        return f"Reset(source={self.source!r}, port={self.port:#x}, rip={_hex(self.rip)})"


__all__.append("Reset")


@dataclass(frozen=True, slots=True, repr=False)
class _SleepEvent(Exit):
    """A sleep the guest started through a native device: ``source`` names
    it (``"acpi_pm1"``: a sleep type with SLP_EN written to the ACPI PM1a
    control block at ``port``)."""

    source: str
    port: int = _native.PM1_PORT + _native.PM1_EVENT_LENGTH
    rip: Optional[int] = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source={self.source!r}, port={self.port:#x}, "
                f"rip={_hex(self.rip)})")


@dataclass(frozen=True, slots=True, repr=False)
class PowerOff(_SleepEvent):
    """The guest powered the machine off: the S5 sleep type (the DSDT's
    ``\\_S5``) with SLP_EN, written to the ACPI PM1a control block."""


__all__.append("PowerOff")


@dataclass(frozen=True, slots=True, repr=False)
class Suspend(_SleepEvent):
    """The guest suspended the machine to RAM (ACPI S3: ``\\_S3``'s sleep
    type with SLP_EN written to the PM1a control block).  The vCPUs stay
    stopped; :func:`pyvt.acpi_sleep.resume` waits for the RTC alarm the
    guest armed and restarts them at its FACS waking vector."""


__all__.append("Suspend")


@dataclass(frozen=True, slots=True, repr=False)
class Quit(Exit):
    """The run was ended on request (the control socket's ``quit``);
    ``source`` says by whom.  ``pyvt run``/``boot`` exit 0, as QEMU does."""

    source: str = "control socket"

    def __repr__(self) -> str:
        return f"Quit(by {self.source})"


__all__.append("Quit")


@dataclass(frozen=True, slots=True, repr=False)
class Migrated(Exit):
    """A live migration completed (``vm.migrate``): the VM runs on at
    ``destination`` (the URI it went to) and this one's run is over.
    ``downtime_ms``: how long the guest was paused for the move."""

    destination: str
    downtime_ms: Optional[float] = None

    def __repr__(self) -> str:
        downtime = "" if self.downtime_ms is None else f", downtime {self.downtime_ms:.1f} ms"
        return f"Migrated(to {self.destination}{downtime})"


__all__.append("Migrated")
