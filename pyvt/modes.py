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
0x90000     GDT: null, 32-bit code (0x08), data (0x10), 64-bit code (0x18)
0x91000     PML4 (one entry)
0x92000     PDPT (four entries)
0x93000     four page directories of 2 MiB pages: identity map of 0-4 GiB
==========  =================================================================

Every mode starts with RFLAGS = 0x2 and the stack just below the reserved
area: RSP = ``STACK_TOP`` (0x90000) in protected and long mode, SS:SP =
0x8000:0xfff0 in real mode.
"""

from __future__ import annotations

import struct
from typing import Dict, Tuple

from .errors import InvalidModeError, MemoryConfigError

MODES = ("real", "protected", "long")

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

CODE32_SELECTOR = 0x08
DATA_SELECTOR = 0x10
CODE64_SELECTOR = 0x18

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
PTE_LARGE = 1 << 7

RFLAGS_RESERVED = 0x2

# A flat segment: base 0, limit 4 GiB.  Access byte and flags per type.
_CODE_ACCESS = 0x9B  # present, ring 0, code, readable, accessed
_DATA_ACCESS = 0x93  # present, ring 0, data, writable, accessed
_FLAGS_32 = 0xC  # granularity 4K, 32-bit
_FLAGS_64 = 0xA  # granularity 4K, long mode


def _descriptor(access: int, flags: int) -> int:
    limit = 0xFFFFF
    return ((limit & 0xFFFF) | ((access & 0xFF) << 40) | (((limit >> 16) & 0xF) << 48)
            | ((flags & 0xF) << 52))


GDT = struct.pack(
    "<4Q",
    0,
    _descriptor(_CODE_ACCESS, _FLAGS_32),
    _descriptor(_DATA_ACCESS, _FLAGS_32),
    _descriptor(_CODE_ACCESS, _FLAGS_64),
)


def _page_tables() -> Dict[int, bytes]:
    """PML4, PDPT and page directories identity-mapping the first 4 GiB."""
    tables = {
        PML4_ADDRESS: struct.pack("<Q", PDPT_ADDRESS | PTE_PRESENT | PTE_WRITABLE),
        PDPT_ADDRESS: b"".join(
            struct.pack("<Q", (PD_ADDRESS + i * 0x1000) | PTE_PRESENT | PTE_WRITABLE)
            for i in range(4)),
    }
    two_mib = 2 << 20
    pages = IDENTITY_MAPPED // two_mib
    tables[PD_ADDRESS] = b"".join(
        struct.pack("<Q", (i * two_mib) | PTE_PRESENT | PTE_WRITABLE | PTE_LARGE)
        for i in range(pages))
    return tables


_SETUP_WRITES = {
    "real": {},
    "protected": {GDT_ADDRESS: GDT},
    "long": {GDT_ADDRESS: GDT, **_page_tables()},
}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InvalidModeError(f"unknown CPU mode {mode!r}: use one of {', '.join(MODES)}")
    return mode


def write_setup_area(memory, mode: str) -> None:
    """Writes the tables ``mode`` needs, refusing to clobber other data."""
    writes = _SETUP_WRITES[check_mode(mode)]
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
    segment.dpl = 0
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


def apply(mode: str, sregs, regs) -> None:
    """Fills ``struct kvm_sregs`` and ``struct kvm_regs`` (cffi) for ``mode``.

    The GDT and page tables must already be in guest memory
    (:func:`write_setup_area`).
    """
    apply_sregs(mode, sregs)
    apply_regs(mode, regs)


def apply_sregs(mode: str, sregs) -> None:
    """The special-register half of :func:`apply`."""
    check_mode(mode)
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
        sregs.gdt.base = GDT_ADDRESS
        sregs.gdt.limit = len(GDT) - 1
        _flat_segment(sregs.cs, CODE64_SELECTOR if long_mode else CODE32_SELECTOR,
                      code=True, long_mode=long_mode)
        for segment in data_segments:
            _flat_segment(segment, DATA_SELECTOR, code=False)
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE
        sregs.cr4 = CR4_OSFXSR | CR4_OSXMMEXCPT
        sregs.efer = 0
        if long_mode:
            sregs.cr3 = PML4_ADDRESS
            sregs.cr4 |= CR4_PAE
            sregs.cr0 |= CR0_PG | CR0_WP
            sregs.efer = EFER_LME | EFER_LMA


def apply_regs(mode: str, regs) -> None:
    """The general-register half of :func:`apply`."""
    regs.rflags = RFLAGS_RESERVED
    regs.rip = 0
    regs.rsp = STACK_TOP if check_mode(mode) != "real" else 0x10000 - 0x10


def setup_area() -> Tuple[int, int]:
    """The reserved guest-physical range ``(start, end)`` mode setup may use."""
    return SETUP_AREA_START, SETUP_AREA_END
