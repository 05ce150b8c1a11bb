"""CPU mode setup: put a fresh vCPU in real, protected or long mode, ready to
run flat code at whatever RIP the caller sets.

Protected and long mode need a GDT and (long mode) page tables in guest
memory.  pyvt keeps them in one documented reserved area,
``SETUP_AREA_START``-``SETUP_AREA_END`` (0x90000-0x9ffff, the top of
conventional memory, away from the usual load addresses 0x1000, 0x7c00 and
0x100000).  Mode setup refuses to overwrite that area if it already holds
something else, so user data is never clobbered silently.

Layout of the reserved area:

==========  =================================================================
0x90000     GDT: null, 32-bit code (0x08), data (0x10), 64-bit code (0x18),
            ring-3 64-bit code (0x23), ring-3 data (0x2b), TSS (0x30)
0x91000     PML4 (one entry)
0x92000     PDPT (four entries)
0x93000     four page directories of 2 MiB pages: identity map of 0-4 GiB,
            user-accessible (so ring-3 code sees the same flat space)
0x97000     TSS: ring-0 stack for exceptions, I/O permission bitmap (ring 3)
0x9a000     IDT: vectors 0-31 (ring 3)
0x9a200     exception entry stubs (ring 3; see :mod:`pyvt.guest_exceptions`)
0xa0000     top of the exception stack (ring 3)
==========  =================================================================

A long-mode vCPU made with ``ring=3`` runs at CPL 3 in the same address
space: DPL-3 code and data segments, IOPL 3 and an I/O permission bitmap
that allows every port (software-assisted KVMs such as PVM clear IOPL in
user mode, so the bitmap is what lets port I/O through), and a TSS and IDT
owned by pyvt, so that an exception ends ``run()`` with
:class:`pyvt.exits.GuestException` instead of a triple fault.

Every mode starts with RFLAGS = 0x2 and the stack just below the reserved
area: RSP = ``STACK_TOP`` (0x90000) in protected and long mode, SS:SP =
0x8000:0xfff0 in real mode.
"""

from __future__ import annotations

import struct
from typing import Dict, Tuple

from .errors import ArgumentError, InvalidModeError, MemoryConfigError

MODES = ("real", "protected", "long")
#: The privilege levels a vCPU can start at (``vm.vcpu(..., ring=3)``).
RINGS = (0, 3)

#: Where flat guest code goes unless told otherwise (pyvt.run, pyvt.assemble).
LOAD_ADDRESS = 0x1000

SETUP_AREA_START = 0x90000
SETUP_AREA_END = 0xA0000  # exclusive
STACK_TOP = SETUP_AREA_START

GDT_ADDRESS = 0x90000
PML4_ADDRESS = 0x91000
PDPT_ADDRESS = 0x92000
PD_ADDRESS = 0x93000
IDENTITY_MAPPED = 4 << 30
TSS_ADDRESS = 0x97000
IDT_ADDRESS = 0x9A000
EXCEPTION_STUBS_ADDRESS = 0x9A200
EXCEPTION_STACK_TOP = SETUP_AREA_END
#: The exceptions the stubs report: the architectural vectors 0-31.
EXCEPTION_VECTORS = 32

CODE32_SELECTOR = 0x08
DATA_SELECTOR = 0x10
CODE64_SELECTOR = 0x18
USER_CODE64_SELECTOR = 0x20 | 3
USER_DATA_SELECTOR = 0x28 | 3
TSS_SELECTOR = 0x30

# Control-register and EFER bits (Intel SDM Vol. 3, 2.5; AMD APM Vol. 2, 3.1).
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# Page-table entry bits.
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_USER = 1 << 2
PTE_ACCESSED = 1 << 5
PTE_DIRTY = 1 << 6
PTE_LARGE = 1 << 7

RFLAGS_RESERVED = 0x2
RFLAGS_IOPL3 = 3 << 12

