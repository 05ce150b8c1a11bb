r"""ACPI tables for a booted VM, where a guest finds them the standard way.

Layout (all in the BIOS area 0xe0000-0xfffff, which the memory maps report
as reserved):

=========  ========================================================
0xe0000    RSDP (ACPI 2.0, 36 bytes: RSDT and XSDT addresses)
0xe0040    RSDT (32-bit pointers: FADT, MADT, MCFG)
0xe0080    XSDT (64-bit pointers: FADT, MADT, MCFG)
0xe0100    FADT (revision 3, 244 bytes): PM1a event block 0x600 (status,
           enable), PM1a control block 0x604, PM timer at 0x608 (32-bit,
           TMR_VAL_EXT), reset register = I/O port 0x64, value 0xfe (the
           i8042's reset), RTC century at CMOS 0x32, 8042 present, SCI on
           IRQ 9; FIRMWARE_CTRL points at the FACS
0xe0200    FACS (64 bytes, 64-byte aligned): the waking vector
0xe0240    MADT: LAPIC base 0xfee00000, one enabled LAPIC per vCPU
           (ACPI ID = APIC ID = vCPU index), the IOAPIC at 0xfec00000
           (GSI base 0); only with the in-kernel irqchip
0xe0c00    MCFG: the ECAM window of PCI segment 0, bus 0 (with PCI only)
0xe1000    DSDT: ``\_S3`` (suspend to RAM: SLP_TYP 1), ``\_S5`` (soft off:
           SLP_TYP 0), and with PCI the root
           bridge ``\_SB.PCI0`` (PNP0A08/PNP0A03, _SEG/_BBN/_UID 0, _CRS
           with bus 0, the I/O ports but 0xcf8-0xcff, the 32- and 64-bit
           MMIO windows; _PRT: INTA-D of every slot to GSIs 16-19, swizzled)
           and ``\_SB.MRES`` (PNP0C02) reserving the ECAM window
=========  ========================================================

Every table's bytes sum to zero (mod 256), RSDP's first 20 bytes too, and
its 36 bytes for the extended checksum.  Sleep: writing SLP_TYP 0 with
SLP_EN to PM1a_CNT powers off (``run()`` returns
:class:`pyvt.exits.PowerOff`); SLP_TYP 1 suspends to RAM (``run()``
returns :class:`pyvt.exits.Suspend`; :func:`pyvt.acpi_sleep.resume` wakes
the guest at its RTC alarm, through the FACS waking vector).
"""

from __future__ import annotations

import struct
from typing import Dict, Optional, Union

from . import aml, pc, pci
from .errors import ArgumentError

RSDP_ADDRESS = 0xE0000
RSDT_ADDRESS = 0xE0040
XSDT_ADDRESS = 0xE0080
FADT_ADDRESS = 0xE0100
FACS_ADDRESS = 0xE0200
MADT_ADDRESS = 0xE0240
MCFG_ADDRESS = 0xE0C00
DSDT_ADDRESS = 0xE1000
AREA_END = 0x100000

LAPIC_ADDRESS = 0xFEE00000
IOAPIC_ADDRESS = 0xFEC00000
OEM_ID = b"PYVT  "
OEM_TABLE_ID = b"PYVTMACH"

FADT_WBINVD = 1 << 0
FADT_PWR_BUTTON = 1 << 4   # no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5   # no fixed-feature sleep button
FADT_TMR_VAL_EXT = 1 << 8
FADT_RESET_REG_SUP = 1 << 10
BOOT_ARCH_LEGACY_DEVICES = 1 << 0
BOOT_ARCH_8042 = 1 << 1
GAS_SYSTEM_IO = 1
SCI_IRQ = 9
FACS_SIZE = 64


def checksum(data: Union[bytes, bytearray]) -> int:
    """The byte that makes ``data`` sum to zero."""
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    length = 36 + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID,
                         OEM_TABLE_ID, 1, b"PYVT", 1)
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def _gas(address: int, bits: int, access_size: int) -> bytes:
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, bits, 0, access_size, address)


