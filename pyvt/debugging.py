"""Breakpoints, watchpoints and single steps on a :class:`pyvt.Vm` (guest debug).

``vm.breakpoints``, ``vm.watchpoints`` and ``cpu.step()`` are built here on
``KVM_SET_GUEST_DEBUG`` (:meth:`pyvt.kvm.VcpuFd.set_guest_debug`):

- a software breakpoint (``kind="sw"``) is an ``int3`` written over the
  instruction, trapped with ``KVM_GUESTDBG_USE_SW_BP``.  Some backends cannot
  trap int3 (PVM: ring-0 code is emulated there and int3 fails to emulate).
  A probe, once per backend, finds out; where int3 is not trapped, a software
  breakpoint becomes a hardware one transparently (logged once);
- hardware breakpoints and watchpoints take one of the four debug registers
  DR0-DR3 each (a :class:`pyvt.Error` saying what holds them when all are taken);
- where the backend does not raise data breakpoints (the same probe), write
  watchpoints are emulated by :meth:`Debugger.resume`, which then single-steps
  the guest and compares the watched bytes after each instruction.

A breakpoint keeps firing at its address until the vCPU moves past it:
:meth:`Debugger.resume` (what the gdb stub uses) steps over it first.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import struct
import threading
import time
import weakref
from typing import Dict, Iterator, List, Optional

from . import exits
from ._kvm import ffi, lib
from .errors import ArgumentError, Error, KvmError, UnmappedAddressError

log = logging.getLogger("pyvt.debugging")

#: Debug registers for breakpoints and watchpoints: DR0-DR3.
DEBUG_REGISTER_COUNT = 4
INT3 = 0xCC
_DR6_BS = 1 << 14  # single step
_DR7_RW = {"x": 0b00, "w": 0b01, "rw": 0b11}
_DR7_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
_EFLAGS_TF = 1 << 8


@dataclasses.dataclass(frozen=True)
class BackendDebugSupport:
    """What a backend's guest debug can do, found by :func:`probe`."""

    int3: bool
    data_breakpoints: bool


_probed: Dict[str, BackendDebugSupport] = {}
_probe_lock = threading.Lock()
_fallback_logged: set = set()


def probe(backend: str) -> BackendDebugSupport:
    """Runs two tiny guests on ``backend`` (once; the answer is cached):
    does ``int3`` reach user space with KVM_GUESTDBG_USE_SW_BP, and does a
    write to an address in DR0 raise a debug exit?"""
    with _probe_lock:
        if backend not in _probed:
            _probed[backend] = BackendDebugSupport(
                _probe_guest(backend, b"\xcc\xf4", lib.KVM_GUESTDBG_USE_SW_BP, ()) == 3,
                _probe_guest(backend, b"\xc7\x04\x25\x00\x30\x00\x00\x01\x00\x00\x00\xf4",
                             lib.KVM_GUESTDBG_USE_HW_BP,
                             (0x3000, 0, 0, 0, 0, 0, 0, _dr7_bits(0, "w", 4))) == 1)
        return _probed[backend]


def _probe_guest(backend: str, code: bytes, control: int, debugreg) -> Optional[int]:
    """The exception of the Debug exit ``code`` (long mode, at 0x1000) ends
    with under guest debug ``control``, or None for any other exit."""
    from .vm import Vm

    with Vm("1M", backend, pc_devices=False) as vm:
        vm.memory.write(0x1000, code)
        cpu = vm.vcpu(0, mode="long")
        cpu.regs.rip = 0x1000
        cpu.fd.set_guest_debug(lib.KVM_GUESTDBG_ENABLE | control, debugreg)
        exit = cpu.run(timeout=5)
        return exit.exception if isinstance(exit, exits.Debug) else None


def _dr7_bits(slot: int, access: str, length: int) -> int:
    """DR7's enable, R/W and LEN bits for debug register ``slot``."""
    return ((1 << (2 * slot)) | (_DR7_RW[access] << (16 + 4 * slot))
            | (_DR7_LEN[length] << (18 + 4 * slot)))


@dataclasses.dataclass
class Breakpoint:
    """A breakpoint at guest-virtual ``address``.  ``kind`` is what was asked
    for; ``via`` how it is made: ``"int3"`` or ``"debug register"`` (then
    ``slot`` is its DR number)."""

    address: int
    kind: str
    via: str
    slot: Optional[int] = None
    physical: Optional[int] = None  # where the int3 is
    saved: Optional[int] = None  # the byte the int3 replaced