# A flat segment: base 0, limit 4 GiB.  Access byte and flags per type.
_CODE_ACCESS = 0x9B  # present, ring 0, code, readable, accessed
_DATA_ACCESS = 0x93  # present, ring 0, data, writable, accessed
_DPL3 = 3 << 5
_FLAGS_32 = 0xC  # granularity 4K, 32-bit
_FLAGS_64 = 0xA  # granularity 4K, long mode
_TSS_TYPE = 0x89  # present, ring 0, 64-bit TSS (available)
_IO_BITMAP_BYTES = 0x10000 // 8
#: The 64-bit TSS (104 bytes), then an I/O bitmap allowing every port and
#: the byte of ones the CPU requires after it.
TSS_SIZE = 0x68 + _IO_BITMAP_BYTES + 1


def _descriptor(access: int, flags: int) -> int:
    limit = 0xFFFFF
    return ((limit & 0xFFFF) | ((access & 0xFF) << 40) | (((limit >> 16) & 0xF) << 48)
            | ((flags & 0xF) << 52))


def _tss_descriptor(base: int, limit: int) -> bytes:
    """A 16-byte long-mode system descriptor for the TSS at ``base``."""
    low = ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (_TSS_TYPE << 40)
           | (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56))
    return struct.pack("<QQ", low, base >> 32)


GDT = struct.pack(
    "<6Q",
    0,
    _descriptor(_CODE_ACCESS, _FLAGS_32),
    _descriptor(_DATA_ACCESS, _FLAGS_32),
    _descriptor(_CODE_ACCESS, _FLAGS_64),
    _descriptor(_CODE_ACCESS | _DPL3, _FLAGS_64),
    _descriptor(_DATA_ACCESS | _DPL3, _FLAGS_32),
) + _tss_descriptor(TSS_ADDRESS, TSS_SIZE - 1)


def _page_tables() -> Dict[int, bytes]:
    """PML4, PDPT and page directories identity-mapping the first 4 GiB,
    user-accessible at every level (ring-0 code does not mind: pyvt sets
    neither SMEP nor SMAP).  Every entry is marked accessed, and every 2 MiB
    page dirty, so that the CPU never writes the tables itself: a guest's
    first touch of a page would otherwise dirty them in KVM's log, and
    pyvt.Sandbox takes a write to pyvt's reserved area as a sign that the
    guest may have left CPL 3."""
    flags = PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED
    tables = {
        PML4_ADDRESS: struct.pack("<Q", PDPT_ADDRESS | flags),
        PDPT_ADDRESS: b"".join(
            struct.pack("<Q", (PD_ADDRESS + i * 0x1000) | flags) for i in range(4)),
    }
    two_mib = 2 << 20
    pages = IDENTITY_MAPPED // two_mib
    tables[PD_ADDRESS] = b"".join(
        struct.pack("<Q", (i * two_mib) | flags | PTE_DIRTY | PTE_LARGE) for i in range(pages))
    return tables


#: Vectors for which the CPU pushes an error code (SDM Vol. 3, 6.13).
_ERROR_CODE_VECTORS = frozenset((8, 10, 11, 12, 13, 14, 17, 21, 29, 30))
#: #BP (int3) and #OF (into): software exceptions ring 3 may raise.
_USER_RAISED_VECTORS = frozenset((3, 4))