def rsdp() -> bytes:
    data = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, RSDT_ADDRESS,
                                 36, XSDT_ADDRESS, 0))
    data[8] = checksum(data[:20])
    data[32] = checksum(data)
    return bytes(data)


def fadt() -> bytes:
    body = bytearray(244 - 36)

    def put(offset, fmt, *values):
        struct.pack_into(fmt, body, offset - 36, *values)

    put(36, "<II", FACS_ADDRESS, DSDT_ADDRESS)   # FIRMWARE_CTRL, DSDT
    put(46, "<H", SCI_IRQ)
    put(56, "<I", pc.PM1_EVENT_PORT)             # PM1a_EVT_BLK
    put(64, "<I", pc.PM1_CONTROL_PORT)           # PM1a_CNT_BLK
    put(76, "<I", pc.PM_TIMER_PORT)              # PM_TMR_BLK
    put(88, "<BBBB", pc.PM1_EVENT_LENGTH, pc.PM1_CONTROL_LENGTH, 0, 4)  # PM1_EVT/CNT, PM2, PM_TMR_LEN
    put(108, "<B", 0x32)                         # CENTURY: the CMOS index
    put(109, "<H", BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042)
    put(112, "<I", FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_TMR_VAL_EXT
        | FADT_RESET_REG_SUP)
    body[116 - 36:128 - 36] = _gas(pc.I8042_COMMAND_PORT, 8, 1)  # RESET_REG
    put(128, "<B", pc.I8042_RESET_VALUE)
    put(140, "<Q", DSDT_ADDRESS)                 # X_DSDT
    body[148 - 36:160 - 36] = _gas(pc.PM1_EVENT_PORT, 8 * pc.PM1_EVENT_LENGTH, 2)  # X_PM1a_EVT_BLK
    body[172 - 36:184 - 36] = _gas(pc.PM1_CONTROL_PORT, 8 * pc.PM1_CONTROL_LENGTH, 2)  # X_PM1a_CNT
    body[208 - 36:220 - 36] = _gas(pc.PM_TIMER_PORT, 32, 3)      # X_PM_TMR_BLK
    return _table(b"FACP", 3, bytes(body))


def facs() -> bytes:
    """The FACS (version 2): the OS writes its waking vector here.  It has
    no checksum field; its hardware signature (any value firmware likes:
    the OS only compares it across a sleep) is the byte that makes it sum
    to zero, like every other table."""
    data = bytearray(struct.pack("<4sIIIIIQB3xI24x", b"FACS", FACS_SIZE, 0, 0, 0, 0, 0, 2, 0))
    data[8] = checksum(data)
    return bytes(data)


def madt(cpus: int) -> bytes:
    body = struct.pack("<II", LAPIC_ADDRESS, 1)  # PCAT_COMPAT: there are 8259s too
    for index in range(cpus):
        body += struct.pack("<BBBBI", 0, 8, index, index, 1)  # processor LAPIC, enabled
    body += struct.pack("<BBBBII", 1, 12, cpus, 0, IOAPIC_ADDRESS, 0)  # IOAPIC, GSI base 0
    return _table(b"APIC", 3, body)


def mcfg() -> bytes:
    """One ECAM allocation: segment 0, buses 0 to ECAM_BUSES - 1."""
    body = bytes(8) + struct.pack("<QHBB4x", pci.ECAM_BASE, 0, 0, pci.ECAM_BUSES - 1)
    return _table(b"MCFG", 1, body)