@dataclasses.dataclass
class Watchpoint:
    """A watchpoint on ``length`` bytes at guest-virtual ``address``;
    ``access`` is ``"w"`` or ``"rw"``.  ``slot`` is its DR number, or None
    when it is emulated (the backend raises no data breakpoints)."""

    address: int
    length: int
    access: str
    slot: Optional[int] = None
    value: Optional[bytes] = None  # last bytes seen, when emulated


def _check_address(address) -> int:
    if isinstance(address, bool) or not isinstance(address, int) or not 0 <= address < 1 << 64:
        raise ArgumentError(f"a guest address is an int in 0-2**64-1, not {address!r}")
    return address


class _Points:
    """The common part of ``vm.breakpoints`` and ``vm.watchpoints``."""

    def __init__(self, debugger: "Debugger"):
        self._debugger = debugger
        self._points: Dict[int, object] = {}

    def __iter__(self) -> Iterator:
        return iter(list(self._points.values()))

    def __len__(self) -> int:
        return len(self._points)

    def __contains__(self, address) -> bool:
        return address in self._points

    def get(self, address: int):
        return self._points.get(address)

    def _take(self, address: int, what: str):
        point = self._points.pop(_check_address(address), None)
        if point is None:
            raise ArgumentError(f"there is no {what} at {address:#x}")
        return point


class Breakpoints(_Points):
    """``vm.breakpoints``: ``add(address, kind="sw"|"hw")``, ``remove(address)``."""

    def add(self, address: int, kind: str = "sw") -> Breakpoint:
        """Stops every vCPU that reaches guest-virtual ``address`` (with a
        :class:`pyvt.exits.Debug` exit whose ``breakpoint`` is ``address``).
        ``kind="sw"`` writes an int3 where the backend traps it, else uses a
        debug register; ``"hw"`` takes a debug register.  Adding one that is
        there already returns it."""
        _check_address(address)
        if kind not in ("sw", "hw"):
            raise ArgumentError(f"a breakpoint's kind is 'sw' or 'hw', not {kind!r}")
        existing = self.get(address)
        if existing is not None:
            return existing
        debugger = self._debugger
        if kind == "sw" and debugger.support.int3:
            point = debugger._insert_int3(address)
        else:
            if kind == "sw":
                debugger._log_fallback()
            point = Breakpoint(address, kind, "debug register",
                               debugger._free_slot(f"breakpoint at {address:#x}"))
        self._points[address] = point
        debugger._apply_all()
        return point

    def remove(self, address: int) -> None:
        """Removes the breakpoint at ``address`` (an int3's byte is put back)."""
        point = self._take(address, "breakpoint")
        if point.via == "int3":
            self._debugger._remove_int3(point)
        self._debugger._apply_all()


class Watchpoints(_Points):
    """``vm.watchpoints``: ``add(address, length, access="w"|"rw")``, ``remove(address)``."""

    def add(self, address: int, length: int = 1, access: str = "w") -> Watchpoint:
        """Stops a vCPU right after it writes (``"w"``), or reads or writes
        (``"rw"``), any of ``length`` (1, 2, 4 or 8, aligned) bytes at
        guest-virtual ``address``: a :class:`pyvt.exits.Debug` exit whose
        ``watchpoint`` is ``address``.  Takes a debug register; where the
        backend raises no data breakpoints, write watchpoints are emulated
        by :meth:`Debugger.resume` and read ones are refused."""
        _check_address(address)
        if access not in ("w", "rw"):
            raise ArgumentError(f"a watchpoint's access is 'w' or 'rw', not {access!r}")
        if length not in _DR7_LEN or address % length:
            raise ArgumentError(f"a watchpoint covers 1, 2, 4 or 8 bytes aligned to its "
                                f"length, not {length!r} at {address:#x}")
        if address in self._points:
            raise ArgumentError(f"there is a watchpoint at {address:#x} already: remove it first")
        debugger = self._debugger
        if debugger.support.data_breakpoints:
            point = Watchpoint(address, length, access,
                               debugger._free_slot(f"watchpoint at {address:#x}"))
        elif access == "w":
            point = Watchpoint(address, length, access, None, debugger._read_virtual(address, length))
        else:
            raise Error(f"{debugger.vm.backend} raises no data breakpoints, and a read "
                        "watchpoint cannot be emulated: use access='w'")
        self._points[address] = point
        debugger._apply_all()
        return point

    def remove(self, address: int) -> None:
        """Removes the watchpoint at ``address``."""
        self._take(address, "watchpoint")
        self._debugger._apply_all()