def exception_stubs(port: int) -> Tuple[bytes, bytes]:
    """The IDT and the entry stubs for ring-3 vCPUs.  Each stub makes the
    frame uniform (a 0 where the CPU pushes no error code), pushes its
    vector and writes to ``port``, whose device ends the run; pyvt then reads
    the frame at ``EXCEPTION_STACK_TOP`` (see :mod:`pyvt.guest_exceptions`)."""
    idt, stubs = bytearray(), bytearray()
    for vector in range(EXCEPTION_VECTORS):
        entry = EXCEPTION_STUBS_ADDRESS + len(stubs)
        if vector not in _ERROR_CODE_VECTORS:
            stubs += b"\x6a\x00"  # push $0
        stubs += bytes((0x6A, vector,  # push $vector
                        0xE6, port,  # out %al, $port
                        0xEB, 0xFE))  # jmp . (never reached: the run ends)
        # A 64-bit interrupt gate, no IST; DPL 3 for int3 and into, which
        # ring 3 may raise itself (as Linux does), DPL 0 for the rest.
        gate = 0xEE if vector in _USER_RAISED_VECTORS else 0x8E
        idt += struct.pack("<HHBBHII", entry & 0xFFFF, CODE64_SELECTOR, 0, gate,
                           (entry >> 16) & 0xFFFF, entry >> 32, 0)
    return bytes(idt), bytes(stubs)


def _tss() -> bytes:
    tss = bytearray(TSS_SIZE)
    struct.pack_into("<Q", tss, 4, EXCEPTION_STACK_TOP)  # RSP0
    struct.pack_into("<H", tss, 0x66, 0x68)  # the I/O bitmap follows the TSS
    tss[-1] = 0xFF
    return bytes(tss)


def _ring3_writes(port: int) -> Dict[int, bytes]:
    idt, stubs = exception_stubs(port)
    return {TSS_ADDRESS: _tss(), IDT_ADDRESS: idt, EXCEPTION_STUBS_ADDRESS: stubs}


_SETUP_WRITES = {
    "real": {},
    "protected": {GDT_ADDRESS: GDT},
    "long": {GDT_ADDRESS: GDT, **_page_tables()},
}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InvalidModeError(f"unknown CPU mode {mode!r}: use one of {', '.join(MODES)}")
    return mode


def check_ring(ring: int, mode: str) -> int:
    """``ring`` if a vCPU in ``mode`` can start there."""
    if isinstance(ring, bool) or ring not in RINGS:
        raise ArgumentError(f"ring must be 0 or 3, not {ring!r}")
    if ring == 3 and mode != "long":
        raise InvalidModeError(f"ring 3 needs mode='long', not {mode!r}: pyvt's ring-3 "
                               "setup (user page tables, TSS, IDT) is for long mode")
    return ring


def write_setup_area(memory, mode: str, ring: int = 0, exception_port: int = 0) -> None:
    """Writes the tables ``mode`` (and ``ring`` 3, whose stubs report to
    ``exception_port``) needs, refusing to clobber other data."""
    writes = dict(_SETUP_WRITES[check_mode(mode)])
    if check_ring(ring, mode) == 3:
        writes.update(_ring3_writes(exception_port))
    if not writes:
        return
    if memory.size < SETUP_AREA_END:
        raise MemoryConfigError(
            f"{mode} mode needs guest RAM up to {SETUP_AREA_END:#x} for its GDT"
            f"{' and page tables' if mode == 'long' else ''} (pyvt.modes.SETUP_AREA); "
            f"this VM has {memory.size:#x} bytes")
    for address, data in writes.items():
        present = memory.read(address, len(data))
        if present != data and any(present):
            raise MemoryConfigError(
                f"{mode}-mode setup needs {address:#x}-{address + len(data) - 1:#x} "
                f"(pyvt's reserved area {SETUP_AREA_START:#x}-{SETUP_AREA_END - 1:#x}), "
                "but guest memory there already holds other data: move that data, "
                "or write it after creating the vCPU if you mean to replace the tables")
    for address, data in writes.items():
        memory.write(address, data)


def _flat_segment(segment, selector: int, code: bool, long_mode: bool = False) -> None:
    segment.base = 0
    segment.limit = 0xFFFFFFFF
    segment.selector = selector
    segment.type = 0xB if code else 0x3
    segment.present = 1
    segment.dpl = selector & 3
    segment.s = 1
    segment.l = 1 if long_mode and code else 0
    segment.db = 0 if long_mode and code else 1
    segment.g = 1
    segment.avl = 0
    segment.unusable = 0