def pci_root() -> bytes:
    """``\\_SB.PCI0`` and ``\\_SB.MRES`` (AML)."""
    io_start, io_end = pci.CONFIG_IO.start, pci.CONFIG_IO.stop
    crs = aml.resource_template(
        aml.word_bus_number(0, pci.ECAM_BUSES - 1),
        aml.io(io_start, io_start, 1, io_end - io_start),  # what the bridge itself decodes
        aml.word_io(0, io_start - 1),
        aml.word_io(io_end, 0xFFFF),
        aml.dword_memory(pci.MMIO32_WINDOW[0], pci.MMIO32_WINDOW[1] - 1),
        aml.qword_memory(pci.MMIO64_WINDOW[0], pci.MMIO64_WINDOW[1] - 1),
    )
    prt = aml.package(*(aml.package((slot << 16) | 0xFFFF, pin - 1, 0, pci.intx_gsi(slot, pin))
                        for slot in range(pci.SLOTS) for pin in range(1, 5)))
    root = aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A08")),
        aml.name("_CID", aml.eisa_id("PNP0A03")),
        aml.name("_SEG", 0),
        aml.name("_BBN", 0),
        aml.name("_UID", 0),
        aml.name("_CRS", crs),
        aml.name("_PRT", prt),
    )
    reserved = aml.device(
        "MRES",
        aml.name("_HID", aml.eisa_id("PNP0C02")),
        aml.name("_UID", 1),
        aml.name("_CRS", aml.resource_template(aml.memory32_fixed(pci.ECAM_BASE, pci.ECAM_SIZE))),
    )
    # "_SB" at the table's top level is \_SB (iasl drops the root prefix too).
    return aml.scope("_SB", root, reserved)


def dsdt(with_pci: bool = True) -> bytes:
    # \_S3, \_S5: SLP_TYP values for PM1a_CNT and PM1b_CNT, then two reserved.
    body = (aml.name("_S3", aml.package(pc.SLP_TYP_S3, pc.SLP_TYP_S3, 0, 0))
            + aml.name("_S5", aml.package(pc.SLP_TYP_S5, pc.SLP_TYP_S5, 0, 0)))
    if with_pci:
        body += pci_root()
    return _table(b"DSDT", 2, body)


def build(cpus: int, irqchip: bool = True, with_pci: bool = False) -> Dict[int, bytes]:
    """``{address: bytes}`` of every table for a VM with ``cpus`` vCPUs
    (``with_pci``: the PCI root bridge in the DSDT, and the MCFG)."""
    if isinstance(cpus, bool) or not isinstance(cpus, int) or not 1 <= cpus <= 255:
        raise ArgumentError(f"ACPI tables describe 1-255 vCPUs, not {cpus!r}")
    pointers = ([FADT_ADDRESS] + ([MADT_ADDRESS] if irqchip else [])
                + ([MCFG_ADDRESS] if with_pci else []))
    tables = {
        RSDP_ADDRESS: rsdp(),
        RSDT_ADDRESS: _table(b"RSDT", 1, struct.pack(f"<{len(pointers)}I", *pointers)),
        XSDT_ADDRESS: _table(b"XSDT", 1, struct.pack(f"<{len(pointers)}Q", *pointers)),
        FADT_ADDRESS: fadt(),
        FACS_ADDRESS: facs(),
        DSDT_ADDRESS: dsdt(with_pci),
    }
    if irqchip:
        tables[MADT_ADDRESS] = madt(cpus)
    if with_pci:
        tables[MCFG_ADDRESS] = mcfg()
    ordered = sorted(tables.items())
    for (address, data), (following, _) in zip(ordered, ordered[1:] + [(AREA_END, b"")],
                                               strict=True):
        assert address + len(data) <= following, f"ACPI table at {address:#x} overflows"
    return tables


def install(vm, cpus: int, irqchip: bool = True) -> Dict[int, bytes]:
    """Writes the tables into ``vm``'s memory; returns them.  They describe
    the PCI root if ``vm.pci`` exists; if it appears later, they are
    written again (:func:`pci_bus_created`)."""
    if vm.memory.size < AREA_END:
        raise ArgumentError(f"ACPI tables live at {RSDP_ADDRESS:#x}-{AREA_END - 1:#x}: the "
                            "VM needs at least 1 MiB of RAM (or boot with acpi=False)")
    tables = build(cpus, irqchip, with_pci=getattr(vm, "_pci", None) is not None)
    for address, data in tables.items():
        vm.memory.write(address, data)
    vm._acpi_installed = (cpus, irqchip)
    return tables


def pci_bus_created(vm) -> None:
    """Called when ``vm.pci`` first appears: tables written before now
    describe no PCI root, so they are written again."""
    installed: Optional[tuple] = getattr(vm, "_acpi_installed", None)
    if installed is not None:
        install(vm, *installed)