class Debugger:
    """The guest-debug state of one VM (``vm.debugger``): its breakpoints,
    watchpoints, and the KVM_SET_GUEST_DEBUG setting each vCPU gets."""

    def __init__(self, vm):
        # Weak: the VM holds its debugger, and a forgotten VM must still be
        # freed at once, without waiting for the cycle collector.
        self._vm = weakref.ref(vm)
        self.support = probe(vm.backend)
        self.breakpoints = Breakpoints(self)
        self.watchpoints = Watchpoints(self)
        self._stop_requested: Dict[int, bool] = {}

    @property
    def vm(self):
        vm = self._vm()
        if vm is None:
            raise Error("this debugger's VM is gone")
        return vm

    # -- debug registers and int3 ---------------------------------------------

    def _slots(self) -> List:
        slots: List = [None] * DEBUG_REGISTER_COUNT
        for point in list(self.breakpoints) + list(self.watchpoints):
            if point.slot is not None:
                slots[point.slot] = point
        return slots

    def _free_slot(self, what: str) -> int:
        slots = self._slots()
        for i, taken in enumerate(slots):
            if taken is None:
                return i
        used = ", ".join(_describe(p) for p in slots)
        raise Error(f"cannot set a {what}: the four debug registers DR0-DR3 are "
                                 f"all taken ({used}); remove a hardware breakpoint or "
                                 "watchpoint first")

    def _log_fallback(self) -> None:
        if self.vm.backend not in _fallback_logged:
            _fallback_logged.add(self.vm.backend)
            log.warning("%s does not trap int3: software breakpoints use the debug "
                        "registers DR0-DR3 instead", self.vm.backend)

    def _cpu0(self):
        if not self.vm.vcpus:
            raise Error("a breakpoint's address is translated by a vCPU's page tables: "
                        "create a vCPU (vm.vcpu()) first")
        return self.vm.vcpus[min(self.vm.vcpus)]

    def _insert_int3(self, address: int) -> Breakpoint:
        physical = self._cpu0().translate(address)
        saved = self.vm.memory.read(physical, 1)[0]
        self.vm.memory.write(physical, bytes([INT3]))
        return Breakpoint(address, "sw", "int3", None, physical, saved)

    def _remove_int3(self, point: Breakpoint) -> None:
        assert point.physical is not None and point.saved is not None  # an int3 one
        self.vm.memory.write(point.physical, bytes([point.saved]))

    def _read_virtual(self, address: int, length: int) -> bytes:
        return read_virtual(self._cpu0(), address, length)

    def _guest_debug(self, single_step: bool = False):
        """(control, debugreg) for KVM_SET_GUEST_DEBUG."""
        control = lib.KVM_GUESTDBG_ENABLE if single_step else 0
        if single_step:
            control |= lib.KVM_GUESTDBG_SINGLESTEP
            return control, ()
        debugreg = [0] * 8
        for slot, point in enumerate(self._slots()):
            if point is None:
                continue
            debugreg[slot] = point.address
            if isinstance(point, Breakpoint):
                debugreg[7] |= _dr7_bits(slot, "x", 1)
            else:
                debugreg[7] |= _dr7_bits(slot, point.access, point.length)
        if debugreg[7]:
            control |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_HW_BP
        if any(p.via == "int3" for p in self.breakpoints):
            control |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_SW_BP
        return control, debugreg if debugreg[7] else ()

    def _apply(self, cpu, single_step: bool = False) -> None:
        cpu.fd.set_guest_debug(*self._guest_debug(single_step))

    def _apply_all(self) -> None:
        for cpu in list(self.vm.vcpus.values()):
            if not cpu.closed:
                self._apply(cpu)

    # -- running --------------------------------------------------------------

    def step(self, cpu, timeout: Optional[float] = None) -> exits.AnyExit:
        """Runs one instruction of ``cpu`` (see :meth:`pyvt.Vcpu.step`)."""
        rip = cpu.regs.rip
        # A single-stepped hlt does not halt (KVM skips it and reports the
        # step): without an irqchip, a run would have ended there with Hlt.
        halts = not self.vm.fd.has_irqchip and _byte_at_rip(cpu, rip) == 0xF4
        under = self.breakpoints.get(rip)
        lifted = under is not None and under.via == "int3"
        if lifted:  # the instruction itself runs, not the int3
            self._remove_int3(under)
        self._apply(cpu, single_step=True)
        try:
            exit = cpu.run(timeout=timeout)
        finally:
            if lifted:
                self.vm.memory.write(under.physical, bytes([INT3]))
            if not cpu.closed:
                self._apply(cpu)
        if halts and isinstance(exit, exits.Debug) and exit.step:
            return exits.Hlt(exit.rip)
        return exit

    def resume(self, cpu, timeout: Optional[float] = None) -> exits.AnyExit:
        """Runs ``cpu`` until a breakpoint, a watchpoint or any other exit,
        like ``cpu.run()``, but first steps over a breakpoint at the current
        rip (else it would fire again at once) and emulates write watchpoints
        where the backend cannot raise them.  :meth:`stop` ends it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._stop_requested[cpu.index] = False
        emulated = [w for w in self.watchpoints if w.slot is None]
        if self.breakpoints.get(cpu.regs.rip) is not None or emulated:
            while True:
                before = cpu.regs.rip
                exit = self.step(cpu, _left(deadline))
                if not (isinstance(exit, exits.Debug) and exit.step):
                    return exit
                hit = self._emulated_watch_hit(cpu, exit, emulated)
                if hit is not None:
                    return hit
                rip = cpu.regs.rip
                if self.breakpoints.get(rip) is not None and rip != before:
                    return exits.Debug(1, rip, 0, 0, rip, breakpoint=rip)
                if self._stop_requested.get(cpu.index):
                    return exits.Stopped(rip)
                if timeout is not None and deadline is not None and time.monotonic() >= deadline:
                    return exits.Timeout(float(timeout), rip)
                if not emulated:
                    break
        self._apply(cpu)
        return cpu.run(timeout=_left(deadline))

    def _emulated_watch_hit(self, cpu, exit, emulated) -> Optional[exits.Debug]:
        for point in emulated:
            try:
                value = read_virtual(cpu, point.address, point.length)
            except Error:
                continue
            if value != point.value:
                point.value = value
                return dataclasses.replace(exit, watchpoint=point.address, step=False)
        return None

    def stop(self, cpu) -> None:
        """Ends a :meth:`resume` of ``cpu`` in another thread soon."""
        self._stop_requested[cpu.index] = True
        cpu.stop()

    def explain(self, exit: exits.Debug) -> exits.Debug:
        """``exit`` with which breakpoint or watchpoint fired, or ``step``."""
        if exit.exception == 3:
            point = self.breakpoints.get(exit.pc)
            return dataclasses.replace(exit, breakpoint=point.address if point else None)
        slots = self._slots()
        for slot in range(DEBUG_REGISTER_COUNT):
            if exit.dr6 & (1 << slot) and slots[slot] is not None:
                point = slots[slot]
                if isinstance(point, Breakpoint):
                    return dataclasses.replace(exit, breakpoint=point.address)
                return dataclasses.replace(exit, watchpoint=point.address)
        return dataclasses.replace(exit, step=bool(exit.dr6 & _DR6_BS))


def _byte_at_rip(cpu, rip: int) -> Optional[int]:
    try:
        return read_virtual(cpu, cpu.sregs.cs.base + rip, 1)[0]
    except Error:
        return None


def _left(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def _describe(point) -> str:
    if isinstance(point, Breakpoint):
        return f"DR{point.slot}: breakpoint at {point.address:#x}"
    return f"DR{point.slot}: {point.access} watchpoint at {point.address:#x}"


def debugger(vm) -> Debugger:
    """``vm``'s :class:`Debugger`, made (and the backend probed) on first use."""
    if vm._debugger is None:
        vm._check_open()
        vm._debugger = Debugger(vm)
    return vm._debugger


