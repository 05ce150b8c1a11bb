"""ACPI tables for a booted VM, where a guest finds them the standard way.

Layout (all in the BIOS area 0xe0000-0xfffff, which the multiboot memory
map reports as reserved):

=========  ========================================================
0xe0000    RSDP (ACPI 2.0, 36 bytes: RSDT and XSDT addresses)
0xe0040    RSDT (32-bit pointers: FADT, MADT)
0xe0080    XSDT (64-bit pointers: FADT, MADT)
0xe0100    FADT (revision 3, 244 bytes): PM timer at 0x608 (32-bit,
           TMR_VAL_EXT), reset register = I/O port 0x64, value 0xfe
           (the i8042's reset), RTC century at CMOS 0x32, 8042 present
0xe0200    DSDT (header only: no AML devices)
0xe0240    MADT: LAPIC base 0xfee00000, one enabled LAPIC per vCPU
           (ACPI ID = APIC ID = vCPU index), the IOAPIC at 0xfec00000
           (GSI base 0); only with the in-kernel irqchip
=========  ========================================================

Every table's bytes sum to zero (mod 256), RSDP's first 20 bytes too, and
its 36 bytes for the extended checksum.
"""

from __future__ import annotations

import struct
from typing import Dict, Union

from . import pc
from .errors import ArgumentError

RSDP_ADDRESS = 0xE0000
RSDT_ADDRESS = 0xE0040
XSDT_ADDRESS = 0xE0080
FADT_ADDRESS = 0xE0100
DSDT_ADDRESS = 0xE0200
MADT_ADDRESS = 0xE0240
AREA_END = 0x100000

LAPIC_ADDRESS = 0xFEE00000
IOAPIC_ADDRESS = 0xFEC00000
OEM_ID = b"PYVT  "
OEM_TABLE_ID = b"PYVTMACH"

FADT_WBINVD = 1 << 0
FADT_TMR_VAL_EXT = 1 << 8
FADT_RESET_REG_SUP = 1 << 10
BOOT_ARCH_LEGACY_DEVICES = 1 << 0
BOOT_ARCH_8042 = 1 << 1
GAS_SYSTEM_IO = 1
SCI_IRQ = 9


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

    put(36, "<II", 0, DSDT_ADDRESS)              # FIRMWARE_CTRL, DSDT
    put(46, "<H", SCI_IRQ)
    put(76, "<I", pc.PM_TIMER_PORT)              # PM_TMR_BLK
    put(91, "<B", 4)                             # PM_TMR_LEN
    put(108, "<B", 0x32)                         # CENTURY: the CMOS index
    put(109, "<H", BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042)
    put(112, "<I", FADT_WBINVD | FADT_TMR_VAL_EXT | FADT_RESET_REG_SUP)
    body[116 - 36:128 - 36] = _gas(pc.I8042_COMMAND_PORT, 8, 1)  # RESET_REG
    put(128, "<B", pc.I8042_RESET_VALUE)
    put(140, "<Q", DSDT_ADDRESS)                 # X_DSDT
    body[208 - 36:220 - 36] = _gas(pc.PM_TIMER_PORT, 32, 3)      # X_PM_TMR_BLK
    return _table(b"FACP", 3, bytes(body))


def madt(cpus: int) -> bytes:
    body = struct.pack("<II", LAPIC_ADDRESS, 1)  # PCAT_COMPAT: there are 8259s too
    for index in range(cpus):
        body += struct.pack("<BBBBI", 0, 8, index, index, 1)  # processor LAPIC, enabled
    body += struct.pack("<BBBBII", 1, 12, cpus, 0, IOAPIC_ADDRESS, 0)  # IOAPIC, GSI base 0
    return _table(b"APIC", 3, body)


def build(cpus: int, irqchip: bool = True) -> Dict[int, bytes]:
    """``{address: bytes}`` of every table for a VM with ``cpus`` vCPUs."""
    if isinstance(cpus, bool) or not isinstance(cpus, int) or not 1 <= cpus <= 255:
        raise ArgumentError(f"ACPI tables describe 1-255 vCPUs, not {cpus!r}")
    pointers = [FADT_ADDRESS] + ([MADT_ADDRESS] if irqchip else [])
    tables = {
        RSDP_ADDRESS: rsdp(),
        RSDT_ADDRESS: _table(b"RSDT", 1, struct.pack(f"<{len(pointers)}I", *pointers)),
        XSDT_ADDRESS: _table(b"XSDT", 1, struct.pack(f"<{len(pointers)}Q", *pointers)),
        FADT_ADDRESS: fadt(),
        DSDT_ADDRESS: _table(b"DSDT", 2, b""),
    }
    if irqchip:
        tables[MADT_ADDRESS] = madt(cpus)
    ordered = sorted(tables.items())
    for (address, data), (following, _) in zip(ordered, ordered[1:] + [(AREA_END, b"")],
                                               strict=True):
        assert address + len(data) <= following, f"ACPI table at {address:#x} overflows"
    return tables


def install(vm, cpus: int, irqchip: bool = True) -> Dict[int, bytes]:
    """Writes the tables into ``vm``'s memory; returns them."""
    if vm.memory.size < AREA_END:
        raise ArgumentError(f"ACPI tables live at {RSDP_ADDRESS:#x}-{AREA_END - 1:#x}: the "
                            "VM needs at least 1 MiB of RAM (or boot with acpi=False)")
    tables = build(cpus, irqchip)
    for address, data in tables.items():
        vm.memory.write(address, data)
    return tables


def pci_bus_created(vm) -> None:
    """Called when ``vm.pci`` first appears: tables written before now
    describe no PCI root, so write them again (see :func:`install`)."""
    installed = getattr(vm, "_acpi_installed", None)
    if installed is not None:
        install(vm, *installed)