def _real_segment(segment, code: bool) -> None:
    segment.base = 0
    segment.limit = 0xFFFF
    segment.selector = 0
    segment.type = 0xB if code else 0x3
    segment.present = 1
    segment.dpl = 0
    segment.s = 1
    segment.l = 0
    segment.db = 0
    segment.g = 0
    segment.unusable = 0


def apply(mode: str, sregs, regs, ring: int = 0) -> None:
    """Fills ``struct kvm_sregs`` and ``struct kvm_regs`` (cffi) for ``mode``
    at privilege level ``ring``.

    The GDT and page tables must already be in guest memory
    (:func:`write_setup_area`).
    """
    apply_sregs(mode, sregs, ring)
    apply_regs(mode, regs, ring)


def apply_sregs(mode: str, sregs, ring: int = 0) -> None:
    """The special-register half of :func:`apply`."""
    check_mode(mode)
    check_ring(ring, mode)
    data_segments = (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss)
    if mode == "real":
        _real_segment(sregs.cs, code=True)
        for segment in data_segments:
            _real_segment(segment, code=False)
        # Real-mode SP is 16 bits: put SS at 0x8000 so SS:SP is STACK_TOP.
        sregs.ss.selector = (STACK_TOP - 0x10000) >> 4
        sregs.ss.base = STACK_TOP - 0x10000
        sregs.cr0 &= ~(CR0_PE | CR0_PG) & 0xFFFFFFFFFFFFFFFF
        sregs.cr4 = 0
        sregs.efer = 0
    else:
        long_mode = mode == "long"
        user = ring == 3
        sregs.gdt.base = GDT_ADDRESS
        sregs.gdt.limit = len(GDT) - 1
        code = CODE64_SELECTOR if long_mode else CODE32_SELECTOR
        _flat_segment(sregs.cs, USER_CODE64_SELECTOR if user else code,
                      code=True, long_mode=long_mode)
        for segment in data_segments:
            _flat_segment(segment, USER_DATA_SELECTOR if user else DATA_SELECTOR, code=False)
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE
        sregs.cr4 = CR4_OSFXSR | CR4_OSXMMEXCPT
        sregs.efer = 0
        if long_mode:
            sregs.cr3 = PML4_ADDRESS
            sregs.cr4 |= CR4_PAE
            sregs.cr0 |= CR0_PG | CR0_WP
            sregs.efer = EFER_LME | EFER_LMA
        if user:
            _task_register(sregs.tr)
            sregs.idt.base = IDT_ADDRESS
            sregs.idt.limit = EXCEPTION_VECTORS * 16 - 1


def apply_user_segments(sregs) -> None:
    """CS and SS as a ``ring=3`` vCPU starts with (an exception loads the
    ring-0 ones; pyvt puts these back to resume the guest)."""
    _flat_segment(sregs.cs, USER_CODE64_SELECTOR, code=True, long_mode=True)
    _flat_segment(sregs.ss, USER_DATA_SELECTOR, code=False)


def _task_register(segment) -> None:
    segment.base = TSS_ADDRESS
    segment.limit = TSS_SIZE - 1
    segment.selector = TSS_SELECTOR
    segment.type = 0xB  # 64-bit TSS, busy (as LTR leaves it)
    segment.present = 1
    segment.dpl = 0
    segment.s = 0
    segment.l = segment.db = segment.g = segment.avl = 0
    segment.unusable = 0


def apply_regs(mode: str, regs, ring: int = 0) -> None:
    """The general-register half of :func:`apply`."""
    regs.rflags = RFLAGS_RESERVED | (RFLAGS_IOPL3 if check_ring(ring, mode) == 3 else 0)
    regs.rip = 0
    regs.rsp = STACK_TOP if check_mode(mode) != "real" else 0x10000 - 0x10


def setup_area() -> Tuple[int, int]:
    """The reserved guest-physical range ``(start, end)`` mode setup may use."""
    return SETUP_AREA_START, SETUP_AREA_END