def explain(vcpu, exit: exits.Debug) -> exits.Debug:
    """What ``Vcpu`` returns for a KVM_EXIT_DEBUG: ``exit`` with the
    breakpoint, watchpoint or single step that caused it."""
    debugger = getattr(vcpu._vm, "_debugger", None)
    if debugger is None:
        return dataclasses.replace(exit, step=bool(exit.dr6 & _DR6_BS))
    return debugger.explain(exit)


def linear_to_physical(cpu, address: int) -> int:
    """The guest-physical address of guest-virtual ``address`` for ``cpu``:
    through its page tables with paging on, the same address with it off.
    KVM_TRANSLATE walks them; on a backend without it (pyvt.ko) pyvt walks
    long-mode tables itself."""
    sregs = cpu.sregs
    if not sregs.cr0 & (1 << 31):
        return address
    try:
        return cpu.translate(address)
    except KvmError as e:
        if e.errno != errno.ENOTTY or not sregs.efer & (1 << 10):  # EFER.LMA
            raise
    return walk_long_mode_tables(cpu._vm.memory, sregs.cr3, address)


#: Where a page-table entry keeps the next table's (or the page's) address.
_PTE_ADDRESS = 0x000F_FFFF_FFFF_F000


def walk_long_mode_tables(memory, cr3: int, address: int) -> int:
    """The physical address 4-level long-mode tables at ``cr3`` map
    ``address`` to (4 KiB, 2 MiB and 1 GiB pages), or UnmappedAddressError."""
    table = cr3 & _PTE_ADDRESS
    for shift in (39, 30, 21, 12):
        entry = memory.read_int(table + ((address >> shift) & 0x1FF) * 8)
        if not entry & 1:  # not present
            raise UnmappedAddressError(f"guest-virtual {address:#x} is not mapped "
                                       "(the guest's page tables)")
        if shift in (30, 21) and entry & 0x80:  # a 1 GiB or 2 MiB page
            page = entry & _PTE_ADDRESS & ~((1 << shift) - 1)
            return page | (address & ((1 << shift) - 1))
        table = entry & _PTE_ADDRESS
    return table | (address & 0xFFF)


