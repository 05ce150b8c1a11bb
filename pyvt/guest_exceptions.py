"""Exceptions of ring-3 guests: how pyvt's IDT turns them into exits.

A vCPU made with ``vm.vcpu(index, mode="long", ring=3)`` runs at CPL 3 with
an IDT and TSS that pyvt owns (:mod:`pyvt.modes`).  An exception switches to
the ring-0 stack at ``EXCEPTION_STACK_TOP``, where the CPU pushes SS, RSP,
RFLAGS, CS, RIP (and an error code for some vectors); the vector's stub
pushes a 0 in place of a missing error code, then the vector, and writes to
``EXCEPTION_PORT``, whose native device ends the run.  :func:`exit_from_frame`
reads that frame, puts the registers back as they were at the faulting
instruction, and returns the exit:

- ``hlt`` at CPL 3 raises #GP(0); pyvt recognises it and returns
  :class:`pyvt.exits.Hlt` with RIP past the ``hlt``, as at CPL 0;
- anything else is :class:`pyvt.exits.GuestException` with the vector, the
  error code, the faulting RIP and, for a page fault, CR2.

The tables live in guest memory the guest can write (its pages are all
user-accessible): a guest that overwrites them gets what it wrote.
"""

from __future__ import annotations

import struct

from . import _native, debugging, exits, modes
from .errors import OutOfRangeError, UnmappedAddressError

#: The port the exception stubs write to, where every VM has a native
#: isa-debug-exit (``vm.guest_exceptions``; csrc/debug_exit.h).
EXCEPTION_PORT = _native.GUEST_EXCEPTION_PORT

#: vector, error code, RIP, CS, RFLAGS, RSP, SS: the stack below
#: EXCEPTION_STACK_TOP once a stub has pushed its vector.
_FRAME = struct.Struct("<7Q")
FRAME_ADDRESS = modes.EXCEPTION_STACK_TOP - _FRAME.size

_HLT = 0xF4
_GP = 13
_PF = 14


def exit_from_frame(vcpu) -> exits.Exit:
    """The exit for the exception whose stub stopped ``vcpu``, which is put
    back at the faulting instruction in ring 3 (see the module's docstring)."""
    memory = vcpu._vm.memory
    vector, error_code, rip, cs, rflags, rsp, ss = _FRAME.unpack(
        memory.read(FRAME_ADDRESS, _FRAME.size))
    sregs = vcpu.sregs
    cr2 = sregs.cr2 if vector == _PF else None
    if cs & 3 == 3:  # from ring 3: resume there (the CPU loaded ring-0 CS and SS)
        modes.apply_user_segments(sregs)
    regs = vcpu.regs
    regs.rip, regs.rsp, regs.rflags = rip, rsp, rflags
    if vector == _GP and error_code == 0 and _byte_at(memory, rip) == _HLT:
        regs.rip = rip + 1
        return exits.Hlt(rip + 1)
    return exits.GuestException(vector, error_code, rip, cr2,
                                *debugging.instruction_at(vcpu, rip))


def _byte_at(memory, address: int):
    """The byte at guest-physical ``address`` (identity-mapped), or None
    outside guest RAM (a fetch fault there is not a ``hlt``)."""
    try:
        return memory.read(address, 1)[0]
    except (OutOfRangeError, UnmappedAddressError):
        return None