def read_virtual(cpu, address: int, length: int) -> bytes:
    """``length`` bytes at guest-virtual ``address``, page by page."""
    out = bytearray()
    while length > 0:
        chunk = min(length, 0x1000 - (address & 0xFFF))
        out += cpu._vm.memory.read(linear_to_physical(cpu, address), chunk)
        address += chunk
        length -= chunk
    return bytes(out)


def write_virtual(cpu, address: int, data: bytes) -> None:
    """Writes ``data`` at guest-virtual ``address``, page by page."""
    data = bytes(data)
    while data:
        chunk = min(len(data), 0x1000 - (address & 0xFFF))
        cpu._vm.memory.write(linear_to_physical(cpu, address), data[:chunk])
        address += chunk
        data = data[chunk:]


def instruction_at(cpu, rip: Optional[int]) -> tuple:
    """(bytes, disassembly) of the instruction at ``rip`` (CS-relative), as
    far as they can be read; disassembly needs capstone."""
    from .vcpu import disassemble

    if rip is None:
        return b"", ""
    try:
        sregs = cpu.sregs
        bits = 64 if sregs.cs.l else 32 if sregs.cs.db else 16
        code = b""
        for length in (15, 1):  # the last page may end before 15 bytes
            try:
                code = read_virtual(cpu, sregs.cs.base + rip, length)
                break
            except Error:
                continue
    except Error:
        return b"", ""
    return code, disassemble(code, rip, bits)


def fault_context(cpu, rip: Optional[int]) -> dict:
    """The fields a failure exit carries for a debugger: the instruction at
    rip, its disassembly, CR2, and the exception KVM still holds (vector,
    error code) if any."""
    instruction, disassembly = instruction_at(cpu, rip)
    context = {"instruction": instruction, "disassembly": disassembly}
    try:
        context["cr2"] = cpu.sregs.cr2
        # struct kvm_vcpu_events starts with its exception: u8 injected, nr,
        # has_error_code, pending; u32 error_code (<linux/kvm.h>, x86).
        raw = bytes(ffi.buffer(cpu.fd.get_vcpu_events()))
        injected, nr, has_error_code, pending, error_code = struct.unpack_from("<4BI", raw)
        if injected or pending:
            context["vector"] = nr
            if has_error_code:
                context["error_code"] = error_code
    except Error:
        pass
    return context
